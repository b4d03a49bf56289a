"""WAIT-CP and Nested WAIT-CP: WAIT and Nested WAIT with per-request chunked prefill, as the paper's authors ran them.

The paper's experiments (arXiv 2504.11320, v4, section 6) ran WAIT and Nested WAIT on Vidur through one
scheduler, ``GeneralNestedChunkedReplicaScheduler`` (``Luoxiaogan/vidur_or``, commit :data:`AUTHORS_COMMIT`,
``vidur/scheduler/replica_scheduler/general_nested_chunked_replica_scheduler.py``, segments from its base
class in ``general_nested_booking_limit_replica_scheduler.py``). This module ports it rule by rule onto
the project's state and decision types. Its knobs and their defaults are the authors':

* ``total_limit`` (``tl``): a system-wide cap, spread over *segments* of stages. Segment boundaries are the
  distinct output lengths of the workload; segment ``k`` carries ``n_k · count_k`` of ``tl`` (rounded), with
  ``n_{k+1} / n_k = q_k = min(p_k + seg_margin, 0.99)``, ``p_k`` the share of segment ``k``'s traffic that
  continues into ``k + 1`` (:func:`booking_segments`). A single type is one segment holding all of ``tl``;
  above :data:`MAX_SEGMENTS` distinct lengths (a trace), segments are cut at equal widths (the paper's rule on
  lmsys-chat-1m).
* Per-stage rotation: a segment of ``S`` stages with budget ``b`` lets ``b // S`` requests through its entry
  per iteration, one more on the first ``b % S`` iterations of every ``S`` (the stages take turns).
* WAIT gate (``wait_gate``, on): a segment runs in an iteration only when its entry holds at least this
  iteration's per-stage limit or the segment holds its whole budget; otherwise it pauses, KV kept. Inside
  a running segment every request advances (internal stages flow freely).
* Prefill (segment 1's entry): every prefill in progress gets ``min(remaining, chunk)`` tokens; new requests
  are admitted in queue order, each with its first chunk, up to the rotation limit, the segment's budget
  less its occupants, and ``tl`` less the requests in the system. Several requests' chunks share an iteration.
* Token gate (``WAIT_CP_GATE``, on): the batch's tokens (one per decode, the chunks) stay within the estimate
  ``batch_est = ceil(tl − P·K̄ + P·K̄·chunk)``, ``P = tl / Σ_j w_j (K_j + D_j)``, ``K_j = ceil(p_j / chunk)``
  (:func:`batch_token_estimate`).
* Admission keeps 1 % of the KV blocks free (Vidur's ``watermark_blocks_fraction``), counting a new request's
  whole prompt, as Vidur allocates it on admission.

Stages are counted as Vidur counts them: stage 0 is the prefill, and a request that has generated ``s``
tokens after it is at stage ``s + 1``. A Vidur request with ``D`` decode tokens gets its first from the
prefill, so it passes stages ``0 .. D − 1``; in this project's notation (``o`` decode iterations after the
prefill) ``D = o + 1``. Requests past the last boundary (a trace longer than the prior) decode freely.

Departures from the authors' code, each forced by the seam: the rotation counter advances once per
decision (Vidur: once per call of its scheduler, which also happens on arrivals while idle); at the
end of a run the authors drop stranded requests ("force clear"), here they stay and are reported as
running. The policy never reads a request's output length, so both presets run with lengths hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from llmsched_env import compiled_run
from llmsched_env.compiled import borrowed, compiled
from llmsched_env.compiled_run import GO_ON, ChunkArrays, RunState, oldest_waiting
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import IDLE, Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import equilibrium
from llmsched_env.iteration import NUM_WAITING, USED_BLOCKS, EngineParams
from llmsched_env.policy import CompiledLoop
from llmsched_env.request_table import RequestColumns
from llmsched_env.workload import TypeMix

#: The authors' scheduler this module follows (``Luoxiaogan/vidur_or``).
AUTHORS_COMMIT = "011fe971a7cd882458fb58021c25ffeb350efa7d"
#: The paper's chunk for WAIT and Nested WAIT on its synthetic workloads.
PAPER_CHUNK = 256
#: The ``tl`` grid the authors swept (v4, section 6.1).
PAPER_TOTAL_LIMITS = tuple(range(20, 201, 10))
#: Above this many distinct output lengths, segments are cut at equal widths (the paper's rule for lmsys: 50).
MAX_SEGMENTS = 50
_RATIO_CAP = 0.99
_NONE = np.empty(0, dtype=np.int64)
_UNLIMITED = np.iinfo(np.int64).max


@dataclass(frozen=True)
class BookingSegment:
    """A run of stages ``start .. end`` (Vidur's count) sharing ``total_limit`` requests."""

    start: int
    end: int
    total_limit: int
    per_stage: float  # n_k before rounding

    @property
    def stages(self) -> int:
        return self.end - self.start + 1

    def stage_limit(self, batch_index: int) -> int:
        """Requests through the entry in iteration ``batch_index``: ``b // S``, plus one on the first
        ``b % S`` iterations of every ``S``."""
        base, remainder = divmod(self.total_limit, self.stages)
        return base + 1 if batch_index % self.stages < remainder else base


def booking_segments(decode_tokens: np.ndarray, weights: np.ndarray, total_limit: int, *,
                     boundaries: np.ndarray | None = None, seg_margin: float = 0.0) -> tuple[BookingSegment, ...]:
    """Segments and their budgets from an output-length distribution (the authors' ``calculate_nested_booking_limits``).

    Args:
        decode_tokens: output lengths as Vidur counts them (``D = o + 1``: the prefill's token included).
        weights: their arrival rates or probabilities.
        total_limit: ``tl``.
        boundaries: the segments' last lengths, ascending (default: the distinct lengths; the last must reach
            the longest).
        seg_margin: added to each continuation ratio (the authors' default 0).
    """
    decode_tokens = np.asarray(decode_tokens, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if total_limit < 1:
        raise ConfigError(f"total_limit (tl) must be >= 1, got {total_limit}")
    if seg_margin < 0:
        raise ConfigError(f"seg_margin must be >= 0, got {seg_margin}")
    if len(decode_tokens) == 0 or decode_tokens.min() < 1 or weights.sum() <= 0:
        raise ConfigError("segments need output lengths >= 1 with positive total weight")
    ends = np.unique(decode_tokens) if boundaries is None else np.unique(np.asarray(boundaries, dtype=np.int64))
    if ends[0] < 1 or ends[-1] < decode_tokens.max():
        raise ConfigError(f"segment boundaries must be >= 1 and reach the longest output ({decode_tokens.max()}), "
                          f"got {ends.tolist()}")
    counts = np.diff(ends, prepend=0)  # segment 1: stages 0 .. d_1 - 1; segment k: d_{k-1} .. d_k - 1
    reach = np.array([weights.sum()] + [weights[decode_tokens > d].sum() for d in ends[:-1]])
    ratios = [min((reach[k + 1] / reach[k] if reach[k] > 0 else 0.0) + seg_margin, _RATIO_CAP)
              for k in range(len(ends) - 1)]
    cumulative = np.concatenate([[1.0], np.cumprod(ratios)]) if ratios else np.ones(1)
    n_first = total_limit / float(counts @ cumulative)
    segments, start = [], 0
    for count, factor in zip(counts, cumulative):
        per_stage = n_first * float(factor)
        # Python's round (half to even), as the authors' int(round(...)).
        segments.append(BookingSegment(start, start + int(count) - 1, int(round(per_stage * int(count))), per_stage))
        start += int(count)
    return tuple(segments)


def equal_width_boundaries(longest: int, segments: int = MAX_SEGMENTS) -> np.ndarray:
    """``segments`` boundaries at equal widths up to ``longest`` (the paper's rule on lmsys: ``m = 50``)."""
    return np.unique(np.ceil(np.arange(1, segments + 1) * longest / segments).astype(np.int64))


def batch_token_estimate(prompt_lens: np.ndarray, decode_tokens: np.ndarray, weights: np.ndarray,
                         total_limit: int, chunk: int) -> int:
    """The authors' token gate ``batch_est``: with ``P = tl / Σ_j w_j (K_j + D_j)`` requests per stage, ``P·K̄`` of
    them prefilling (``chunk`` tokens each) and the rest decoding (one token each)."""
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    chunks = np.maximum(1, -(-np.asarray(prompt_lens, dtype=np.int64) // chunk))
    per_stage = total_limit / float(share @ (chunks + np.asarray(decode_tokens)))
    prefilling = per_stage * float(share @ chunks)
    return int(math.ceil(total_limit - prefilling + prefilling * chunk))


def fluid_total_limit(mix: TypeMix, cost: LinearCostModel, capacity_tokens: int, chunk: int = PAPER_CHUNK) -> int:
    """A ``tl`` from the fluid model, for runs that do not sweep it: the requests in the system at equilibrium,
    ``L = Σ_j λ_j ΔT* (K_j + o_j)`` rounded up (the paper picks ``tl`` so that ``ΔT(n) <= n_j / λ_j`` holds; on
    p=512, o=19 at 20 req/s this gives 24, the paper's v3 choice was 21), scaled by ``C / M*`` when the
    equilibrium's memory ``M*`` exceeds the capacity ``C``. Past the fluid stability region (``ρ >= 1``), as many
    of the longest requests as the capacity holds at their peak."""
    _, delta_t, memory = equilibrium(mix.rates, mix.prompt_lens, mix.output_lens, cost)
    if not math.isfinite(delta_t):
        return max(1, int(capacity_tokens // int((mix.prompt_lens + mix.output_lens).max())))
    chunks = np.maximum(1, -(-mix.prompt_lens // chunk))
    in_system = float(mix.rates @ (chunks + mix.output_lens)) * delta_t
    return max(1, math.ceil(in_system * min(1.0, capacity_tokens / memory)))


@dataclass
class ChunkedBookingPolicy:
    """WAIT-CP (one segment) and Nested WAIT-CP (segments at the output lengths); see the module docstring."""

    segments: tuple[BookingSegment, ...]
    total_limit: int
    chunk: int = PAPER_CHUNK
    token_budget: int | None = None  # batch_est; None turns the token gate off
    wait_gate: bool = True
    watermark: float = 0.01
    name: str = "wait-cp"

    def __post_init__(self) -> None:
        if not self.segments:
            raise ConfigError("WAIT-CP needs at least one segment")
        if self.total_limit < 1:
            raise ConfigError(f"total_limit (tl) must be >= 1, got {self.total_limit}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1 token, got {self.chunk}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"token_budget must be >= 1 or None, got {self.token_budget}")
        if not 0 <= self.watermark < 1:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.segments[0].start != 0 or any(b.start != a.end + 1 for a, b in zip(self.segments, self.segments[1:])):
            raise ConfigError("segments must start at stage 0 and follow each other")
        self._batch_index = 0
        self._watermark_blocks = 0

    @classmethod
    def for_mix(cls, mix: TypeMix, total_limit: int, *, nested: bool, chunk: int = PAPER_CHUNK,
                token_gate: bool = True, wait_gate: bool = True, seg_margin: float = 0.0,
                watermark: float = 0.01, name: str | None = None) -> "ChunkedBookingPolicy":
        """The authors' scheduler sized on ``mix`` (the offered types, or a trace's length pairs as weights).

        ``nested``: segments at the distinct output lengths (at most :data:`MAX_SEGMENTS`, else equal widths):
        Nested WAIT-CP; otherwise one segment up to the longest output: WAIT-CP. The two coincide on one type.
        """
        decode_tokens = mix.output_lens + 1  # Vidur's count: the prefill's token is the first
        boundaries = np.array([decode_tokens.max()])
        if nested:
            distinct = np.unique(decode_tokens)
            boundaries = distinct if len(distinct) <= MAX_SEGMENTS else equal_width_boundaries(int(distinct[-1]))
        segments = booking_segments(decode_tokens, mix.rates, total_limit, boundaries=boundaries,
                                    seg_margin=seg_margin)
        budget = (batch_token_estimate(mix.prompt_lens, decode_tokens, mix.rates, total_limit, chunk)
                  if token_gate else None)
        return cls(segments, total_limit, chunk, budget, wait_gate, watermark,
                   name or ("nested-wait-cp" if nested else "wait-cp"))

    def reset(self, engine: Engine) -> None:
        self._batch_index = 0
        self._watermark_blocks = int(self.watermark * engine.capacity_blocks)

    def compiled_loop(self) -> CompiledLoop:
        """This policy's rule compiled (:func:`run_chunked_booking`): the same decisions as :meth:`decide`, bit for
        bit (its rotation counter included)."""
        rule = BookingRule(np.array([segment.start for segment in self.segments], dtype=np.int64),
                           np.array([segment.end for segment in self.segments], dtype=np.int64),
                           np.array([segment.total_limit for segment in self.segments], dtype=np.int64),
                           self.total_limit, self.chunk,
                           _UNLIMITED if self.token_budget is None else self.token_budget, self.wait_gate,
                           self._watermark_blocks)
        batch = np.zeros(1, dtype=np.int64)

        def loop(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                 engine: EngineParams) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            batch[0] = self._batch_index
            stop = run_chunked_booking(run, running, columns, arrivals, engine, rule, batch)
            self._batch_index = int(batch[0])
            return stop
        return loop

    @staticmethod
    def stages(state: SchedulerState, running: np.ndarray) -> np.ndarray:
        """Vidur's stage of each running request: 0 while prefilling, ``s + 1`` after ``s`` decodes."""
        context = state.context_len[running]
        return np.where(state.kv_tokens[running] == context, context - state.prompt_len[running] + 1, 0)

    def decide(self, state: SchedulerState) -> Decision:
        batch = self._batch_index
        self._batch_index += 1
        running = state.running
        stage = self.stages(state, running)
        prefilling = stage == 0
        decode: list[np.ndarray] = []
        occupancy: list[int] = []  # requests inside each segment, past its entry
        for segment in self.segments:
            limit = segment.stage_limit(batch)
            internal = (stage > segment.start) & (stage <= segment.end)
            occupied = int(np.count_nonzero(internal))
            occupancy.append(occupied)
            if segment.start == 0:
                entry = _NONE
                entry_count = state.num_waiting + int(np.count_nonzero(prefilling))
            else:
                entry = running[stage == segment.start]
                entry_count = len(entry)
            if self.wait_gate and entry_count + occupied < segment.total_limit and entry_count < limit:
                continue  # WAIT: the segment pauses, its KV kept
            if segment.start > 0:
                decode.append(entry[:min(limit, max(0, segment.total_limit - occupied))])
            decode.append(running[internal])
        decode.append(running[stage > self.segments[-1].end])  # longer than the prior: outside every segment
        decode_ids = np.concatenate(decode)
        prefill, tokens = self._prefills(state, running, stage, decode_ids, batch, occupancy[0])
        if len(decode_ids) == 0 and len(prefill) == 0:
            return IDLE
        return Decision(decode=decode_ids, prefill=prefill, prefill_tokens=tokens)

    def _prefills(self, state: SchedulerState, running: np.ndarray, stage: np.ndarray, decode: np.ndarray,
                  batch: int, occupied: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunks for the prefills in progress, then admissions through segment 1's entry (``occupied``: the
        requests already past it)."""
        budget = self.token_budget if self.token_budget is not None else math.inf
        batch_tokens = len(decode)  # a decode is one token of the batch
        ids: list[int] = []
        tokens: list[int] = []
        partial = running[stage == 0]
        partial_left = state.context_len[partial] - state.kv_tokens[partial]
        for request, left in zip(partial.tolist(), partial_left.tolist()):
            give = min(left, self.chunk, max(0, budget - batch_tokens))
            if give > 0:
                ids.append(request)
                tokens.append(int(give))
                batch_tokens += give
        first = self.segments[0]
        room = min(first.stage_limit(batch), first.total_limit - occupied, self.total_limit - len(running))
        if room > 0:
            # Vidur allocates a request's whole prompt on admission: blocks still to fill count as taken.
            free = state.free_blocks - int(np.sum(state.blocks_for(state.context_len[partial]))
                                           - np.sum(state.blocks_for(state.kv_tokens[partial])))
            free -= int(np.count_nonzero(state.kv_tokens[decode] % state.block_size == 0))  # this iteration's decodes
            empty = len(running) == 0 and state.used_blocks == 0
            for request in state.oldest_waiting(room).tolist():
                if batch_tokens >= budget:
                    break
                context = int(state.context_len[request])
                need = int(state.blocks_for(context))
                if free - need < self._watermark_blocks and not (empty and not ids):
                    break
                give = min(context - int(state.kv_tokens[request]), self.chunk, budget - batch_tokens)
                if give <= 0:
                    break
                free -= need
                ids.append(request)
                tokens.append(int(give))
                batch_tokens += give
        return np.array(ids, dtype=np.int64), np.array(tokens, dtype=np.int64)


class BookingRule(NamedTuple):
    """:class:`ChunkedBookingPolicy`'s settings as its compiled rule takes them (the token budget ``int64`` max when
    the gate is off)."""

    starts: np.ndarray  # int64 first stage of each segment
    ends: np.ndarray  # int64 last stage of each segment
    limits: np.ndarray  # int64 each segment's share of tl
    total_limit: int
    chunk: int
    token_budget: int
    wait_gate: bool
    watermark_blocks: int


@compiled
def _stage_limit(rule: BookingRule, k: int, batch: int) -> int:
    """:meth:`BookingSegment.stage_limit` of segment ``k``."""
    stages = rule.ends[k] - rule.starts[k] + 1
    base, remainder = rule.limits[k] // stages, rule.limits[k] % stages
    return base + 1 if batch % stages < remainder else base


@compiled
def booking_decision(rule: BookingRule, batch: int, running: np.ndarray, columns: RequestColumns,
                     counters: np.ndarray, engine: EngineParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`ChunkedBookingPolicy.decide` for iteration ``batch``, compiled: ``(decode, prefill, tokens)``."""
    kv_tokens, context, prompt = columns.kv_tokens, columns.context, columns.prompt
    count = len(running)
    stage = np.empty(count, dtype=np.int64)
    prefilling = 0
    for j in range(count):
        i = running[j]
        stage[j] = context[i] - prompt[i] + 1 if kv_tokens[i] == context[i] else 0
        prefilling += stage[j] == 0
    decode = np.empty(count, dtype=np.int64)
    d = 0
    first_occupied = 0
    for k in range(len(rule.starts)):
        start, end, segment_limit = rule.starts[k], rule.ends[k], rule.limits[k]
        limit = _stage_limit(rule, k, batch)
        occupied = 0
        for j in range(count):
            if start < stage[j] <= end:
                occupied += 1
        if k == 0:
            first_occupied = occupied
        entry_count = 0
        if start == 0:
            entry_count = counters[NUM_WAITING] + prefilling
        else:
            for j in range(count):
                entry_count += stage[j] == start
        if rule.wait_gate and entry_count + occupied < segment_limit and entry_count < limit:
            continue  # WAIT: the segment pauses, its KV kept
        if start > 0:
            let_in = min(limit, max(0, segment_limit - occupied))
            for j in range(count):
                if let_in == 0:
                    break
                if stage[j] == start:
                    decode[d] = running[j]
                    d += 1
                    let_in -= 1
        for j in range(count):
            if start < stage[j] <= end:
                decode[d] = running[j]
                d += 1
    last = rule.ends[len(rule.ends) - 1]
    for j in range(count):
        if stage[j] > last:  # longer than the prior: outside every segment
            decode[d] = running[j]
            d += 1
    decode = decode[:d]
    # Prefills: chunks for those in progress, then admissions through segment 1's entry.
    block_size, budget, chunk = engine.block_size, rule.token_budget, rule.chunk
    ids = np.empty(count + max(0, _stage_limit(rule, 0, batch)), dtype=np.int64)
    tokens = np.empty(len(ids), dtype=np.int64)
    p = 0
    batch_tokens = d
    to_fill = 0
    for j in range(count):
        if stage[j] == 0:
            i = running[j]
            to_fill += -(-context[i] // block_size) - (-(-kv_tokens[i] // block_size))
            give = min(context[i] - kv_tokens[i], chunk, max(0, budget - batch_tokens))
            if give > 0:
                ids[p] = i
                tokens[p] = give
                p += 1
                batch_tokens += give
    room = min(_stage_limit(rule, 0, batch), rule.limits[0] - first_occupied, rule.total_limit - count)
    if room > 0:
        # Vidur allocates a request's whole prompt on admission: blocks still to fill count as taken.
        free = engine.capacity_blocks - counters[USED_BLOCKS] - to_fill
        for i in decode:
            if kv_tokens[i] % block_size == 0:  # this iteration's decodes
                free -= 1
        empty = count == 0 and counters[USED_BLOCKS] == 0
        for i in oldest_waiting(counters, columns.status, room):
            if batch_tokens >= budget:
                break
            need = -(-context[i] // block_size)
            if free - need < rule.watermark_blocks and not (empty and p == 0):
                break
            give = min(context[i] - kv_tokens[i], chunk, budget - batch_tokens)
            if give <= 0:
                break
            free -= need
            ids[p] = i
            tokens[p] = give
            p += 1
            batch_tokens += give
    return decode, ids[:p], tokens[:p]


@compiled
def run_chunked_booking(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                        engine: EngineParams, rule: BookingRule, batch: np.ndarray
                        ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:class:`ChunkedBookingPolicy`'s compiled loop (see :data:`~llmsched_env.policy.CompiledLoop`); ``batch``
    holds its rotation counter. It runs on borrowed views of what the caller owns
    (:func:`~llmsched_env.compiled.borrowed`)."""
    return _booking_iterations(borrowed(run), running, borrowed(columns), borrowed(arrivals), borrowed(engine),
                               borrowed(rule), borrowed(batch))


@compiled
def _booking_iterations(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                        engine: EngineParams, rule: BookingRule, batch: np.ndarray
                        ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    nothing = np.empty(0, dtype=np.int64)
    while True:
        stop = compiled_run.begin(run, columns, arrivals)
        if stop != GO_ON:
            return stop, running, nothing, nothing, nothing
        decode, prefill, tokens = booking_decision(rule, batch[0], running, columns, run.counters, engine)
        batch[0] += 1
        stop, running, _, _, _ = compiled_run.apply(decode, prefill, tokens, running, run, columns, arrivals, engine)
        if stop != GO_ON:
            return stop, running, decode, prefill, tokens
