"""WAIT: fluid-guided threshold batching with known output lengths (arXiv 2504.11320, DESIGN.md section 4).

Each request is assigned to the nearest type of the configured mix (exact for generated workloads;
for traces the mix is a (prompt, output) bucketing, see :meth:`TypeMix.bucketed`). Thresholds ``n_j``
come from :func:`baselines.thresholds.wait_thresholds`. Type ``j`` is *ready* when at least ``n_j`` of
its requests wait. Two variants, both named policies:

``wait-paper`` — the paper's rule: an iteration takes, for every ready type, ``n_j`` waiting requests
    (its prefill cohort) and up to ``n_j`` running requests from each of its decode stages; types that
    are not ready pause, their KV kept. With no type ready, nothing runs until the next arrival.
``wait`` (default) — the variant the authors measured: admissions are gated the same way (``n_j`` per
    ready type), but every running request decodes every iteration.

Drain (ours, not in the paper; ``drain_when_idle``, on for ``wait``, off for ``wait-paper``): when
nothing runs and nothing is in progress although requests wait, every type is let in (up to
``n_j``). Otherwise, once arrivals stop (the end of a trace), requests below a threshold would wait
for ever. The paper's rule pauses cohorts exactly when no type is ready, so it keeps its rule.

Memory safety (``memory_safe``, on for ``wait``): lengths are known, so the KV the running batch will
need before it finishes is known exactly (:mod:`baselines.lookahead`). A request is admitted only if
the projected peak of the batch with it fits in the cache; admissions are taken in queue order while
they fit. ``wait`` therefore never makes the engine evict, on any trace, at any load (the thresholds
alone keep pipelines within capacity only in the fluid limit: a bursty trace or a long output
overflows them). ``wait-paper`` pauses cohorts, which the projection does not model, so it keeps the
paper's rule and the engine's eviction rule (newest first, recompute) as its backstop.

Lending spare memory (``lend_spare_memory``, on for ``wait``): at light load a cohort of ``n_j`` takes
a while to gather, and waiting for it costs latency for nothing when memory is plentiful. Requests
below a threshold are admitted too while the projected peak stays within the capacity less the
memory WAIT's own pipelines need at equilibrium (``Σ_j n_j·w_j`` in blocks,
:attr:`~baselines.thresholds.WaitThresholds.memory_blocks`). In the memory-bound regime that reserve
is the whole cache and WAIT is WAIT; where memory is plentiful it admits like vLLM, without evicting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from baselines.cohorts import fill_in_order, first_per_group
from baselines.lookahead import LEND_SCAN, fitting_prefix, trajectories
from baselines.thresholds import WaitThresholds, wait_thresholds
from baselines.type_queues import Int64Buffer, TypeQueues
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import IDLE, Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.workload import TypeMix

Variant = Literal["measured", "paper"]
_EMPTY = np.empty(0, np.int64)


@dataclass
class WaitPolicy:
    """WAIT over a type mix; see the module docstring for the two variants."""

    mix: TypeMix
    thresholds: WaitThresholds
    variant: Variant = "measured"
    name: str = "wait"
    drain_when_idle: bool = True
    memory_safe: bool = True
    lend_spare_memory: bool = True
    prefill_chunk: int | None = None
    _types: Int64Buffer = field(default_factory=Int64Buffer, repr=False)
    _committed: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    _queues: TypeQueues = field(default_factory=lambda: TypeQueues(0), repr=False)

    @classmethod
    def for_mix(cls, mix: TypeMix, cost: LinearCostModel, capacity_tokens: int, block_size: int,
                variant: Variant = "measured", prefill_chunk: int | None = None) -> "WaitPolicy":
        measured = variant == "measured"
        name = "wait" if measured else "wait-paper"
        if prefill_chunk is not None:
            name = "wait-chunked"
        return cls(mix, wait_thresholds(mix, cost, capacity_tokens, block_size), variant, name,
                   drain_when_idle=measured, memory_safe=measured, lend_spare_memory=measured,
                   prefill_chunk=prefill_chunk)

    def reset(self, engine: Engine) -> None:
        if not engine.output_lengths_known:
            raise ConfigError(f"{self.name} needs output lengths known at arrival; with hidden lengths use nested-wait")
        if self.variant not in ("measured", "paper"):
            raise ConfigError(f"WAIT variant must be 'measured' or 'paper', got {self.variant!r}")
        if self.variant == "paper" and (self.memory_safe or self.lend_spare_memory):
            raise ConfigError("memory_safe and lend_spare_memory assume every running request decodes each "
                              "iteration: the paper's variant pauses cohorts, so it cannot use them")
        if self.prefill_chunk is not None and (self.variant != "measured" or not self.memory_safe
                                               or self.prefill_chunk < 1):
            raise ConfigError(f"chunked prefill (prefill_chunk >= 1 tokens, got {self.prefill_chunk!r}) needs the "
                              "measured, memory-safe variant")
        self._types = Int64Buffer()
        self._committed = np.empty(0, np.int64)
        self._queues = TypeQueues(len(self.thresholds.n))

    def _classify(self, state: SchedulerState) -> np.ndarray:
        """Every request's type (the nearest of the mix), classified once, on arrival."""
        known = self._types.size
        if state.num_requests > known:
            assert state.output_len is not None
            ids = np.arange(known, state.num_requests)
            self._types.extend(self.mix.nearest(state.prompt_len[ids], state.output_len[ids]))
        return self._types.data

    def _reclassify(self, state: SchedulerState) -> None:
        """Classify every request again on the current mix (an adaptive policy's new classes), and rebuild the
        type queues from the engine's queue."""
        assert state.output_len is not None
        count = state.num_requests
        self._types = Int64Buffer()
        self._types.extend(self.mix.nearest(state.prompt_len[:count], state.output_len[:count]))
        self._queues = TypeQueues.of_state(state, self._types.data, len(self.thresholds.n))

    def decide(self, state: SchedulerState) -> Decision:
        types = self._classify(state)
        queues = self._queues
        queues.update(state, types)  # O(new + taken + running): never the whole queue
        if self.prefill_chunk is not None:
            return self._decide_chunked(state, types)
        n = self.thresholds.n
        queued = queues.counts()
        ready = (queued >= n) & (n > 0)
        decision = self._select(state, types, queued, ready)
        if decision.is_idle and self.drain_when_idle and (queued.any() or len(state.running)):
            # Nothing would run: let every type in (up to n_j) rather than strand requests below a threshold
            # until enough new arrivals come, which may be never.
            decision = self._select(state, types, queued, np.ones(len(n), dtype=bool))
        queues.take(decision.prefill, types)
        return decision

    def _cohorts(self, ready: np.ndarray) -> np.ndarray:
        """The oldest ``n_j`` waiting requests of every ready type, in queue order."""
        n = np.maximum(self.thresholds.n, 1)
        parts = [self._queues.oldest(k, int(n[k])) for k in np.flatnonzero(ready)]
        return np.sort(np.concatenate(parts)) if parts else _EMPTY

    def _following(self, cohorts: np.ndarray, queued: np.ndarray, types: np.ndarray) -> np.ndarray:
        """The oldest ``LEND_SCAN`` waiting requests after ``cohorts`` (each type's oldest), in queue order."""
        in_cohorts = np.bincount(types[cohorts], minlength=len(queued))
        parts = [self._queues.oldest(k, LEND_SCAN, skip=int(in_cohorts[k]))
                 for k in np.flatnonzero(queued > in_cohorts)]
        return np.sort(np.concatenate(parts))[:LEND_SCAN] if parts else _EMPTY

    def _select(self, state: SchedulerState, types: np.ndarray, queued: np.ndarray, ready: np.ndarray) -> Decision:
        n = np.maximum(self.thresholds.n, 1)
        admit = self._cohorts(ready & (queued > 0))

        running = state.running
        if self.variant == "measured":
            decode = running[state.kv_tokens[running] == state.context_len[running]]
            if self.memory_safe and queued.any():
                admit = self._safe_admissions(state, running, queued, admit, types)
        else:
            running_types = types[running]
            running = running[ready[running_types]]
            running_types = running_types[ready[running_types]]
            stage = state.context_len[running] - state.prompt_len[running]
            stride = int(stage.max()) + 1 if len(stage) else 1
            decode = running[first_per_group(running_types * stride + stage, n[running_types])]
        if len(decode) == 0 and len(admit) == 0:
            return IDLE
        return Decision(decode=decode, prefill=admit)

    def _safe_admissions(self, state: SchedulerState, running: np.ndarray, queued: np.ndarray,
                         cohorts: np.ndarray, types: np.ndarray) -> np.ndarray:
        """The cohorts' queue-order prefix whose projected peak fits, then (lending spare memory) whoever
        else waits, in queue order, within the capacity less WAIT's own reserve."""
        context, remaining = trajectories(state, running)
        cohort_context, cohort_remaining = trajectories(state, cohorts)
        count = fitting_prefix(context, remaining, cohort_context, cohort_remaining, state.block_size,
                               state.capacity_blocks)
        admit = cohorts[:count]
        spare = state.capacity_blocks - self.thresholds.memory_blocks
        if not self.lend_spare_memory or count < len(cohorts) or spare <= 0:
            return admit
        others = self._following(admit, queued, types)
        if len(others) == 0:
            return admit
        other_context, other_remaining = trajectories(state, others)
        extra = fitting_prefix(np.concatenate([context, cohort_context[:count]]),
                               np.concatenate([remaining, cohort_remaining[:count]]),
                               other_context, other_remaining, state.block_size, spare)
        return np.sort(np.concatenate([admit, others[:extra]])) if extra else admit

    # -- chunked prefill (wait-chunked) ------------------------------------------------------------------
    def _decide_chunked(self, state: SchedulerState, types: np.ndarray) -> Decision:
        """WAIT with a per-iteration prefill budget of ``prefill_chunk`` tokens (the paper's WAIT on Vidur).

        A ready cohort is *committed* at once (so a cohort is never split by the budget) and prefilled in
        chunks: prefills in progress first, then committed requests, in order. Every prefill's finishing
        iteration is then known (its place in that order over the budget), so the memory lookahead covers
        committed requests before their first chunk, and the policy still never makes the engine evict.
        """
        chunk = int(self.prefill_chunk)  # type: ignore[arg-type]
        assert state.output_len is not None
        running = state.running
        cached, context = state.kv_tokens[running], state.context_len[running]
        decode, partial = running[cached == context], running[cached < context]
        # Committed requests are out of the type queues; those whose prefill has not started still wait.
        committed = self._committed
        final = state.prompt_len[committed] + state.output_len[committed]
        committed = committed[(state.kv_tokens[committed] == 0) & (state.context_len[committed] < final)]

        queue = np.concatenate([partial, committed])  # the prefill order
        left = state.context_len[queue] - state.kv_tokens[queue]
        base_context, base_remaining = trajectories(state, decode)
        queue_context, queue_remaining = self._after_prefill(state, queue, left, 0, chunk)
        base_context = np.concatenate([base_context, queue_context])
        base_remaining = np.concatenate([base_remaining, queue_remaining])
        queued = int(left.sum())

        free = self._queues.counts()
        ready = (free >= self.thresholds.n) & (self.thresholds.n > 0)
        if not ready.any() and self.drain_when_idle and len(running) == 0 and len(committed) == 0:
            ready[:] = True  # an idle engine: let every type in rather than strand requests below a threshold
        cohorts = self._cohorts(ready & (free > 0))
        new = self._commit(state, cohorts, base_context, base_remaining, queued, chunk, state.capacity_blocks)
        if self.lend_spare_memory and len(new) == len(cohorts):
            spare = state.capacity_blocks - self.thresholds.memory_blocks
            others = self._following(new, free, types)
            if spare > 0 and len(others):
                new_context, new_remaining = self._after_prefill(state, new, state.context_len[new], queued, chunk)
                lent = self._commit(state, others, np.concatenate([base_context, new_context]),
                                    np.concatenate([base_remaining, new_remaining]),
                                    queued + int(state.context_len[new].sum()), chunk, spare)
                new = np.concatenate([new, lent])
        self._queues.take(new, types, expect_admitted=False)
        self._committed = np.concatenate([committed, new])

        queue = np.concatenate([partial, self._committed])
        grants = fill_in_order(state.context_len[queue] - state.kv_tokens[queue], chunk, allow_partial=True)
        granted = grants > 0
        if len(decode) == 0 and not granted.any():
            return IDLE
        return Decision(decode=decode, prefill=queue[granted], prefill_tokens=grants[granted])

    @staticmethod
    def _after_prefill(state: SchedulerState, ids: np.ndarray, left: np.ndarray, queued_before: int,
                       chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Trajectories of requests prefilled in this order after ``queued_before`` tokens: request ``i``
        finishes its prefill at iteration ``D_i = ceil(tokens up to it / chunk)``, holding at most its
        context until then, so ``(context, decodes left + D_i)`` bounds it (:mod:`baselines.lookahead`)."""
        assert state.output_len is not None
        context = state.context_len[ids].astype(np.int64)
        finish = -(-(queued_before + np.cumsum(left)) // chunk)
        return context, state.prompt_len[ids] + state.output_len[ids] - context + finish

    def _commit(self, state: SchedulerState, candidates: np.ndarray, context: np.ndarray, remaining: np.ndarray,
                queued: int, chunk: int, limit_blocks: int) -> np.ndarray:
        """The queue-order prefix of ``candidates`` whose projected peak, prefilled after the queue, fits."""
        if len(candidates) == 0:
            return candidates
        cand_context, cand_remaining = self._after_prefill(state, candidates, state.context_len[candidates], queued,
                                                           chunk)
        count = fitting_prefix(context, remaining, cand_context, cand_remaining, state.block_size, limit_blocks)
        return candidates[:count]
