"""``LLMSched-Residual-v0`` to ``-v2``: one agent for any workload, acting as a residual on an adaptive baseline."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.residual import ResidualControl, oldest_wait_s
from llmsched_env.errors import ConfigError, RequestTooLargeError
from llmsched_env.fluid import FluidSolution
from llmsched_env.metrics import summarize
from llmsched_env.runner import STALL_AFTER_S, Rollout, RunResult
from llmsched_env.scenario import Scenario
from llmsched_env.scenarios import HIDDEN_SUFFIX, NamedScenario, load_scenario, scenario_names

#: ``regret``: minus the regret increment against the fluid optimum; ``vs_baseline``: the completions beyond the
#: baseline's own run on the same arrivals (the arrivals' noise cancels).
REWARDS = ("regret", "vs_baseline")
#: ``scenarios="suite"``: every scenario of ``llmsched compare --suite``, in both length settings where it has both.
SUITE = "suite"


def suite_workloads() -> list[str]:
    """The names ``scenarios="suite"`` stands for."""
    names = scenario_names(suite_only=True)
    every = set(scenario_names())
    return [variant for name in names for variant in (name, name + HIDDEN_SUFFIX) if variant in every]


def _with_memory(scenario: Scenario, factor: float) -> Scenario:
    """``scenario`` with ``factor`` × its KV capacity (whole tokens; 1 leaves it as it is)."""
    if factor == 1.0:
        return scenario
    return replace(scenario, capacity_tokens=max(1, int(scenario.capacity_tokens * factor)))


def _run_until(rollout: Rollout, policy: Any, loop: Any, until: float) -> bool:
    """Run ``policy`` (through its compiled ``loop`` when given one) to the first iteration boundary at or after
    ``until``; whether the run is over."""
    if loop is not None:
        return rollout.run_compiled(loop, until)
    engine = rollout.engine
    while rollout.needs_decision():
        if engine.now >= until:
            return False
        rollout.apply(policy.decide(engine.state()))
    return True


class LLMSchedResidualEnv(gym.Env[np.ndarray, np.ndarray]):
    """Admission control of an LLM serving engine through an adaptive baseline, on any workload.

    ## Description

    The engine, its KV-cache limit, evictions and the fluid benchmark are those of ``LLMSched-v0``. The agent does
    not pick admissions itself: the adaptive baseline a deployed scheduler would run does (WAIT-adaptive with output
    lengths known, Nested-WAIT-adaptive with them hidden; both learn rates and lengths online; ``batching`` says
    whether their admissions are prefilled whole or batched stall-free), and every
    ``interval_s`` of engine time the agent scales its thresholds (:mod:`agents.residual`). Shapes do not depend on
    the workload, so one agent trains across the whole scenario suite (``scenarios="suite"``: a scenario, a load and
    a length setting drawn at every reset) and runs on any scenario, trace or engine.

    ## Action Space

    ``Box(-1, 1, (1,), float32)``: the threshold scale ``2 ** (2 r)`` of the residual ``r = a`` (with a
    ``dead_zone`` d: 0 for ``|a| <= d``, else ``a``'s sign times ``(|a| − d) / (1 − d)``); ``a = 0`` runs the
    baseline exactly.

    ## Observation Space

    ``Box(0, 1, (12,), float32)``: :data:`agents.residual.FEATURES` (queue, memory, rates and the baseline's
    own targets, all dimensionless; no horizon, no offered rate, no workload type). ``Box(0, 1, (13,), float32)``
    with ``compute_load`` (``-v1``): then the baseline's compute-load estimate ``ρ̂`` as ``ρ̂⁴ / (1 + ρ̂⁴)``
    (:data:`agents.residual.LOAD_FEATURES`), which tells a load of 0.6 from one of 0.8 before either overloads.
    ``Box(0, 1, (16,), float32)`` with ``load_trend`` too (``-v2``): then the estimate's rise over the last 300 s,
    its largest rise over 60 s within them (both ``½ + rise / 2``) and whether a sustained surge of it is under way
    (0 or 1;
    :data:`agents.residual.TREND_FEATURES`), which tells a day climbing toward an overload from one that peaks
    within capacity before the overload begins.

    ## Rewards

    ``reward="regret"`` (default): ``(completions − Θ*·Δt) / Θ*`` over the step, minus the increment of regret
    against the fluid optimum in seconds of the optimum's service, so scenarios of different rates weigh alike; an
    episode's return is ``−(Θ*·T − completions) / Θ*``. ``latency_penalty`` × the mean number in the system over
    the step (its two ends) ÷ ``Θ*`` × ``Δt`` (by Little's law, a mean latency in seconds) is subtracted when set,
    and ``wait_penalty`` (per second) × the oldest waiting request's age integrated over the step (its two ends,
    seconds × seconds; 0 while none waits): the queue's head is the tail of the latency distribution, which
    completions do not see where every policy serves the load.
    ``reward="vs_baseline"``: the same quantities less the baseline's own on the same arrivals (run at reset, read
    at the same decision points): the return is the regret the agent saves against the baseline, and the arrivals'
    noise, which dwarfs what one decision changes, cancels. ``action_penalty`` × ``a²`` (``a`` clipped to
    ``[-1, 1]``) is subtracted at every step when set: a departure from the baseline has to earn its keep, so the
    noise of a paired return does not walk the mean action away from a baseline that is already hard to beat.

    ## Starting State

    An empty engine at time 0. At each reset a workload of ``scenarios`` (uniformly), a load ``ρ`` uniform in
    ``loads`` (default: the scenario's swept loads' range), a KV capacity factor uniform in ``memory`` (default 1:
    the scenario's own) and the arrivals are drawn with :attr:`np_random`.

    ## Episode End

    ``terminated`` is always ``False``. The episode is truncated at the horizon (``horizon``, default each
    scenario's own), or earlier if nothing runs and nothing more arrives.

    ## Info

    Every step: ``scenario``, ``load``, ``memory``, ``time_s``, ``arrived``, ``completed``, ``waiting``, ``running``,
    ``scale``, ``regret_requests`` so far. On the last step, every metric of ``llmsched simulate --json``.

    ## Arguments

    ``scenarios`` (a name of the suite, ``NAME-hidden``, a list of them, or ``"suite"``), ``loads`` (``(low, high)``
    or one load), ``memory`` (a factor of each scenario's KV capacity, or a ``(low, high)`` range), ``horizon``
    (s), ``interval_s`` (1), ``batching`` (``"whole"``: the baselines prefill each admission whole, as written;
    ``"stall-free"``: their decisions batched as Sarathi batches, :mod:`baselines.stall_free`;
    ``"stall-free-margin"``: the same, Nested WAIT's lookahead with the adaptive margin;
    ``"stall-free-margin-backlog"``: those bases with their thresholds sized on the backlog too;
    ``"stall-free-margin-backlog-known"``: sized on the backlog with lengths known only), ``base`` (the
    baseline; default by ``batching`` and length setting, :data:`agents.residual.BASES`), ``reward`` (``regret`` or
    ``vs_baseline``), ``latency_penalty`` (0), ``wait_penalty`` (0), ``action_penalty`` (0, on the residual
    applied), ``dead_zone`` (0: actions within ``±dead_zone`` are the baseline itself,
    :func:`agents.residual.dead_zoned`), ``compute_load`` (observe the compute-load estimate; ``True`` in
    ``-v1`` and ``-v2``), ``load_trend`` (observe its trend; ``True`` in ``-v2``), ``compiled``
    (``True``: the baseline's compiled loop between decisions; ``False`` its Python rule, the same episodes).

    ``reset(options={"scenario": name, "load": rho, "memory": m, "arrival_seed": s})`` pins any of them.

    ## Version History

    * v0: initial version; ``action_penalty``, ``batching``, ``dead_zone`` and ``wait_penalty`` added later
      (defaults 0, ``"whole"``, 0 and 0: the episodes and rewards as before), then ``batching="stall-free-margin"``
      and ``"stall-free-margin-backlog"``, then ``"stall-free-margin-backlog-known"``.
    * v1: the observation adds the baseline's compute-load estimate (``compute_load=True``); episodes, actions and
      rewards as in v0.
    * v2: the observation adds that estimate's trend (``load_trend=True``): its rise over 300 s, its largest rise
      over 60 s within them and a sustained surge's memory; episodes, actions and rewards as in v0.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, *, scenarios: str | Sequence[str] = SUITE,
                 loads: float | tuple[float, float] | None = None, memory: float | tuple[float, float] = 1.0,
                 horizon: float | None = None,
                 interval_s: float = 1.0, base: str | None = None, batching: str = "whole", reward: str = "regret",
                 latency_penalty: float = 0.0, action_penalty: float = 0.0, dead_zone: float = 0.0,
                 wait_penalty: float = 0.0, compute_load: bool = False, load_trend: bool = False,
                 compiled: bool = True,
                 render_mode: str | None = None) -> None:
        names = [scenarios] if isinstance(scenarios, str) else list(scenarios)
        if SUITE in names:
            names = [n for n in names if n != SUITE] + suite_workloads()
        if not names:
            raise ConfigError("scenarios: give at least one scenario name (or 'suite')")
        self.workloads: dict[str, NamedScenario] = {name: load_scenario(name) for name in dict.fromkeys(names)}
        if loads is not None:
            low, high = (float(loads), float(loads)) if isinstance(loads, (int, float)) else map(float, loads)
            if not (0 < low <= high):
                raise ConfigError(f"loads must satisfy 0 < low <= high, got {loads!r}")
        memory_low, memory_high = (float(memory), float(memory)) if isinstance(memory, (int, float)) else \
            map(float, memory)
        if not (0 < memory_low <= memory_high and math.isfinite(memory_high)):
            raise ConfigError(f"memory must be a factor > 0 or a (low, high) range of them, got {memory!r}")
        for name, spec in self.workloads.items():
            # The smallest memory drawn must still hold every request: an impossible config fails here, by name.
            try:
                _with_memory(spec.scenario, memory_low)
            except (ConfigError, RequestTooLargeError) as error:
                raise ConfigError(f"memory {memory_low:g} x {name}'s KV capacity: {error}") from None
        if horizon is not None and not (math.isfinite(horizon) and horizon > 0):
            raise ConfigError(f"horizon must be finite and > 0 s, got {horizon!r}")
        if reward not in REWARDS:
            raise ConfigError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        for option, value in (("latency_penalty", latency_penalty), ("action_penalty", action_penalty),
                              ("wait_penalty", wait_penalty)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{option} must be finite and >= 0, got {value!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.loads = None if loads is None else (low, high)
        self.memory = (memory_low, memory_high)
        self.horizon_s = horizon
        self.reward = reward
        self.latency_penalty = float(latency_penalty)
        self.action_penalty = float(action_penalty)
        self.wait_penalty = float(wait_penalty)
        self.compiled = bool(compiled)
        self.render_mode = render_mode
        self.control = ResidualControl(interval_s, base, batching, dead_zone, compute_load, load_trend)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (self.control.num_features,), dtype=np.float32)
        self._rollout: Rollout | None = None

    def load_range(self, name: str) -> tuple[float, float]:
        """The loads a reset draws from for the workload ``name``."""
        loads = self.workloads[name].loads
        return self.loads if self.loads is not None else (min(loads), max(loads))

    def workload(self, name: str, load: float, memory: float = 1.0) -> tuple[Scenario, float]:
        """The scenario ``name`` at load ``load`` (at the rate ``llmsched compare`` gives that load; the load is
        the scenario's own, whatever the memory) with ``memory`` × its KV capacity, and its horizon."""
        spec = self.workloads[name]
        rate = spec.rates((load,))[0]
        scenario = _with_memory(spec.scenario, memory).at_rate(rate)
        return scenario, self.horizon_s if self.horizon_s is not None else spec.horizon_s

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"scenario", "load", "memory", "arrival_seed"}
        if unknown:
            raise ConfigError(f"unknown reset option(s) {', '.join(sorted(unknown))}; allowed: arrival_seed, load, "
                              "memory, scenario")
        names = list(self.workloads)
        name = options.get("scenario", names[int(self.np_random.integers(len(names)))])
        if name not in self.workloads:
            raise ConfigError(f"reset: scenario {name!r} is not one of this environment's: {', '.join(names)}")
        low, high = self.load_range(name)
        load = float(options["load"]) if "load" in options else (
            low if low == high else float(self.np_random.uniform(low, high)))
        low, high = self.memory
        memory = float(options["memory"]) if "memory" in options else (
            low if low == high else float(self.np_random.uniform(low, high)))
        arrival_seed = int(options.get("arrival_seed", self.np_random.integers(2**63 - 1)))
        scenario, horizon = self.workload(name, load, memory)
        arrivals = scenario.sample(horizon, arrival_seed)
        self.fluid: FluidSolution = scenario.fluid(arrivals, horizon)
        self.scenario_name, self.load, self.memory_factor = name, load, memory
        self.arrival_seed, self.horizon = arrival_seed, horizon
        engine = scenario.engine()
        self._rollout = Rollout(engine, arrivals, horizon, stall_after_s=STALL_AFTER_S)
        self.control.reset(engine, scenario, horizon)
        self._loop = self.control.base.compiled_loop() if self.compiled and self._rollout.can_run_compiled() else None
        self._shadow, self._shadow_wait = (self._baseline_path(scenario, arrivals, horizon)
                                           if self.reward == "vs_baseline" else (None, None))
        self._point = 0  # the decision point of the baseline's path the last step ended at
        self._accounted = 0.0
        self._done = False
        self._advance(0.0)  # the arrivals due at time 0 enter the queue, as the loop enqueues them
        state = engine.state()
        self._wait_gap = oldest_wait_s(state) - (self._shadow_wait[0] if self._shadow_wait is not None else 0.0)
        return self.control.observe(state), self._info(final=False)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._rollout is None or self._done:
            raise RuntimeError("call reset() first" if self._rollout is None else "the episode is over: call reset()")
        engine = self._rollout.engine
        before_time, before_done = engine.now, engine.num_finished
        before_in = engine.num_waiting + engine.num_running
        self.control.apply(action, engine.now)
        self._done = self._advance(self.control.next_decision)
        throughput = self.fluid.throughput_rps
        in_system = engine.num_waiting + engine.num_running
        base_wait = 0.0  # the baseline's queue head's age at this point (the regret reward: none, the agent's alone)
        if self._shadow is not None:
            # The baseline's run at the same decision point: its completions and requests in the system then.
            point = len(self._shadow) - 1 if self._done else min(self._grid_point(engine.now), len(self._shadow) - 1)
            finished, present = self._shadow[point]
            if self._shadow_wait is not None:
                base_wait = float(self._shadow_wait[point])
            before_finished, before_present = self._shadow[self._point]
            self._point = point
            reward = ((engine.num_finished - before_done) - (finished - before_finished)) / throughput
            if self.latency_penalty:
                extra = ((before_in + in_system) - (before_present + present)) / 2
                reward -= self.latency_penalty * extra / throughput * (engine.now - before_time)
        else:
            until = self.horizon if self._done else min(engine.now, self.horizon)
            span, self._accounted = until - self._accounted, until
            reward = (engine.num_finished - before_done - throughput * span) / throughput
            if self.latency_penalty:
                reward -= self.latency_penalty * (before_in + in_system) / 2 / throughput * (engine.now - before_time)
        state = engine.state()
        if self.wait_penalty:
            gap = oldest_wait_s(state) - base_wait
            reward -= self.wait_penalty * (self._wait_gap + gap) / 2 * (engine.now - before_time)
            self._wait_gap = gap
        if self.action_penalty:
            reward -= self.action_penalty * self.control.action ** 2
        observation = (np.zeros(self.observation_space.shape, np.float32) if self._done
                       else self.control.observe(state))
        return observation, float(reward), False, self._done, self._info(final=self._done)

    def _grid_point(self, now: float) -> int:
        """The last decision point (a multiple of the interval) at or before an iteration boundary at ``now``: the
        boundary is the first at or after every point since the previous boundary, that one included."""
        return math.floor(now / self.control.interval_s)

    def _baseline_path(self, scenario: Scenario, arrivals: Any, horizon: float
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """The baseline's own run on these arrivals: per decision point ``k·interval`` (and the end, last), its
        completions and the requests in its system at the first iteration boundary at or after it; and, with a
        wait penalty, its oldest waiting request's age then (s; else ``None``)."""
        shadow = ResidualControl(self.control.interval_s, self.control.base_name, self.control.batching)
        engine = scenario.engine()
        rollout = Rollout(engine, arrivals, horizon, stall_after_s=STALL_AFTER_S)
        shadow.reset(engine, scenario, horizon)
        loop = shadow.base.compiled_loop() if self._loop is not None else None
        points = math.ceil(horizon / self.control.interval_s) + 2
        path = np.zeros((points, 2), dtype=np.int64)
        waits = np.zeros(points) if self.wait_penalty else None
        k, done = 0, False
        while not done:
            done = _run_until(rollout, shadow.base, loop, k * self.control.interval_s)
            reached = min(max(k, self._grid_point(engine.now)), points - 2) if not done else points - 1
            path[k:reached + 1] = (engine.num_finished, engine.num_waiting + engine.num_running)
            if waits is not None:
                waits[k:reached + 1] = oldest_wait_s(engine.state())
            k = reached + 1
        return path, waits

    def _advance(self, until: float) -> bool:
        """Run the baseline at the current scale to the first iteration at or after ``until``; whether the run is
        over."""
        assert self._rollout is not None
        return _run_until(self._rollout, self.control.base, self._loop, until)

    def result(self) -> RunResult:
        """The run so far, as :func:`llmsched_env.run` returns it."""
        if self._rollout is None:
            raise RuntimeError("call reset() first")
        return self._rollout.result()

    def _info(self, *, final: bool) -> dict[str, Any]:
        assert self._rollout is not None
        engine = self._rollout.engine
        now, completed = engine.now, engine.num_finished
        info: dict[str, Any] = {
            "scenario": self.scenario_name, "load": self.load, "memory": self.memory_factor, "time_s": now,
            "arrived": engine.num_requests, "completed": completed, "waiting": engine.num_waiting,
            "running": engine.num_running, "scale": self.control.scale,
            "regret_requests": self.fluid.throughput_rps * min(now, self.horizon) - completed,
        }
        if final:
            info.update(summarize(self.result(), self.fluid))
        return info

    def render(self) -> str | None:
        if self.render_mode is None:
            gym.logger.warn("render() was called without a render_mode; pass render_mode='ansi'")
            return None
        info = self._info(final=False)
        return (f"{info['scenario']} at load {info['load']:.2f}: t = {info['time_s']:.1f} / {self.horizon:g} s, "
                f"scale {info['scale']:.2f}, {info['waiting']} waiting, {info['running']} running, "
                f"{info['completed']} done, regret {info['regret_requests']:.1f} requests\n")
