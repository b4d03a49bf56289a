"""The workload-independent agent interface: an agent that adjusts an adaptive baseline instead of replacing it.

``LLMSched-v0``'s agent picks admission counts per request type of one workload, so its observation and action are
sized by that workload and it cannot run on another. Here the agent acts *through* the baseline a deployed
scheduler would run without it: WAIT-adaptive when output lengths are known, Nested-WAIT-adaptive when they are
hidden (:mod:`baselines.adaptive`), each prefilling its admissions whole or, with ``batching="stall-free"``, its
decisions batched as Sarathi batches (:mod:`baselines.stall_free`). Both learn their request classes, rates and
length distribution online, so nothing the agent sees or does depends on the workload's types, its offered rates
or a fixed horizon.

**Action.** ``Box(-1, 1, (1,))``: every ``interval_s`` of engine time the agent sets the baseline's *threshold
scale* ``s = 2 ** (SCALE_OCTAVES · a)`` (from 1/4 to 4): every threshold of the baseline, and the memory it keeps
back from lending (and, batched stall-free, the per-iteration token budget), times ``s`` (``set_threshold_scale``),
until the next decision. ``a = 0`` is the baseline itself, bit for bit; ``a < 0`` admits sooner in smaller batches
(toward greedy admission), ``a > 0`` waits for larger batches and keeps more memory back. Exploration therefore
starts at a good policy: a fresh PPO network's mean action is about 0.

**Observation.** ``Box(0, 1, (NUM_FEATURES,))``, each entry dimensionless (:data:`FEATURES` names them): whether
lengths are known; the share of the offered load the baseline's fluid model can serve (its ``α``, 1 inside the
stability region); the short-term arrival rate (a 5 s window) against the baseline's 60 s estimate; the queue
against the baseline's own thresholds; the running share of the requests in the system; KV memory in use and the
memory the baseline keeps back, as shares of the capacity; the oldest waiting request's age; completions against
arrivals since the last decision; the share of the oldest waiting requests that were evicted; the current scale;
whether the baseline has solved its thresholds yet. Counts and times are squashed as ``x / (x + s)``. With
``compute_load`` (``LLMSched-Residual-v1``) a 13th entry follows: the baseline's own estimate of the compute load
(:data:`LOAD_FEATURES`), which, unlike the servable share, does not saturate at the stability region's edge. With
``load_trend`` (``LLMSched-Residual-v2``) three more: that estimate's rise over 300 s, its largest rise over 60 s
within them, and whether a sustained surge of it is under way (:data:`TREND_FEATURES`, :class:`LoadTrend`).

:class:`ResidualControl` is this interface, shared by the environment (:mod:`agents.residual_env`) and by a trained
agent running as a policy (:class:`ResidualAgentPolicy`, through :func:`llmsched_env.run` on any engine), so the
agent sees the same observations and its actions mean the same thing in training and evaluation.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from agents.policy import MODEL_FILE, AgentSpec, action_logits, read_spec, read_weights
from baselines import make_policy
from llmsched_env.compiled_run import DONE, ENDED, HORIZON, NOW, PAUSE, ChunkArrays, RunState
from llmsched_env.engine import Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.iteration import EngineParams
from llmsched_env.policy import CompiledLoop
from llmsched_env.rate_estimate import ArrivalRateEstimator
from llmsched_env.request_table import RequestColumns
from llmsched_env.scenario import Scenario

#: The baseline the agent adjusts, by how its admissions are batched (``batching``) and whether output lengths are
#: known: prefilled whole (``"whole"``, the rules as written), or batched stall-free under Sarathi's 2,048-token budget
#: (``"stall-free"``, :mod:`baselines.stall_free`); ``"stall-free-margin"``: the same, Nested WAIT's lookahead with
#: the adaptive margin (``nested-wait-adaptive-margin-stall-free``); ``"stall-free-margin-backlog"``: those two with
#: their thresholds sized on the backlog too (:func:`baselines.adaptive.sizing_rate`), which over an hour of bursts
#: holds the oracle's level where the plain estimate trails it; an action outside the dead zone sizes on the estimate
#: alone, so that the agent's scale replaces the backlog's sizing rather than multiplying it;
#: ``"stall-free-margin-backlog-known"``: the backlog's sizing with lengths known only, where it reaches the oracle
#: over the hour (with them hidden it closes a quarter of the gap, and costs throughput on heavy tails).
BASES = {"whole": {True: "wait-adaptive", False: "nested-wait-adaptive"},
         "stall-free": {True: "wait-adaptive-stall-free", False: "nested-wait-adaptive-stall-free"},
         "stall-free-margin": {True: "wait-adaptive-stall-free", False: "nested-wait-adaptive-margin-stall-free"},
         "stall-free-margin-backlog": {True: "wait-adaptive-backlog-stall-free",
                                       False: "nested-wait-adaptive-margin-backlog-stall-free"},
         "stall-free-margin-backlog-known": {True: "wait-adaptive-backlog-stall-free",
                                             False: "nested-wait-adaptive-margin-stall-free"}}
#: The action's reach: ``a ∈ [-1, 1]`` scales thresholds by ``2 ** (SCALE_OCTAVES · a)``.
SCALE_OCTAVES = 2.0
#: The short-term arrival-rate window (s), against the baseline's own (60 s).
SHORT_RATE_WINDOW_S = 5.0
#: Waiting requests read for the evicted share (the oldest).
EVICTED_SCAN = 64
FEATURES = ("lengths_known", "servable_share", "rate_short_vs_long", "queue_vs_thresholds", "running_share",
            "kv_used", "kv_reserved", "oldest_wait", "completions_vs_arrivals", "evicted_waiting_share", "scale",
            "warmed_up")
NUM_FEATURES = len(FEATURES)
#: ``compute_load=True`` (``LLMSched-Residual-v1``) adds the baseline's estimate of the compute load, ``ρ̂ = λ̂ ·
#: E[u]`` (its rate estimate times a request's mean lifetime work, ``estimated_load``), as ``ρ̂⁴ / (1 + ρ̂⁴)``: ½ at
#: the edge of the stability region, 0.29 at 0.8, 0.55 at 1.05. The servable share is clamped at 1 below the edge,
#: so a load of 0.6 and one of 0.8 look alike there until the overload; ρ̂ tells them apart.
LOAD_FEATURES = ("compute_load",)
LOAD_POWER = 4
#: ``load_trend=True`` (``LLMSched-Residual-v2``) adds how the compute-load estimate moves: its rise over the last
#: :data:`RISE_LONG_S`, the largest rise over any :data:`RISE_SHORT_S` within them (how abruptly it moved: a burst's
#: 60 s estimate jumps, a day's climbs smoothly), both as ``½ + rise / 2``, clipped (½ is flat), and a memory of a
#: sustained surge (:class:`LoadTrend`). One observation shows the load, not where it is heading: a day whose rate
#: climbs for half an hour toward an overload looks, minute by minute, like one that peaks within capacity, but the
#: estimate rises faster on its way there.
TREND_FEATURES = ("load_rise", "load_jump", "load_surge")
RISE_LONG_S = 300.0
RISE_SHORT_S = 60.0
#: The trend counts from this long after the baseline's first solve: before that the estimate is still learning
#: the lengths (on the Azure-like workloads it climbs by up to 0.66 within its first two minutes).
TREND_SETTLE_S = 600.0
#: A surge starts where ``ρ̂`` is above :data:`SURGE_LOAD` and has risen by more than :data:`SURGE_RISE` over the
#: long window, by less than :data:`SURGE_SMOOTH` over every short one within it (no burst's jump), and lasts until
#: ``ρ̂`` falls below :data:`SURGE_END_LOAD` (the peak's backlog drained). Chosen on the validation seeds
#: (docs/agents.md): on the diurnal day at 0.8 the estimate has risen by 0.28 over 300 s as it passes 0.8, on the day
#: at 0.6 by at most 0.21; on-off bursts run for an hour rise as much, but in jumps.
SURGE_LOAD = 0.8
SURGE_RISE = 0.24
SURGE_SMOOTH = 0.1
SURGE_END_LOAD = 0.5


def feature_names(compute_load: bool = False, load_trend: bool = False) -> tuple[str, ...]:
    """The observation's entries, in order: :data:`FEATURES`, then :data:`LOAD_FEATURES` with ``compute_load``, then
    :data:`TREND_FEATURES` with ``load_trend``."""
    return FEATURES + (LOAD_FEATURES if compute_load else ()) + (TREND_FEATURES if load_trend else ())


class LoadTrend:
    """The compute-load estimate's recent history at the agent's decisions: its rise over the long window, the
    largest rise over a short one within it, and whether a sustained surge is under way (see :data:`SURGE_LOAD`).
    Bounded memory: the samples of the last :data:`RISE_LONG_S` and one before."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float, float]] = deque()  # (time, estimate, its rise over the short window)
        self.settled_at = math.inf
        self.surge = False

    def _rise(self, now: float, load: float, window: float) -> float:
        """``load`` less the estimate at the last sample at or before ``now - window`` (the oldest kept, if none
        is that old)."""
        reference = self.samples[0][1]
        for time, value, _ in self.samples:
            if time > now - window:
                break
            reference = value
        return load - reference

    def update(self, now: float, load: float, solved: bool) -> tuple[float, float, bool]:
        """Record ``load`` at ``now`` (``solved``: the baseline has solved its thresholds at least once) and return
        the long rise, the largest short rise within the long window and whether a surge is under way; ``(0, 0,
        False)`` until the trend has settled."""
        if solved and self.settled_at == math.inf:
            self.settled_at = now + TREND_SETTLE_S
        if now < self.settled_at:
            return 0.0, 0.0, False
        short_rise = self._rise(now, load, RISE_SHORT_S) if self.samples else 0.0
        self.samples.append((now, load, short_rise))
        while len(self.samples) > 2 and self.samples[1][0] <= now - RISE_LONG_S:
            self.samples.popleft()
        # Trimmed so, the oldest sample is the last at or before the long window's start (or the oldest there is).
        long_rise = load - self.samples[0][1]
        jump = max(rise for time, _, rise in self.samples if time > now - RISE_LONG_S)
        if self.surge and load < SURGE_END_LOAD:
            self.surge = False
        elif not self.surge and load > SURGE_LOAD and long_rise > SURGE_RISE and jump < SURGE_SMOOTH:
            self.surge = True
        return long_rise, jump, self.surge


