"""The simulator's iteration, compiled: validation, eviction, the batch, and its accounting, in one call.

:func:`iterate` is the one implementation of an engine iteration. The simulated engine
(:meth:`~llmsched_env.simulator.SimulatedEngine.step`), the compiled evaluation loop
(:mod:`llmsched_env.fast_run`) and the environment's compiled episode (:mod:`llmsched_env.episode`) all call
it. It works on the request table (:class:`~llmsched_env.request_table.RequestColumns`, written in place) and
the engine's counters (an ``int64`` array indexed by the constants below, also written in place), so the
caller keeps its state in whatever owns it and hands the arrays over.

The rule, as vLLM applies it with ``preemption_mode="recompute"``: the decision's ``preempt`` ids are evicted
first; if the batch then needs more KV blocks than are free, requests are removed newest-admitted first (the
running ones in admission order, then the decision's new admissions) until it fits: running ones are evicted
(their KV freed, their context kept, to be prefilled again), new ones deferred (they stay waiting). An invalid
decision changes nothing: ``INVALID`` comes back, and the engine names the error
(:func:`~llmsched_env.request_table.validated_batch`).

``tests/reference_engine.py`` keeps the same model written with NumPy array operations, and Hypothesis tests
run both on random workloads under random policies (chunks, preemptions, overflows) and compare every
iteration's outcome and every request's record bit for bit (``tests/test_simulator.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from llmsched_env.compiled import compiled, compiled_inlined
from llmsched_env.engine import (
    LAST_DECODE_REQUESTS,
    LAST_END,
    LAST_KV_TOKENS,
    LAST_PREFILL_ATTENTION,
    LAST_PREFILL_TOKENS,
    LAST_SECONDS,
    RUNNING,
    WAITING,
)
from llmsched_env.kernels import INVALID, OVERFLOW, batch_cost, enqueue, plan_iteration, run_iteration
from llmsched_env.request_table import RequestColumns

# -- the engine's counters, as indices of its int64 counter array -------------------------------------------
#: requests that exist, waiting, finished; no request before FIRST_MAYBE_WAITING waits; KV blocks and tokens
#: in use; the last validation stamp (negative, new at each iteration).
N, NUM_WAITING, NUM_FINISHED, FIRST_MAYBE_WAITING, USED_BLOCKS, USED_TOKENS, STAMP = range(7)
NUM_ENGINE_COUNTERS = 7


class EngineParams(NamedTuple):
    """What a simulated engine fixes: its paging, its capacity and its cost model."""

    block_size: int
    capacity_blocks: int
    cost: np.ndarray  # LinearCostModel.coefficients()


class Iteration(NamedTuple):
    """What :func:`iterate` did (all ids in the order the rule gives them)."""

    verdict: int  # PLANNED, or INVALID (nothing changed)
    running: np.ndarray  # running ids after the iteration, in admission order
    duration: float
    prefill_tokens: int
    decode_tokens: int
    batch_kv_tokens: int
    admitted: np.ndarray
    finished: np.ndarray
    evicted: np.ndarray  # preempted by the decision, then removed to fit, newest-admitted first
    deferred: np.ndarray  # new admissions removed to fit (still waiting)
    peak_blocks: int  # KV blocks in use at the iteration's peak (after growth, before the finished free theirs)
    prefill_attention: float  # the prefills' attention as the engine's cost model prices it (kernels.batch_cost)


@compiled_inlined
def evict(ids: np.ndarray, running: np.ndarray, columns: RequestColumns, counters: np.ndarray,
          block_size: int) -> np.ndarray:
    """Evict running ``ids`` by recompute: their KV is freed, their context (generated tokens included) kept, and
    they wait again, in their place in the queue. Returns the running ids without them (order kept)."""
    if len(ids) == 0:
        return running
    status, kv_tokens = columns.status, columns.kv_tokens
    first = counters[FIRST_MAYBE_WAITING]
    for i in ids:
        held = kv_tokens[i]
        counters[USED_BLOCKS] -= -(-held // block_size)
        counters[USED_TOKENS] -= held
        kv_tokens[i] = 0
        status[i] = WAITING
        columns.evictions[i] += 1
        first = min(first, i)
    counters[FIRST_MAYBE_WAITING] = first
    counters[NUM_WAITING] += len(ids)
    kept = np.empty(len(running), dtype=np.int64)
    count = 0
    for i in running:
        if status[i] == RUNNING:
            kept[count] = i
            count += 1
    return kept[:count]


@compiled
def fit_to_capacity(running: np.ndarray, decode: np.ndarray, decode_before: np.ndarray, prefill: np.ndarray,
                    prefill_after: np.ndarray, columns: RequestColumns, block_size: int,
                    capacity_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The newest-admitted requests to remove so that the iteration fits in ``capacity_blocks``: each candidate
    holds, after the iteration, the blocks of its decode (one more token), of its prefill (``prefill_after``
    tokens) or what it holds now (a running request the decision pauses); candidates in admission order (the
    running ones, then the decision's new admissions) are kept while their total fits.

    Returns ``(evict, defer, keep_decode, keep_prefill)``: the running ids to evict, the new ones to defer (each
    in candidate order), and which decodes and prefills stay in the batch. ``mark`` is scratch.
    """
    status, kv_tokens, after = columns.status, columns.kv_tokens, columns.mark
    for i in running:
        after[i] = -(-kv_tokens[i] // block_size)
    for j in range(len(decode)):
        after[decode[j]] = -(-(decode_before[j] + 1) // block_size)
    new = 0
    for j in range(len(prefill)):
        i = prefill[j]
        after[i] = -(-prefill_after[j] // block_size)
        if status[i] == WAITING:
            new += 1
    order = np.empty(len(running) + new, dtype=np.int64)
    order[:len(running)] = running
    at = len(running)
    for i in prefill:
        if status[i] == WAITING:
            order[at] = i
            at += 1
    total, keep = 0, 0
    while keep < len(order):
        total += after[order[keep]]
        if total > capacity_blocks:
            break
        keep += 1
    removed = order[keep:]
    num_evict = 0
    for i in removed:
        if status[i] == RUNNING:
            num_evict += 1
    evict_ids = np.empty(num_evict, dtype=np.int64)
    defer_ids = np.empty(len(removed) - num_evict, dtype=np.int64)
    e = d = 0
    for i in removed:
        after[i] = -1  # removed (every kept candidate's entry is a block count, >= 0)
        if status[i] == RUNNING:
            evict_ids[e] = i
            e += 1
        else:
            defer_ids[d] = i
            d += 1
    keep_decode = np.empty(len(decode), dtype=np.bool_)
    for j in range(len(decode)):
        keep_decode[j] = after[decode[j]] != -1
    keep_prefill = np.empty(len(prefill), dtype=np.bool_)
    for j in range(len(prefill)):
        keep_prefill[j] = after[prefill[j]] != -1
    return evict_ids, defer_ids, keep_decode, keep_prefill


@compiled
def _claim_running(ids: np.ndarray, n: int, columns: RequestColumns, stamp: int, block_size: int) -> int:
    """Mark ``ids`` (to preempt) as in this decision: the KV blocks they hold, or ``-1`` if one is unknown,
    repeated or not running."""
    status, mark, held = columns.status, columns.mark, 0
    for i in ids:
        if i < 0 or i >= n or mark[i] == stamp or status[i] != RUNNING:
            return -1
        mark[i] = stamp
        held += -(-columns.kv_tokens[i] // block_size)
    return held


@compiled_inlined
def iterate(decode: np.ndarray, prefill: np.ndarray, chunk: np.ndarray, whole_prefills: bool, preempt: np.ndarray,
            running: np.ndarray, columns: RequestColumns, counters: np.ndarray, engine: EngineParams,
            start: float) -> Iteration:
    """Run one iteration starting at ``start``: evict ``preempt``, decode ``decode`` and prefill ``prefill``
    (``chunk`` tokens each, or their whole remaining context with ``whole_prefills``), removing the
    newest-admitted requests first if the batch does not fit (:func:`fit_to_capacity`). The table and
    ``counters`` change in place; see :class:`Iteration` for what comes back. An ``INVALID`` verdict changes
    nothing but the validation stamp and the scratch column."""
    nothing = running[:0]  # a view: an empty array without an allocation
    block_size, capacity = engine.block_size, engine.capacity_blocks
    counters[STAMP] -= 1
    stamp, n = counters[STAMP], counters[N]
    freed = 0
    if len(preempt):
        freed = _claim_running(preempt, n, columns, stamp, block_size)
        if freed < 0:
            return Iteration(INVALID, running, 0.0, 0, 0, 0, nothing, nothing, nothing, nothing, 0, 0.0)
    (verdict, decode_before, prefill_before, chunks, decode_new_blocks, prefill_new_blocks, prefill_tokens,
     batch_kv) = plan_iteration(decode, prefill, chunk, whole_prefills, n, columns, stamp, block_size,
                                capacity - counters[USED_BLOCKS] + freed)
    if verdict == INVALID:
        return Iteration(INVALID, running, 0.0, 0, 0, 0, nothing, nothing, nothing, nothing, 0, 0.0)
    evicted, deferred = nothing, nothing
    if len(preempt):  # evict's arguments cost their reference counts even when there is nothing to evict
        evicted = preempt.copy()
        running = evict(preempt, running, columns, counters, block_size)
    if verdict == OVERFLOW:
        removed, deferred, keep_decode, keep_prefill = fit_to_capacity(
            running, decode, decode_before, prefill, prefill_before + chunks, columns, block_size, capacity)
        running = evict(removed, running, columns, counters, block_size)
        evicted = np.concatenate((evicted, removed))
        decode, prefill, chunks = decode[keep_decode], prefill[keep_prefill], chunks[keep_prefill]
        counters[STAMP] -= 1
        (verdict, decode_before, prefill_before, chunks, decode_new_blocks, prefill_new_blocks, prefill_tokens,
         batch_kv) = plan_iteration(decode, prefill, chunks, False, n, columns, counters[STAMP], block_size,
                                    capacity - counters[USED_BLOCKS])
        assert verdict != INVALID and verdict != OVERFLOW  # what is left fits, by construction
    duration, attention = batch_cost(engine.cost, prefill_tokens, len(decode), batch_kv, chunks, prefill_before)
    admitted, finished, running, tokens_added, blocks_freed, tokens_freed = run_iteration(
        decode, decode_before, prefill, prefill_before, chunks, running, columns, block_size, start + duration)
    counters[USED_BLOCKS] += decode_new_blocks + prefill_new_blocks
    counters[USED_TOKENS] += tokens_added
    peak_blocks = counters[USED_BLOCKS]
    counters[USED_BLOCKS] -= blocks_freed
    counters[USED_TOKENS] -= tokens_freed
    counters[NUM_WAITING] -= len(admitted)
    counters[NUM_FINISHED] += len(finished)
    return Iteration(verdict, running, duration, prefill_tokens, len(decode), batch_kv, admitted, finished, evicted,
                     deferred, peak_blocks, attention)


@compiled_inlined
def note_last_iteration(last: np.ndarray, end: float, done: Iteration) -> None:
    """Write iteration ``done``, which ended at ``end``, into ``last`` (the fields of
    :attr:`~llmsched_env.engine.SchedulerState.last_iteration`) if it ran. Every engine path that iterates in
    compiled code calls it, as the simulator's :meth:`~llmsched_env.simulator.SimulatedEngine.step` fills it."""
    if done.duration > 0:
        last[LAST_END] = end
        last[LAST_SECONDS] = done.duration
        last[LAST_PREFILL_TOKENS] = done.prefill_tokens
        last[LAST_DECODE_REQUESTS] = done.decode_tokens
        last[LAST_KV_TOKENS] = done.batch_kv_tokens
        last[LAST_PREFILL_ATTENTION] = done.prefill_attention


@compiled_inlined
def enqueue_due(times: np.ndarray, prompt: np.ndarray, output: np.ndarray, first: int, now: float,
                columns: RequestColumns, counters: np.ndarray) -> int:
    """Enqueue the arrivals ``first, first + 1, …`` (of ``times``, ``prompt``, ``output``) that have arrived by
    ``now`` (arrival time ``<= now``), as new requests of the table; returns the index of the first not due. The
    compiled loops' arrival rule (:mod:`llmsched_env.compiled_run`, :mod:`llmsched_env.episode`);
    ``Rollout.needs_decision`` applies the same rule to any engine, and tests compare them step by step."""
    end = first
    while end < len(times) and times[end] <= now:
        end += 1
    if end > first:
        enqueue(columns, counters[N], times[first:end], prompt[first:end], output[first:end])
        counters[N] += end - first
        counters[NUM_WAITING] += end - first
    return end
