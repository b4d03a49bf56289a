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

from typing import NamedTuple

import numpy as np

from llmsched_env import kernels
from llmsched_env.compiled import compiled, compiled_inlined
from llmsched_env.engine import SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.request_table import RequestColumns

#: At most this many waiting requests are considered for lent memory in one iteration (WAIT, Nested WAIT).
LEND_SCAN = 256
#: Nested WAIT's lookahead sizes each request's remaining output at this quantile of its residual length.
LOOKAHEAD_QUANTILE = 0.9
#: The adaptive margin's levels (``nested-wait-margin``), from the boldest to the most cautious, where it starts:
#: the quantile of each request's residual length its lookahead projects, and the share of the fluid reserve it
#: keeps from lending.
MARGIN_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)
MARGIN_RESERVES = (0.0, 0.25, 0.5, 0.75, 1.0)


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
    return residual_table(np.ascontiguousarray(values, np.int64), np.ascontiguousarray(probabilities, np.float64),
                          float(quantile))


@compiled
def residual_table(values: np.ndarray, mass: np.ndarray, quantile: float) -> np.ndarray:
    """:func:`residual_quantiles`' table. Each conditional distribution's CDF is the running sum of the
    probabilities from its first surviving length, divided by their total (in NumPy's ``cumsum`` order: exact
    whatever the CPU); the scan stops at the quantile, so a table costs ``O(lengths × reach)``, not a cumulative
    sum per length."""
    count = len(values)
    residual = np.ones(values[-1] + 1, dtype=np.int64)
    tail = np.empty(count, dtype=np.float64)  # tail[i] = P(o >= values[i]), summed from the longest
    total = 0.0
    for i in range(count - 1, -1, -1):
        total += mass[i]
        tail[i] = total
    target = quantile - 1e-12
    below = 0  # decoded counts d in [below, values[first]) survive to the same values[first:]
    for first in range(count):
        if values[first] <= below:
            continue
        pick, running = count - 1, 0.0
        for j in range(first, count):
            running += mass[j]
            if running / tail[first] >= target:
                pick = j
                break
        for decoded in range(below, values[first]):
            residual[decoded] = values[pick] - decoded
        below = values[first]
    return residual


# -- the batch's projection kept from one iteration to the next --------------------------------------------------
ORIGIN, END = 0, 1  # indices of HeldProfile.span


class HeldProfile(NamedTuple):
    """The KV blocks a running batch is projected to hold at each coming iteration, by absolute iteration number.

    A request with trajectory ``(context, remaining)`` after iteration ``now`` holds ``ceil((base + τ) / B)``
    blocks at iterations ``τ = now + 1 … end`` with ``base = context − now`` and ``end = now + remaining``. One
    that decodes in the iteration keeps its ``base``, and with known lengths its ``end`` too: the batch's
    projection is a sum of staircases that mostly stay put from one iteration to the next, so a compiled policy
    loop keeps it (:class:`BatchProjection`) and moves only the staircases that changed, where recomputing it
    (:func:`~llmsched_env.kernels.fitting_prefix`) costs ``O(batch · B)``; a candidate is then tested in
    ``O(longest projection)`` (:func:`held_fits`).

    ``blocks`` is circular (iteration ``τ`` at ``τ mod len(blocks)``, a power of two) and holds iterations
    ``span[ORIGIN] + 1 … span[END]``, zeros everywhere else.
    """

    blocks: np.ndarray  # int64[2^k]
    span: np.ndarray  # int64[2]: ORIGIN (the last iteration done), END (the last iteration anyone holds KV)


class BatchProjection(NamedTuple):
    """A running batch's :class:`HeldProfile` with each request's staircase, ``base[j]`` and ``end[j]`` for the
    ``j``-th running request, so that the ones that leave or move can be taken out or redrawn
    (:func:`carry_batch`, :func:`redraw`)."""

    held: HeldProfile
    base: np.ndarray  # int64, by position in the running array
    end: np.ndarray  # int64


@compiled
def _profile_size(length: int) -> int:
    """The circular profile's size for trajectories of up to ``length`` iterations: a power of two above it."""
    size = 16
    while size <= length:
        size *= 2
    return size


@compiled
def _empty_profile(length: int, origin: int) -> HeldProfile:
    size = _profile_size(length)
    span = np.empty(2, dtype=np.int64)
    span[ORIGIN] = origin
    span[END] = origin
    return HeldProfile(np.zeros(size, dtype=np.int64), span)


