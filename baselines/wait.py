"""WAIT: fluid-guided threshold batching with known output lengths (arXiv 2504.11320, DESIGN.md section 4).

Each request is assigned to the nearest type of the configured mix (exact for generated workloads;
for traces the mix is a (prompt, output) bucketing, see :meth:`TypeMix.bucketed`). Thresholds ``n_j``
come from :func:`baselines.thresholds.wait_thresholds`. Type ``j`` is *ready* when at least ``n_j`` of
its requests wait. Two variants, both named policies:

``wait-pausing`` — the paper's Algorithm 1 as written (formerly ``wait-paper``): an iteration takes, for
    every ready type, ``n_j`` waiting requests (its prefill cohort) and up to ``n_j`` running requests from
    each of its decode stages; types that are not ready pause, their KV kept. With no type ready, nothing
    runs until the next arrival.
``wait`` (default) — the variant the authors measured: admissions are gated the same way (``n_j`` per
    ready type), but every running request decodes every iteration.

Drain (ours, not in the paper; ``drain_when_idle``, on for ``wait``, off for ``wait-pausing``): when
nothing runs and nothing is in progress although requests wait, every type is let in (up to
``n_j``). Otherwise, once arrivals stop (the end of a trace), requests below a threshold would wait
for ever. "Nothing runs" is judged before lending spare memory (below): with no type ready, a spare
room for one request would otherwise admit one at a time, the batch never idle for the drain. The
paper's rule pauses cohorts exactly when no type is ready, so it keeps its rule.

Memory safety (``memory_safe``, on for ``wait``): lengths are known, so the KV the running batch will
need before it finishes is known exactly (:mod:`baselines.lookahead`). A request is admitted only if
the projected peak of the batch with it fits in the cache; admissions are taken in queue order while
they fit. ``wait`` therefore never makes the engine evict, on any trace, at any load (the thresholds
alone keep pipelines within capacity only in the fluid limit: a bursty trace or a long output
overflows them). ``wait-pausing`` pauses cohorts, which the projection does not model, so it keeps the
paper's rule and the engine's eviction rule (newest first, recompute) as its backstop.

Lending spare memory (``lend_spare_memory``, on for ``wait``): at light load a cohort of ``n_j`` takes
a while to gather, and waiting for it costs latency for nothing when memory is plentiful. Requests
below a threshold are admitted too while the projected peak stays within the capacity less the
memory WAIT's own pipelines need at equilibrium (``Σ_j n_j·w_j`` in blocks,
:attr:`~baselines.thresholds.WaitThresholds.memory_blocks`). In the memory-bound regime that reserve
is the whole cache and WAIT is WAIT; where memory is plentiful it admits like vLLM, without evicting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from baselines.cohorts import first_per_group
from baselines.lookahead import (
    LEND_SCAN,
    ORIGIN,
    HeldProfile,
    fitting_prefix,
    held_advance,
    held_fitting_prefix,
    held_profile,
    no_profile,
    trajectories,
    trajectories_of,
)
from baselines.stall_free import backlog_budget, check_batching, latency_order, stall_free, stall_free_batch
from baselines.thresholds import WaitThresholds, wait_thresholds
from baselines.type_queues import TypeQueues
from llmsched_env import compiled_run
from llmsched_env.compiled import borrowed, compiled, compiled_inlined
from llmsched_env.compiled_run import (
    GO_ON,
    INVALID_DECISION,
    ITERATIONS,
    LAST_ITERATION,
    NEXT_ARRIVAL,
    RETIRED,
    ChunkArrays,
    RunState,
)
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import IDLE, LAST_SECONDS, WAITING, Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.iteration import NUM_WAITING, EngineParams, N
from llmsched_env.kernels import nearest_type
from llmsched_env.policy import CompiledLoop
from llmsched_env.request_table import Int64Buffer, RequestColumns
from llmsched_env.workload import TypeMix

Variant = Literal["measured", "paper"]
_EMPTY = np.empty(0, np.int64)


@dataclass
class WaitPolicy:
    """WAIT over a type mix; see the module docstring for the two variants."""

    mix: TypeMix
    thresholds: WaitThresholds
    variant: Variant = "measured"
    name: str = "wait"
    drain_when_idle: bool = True
    memory_safe: bool = True
    lend_spare_memory: bool = True
    # 0: every admission prefilled whole in one iteration (the rule as written); > 0: the rule's decisions batched
    # stall-free within this many tokens per iteration (baselines.stall_free; Sarathi's 2048).
    token_budget: int = 0
    # > 0: the budget follows the queue, raised to prefill the waiting prompts within this many iterations
    # (baselines.stall_free.backlog_budget); 0: the budget is fixed.
    drain_iterations: int = 0
    # > 0: the admissions a stall-free budget serves are taken by projected latency, largest first, a remaining output
    # token counting as this many of the last iteration's seconds (baselines.stall_free.latency_order); 0: queue
    # order. Stall-free batching only: whole prefills admit the whole decision at once.
    latency_order_weight: float = 0.0
    _types: Int64Buffer = field(default_factory=Int64Buffer, repr=False)
    _queues: TypeQueues = field(default_factory=lambda: TypeQueues(0), repr=False)

    @classmethod
    def for_mix(cls, mix: TypeMix, cost: LinearCostModel, capacity_tokens: int, block_size: int,
                variant: Variant = "measured") -> "WaitPolicy":
        measured = variant == "measured"
        return cls(mix, wait_thresholds(mix, cost, capacity_tokens, block_size), variant,
                   "wait" if measured else "wait-pausing", drain_when_idle=measured, memory_safe=measured,
                   lend_spare_memory=measured)

    def reset(self, engine: Engine) -> None:
        if not engine.output_lengths_known:
            raise ConfigError(f"{self.name} needs output lengths known at arrival; with hidden lengths use nested-wait")
        if self.variant not in ("measured", "paper"):
            raise ConfigError(f"WAIT variant must be 'measured' or 'paper', got {self.variant!r}")
        if self.variant == "paper" and (self.memory_safe or self.lend_spare_memory):
            raise ConfigError("memory_safe and lend_spare_memory assume every running request decodes each "
                              "iteration: the paper's variant pauses cohorts, so it cannot use them")
        check_batching(self.token_budget, self.drain_iterations, self.latency_order_weight)
        self._types = Int64Buffer()
        self._queues = TypeQueues(len(self.thresholds.n))

    @property
    def iteration_budget(self) -> int:
        """The token budget each iteration is batched within now (0: whole prefills)."""
        return self.token_budget

    @property
    def mean_prompt(self) -> float:
        """The mean prompt of the mix (rate-weighted, tokens): what a waiting request is taken to bring
        (:func:`~baselines.stall_free.backlog_budget`)."""
        rates = self.mix.rates
        return float(rates @ self.mix.prompt_lens) / float(rates.sum())

    def compiled_loop(self) -> CompiledLoop | None:
        """This policy's rule compiled (:func:`run_wait`, either variant): the same decisions as :meth:`decide`, bit
        for bit. Subclasses that change the rule between iterations have their own (the adaptive policy's)."""
        if type(self) is not WaitPolicy:
            return None
        rule, follow = self.compiled_rule(), WaitQueueFollower(len(self.thresholds.n))

        def loop(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                 engine: EngineParams) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            follow.make_room(run, arrivals)
            *stop, follow.held = run_wait(run, running, columns, arrivals, engine, rule, follow.types.data,
                                          follow.queue, follow.held)
            return tuple(stop)  # type: ignore[return-value]
        return loop

    def compiled_rule(self) -> "WaitRule":
        """The current thresholds and settings, as the compiled rule takes them."""
        return WaitRule(np.ascontiguousarray(self.thresholds.n, dtype=np.int64), *self.mix.log_lengths(),
                        int(self.thresholds.memory_blocks), self.drain_when_idle, self.lend_spare_memory,
                        self.memory_safe, self.variant == "paper", self.iteration_budget, self.drain_iterations,
                        self.mean_prompt, float(self.latency_order_weight))

    def _classify(self, state: SchedulerState) -> np.ndarray:
        """Every request's type (the nearest of the mix), classified once, on arrival."""
        known = self._types.size
        if state.num_requests > known:
            assert state.output_len is not None
            ids = np.arange(known, state.num_requests)
            self._types.extend(self.mix.nearest(state.prompt_len[ids], state.output_len[ids]))
        self._types.release_below(state.retired)  # retired requests are never looked up again
        return self._types.data

    def _reclassify(self, state: SchedulerState) -> None:
        """Classify every request again on the current mix (an adaptive policy's new classes), and rebuild the
        type queues from the engine's queue."""
        assert state.output_len is not None
        start, count = state.retired, state.num_requests
        self._types = Int64Buffer(start)  # retired requests are never looked up again
        self._types.extend(self.mix.nearest(state.prompt_len[start:count], state.output_len[start:count]))
        self._queues = TypeQueues.of_state(state, self._types.data, len(self.thresholds.n))

    def decide(self, state: SchedulerState) -> Decision:
        types = self._classify(state)
        queues = self._queues
        queues.update(state, types)  # O(new + taken + running): never the whole queue
        n = self.thresholds.n
        queued = queues.counts()
        ready = (queued >= n) & (n > 0)
        if (self.drain_when_idle and self.lend_spare_memory and not ready.any() and queued.any()
                and len(_measured_decodes(state)) == 0):
            # Nothing would run but what lending lets in: drain instead, or a spare room for one request would
            # admit one at a time and the batch would never be idle for the drain below.
            ready = np.ones(len(n), dtype=bool)
        decision = self._select(state, types, queued, ready)
        if decision.is_idle and self.drain_when_idle and (queued.any() or len(state.running)):
            # Nothing would run: let every type in (up to n_j) rather than strand requests below a threshold
            # until enough new arrivals come, which may be never.
            decision = self._select(state, types, queued, np.ones(len(n), dtype=bool))
        queues.take(decision.prefill, types)  # an admission the budget defers is found in the queue again
        budget = self.iteration_budget
        if self.drain_iterations:  # the mix's mean prompt only where the budget follows the queue
            budget = backlog_budget(budget, state.num_waiting, self.mean_prompt, self.drain_iterations)
        if budget and self.latency_order_weight:
            assert state.output_len is not None  # reset refuses hidden lengths
            order = latency_order(np.asarray(decision.prefill, dtype=np.int64), state.arrival_time,
                                  state.prompt_len, state.context_len, state.output_len,
                                  self.latency_order_weight * float(state.last_iteration[LAST_SECONDS]))
            decision = Decision(decode=decision.decode, prefill=order, preempt=decision.preempt)
        return stall_free(decision, state, budget)

    def _cohorts(self, ready: np.ndarray) -> np.ndarray:
        """The oldest ``n_j`` waiting requests of every ready type, in queue order."""
        n = np.maximum(self.thresholds.n, 1)
        parts = [self._queues.oldest(k, int(n[k])) for k in np.flatnonzero(ready)]
        return np.sort(np.concatenate(parts)) if parts else _EMPTY

    def _following(self, cohorts: np.ndarray, queued: np.ndarray, types: np.ndarray) -> np.ndarray:
        """The oldest ``LEND_SCAN`` waiting requests after ``cohorts`` (each type's oldest), in queue order."""
        in_cohorts = np.bincount(types[cohorts], minlength=len(queued))
        parts = [self._queues.oldest(k, LEND_SCAN, skip=int(in_cohorts[k]))
                 for k in np.flatnonzero(queued > in_cohorts)]
        return np.sort(np.concatenate(parts))[:LEND_SCAN] if parts else _EMPTY

    def _select(self, state: SchedulerState, types: np.ndarray, queued: np.ndarray, ready: np.ndarray) -> Decision:
        n = np.maximum(self.thresholds.n, 1)
        admit = self._cohorts(ready & (queued > 0))

        running = state.running
        if self.variant == "measured":
            decode = _measured_decodes(state)
            if self.memory_safe and queued.any():
                admit = self._safe_admissions(state, running, queued, admit, types)
        else:
            running_types = types[running]
            running = running[ready[running_types]]
            running_types = running_types[ready[running_types]]
            stage = state.context_len[running] - state.prompt_len[running]
            stride = int(stage.max()) + 1 if len(stage) else 1
            decode = running[first_per_group(running_types * stride + stage, n[running_types])]
        if len(decode) == 0 and len(admit) == 0:
            return IDLE
        return Decision(decode=decode, prefill=admit)

    def _safe_admissions(self, state: SchedulerState, running: np.ndarray, queued: np.ndarray,
                         cohorts: np.ndarray, types: np.ndarray) -> np.ndarray:
        """The cohorts' queue-order prefix whose projected peak fits, then (lending spare memory) whoever
        else waits, in queue order, within the capacity less WAIT's own reserve."""
        context, remaining = trajectories(state, running)
        cohort_context, cohort_remaining = trajectories(state, cohorts)
        count = fitting_prefix(context, remaining, cohort_context, cohort_remaining, state.block_size,
                               state.capacity_blocks)
        admit = cohorts[:count]
        spare = state.capacity_blocks - self.thresholds.memory_blocks
        if not self.lend_spare_memory or count < len(cohorts) or spare <= 0:
            return admit
        others = self._following(admit, queued, types)
        if len(others) == 0:
            return admit
        other_context, other_remaining = trajectories(state, others)
        extra = fitting_prefix(np.concatenate([context, cohort_context[:count]]),
                               np.concatenate([remaining, cohort_remaining[:count]]),
                               other_context, other_remaining, state.block_size, spare)
        return np.sort(np.concatenate([admit, others[:extra]])) if extra else admit


def _measured_decodes(state: SchedulerState) -> np.ndarray:
    """The measured variant's decodes: every running request with its context cached."""
    running = state.running
    return running[state.kv_tokens[running] == state.context_len[running]]


class WaitRule(NamedTuple):
    """WAIT's rule as its compiled loop takes it."""

    n: np.ndarray  # int64 threshold per type
    log_prompt: np.ndarray  # float64 ln of each type's prompt and output lengths (TypeMix.log_lengths): arrivals
    log_output: np.ndarray  # are typed as they come (kernels.nearest_type)
    memory_blocks: int  # the reserve of WAIT's own pipelines, Σ n_j·w_j in blocks
    drain_when_idle: bool
    lend_spare_memory: bool
    memory_safe: bool
    pausing: bool  # the paper's variant: cohorts of types that are not ready pause
    token_budget: int  # 0: whole prefills; else stall-free batching within this many tokens (baselines.stall_free)
    drain_iterations: int  # > 0: the budget follows the queue (baselines.stall_free.backlog_budget)
    mean_prompt: float  # the mix's mean prompt, what a waiting request is taken to bring
    latency_order_weight: float  # > 0: admissions served by projected latency (baselines.stall_free.latency_order)


class WaitQueueFollower:
    """What WAIT's compiled loop keeps between its calls: every request's type (typed by the loop as it arrives,
    :func:`wait_begin`; released with the engine's retired rows) and the waiting counts per type."""

    def __init__(self, num_types: int) -> None:
        self.types = Int64Buffer()  # by request id: the requests in the engine, then those of `arrivals` to come
        self.queue = WaitQueue(np.zeros(num_types, dtype=np.int64), np.zeros(1, dtype=np.int64))
        self.held = no_profile()  # the running batch's projection where the loop last stopped (none yet)

    def make_room(self, run: RunState, arrivals: ChunkArrays) -> None:
        """Room for the types of the arrivals the loop will read, and let retired requests go."""
        start, count = int(run.ints[NEXT_ARRIVAL]), int(run.counters[N])
        room = start + self.types.size - count  # arrivals[start:room] have room (ids count … types.size − 1)
        if room < len(arrivals.times):
            self.types.extend(np.zeros(len(arrivals.times) - room, dtype=np.int64))
        self.types.release_below(int(run.ints[RETIRED]))

    def reclassify(self, mix: TypeMix, state: SchedulerState, run: RunState, arrivals: ChunkArrays) -> None:
        """Type every request in the system again on a new ``mix`` (those of the chunk still to come are typed as
        they arrive), and count the queue per new type (as :meth:`WaitPolicy._reclassify` rebuilds its queues)."""
        assert state.output_len is not None
        start, count = state.retired, state.num_requests
        types = Int64Buffer(start)  # retired requests are never looked up again
        types.extend(mix.nearest(state.prompt_len[start:count], state.output_len[start:count]))
        self.types = types
        self.make_room(run, arrivals)
        queued = np.bincount(types.data[state.waiting], minlength=len(mix.types)).astype(np.int64)
        self.queue = WaitQueue(queued, np.array([start], dtype=np.int64))


class WaitQueue(NamedTuple):
    """What WAIT's compiled loop follows of the queue: how many requests of each type wait, and where a scan of the
    queue may start (no request before it waits; evictions move it back)."""

    queued: np.ndarray  # int64 per type
    scan_from: np.ndarray  # int64[1]


@compiled
def _cohorts(need: np.ndarray, types: np.ndarray, queue: WaitQueue, columns: RequestColumns,
             n: int) -> tuple[np.ndarray, np.ndarray]:
    """The oldest ``need[k]`` waiting requests of every type ``k`` (fewer where fewer wait), in queue order, and
    the last id taken of each type (-1 for none): a scan of the queue that stops once it has them."""
    expected = 0
    for k in range(len(need)):
        expected += min(need[k], queue.queued[k])
    found = np.empty(expected, dtype=np.int64)
    taken = np.zeros(len(need), dtype=np.int64)
    last = np.full(len(need), -1, dtype=np.int64)
    status = columns.status
    count, i, first = 0, queue.scan_from[0], -1
    while count < expected and i < n:
        if status[i] == WAITING:
            if first < 0:
                first = i
            k = types[i]
            if taken[k] < need[k]:
                taken[k] += 1
                last[k] = i
                found[count] = i
                count += 1
        i += 1
    if first >= 0:
        queue.scan_from[0] = first  # nothing before the first waiting id waits
    return found[:count], last


@compiled
def _following(last: np.ndarray, types: np.ndarray, queue: WaitQueue, columns: RequestColumns,
               n: int) -> np.ndarray:
    """The oldest ``LEND_SCAN`` waiting requests that are not in the cohorts (of type ``k``, the cohort holds the
    waiting ids up to ``last[k]``), in queue order."""
    found = np.empty(LEND_SCAN, dtype=np.int64)
    count, i = 0, queue.scan_from[0]
    while count < LEND_SCAN and i < n:
        if columns.status[i] == WAITING and i > last[types[i]]:
            found[count] = i
            count += 1
        i += 1
    return found[:count]


@compiled
def batch_profile(rule: WaitRule, running: np.ndarray, columns: RequestColumns, engine: EngineParams,
                  run: RunState) -> HeldProfile:
    """The running batch's projection (:class:`~baselines.lookahead.HeldProfile`, lengths known) that WAIT's
    memory-safe admissions test candidates against, kept through its compiled loop (empty without
    ``rule.memory_safe``)."""
    known = np.empty(0, dtype=np.int64)
    context, remaining = trajectories_of(running if rule.memory_safe else known, columns, known)
    return held_profile(context, remaining, engine.block_size, run.ints[ITERATIONS])


@compiled
def kept_profile(rule: WaitRule, held: HeldProfile, running: np.ndarray, columns: RequestColumns,
                 engine: EngineParams, run: RunState) -> HeldProfile:
    """The projection a compiled loop stopped with, ``held``, if it is the running batch's still (the engine has
    not iterated since: between a loop's calls nothing else moves the batch), else the batch's drawn anew
    (:func:`batch_profile`)."""
    if held.span[ORIGIN] == run.ints[ITERATIONS]:
        return held
    return batch_profile(rule, running, columns, engine, run)


@compiled
def _select(rule: WaitRule, gates: np.ndarray, types: np.ndarray, queue: WaitQueue, columns: RequestColumns,
            counters: np.ndarray, engine: EngineParams, held: HeldProfile) -> tuple[np.ndarray, HeldProfile]:
    """:meth:`WaitPolicy._select`'s admissions with the types ``gates`` let in, tested against the running batch's
    projection ``held`` (which comes back with the admissions in it)."""
    need = np.zeros(len(rule.n), dtype=np.int64)
    for k in range(len(need)):
        if gates[k] and queue.queued[k] > 0:
            need[k] = max(rule.n[k], 1)
    cohorts, last = _cohorts(need, types, queue, columns, counters[N])
    if not rule.memory_safe or counters[NUM_WAITING] == 0:
        return cohorts, held
    block_size, capacity, known = engine.block_size, engine.capacity_blocks, np.empty(0, dtype=np.int64)
    cohort_context, cohort_remaining = trajectories_of(cohorts, columns, known)
    count, held = held_fitting_prefix(held, cohort_context, cohort_remaining, block_size, capacity)
    admit = cohorts[:count]
    spare = capacity - rule.memory_blocks
    if not rule.lend_spare_memory or count < len(cohorts) or spare <= 0:
        return admit, held
    others = _following(last, types, queue, columns, counters[N])
    if len(others) == 0:
        return admit, held
    other_context, other_remaining = trajectories_of(others, columns, known)
    extra, held = held_fitting_prefix(held, other_context, other_remaining, block_size, spare)
    if extra == 0:
        return admit, held
    return np.sort(np.concatenate((admit, others[:extra]))), held


@compiled_inlined
def _decodes(rule: WaitRule, gates: np.ndarray, types: np.ndarray, running: np.ndarray,
             columns: RequestColumns) -> np.ndarray:
    """Who decodes: every running request with its context cached (measured); with ``rule.pausing``, up to ``n_j``
    running requests from each decode stage of every type ``j`` that ``gates`` let run, oldest first."""
    kv_tokens, context, prompt = columns.kv_tokens, columns.context, columns.prompt
    chosen = np.zeros(len(running), dtype=np.bool_)
    if not rule.pausing:
        for j in range(len(running)):
            chosen[j] = kv_tokens[running[j]] == context[running[j]]
        return running[chosen]
    stride = 1
    for i in running:
        if gates[types[i]]:
            stride = max(stride, context[i] - prompt[i] + 1)
    taken = np.zeros(len(rule.n) * stride, dtype=np.int64)  # per (type, stage)
    for j in range(len(running)):
        i = running[j]
        k = types[i]
        if gates[k]:
            group = k * stride + context[i] - prompt[i]
            if taken[group] < max(rule.n[k], 1):
                taken[group] += 1
                chosen[j] = True
    return running[chosen]


@compiled
def wait_decision(rule: WaitRule, types: np.ndarray, queue: WaitQueue, running: np.ndarray, columns: RequestColumns,
                  counters: np.ndarray, engine: EngineParams, held: HeldProfile
                  ) -> tuple[np.ndarray, np.ndarray, HeldProfile]:
    """:meth:`WaitPolicy.decide`, compiled: ``(decode, admit, held)``, ``held`` the running batch's projection
    with the admissions in it."""
    queued, n = queue.queued, rule.n
    gates = (queued >= n) & (n > 0)
    decode = _decodes(rule, gates, types, running, columns)
    if len(decode) == 0 and rule.drain_when_idle and rule.lend_spare_memory and not gates.any() and queued.any():
        gates = np.ones(len(n), dtype=np.bool_)  # nothing would run but what lending lets in: drain instead
    admit, held = _select(rule, gates, types, queue, columns, counters, engine, held)
    if len(decode) == 0 and len(admit) == 0 and rule.drain_when_idle and (queued.any() or len(running)):
        # Nothing would run: let every type in (up to n_j) rather than strand requests below a threshold.
        gates = np.ones(len(n), dtype=np.bool_)
        decode = _decodes(rule, gates, types, running, columns)
        admit, held = _select(rule, gates, types, queue, columns, counters, engine, held)
    return decode, admit, held


@compiled_inlined
def wait_begin(rule: WaitRule, run: RunState, columns: RequestColumns, arrivals: ChunkArrays, types: np.ndarray,
               queue: WaitQueue) -> int:
    """:func:`~llmsched_env.compiled_run.begin`, typing the requests it enqueues (the nearest of the rule's types,
    as :meth:`WaitPolicy._classify` types them) and counting them into their types' queues."""
    arrived_from = run.counters[N]
    stop = compiled_run.begin(run, columns, arrivals)
    for i in range(arrived_from, run.counters[N]):
        types[i] = nearest_type(columns.prompt[i], columns.output[i], rule.log_prompt, rule.log_output)
        queue.queued[types[i]] += 1
    return stop


@compiled
def wait_step(rule: WaitRule, types: np.ndarray, queue: WaitQueue, running: np.ndarray, run: RunState,
              columns: RequestColumns, arrivals: ChunkArrays, engine: EngineParams, held: HeldProfile
              ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, HeldProfile]:
    """WAIT's decision and its iteration, following the queue through the admissions and evictions and the
    running batch's projection (:func:`batch_profile`) through the iteration:
    ``(stop, running, decode, admit, chunk, held)`` (:func:`~llmsched_env.compiled_run.apply`'s stop).

    With lengths known, every running request decoding each iteration, a request's staircase in the projection
    never moves (:class:`~baselines.lookahead.HeldProfile`): the admissions the decision put in stay, and a
    finished request's staircase has run out. Anything else (an eviction, an admission the engine deferred, a
    refused decision) calls for the projection drawn anew."""
    decode, admit, held = wait_decision(rule, types, queue, running, columns, run.counters, engine, held)
    as_decided = True
    if rule.token_budget:
        budget = backlog_budget(rule.token_budget, run.counters[NUM_WAITING], rule.mean_prompt,
                                rule.drain_iterations)
        if rule.latency_order_weight > 0:
            admit = latency_order(admit, columns.arrival, columns.prompt, columns.context, columns.output,
                                  rule.latency_order_weight * run.reals[LAST_ITERATION + LAST_SECONDS])
        decode, admit, chunk, as_decided = stall_free_batch(decode, admit, running, columns.context,
                                                            columns.kv_tokens, budget)
    else:
        chunk = compiled_run.whole_prefills(admit, columns)
    stop, running, admitted, evicted, _ = compiled_run.apply(decode, admit, chunk, running, run, columns, arrivals,
                                                          engine)
    for i in admitted:
        queue.queued[types[i]] -= 1
    for i in evicted:
        queue.queued[types[i]] += 1
        queue.scan_from[0] = min(queue.scan_from[0], i)
    if rule.memory_safe:
        # A batch that is not the decision (a prefill in progress does not decode, an admission waits, a decode
        # pauses) moves staircases: the projection is drawn anew, as the Python rule draws it at every decision.
        if not as_decided or len(evicted) or len(admitted) != len(admit) or stop == INVALID_DECISION:
            held = batch_profile(rule, running, columns, engine, run)
        else:
            held_advance(held, run.ints[ITERATIONS])
    return stop, running, decode, admit, chunk, held


@compiled
def run_wait(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
             engine: EngineParams, rule: WaitRule, types: np.ndarray, queue: WaitQueue, held: HeldProfile
             ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, HeldProfile]:
    """:class:`WaitPolicy`'s compiled loop (see :data:`~llmsched_env.policy.CompiledLoop`), and the running batch's
    projection where it stopped. ``types`` holds every request's type (by id), ``queue`` the waiting counts per
    type, ``held`` the projection where the last call stopped (:func:`kept_profile`), all followed through the
    arrivals, admissions and evictions of each iteration. It runs on borrowed views of what the caller owns
    (:func:`~llmsched_env.compiled.borrowed`)."""
    return _wait_iterations(borrowed(run), running, borrowed(columns), borrowed(arrivals), borrowed(engine),
                            borrowed(rule), borrowed(types), borrowed(queue), held)


@compiled
def _wait_iterations(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                     engine: EngineParams, rule: WaitRule, types: np.ndarray, queue: WaitQueue, held: HeldProfile
                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, HeldProfile]:
    nothing = np.empty(0, dtype=np.int64)
    queue.scan_from[0] = max(queue.scan_from[0], run.ints[RETIRED])  # retired rows read as zeros
    held = kept_profile(rule, held, running, columns, engine, run)
    while True:
        stop = wait_begin(rule, run, columns, arrivals, types, queue)
        if stop != GO_ON:
            return stop, running, nothing, nothing, nothing, held
        stop, running, decode, admit, chunk, held = wait_step(rule, types, queue, running, run, columns, arrivals,
                                                              engine, held)
        if stop != GO_ON:
            return stop, running, decode, admit, chunk, held
