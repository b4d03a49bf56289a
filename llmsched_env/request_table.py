"""Per-request state as parallel NumPy columns indexed by id, and the checks every engine applies to it.

Both engines (the simulator and the live vLLM backend) keep their requests this way and validate
new requests and decisions here, so a decision that is valid on one engine is valid on the other,
and a bad one gets the same message on both.
"""

from __future__ import annotations

import mmap
from typing import NamedTuple

import numpy as np

from llmsched_env.engine import FINISHED, RUNNING, WAITING, Decision, RequestRecords, as_ids
from llmsched_env.errors import ConfigError, InvalidDecisionError

EMPTY_IDS = np.empty(0, dtype=np.int64)
_EMPTY_BOOL = np.empty(0, dtype=bool)
# Direct ufunc reductions: the simulator's hot path calls them a dozen times per iteration on small
# arrays, where the ndarray-method wrappers cost as much as the work.
_max, _any = np.maximum.reduce, np.logical_or.reduce

#: The columns every engine keeps, indexed by id: attribute name → (dtype, value a new request starts with; the
#: engine writes it when the request is added, :func:`start_rows`).
REQUEST_COLUMNS: dict[str, tuple[type, float | int]] = {
    "_arrival": (np.float64, np.nan),
    "_prompt": (np.int64, 0),
    "_output": (np.int64, 0),
    "_context": (np.int64, 0),  # prompt + output tokens generated so far (kept across evictions)
    "_status": (np.int8, FINISHED),
    "_first_token": (np.float64, np.nan),
    "_finish": (np.float64, np.nan),
    "_evictions": (np.int64, 0),
    "_mark": (np.int64, -1),  # scratch for validation (and the simulator's eviction planning)
}


class RequestColumns(NamedTuple):
    """The simulator's request table, one entry per request id: what its compiled iteration
    (:func:`~llmsched_env.iteration.iterate`) and the
    environment's compiled step read and write in place. The engine that owns the columns hands out this
    view (:meth:`~llmsched_env.simulator.SimulatedEngine.request_columns`)."""

    status: np.ndarray  # int8: WAITING, RUNNING or FINISHED
    prompt: np.ndarray  # int64 prompt tokens
    output: np.ndarray  # int64 output tokens (the simulator knows them; a policy may not)
    context: np.ndarray  # int64 prompt + output generated so far
    final_context: np.ndarray  # int64 prompt + output: finished when reached
    arrival: np.ndarray  # float64 arrival time (s)
    first_token: np.ndarray  # float64 time of the first output token (s)
    finish: np.ndarray  # float64 finish time (s)
    mark: np.ndarray  # int64 scratch of an iteration's validation and eviction plan
    kv_tokens: np.ndarray  # int64 KV tokens held
    evictions: np.ndarray  # int64 times evicted


#: Columns of at least this many bytes live in an anonymous memory map: the OS commits a page when it is first
#: written, and :func:`release_ids` hands the pages of retired requests back (a NumPy array cannot shrink in place).
_MAPPED_FROM_BYTES = 1 << 20
_RELEASE_STEP = 4096  # entries: a few pages


def allocate_column(size: int, dtype: type) -> np.ndarray:
    """A zero-filled column of ``size`` slots; large ones are memory-mapped so that :func:`release_ids` can free
    the memory of a prefix while the ids keep indexing the column."""
    nbytes = size * np.dtype(dtype).itemsize
    if nbytes < _MAPPED_FROM_BYTES or not hasattr(mmap.mmap, "madvise"):
        return np.zeros(size, dtype)
    # Private: released pages of a shared mapping would stay in the shared-memory object (out of the RSS, not freed).
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype)


def release_ids(column: np.ndarray, start: int, end: int) -> None:
    """Ids before ``end`` will never be read again, and those before ``start`` were released already: give the
    pages from the one holding ``start`` up to the last that holds only ids before ``end`` back to the OS. They
    read as zeros afterwards. A column not memory-mapped keeps its memory."""
    base = column.base
    buffer = base.obj if isinstance(base, memoryview) else None
    if not isinstance(buffer, mmap.mmap):
        return
    item = column.itemsize
    # Rounding the start down takes the page that the last release had to keep (it held ids then live).
    first = start * item // mmap.PAGESIZE * mmap.PAGESIZE
    last = end * item // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        buffer.madvise(mmap.MADV_DONTNEED, first, last - first)


