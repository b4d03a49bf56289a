"""Nested WAIT: threshold batching when output lengths are hidden (arXiv 2504.11320, DESIGN.md section 4).

The policy never reads output lengths: a request reveals its length only by finishing, or by
surviving a boundary. Segments cut the decode stages at boundaries ``b_1 < … < b_K``; segment ``k``
covers stages ``(b_{k-1}, b_k]`` (segment 1 starts with the prefill). A request that completes stage
``b_k`` without finishing *waits at the boundary* with its KV kept, to enter segment ``k + 1``.

Each iteration:

1. segment 1 is ready when ``n_1`` prompts wait; segment ``k >= 2`` when ``n_k`` requests wait at its
   boundary. Segments run as a *ready prefix*: segment ``k`` runs only if ``1..k-1`` run. A ready
   segment takes ``n_k`` entrants (oldest first); with the memory lookahead (item 4) it takes its whole
   boundary queue while the lookahead projection of everyone running fits in memory, since the
   requests held back keep their KV anyway and would only wait for the next ``n_k``.
2. cohorts in progress: with ``nested-wait-pausing`` (the paper's rule) a running segment advances up to
   ``n_k`` requests from each of its stages, and everything else pauses, KV kept (with segment 1 not
   ready nothing runs); with ``nested-wait`` (default, the analogue of the variant the authors
   measured for WAIT) every request in progress decodes every iteration and only entries are gated.
3. **overflow guard** (ours; the paper leaves it to its safety buffer): if the chosen batch would
   exceed capacity, no new prompt is admitted and the boundary queues move on whatever their length
   (every non-empty one up to the first empty one): finishing requests is what frees memory, holding
   them at a gate only keeps their KV. If
   that still does not fit, the shallowest segments pause first (their requests are furthest from
   finishing); if not even the deepest fits, the engine's eviction rule (newest first, recompute)
   frees memory, so the system cannot deadlock.

4. **memory lookahead** (ours, ``lookahead``, on for ``nested-wait``): new prompts are admitted only
   while the projected peak KV of everyone running plus them fits, each request's remaining output
   taken at the 90th percentile of its residual length given what it has decoded
   (:func:`baselines.lookahead.residual_quantiles`). Exact for a single output length, conservative by
   the spread of the distribution otherwise; it never reads a request's own length.

5. **lending spare memory** (ours, ``lend_spare_memory``, on for ``nested-wait``): while the lookahead
   projection of everyone running stays within the capacity less a reserve (the fluid optimum's memory
   ``M*`` of the offered load, or ``M^π`` if smaller: with heavy tails ``M^π``, every stage full,
   over-counts by far), every gate opens and prompts are admitted as far as that projection allows:
   holding requests at gates costs latency for nothing when memory is plentiful.

6. **drain** (ours, not in the paper; ``drain_when_idle``, on for ``nested-wait``, off for
   ``nested-wait-pausing``): when the rule would run nothing although requests wait or hold KV, every
   gate opens for whoever is behind it. Otherwise, once arrivals stop (the end of a trace), requests
   below a threshold would be stranded, with their KV, for ever. With nothing running and segment 1
   shut, the drain decides before lending: a spare room for one request would otherwise admit one at a
   time, the batch never idle for the drain. The paper's rule pauses cohorts exactly when segment 1 is
   not ready, so it keeps its rule.

7. **adaptive margin** (ours, ``nested-wait-margin``): the lookahead's quantile and the lending reserve are
   safety margins against overflow, and what they cost depends on the tail of the length distribution: on
   heavy tails a request projected at the 90th percentile of its residual holds back memory it rarely uses.
   The margin moves between levels (``lookahead.MARGIN_QUANTILES`` × ``MARGIN_RESERVES``, from the median
   with no reserve to today's 0.9 with the whole reserve, where it starts) on the eviction risk actually
   seen: ``calm_decisions`` decisions in a row with requests waiting and no eviction step it down a level,
   an eviction steps it up a level and bars the level that evicted for the rest of the run
   (:func:`adapt_lookahead`, one function for the Python and the compiled rule).

Requests longer than ``b_K`` (outside the distribution the thresholds were sized on) continue in the
last segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from baselines.cohorts import first_per_group
from baselines.lookahead import (
    LEND_SCAN,
    ORIGIN,
    BatchProjection,
    HeldProfile,
    carry_batch,
    fits_lookahead,
    fitting_prefix,
    held_fitting_count,
    held_peak,
    no_projection,
    project_batch,
    redraw,
    trajectories_of,
)
from baselines.stall_free import backlog_budget, check_batching, stall_free, stall_free_batch
from baselines.thresholds import NestedWaitThresholds
from llmsched_env import compiled_run
from llmsched_env.compiled import borrowed, compiled, compiled_inlined
from llmsched_env.compiled_run import EVICTIONS, GO_ON, ITERATIONS, ChunkArrays, RunState, oldest_waiting
from llmsched_env.engine import IDLE, Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.iteration import NUM_WAITING, USED_BLOCKS, EngineParams
from llmsched_env.kv_cache import projected_peak_blocks
from llmsched_env.policy import CompiledLoop
from llmsched_env.request_table import RequestColumns

Variant = Literal["measured", "paper"]


@dataclass
class NestedWaitPolicy:
    """Nested WAIT; see the module docstring for the rule and its two variants."""

    thresholds: NestedWaitThresholds
    variant: Variant = "measured"
    name: str = "nested-wait"
    drain_when_idle: bool = True
    lookahead: np.ndarray | None = field(default=None, repr=False)  # residual_quantiles per decoded count
    lend_spare_memory: bool = False
    # The adaptive margin (item 7 of the module docstring): lookahead tables from the least to the most cautious
    # quantile, one row each (None: the fixed `lookahead`); the policy starts at the last.
    lookahead_levels: np.ndarray | None = field(default=None, repr=False)
    reserve_levels: tuple[float, ...] = ()  # per level, the share of `reserve_tokens` kept from lending (default 1)
    calm_decisions: int = 200  # eviction-free decisions before the margin steps down a level
    reserve_tokens: float | None = None  # kept back from lending (default: the pipelines' memory M^π)
    # 0: every admission prefilled whole in one iteration (the rule as written); > 0: the rule's decisions batched
    # stall-free within this many tokens per iteration (baselines.stall_free; Sarathi's 2048).
    token_budget: int = 0
    # > 0: the budget follows the queue, raised to prefill the waiting prompts within this many iterations
    # (baselines.stall_free.backlog_budget, at the thresholds' mean prompt); 0: the budget is fixed.
    drain_iterations: int = 0
    guard_activations: int = field(default=0, init=False)  # iterations where the overflow guard acted
    guard_fallbacks: int = field(default=0, init=False)  # iterations where nothing fit and the engine evicted

    def reset(self, engine: Engine) -> None:
        if self.variant not in ("measured", "paper"):
            raise ConfigError(f"Nested WAIT variant must be 'measured' or 'paper', got {self.variant!r}")
        check_batching(self.token_budget, self.drain_iterations)
        self.guard_activations = self.guard_fallbacks = 0
        self._capacity_blocks, self._block_size = engine.capacity_blocks, engine.block_size
        if self.lookahead_levels is not None:
            if self.variant != "measured" or len(self.lookahead_levels) == 0 or self.calm_decisions < 1:
                raise ConfigError("an adaptive lookahead margin needs the measured variant, at least one level and "
                                  f"calm_decisions >= 1, got {self.variant!r}, {len(self.lookahead_levels)} levels, "
                                  f"{self.calm_decisions}")
            if self.reserve_levels and len(self.reserve_levels) != len(self.lookahead_levels):
                raise ConfigError(f"{len(self.reserve_levels)} reserve levels for {len(self.lookahead_levels)} "
                                  "lookahead levels")
            self.lookahead = np.array(self.lookahead_levels[-1], dtype=np.int64)  # the most cautious to start
        # The Python rule's margin moves by the compiled rule's steps (adapt_lookahead), on a rule of its own.
        self._margin_rule = self.compiled_rule() if self.lookahead_levels is not None else None
        self._margin = self.compiled_margin()
        self._last_batch = np.empty(0, dtype=np.int64)  # running or admitted at the last decision
        self._last_evictions = np.empty(0, dtype=np.int64)  # and how often each had been evicted then

    @property
    def iteration_budget(self) -> int:
        """The token budget each iteration is batched within now (0: whole prefills)."""
        return self.token_budget

    @property
    def lookahead_level(self) -> int:
        """The adaptive margin's level now (an index of ``lookahead_levels``; 0 without one)."""
        return int(self._margin.state[LEVEL])

    def compiled_loop(self) -> CompiledLoop | None:
        """This policy's rule compiled (:func:`run_nested_wait`, either variant): the same decisions as
        :meth:`decide`, bit for bit, and the same guard counts. Subclasses that change the rule between iterations
        have their own (the adaptive policy's)."""
        if type(self) is not NestedWaitPolicy:
            return None
        rule, guard, kept = self.compiled_rule(), np.zeros(2, dtype=np.int64), [no_projection()]
        self._margin = self.compiled_margin()

        def loop(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                 engine: EngineParams) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            *stop, kept[0] = run_nested_wait(run, running, columns, arrivals, engine, rule, guard, kept[0],
                                             self._margin)
            self.count_guard(guard)
            return tuple(stop)  # type: ignore[return-value]
        return loop

    def _projects(self) -> bool:
        """Whether the rule projects memory ahead (a lookahead, the measured variant)."""
        return self.lookahead is not None and self.variant == "measured"

    def compiled_rule(self) -> "NestedWaitRule":
        """The current thresholds, lookahead and settings, as the compiled rule takes them."""
        return NestedWaitRule(np.ascontiguousarray(self.thresholds.boundaries, dtype=np.int64),
                              segment_codes(self.thresholds.boundaries),
                              np.ascontiguousarray(self.thresholds.n, dtype=np.int64),
                              np.array(self.lookahead if self._projects() else [], dtype=np.int64),  # a copy: it moves
                              np.array([self._spare_blocks(1.0)], dtype=np.int64), self.drain_when_idle,
                              self.variant == "paper", self.iteration_budget, self.drain_iterations,
                              float(self.thresholds.prompt_len))

    def compiled_margin(self) -> "Margin":
        """The adaptive margin as the compiled rule follows it, at the start of a run (no levels without one)."""
        levels = self.lookahead_levels if self._projects() and self.lookahead_levels is not None else np.empty((0, 0))
        shares = self.reserve_levels or (1.0,) * len(levels)
        state = np.array([max(len(levels) - 1, 0), 0, 0, 0], dtype=np.int64)
        return Margin(np.ascontiguousarray(levels, dtype=np.int64),
                      np.array([self._spare_blocks(share) for share in shares], dtype=np.int64),
                      int(self.calm_decisions), state)

    def _spare_blocks(self, share: float) -> int:
        """Lending's limit: the capacity less ``share`` of the reserve, in blocks (-1: no lending)."""
        if not (self.lend_spare_memory and self._projects()):
            return -1
        reserve = share * (self.thresholds.memory_tokens if self.reserve_tokens is None else self.reserve_tokens)
        return int(lending_limit(float(reserve), self._capacity_blocks, self._block_size))

    def count_guard(self, guard: np.ndarray) -> None:
        """Add the guard's activations and fallbacks a compiled loop counted into ``guard`` (and clear it)."""
        self.guard_activations += int(guard[0])
        self.guard_fallbacks += int(guard[1])
        guard[:] = 0

    def decide(self, state: SchedulerState) -> Decision:
        if self._margin_rule is not None:
            evicted = bool(np.any(state.num_evictions[self._last_batch] > self._last_evictions))
            adapt_lookahead(self._margin_rule, self._margin, int(self._margin.state[SEEN]) + evicted,
                            state.num_waiting)
            if len(self._margin.levels):  # else no lookahead yet (the adaptive policy's before its first solve)
                self.lookahead = self._margin_rule.residual
        budget = backlog_budget(self.iteration_budget, state.num_waiting, float(self.thresholds.prompt_len),
                                self.drain_iterations)
        decision = stall_free(self._decide(state), state, budget)
        if self._margin_rule is not None:
            self._last_batch = np.concatenate([state.running, decision.prefill]).astype(np.int64)
            self._last_evictions = state.num_evictions[self._last_batch].copy()
        return decision

    def _decide(self, state: SchedulerState) -> Decision:
        bounds, n = self.thresholds.boundaries, self.thresholds.n
        segments = len(bounds)
        running = state.running
        decoded = state.context_len[running] - state.prompt_len[running]  # never the output length
        codes = segment_codes(bounds)
        code = codes[np.minimum(decoded, len(codes) - 1)]
        at_boundary, segment = code % 2 == 1, code // 2
        waiting = state.oldest_waiting(max(int(n[0]), LEND_SCAN))  # all an iteration can admit
        entrants = np.bincount(segment[at_boundary], minlength=segments)
        entrants[0] = state.num_waiting
        peak = self._projected_peak(state) if self._projects() else None
        # A ready gate lets its whole boundary queue through while the lookahead says the batch fits: the
        # requests behind it hold their KV either way, and making them wait for the next n_k only delays them.
        whole_queues = peak is not None and peak <= state.capacity_blocks
        decision = self._select(state, running, decoded, at_boundary, segment, waiting, entrants >= n,
                                whole_queues=whole_queues)
        # With nothing running and segment 1 shut, the drain below decides, not lending: a spare room for one
        # request would admit one at a time, the batch never idle for the drain.
        drains_first = self.drain_when_idle and len(running) == 0 and 0 < state.num_waiting < n[0]
        if self.lend_spare_memory and peak is not None and not drains_first:
            spare = int(self._margin_rule.spare[0]) if self._margin_rule is not None else self._spare_blocks(1.0)
            if spare > 0 and peak <= spare:
                # Memory is plentiful: every gate opens, admissions bounded by the lookahead within the spare;
                # lending only ever adds to what the thresholds would admit.
                lent = self._select(state, running, decoded, at_boundary, segment, waiting, np.ones(segments, bool),
                                    lend_within=spare)
                if lent is not None and (decision is None or len(lent.prefill) >= len(decision.prefill)):
                    decision = lent
        if decision is None:
            # Memory pressure: admit nothing new and let every boundary queue move on toward completion,
            # which is what frees memory, instead of holding requests (and their KV) at the gates.
            self.guard_activations += 1
            decision = self._select(state, running, decoded, at_boundary, segment, waiting[:0], entrants > 0,
                                    under_pressure=True)
            assert decision is not None
        if decision.is_idle and self.drain_when_idle and (state.num_waiting or len(running)):
            # Nothing would run: open every gate (a gate with nobody behind it stays shut) rather than strand
            # requests, with their KV, until enough new arrivals come, which may be never.
            decision = self._select(state, running, decoded, at_boundary, segment, waiting, np.ones(segments, bool),
                                    under_pressure=True)
            assert decision is not None
        return decision

    def _select(self, state: SchedulerState, running: np.ndarray, decoded: np.ndarray, at_boundary: np.ndarray,
                segment: np.ndarray, waiting: np.ndarray, ready: np.ndarray,
                under_pressure: bool = False, lend_within: int | None = None,
                whole_queues: bool = False) -> Decision | None:
        """The batch for gates ``ready``; ``None`` if it would not fit in memory (unless ``under_pressure``,
        where the shallowest segments are trimmed first, and the engine's eviction rule is the last resort).
        An open gate takes ``n_k`` from its boundary queue, or all of it with ``whole_queues`` or when lending."""
        n = self.thresholds.n
        segments = len(n)
        prefix = segments if ready.all() else int(np.argmin(ready))  # segments whose entries open
        active = segments if self.variant == "measured" else prefix  # segments whose cohorts advance

        # Entries: n_k (or all) from each open segment's boundary queue (oldest first), n_1 new prompts.
        chosen = np.zeros(len(running), dtype=bool)
        entering = at_boundary & (segment < prefix)
        whole = whole_queues or lend_within is not None
        chosen[entering] = True if whole else first_per_group(segment[entering], n[segment[entering]])
        progressing = ~at_boundary & (segment < active)
        if self.variant == "measured":
            chosen[progressing] = True
        else:
            chosen[progressing] = first_per_group(decoded[progressing], n[segment[progressing]])
        admit = waiting[: n[0] if lend_within is None else max(int(n[0]), LEND_SCAN)] if prefix > 0 else waiting[:0]
        if len(admit) and self.lookahead is not None and self.variant == "measured":
            admit = self._within_lookahead(state, admit, state.capacity_blocks if lend_within is None else lend_within)

        # KV growth by segment: one block for each request that crosses a block edge, plus the admissions.
        growth = np.bincount(segment[chosen], weights=(state.kv_tokens[running[chosen]] % state.block_size == 0),
                             minlength=segments)
        room = state.capacity_blocks - state.used_blocks - float(np.sum(state.blocks_for(state.context_len[admit])))
        if growth.sum() > room:
            if not under_pressure:
                return None
            # Keep the deepest segments (closest to finishing); trim from segment 1 upward.
            kept_from = int(np.searchsorted(-np.cumsum(growth[::-1])[::-1], -room, side="left"))
            if kept_from >= segments:
                self.guard_fallbacks += 1  # not even the deepest fits: the engine evicts (newest first)
            else:
                chosen &= segment >= kept_from
        decode = running[chosen]
        if len(decode) == 0 and len(admit) == 0:
            return IDLE
        return Decision(decode=decode, prefill=admit)

    def _trajectories(self, state: SchedulerState, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(context, remaining)`` of ``ids`` with each remaining output at the lookahead quantile of its residual
        length given what it has decoded. Running requests (gated ones too: they keep their KV) hold their
        context; a waiting one (an evicted one resumes past its prompt) holds it at its prefill, one iteration
        more (as :func:`baselines.lookahead.trajectories`)."""
        residual = self.lookahead
        assert residual is not None
        context = state.context_len[ids].astype(np.int64)
        remaining = residual[np.minimum(context - state.prompt_len[ids], len(residual) - 1)]
        waiting = state.kv_tokens[ids] == 0
        return np.where(waiting, context - 1, context), np.where(waiting, remaining + 1, remaining)

    def _projected_peak(self, state: SchedulerState) -> int:
        return projected_peak_blocks(*self._trajectories(state, state.running), state.block_size)

    def _within_lookahead(self, state: SchedulerState, admit: np.ndarray, limit_blocks: int) -> np.ndarray:
        """The queue-order prefix of ``admit`` whose projected peak stays within ``limit_blocks``."""
        context, remaining = self._trajectories(state, state.running)
        count = fitting_prefix(context, remaining, *self._trajectories(state, admit), state.block_size, limit_blocks)
        return admit[:count]


def segment_codes(boundaries: np.ndarray) -> np.ndarray:
    """Where a running request stands, by the tokens ``d`` it has decoded: ``2·k + b``, with ``k`` the segment it
    is in (or enters) and ``b`` 1 where it waits at that segment's entry boundary (``d`` one of ``b_1 … b_{K-1}``).
    The last entry stands for every larger ``d``: past ``b_{K-1}`` every request is in the last segment."""
    return segment_code_table(np.ascontiguousarray(boundaries, dtype=np.int64))


@compiled
def segment_code_table(bounds: np.ndarray) -> np.ndarray:
    """:func:`segment_codes` of int64 ``bounds``."""
    segments = len(bounds)
    codes = np.empty(bounds[-2] + 2 if segments > 1 else 1, dtype=np.int64)
    for d in range(len(codes)):
        first = np.searchsorted(bounds, d, side="left")  # the first boundary at or past d
        if first < segments - 1 and bounds[first] == d:  # waits at the entry of segment first + 1
            codes[d] = 2 * (first + 1) + 1
        else:
            codes[d] = 2 * min(np.searchsorted(bounds, d, side="right"), segments - 1)
    return codes


@compiled
def lending_limit(reserve_tokens: float, capacity_blocks: int, block_size: int) -> int:
    """The blocks lending may fill: the capacity less ``reserve_tokens`` (at most all of it), rounded up to
    blocks."""
    return capacity_blocks - int(math.ceil(min(reserve_tokens, capacity_blocks * block_size) / block_size))


class NestedWaitRule(NamedTuple):
    """Nested WAIT's rule as its compiled loop takes it."""

    boundaries: np.ndarray  # int64 b_1 < … < b_K
    codes: np.ndarray  # int64 segment_codes(boundaries): segment and boundary by decoded count
    n: np.ndarray  # int64 threshold per segment
    residual: np.ndarray  # int64 lookahead: remaining output assumed per decoded count (empty: no lookahead)
    spare: np.ndarray  # int64[1]: lending's limit now (capacity less the reserve); -1 without lending
    drain_when_idle: bool
    pausing: bool  # the paper's variant: only the ready prefix's cohorts advance, n_k per stage
    token_budget: int  # 0: whole prefills; else stall-free batching within this many tokens (baselines.stall_free)
    drain_iterations: int  # > 0: the budget follows the queue (baselines.stall_free.backlog_budget)
    mean_prompt: float  # the thresholds' mean prompt, what a waiting request is taken to bring


LEVEL, FLOOR, CALM, SEEN = range(4)  # indices of Margin.state


class Margin(NamedTuple):
    """Nested WAIT's adaptive margin (item 7) as its compiled rule follows it. It moves the rule's lookahead
    (``residual``) and lending limit (``spare``), in place, between its levels."""

    levels: np.ndarray  # int64 (levels, len(residual)): the lookahead tables, boldest first (no rows: none)
    spares: np.ndarray  # int64 per level: lending's limit
    calm_decisions: int  # decisions in a row with requests waiting and no eviction before it steps down a level
    state: np.ndarray  # int64, indexed by LEVEL (now), FLOOR (the lowest not barred), CALM (the decisions so
    # counted), SEEN (the evictions seen); it starts at the most cautious level, nothing barred, counted or seen


@compiled_inlined
def adapt_lookahead(rule: NestedWaitRule, margin: Margin, evictions: int, waiting: int) -> bool:
    """The adaptive margin, before a decision, given the engine's ``evictions`` so far and the requests
    ``waiting``: an eviction since the last decision steps it up a level and bars the level that evicted for the
    rest of the run; ``margin.calm_decisions`` decisions in a row with requests waiting and no eviction step it
    down a level, to the lowest not barred. The level's lookahead and lending limit are copied into the rule.
    Returns whether it stepped up (trajectories grew: a kept projection may be too short for them)."""
    state = margin.state
    if len(margin.levels) == 0:  # no levels (yet: the adaptive policy's before its first solve): count evictions
        state[SEEN] = max(state[SEEN], evictions)
        return False
    level = state[LEVEL]
    if evictions > state[SEEN]:
        state[SEEN] = evictions
        state[FLOOR] = min(level + 1, len(margin.levels) - 1)
        state[CALM] = 0
        moved = state[FLOOR]
    else:
        state[CALM] += waiting > 0  # caution costs only while requests wait
        if state[CALM] < margin.calm_decisions or level <= state[FLOOR]:
            return False
        state[CALM] = 0
        moved = level - 1
    if moved == level:
        return False
    state[LEVEL] = moved
    rule.residual[:] = margin.levels[moved]
    rule.spare[0] = margin.spares[moved]
    return moved > level


class RunningSegments(NamedTuple):
    """The running requests as Nested WAIT's compiled rule sees them."""

    ids: np.ndarray  # int64 running ids, in the engine's order
    codes: np.ndarray  # int64: its segment_codes entry (``code >> 1`` the segment it is in or enters, ``code & 1``
    # whether it waits at that segment's boundary for the gate)
    decoded: np.ndarray  # int64: the tokens it has decoded (the paper's variant only; empty otherwise)
    queued: np.ndarray  # int64 per segment: how many wait at its entry boundary (0 for segment 1)
    stages: int  # 1 + the most any has decoded (the paper's variant counts per decoded count)
    peak: int  # the batch's projected peak in blocks (lookahead.held_peak; 0 without a lookahead)


class Selection(NamedTuple):
    """One of :meth:`NestedWaitPolicy._select`'s batches, compiled: which decodes (positions in the running batch,
    drawn by :func:`_selected_decodes` only for the batch that is kept), the admissions, and whether it fits."""

    fits: bool
    admit: np.ndarray  # int64 ids, in queue order
    prefix: int  # segments whose entries open
    whole: bool  # an open gate takes its whole boundary queue
    kept_from: int  # segments below it are trimmed (0: none)
    decodes: int  # how many decode
    positions: np.ndarray  # int64 positions of the decodes before trimming, when counting them needed a pass
    counted: bool  # whether ``positions`` holds them
    fell_back: bool  # not even the deepest segment fits: the engine evicts


@compiled
def batch_projection(rule: NestedWaitRule, running: np.ndarray, columns: RequestColumns, engine: EngineParams,
                     run: RunState) -> BatchProjection:
    """The running batch's projection at the lookahead's lengths (:class:`~baselines.lookahead.BatchProjection`)
    that Nested WAIT's admissions are tested against, kept through its compiled loop (empty without a
    lookahead)."""
    projects = len(rule.residual) > 0 and not rule.pausing
    return project_batch(running if projects else running[:0], columns, rule.residual, engine.block_size,
                         run.ints[ITERATIONS])


@compiled
def kept_projection(rule: NestedWaitRule, projection: BatchProjection, running: np.ndarray, columns: RequestColumns,
                    engine: EngineParams, run: RunState) -> BatchProjection:
    """The projection a compiled loop stopped with, if it is the running batch's still (the engine has not iterated
    since: between a loop's calls nothing else moves the batch) and the rule's lookahead fits in it, else the
    batch's drawn anew (:func:`batch_projection`). One drawn at another lookahead is kept: the decision redraws
    each staircase whose projected end moved as it reads it (:func:`nested_wait_decision`), which costs what the
    lookahead changed, not a new projection of the whole batch."""
    if (projection.held.span[ORIGIN] == run.ints[ITERATIONS] and len(projection.base) == len(running)
            and fits_lookahead(projection.held, rule.residual)):
        return projection
    return batch_projection(rule, running, columns, engine, run)


@compiled
def _chosen(rule: NestedWaitRule, batch: RunningSegments, prefix: int, whole: bool, kept_from: int,
            positions: bool) -> np.ndarray:
    """The requests that decode with gates ``[0, prefix)`` open, in the engine's order: their running ids, or
    their positions in the running batch if ``positions``. An open gate lets in ``n_k`` from its boundary queue
    (oldest first), or all of it if ``whole``; cohorts in progress all decode (measured), or up to ``n_k`` of each
    stage within the ready prefix (the paper's); segments below ``kept_from`` are trimmed."""
    n, codes, decoded = rule.n, batch.codes, batch.decoded
    active = prefix if rule.pausing else len(n)  # segments whose cohorts advance
    entered = np.zeros(len(n), dtype=np.int64)
    at_stage = np.zeros(batch.stages if rule.pausing else 1, dtype=np.int64)  # the paper's: per decoded count
    chosen = np.empty(len(batch.ids), dtype=np.int64)
    count = 0
    for j in range(len(batch.ids)):
        k = codes[j] >> 1
        if codes[j] & 1:
            if k < prefix and (whole or entered[k] < n[k]):
                entered[k] += 1
            else:
                continue
        elif k >= active:
            continue
        elif rule.pausing:
            if at_stage[decoded[j]] >= n[k]:
                continue
            at_stage[decoded[j]] += 1
        if k >= kept_from:
            chosen[count] = j if positions else batch.ids[j]
            count += 1
    return chosen[:count]


@compiled_inlined
def _selected_decodes(batch: RunningSegments, rule: NestedWaitRule, selection: Selection) -> np.ndarray:
    """The running ids that decode in ``selection``, in the engine's order."""
    if selection.decodes == len(batch.ids) and selection.kept_from == 0:
        return batch.ids  # all of them (the common case: nothing waits at a shut gate); nothing writes into either
    if not selection.counted:
        return _chosen(rule, batch, selection.prefix, selection.whole, selection.kept_from, False)
    decode = np.empty(len(selection.positions), dtype=np.int64)
    count = 0
    for j in selection.positions:
        if batch.codes[j] >> 1 >= selection.kept_from:
            decode[count] = batch.ids[j]
            count += 1
    return decode[:count]


@compiled
def _nested_select(rule: NestedWaitRule, batch: RunningSegments, waiting: np.ndarray, prefix: int, mode: int,
                   columns: RequestColumns, counters: np.ndarray, engine: EngineParams,
                   held: HeldProfile) -> Selection:
    """:meth:`NestedWaitPolicy._select` with the gates of segments ``[0, prefix)`` open (the ready prefix:
    :func:`_ready_prefix`). ``mode`` is the call's keywords: 0 thresholds only, 1 ``whole_queues``, 2 lending within
    ``rule.spare[0]``, 3 ``under_pressure``; ``held`` the running batch's projection (:func:`batch_projection`), left
    as it was. Measured, the decodes are counted from the segments' tallies; a pass over the batch is made only
    where the paper's per-stage rule or the memory check needs one."""
    n = rule.n
    segments = len(n)
    whole = mode == 1 or mode == 2
    positions, counted = batch.ids[:0], False
    if rule.pausing:
        positions, counted = _chosen(rule, batch, prefix, whole, 0, True), True
        decoding = len(positions)
    else:
        decoding = len(batch.ids)  # every request in progress, and each open gate's entrants
        for k in range(segments):
            decoding -= batch.queued[k]
            if k < prefix:
                decoding += batch.queued[k] if whole else min(batch.queued[k], n[k])
    admit = waiting[:0]
    if prefix > 0:
        admit = waiting[:n[0] if mode != 2 else max(n[0], LEND_SCAN)]
    block_size, capacity = engine.block_size, engine.capacity_blocks
    if len(admit) and len(rule.residual) and not rule.pausing:
        admit_context, admit_remaining = trajectories_of(admit, columns, rule.residual)
        admit = admit[:held_fitting_count(held, batch.peak, admit_context, admit_remaining, block_size,
                                          rule.spare[0] if mode == 2 else capacity)]
    room = capacity - counters[USED_BLOCKS]
    for i in admit:
        room -= -(-columns.context[i] // block_size)
    if decoding <= room:  # each decode grows by at most one block: it fits (no need to count which grow)
        return Selection(True, admit, prefix, whole, 0, decoding, positions, counted, False)
    if not counted:
        positions, counted = _chosen(rule, batch, prefix, whole, 0, True), True
    growth = np.zeros(segments, dtype=np.int64)
    for j in positions:
        if columns.kv_tokens[batch.ids[j]] % block_size == 0:
            growth[batch.codes[j] >> 1] += 1
    if growth.sum() <= room:
        return Selection(True, admit, prefix, whole, 0, decoding, positions, counted, False)
    if mode != 3:
        return Selection(False, admit, prefix, whole, 0, decoding, positions, counted, False)
    # Keep the deepest segments (closest to finishing); trim from segment 1 upward.
    kept_from, suffix = segments, 0
    for k in range(segments - 1, -1, -1):
        suffix += growth[k]
        if suffix > room:
            break
        kept_from = k
    if kept_from >= segments:  # not even the deepest fits: the engine evicts (newest first)
        return Selection(True, admit, prefix, whole, 0, decoding, positions, counted, True)
    kept = 0
    for j in positions:
        kept += batch.codes[j] >> 1 >= kept_from
    return Selection(True, admit, prefix, whole, kept_from, kept, positions, counted, False)


@compiled_inlined
def _ready_prefix(queued: np.ndarray, num_waiting: int, n: np.ndarray, gated: bool) -> int:
    """How many segments, from the first, have their gates open: each needs ``n_k`` entrants (``gated``) or one, its
    entrants being its boundary queue (``queued[k]``), and the waiting prompts for segment 1."""
    for k in range(len(n)):
        entrants = num_waiting if k == 0 else queued[k]
        if entrants < (n[k] if gated else 1):
            return k
    return len(n)


@compiled
def nested_wait_decision(rule: NestedWaitRule, running: np.ndarray, columns: RequestColumns, counters: np.ndarray,
                         engine: EngineParams, guard: np.ndarray,
                         projection: BatchProjection) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`NestedWaitPolicy.decide`, compiled: ``(decode, admit)``; the guard's activations and fallbacks are
    added to ``guard``; ``projection`` is the running batch's (:func:`batch_projection`, aligned with
    ``running``), brought up to date here as the running requests are sorted into segments."""
    codes, n, residual = rule.codes, rule.n, rule.residual
    segments = len(n)
    standing = np.empty(len(running), dtype=np.int64)  # each request's code
    decoded = np.empty(len(running), dtype=np.int64) if rule.pausing else running[:0]  # the paper's counts by stage
    queued = np.zeros(segments, dtype=np.int64)
    projects = len(residual) > 0 and not rule.pausing
    held, base, end = projection.held, projection.base, projection.end
    origin = held.span[ORIGIN]
    stages, beyond, longest = 1, len(codes) - 1, len(residual) - 1
    for j in range(len(running)):
        i = running[j]
        context = columns.context[i]
        d = context - columns.prompt[i]  # never the output length
        if projects:
            # Its trajectory (lookahead.trajectory of a request holding its KV, as every running one does) is as
            # drawn unless it did not decode, or its projected end jumped.
            remaining = residual[min(d, longest)]
            if context - origin != base[j] or origin + remaining != end[j]:
                redraw(projection, j, context, remaining, engine.block_size)
        code = codes[min(d, beyond)]
        standing[j] = code
        if code & 1:
            queued[code >> 1] += 1
        if rule.pausing:
            decoded[j] = d
            stages = max(stages, d + 1)
    waiting = oldest_waiting(counters, columns.status, n[0])  # all but lending can admit
    peak = held_peak(held) if projects else 0
    batch = RunningSegments(running, standing, decoded, queued, stages, peak)
    open_gates = _ready_prefix(queued, counters[NUM_WAITING], n, True)  # the thresholds' ready prefix
    mode = 1 if projects and peak <= engine.capacity_blocks else 0
    drains_first = rule.drain_when_idle and len(running) == 0 and 0 < counters[NUM_WAITING] < n[0]
    if projects and rule.spare[0] > 0 and peak <= rule.spare[0] and not drains_first:
        # Memory is plentiful: every gate opens, admissions bounded by the lookahead within the spare. Lending
        # is kept when it fits and admits at least what the thresholds would; they admit at most n_1 of the
        # waiting prompts, none with segment 1 shut, so they are tried only when it admits fewer.
        lendable = oldest_waiting(counters, columns.status, max(n[0], LEND_SCAN))
        chosen = _nested_select(rule, batch, lendable, segments, 2, columns, counters, engine, held)
        if not chosen.fits or len(chosen.admit) < (min(n[0], len(waiting)) if open_gates > 0 else 0):
            gated = _nested_select(rule, batch, waiting, open_gates, mode, columns, counters, engine, held)
            if not chosen.fits or (gated.fits and len(gated.admit) > len(chosen.admit)):
                chosen = gated
    else:
        chosen = _nested_select(rule, batch, waiting, open_gates, mode, columns, counters, engine, held)
    if not chosen.fits:
        # Memory pressure: admit nothing new and let every boundary queue move on toward completion.
        guard[0] += 1
        chosen = _nested_select(rule, batch, waiting[:0], _ready_prefix(queued, counters[NUM_WAITING], n, False), 3,
                                columns, counters, engine, held)
        guard[1] += chosen.fell_back
    if chosen.decodes == 0 and len(chosen.admit) == 0 and rule.drain_when_idle and (counters[NUM_WAITING]
                                                                                     or len(running)):
        # Nothing would run: open every gate rather than strand requests, with their KV.
        chosen = _nested_select(rule, batch, waiting, segments, 3, columns, counters, engine, held)
        guard[1] += chosen.fell_back
    return _selected_decodes(batch, rule, chosen), chosen.admit


@compiled
def nested_wait_step(rule: NestedWaitRule, guard: np.ndarray, running: np.ndarray, run: RunState,
                     columns: RequestColumns, arrivals: ChunkArrays, engine: EngineParams, projection: BatchProjection,
                     margin: Margin
                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, BatchProjection]:
    """Nested WAIT's decision and its iteration: ``(stop, running, decode, admit, chunk, finished, projection)``
    (:func:`~llmsched_env.compiled_run.apply`'s stop, the requests that finished, and the running batch's
    projection followed through the iteration)."""
    if adapt_lookahead(rule, margin, run.ints[EVICTIONS], run.counters[NUM_WAITING]):
        projection = kept_projection(rule, projection, running, columns, engine, run)  # anew if it is too short
    # The decision redraws staircases in place and keeps nothing of the projection: it reads it borrowed (the
    # profile's arrays are passed at every call it makes).
    decode, admit = nested_wait_decision(rule, running, columns, run.counters, engine, guard, borrowed(projection))
    if rule.token_budget:
        budget = backlog_budget(rule.token_budget, run.counters[NUM_WAITING], rule.mean_prompt,
                                rule.drain_iterations)
        decode, admit, chunk, _ = stall_free_batch(decode, admit, running, columns.context, columns.kv_tokens, budget)
    else:
        chunk = compiled_run.whole_prefills(admit, columns)
    before = running
    stop, running, _, _, finished = compiled_run.apply(decode, admit, chunk, running, run, columns, arrivals, engine)
    if len(rule.residual) and not rule.pausing:
        projection = carry_batch(projection, before, running, columns, rule.residual, engine.block_size,
                                 run.ints[ITERATIONS])
    return stop, running, decode, admit, chunk, finished, projection


@compiled
def run_nested_wait(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                    engine: EngineParams, rule: NestedWaitRule, guard: np.ndarray, projection: BatchProjection,
                    margin: Margin) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, BatchProjection]:
    """:class:`NestedWaitPolicy`'s compiled loop (see :data:`~llmsched_env.policy.CompiledLoop`), and the running
    batch's projection where it stopped; ``projection`` is where the last call stopped (:func:`kept_projection`). It
    runs on borrowed views of what the caller owns (:func:`~llmsched_env.compiled.borrowed`)."""
    return _nested_wait_iterations(borrowed(run), running, borrowed(columns), borrowed(arrivals), borrowed(engine),
                                   borrowed(rule), borrowed(guard), projection, borrowed(margin))


@compiled
def _nested_wait_iterations(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                            engine: EngineParams, rule: NestedWaitRule, guard: np.ndarray, projection: BatchProjection,
                            margin: Margin
                            ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, BatchProjection]:
    nothing = np.empty(0, dtype=np.int64)
    projection = kept_projection(rule, projection, running, columns, engine, run)
    while True:
        stop = compiled_run.begin(run, columns, arrivals)
        if stop != GO_ON:
            return stop, running, nothing, nothing, nothing, projection
        stop, running, decode, admit, chunk, _, projection = nested_wait_step(rule, guard, running, run, columns,
                                                                             arrivals, engine, projection, margin)
        if stop != GO_ON:
            return stop, running, decode, admit, chunk, projection
