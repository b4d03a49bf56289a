"""The simulated serving engine: paged KV memory, mixed prefill/decode batches, eviction by recompute.

Per-request data lives in parallel NumPy arrays indexed by request id (the request table), and an iteration is
one compiled call on them (:func:`~llmsched_env.iteration.iterate`: evictions, the batch, its accounting).
``tests/reference_engine.py`` keeps the same model written with NumPy array operations, and the tests compare
both iteration by iteration (``tests/test_simulator.py``); see ``benchmarks/simulator_speed.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from llmsched_env import kernels
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import (
    NO_ITERATION,
    Decision,
    IterationOutcome,
    RequestRecords,
    SchedulerState,
    as_ids,
    last_iteration_row,
    readonly_view,
)
from llmsched_env.errors import ConfigError, RequestTooLargeError
from llmsched_env.iteration import INVALID, NUM_ENGINE_COUNTERS, STAMP, EngineParams, iterate
from llmsched_env.kv_cache import PagedKVCache
from llmsched_env.request_table import (
    EMPTY_IDS as _EMPTY,
)
from llmsched_env.request_table import (
    REQUEST_COLUMNS,
    RequestColumns,
    checked_arrivals,
    grow_columns,
    records_of,
    retire_rows,
    validated_batch,
)

# Direct ufunc reductions: the hot path calls them a dozen times per iteration on small arrays, where
# the ndarray-method wrappers cost as much as the work.
_sum, _max = np.add.reduce, np.maximum.reduce


# The simulator's columns: the shared ones, plus when each request finishes.
_COLUMNS: dict[str, tuple[type, float | int]] = {
    **REQUEST_COLUMNS,
    "_final_context": (np.int64, 0),  # prompt + output length: finished when reached
}


class EngineCounters(NamedTuple):
    """The simulated engine's state besides its request table (:meth:`SimulatedEngine.counters`)."""

    num_requests: int
    num_waiting: int
    num_finished: int
    first_maybe_waiting: int  # no request before this id waits (where the queue scan starts)
    used_blocks: int
    used_tokens: int
    stamp: int  # the last validation mark of the compiled path (negative, new at each iteration)
    now: float
    running: np.ndarray  # running ids, in admission order
    last_iteration: np.ndarray | None = None  # SchedulerState.last_iteration (None in restore: unchanged)