def grow_columns(owner: object, columns: dict[str, tuple[type, float | int]], old_size: int, size: int,
                 keep_from: int = 0) -> None:
    """Replace ``owner``'s column attributes by zero-filled arrays of ``size`` slots that keep ids ``keep_from ..
    old_size - 1`` (those before ``keep_from`` are retired: their memory is not copied, nor committed)."""
    for name, (dtype, _) in columns.items():
        fresh = allocate_column(size, dtype)
        if old_size:
            old = getattr(owner, name)
            if old_size > keep_from:
                fresh[keep_from:old_size] = old[keep_from:old_size]
            release_ids(old, 0, old_size)  # a view a policy kept of the old column must not keep its memory
        setattr(owner, name, fresh)


def start_rows(owner: object, columns: dict[str, tuple[type, float | int]], start: int, end: int) -> None:
    """Write the starting value of every column into the rows of new ids ``start .. end - 1``."""
    for name, (_, value) in columns.items():
        getattr(owner, name)[start:end] = value


class Int64Buffer:
    """An int64 array appended to in amortised O(1) per element: ``data[:size]`` holds what was appended.

    A prefix that will not be read again can be released (:meth:`release_below`): its memory goes back to the OS
    (it reads as zeros), so a buffer indexed by request id or queue position stays as large as its live part.
    """

    def __init__(self, start: int = 0) -> None:
        """An empty buffer, or with ``start`` entries already released (never to be read)."""
        self.data = allocate_column(max(64, 2 * start), np.int64)  # untouched pages cost nothing
        self.size = start
        self.released = start  # data[:released] is given back

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.data):
            grown = allocate_column(max(end, 2 * len(self.data)), np.int64)
            grown[self.released:self.size] = self.data[self.released:self.size]
            release_ids(self.data, 0, self.size)
            self.data = grown
        self.data[self.size:end] = values
        self.size = end

    def release_below(self, index: int) -> None:
        """``data[:index]`` will not be read again (released in steps of 4,096 entries, a few pages)."""
        index = min(index, self.size)
        if index - self.released >= _RELEASE_STEP:
            release_ids(self.data, self.released, index)
            self.released = index


