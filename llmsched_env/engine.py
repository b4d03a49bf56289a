"""The engine interface: the seam between policies and backends (simulated or live vLLM).

Data flows one way: workload → engine → :class:`SchedulerState` → policy → :class:`Decision` → engine.

Request life cycle and the stage convention (the paper's). A request with prompt length ``p`` and
output length ``o`` passes ``o + 1`` stages: stage 0 is its prefill, stages ``1..o`` each produce one
output token. In stage ``s`` it holds ``p + s`` KV tokens (nothing before its prefill).

* ``WAITING``: in the queue, holding no KV. Queue order is arrival order (request id); an evicted
  request keeps its place, so it goes back ahead of everything that arrived after it, as vLLM
  puts preempted requests at the front of its waiting queue.
* ``RUNNING``: admitted, holding KV. It is either *prefilling* (``kv_tokens < context_len``, possibly
  in chunks) or ready to *decode* (``kv_tokens == context_len``). A running request that is not in
  an iteration's batch is *paused*: its KV stays.
* ``FINISHED``: produced its ``o`` output tokens; its KV is freed at the end of that iteration.

Eviction is by recompute, as in vLLM: the victim's KV is freed, it returns to the queue, and when
re-admitted it prefills its prompt *and* the tokens it had generated (``context_len = p + decoded``)
before decoding on. Generated tokens are kept, the KV work is paid again.

Ids are dense integers ``0, 1, 2, …`` in the order requests were added (arrival order), so every
per-request array of the state is indexed by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol

import numpy as np

from llmsched_env.errors import InvalidDecisionError

WAITING, RUNNING, FINISHED = 0, 1, 2

_EMPTY_IDS = np.empty(0, dtype=np.int64)
_EMPTY_IDS.flags.writeable = False


def readonly_view(array: np.ndarray) -> np.ndarray:
    """A view of ``array``'s memory that cannot be written through, nor made writable again (what engines hand
    to policies). A plain view with ``writeable = False`` can be switched back by its holder; this one is built
    on a read-only buffer, so NumPy refuses. ``array`` must be C-contiguous (the engines' columns are)."""
    if array.size == 0:
        view = np.empty(array.shape, array.dtype)  # nothing to protect: its own (empty) memory
    else:
        view = np.frombuffer(memoryview(array).toreadonly(), dtype=array.dtype).reshape(array.shape)
    view.flags.writeable = False
    return view


def as_ids(values: object) -> np.ndarray:
    """A 1-D int64 array of request ids (lists, tuples and arrays of integers).

    Anything else is refused rather than converted: a float (``0.9`` would truncate to id 0), a string, a
    boolean mask (read as ids 0 and 1), ``None``, or an unsigned id beyond int64 (it would wrap negative)."""
    if isinstance(values, np.ndarray) and values.dtype == np.int64:
        return values.reshape(-1)
    array = np.asarray(values) if values is not None else None
    if array is None or array.dtype == object or (array.size and (array.dtype == np.bool_
                                                                  or not np.issubdtype(array.dtype, np.integer))):
        shown = "None" if array is None else f"{array.dtype} values {array.reshape(-1)[:3].tolist()}"
        raise InvalidDecisionError(f"request ids must be integers (a list or an integer array), got {shown}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InvalidDecisionError(f"request id {int(array.max())} is beyond int64")
    return array.astype(np.int64, copy=False).reshape(-1)


@dataclass(frozen=True)
class Decision:
    """What the next iteration runs.

    Attributes:
        decode: ids of running requests that decode one token (advance one stage).
        prefill: ids of requests to prefill: waiting requests are admitted by it; running requests
            that are partway through a chunked prefill continue.
        prefill_tokens: tokens of prefill per entry of ``prefill`` (a chunk); ``None`` means the whole
            remaining context of each.
        preempt: running requests to evict (by recompute) before the iteration runs.

    An empty decision (nothing to decode, prefill or preempt) means "run nothing now": the driver
    lets time pass until the next arrival. A decision that only preempts takes no time.
    """

    decode: np.ndarray = field(default_factory=lambda: _EMPTY_IDS)
    prefill: np.ndarray = field(default_factory=lambda: _EMPTY_IDS)
    prefill_tokens: np.ndarray | None = None
    preempt: np.ndarray = field(default_factory=lambda: _EMPTY_IDS)

    @property
    def is_idle(self) -> bool:
        return len(self.decode) == 0 and len(self.prefill) == 0 and len(self.preempt) == 0


IDLE = Decision()


class IterationOutcome(NamedTuple):
    """What one iteration did. Times in seconds, memory in tokens and blocks."""

    start_time: float
    duration: float
    prefill_tokens: int
    decode_tokens: int
    batch_kv_tokens: int
    admitted: np.ndarray  # ids that entered RUNNING this iteration
    finished: np.ndarray  # ids that produced their last token this iteration
    evicted: np.ndarray  # ids evicted (policy preemption or overflow), KV freed, back to the queue
    deferred: np.ndarray  # ids the decision asked to admit that did not fit; still waiting, nothing lost
    kv_tokens_used: int  # after the iteration (finished requests freed)
    kv_blocks_used: int  # after the iteration (finished requests freed)
    peak_blocks_used: int  # during the iteration, before finished requests are freed
    capacity_blocks: int

    @property
    def end_time(self) -> float:
        return self.start_time + self.duration


#: The latest iteration that ran, as :attr:`SchedulerState.last_iteration` gives it (one float64 array, so that
#: compiled code reads it as it is): when it ended, how long it took (measured, on a live engine), and its
#: composition in the cost model's terms (:meth:`~llmsched_env.cost_model.LinearCostModel.iteration_time`).
(LAST_END, LAST_SECONDS, LAST_PREFILL_TOKENS, LAST_DECODE_REQUESTS, LAST_KV_TOKENS,
 LAST_PREFILL_ATTENTION) = range(6)
LAST_ITERATION_FIELDS = 6
NO_ITERATION = np.zeros(LAST_ITERATION_FIELDS)  # before any iteration ran
NO_ITERATION.flags.writeable = False


def last_iteration_row(end: float, seconds: float, prefill_tokens: int, decode_requests: int, kv_tokens: int,
                       prefill_attention: float) -> np.ndarray:
    """:attr:`SchedulerState.last_iteration` of an iteration that ended at ``end`` (read-only: a policy sees it)."""
    row = np.array([end, seconds, prefill_tokens, decode_requests, kv_tokens, prefill_attention], dtype=np.float64)
    row.flags.writeable = False
    return row


class SchedulerState(NamedTuple):
    """What a policy sees before an iteration. Valid until the engine's next ``step``.

    Per-request arrays are read-only and indexed by request id. ``output_len`` is ``None`` when output
    lengths are hidden: a request's length is then revealed only by its finishing.
    """

    now: float
    block_size: int
    capacity_blocks: int
    used_blocks: int
    running: np.ndarray  # ids in admission order (oldest first)
    prompt_len: np.ndarray
    output_len: np.ndarray | None
    context_len: np.ndarray  # prompt + output tokens generated so far (kept across evictions): the KV
    # a request must hold before its next decode; its stage is context_len - prompt_len once prefilled
    kv_tokens: np.ndarray  # tokens in the KV cache now (0 when waiting)
    arrival_time: np.ndarray
    num_evictions: np.ndarray
    num_requests: int  # ids 0 .. num_requests - 1 exist
    num_waiting: int  # the queue's length
    waiting_fn: Callable[[int | None], np.ndarray]  # the queue's first ``limit`` ids (all for None), computed
    # lazily: a policy that never looks pays nothing, and one that reads a prefix pays for the prefix
    retired: int = 0  # ids below are finished and handed over (Engine.retire_finished): their rows read as
    # zeros, and a policy may drop what it keeps per request for them
    last_iteration: np.ndarray = NO_ITERATION  # float64, indexed by LAST_END … LAST_PREFILL_ATTENTION: what a
    # policy that follows the engine's speed reads (llmsched_env.cost_estimate); all zeros before any iteration

    @property
    def waiting(self) -> np.ndarray:
        """Ids in the queue, in queue order (arrival order; evicted requests keep their place). It costs time
        in proportion to the queue: a policy that needs its head reads :meth:`oldest_waiting`."""
        return self.waiting_fn(None)

    def oldest_waiting(self, count: int) -> np.ndarray:
        """The first ``count`` ids of the queue (fewer if fewer wait), in time proportional to ``count``
        while the queue is the newest arrivals (the common case)."""
        return self.waiting_fn(max(int(count), 0))

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return self.capacity_blocks - self.used_blocks

    @property
    def output_lengths_known(self) -> bool:
        return self.output_len is not None

    def decoded(self, ids: np.ndarray) -> np.ndarray:
        """Output tokens generated so far by ``ids`` (their stage, once prefilled)."""
        return self.context_len[ids] - self.prompt_len[ids]

    def blocks_for(self, tokens: np.ndarray | int) -> np.ndarray | int:
        """Blocks that ``tokens`` KV tokens occupy (paged memory)."""
        return -(-tokens // self.block_size)


class Engine(Protocol):
    """A serving engine that runs one iteration at a time under a policy's decisions.

    Implemented by :class:`llmsched_env.simulator.SimulatedEngine` and by the live vLLM backend.
    The engine owns memory accounting and enforces capacity: if a decision would overflow, requests
    are removed newest-admitted first (as vLLM preempts) until it fits; removed running requests are
    evicted by recompute, removed admissions stay in the queue (``IterationOutcome.deferred``).
    """

    @property
    def now(self) -> float: ...

    @property
    def block_size(self) -> int: ...

    @property
    def capacity_blocks(self) -> int: ...

    @property
    def output_lengths_known(self) -> bool: ...

    @property
    def num_requests(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_finished(self) -> int: ...

    def check_fits(self, prompt_len: np.ndarray, output_len: np.ndarray) -> None:
        """Raise :class:`~llmsched_env.errors.RequestTooLargeError` if a request could never finish in memory."""
        ...

    def add_requests(self, arrival_time: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray) -> np.ndarray:
        """Enqueue arrived requests; returns their ids."""
        ...

    def state(self) -> SchedulerState:
        """The scheduler state a policy decides on."""
        ...

    def step(self, decision: Decision) -> IterationOutcome:
        """Run one iteration; raises :class:`~llmsched_env.errors.InvalidDecisionError` on a bad decision."""
        ...

    def advance_to(self, time: float) -> None:
        """Let the engine sit idle until ``time`` (no iteration runs)."""
        ...

    def records(self) -> "RequestRecords":
        """Per-request timings for metrics, of the requests not retired yet (all of them until
        :meth:`retire_finished` is called)."""
        ...

    def retire_finished(self) -> "RequestRecords":
        """Hand over the records of the finished requests that precede every unfinished one (and were not handed
        over before) and free their memory: a long run's evaluation loop calls it so that its memory stays bounded
        by the requests in the system. Their ids stay taken."""
        ...


@dataclass(frozen=True)
class RequestRecords:
    """Per-request outcomes, indexed by id. Times in seconds; NaN where the event has not happened."""

    arrival_time: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    first_token_time: np.ndarray
    finish_time: np.ndarray
    num_evictions: np.ndarray
    decoded: np.ndarray
    status: np.ndarray