def clipped_action(action: np.ndarray | float) -> float:
    """An action as the number it means: its first entry, clipped to ``[-1, 1]``; a clear error if not finite."""
    value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
    if not math.isfinite(value):
        raise ConfigError(f"a residual action must be a finite number in [-1, 1], got {value!r}")
    return min(1.0, max(-1.0, value))


def threshold_scale(action: np.ndarray | float) -> float:
    """The threshold scale an action sets: ``2 ** (SCALE_OCTAVES · a)``, ``a`` clipped to ``[-1, 1]``; exactly 1
    for ``a = 0``."""
    value = clipped_action(action)
    return 1.0 if value == 0.0 else float(2.0 ** (SCALE_OCTAVES * value))


def dead_zoned(action: float, dead_zone: float) -> float:
    """The residual an action applies with a ``dead_zone``: 0 (the baseline itself) for ``|a| <= dead_zone``, and
    beyond it ``(|a| - dead_zone) / (1 - dead_zone)`` with ``a``'s sign, so that ±1 still reaches ±1 and the map is
    continuous. A policy network's small biases, learnt where a departure pays and carried where it does not, then
    leave the baseline as it is."""
    if abs(action) <= dead_zone:
        return 0.0
    return math.copysign((abs(action) - dead_zone) / (1.0 - dead_zone), action)


