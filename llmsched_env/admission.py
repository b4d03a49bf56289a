"""How an agent controls admissions: request classes, the observation, the action mask, and action → decision.

One object, :class:`AdmissionControl`, is the agent's whole interface to an engine. The Gymnasium
environment (:mod:`llmsched_env.env`) and a trained agent running as a policy
(:class:`agents.policy.AgentPolicy`) both use it, so an agent sees the same observations and its
actions mean the same batches whether it is trained or evaluated, on any engine.

**Classes.** With output lengths known, a request's class is its type (the nearest type of the
scenario's :meth:`~llmsched_env.scenario.Scenario.class_mix`); with lengths hidden, its prompt-length
class (at most ``max_classes`` classes cut at the rate-weighted quantiles of the offered prompt lengths).

**Action.** For each class ``k`` a count ``a_k ∈ {0, …, max_admit}``: admit the ``a_k`` oldest waiting
requests of that class now (whole prompts). Every running request decodes every iteration (the
variant of WAIT the paper's authors measured). Admitting the oldest ``a_k`` of each class expresses
both WAIT's decision (``n_j`` of type ``j`` once ``n_j`` wait) and vLLM's greedy FCFS admission (a
queue prefix) exactly. Nested WAIT's admissions are expressible too, but not its holding of running
requests at segment boundaries (decodes are not the agent's to gate), so a scripted Nested WAIT
agent differs from the policy itself.

**Mask and clipping.** Count ``a`` is allowed for class ``k`` when the ``a`` oldest waiting requests of
the class exist and fit in the KV blocks left after this iteration's decodes grow. An action outside
the mask is clipped to the largest allowed count of each class; then the chosen requests are taken
in queue order while they fit together (the engine's own rule: newest-admitted are deferred first),
so a combination that fits class by class but not jointly is cut at the first request that does not
fit. Either cut is reported as ``clipped``.

**Decision epochs.** An iteration is an epoch, where the agent decides, when some class has an
allowed count ``>= 1`` (someone waits and could be admitted). Other iterations run the fixed rule:
decode everything running, admit nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from llmsched_env import kernels
from llmsched_env.engine import IDLE, Decision, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import solve_fluid
from llmsched_env.rate_estimate import ArrivalRateEstimator
from llmsched_env.request_table import Int64Buffer
from llmsched_env.scenario import Scenario
from llmsched_env.workload import Arrivals, RequestType, TypeMix

_EMPTY = np.empty(0, dtype=np.int64)


def mean_residual_output(output_lens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``E[o − d | o > d]`` for ``d = 0 … max(o)``: the tokens a request that decoded ``d`` still expects to
    decode, under the offered output-length distribution (1 beyond its longest output)."""
    values, inverse = np.unique(np.asarray(output_lens, np.int64), return_inverse=True)
    mass = np.bincount(inverse, weights=weights, minlength=len(values)).astype(np.float64)
    top = int(values[-1])
    d = np.arange(top + 1)
    beyond = values[None, :] > d[:, None]
    survivors = (beyond * mass).sum(axis=1)
    expected = (beyond * mass * values).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.where(survivors > 0, expected / survivors - d, 1.0)
    return np.maximum(residual, 1.0)


class Candidates(NamedTuple):
    """What may be admitted at an iteration (see :meth:`AdmissionControl.candidates`)."""

    oldest: np.ndarray  # row k: class k's oldest waiting ids in queue order, the first heads[k] of it
    heads: np.ndarray  # per class, how many ids its row of oldest holds (up to max_admit)
    fits: np.ndarray  # per class, how many of those fit in memory (the largest allowed count)
    room: int  # KV blocks free once every running request has decoded one more token
    waiting: np.ndarray  # per class, how many wait


class ObservationScales(NamedTuple):
    """What the observation's counts are squashed by (``x / (x + s)``), and its fixed part: an episode's
    fluid targets (:meth:`AdmissionControl.reset`)."""

    queue: np.ndarray  # per class
    running: np.ndarray  # per class and stage bucket
    rate: np.ndarray  # per class
    time: float  # the time since the last admission
    fixed: np.ndarray  # the fluid targets' entries: n* per class, M*/C, Θ*/Σλ, ρ


