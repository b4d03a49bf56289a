"""The evaluation loop's rules as compiled steps, for policies whose decision is compiled too.

:class:`~llmsched_env.runner.Rollout` runs a policy one Python call per iteration. A policy whose decision is a
compiled function (the engines' FCFS family, :mod:`baselines.fcfs`) can instead run many iterations in one
compiled call, its own short loop of three steps from here::

    while True:
        if not begin(run, columns, arrivals):      # feed the arrivals due; stop at the end or to refill
            return ...
        decode, prefill, chunk = my_decision(...)  # the policy's compiled rule
        stop, running = apply(...)                 # the iteration, the stall rule, the stall watch, the row
        if stop != GO_ON:
            return ...

These are the rollout's own rules, in its order (its Python methods stay the reference: ``tests/test_policies.py``
runs every compiled policy both ways and compares the results, records and time series bit for bit), on the
rollout's state handed over as :class:`RunState`. The loop returns to Python whenever Python has work to do:
the arrivals' chunk is used up and the stream may hold more, finished requests are due for retirement, the time
series' row buffer is full, the run ended, or a decision was invalid (Python names the error).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from llmsched_env import kernels
from llmsched_env.compiled import compiled, compiled_inlined
from llmsched_env.engine import LAST_ITERATION_FIELDS
from llmsched_env.iteration import (
    FIRST_MAYBE_WAITING,
    INVALID,
    NUM_FINISHED,
    NUM_WAITING,
    USED_BLOCKS,
    EngineParams,
    N,
    enqueue_due,
    iterate,
    note_last_iteration,
)
from llmsched_env.request_table import RequestColumns

# -- the rollout's integers and reals, as indices of RunState.ints / RunState.reals ---------------------------
(NEXT_ARRIVAL, ENDED, ITERATIONS, PEAK_BLOCKS, EVICTIONS, RETIRE_AT, ROWS, MORE_CHUNKS, MAX_ITERATIONS,
 RETIRED) = range(10)
NUM_RUN_INTS = 10
NOW, BLOCK_SECONDS, BUSY_TIME, PROGRESS_AT, ITERATED_AT, STALLED_AT, STALL_AFTER, HORIZON = range(8)
LAST_ITERATION = 8  # the engine's last iteration that ran: SchedulerState.last_iteration's fields, from here on
NUM_RUN_REALS = LAST_ITERATION + LAST_ITERATION_FIELDS

#: What a compiled policy loop stopped at: Python's turn (refill, retire, flush rows, then call again), the
#: run's end, or an invalid decision (returned for Python to name the error).
PAUSE, DONE, INVALID_DECISION = 0, 1, 2
#: What :func:`apply` says: go on deciding, or stop with one of the above.
GO_ON = -1


class ChunkArrays(NamedTuple):
    """The arrivals' current chunk (the whole arrivals, when given whole)."""

    times: np.ndarray
    prompt: np.ndarray
    output: np.ndarray


class RunState(NamedTuple):
    """The rollout's and the engine's state while a compiled loop runs (handed back to both at each stop).

    ``counters`` are the engine's (:mod:`llmsched_env.iteration`'s indices), ``ints`` and ``reals`` the
    rollout's (the indices above: ``RETIRED`` the engine's retired ids, ``MAX_ITERATIONS`` is ``-1`` without a
    cap, ``STALL_AFTER`` ``inf`` without a watch, ``STALLED_AT`` NaN until a stall), ``rows`` the time series'
    row buffer (end time, KV blocks used, waiting, running, finished; ``ints[ROWS]`` rows filled; no rows when
    nothing records).
    """

    counters: np.ndarray  # int64[NUM_ENGINE_COUNTERS]
    ints: np.ndarray  # int64[NUM_RUN_INTS]
    reals: np.ndarray  # float64[NUM_RUN_REALS]
    rows: np.ndarray  # float64[capacity, 5]


@compiled_inlined
def begin(run: RunState, columns: RequestColumns, arrivals: ChunkArrays) -> int:
    """``Rollout.needs_decision``: enqueue the requests that have arrived by now. Returns ``GO_ON`` when a
    decision is due, ``PAUSE`` when the chunk is used up and the stream may hold more (Python refills, then
    calls again), ``DONE`` when the run is over."""
    counters, ints, reals = run.counters, run.ints, run.reals
    times = arrivals.times
    now = reals[NOW]
    first = ints[NEXT_ARRIVAL]
    if first < len(times) and times[first] <= now:
        if counters[NUM_WAITING] == 0:
            reals[PROGRESS_AT] = now
            reals[ITERATED_AT] = now
        ints[NEXT_ARRIVAL] = enqueue_due(times, arrivals.prompt, arrivals.output, first, now, columns, counters)
    if ints[NEXT_ARRIVAL] >= len(times) and ints[MORE_CHUNKS]:
        return PAUSE
    if ints[ENDED] or now >= reals[HORIZON]:
        return DONE
    if ints[MAX_ITERATIONS] >= 0 and ints[ITERATIONS] >= ints[MAX_ITERATIONS]:
        return DONE
    return GO_ON


@compiled_inlined
def oldest_waiting(counters: np.ndarray, status: np.ndarray, limit: int) -> np.ndarray:
    """``SchedulerState.oldest_waiting(limit)`` of the simulator (:func:`~llmsched_env.kernels.oldest_waiting`, the
    engine's own rule, moving its scan start)."""
    ids, counters[FIRST_MAYBE_WAITING] = kernels.oldest_waiting(status, counters[FIRST_MAYBE_WAITING], counters[N],
                                                                counters[NUM_WAITING], max(limit, 0))
    return ids


