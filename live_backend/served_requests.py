"""``ServedRequests``: the request table a policy sees while ``vllm serve`` runs it, kept incrementally.

At serve time vLLM's requests arrive with string ids (``cmpl-<hex>-0-<suffix>``), whenever clients send them,
and leave when they finish or their client disconnects. This table gives each a dense index in arrival order
(what :class:`~llmsched_env.engine.SchedulerState` indexes by), and is updated only by what changes: an
arrival, an admission, a preemption, a scheduled request's progress, a finish or an abort. Rebuilding the
view from every vLLM request at every iteration would cost more than vLLM's own scheduling.

Rows of finished requests are retired as soon as every request before them has finished, so a server that
runs for days holds memory in proportion to the requests in the system, not to those it has served.

It is also the :class:`~llmsched_env.engine.Engine` a policy is reset on (``reset`` reads the capacity, the
block size and whether lengths are known); it never steps: vLLM does.
"""

from __future__ import annotations

import math

import numpy as np

from llmsched_env.engine import (
    FINISHED,
    NO_ITERATION,
    RUNNING,
    WAITING,
    SchedulerState,
    last_iteration_row,
    readonly_view,
)
from llmsched_env.errors import RequestTooLargeError
from llmsched_env.request_table import REQUEST_COLUMNS, grow_columns, retire_rows, start_rows

# The shared columns, plus the KV tokens vLLM has computed for each request.
_COLUMNS: dict[str, tuple[type, float | int]] = {**REQUEST_COLUMNS, "_kv": (np.int64, 0)}