class InterfaceParams(NamedTuple):
    """What an episode fixes for the agent interface, as a compiled loop takes it
    (:meth:`AdmissionControl.interface_params`)."""

    classes: np.ndarray  # each request's class, by id
    max_admit: int
    rate_window: float  # the rate estimator's window (s)
    scales: ObservationScales
    residual: np.ndarray  # mean residual output per stage (hidden lengths)
    segment_edges: np.ndarray
    known_lengths: bool
    stage_buckets: int


class InterfaceCounters(NamedTuple):
    """What the agent interface changes during an episode besides the rate sums
    (:meth:`AdmissionControl.counters`)."""

    seen: int  # requests counted into the rate estimates
    last_admission: float  # when the last admission ran (s)
    rate_time: float  # the rate estimates' clock (s)


@dataclass(frozen=True)
class EpisodeTargets:
    """The fluid benchmark of an episode, per class: what the observation is normalised by."""

    rates: np.ndarray  # offered λ_k per class (req/s)
    n_star: np.ndarray  # fluid requests per stage per class, at the rates the fluid optimum serves
    tau_s: float  # fluid iteration time of the admitted rates
    memory_frac: float  # M* / C of the offered load (inf when ρ >= 1)
    served_frac: float  # Θ* / Σλ: the share of the offered load the fluid optimum serves
    rho: float
    throughput_rps: float  # Θ*
    horizon_s: float