@compiled
def _watch_for_stall(run: RunState, ran: bool, duration: float, progressed: bool) -> bool:
    """``Rollout._watch_for_stall`` (see :class:`~llmsched_env.runner.Rollout`), up to its last test: returns
    whether requests have waited without progress for the whole span while the engine iterated, so that the stall
    is recorded only if the queue's head would fit in free memory (:func:`_stall_if_head_fits`). The request table
    is not an argument: the common case does not read it."""
    counters, reals = run.counters, run.reals
    now, span = reals[NOW], reals[STALL_AFTER]
    if counters[NUM_WAITING] == 0:
        reals[PROGRESS_AT] = now
        reals[ITERATED_AT] = now
        return False
    if ran and duration > 0:
        reals[ITERATED_AT] = now
        if progressed:
            reals[PROGRESS_AT] = now
    if now - reals[ITERATED_AT] >= span:
        reals[STALLED_AT] = reals[ITERATED_AT]
        return False
    return now - reals[PROGRESS_AT] >= span


@compiled
def _stall_if_head_fits(run: RunState, columns: RequestColumns, block_size: int, capacity_blocks: int) -> None:
    """The watch's last test: requests waited without progress for the whole span; it is a stall if the oldest
    waiting request would fit in free memory (a threshold rule that holds it back)."""
    head = oldest_waiting(run.counters, columns.status, 1)
    if len(head) and -(-columns.context[head[0]] // block_size) <= capacity_blocks - run.counters[USED_BLOCKS]:
        run.reals[STALLED_AT] = run.reals[PROGRESS_AT]


@compiled_inlined
def whole_prefills(ids: np.ndarray, columns: RequestColumns) -> np.ndarray:
    """The chunk that prefills each of ``ids`` whole: its context less what it holds (a policy that admits whole
    prompts hands these to :func:`apply`)."""
    chunk = np.empty(len(ids), dtype=np.int64)
    for j in range(len(ids)):
        chunk[j] = columns.context[ids[j]] - columns.kv_tokens[ids[j]]
    return chunk


@compiled
def apply(decode: np.ndarray, prefill: np.ndarray, chunk: np.ndarray, running: np.ndarray, run: RunState,
          columns: RequestColumns, arrivals: ChunkArrays, engine: EngineParams
          ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``Rollout.apply`` of the decision to decode ``decode`` and prefill ``prefill`` (``chunk`` tokens each),
    with the time series' row. Returns ``(stop, running, admitted, evicted, finished)``: ``stop`` is ``GO_ON``,
    ``PAUSE`` (Python retires finished requests or empties the row buffer) or ``INVALID_DECISION`` (nothing
    changed); the iteration's admitted, evicted and finished ids (for a policy that follows its queue or learns
    from completions: a finished request's row is intact until Python's next turn)."""
    counters, ints, reals = run.counters, run.ints, run.reals
    nothing = running[:0]  # a view: an empty array without an allocation
    now = reals[NOW]
    ran, duration, progressed = False, 0.0, False
    admitted, evicted, finished = nothing, nothing, nothing
    stalled = len(decode) == 0 and len(prefill) == 0
    if not stalled:
        done = iterate(decode, prefill, chunk, False, nothing, running, columns, counters, engine, now)
        if done.verdict == INVALID:
            return INVALID_DECISION, running, nothing, nothing, nothing
        ran, duration, running = True, done.duration, done.running
        admitted, evicted, finished = done.admitted, done.evicted, done.finished
        now = now + duration
        reals[NOW] = now
        note_last_iteration(reals[LAST_ITERATION:], now, done)
        ints[ITERATIONS] += 1
        ints[EVICTIONS] += len(done.evicted)
        ints[PEAK_BLOCKS] = max(ints[PEAK_BLOCKS], done.peak_blocks)
        reals[BLOCK_SECONDS] += done.peak_blocks * duration
        reals[BUSY_TIME] += duration
        progressed = len(done.admitted) > 0 or len(done.finished) > 0
        if len(run.rows):
            row = run.rows[ints[ROWS]]
            row[0] = now
            row[1] = counters[USED_BLOCKS]
            row[2] = counters[NUM_WAITING]
            row[3] = len(running)
            row[4] = counters[NUM_FINISHED]
            ints[ROWS] += 1
        stalled = duration == 0.0 and len(done.evicted) == 0
    if stalled:
        ended, held, wake = kernels.stall(arrivals.times, ints[NEXT_ARRIVAL], counters[USED_BLOCKS], now)
        if ended:
            ints[ENDED] = 1
        else:
            reals[BLOCK_SECONDS] += held
            reals[NOW] = max(now, wake)
    if math.isfinite(reals[STALL_AFTER]) and math.isnan(reals[STALLED_AT]):
        if _watch_for_stall(run, ran, duration, progressed):
            _stall_if_head_fits(run, columns, engine.block_size, engine.capacity_blocks)
    if counters[NUM_FINISHED] >= ints[RETIRE_AT] or (len(run.rows) and ints[ROWS] == len(run.rows)):
        return PAUSE, running, admitted, evicted, finished
    return GO_ON, running, admitted, evicted, finished


def new_run_state(counters: np.ndarray, rows: int) -> RunState:
    """A :class:`RunState` around the engine's ``counters``, with a buffer of ``rows`` rows (0: no time series)."""
    reals = np.zeros(NUM_RUN_REALS, dtype=np.float64)
    reals[STALLED_AT] = np.nan
    return RunState(counters, np.zeros(NUM_RUN_INTS, dtype=np.int64), reals, np.zeros((rows, 5), dtype=np.float64))