class ServedRequests:
    """The policy's view of the requests in a vLLM server (see the module docstring).

    Args:
        capacity_blocks: KV blocks requests can hold (vLLM's cache less its null block).
        block_size: tokens per KV block.
        lengths_known: whether policies see output lengths (``max_tokens - 1`` each) before requests finish.
        max_model_len: the most tokens one request may hold (vLLM's ``max_model_len``).
    """

    def __init__(self, capacity_blocks: int, block_size: int, *, lengths_known: bool, max_model_len: int) -> None:
        self._capacity = int(capacity_blocks)
        self._block_size = int(block_size)
        self._known = bool(lengths_known)
        self._max_len = int(max_model_len)
        self._index: dict[str, int] = {}  # vLLM's id -> dense index, while the request is in the system
        self._running: list[int] = []  # admission order
        self._now = 0.0
        self._n = self._size = self._retired = 0
        self._num_waiting = self._num_finished = 0
        self._last_iteration = NO_ITERATION
        self._grow(256)

    # -- what a policy's reset reads (the Engine protocol's configuration) --------------------------------------
    @property
    def now(self) -> float:
        return self._now

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    @property
    def capacity_tokens(self) -> int:
        return self._capacity * self._block_size

    @property
    def output_lengths_known(self) -> bool:
        return self._known

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

    @property
    def retired(self) -> int:
        """Indices below this one are finished and their rows released."""
        return self._retired

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._index

    def index_of(self, request_id: str) -> int:
        """The dense index of a request in the system (``KeyError`` for one that is not)."""
        return self._index[request_id]

    def status_of(self, index: int) -> int:
        """``WAITING``, ``RUNNING`` or ``FINISHED`` (:mod:`llmsched_env.engine`)."""
        return int(self._status[index])

    # -- changes ------------------------------------------------------------------------------------------------
    def _grow(self, size: int) -> None:
        grow_columns(self, _COLUMNS, self._size, size, keep_from=self._retired)
        self._size = size

    def arrive(self, request_id: str, prompt_len: int, max_tokens: int, now: float) -> int:
        """Add a waiting request; its index. ``max_tokens`` bounds its output (exact with ``lengths_known``).

        Raises:
            RequestTooLargeError: a request whose prompt and output can never fit in the KV cache.
        """
        prompt_len, max_tokens = int(prompt_len), int(max_tokens)
        output_len = max(max_tokens - 1, 1)  # the first token comes from the prefill (docs/model.md)
        peak_blocks = -(-(prompt_len + max_tokens) // self._block_size)
        if peak_blocks > self._capacity or prompt_len + max_tokens > self._max_len:
            raise RequestTooLargeError(
                f"request {request_id} needs {prompt_len + max_tokens} tokens (prompt {prompt_len} + max_tokens "
                f"{max_tokens}), but the server holds {self._capacity} KV blocks of {self._block_size} tokens and at "
                f"most {self._max_len} tokens per request (max_model_len)")
        if self._n == self._size:
            self._grow(max(2 * (self._n - self._retired), 256) + self._n)
        index = self._n
        start_rows(self, _COLUMNS, index, index + 1)
        self._arrival[index] = now
        self._prompt[index] = prompt_len
        self._output[index] = output_len
        self._context[index] = prompt_len
        self._status[index] = WAITING
        self._index[request_id] = index
        self._n += 1
        self._num_waiting += 1
        self._now = max(self._now, now)
        return index

    def admitted(self, indices: list[int]) -> None:
        """Waiting requests that started running (appended to the admission order)."""
        for index in indices:
            if self._status[index] == WAITING:
                self._status[index] = RUNNING
                self._num_waiting -= 1
                self._running.append(index)

    def preempted(self, indices: list[int]) -> None:
        """Running requests evicted by recompute: back to the queue, holding no KV."""
        gone = set()
        for index in indices:
            if self._status[index] == RUNNING:
                self._status[index], self._kv[index] = WAITING, 0
                self._evictions[index] += 1
                self._num_waiting += 1
                gone.add(index)
        if gone:
            self._running = [i for i in self._running if i not in gone]

    def progressed(self, index: int, kv_tokens: int, output_tokens: int, now: float) -> None:
        """A scheduled request's KV tokens and sampled tokens after an iteration."""
        self._kv[index] = kv_tokens
        self._context[index] = self._prompt[index] + max(output_tokens - 1, 0)
        if output_tokens and math.isnan(self._first_token[index]):
            self._first_token[index] = now

    def finished(self, request_id: str, output_tokens: int, now: float, *, aborted: bool = False) -> None:
        """A request left the server: finished (``output_tokens`` sampled in all) or aborted by its client."""
        index = self._index.pop(request_id, None)
        if index is None:
            return
        if self._status[index] == WAITING:
            self._num_waiting -= 1
        elif self._status[index] == RUNNING:
            self._running.remove(index)
        self._status[index], self._kv[index], self._finish[index] = FINISHED, 0, now
        if not aborted:
            # Its length is now known: what hidden-length policies learn their distribution from.
            self._output[index] = max(output_tokens - 1, 1)
            self._context[index] = self._prompt[index] + max(output_tokens - 1, 0)
        self._num_finished += 1
        if index == self._retired:
            _, self._retired = retire_rows(self, _COLUMNS, self._retired, self._n)

    def reconcile(self, running: list[str], computed: dict[str, tuple[int, int]]) -> None:
        """Make the view agree with vLLM after an iteration vLLM scheduled on its own: ``running`` its running
        requests' ids in order, ``computed`` every unfinished request's ``(KV tokens, sampled tokens)``."""
        now_running = [self._index[request_id] for request_id in running if request_id in self._index]
        keep = set(now_running)
        evicted = [i for i in self._running if i not in keep]
        self.preempted(evicted)
        previously = set(self._running)
        self.admitted([i for i in now_running if i not in previously])
        for request_id, (kv, sampled) in computed.items():
            index = self._index.get(request_id)
            if index is not None:
                self.progressed(index, kv if self._status[index] == RUNNING else 0, sampled, self._now)

    def set_now(self, now: float) -> None:
        self._now = max(self._now, now)

    def iteration_ran(self, end: float, seconds: float, prefill_tokens: int, decode_requests: int, kv_tokens: int,
                      prefill_attention: float) -> None:
        """An iteration ended at ``end`` after ``seconds`` (measured), with this composition: what
        :attr:`~llmsched_env.engine.SchedulerState.last_iteration` shows a policy that follows the engine's speed."""
        if seconds > 0:
            self._last_iteration = last_iteration_row(end, seconds, prefill_tokens, decode_requests, kv_tokens,
                                                      prefill_attention)

    # -- what a policy decides on ------------------------------------------------------------------------------
    def _waiting_ids(self, limit: int | None = None) -> np.ndarray:
        ids = self._retired + np.flatnonzero(self._status[self._retired:self._n] == WAITING)
        return ids if limit is None else ids[:limit]

    def state(self, used_blocks: int) -> SchedulerState:
        """The policy's view now; ``used_blocks`` are the KV blocks vLLM reports held."""
        return SchedulerState(
            now=self._now, block_size=self._block_size, capacity_blocks=self._capacity, used_blocks=used_blocks,
            running=readonly_view(np.array(self._running, dtype=np.int64)), prompt_len=readonly_view(self._prompt),
            output_len=readonly_view(self._output) if self._known else None,
            context_len=readonly_view(self._context), kv_tokens=readonly_view(self._kv),
            arrival_time=readonly_view(self._arrival), num_evictions=readonly_view(self._evictions),
            num_requests=self._n, num_waiting=self._num_waiting, waiting_fn=self._waiting_ids, retired=self._retired,
            last_iteration=self._last_iteration)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(status, prompt, context, kv, scratch)``: what :func:`~llmsched_env.request_table.validated_batch`
        checks a decision against."""
        return self._status, self._prompt, self._context, self._kv, self._mark
