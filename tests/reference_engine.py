"""The simulator's model written with NumPy array operations: the reference its compiled iteration is tested against.

:class:`ReferenceEngine` is :class:`~llmsched_env.simulator.SimulatedEngine` with :meth:`step` written as whole-
array operations (validation, the eviction plan, the batch), the way the model reads in ``DESIGN.md``. It shares
the engine's storage, queue and records, and the iteration-time formula (``kernels.batch_seconds``: one
floating-point rule, one function); everything else it does its own way. ``tests/test_simulator.py`` runs both
on random workloads under random policies and compares every iteration's outcome and every record bit for bit.
"""

from __future__ import annotations

import numpy as np

from llmsched_env import kernels
from llmsched_env.engine import FINISHED, RUNNING, WAITING, Decision, IterationOutcome
from llmsched_env.request_table import EMPTY_IDS as _EMPTY
from llmsched_env.request_table import Batch, validated_batch
from llmsched_env.simulator import SimulatedEngine

_sum = np.add.reduce


class ReferenceEngine(SimulatedEngine):
    """:class:`~llmsched_env.simulator.SimulatedEngine` whose iterations run as NumPy array operations."""

    def _validated(self, decision: Decision) -> Batch:
        """The decision's batch with what validating it gathered, or :class:`InvalidDecisionError`."""
        return validated_batch(decision, self._n, self._status, self._prompt, self._context, self._kv.tokens,
                               self._mark)

    def _evict(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        self._kv.free(ids)
        self._status[ids] = WAITING  # generated tokens are kept; the whole context is prefilled again
        self._evictions[ids] += 1
        self._num_waiting += len(ids)
        self._running = self._running[~np.isin(self._running, ids)]
        self._first_maybe_waiting = min(self._first_maybe_waiting, int(ids.min()))

    def _fit_to_capacity(self, batch: Batch) -> tuple[Batch, np.ndarray, np.ndarray]:
        """Remove newest-admitted requests until the iteration fits: ``(batch, evicted, deferred)``.

        Admission order is the running list (oldest first) followed by this decision's new admissions;
        removed running requests are to be evicted, removed admissions are deferred (they stay waiting).
        """
        kv = self._kv
        after = self._mark  # scratch, indexed by id: blocks each candidate would hold after the iteration
        after[self._running] = kv.held_blocks(self._running)
        after[batch.decode] = kv.blocks_for(batch.decode_before + 1)
        after[batch.prefill] = kv.blocks_for(batch.prefill_before + batch.chunk)
        order = np.concatenate([self._running, batch.prefill[batch.is_new]])
        keep = int(np.searchsorted(np.cumsum(after[order]), kv.capacity_blocks, side="right"))
        removed = order[keep:]
        is_new = self._status[removed] == WAITING
        kept_decode = ~np.isin(batch.decode, removed)
        kept_prefill = ~np.isin(batch.prefill, removed)
        fitted = Batch(batch.decode[kept_decode], batch.decode_before[kept_decode], batch.prefill[kept_prefill],
                        batch.prefill_before[kept_prefill], batch.chunk[kept_prefill], batch.is_new[kept_prefill],
                        batch.preempt)
        return fitted, removed[~is_new], removed[is_new]

    def step(self, decision: Decision) -> IterationOutcome:
        """The iteration, as NumPy array operations."""
        batch = self._validated(decision)
        self._evict(batch.preempt)
        evicted, deferred = batch.preempt, _EMPTY
        kv = self._kv
        edge = kv.block_size
        decode_new_blocks = int(np.count_nonzero(batch.decode_before % edge == 0))
        prefill_after = batch.prefill_before + batch.chunk
        prefill_new_blocks = (int(_sum(kv.blocks_for(prefill_after)) - _sum(kv.blocks_for(batch.prefill_before)))
                              if len(batch.prefill) else 0)
        if kv.used_blocks + decode_new_blocks + prefill_new_blocks > kv.capacity_blocks:
            batch, overflow_evicted, deferred = self._fit_to_capacity(batch)
            self._evict(overflow_evicted)
            evicted = np.concatenate([evicted, overflow_evicted])
            decode_new_blocks = int(np.count_nonzero(batch.decode_before % edge == 0))
            prefill_after = batch.prefill_before + batch.chunk
            prefill_new_blocks = int(kv.blocks_for(prefill_after).sum() - kv.blocks_for(batch.prefill_before).sum())
        decode, decode_before, prefill = batch.decode, batch.decode_before, batch.prefill

        num_decode = len(decode)
        prefill_tokens = int(_sum(batch.chunk)) if len(prefill) else 0
        batch_kv = int(_sum(decode_before)) + num_decode + (int(_sum(prefill_after)) if len(prefill) else 0)
        start = self._now
        duration = float(kernels.batch_seconds(self.cost.coefficients(), prefill_tokens, num_decode, batch_kv,
                                               batch.chunk, batch.prefill_before))
        now = self._now = start + duration

        kv.append_token(decode, decode_before, decode_new_blocks)
        decode_after = decode_before + 1  # a decoding request's KV is its whole context
        self._context[decode] = decode_after
        admitted = _EMPTY
        if len(prefill):
            admitted = prefill[batch.is_new]
            if len(admitted):
                self._status[admitted] = RUNNING
                self._num_waiting -= len(admitted)
                self._running = np.concatenate([self._running, admitted])
            kv.set_tokens(prefill, batch.prefill_before, prefill_after, prefill_new_blocks)
            # A completed prefill emits a token; the first one ever is the request's first token (stage 0).
            done = prefill[prefill_after == self._context[prefill]]
            self._first_token[done] = np.fmin(self._first_token[done], now)

        peak_blocks = kv.used_blocks
        finished = decode[decode_after == self._final_context[decode]]
        if len(finished):
            self._status[finished] = FINISHED
            self._finish[finished] = now
            kv.free(finished)
            self._running = self._running[self._status[self._running] == RUNNING]
            self._num_finished += len(finished)

        return IterationOutcome(
            start_time=start, duration=duration, prefill_tokens=prefill_tokens, decode_tokens=num_decode,
            batch_kv_tokens=batch_kv, admitted=admitted, finished=finished, evicted=evicted, deferred=deferred,
            kv_tokens_used=kv.used_tokens, kv_blocks_used=kv.used_blocks, peak_blocks_used=peak_blocks,
            capacity_blocks=kv.capacity_blocks)