def checked_arrivals(arrival_time: np.ndarray, prompt_len: np.ndarray,
                     output_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New requests as typed arrays, or :class:`ConfigError` naming the first bad one."""
    arrival_time = np.asarray(arrival_time, np.float64)
    prompt_len = np.asarray(prompt_len, np.int64)
    output_len = np.asarray(output_len, np.int64)
    count = len(arrival_time)
    if len(prompt_len) != count or len(output_len) != count:
        raise ConfigError("arrival_time, prompt_len and output_len must have the same length")
    if count and min(np.minimum.reduce(prompt_len), np.minimum.reduce(output_len)) < 1:
        bad = int(np.flatnonzero((prompt_len < 1) | (output_len < 1))[0])
        raise ConfigError(f"request {bad} of this batch has prompt {int(prompt_len[bad])} and output "
                          f"{int(output_len[bad])} tokens; both must be >= 1")
    return arrival_time, prompt_len, output_len


def records_of(owner: object, start: int, end: int) -> RequestRecords:
    """Copies of ``owner``'s columns (:data:`REQUEST_COLUMNS`) for ids ``start .. end - 1``, as
    :class:`RequestRecords`."""
    window = slice(start, end)
    column = {name: getattr(owner, name)[window] for name in REQUEST_COLUMNS}
    return RequestRecords(
        arrival_time=column["_arrival"].copy(), prompt_len=column["_prompt"].copy(),
        output_len=column["_output"].copy(), first_token_time=column["_first_token"].copy(),
        finish_time=column["_finish"].copy(), num_evictions=column["_evictions"].copy(),
        decoded=column["_context"] - column["_prompt"], status=column["_status"].copy())


def retire_rows(owner: object, columns: dict[str, tuple[type, float | int]], start: int,
                n: int) -> tuple[RequestRecords, int]:
    """Retire the finished requests from id ``start`` up to the first unfinished one (of ``n``): their records,
    and the id where the prefix ends. Their rows in ``columns`` are released (:func:`release_ids`). What both
    engines' ``retire_finished`` do."""
    unfinished = np.flatnonzero(getattr(owner, "_status")[start:n] != FINISHED)  # columns go by their names
    end = start + int(unfinished[0]) if len(unfinished) else n
    records = records_of(owner, start, end)
    for name in columns:
        release_ids(getattr(owner, name), start, end)
    return records, end


def describe_request(i: int, status: np.ndarray, prompt: np.ndarray, context: np.ndarray, kv: np.ndarray) -> str:
    """``"running, prompt 60, decoded 12, KV tokens 72"``: what error messages say of a request."""
    state = {WAITING: "waiting", RUNNING: "running", FINISHED: "finished"}[int(status[i])]
    return f"{state}, prompt {int(prompt[i])}, decoded {int(context[i] - prompt[i])}, KV tokens {int(kv[i])}"


class Batch(NamedTuple):
    """A validated decision, with the per-request values validation already gathered."""

    decode: np.ndarray
    decode_before: np.ndarray  # KV tokens of each decode before the iteration (= its context)
    prefill: np.ndarray
    prefill_before: np.ndarray  # KV tokens of each prefill before the iteration
    chunk: np.ndarray  # prompt/context tokens each prefill processes
    is_new: np.ndarray  # the prefill admits a waiting request
    preempt: np.ndarray


def _check_ids(ids: np.ndarray, decision: Decision, n: int, mark: np.ndarray) -> None:
    """Every id exists and appears once across decode, prefill and preempt."""
    if not len(ids):
        return
    # Viewed as unsigned, a negative id is huge: one max finds ids out of range on either side.
    if _max(ids.view(np.uint64)) >= n:
        for what in ("decode", "prefill", "preempt"):
            part = as_ids(getattr(decision, what))
            bad = part[(part < 0) | (part >= n)]
            if len(bad):
                raise InvalidDecisionError(f"{what}: unknown request id {int(bad[0])}; ids are 0..{n - 1}")
    # Writing positions then reading them back finds repeats in O(n) without sorting.
    positions = np.arange(len(ids))
    mark[ids] = positions
    repeated = mark[ids] != positions
    if _any(repeated):
        bad = int(ids[np.flatnonzero(repeated)[0]])
        raise InvalidDecisionError(f"request {bad} appears more than once in the decision "
                                   f"(decode, prefill and preempt must be disjoint)")


def validated_batch(decision: Decision, n: int, status: np.ndarray, prompt: np.ndarray, context: np.ndarray,
                    kv: np.ndarray, mark: np.ndarray) -> Batch:
    """The decision's batch with what validating it gathered, or :class:`InvalidDecisionError` (nothing changes).

    ``n`` requests exist; ``status``, ``prompt``, ``context`` and ``kv`` (KV tokens held) are their
    columns; ``mark`` is a scratch column the check may overwrite.
    """
    decode, prefill, preempt = as_ids(decision.decode), as_ids(decision.prefill), as_ids(decision.preempt)
    _check_ids(np.concatenate([decode, prefill, preempt]) if len(prefill) or len(preempt) else decode, decision,
               n, mark)
    # Only a running request with its whole context cached has kv == context (waiting and finished hold 0).
    decode_tokens = kv[decode]
    bad = decode_tokens != context[decode]
    if _any(bad):
        i = int(decode[np.flatnonzero(bad)[0]])
        raise InvalidDecisionError(f"decode: request {i} cannot decode: it is "
                                   f"{describe_request(i, status, prompt, context, kv)}")
    if len(preempt):
        bad = status[preempt] != RUNNING
        if bad.any():
            i = int(preempt[np.flatnonzero(bad)[0]])
            raise InvalidDecisionError(f"preempt: request {i} is not running: it is "
                                       f"{describe_request(i, status, prompt, context, kv)}")
    if not len(prefill):
        return Batch(decode, decode_tokens, prefill, EMPTY_IDS, EMPTY_IDS, _EMPTY_BOOL, preempt)
    prefill_tokens = kv[prefill]
    remaining = context[prefill] - prefill_tokens
    prefill_status = status[prefill]
    bad = (prefill_status == FINISHED) | (remaining <= 0)
    if _any(bad):
        i = int(prefill[np.flatnonzero(bad)[0]])
        raise InvalidDecisionError(f"prefill: request {i} has nothing to prefill: it is "
                                   f"{describe_request(i, status, prompt, context, kv)}")
    if decision.prefill_tokens is None:
        chunk = remaining
    else:
        chunk = np.asarray(decision.prefill_tokens, np.int64).reshape(-1)
        if len(chunk) != len(prefill):
            raise InvalidDecisionError(f"prefill_tokens has {len(chunk)} entries for {len(prefill)} prefills")
        bad = (chunk < 1) | (chunk > remaining)
        if _any(bad):
            k = int(np.flatnonzero(bad)[0])
            raise InvalidDecisionError(
                f"prefill_tokens: request {int(prefill[k])} asked for a chunk of {int(chunk[k])} tokens; "
                f"allowed 1..{int(remaining[k])} (its remaining context)")
    return Batch(decode, decode_tokens, prefill, prefill_tokens, chunk, prefill_status == WAITING, preempt)
