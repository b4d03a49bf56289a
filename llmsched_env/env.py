"""``LLMSched-v0``: admission control of an LLM serving engine under a KV-cache limit, as a Gymnasium environment."""

from __future__ import annotations

import enum
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llmsched_env import kernels
from llmsched_env.admission import AdmissionControl
from llmsched_env.engine import Decision, Engine, IterationOutcome, SchedulerState
from llmsched_env.episode import CompiledEpisode, LoopState
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import FluidSolution
from llmsched_env.metrics import summarize
from llmsched_env.runner import Rollout, RunResult
from llmsched_env.scenario import Scenario, build_scenario
from llmsched_env.simulator import SimulatedEngine
from llmsched_env.workload import ArrivalKind

#: The README's tight-memory two-type workload: ρ = 0.8 with 1.5 × M* of KV memory (the paper's setting).
TIGHT_MEMORY_RATE = 32.65
TIGHT_MEMORY_TOKENS = 54_762

RateSpec = float | tuple[float, float] | None


class _Default(enum.Enum):
    """Marks an argument left out (``None`` means something else for it)."""

    VALUE = "default"


DEFAULT = _Default.VALUE


class LLMSchedEnv(gym.Env[np.ndarray, np.ndarray]):
    """Admission control of an LLM serving engine whose KV cache can run out.

    ## Description

    Requests of a few types (prompt length ``p``, output length ``o``) arrive at random. Every running
    request decodes one token per engine iteration and its KV cache grows by one token each time; the
    iteration's duration follows the engine's cost model (``τ = c0 + c_pf·prefill tokens + c_dec·decodes +
    c_kv·KV tokens``). When the running batch outgrows the KV capacity, the engine evicts the newest
    requests, as vLLM does, and they must prefill their whole context again later (the recompute is
    charged in time). The agent decides **admissions**: how many waiting requests of each class join the
    batch now. Greedy admission maximises the batch now and risks eviction cascades later; the fluid
    benchmark of arXiv 2504.11320 ("Fluid-Guided Online Scheduling with Memory Constraints") gives the
    throughput no policy can beat, and the episode's return is minus the regret against it.

    One step is one *decision epoch*: an iteration at which someone waits and something could be
    admitted. Iterations with nothing to decide (empty queue, or memory full) run inside the step under a
    fixed rule (decode everything running, admit nothing), and their time and reward accumulate into it.

    ## Action Space

    ``MultiDiscrete([max_admit + 1] * K)``: for each request class ``k``, how many of its oldest waiting
    requests to admit now (whole prompts; every running request decodes anyway). Classes are the
    request types when output lengths are known, prompt-length classes when they are hidden. This
    expresses WAIT's decision and vLLM's greedy FCFS admission exactly. :meth:`action_masks` gives the
    allowed counts (requests that exist and fit in memory) for sb3-contrib's ``MaskablePPO``; an action
    outside them never raises: it is clipped to the largest allowed count per class, then cut, in queue
    order, to what fits together, and ``info["clipped"]`` is ``True``.

    ## Observation Space

    ``Box(0, 1, (K·(B + 3) + 7,), float32)``, normalised inside the environment (no statistics to save):
    per class the queue length; per class and stage bucket (``B`` buckets: quarters of the output when
    lengths are known, output-length quantile segments when hidden) the running requests; KV memory in
    use and the peak the running batch will need before it finishes (exact with known lengths, by the
    mean residual length when hidden); time since the last admission; per class the arrival rate
    (exponentially weighted, ``rate_window_s``); the fluid targets: ``n*`` per class, ``M*/C``, the share
    ``Θ*/Σλ`` the fluid optimum serves, the load ``ρ``; and the episode's progress ``t/T``. Counts are
    squashed as ``x / (x + s)`` with ``s`` their fluid value, so ``0.5`` means "at the fluid target".
    ``AdmissionControl.observation_names()`` names every entry.

    ## Rewards

    ``completions − Θ*·Δt`` over the step (``Δt`` the simulated time it covered, up to the horizon): minus
    the increment of regret against the fluid optimum ``Θ*``, so an episode's return is minus its regret
    ``Θ*·T − completions`` (the ``regret_requests`` of ``llmsched simulate``). ``reward="tokens"`` counts
    output tokens instead (``regret_tokens``). Optional penalties, off by default: ``latency_penalty`` ×
    request-seconds spent in the system during the step (by Little's law, the sum of latencies), and
    ``eviction_penalty`` × evictions.

    ## Starting State

    An empty engine at time 0. The arrivals are sampled at reset from the scenario's workload (at a rate
    drawn uniformly from ``rate`` when it is a range), seeded by :attr:`np_random`.

    ## Episode End

    ``terminated`` is always ``False`` (serving has no terminal state). The episode is truncated at the
    horizon ``T`` (no iteration starts at or after it), or earlier if nothing runs and nothing more
    arrives.

    ## Info

    Every step: ``time_s``, ``arrived``, ``completed``, ``waiting``, ``running``, ``evictions``,
    ``iterations`` (cumulative), ``regret_requests`` (so far: ``Θ*·t − completed``), ``admitted`` (per
    class, this step), ``clipped``. On the last step, every metric of ``llmsched simulate --json`` under its
    name (throughput, latency and TTFT percentiles, memory, regret). No wall-clock time appears, so
    reruns compare equal.

    ## Arguments

    ``gym.make("LLMSched-v0", **kwargs)`` (or ``gym.make("llmsched_env:LLMSched-v0")`` without importing
    the package first); every argument is a keyword:

    * ``types`` (compact form ``"p=50,o=156,rate=1;p=100,o=171,rate=1"``) or ``trace`` (a CSV), or a
      ``scenario``: a :class:`~llmsched_env.scenario.Scenario`, or the name of one of the suite
      (``"bursty-high"``, ``"azure-conv-like-hidden"``: ``llmsched scenarios`` lists them), whose rate then
      defaults to its swept loads' range (drawn at each reset) and its memory to its own;
      ``arrivals`` (``poisson``, ``gamma``, ``onoff``, ``diurnal``) and ``cv`` for types;
    * ``rate``: total req/s, or ``(low, high)`` drawn at each reset (default 32.65, ρ = 0.8);
    * ``profile``, ``cost``, ``memory_tokens`` (default 54,762: 1.5 × M* at ρ = 0.8), ``block_size``;
    * ``horizon`` (simulated seconds per episode, default 600), ``output_lengths_known`` (default ``True``);
    * ``reward`` (``requests`` or ``tokens``), ``latency_penalty``, ``eviction_penalty``;
    * ``max_admit`` (64), ``stage_buckets`` (4), ``max_classes`` (prompt classes when hidden, 4),
      ``rate_window_s`` (5);
    * ``render_mode``: ``"ansi"`` (a one-screen status) or ``"rgb_array"`` (memory and queue over time);
    * ``compiled`` (default ``True``): on the simulated engine, run each step as one compiled call
      (:mod:`llmsched_env.episode`); ``False`` runs the Python loop, which gives exactly the same episodes
      (``rgb_array`` rendering, which records every iteration, always does).

    ``reset(options={"arrival_seed": s, "rate": r})`` pins the arrivals to ``scenario.sample(T, s)`` (the
    requests ``llmsched simulate --seed s`` replays) and the rate.

    ## Version History

    * v0: initial version (known and hidden lengths, Poisson, gamma and on-off arrivals, traces); named
      scenarios of the suite and diurnal arrivals added without changing existing episodes; the compiled
      step (``compiled``) added, with the same episodes.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        *,
        types: str | None = None,
        trace: str | Path | None = None,
        scenario: Scenario | str | None = None,
        arrivals: ArrivalKind | None = None,
        cv: float | None = None,
        rate: RateSpec | _Default = DEFAULT,
        profile: str | None = None,
        cost: str | None = None,
        memory_tokens: int | None | _Default = DEFAULT,
        block_size: int | None = None,
        horizon: float = 600.0,
        output_lengths_known: bool = True,
        reward: Literal["requests", "tokens"] = "requests",
        latency_penalty: float = 0.0,
        eviction_penalty: float = 0.0,
        max_admit: int = 64,
        stage_buckets: int = 4,
        max_classes: int = 4,
        rate_window_s: float = 5.0,
        render_mode: str | None = None,
        compiled: bool = True,
    ) -> None:
        if scenario is not None and (types is not None or trace is not None):
            raise ConfigError("give a scenario, or types / trace to build one, not both")
        if isinstance(scenario, str):
            from llmsched_env.scenarios import load_scenario

            spec = load_scenario(scenario)
            scenario = replace(spec.scenario, output_lengths_known=output_lengths_known
                               and spec.scenario.output_lengths_known)
            if memory_tokens is not DEFAULT and memory_tokens is not None:
                scenario = replace(scenario, capacity_tokens=memory_tokens)
            if rate is DEFAULT:
                rates = spec.rates()
                rate = (min(rates), max(rates))
        elif scenario is None:
            scenario = build_scenario(types=types, trace=trace, profile=profile, cost=cost,
                                      memory_tokens=TIGHT_MEMORY_TOKENS if memory_tokens is DEFAULT else memory_tokens,
                                      block_size=block_size, arrivals=arrivals, cv=cv,
                                      hidden_lengths=not output_lengths_known)
        else:
            scenario = replace(scenario, output_lengths_known=output_lengths_known)
        if rate is DEFAULT:
            rate = TIGHT_MEMORY_RATE
        if not (math.isfinite(horizon) and horizon > 0):
            raise ConfigError(f"horizon must be finite and > 0 s, got {horizon!r}")
        if reward not in ("requests", "tokens"):
            raise ConfigError(f"reward must be 'requests' or 'tokens', got {reward!r}")
        for name, value in (("latency_penalty", latency_penalty), ("eviction_penalty", eviction_penalty)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        offered = scenario.offered_mix()
        scenario.engine().check_fits(offered.prompt_lens, offered.output_lens)  # an impossible config fails here
        self.rate_range = _rate_range(rate, scenario)
        self.scenario = scenario
        self.horizon = float(horizon)
        self.reward_unit = reward
        self.latency_penalty = float(latency_penalty)
        self.eviction_penalty = float(eviction_penalty)
        self.render_mode = render_mode
        self.compiled = bool(compiled)
        self.control = AdmissionControl(scenario, max_admit=max_admit, stage_buckets=stage_buckets,
                                        max_classes=max_classes, rate_window_s=rate_window_s)
        self.action_space = spaces.MultiDiscrete(self.control.action_nvec)
        self.observation_space = spaces.Box(0.0, 1.0, (self.control.observation_size,), dtype=np.float32)
        self._rollout: Rollout | None = None
        self._episode: CompiledEpisode | None = None
        self._loop_buffers: LoopState | None = None

    # -- what the episode runs on ---------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The engine of the current episode."""
        return self._live_rollout().engine

    @property
    def fluid(self) -> FluidSolution:
        """The fluid benchmark of the current episode."""
        self._live_rollout()
        return self._fluid

    @property
    def nominal_rate(self) -> float:
        """The middle of the rate range: where an agent trained on this environment is validated and evaluated."""
        return sum(self.rate_range) / 2

    @property
    def rollout(self) -> Rollout:
        """The evaluation loop running the current episode."""
        return self._live_rollout()

    @property
    def fluid_rate(self) -> float:
        """``Θ*`` in the reward's unit (requests or output tokens per second): the reward's charge per second."""
        return self._fluid_rate()

    @property
    def accounted_time(self) -> float:
        """The simulated time charged to the regret so far (s); a compiled loop that advances the episode sets it."""
        return self._accounted_time

    @accounted_time.setter
    def accounted_time(self, value: float) -> None:
        self._accounted_time = float(value)

    @property
    def compiled_episode(self) -> CompiledEpisode | None:
        """The compiled loop running the current episode (``None`` on the Python loop)."""
        return self._episode

    @property
    def pending_reward(self) -> float:
        """The reward earned since reset that the next step returns (the fluid charge until the first epoch)."""
        return self._pending_reward

    def use_loop_buffers(self, buffers: LoopState | None) -> None:
        """Keep the compiled loop's counters, candidates and observation in ``buffers`` from the next reset on
        (the vector environment passes rows of its batched arrays); ``None``: arrays of the episode's own."""
        self._loop_buffers = buffers

    def _live_rollout(self) -> Rollout:
        if self._rollout is None:
            raise RuntimeError("call reset() first")
        return self._rollout

    def make_engine(self, scenario: Scenario) -> Engine:
        """The engine an episode runs on (the simulated one; a live backend overrides this)."""
        return scenario.engine()

    # -- Gymnasium API ----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"arrival_seed", "rate"}
        if unknown:
            raise ConfigError(f"unknown reset option(s) {', '.join(sorted(unknown))}; allowed: arrival_seed, rate")
        low, high = self.rate_range
        rate = float(options["rate"]) if "rate" in options else (
            low if low == high else float(self.np_random.uniform(low, high)))
        arrival_seed = int(options.get("arrival_seed", self.np_random.integers(2**63 - 1)))
        scenario = self.scenario.at_rate(rate)
        arrivals = scenario.sample(self.horizon, arrival_seed)
        self._fluid = scenario.fluid(arrivals, self.horizon)
        self.control.reset(self.control.targets_for(scenario, self.horizon), arrivals.until(self.horizon))
        engine = self.make_engine(scenario)
        self._history: list[tuple[float, int, int]] = []
        callbacks = (self._record,) if self.render_mode == "rgb_array" else ()
        self._rollout = Rollout(engine, arrivals, self.horizon, callbacks)
        self.rate, self.arrival_seed = rate, arrival_seed
        self._accounted_time = 0.0
        self._last_admitted = np.zeros(self.control.num_classes, dtype=np.int64)
        self._last_clipped = False
        self._episode = None
        if self.compiled and not callbacks and isinstance(engine, SimulatedEngine):
            self._episode = CompiledEpisode(self, self._loop_buffers)
            observation, _, self._pending_reward, _, _, self._candidates = self._episode.advance(None, None, 0.0)
            return observation, self._info(final=False)
        # The time before the first epoch (until the first arrival) is charged to the first step.
        self._pending_reward, _ = self._advance_to_epoch()
        return self._observation(), self._info(final=False)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._live_rollout()
        if self._candidates is None:
            raise RuntimeError("the episode is over: call reset()")
        if self._episode is not None:
            observation, first, more, admitted, clipped, self._candidates = self._episode.advance(
                self.control.checked_action(action), self._candidates, self._pending_reward)
            self._pending_reward = 0.0
            self._last_admitted, self._last_clipped = admitted, clipped
            done = self._candidates is None
            return observation, float(first + more), False, done, self._info(final=done)
        decision, admitted, clipped = self.control.decision(self._state, action, self._candidates)
        reward = self._pending_reward + self.apply_decision(decision)
        self._pending_reward = 0.0
        self._last_admitted, self._last_clipped = admitted, clipped
        more, done = self._advance_to_epoch()
        reward += more
        return self._observation(), float(reward), False, done, self._info(final=done)

    def action_masks(self) -> np.ndarray:
        """Allowed counts per class, flattened (``sum(nvec)`` booleans), as sb3-contrib's MaskablePPO expects."""
        if self._candidates is None:
            return np.ones(int(self.action_space.nvec.sum()), dtype=bool)
        return self.control.action_mask(self._candidates)

    def action_for(self, decision: Decision) -> np.ndarray:
        """The action that admits what ``decision`` would get admitted now: turns a baseline policy into a
        scripted agent (imitation, and the test that the action space expresses WAIT and vLLM exactly)."""
        if self._candidates is None:
            raise RuntimeError("no decision is due: call reset()")
        return self.control.action_for(self.engine.state(), decision, self._candidates)

    def scheduler_state(self) -> SchedulerState:
        """The engine's state at the current epoch (what a baseline policy would decide on)."""
        return self.engine.state()

    # -- the loop -----------------------------------------------------------------------------------------
    def apply_decision(self, decision: Decision) -> float:
        """Run one engine iteration of ``decision`` through the rollout (no epoch logic); the reward it earns.
        The compiled loop hands back the iterations that need the engine's general path this way."""
        rollout = self._live_rollout()
        engine = rollout.engine
        before = engine.now
        in_system = engine.num_waiting + engine.num_running
        outcome = rollout.apply(decision)
        return self._reward(outcome, before, engine.now, in_system)

    def _advance_to_epoch(self) -> tuple[float, bool]:
        """Run fixed-rule iterations until the agent has a choice or the episode ends: ``(reward, done)``."""
        rollout = self._live_rollout()
        control = self.control
        reward = 0.0
        while rollout.needs_decision():
            state = rollout.engine.state()
            candidates = control.candidates(state)
            if control.is_epoch(candidates):
                self._candidates = candidates
                self._state = state
                return reward, False
            reward += self.apply_decision(control.fixed_decision(state))
        self._candidates = None
        self._state = rollout.engine.state()
        # Regret counts to the horizon: charge the fluid optimum's service of the time left, if the run ended early.
        charge, self._accounted_time = kernels.reward_increment(0.0, self.horizon, self.horizon, self._accounted_time,
                                                                self.horizon, self._fluid_rate(), 0.0, 0)
        return reward + charge, True

    def _fluid_rate(self) -> float:
        return self._fluid.throughput_rps if self.reward_unit == "requests" else self._fluid.throughput_tps

    def _reward(self, outcome: IterationOutcome | None, before: float, after: float, in_system: int) -> float:
        reward = 0.0
        if outcome is not None and len(outcome.finished):
            if self.reward_unit == "requests":
                reward += len(outcome.finished)
            else:  # output tokens: a finished request's context is its prompt and its whole output
                state = self._live_rollout().engine.state()
                reward += float(state.context_len[outcome.finished].sum() - state.prompt_len[outcome.finished].sum())
        reward, self._accounted_time = kernels.reward_increment(reward, before, after, self._accounted_time,
                                                                self.horizon, self._fluid_rate(), self.latency_penalty,
                                                                in_system)
        if self.eviction_penalty and outcome is not None:
            reward -= self.eviction_penalty * len(outcome.evicted)
        return reward

    def _observation(self) -> np.ndarray:
        candidates = self._candidates if self._candidates is not None else self.control.candidates(self._state)
        return self.control.observe(self._state, candidates)

    def _info(self, *, final: bool) -> dict[str, Any]:
        return self.episode_info(final=final, admitted=self._last_admitted, clipped=self._last_clipped)

    def episode_info(self, *, final: bool, admitted: np.ndarray, clipped: bool) -> dict[str, Any]:
        """The step's ``info`` (see the class docstring) after a step that admitted ``admitted`` per class and
        was ``clipped`` or not; ``final`` adds the run's metrics."""
        rollout = self._live_rollout()
        engine = rollout.engine
        now = engine.now
        completed = engine.num_finished
        info: dict[str, Any] = {
            "time_s": now, "arrived": engine.num_requests, "completed": completed,
            "waiting": engine.num_waiting, "running": engine.num_running, "evictions": rollout.evictions,
            "iterations": rollout.iterations,
            "regret_requests": self._fluid.throughput_rps * min(now, self.horizon) - completed,
            "admitted": np.array(admitted, dtype=np.int64), "clipped": bool(clipped),
        }
        if final:
            info.update(summarize(self.result(), self._fluid))
        return info

    def result(self) -> RunResult:
        """The run so far, as :func:`llmsched_env.run` returns it (for :func:`llmsched_env.metrics.summarize`)."""
        return self._live_rollout().result()

    def _record(self, engine: Engine, outcome: IterationOutcome) -> None:
        self._history.append((outcome.end_time, outcome.kv_blocks_used, engine.num_waiting))

    # -- rendering -------------------------------------------------------------------------------------------
    def render(self) -> str | np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() was called without a render_mode; pass render_mode='ansi' or 'rgb_array'")
            return None
        if self.render_mode == "ansi":
            return self._render_ansi()
        from llmsched_env.report import memory_and_queue_image

        rows = np.array(self._history, dtype=np.float64).reshape(-1, 3)
        return memory_and_queue_image(rows[:, 0], rows[:, 1] / self.engine.capacity_blocks, rows[:, 2],
                                      title=f"t = {self.engine.now:.1f} s, regret "
                                            f"{self._info(final=False)['regret_requests']:.0f} requests")

    def _render_ansi(self) -> str:
        engine = self.engine
        state = engine.state()
        info = self._info(final=False)
        width = 40
        used = state.used_blocks / state.capacity_blocks
        bar = "█" * round(used * width) + "·" * (width - round(used * width))
        queues = (self._candidates.waiting if self._candidates is not None
                  else np.zeros(self.control.num_classes, np.int64))
        mix = self.control.class_mix
        classes = "  ".join(f"[p={t.prompt_len}{f',o={t.output_len}' if self.control.known_lengths else ''}] {q}"
                            for t, q in zip(mix.types, queues))
        return "\n".join([
            f"t = {engine.now:8.2f} / {self.horizon:g} s   rate {self.rate:.2f} req/s   ρ = {self._fluid.rho:.3f}   "
            f"Θ* = {self._fluid.throughput_rps:.2f} req/s",
            f"queue    {classes}",
            f"running  {engine.num_running:,}   KV [{bar}] {used:4.0%} of {state.capacity_tokens:,} tokens",
            f"done     {engine.num_finished:,} of {engine.num_requests:,} arrived   evictions {info['evictions']:,}   "
            f"regret {info['regret_requests']:,.1f} requests",
        ]) + "\n"


def _rate_range(rate: RateSpec, scenario: Scenario) -> tuple[float, float]:
    if rate is None:
        value = scenario.base_rate
        return value, value
    if isinstance(rate, (int, float)):
        low = high = float(rate)
    elif isinstance(rate, Sequence) and len(rate) == 2:
        low, high = float(rate[0]), float(rate[1])
    else:
        raise ConfigError(f"rate must be a number of req/s or a (low, high) pair, got {rate!r}")
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ConfigError(f"rate must be finite with 0 < low <= high req/s, got {rate!r}")
    return low, high