def action_for_residual(residual: float, dead_zone: float) -> float:
    """The action that applies ``residual`` (in ``[-1, 1]``) through a ``dead_zone``: :func:`dead_zoned`'s inverse
    (0 for 0). A rule written in residuals answers in actions, as the network it teaches does."""
    if not 0.0 <= dead_zone < 1.0:
        raise ConfigError(f"dead_zone must be in [0, 1), got {dead_zone!r}")
    value = clipped_action(residual)
    return 0.0 if value == 0.0 else math.copysign(dead_zone + abs(value) * (1.0 - dead_zone), value)


def oldest_wait_s(state: SchedulerState) -> float:
    """How long the oldest waiting request has waited (s; 0 when none waits): the head of the queue, whose wait is
    the tail of the latency distribution."""
    oldest = state.oldest_waiting(1)
    return state.now - float(state.arrival_time[oldest[0]]) if len(oldest) else 0.0


def _squash(value: float, scale: float) -> float:
    return value / (value + scale) if value > 0 else 0.0


class ResidualControl:
    """The agent's view of an engine and the meaning of its actions (see the module docstring).

    Args:
        interval_s: engine time between two decisions of the agent.
        base: the baseline it adjusts (default: :data:`BASES` of ``batching`` for the scenario's length setting).
        batching: ``"whole"``, ``"stall-free"``, ``"stall-free-margin"``, ``"stall-free-margin-backlog"`` or
            ``"stall-free-margin-backlog-known"`` (:data:`BASES`), when ``base`` is not given.
        dead_zone: actions within ``±dead_zone`` are the baseline itself (:func:`dead_zoned`); 0 (the default):
            every action counts.
        compute_load: observe the baseline's compute-load estimate too (:data:`LOAD_FEATURES`).
        load_trend: observe how that estimate moves too (:data:`TREND_FEATURES`; needs ``compute_load``).
    """

    def __init__(self, interval_s: float = 1.0, base: str | None = None, batching: str = "whole",
                 dead_zone: float = 0.0, compute_load: bool = False, load_trend: bool = False) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ConfigError(f"interval_s must be finite and > 0 s, got {interval_s!r}")
        if not 0.0 <= dead_zone < 1.0:
            raise ConfigError(f"dead_zone must be in [0, 1), got {dead_zone!r}")
        if batching not in BASES:
            raise ConfigError(f"batching must be one of {', '.join(BASES)}, got {batching!r}")
        names = [name for bases in BASES.values() for name in bases.values()]
        if base is not None and base not in names:
            raise ConfigError(f"a residual agent adjusts one of {', '.join(names)}, not {base!r}")
        self.interval_s = float(interval_s)
        self.base_name = base
        self.batching = batching
        self.dead_zone = float(dead_zone)
        if load_trend and not compute_load:
            raise ConfigError("load_trend observes the compute-load estimate's trend: it needs compute_load=True")
        self.compute_load = bool(compute_load)
        self.load_trend = bool(load_trend)
        self.num_features = len(feature_names(self.compute_load, self.load_trend))
        self.base: Any = None
        self.next_decision = 0.0

    def reset(self, engine: Engine, scenario: Scenario, horizon: float) -> None:
        """A fresh baseline for ``scenario`` (only its cost model and memory: the adaptive baselines learn the
        rest), reset on ``engine``; the first decision is due at once."""
        known = engine.output_lengths_known
        name = self.base_name or BASES[self.batching][known]
        self.base = make_policy(name, scenario, horizon)
        self.base.reset(engine)
        self.known = known
        self.next_decision = 0.0
        self.action = 0.0
        self.scale = 1.0
        self._short = ArrivalRateEstimator(SHORT_RATE_WINDOW_S)
        self._seen = 0
        self._finished = 0
        self._trend = LoadTrend()

    def due(self, now: float) -> bool:
        """Whether the agent decides at an iteration starting at ``now``."""
        return now >= self.next_decision

    def apply(self, action: np.ndarray | float, now: float) -> None:
        """Set the scale ``action`` asks for, until the next decision (the next multiple of the interval);
        ``self.action`` is the residual applied (the dead zone taken off)."""
        self.action = dead_zoned(clipped_action(action), self.dead_zone)
        self.scale = threshold_scale(self.action)
        self.base.set_threshold_scale(self.scale)
        self.next_decision = (math.floor(now / self.interval_s) + 1) * self.interval_s

    def observe(self, state: SchedulerState) -> np.ndarray:
        """The observation at ``state`` (see the module docstring); call once per decision."""
        base = self.base
        fresh = state.arrival_time[self._seen:state.num_requests]
        self._short.update(state.now, fresh)
        arrived = state.num_requests - self._seen
        self._seen = state.num_requests
        running = len(state.running)
        finished = state.num_requests - state.num_waiting - running
        completed, self._finished = finished - self._finished, finished
        solved = base.learning.solves > 0
        thresholds = base.solved_thresholds
        long_rate = base.learning.rates.total
        oldest = state.oldest_waiting(EVICTED_SCAN)
        age = state.now - float(state.arrival_time[oldest[0]]) if len(oldest) else 0.0
        evicted = float(np.count_nonzero(state.num_evictions[oldest] > 0)) / len(oldest) if len(oldest) else 0.0
        reserve, capacity = base.reserved_tokens, float(state.capacity_tokens)
        features = (
            1.0 if self.known else 0.0,
            float(thresholds.scale),
            _squash(self._short.total, long_rate) if long_rate > 0 else 0.5,
            _squash(state.num_waiting, float(max(1, int(np.sum(thresholds.n))))),
            running / (running + state.num_waiting + 1),
            state.used_blocks / state.capacity_blocks,
            min(1.0, reserve / capacity),
            _squash(age, 5.0),
            completed / (completed + arrived) if completed + arrived else 0.5,
            evicted,
            (math.log2(self.scale) / SCALE_OCTAVES + 1) / 2,
            1.0 if solved else 0.0,
        )
        if self.compute_load:
            load = base.estimated_load
            features += (_squash(load ** LOAD_POWER, 1.0),)
            if self.load_trend:
                rise, jump, surge = self._trend.update(state.now, load, solved)
                features += (0.5 + rise / 2, 0.5 + jump / 2, 1.0 if surge else 0.0)
        return np.clip(np.array(features, dtype=np.float32), 0.0, 1.0)