class AdmissionControl:
    """The agent's view of an engine and the meaning of its actions (see the module docstring).

    Args:
        scenario: where the classes and the length statistics come from (``output_lengths_known`` too).
        max_admit: the largest count an action may give one class in one iteration.
        stage_buckets: running requests are counted per class in this many stage buckets (known lengths:
            quarters of the output, by default; hidden: segments cut at output-length quantiles).
        max_classes: with hidden lengths, at most this many prompt-length classes.
        rate_window_s: time constant of the exponentially weighted arrival-rate estimates.
    """

    def __init__(self, scenario: Scenario, *, max_admit: int = 64, stage_buckets: int = 4, max_classes: int = 4,
                 rate_window_s: float = 5.0) -> None:
        if not isinstance(max_admit, (int, np.integer)) or max_admit < 1:
            raise ConfigError(f"max_admit must be an integer >= 1, got {max_admit!r}")
        if not isinstance(stage_buckets, (int, np.integer)) or stage_buckets < 1:
            raise ConfigError(f"stage_buckets must be an integer >= 1, got {stage_buckets!r}")
        if not isinstance(max_classes, (int, np.integer)) or max_classes < 1:
            raise ConfigError(f"max_classes must be an integer >= 1, got {max_classes!r}")
        if not (math.isfinite(rate_window_s) and rate_window_s > 0):
            raise ConfigError(f"rate_window_s must be finite and > 0 s, got {rate_window_s!r}")
        self.known_lengths = scenario.output_lengths_known
        self.max_admit = int(max_admit)
        self.stage_buckets = int(stage_buckets)
        self.rate_window_s = float(rate_window_s)
        offered = scenario.offered_mix()
        weights = offered.rates if offered.total_rate > 0 else np.ones(len(offered.types))
        if self.known_lengths:
            self.class_mix = scenario.class_mix()
            self._prompt_edges = _EMPTY
            self._segment_edges = _EMPTY
            self._residual = _EMPTY  # the remaining output is known exactly
        else:
            self._prompt_edges = _prompt_class_edges(offered.prompt_lens, weights, int(max_classes))
            self._segment_edges = _quantile_edges(offered.output_lens, weights, self.stage_buckets)
            self._residual = np.rint(mean_residual_output(offered.output_lens, weights)).astype(np.int64)
            cls = np.searchsorted(self._prompt_edges, offered.prompt_lens, side="left")
            self.class_mix = _class_summary(offered, cls, len(self._prompt_edges) + 1)
        self.settings = {"max_admit": self.max_admit, "stage_buckets": self.stage_buckets,
                         "max_classes": int(max_classes), "rate_window_s": self.rate_window_s}
        self.num_classes = len(self.class_mix.types)
        k, b = self.num_classes, self.stage_buckets
        self.observation_size = k * (b + 3) + 7
        self._class = Int64Buffer()  # each request's class, by id
        self._targets: EpisodeTargets | None = None

    # -- the spaces' shapes ------------------------------------------------------------------------
    @property
    def action_nvec(self) -> np.ndarray:
        """The sizes of the MultiDiscrete action space: ``max_admit + 1`` counts per class."""
        return np.full(self.num_classes, self.max_admit + 1, dtype=np.int64)

    def observation_names(self) -> list[str]:
        """One name per observation entry, in order (documentation, TensorBoard, debugging)."""
        k = range(self.num_classes)
        names = [f"queue[{j}]" for j in k]
        names += [f"running[{j},{s}]" for j in k for s in range(self.stage_buckets)]
        names += ["kv_used", "kv_projected_peak", "since_admission"]
        names += [f"rate_estimate[{j}]" for j in k] + [f"n_star[{j}]" for j in k]
        names += ["fluid_memory", "fluid_served", "load", "progress"]
        return names

    # -- episodes ---------------------------------------------------------------------------------
    def targets_for(self, scenario: Scenario, horizon: float) -> EpisodeTargets:
        """The fluid targets per class of ``scenario``'s offered load (what a scheduler knows in advance)."""
        mix = scenario.offered_mix()
        fluid = solve_fluid(mix, scenario.cost, scenario.paged_capacity_tokens)
        cls = self.classify(mix.prompt_lens, mix.output_lens)
        k = self.num_classes
        rates = np.bincount(cls, weights=mix.rates, minlength=k)
        admitted = np.bincount(cls, weights=fluid.admitted_rates, minlength=k)
        tau = fluid.tau_admitted_s if math.isfinite(fluid.tau_admitted_s) else 0.0
        offered = float(mix.rates.sum())
        return EpisodeTargets(
            rates=rates, n_star=admitted * tau, tau_s=tau, memory_frac=fluid.memory_tokens / fluid.capacity_tokens,
            served_frac=fluid.throughput_rps / offered if offered > 0 else 1.0, rho=fluid.rho,
            throughput_rps=fluid.throughput_rps, horizon_s=horizon)

    def reset(self, targets: EpisodeTargets, arrivals: Arrivals | None = None) -> None:
        """Forget the last episode: its classes, rate estimates and admission clock.

        Given the episode's ``arrivals`` (ids are arrival order), their classes are computed at once
        rather than a few at every epoch; the result is the same.
        """
        self._targets = targets
        self._class = Int64Buffer()
        if arrivals is not None and len(arrivals):
            self._class.extend(self.classify(arrivals.prompt_len, arrivals.output_len if self.known_lengths else None))
        self._seen = 0
        self._rates = ArrivalRateEstimator(self.rate_window_s, self.num_classes)
        self._last_admission = 0.0
        k, b = self.num_classes, self.stage_buckets
        n_star = np.maximum(targets.n_star, 1.0)
        mean_output = self.class_mix.output_lens.astype(np.float64)
        # What the episode fixes: n* per class, then the fluid memory, the share served and the load.
        fixed = np.concatenate([
            np.minimum(targets.n_star / self.max_admit, 1.0),
            [min(targets.memory_frac, 2.0) / 2.0 if math.isfinite(targets.memory_frac) else 1.0,
             min(targets.served_frac, 1.0), min(targets.rho, 2.0) / 2.0]]).astype(np.float64)
        self._scales = ObservationScales(
            queue=np.ascontiguousarray(n_star, dtype=np.float64),
            running=np.repeat(n_star * (mean_output + 1.0) / b, b).reshape(k, b),
            rate=np.where(targets.rates > 0, targets.rates, max(targets.rates.sum(), 1.0) / k).astype(np.float64),
            time=float(targets.tau_s if targets.tau_s > 0 else 0.05), fixed=fixed)

    def interface_params(self) -> InterfaceParams:
        """What the episode fixes for this interface, for a compiled loop (after :meth:`reset`)."""
        return InterfaceParams(self._class.data[:self._class.size], self.max_admit, self.rate_window_s,
                               self._scales, self._residual, self._segment_edges, bool(self.known_lengths),
                               self.stage_buckets)

    @property
    def rate_sums(self) -> np.ndarray:
        """The rate estimator's per-class sums (a compiled loop advances them in place)."""
        return self._rates.sums

    def counters(self) -> InterfaceCounters:
        """What the interface changes during an episode besides :attr:`rate_sums`."""
        return InterfaceCounters(self._seen, self._last_admission, self._rates.time)

    def restore(self, counters: InterfaceCounters) -> None:
        """Take ``counters`` (those a compiled loop reached) as the interface's state: the inverse of
        :meth:`counters`."""
        self._seen, self._last_admission, self._rates.time = counters

    @property
    def targets(self) -> EpisodeTargets:
        if self._targets is None:
            raise RuntimeError("AdmissionControl.reset(targets) must be called before use")
        return self._targets

    # -- classes ----------------------------------------------------------------------------------
    def classify(self, prompt_len: np.ndarray, output_len: np.ndarray | None) -> np.ndarray:
        """The class of each request (output lengths are only read when they are known)."""
        if self.known_lengths:
            return self.class_mix.nearest(prompt_len, _required(output_len))
        return np.searchsorted(self._prompt_edges, prompt_len, side="left")

    def _classes(self, state: SchedulerState) -> np.ndarray:
        known = self._class.size
        if state.num_requests > known:
            ids = np.arange(known, state.num_requests)
            output = state.output_len[ids] if state.output_len is not None else None
            self._class.extend(self.classify(state.prompt_len[ids], output))  # amortised O(1) per request
        self._class.release_below(state.retired)  # retired requests are never looked up again
        return self._class.data

    # -- what may be admitted -----------------------------------------------------------------------
    def candidates(self, state: SchedulerState) -> Candidates:
        """Per class, its oldest waiting ids (up to ``max_admit``) and how many of them fit in memory."""
        classes = self._classes(state)
        room = state.free_blocks - kernels.blocks_to_grow(state.running, state.kv_tokens, state.block_size)
        oldest, heads, fits, queued = kernels.scan_queue(state.waiting, classes, state.context_len, state.block_size,
                                                         room, self.num_classes, self.max_admit)
        return Candidates(oldest, heads, fits, room, queued)

    @staticmethod
    def is_epoch(candidates: Candidates) -> bool:
        """Whether the agent has a choice: someone waits and could be admitted."""
        return bool(kernels.has_choice(candidates.fits))

    def action_mask(self, candidates: Candidates) -> np.ndarray:
        """The flat boolean mask of sb3-contrib's MultiDiscrete masking: counts ``0 … fits_k`` per class."""
        counts = np.arange(self.max_admit + 1)
        return (counts[None, :] <= candidates.fits[:, None]).reshape(-1)

    def decision(self, state: SchedulerState, action: np.ndarray,
                 candidates: Candidates) -> tuple[Decision, np.ndarray, bool]:
        """The decision for ``action``: ``(decision, admitted counts per class, clipped)``."""
        action = self.checked_action(action)
        admit, counts, clipped = kernels.admissions(action, candidates.oldest, candidates.fits, self._class.data,
                                                    state.context_len, state.block_size, candidates.room)
        if len(admit):
            self._last_admission = state.now
        decode = _decodable(state)
        if len(decode) == 0 and len(admit) == 0:
            return IDLE, counts, clipped
        return Decision(decode=decode, prefill=admit), counts, clipped

    def checked_action(self, action: np.ndarray) -> np.ndarray:
        """``action`` as one int64 count per class, or :class:`ConfigError` naming its shape."""
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if action.shape != (self.num_classes,):
            raise ConfigError(f"an action has one count per class ({self.num_classes}), got shape {action.shape}")
        return action

    @staticmethod
    def fixed_decision(state: SchedulerState) -> Decision:
        """The rule between epochs: decode everything running, admit nothing."""
        decode = _decodable(state)
        return Decision(decode=decode) if len(decode) else IDLE

    def action_for(self, state: SchedulerState, decision: Decision, candidates: Candidates) -> np.ndarray:
        """The action whose admissions are what the engine would admit of ``decision``'s (its queue-order
        prefix that fits). Exact for decisions that admit the oldest waiting requests of each class, as
        WAIT, Nested WAIT and vLLM's FCFS do."""
        prefill = np.asarray(decision.prefill, dtype=np.int64)
        admit = prefill[state.kv_tokens[prefill] == 0] if len(prefill) else prefill  # new admissions only
        if len(admit):
            admit = admit[: _fitting_count(state, admit, candidates.room)]
        counts = np.bincount(self._classes(state)[admit], minlength=self.num_classes) if len(admit) else \
            np.zeros(self.num_classes, dtype=np.int64)
        return np.minimum(counts, self.max_admit)

    # -- the observation ------------------------------------------------------------------------------
    def observe(self, state: SchedulerState, candidates: Candidates) -> np.ndarray:
        """The observation (float32, every entry in ``[0, 1]``; layout in :meth:`observation_names`)."""
        t = self.targets
        classes = self._classes(state)
        k, b = self.num_classes, self.stage_buckets
        now = state.now
        self._update_rates(state, classes)

        # Known lengths: quarters of each output and its true remaining length; hidden: segments and the
        # expected residual (rounded) given what was decoded.
        output = _required(state.output_len) if self.known_lengths else _EMPTY
        cells, peak = kernels.running_profile(state.running, classes, state.context_len, state.prompt_len, output,
                                              self._residual, self._segment_edges, self.known_lengths, k, b)
        memory = np.array([state.used_blocks / state.capacity_blocks, min(peak / state.capacity_tokens, 2.0) / 2.0])
        return kernels.assemble_observation(candidates.waiting, cells, memory, now - self._last_admission,
                                            self._rates.rates, min(now / t.horizon_s, 1.0), self._scales)

    def _update_rates(self, state: SchedulerState, classes: np.ndarray) -> None:
        """Count the arrivals since the last observation into the per-class rate estimates."""
        ids = np.arange(self._seen, state.num_requests)
        self._rates.update(state.now, state.arrival_time[ids], classes[ids])
        self._seen = state.num_requests