class SimulatedEngine:
    """A discrete-time model of an LLM serving engine (implements :class:`~llmsched_env.engine.Engine`).

    Args:
        cost: the iteration-time model.
        capacity_tokens: KV capacity in tokens (rounded down to whole blocks); or give ``capacity_blocks``.
        block_size: tokens per KV block (vLLM's paging unit).
        output_lengths_known: whether policies may see output lengths before requests finish.
    """

    def __init__(
        self,
        cost: LinearCostModel,
        *,
        capacity_tokens: int | None = None,
        capacity_blocks: int | None = None,
        block_size: int = 16,
        output_lengths_known: bool = True,
    ) -> None:
        if (capacity_tokens is None) == (capacity_blocks is None):
            raise ConfigError("give exactly one of capacity_tokens and capacity_blocks")
        self.cost = cost
        self._kv = (PagedKVCache.from_tokens(capacity_tokens, block_size) if capacity_tokens is not None
                    else PagedKVCache(capacity_blocks, block_size))  # type: ignore[arg-type]
        self._known = output_lengths_known
        self._now = 0.0
        self._n = 0
        self._size = 0
        self._running = _EMPTY
        self._last_iteration = NO_ITERATION
        self._num_waiting = 0
        self._num_finished = 0
        self._first_maybe_waiting = 0
        self._stamp = -1  # validation marks of the compiled iteration: negative, new at each iteration
        self._retired = 0  # ids before this one are finished and handed over (retire_finished): their rows are gone
        self._params = EngineParams(self._kv.block_size, self._kv.capacity_blocks,
                                    np.ascontiguousarray(cost.coefficients(), dtype=np.float64))
        self._grow(1024)

    # -- configuration -------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._now

    @property
    def block_size(self) -> int:
        return self._kv.block_size

    @property
    def capacity_blocks(self) -> int:
        return self._kv.capacity_blocks

    @property
    def capacity_tokens(self) -> int:
        return self._kv.capacity_tokens

    @property
    def output_lengths_known(self) -> bool:
        return self._known

    @property
    def used_blocks(self) -> int:
        return self._kv.used_blocks

    @property
    def used_tokens(self) -> int:
        return self._kv.used_tokens

    @property
    def num_requests(self) -> int:
        return self._n

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_finished(self) -> int:
        return self._num_finished

    def check_fits(self, prompt_len: np.ndarray, output_len: np.ndarray) -> None:
        """Raise :class:`RequestTooLargeError` if any request could never finish within capacity."""
        peak = self._kv.blocks_for(np.asarray(prompt_len, np.int64) + np.asarray(output_len, np.int64))
        too_big = np.flatnonzero(peak > self.capacity_blocks)
        if len(too_big):
            i = int(too_big[0])
            raise RequestTooLargeError(
                f"request {i} (of this batch) needs {int(prompt_len[i]) + int(output_len[i])} KV tokens "
                f"(prompt {int(prompt_len[i])} + output {int(output_len[i])}) = {int(peak[i])} blocks, but the "
                f"capacity is {self.capacity_blocks} blocks of {self.block_size} tokens "
                f"({self.capacity_tokens} tokens); {len(too_big)} such request(s)")

    # -- storage -------------------------------------------------------------------------------
    def _grow(self, size: int) -> None:
        old = self._size
        if size <= old:
            return
        grow_columns(self, _COLUMNS, old, size, keep_from=self._retired)
        self._kv.reserve_ids(size, keep_from=self._retired)
        self._size = size
        self._views = dict(
            prompt_len=readonly_view(self._prompt),
            output_len=readonly_view(self._output) if self._known else None,
            context_len=readonly_view(self._context),
            arrival_time=readonly_view(self._arrival),
            num_evictions=readonly_view(self._evictions),
        )
        self._table = RequestColumns(self._status, self._prompt, self._output, self._context, self._final_context,
                                     self._arrival, self._first_token, self._finish, self._mark,
                                     self._kv.token_column, self._evictions)

    def request_columns(self) -> RequestColumns:
        """The request table's columns, written in place by whoever advances the engine (its own iterations, or
        a compiled episode loop that then hands back the counters, :meth:`restore`). Valid while the engine
        holds at most the requests it has room for (:meth:`reserve`)."""
        return self._table

    def counters(self) -> EngineCounters:
        """The engine's state besides the request table: what a compiled episode loop advances with it."""
        kv = self._kv
        return EngineCounters(self._n, self._num_waiting, self._num_finished, self._first_maybe_waiting,
                              kv.used_blocks, kv.used_tokens, self._stamp, self._now, self._running,
                              self._last_iteration)

    def restore(self, counters: EngineCounters) -> None:
        """Take ``counters`` as the engine's state: those a compiled loop reached after advancing the columns of
        :meth:`request_columns` in place (the inverse of :meth:`counters`)."""
        (self._n, self._num_waiting, self._num_finished, self._first_maybe_waiting, used_blocks, used_tokens,
         self._stamp, self._now, self._running, last_iteration) = counters
        self._kv.used_blocks, self._kv.used_tokens = used_blocks, used_tokens
        if last_iteration is not None:  # a compiled loop's is a view of its state: the policy sees a copy
            self._last_iteration = (last_iteration if not last_iteration.flags.writeable
                                    else last_iteration_row(*last_iteration))

    def reserve(self, count: int) -> None:
        """Make room for ``count`` requests in all, so that adding them allocates nothing (and a compiled
        episode loop, :mod:`llmsched_env.episode`, can enqueue them into the columns in place)."""
        if count > self._size:
            self._grow(max(count, 2 * self._size))  # doubling: a stream reserves chunk by chunk

    def add_requests(self, arrival_time: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray) -> np.ndarray:
        """Enqueue requests (they join the queue in the order given); returns their ids."""
        arrival_time, prompt_len, output_len = checked_arrivals(arrival_time, prompt_len, output_len)
        count = len(arrival_time)
        if count == 0:
            return _EMPTY
        if _max(prompt_len + output_len) > self.capacity_tokens:
            self.check_fits(prompt_len, output_len)
        start, end = self._n, self._n + count
        if end > self._size:
            self._grow(max(end, 2 * self._size))
        ids = np.arange(start, end, dtype=np.int64)
        kernels.enqueue(self._table, start, arrival_time, prompt_len, output_len)
        self._n = end
        self._num_waiting += count
        return ids

    # -- the policy's view -----------------------------------------------------------------------
    def _waiting_ids(self, limit: int | None = None) -> np.ndarray:
        # Invariant: every waiting id is >= _first_maybe_waiting (evictions move it back).
        start, n = self._first_maybe_waiting, self._n
        if limit is None:
            ids, self._first_maybe_waiting = kernels.waiting_ids(self._status, start, n, self._num_waiting)
            return ids
        ids, first = kernels.oldest_waiting(self._status, start, n, self._num_waiting, limit)
        self._first_maybe_waiting = int(first)  # nothing before it waits
        return ids

    def state(self) -> SchedulerState:
        v = self._views
        return SchedulerState(
            now=self._now,
            block_size=self._kv.block_size,
            capacity_blocks=self._kv.capacity_blocks,
            used_blocks=self._kv.used_blocks,
            running=readonly_view(self._running),
            prompt_len=v["prompt_len"],
            output_len=v["output_len"],
            context_len=v["context_len"],
            kv_tokens=self._kv.tokens,
            arrival_time=v["arrival_time"],
            num_evictions=v["num_evictions"],
            num_requests=self._n,
            num_waiting=self._num_waiting,
            waiting_fn=self._waiting_ids,
            retired=self._retired,
            last_iteration=self._last_iteration,
        )

    # -- the iteration -----------------------------------------------------------------------------
    def counter_array(self) -> np.ndarray:
        """:meth:`counters` less the clock and the running ids, as the compiled iteration takes them (an int64
        array in :mod:`llmsched_env.iteration`'s order): a new array, which :meth:`restore` takes back."""
        return np.array(self.counters()[:NUM_ENGINE_COUNTERS], dtype=np.int64)

    def engine_params(self) -> EngineParams:
        """What the compiled iteration takes of the engine's fixed configuration."""
        return self._params

    def step(self, decision: Decision) -> IterationOutcome:
        """Run one iteration of ``decision``; see :class:`~llmsched_env.engine.Engine`. One compiled call
        (:func:`~llmsched_env.iteration.iterate`): evictions, the batch and its accounting."""
        decode, prefill, preempt = as_ids(decision.decode), as_ids(decision.prefill), as_ids(decision.preempt)
        whole = decision.prefill_tokens is None
        chunk = _EMPTY if whole else as_ids(decision.prefill_tokens)
        counters = self.counter_array()
        start = self._now
        done = iterate(decode, prefill, chunk, whole, preempt, self._running, self._table, counters, self._params,
                       start)
        if done.verdict == INVALID:
            self._stamp = int(counters[STAMP])
            validated_batch(decision, self._n, self._status, self._prompt, self._context, self._kv.tokens, self._mark)
            raise AssertionError(f"the compiled iteration refused a decision that validation accepts: {decision}")
        duration = float(done.duration)  # a Python float whether or not the iteration ran compiled (NUMBA_DISABLE_JIT)
        last = None if duration == 0 else last_iteration_row(start + duration, duration, done.prefill_tokens,
                                                             done.decode_tokens, done.batch_kv_tokens,
                                                             done.prefill_attention)
        self.restore(EngineCounters(*counters.tolist(), start + duration, done.running, last))
        kv = self._kv
        return IterationOutcome(
            start_time=start, duration=duration, prefill_tokens=int(done.prefill_tokens),
            decode_tokens=int(done.decode_tokens), batch_kv_tokens=int(done.batch_kv_tokens),
            admitted=done.admitted if len(done.admitted) else _EMPTY, finished=done.finished,
            evicted=done.evicted if len(done.evicted) else _EMPTY,
            deferred=done.deferred if len(done.deferred) else _EMPTY, kv_tokens_used=kv.used_tokens,
            kv_blocks_used=kv.used_blocks, peak_blocks_used=int(done.peak_blocks), capacity_blocks=kv.capacity_blocks)

    def advance_to(self, time: float) -> None:
        if not math.isfinite(time):
            raise ValueError(f"cannot advance the clock to {time!r}")
        self._now = max(self._now, float(time))

    @property
    def retired(self) -> int:
        """Ids ``0 .. retired - 1`` are finished and were handed over by :meth:`retire_finished`."""
        return self._retired

    def retire_finished(self) -> RequestRecords:
        """Hand over the records of the finished requests that come before every unfinished one (in id order)
        and were not handed over yet, and free their rows: what keeps a long run's memory bounded by the
        requests in the system (from the oldest unfinished one to the newest), not by all that ever arrived.
        Their ids stay taken; no policy sees them again (they are finished)."""
        start = self._retired
        records, self._retired = retire_rows(self, _COLUMNS, start, self._n)
        self._kv.release_ids(start, self._retired)
        self._first_maybe_waiting = max(self._first_maybe_waiting, self._retired)  # released rows read as zeros
        return records

    def records(self) -> RequestRecords:
        """The records of ids ``retired .. num_requests - 1`` (every request, until some are retired)."""
        return records_of(self, self._retired, self._n)