class ResidualNetwork:
    """A trained residual agent's actor as NumPy arrays: the layers of stable-baselines3's ``MlpPolicy`` actor (tanh
    between them), the mean head and the log standard deviation. It needs neither stable-baselines3 nor torch to
    run (torch only reads the weights), so an agent runs wherever the engine does (the live backend's environment).
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], head: tuple[np.ndarray, np.ndarray],
                 log_std: np.ndarray) -> None:
        self.layers, self.head, self.log_std = layers, head, log_std

    @classmethod
    def from_weights(cls, weights: dict[str, Any], source: str, features: int = NUM_FEATURES
                     ) -> "ResidualNetwork":
        """The actor in an SB3 ``policy.pth``'s tensors, reading ``features`` entries (:func:`feature_names`); a
        clear error naming ``source`` if they are not one."""
        def array(key: str) -> np.ndarray:
            if key not in weights:
                raise ConfigError(f"{source}: no tensor {key!r}: not the actor of an MlpPolicy with a continuous "
                                  "action")
            return np.asarray(weights[key].detach().cpu().numpy() if hasattr(weights[key], "detach") else weights[key],
                              dtype=np.float64)

        layers, index = [], 0
        while f"mlp_extractor.policy_net.{index}.weight" in weights:
            layers.append((array(f"mlp_extractor.policy_net.{index}.weight"),
                           array(f"mlp_extractor.policy_net.{index}.bias")))
            index += 2  # Linear, activation, Linear, ...
        network = cls(layers, (array("action_net.weight"), array("action_net.bias")), array("log_std"))
        width = layers[0][0].shape[1] if layers else network.head[0].shape[1]
        if width != features or network.head[0].shape[0] != 1:
            raise ConfigError(f"{source}: the network reads {width} features and sets {network.head[0].shape[0]} "
                              f"action(s); this residual agent reads {features} and sets 1")
        return network

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        """The mean actions for a batch of observations, ``(N, 1)``."""
        hidden = np.asarray(observations, dtype=np.float64)
        for weight, bias in self.layers:
            hidden = np.tanh(hidden @ weight.T + bias)
        return hidden @ self.head[0].T + self.head[1]


class ConstantAction:
    """A residual "network" that answers the same action to every observation, with no spread: the baseline itself
    (``0``), or the constant scale ``2 ** (2 a)``, as a reference an agent is judged beside."""

    log_std = None

    def __init__(self, action: float) -> None:
        clipped_action(action)  # a non-finite action fails here
        self.action = float(action)

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        return np.full((len(observations), 1), self.action)


class OverloadRule:
    """A residual "network" by hand, on ``LLMSched-Residual-v1``'s observation (or v2's): ``action`` (larger batches,
    more memory kept back) while the queue's head has waited at least ``min_head_age_s`` and either the base's
    compute-load estimate lies between ``load`` and ``load_cap`` or the head has waited longer than ``head_age_s``;
    the baseline itself otherwise, and with ``known_only`` wherever output lengths are hidden.

    Larger batches serve more per second of iteration time, which pays in a sustained overload (the diurnal day's
    peak) and costs latency where the engine keeps up. ``ρ̂`` above 1 says the rate outgrows the engine; a head
    that has waited says the overload has lasted long enough to queue; ``ρ̂`` at ``load_cap`` or above is a burst's
    60 s rate, which thresholds sized for it serve no better. With lengths hidden the estimate passes 1 too late on
    the diurnal day, and the same action earlier costs at lower loads, so ``known_only`` leaves those to the base.
    A teacher for an imitation warm start (:data:`RESIDUAL_TEACHERS`), no policy of its own. ``action`` is the
    residual applied; the rule answers the action that applies it through the environment's ``dead_zone``
    (:func:`action_for_residual`; the full action, 1, is 1 through any).
    """

    log_std = None
    #: It reads v1's entries (v2's first 13 are the same).
    reads_trend = False

    def __init__(self, load: float = 1.0, load_cap: float = 1.5, min_head_age_s: float = 7.0,
                 head_age_s: float = 162.0, action: float = 1.0, known_only: bool = True,
                 dead_zone: float = 0.0) -> None:
        if not (0 < load < load_cap and 0 <= min_head_age_s < head_age_s < math.inf):
            raise ConfigError("an overload rule needs 0 < load < load_cap and 0 <= min_head_age_s < head_age_s "
                              f"< inf, got load {load!r}, load_cap {load_cap!r}, min_head_age_s "
                              f"{min_head_age_s!r}, head_age_s {head_age_s!r}")
        self.load, self.load_cap, self.known_only = float(load), float(load_cap), bool(known_only)
        self.action = action_for_residual(action, dead_zone)  # a non-finite action fails here
        self.min_head_age_s, self.head_age_s = float(min_head_age_s), float(head_age_s)
        names = feature_names(compute_load=True)
        self._known, self._load, self._age = (names.index("lengths_known"), names.index("compute_load"),
                                              names.index("oldest_wait"))

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        observations = np.asarray(observations, dtype=np.float64)
        if observations.shape[-1] not in (len(feature_names(True)), len(feature_names(True, True))):
            raise ConfigError(f"an overload rule reads LLMSched-Residual-v1's {len(feature_names(True))} entries "
                              f"(the compute load among them) or v2's {len(feature_names(True, True))}, got "
                              f"{observations.shape[-1]}")
        # The entries as the observation squashes them: compare there, not after inverting a squash near 1.
        load, age = observations[:, self._load], observations[:, self._age]
        overloaded = (load > _squash(self.load ** LOAD_POWER, 1.0)) & (load < _squash(self.load_cap ** LOAD_POWER, 1.0))
        fires = (age > _squash(self.min_head_age_s, 5.0)) & (overloaded | (age > _squash(self.head_age_s, 5.0)))
        if self.known_only:
            fires &= observations[:, self._known] > 0.5
        return np.where(fires, self.action, 0.0).reshape(-1, 1)


class SurgeRule:
    """A residual "network" by hand, on ``LLMSched-Residual-v2``'s observation: the residual ``surge_action`` while
    the observation says a sustained load surge is under way (``load_surge``, :class:`LoadTrend`), in either length
    setting; elsewhere the :class:`OverloadRule` (lengths known only), the larger of the two where both act.

    A surge is a rate climbing for minutes toward an overload: larger batches from its rise on serve the peak with
    less iteration time, and they are held through the decline, while the peak's backlog drains. The overload rule
    alone starts only once the queue has formed, too late with lengths hidden (docs/agents.md).

    Args:
        surge_action, overload_action: the residuals (the scale's exponent, :func:`threshold_scale`) applied;
            ``overload_action=None``: no overload rule, the surge alone (:class:`SurgeOnlyRule`).
        dead_zone: the environment's (:func:`dead_zoned`): the rule answers the action that applies those residuals
            through it.
    """

    log_std = None
    reads_trend = True

    def __init__(self, surge_action: float = 0.8, overload_action: float | None = 1.0,
                 dead_zone: float = 0.0) -> None:
        for value in (surge_action, overload_action):
            if value is not None and not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise ConfigError(f"a surge rule's residuals must lie in (0, 1], got {value!r}")
        self.surge_action = action_for_residual(surge_action, dead_zone)
        self.overload = None if overload_action is None else OverloadRule(action=overload_action, dead_zone=dead_zone)
        names = feature_names(compute_load=True, load_trend=True)
        self._surge, self._width = names.index("load_surge"), len(names)

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        observations = np.asarray(observations, dtype=np.float64)
        if observations.shape[-1] != self._width:
            raise ConfigError(f"a surge rule reads LLMSched-Residual-v2's {self._width} entries (the load's trend "
                              f"among them), got {observations.shape[-1]}")
        surge = np.where(observations[:, self._surge] > 0.5, self.surge_action, 0.0).reshape(-1, 1)
        return surge if self.overload is None else np.maximum(self.overload(observations), surge)


class SurgeOnlyRule(SurgeRule):
    """The :class:`SurgeRule` without its overload rule: larger batches through a sustained surge of the load, the
    baseline itself everywhere else. The overload rule fires on heavy-tailed traffic too (on 13-28 % of the decisions
    of ``azure-code-like`` with lengths known, where no surge is flagged) and costs its p99 there; the surge alone is
    the base itself on every suite workload but the diurnal day's (docs/agents.md)."""

    def __init__(self, surge_action: float = 0.8, dead_zone: float = 0.0) -> None:
        super().__init__(surge_action=surge_action, overload_action=None, dead_zone=dead_zone)


#: Residual teachers an imitation warm start can copy (``[imitation] teacher = NAME`` of a residual config); each
#: reads the compute load (``LLMSched-Residual-v1``), and the load's trend too (``-v2``) where ``reads_trend``.
RESIDUAL_TEACHERS = {"overload": OverloadRule, "surge": SurgeRule, "surge-only": SurgeOnlyRule}


def residual_teacher(name: str, env: Any) -> Any:
    """The residual teacher ``name`` (:data:`RESIDUAL_TEACHERS`, at its defaults) for the residual environment
    ``env``; a clear error if there is none of that name or ``env`` does not observe what it reads."""
    if name not in RESIDUAL_TEACHERS:
        raise ConfigError(f"[imitation] teacher {name!r} is not a residual teacher; one of "
                          f"{', '.join(RESIDUAL_TEACHERS)} (a residual agent starts at its baseline without one)")
    teacher, control = RESIDUAL_TEACHERS[name], env.control
    if teacher.reads_trend and not control.load_trend:
        raise ConfigError(f"[imitation] teacher {name!r} reads the load's trend: train on LLMSched-Residual-v2")
    if not control.compute_load:
        raise ConfigError(f"[imitation] teacher {name!r} reads the compute load: train on LLMSched-Residual-v1")
    return teacher(dead_zone=control.dead_zone)


class ResidualAgentPolicy:
    """A trained residual agent behind the :class:`~llmsched_env.policy.Policy` interface: the baseline's decisions,
    with the agent setting its threshold scale every ``interval_s``. ``run(engine, policy, ...)`` reproduces the
    environment's episode on the same arrivals, on the simulator through the baseline's compiled loop.

    Args:
        network: the agent's policy network: a :class:`ResidualNetwork` (what :func:`read_residual_agent`
            loads), a stable-baselines3 ``PPO`` model, or any callable from a batch of observations to actions.
        scenario: where it runs (the baseline's cost model and memory).
        horizon: the run's horizon (the baseline's overflow bound).
        interval_s, base, batching, dead_zone, compute_load, load_trend: :class:`ResidualControl`'s
            (:func:`control_settings` reads them from a saved agent's environment id and arguments).
        deterministic: the mean action (else a sample, from a generator seeded by ``seed`` at every reset).
    """

    def __init__(self, network: Any, scenario: Scenario, horizon: float, *, interval_s: float = 1.0,
                 base: str | None = None, batching: str = "whole", dead_zone: float = 0.0,
                 compute_load: bool = False, load_trend: bool = False, deterministic: bool = True, seed: int = 0,
                 name: str = "agent") -> None:
        self.name = name
        self.network = network
        self.scenario = scenario
        self.horizon = horizon
        self.deterministic = deterministic
        self.seed = seed
        self.control = ResidualControl(interval_s, base, batching, dead_zone, compute_load, load_trend)
        self._rng = np.random.default_rng(seed)

    def reset(self, engine: Engine) -> None:
        self.control.reset(engine, self.scenario, self.horizon)
        self._engine = engine
        self._rng = np.random.default_rng(self.seed)

    def act(self, observation: np.ndarray) -> np.ndarray:
        """The action for one observation: the network's mean, or a sample around it with its log standard
        deviation (a network without one is deterministic)."""
        if hasattr(self.network, "policy"):  # a stable-baselines3 model
            mean, log_std = gaussian_action(self.network, observation[None])
        else:
            mean = np.asarray(self.network(observation[None]), dtype=np.float64).reshape(1, -1)
            log_std = getattr(self.network, "log_std", None)
        if self.deterministic or log_std is None:
            return mean[0]
        return mean[0] + np.exp(log_std) * self._rng.standard_normal(mean.shape[1])

    def _decide_scale(self, state: SchedulerState) -> None:
        self.control.apply(self.act(self.control.observe(state)), state.now)

    def decide(self, state: SchedulerState) -> Decision:
        if self.control.due(state.now):
            self._decide_scale(state)
        return self.control.base.decide(state)

    def compiled_loop(self) -> CompiledLoop | None:
        """The baseline's compiled loop, stopped at each decision time for the agent (as
        :meth:`~llmsched_env.runner.Rollout.run_compiled` stops at ``until``): the same decisions as :meth:`decide`."""
        inner = self.control.base.compiled_loop()
        if inner is None:
            return None
        control, engine = self.control, self._engine
        primed = [math.nan]  # the decision time whose arrivals the loop has enqueued (then the agent may look)

        def loop(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                 params: EngineParams) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            horizon, now = float(run.reals[HORIZON]), float(run.reals[NOW])
            if control.due(now) and now < horizon:
                if primed[0] != now:
                    # Let the loop enqueue the arrivals due (its own begin, stopping there as at the horizon), then
                    # hand the state to the engine: the agent looks at what Python's loop would show it.
                    run.reals[HORIZON] = now
                    stop, running, *rest = inner(run, running, columns, arrivals, params)
                    run.reals[HORIZON] = horizon
                    if stop == DONE and run.ints[ENDED]:
                        return (stop, running, *rest)  # type: ignore[return-value]
                    primed[0] = now if stop == DONE else math.nan
                    return (PAUSE, running, *rest)  # type: ignore[return-value]
                self._decide_scale(engine.state())
            run.reals[HORIZON] = min(horizon, control.next_decision)
            stop, running, *rest = inner(run, running, columns, arrivals, params)
            run.reals[HORIZON] = horizon
            if stop == DONE and not run.ints[ENDED] and run.reals[NOW] < horizon:
                stop = PAUSE  # a decision is due, not the end
            return (stop, running, *rest)  # type: ignore[return-value]
        return loop


def control_settings(env_kwargs: dict[str, Any], env_id: str = "LLMSched-Residual-v0") -> dict[str, Any]:
    """What a saved agent's environment id and arguments say about its control (``interval_s``, ``base``,
    ``batching``, ``dead_zone``, ``compute_load``, ``load_trend``), as :class:`ResidualAgentPolicy` takes them:
    the agent runs as it was trained. The id's own arguments (:data:`~llmsched_env.registration.RESIDUAL_ENV_IDS`)
    come first, as ``gym.make`` merges them."""
    from llmsched_env.registration import residual_env_kwargs

    merged = residual_env_kwargs(env_id, env_kwargs)
    return {"interval_s": float(merged.get("interval_s", 1.0)), "base": merged.get("base"),
            "batching": str(merged.get("batching", "whole")), "dead_zone": float(merged.get("dead_zone", 0.0)),
            "compute_load": bool(merged.get("compute_load", False)),
            "load_trend": bool(merged.get("load_trend", False))}


def read_residual_agent(directory: str | Path) -> tuple[AgentSpec, Any]:
    """``(spec, network)`` of a residual agent (trained on an id of ``RESIDUAL_ENV_IDS``) saved in ``directory``: its
    actor as a :class:`~agents.residual.ResidualNetwork` (weights only; stable-baselines3 is not needed)."""
    from agents.config import load_config
    from llmsched_env.registration import RESIDUAL_ENV_IDS

    spec, config_path = read_spec(directory)
    if spec.env_id not in RESIDUAL_ENV_IDS:
        raise ConfigError(f"{directory} was trained on {spec.env_id}, whose actions are per request type of one "
                          f"workload; a workload-independent agent is trained on {', '.join(RESIDUAL_ENV_IDS)}")
    policy_kwargs = load_config(str(config_path)).hyperparameters.get("policy_kwargs", {})
    unsupported = set(policy_kwargs) - {"net_arch", "log_std_init"}
    if unsupported:
        raise ConfigError(f"{config_path}: policy_kwargs {', '.join(sorted(unsupported))} not supported for a "
                          "residual agent (its actor is the default MlpPolicy's: tanh layers)")
    model_path = Path(directory) / MODEL_FILE
    settings = control_settings(spec.env_kwargs, spec.env_id)
    features = len(feature_names(settings["compute_load"], settings["load_trend"]))
    return spec, ResidualNetwork.from_weights(read_weights(model_path), str(model_path), features)


def gaussian_action(model: Any, observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A continuous-action PPO network's mean actions for a batch of observations (its action head's output, as
    :func:`agents.policy.action_logits` reads it), and its log standard deviation (``(N, A)`` and ``(A,)``)."""
    observations = np.asarray(observations, dtype=np.float32)
    return action_logits(model, observations), model.policy.log_std.detach().numpy().astype(np.float64)
