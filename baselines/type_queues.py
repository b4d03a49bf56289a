"""The waiting queue split by request type, kept up to date in time proportional to what changed.

WAIT needs, at every iteration, how many requests of each type wait and the oldest ``n_j`` of each ready
type. Read off the engine's whole queue, that costs time in proportion to the queue, and a queue that
grows (an overloaded run) makes the run quadratic in its horizon. :class:`TypeQueues` instead follows
the queue from one iteration to the next through what changes: the arrivals since the last look, the
requests the policy took, and the running requests that left the batch without finishing (evicted: back
in the queue). Each look costs ``O(new + taken + running)``, whatever the queue's length.

Queue order is request id (the engine's: an evicted request keeps its place), so within a type the queue
is the type's ids in order, less those taken, plus those returned: an array with a head index, and a short
sorted list of returned ids merged in front where they belong.
"""

from __future__ import annotations

import numpy as np

from llmsched_env import kernels
from llmsched_env.engine import SchedulerState
from llmsched_env.request_table import Int64Buffer

_EMPTY = np.empty(0, dtype=np.int64)


class TypeQueues:
    """The waiting requests of each of ``num_types`` types, in queue order (see the module docstring).

    Call :meth:`update` once per decision with the state and every request's type; :meth:`take` the
    requests the decision admits; a request the engine then defers (it stayed in the queue) is found at
    the next :meth:`update` and put back. Requests must have known output lengths (to tell a request
    that left the batch finished from one that was evicted).
    """

    def __init__(self, num_types: int) -> None:
        self._ids = [Int64Buffer() for _ in range(num_types)]
        self._head = np.zeros(num_types, dtype=np.int64)
        self._returned: list[np.ndarray] = [_EMPTY] * num_types
        self._seen = 0
        self._running = _EMPTY
        self._taken = _EMPTY

    def update(self, state: SchedulerState, types: np.ndarray) -> None:
        """Follow the queue to ``state``: arrivals since the last update, requests taken but deferred,
        and running requests evicted since (all back in their type's queue)."""
        assert state.output_len is not None
        if state.num_requests > self._seen:
            new = np.arange(self._seen, state.num_requests)
            # Requests the engine ran before this policy first looked (a hand-made step) are not queued.
            final = state.prompt_len[new] + state.output_len[new]
            new = new[(state.kv_tokens[new] == 0) & (state.context_len[new] < final)]
            new_types = types[new]
            for k in np.unique(new_types):
                self._ids[k].extend(new[new_types == k])
            self._seen = state.num_requests
        back = self._taken[state.kv_tokens[self._taken] == 0]  # taken but not admitted: deferred
        running = state.running
        if len(self._running):
            left = self._running[kernels.not_among(self._running, np.asarray(running, dtype=np.int64))]
            unfinished = state.context_len[left] < state.prompt_len[left] + state.output_len[left]
            back = np.concatenate([back, left[unfinished & (state.kv_tokens[left] == 0)]])
        for k in np.unique(types[back]) if len(back) else ():
            self._returned[k] = np.union1d(self._returned[k], back[types[back] == k])
        self._running = np.array(running, dtype=np.int64)
        self._taken = _EMPTY
        kv = state.kv_tokens
        for k, queue in enumerate(self._ids):  # admitted by someone else (a hand-made step): no longer queued
            while self._head[k] < queue.size and kv[queue.data[self._head[k]]] > 0:
                self._head[k] += 1
            queue.release_below(int(self._head[k]))  # what left the queue is not read again

    @classmethod
    def of_state(cls, state: SchedulerState, types: np.ndarray, num_types: int) -> "TypeQueues":
        """The queues read off the engine's whole queue (``O(queue)``: for a change of types, not every look)."""
        queues = cls(num_types)
        queues.rebuild(state, types)
        return queues

    def rebuild(self, state: SchedulerState, types: np.ndarray) -> None:
        """Read the queues off the engine's whole queue, forgetting what they held (``O(queue)``)."""
        num_types = len(self._ids)
        waiting = state.waiting
        waiting_types = types[waiting]
        self._ids = [Int64Buffer() for _ in range(num_types)]
        self._head = np.zeros(num_types, dtype=np.int64)
        self._returned = [_EMPTY] * num_types
        self._taken = _EMPTY
        for k in range(num_types):
            self._ids[k].extend(waiting[waiting_types == k])
        self._seen = state.num_requests
        self._running = np.array(state.running, dtype=np.int64)

    def counts(self) -> np.ndarray:
        """How many requests of each type wait."""
        return np.array([q.size - h + len(r) for q, h, r in zip(self._ids, self._head, self._returned)],
                        dtype=np.int64)

    def oldest(self, k: int, count: int, skip: int = 0) -> np.ndarray:
        """Type ``k``'s waiting requests ``skip … skip + count − 1`` in queue order (fewer if fewer wait)."""
        returned = self._returned[k]
        queue = self._ids[k]
        head = int(self._head[k])
        window = queue.data[head: min(queue.size, head + skip + count)]
        merged = np.union1d(returned, window) if len(returned) else window  # union1d sorts (queue order)
        return merged[skip: skip + count]

    def take(self, ids: np.ndarray, types: np.ndarray, expect_admitted: bool = True) -> None:
        """Remove ``ids`` (the decision's admissions, each the oldest of its type after those before it).

        With ``expect_admitted``, those the engine does not admit (deferred) are back in the queue at the next
        :meth:`update`; without, the caller keeps them (a chunked policy's commitments, admitted later)."""
        if len(ids) == 0:
            return
        for k in np.unique(types[ids]):
            mine = ids[types[ids] == k]
            returned = self._returned[k]
            if len(returned):
                kept = ~np.isin(returned, mine)
                mine = mine[~np.isin(mine, returned)]
                self._returned[k] = returned[kept]
            self._head[k] += len(mine)
        if expect_admitted:
            self._taken = np.concatenate([self._taken, ids])
