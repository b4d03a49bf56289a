"""Memory lookahead with known output lengths: the KV a batch will need before it finishes.

With output lengths known, the future of a running batch is known exactly when nothing else is
admitted: every request grows by one token per iteration until it finishes and frees its KV. A
policy that admits a request only when the projected peak of the batch with it fits in the KV cache
never makes the engine evict (each admission keeps the projection within capacity, and nothing
grows faster than projected). Used by WAIT (:mod:`baselines.wait`).

A request's trajectory is ``(context, remaining)``: at the ``t``-th iteration from now
(``t = 1 … remaining``) it holds at most ``context + t`` KV tokens
(:func:`~llmsched_env.kv_cache.projected_peak_blocks`).
"""

from __future__ import annotations

import numpy as np

from llmsched_env import kernels
from llmsched_env.engine import SchedulerState
from llmsched_env.errors import ConfigError

#: At most this many waiting requests are considered for lent memory in one iteration (WAIT, Nested WAIT).
LEND_SCAN = 256
#: Nested WAIT's lookahead sizes each request's remaining output at this quantile of its residual length.
LOOKAHEAD_QUANTILE = 0.9


def trajectories(state: SchedulerState, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(context, remaining)`` of requests ``ids``, running or waiting (see the module docstring).

    * running and decoding (its context cached): ``context_len`` and ``prompt + output − context_len``;
    * waiting: its prefill iteration holds the whole context, so ``context_len − 1`` and one more iteration;
    * partway through a prefill the engine split (a live engine's token budget): ``context_len`` (an upper
      bound while the prefill lasts) and one more iteration. A policy that chunks prefills itself knows
      when each one finishes and projects them itself (``WaitPolicy._after_prefill``).
    """
    if state.output_len is None:
        raise ConfigError("memory lookahead needs output lengths known at arrival")
    context = state.context_len[ids].astype(np.int64)
    final = state.prompt_len[ids] + state.output_len[ids]
    cached = state.kv_tokens[ids]
    remaining = final - context
    waiting = cached == 0
    prefilling = ~waiting & (cached < context)
    context = np.where(waiting, context - 1, context)
    remaining = np.where(waiting, remaining + 1, remaining)
    return context, np.where(prefilling, remaining + 1, remaining)


def fitting_prefix(context: np.ndarray, remaining: np.ndarray, candidate_context: np.ndarray,
                   candidate_remaining: np.ndarray, block_size: int, limit_blocks: int) -> int:
    """How many of the candidates, taken in order, can join the batch with its projected peak
    (:func:`~llmsched_env.kv_cache.projected_peak_blocks`) within ``limit_blocks`` (a binary search: the
    peak only grows as requests join; compiled, :func:`llmsched_env.kernels.fitting_prefix`)."""
    return int(kernels.fitting_prefix(np.asarray(context, np.int64), np.asarray(remaining, np.int64),
                                      np.asarray(candidate_context, np.int64),
                                      np.asarray(candidate_remaining, np.int64),
                                      int(block_size), int(limit_blocks)))


def residual_quantiles(values: np.ndarray, probabilities: np.ndarray, quantile: float) -> np.ndarray:
    """With lengths hidden: per decoded count ``d = 0 … max(values)``, the ``quantile`` of the output tokens a
    request that has decoded ``d`` still has to produce, ``o − d`` given ``o > d`` (1 beyond the longest output).

    A projection with these in place of the true remaining lengths is what Nested WAIT's lookahead uses:
    exact for a single output length, conservative by the spread of the distribution otherwise.
    """
    if not 0 < quantile <= 1:
        raise ConfigError(f"the lookahead quantile must be in (0, 1], got {quantile}")
    values = np.asarray(values, np.int64)
    mass = np.asarray(probabilities, np.float64)
    top = int(values[-1])
    residual = np.ones(top + 1, dtype=np.int64)
    tail = np.cumsum(mass[::-1])[::-1]  # tail[i] = P(o >= values[i])
    for d in range(top):
        first = int(np.searchsorted(values, d, side="right"))  # the first value > d
        survivors = tail[first]
        cdf = np.cumsum(mass[first:]) / survivors
        residual[d] = int(values[first + min(int(np.searchsorted(cdf, quantile - 1e-12)), len(cdf) - 1)]) - d
    return residual