@compiled
def no_profile() -> HeldProfile:
    """A profile of no batch, drawn after no iteration (``origin`` −1): what a compiled loop that keeps its
    batch's projection from call to call starts from, so that its first call draws one."""
    return _empty_profile(16, -1)


@compiled
def held_profile(context: np.ndarray, remaining: np.ndarray, block_size: int, origin: int) -> HeldProfile:
    """The projection of the batch ``(context, remaining)`` (:func:`trajectories`) after iteration ``origin``."""
    held = _empty_profile(16, origin)
    for j in range(len(context)):
        held = held_add(held, context[j], remaining[j], block_size)
    return held


@compiled_inlined
def held_advance(held: HeldProfile, origin: int) -> None:
    """Move the profile's start to after iteration ``origin`` (the iterations done since are forgotten)."""
    blocks, span = held.blocks, held.span
    mask = len(blocks) - 1
    for tau in range(span[ORIGIN] + 1, min(origin, span[END]) + 1):
        blocks[tau & mask] = 0
    span[ORIGIN] = origin
    span[END] = max(span[END], origin)


@compiled_inlined
def _max_run(blocks: np.ndarray, first: int, last: int) -> int:
    """The most blocks held at iterations ``first … last`` (0 for none; at most ``len(blocks)`` of them, as a
    profile holds): over at most two contiguous stretches of the circular array (loops the compiler
    vectorises)."""
    most = 0
    if last < first:
        return most
    mask = len(blocks) - 1
    start, stop = first & mask, last & mask
    if start > stop:  # wraps around
        for index in range(start, len(blocks)):
            most = max(most, blocks[index])
        start = 0
    for index in range(start, stop + 1):
        most = max(most, blocks[index])
    return most


@compiled_inlined
def _add_run(blocks: np.ndarray, first: int, last: int, amount: int) -> None:
    """Add ``amount`` at iterations ``first … last`` (``last >= first``, at most ``len(blocks)`` of them) of the
    circular array, over at most two contiguous stretches."""
    mask = len(blocks) - 1
    start, stop = first & mask, last & mask
    if start > stop:  # wraps around
        for index in range(start, len(blocks)):
            blocks[index] += amount
        start = 0
    for index in range(start, stop + 1):
        blocks[index] += amount


