"""Nested WAIT: threshold batching when output lengths are hidden (arXiv 2504.11320, DESIGN.md section 4).

The policy never reads output lengths: a request reveals its length only by finishing, or by
surviving a boundary. Segments cut the decode stages at boundaries ``b_1 < … < b_K``; segment ``k``
covers stages ``(b_{k-1}, b_k]`` (segment 1 starts with the prefill). A request that completes stage
``b_k`` without finishing *waits at the boundary* with its KV kept, to enter segment ``k + 1``.

Each iteration:

1. segment 1 is ready when ``n_1`` prompts wait; segment ``k >= 2`` when ``n_k`` requests wait at its
   boundary. Segments run as a *ready prefix*: segment ``k`` runs only if ``1..k-1`` run. A ready
   segment takes ``n_k`` entrants (oldest first); with the memory lookahead (item 4) it takes its whole
   boundary queue while the lookahead projection of everyone running fits in memory, since the
   requests held back keep their KV anyway and would only wait for the next ``n_k``.
2. cohorts in progress: with ``nested-wait-pausing`` (the paper's rule) a running segment advances up to
   ``n_k`` requests from each of its stages, and everything else pauses, KV kept (with segment 1 not
   ready nothing runs); with ``nested-wait`` (default, the analogue of the variant the authors
   measured for WAIT) every request in progress decodes every iteration and only entries are gated.
3. **overflow guard** (ours; the paper leaves it to its safety buffer): if the chosen batch would
   exceed capacity, no new prompt is admitted and the boundary queues move on whatever their length
   (every non-empty one up to the first empty one): finishing requests is what frees memory, holding
   them at a gate only keeps their KV. If
   that still does not fit, the shallowest segments pause first (their requests are furthest from
   finishing); if not even the deepest fits, the engine's eviction rule (newest first, recompute)
   frees memory, so the system cannot deadlock.

4. **memory lookahead** (ours, ``lookahead``, on for ``nested-wait``): new prompts are admitted only
   while the projected peak KV of everyone running plus them fits, each request's remaining output
   taken at the 90th percentile of its residual length given what it has decoded
   (:func:`baselines.lookahead.residual_quantiles`). Exact for a single output length, conservative by
   the spread of the distribution otherwise; it never reads a request's own length.

5. **lending spare memory** (ours, ``lend_spare_memory``, on for ``nested-wait``): while the lookahead
   projection of everyone running stays within the capacity less a reserve (the fluid optimum's memory
   ``M*`` of the offered load, or ``M^π`` if smaller: with heavy tails ``M^π``, every stage full,
   over-counts by far), every gate opens and prompts are admitted as far as that projection allows:
   holding requests at gates costs latency for nothing when memory is plentiful.

6. **drain** (ours, not in the paper; ``drain_when_idle``, on for ``nested-wait``, off for
   ``nested-wait-pausing``): when the rule would run nothing although requests wait or hold KV, every
   gate opens for whoever is behind it. Otherwise, once arrivals stop (the end of a trace), requests
   below a threshold would be stranded, with their KV, for ever. The paper's rule pauses cohorts
   exactly when segment 1 is not ready, so it keeps its rule.

Requests longer than ``b_K`` (outside the distribution the thresholds were sized on) continue in the
last segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from baselines.cohorts import first_per_group
from baselines.lookahead import LEND_SCAN, fitting_prefix
from baselines.thresholds import NestedWaitThresholds
from llmsched_env.engine import IDLE, Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.kv_cache import projected_peak_blocks

Variant = Literal["measured", "paper"]


@dataclass
class NestedWaitPolicy:
    """Nested WAIT; see the module docstring for the rule and its two variants."""

    thresholds: NestedWaitThresholds
    variant: Variant = "measured"
    name: str = "nested-wait"
    drain_when_idle: bool = True
    lookahead: np.ndarray | None = field(default=None, repr=False)  # residual_quantiles per decoded count
    lend_spare_memory: bool = False
    reserve_tokens: float | None = None  # kept back from lending (default: the pipelines' memory M^π)
    guard_activations: int = field(default=0, init=False)  # iterations where the overflow guard acted
    guard_fallbacks: int = field(default=0, init=False)  # iterations where nothing fit and the engine evicted

    def reset(self, engine: Engine) -> None:
        if self.variant not in ("measured", "paper"):
            raise ConfigError(f"Nested WAIT variant must be 'measured' or 'paper', got {self.variant!r}")
        self.guard_activations = self.guard_fallbacks = 0

    def decide(self, state: SchedulerState) -> Decision:
        bounds, n = self.thresholds.boundaries, self.thresholds.n
        segments = len(bounds)
        running = state.running
        decoded = state.context_len[running] - state.prompt_len[running]  # never the output length
        at_boundary = np.isin(decoded, bounds[:-1])
        segment = np.where(at_boundary, np.searchsorted(bounds, decoded, side="left") + 1,
                           np.minimum(np.searchsorted(bounds, decoded, side="right"), segments - 1))
        waiting = state.oldest_waiting(max(int(n[0]), LEND_SCAN))  # all an iteration can admit
        entrants = np.bincount(segment[at_boundary], minlength=segments)
        entrants[0] = state.num_waiting
        projects = self.lookahead is not None and self.variant == "measured"
        peak = self._projected_peak(state) if projects else None
        # A ready gate lets its whole boundary queue through while the lookahead says the batch fits: the
        # requests behind it hold their KV either way, and making them wait for the next n_k only delays them.
        whole_queues = peak is not None and peak <= state.capacity_blocks
        decision = self._select(state, running, decoded, at_boundary, segment, waiting, entrants >= n,
                                whole_queues=whole_queues)
        if self.lend_spare_memory and peak is not None:
            reserve = self.thresholds.memory_tokens if self.reserve_tokens is None else self.reserve_tokens
            spare = state.capacity_blocks - int(np.ceil(min(reserve, state.capacity_tokens) / state.block_size))
            if spare > 0 and peak <= spare:
                # Memory is plentiful: every gate opens, admissions bounded by the lookahead within the spare;
                # lending only ever adds to what the thresholds would admit.
                lent = self._select(state, running, decoded, at_boundary, segment, waiting, np.ones(segments, bool),
                                    lend_within=spare)
                if lent is not None and (decision is None or len(lent.prefill) >= len(decision.prefill)):
                    decision = lent
        if decision is None:
            # Memory pressure: admit nothing new and let every boundary queue move on toward completion,
            # which is what frees memory, instead of holding requests (and their KV) at the gates.
            self.guard_activations += 1
            decision = self._select(state, running, decoded, at_boundary, segment, waiting[:0], entrants > 0,
                                    under_pressure=True)
            assert decision is not None
        if decision.is_idle and self.drain_when_idle and (state.num_waiting or len(running)):
            # Nothing would run: open every gate (a gate with nobody behind it stays shut) rather than strand
            # requests, with their KV, until enough new arrivals come, which may be never.
            decision = self._select(state, running, decoded, at_boundary, segment, waiting, np.ones(segments, bool),
                                    under_pressure=True)
            assert decision is not None
        return decision

    def _select(self, state: SchedulerState, running: np.ndarray, decoded: np.ndarray, at_boundary: np.ndarray,
                segment: np.ndarray, waiting: np.ndarray, ready: np.ndarray,
                under_pressure: bool = False, lend_within: int | None = None,
                whole_queues: bool = False) -> Decision | None:
        """The batch for gates ``ready``; ``None`` if it would not fit in memory (unless ``under_pressure``,
        where the shallowest segments are trimmed first, and the engine's eviction rule is the last resort).
        An open gate takes ``n_k`` from its boundary queue, or all of it with ``whole_queues`` or when lending."""
        n = self.thresholds.n
        segments = len(n)
        prefix = segments if ready.all() else int(np.argmin(ready))  # segments whose entries open
        active = segments if self.variant == "measured" else prefix  # segments whose cohorts advance

        # Entries: n_k (or all) from each open segment's boundary queue (oldest first), n_1 new prompts.
        chosen = np.zeros(len(running), dtype=bool)
        entering = at_boundary & (segment < prefix)
        whole = whole_queues or lend_within is not None
        chosen[entering] = True if whole else first_per_group(segment[entering], n[segment[entering]])
        progressing = ~at_boundary & (segment < active)
        if self.variant == "measured":
            chosen[progressing] = True
        else:
            chosen[progressing] = first_per_group(decoded[progressing], n[segment[progressing]])
        admit = waiting[: n[0] if lend_within is None else max(int(n[0]), LEND_SCAN)] if prefix > 0 else waiting[:0]
        if len(admit) and self.lookahead is not None and self.variant == "measured":
            admit = self._within_lookahead(state, admit, state.capacity_blocks if lend_within is None else lend_within)

        # KV growth by segment: one block for each request that crosses a block edge, plus the admissions.
        growth = np.bincount(segment[chosen], weights=(state.kv_tokens[running[chosen]] % state.block_size == 0),
                             minlength=segments)
        room = state.capacity_blocks - state.used_blocks - float(np.sum(state.blocks_for(state.context_len[admit])))
        if growth.sum() > room:
            if not under_pressure:
                return None
            # Keep the deepest segments (closest to finishing); trim from segment 1 upward.
            kept_from = int(np.searchsorted(-np.cumsum(growth[::-1])[::-1], -room, side="left"))
            if kept_from >= segments:
                self.guard_fallbacks += 1  # not even the deepest fits: the engine evicts (newest first)
            else:
                chosen &= segment >= kept_from
        decode = running[chosen]
        if len(decode) == 0 and len(admit) == 0:
            return IDLE
        return Decision(decode=decode, prefill=admit)

    def _trajectories(self, state: SchedulerState, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(context, remaining)`` of ``ids`` with each remaining output at the lookahead quantile of its residual
        length given what it has decoded. Running requests (gated ones too: they keep their KV) hold their
        context; a waiting one (an evicted one resumes past its prompt) holds it at its prefill, one iteration
        more (as :func:`baselines.lookahead.trajectories`)."""
        residual = self.lookahead
        assert residual is not None
        context = state.context_len[ids].astype(np.int64)
        remaining = residual[np.minimum(context - state.prompt_len[ids], len(residual) - 1)]
        waiting = state.kv_tokens[ids] == 0
        return np.where(waiting, context - 1, context), np.where(waiting, remaining + 1, remaining)

    def _projected_peak(self, state: SchedulerState) -> int:
        return projected_peak_blocks(*self._trajectories(state, state.running), state.block_size)

    def _within_lookahead(self, state: SchedulerState, admit: np.ndarray, limit_blocks: int) -> np.ndarray:
        """The queue-order prefix of ``admit`` whose projected peak stays within ``limit_blocks``."""
        context, remaining = self._trajectories(state, state.running)
        count = fitting_prefix(context, remaining, *self._trajectories(state, admit), state.block_size, limit_blocks)
        return admit[:count]