def _required(output_len: np.ndarray | None) -> np.ndarray:
    """Output lengths of an agent built for known lengths, or the error that says the engine hides them."""
    if output_len is None:
        raise ConfigError("this agent was built for known output lengths, but the engine hides them")
    return output_len


def _decodable(state: SchedulerState) -> np.ndarray:
    """The running requests that can decode (their whole context is cached)."""
    return kernels.decodable(state.running, state.kv_tokens, state.context_len)


def _fitting_count(state: SchedulerState, ids: np.ndarray, room: int) -> int:
    """How many of ``ids``, admitted in this order, fit in ``room`` free blocks (the engine's rule: a prefix)."""
    return int(kernels.fitting_prefix_count(ids, state.context_len, state.block_size, room))


def _quantile_edges(values: np.ndarray, weights: np.ndarray, parts: int) -> np.ndarray:
    """Edges at the weighted quantiles ``1/parts … (parts−1)/parts`` of ``values`` (``x > edge`` is above it)."""
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order]) / weights.sum()
    picks = [values[order][min(int(np.searchsorted(cdf, q - 1e-12)), len(values) - 1)]
             for q in np.arange(1, parts) / parts]
    return np.unique(np.array(picks, dtype=np.int64))


def _prompt_class_edges(prompt_lens: np.ndarray, weights: np.ndarray, max_classes: int) -> np.ndarray:
    """Prompt-length class edges: every distinct prompt its own class when there are few, else quantiles.
    A prompt ``p`` is in class ``searchsorted(edges, p, 'left')`` (``p <= edges[0]`` is class 0)."""
    distinct = np.unique(prompt_lens)
    if len(distinct) <= max_classes:
        return distinct[:-1]
    edges = _quantile_edges(prompt_lens, weights, max_classes)
    return edges[edges < distinct[-1]]


def _class_summary(offered: TypeMix, cls: np.ndarray, count: int) -> TypeMix:
    """One representative type per class: rate-weighted mean lengths, the class's total rate."""
    types = []
    for k in range(count):
        members = cls == k
        if not members.any():
            raise ConfigError(f"prompt class {k} has no request type")  # pragma: no cover - edges come from the mix
        rate = float(offered.rates[members].sum())
        w = offered.rates[members] if rate > 0 else np.ones(int(members.sum()))
        types.append(RequestType(max(1, int(round(float(offered.prompt_lens[members] @ w) / w.sum()))),
                                 max(1, int(round(float(offered.output_lens[members] @ w) / w.sum()))), rate))
    return TypeMix(tuple(types))