@compiled
def _staircase(held: HeldProfile, base: int, first: int, last: int, sign: int, block_size: int) -> HeldProfile:
    """Add ``sign · ceil((base + τ) / B)`` at iterations ``τ = first … last`` (all after the origin): the profile,
    a larger one where ``last`` is beyond its reach."""
    origin, end = held.span[ORIGIN], held.span[END]
    if last - origin >= len(held.blocks):
        grown = _empty_profile(2 * (last - origin), origin)
        mask, grown_mask = len(held.blocks) - 1, len(grown.blocks) - 1
        for tau in range(origin + 1, end + 1):
            grown.blocks[tau & grown_mask] = held.blocks[tau & mask]
        grown.span[END] = end
        held = grown
    own = -(-(base + first) // block_size)
    step = own * block_size - base  # the last iteration at `own` blocks: the staircase steps up after it
    tau = first
    while tau <= last:  # one stretch per step, each a run of equal adds
        stop = min(step, last)
        _add_run(held.blocks, tau, stop, sign * own)
        tau, step, own = stop + 1, step + block_size, own + 1
    if sign > 0:
        held.span[END] = max(end, last)
    return held


@compiled
def held_add(held: HeldProfile, context: int, remaining: int, block_size: int) -> HeldProfile:
    """The profile with request ``(context, remaining)`` in the batch (see :func:`_staircase` on growth)."""
    origin = held.span[ORIGIN]
    return _staircase(held, context - origin, origin + 1, origin + remaining, 1, block_size)


@compiled
def held_remove(held: HeldProfile, context: np.ndarray, remaining: np.ndarray, block_size: int) -> None:
    """Take requests :func:`held_add` put in back out (the origin unchanged since)."""
    origin = held.span[ORIGIN]
    for j in range(len(context)):
        _staircase(held, context[j] - origin, origin + 1, origin + remaining[j], -1, block_size)


@compiled_inlined
def held_peak(held: HeldProfile) -> int:
    """The projected peak: the most blocks the batch holds at any coming iteration
    (:func:`~llmsched_env.kernels.peak_blocks` of its trajectories)."""
    return _max_run(held.blocks, held.span[ORIGIN] + 1, held.span[END])


@compiled
def held_fits(held: HeldProfile, context: int, remaining: int, block_size: int, limit_blocks: int) -> bool:
    """Whether the batch's projected peak with one more request ``(context, remaining)`` stays within
    ``limit_blocks``: ``max_t held(now + t) + [t <= remaining]·ceil((context + t) / B) <= limit``."""
    blocks, origin, end = held.blocks, held.span[ORIGIN], held.span[END]
    mask = len(blocks) - 1
    last = origin + remaining
    own = -(-(context + 1) // block_size)  # the request's blocks at t = 1 …
    left = own * block_size - context  # … for this many iterations, then one more
    for tau in range(origin + 1, min(last, end) + 1):  # beyond the batch's end, the request's own blocks alone
        if blocks[tau & mask] + own > limit_blocks:
            return False
        left -= 1
        if left == 0:
            own += 1
            left = block_size
    if last > end and -(-(context + remaining) // block_size) > limit_blocks:
        return False
    return _max_run(blocks, last + 1, end) <= limit_blocks


@compiled
def held_fitting_prefix(held: HeldProfile, context: np.ndarray, remaining: np.ndarray, block_size: int,
                        limit_blocks: int) -> tuple[int, HeldProfile]:
    """:func:`fitting_prefix` against the profile: how many of the candidates, in order, fit (:func:`held_fits`),
    and the profile with them added (:func:`held_remove` takes them out again). When the peak plus every
    candidate's largest size fits, all do, and none is tested."""
    if _all_fit(held_peak(held), context, remaining, block_size, limit_blocks):
        for j in range(len(context)):
            held = held_add(held, context[j], remaining[j], block_size)
        return len(context), held
    for j in range(len(context)):
        if not held_fits(held, context[j], remaining[j], block_size, limit_blocks):
            return j, held
        held = held_add(held, context[j], remaining[j], block_size)
    return len(context), held


@compiled
def _all_fit(peak: int, context: np.ndarray, remaining: np.ndarray, block_size: int, limit_blocks: int) -> bool:
    """A sufficient test: the batch's ``peak`` plus each candidate's largest size (at its last iteration) fits."""
    bound = peak
    for j in range(len(context)):
        bound += -(-(context[j] + remaining[j]) // block_size)
        if bound > limit_blocks:
            return False
    return bound <= limit_blocks


@compiled
def held_fitting_count(held: HeldProfile, peak: int, context: np.ndarray, remaining: np.ndarray, block_size: int,
                       limit_blocks: int) -> int:
    """How many of the candidates, in order, fit (:func:`held_fitting_prefix`), the profile left as it was (it must
    not grow: see :func:`project_batch`); ``peak`` is its :func:`held_peak`. When the peak plus every
    candidate's largest size fits, all do, without a pass over the profile per candidate."""
    if _all_fit(peak, context, remaining, block_size, limit_blocks):
        return len(context)
    count, grown = held_fitting_prefix(held, context, remaining, block_size, limit_blocks)
    if len(grown.blocks) != len(held.blocks):
        raise AssertionError("held_fitting_count: a candidate longer than the projection was made for")
    held_remove(held, context[:count], remaining[:count], block_size)
    return count


@compiled_inlined
def trajectory(i: int, columns: RequestColumns, residual: np.ndarray) -> tuple[int, int]:
    """Request ``i``'s ``(context, remaining)``: :func:`trajectories` with its output length known (``residual``
    empty), else with its remaining output taken from ``residual`` by decoded count (Nested WAIT's lookahead,
    :func:`residual_quantiles`; a request partway through a prefill is not distinguished there)."""
    context, cached = columns.context[i], columns.kv_tokens[i]
    if len(residual) == 0:
        remaining = columns.prompt[i] + columns.output[i] - context
        if cached > 0 and cached < context:  # partway through a prefill the engine split
            remaining += 1
    else:
        remaining = residual[min(context - columns.prompt[i], len(residual) - 1)]
    if cached == 0:  # waiting: its prefill iteration holds the whole context
        context -= 1
        remaining += 1
    return context, remaining


@compiled
def trajectories_of(ids: np.ndarray, columns: RequestColumns, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`trajectory` of each of ``ids``."""
    context = np.empty(len(ids), dtype=np.int64)
    remaining = np.empty(len(ids), dtype=np.int64)
    for j in range(len(ids)):
        context[j], remaining[j] = trajectory(ids[j], columns, residual)
    return context, remaining


@compiled
def project_batch(running: np.ndarray, columns: RequestColumns, residual: np.ndarray, block_size: int,
                  origin: int) -> BatchProjection:
    """The projection of the running batch after iteration ``origin`` (:func:`trajectory` of each). With
    ``residual`` lengths, no trajectory is longer than ``max(residual) + 1``: the profile is made that long at
    once, so that it never grows (and :func:`held_fitting_prefix` hands back the same profile)."""
    base = np.empty(len(running), dtype=np.int64)
    end = np.empty(len(running), dtype=np.int64)
    held = _empty_profile(_longest(residual), origin)
    for j in range(len(running)):
        context, remaining = trajectory(running[j], columns, residual)
        base[j], end[j] = context - origin, origin + remaining
        held = _staircase(held, base[j], origin + 1, end[j], 1, block_size)
    return BatchProjection(held, base, end)


@compiled
def fits_lookahead(held: HeldProfile, residual: np.ndarray) -> bool:
    """Whether every trajectory at the ``residual`` lengths fits in ``held`` without its growing: what
    :func:`project_batch` of them would make is no longer (a longer one is drawn anew)."""
    return _profile_size(_longest(residual)) <= len(held.blocks)


@compiled
def _longest(residual: np.ndarray) -> int:
    """The length :func:`project_batch` makes a profile for: the longest trajectory at the ``residual`` lengths."""
    longest = 16
    for r in residual:
        longest = max(longest, r + 1)
    return longest


@compiled
def no_projection() -> BatchProjection:
    """The projection of no batch after no iteration (:func:`no_profile`): what a compiled loop that keeps its
    batch's projection from call to call starts from, so that its first call draws one."""
    return BatchProjection(no_profile(), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


@compiled
def redraw(projection: BatchProjection, j: int, context: int, remaining: int, block_size: int) -> None:
    """Move the ``j``-th running request's staircase to its trajectory now, ``(context, remaining)`` after the
    profile's origin (a request that did not decode, or whose projected end jumped). The profile must not
    grow (a :func:`project_batch` of residual lengths never does)."""
    held = projection.held
    origin = held.span[ORIGIN]
    base, end = context - origin, origin + remaining
    old_base, old_end = projection.base[j], projection.end[j]
    if end - origin >= len(held.blocks):
        raise AssertionError("redraw: a trajectory longer than the projection was made for")
    if base != old_base:
        _staircase(held, old_base, origin + 1, old_end, -1, block_size)
        _staircase(held, base, origin + 1, end, 1, block_size)
    elif end > old_end:
        _staircase(held, base, max(old_end, origin) + 1, end, 1, block_size)
    elif end < old_end:
        _staircase(held, base, end + 1, old_end, -1, block_size)
    projection.base[j], projection.end[j] = base, end


@compiled_inlined
def carry_batch(projection: BatchProjection, before: np.ndarray, running: np.ndarray, columns: RequestColumns,
                residual: np.ndarray, block_size: int, origin: int) -> BatchProjection:
    """The projection after an iteration that took the batch from ``before`` to ``running`` (the survivors in
    their order, then the new admissions, as the engine keeps them) and ended iteration ``origin``: the
    staircases of the requests that left are taken out and those of the new ones put in. The survivors keep
    theirs as drawn; a policy redraws those that moved (:func:`redraw`) when it next reads them (Nested WAIT, as it
    sorts its running requests into segments)."""
    held = projection.held
    held_advance(held, origin)
    base = np.empty(len(running), dtype=np.int64)
    end = np.empty(len(running), dtype=np.int64)
    k = 0
    for j in range(len(before)):
        if k < len(running) and running[k] == before[j]:
            base[k], end[k] = projection.base[j], projection.end[j]
            k += 1
        else:  # finished or evicted
            held = _staircase(held, projection.base[j], origin + 1, projection.end[j], -1, block_size)
    for j in range(k, len(running)):
        context, remaining = trajectory(running[j], columns, residual)
        base[j], end[j] = context - origin, origin + remaining
        held = _staircase(held, base[j], origin + 1, end[j], 1, block_size)
    return BatchProjection(held, base, end)
