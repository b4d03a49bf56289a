"""The running batch's projection kept across iterations (:class:`baselines.lookahead.HeldProfile`) against the
projection recomputed from scratch each iteration (:func:`llmsched_env.kernels.fitting_prefix`): the same
admissions, exactly, through arrivals, finishes, jumps of the iteration count and growth of the profile."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.lookahead import (
    held_add,
    held_advance,
    held_fits,
    held_fitting_count,
    held_fitting_prefix,
    held_peak,
    held_profile,
)
from llmsched_env import kernels
from llmsched_env.kv_cache import projected_peak_blocks


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), start=st.integers(0, 40), block=st.sampled_from([1, 2, 16, 32]),
       longest=st.sampled_from([8, 200, 3_000]), origin=st.integers(0, 10**9), slack=st.integers(-10, 40))
def test_held_profile_admits_what_the_recomputed_projection_admits(seed: int, start: int, block: int, longest: int,
                                                                   origin: int, slack: int) -> None:
    rng = np.random.default_rng(seed)
    context, remaining = rng.integers(0, 300, start), rng.integers(1, longest, start)
    held = held_profile(context, remaining, block, origin)
    for _ in range(30):
        candidates = int(rng.integers(0, 6))
        candidate_context, candidate_remaining = rng.integers(0, 300, candidates), rng.integers(1, longest, candidates)
        limit = projected_peak_blocks(context, remaining, block) + slack + int(rng.integers(0, 30))
        expected = kernels.fitting_prefix(context, remaining, candidate_context, candidate_remaining, block, limit)
        count, held = held_fitting_prefix(held, candidate_context, candidate_remaining, block, limit)
        assert count == expected
        context = np.concatenate([context, candidate_context[:count]])
        remaining = np.concatenate([remaining, candidate_remaining[:count]])
        # Every request decodes for `steps` iterations (one, as a policy's loop runs; more, as a jump).
        steps = 1 if rng.random() < 0.8 else int(rng.integers(0, 2 * longest))
        context, remaining = context + steps, remaining - steps
        alive = remaining > 0
        context, remaining = context[alive], remaining[alive]
        origin += steps
        held_advance(held, origin)
        assert held.span[1] - held.span[0] <= (int(remaining.max()) if len(remaining) else 0)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 30), block=st.sampled_from([1, 4, 16]))
def test_held_fits_is_the_peak_with_the_candidate_within_the_limit(seed: int, count: int, block: int) -> None:
    rng = np.random.default_rng(seed)
    context, remaining = rng.integers(0, 100, count), rng.integers(1, 80, count)
    held = held_profile(np.empty(0, np.int64), np.empty(0, np.int64), block, 7)
    for c, r in zip(context, remaining):
        held = held_add(held, int(c), int(r), block)
    c, r = int(rng.integers(0, 100)), int(rng.integers(1, 120))
    peak = projected_peak_blocks(np.append(context, c), np.append(remaining, r), block)
    for limit in (peak - 1, peak, peak + 1):
        assert held_fits(held, c, r, block, limit) == (peak <= limit)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(1, 300), min_size=1, max_size=30, unique=True),
       weights=st.lists(st.integers(1, 8), min_size=30, max_size=30), quantile=st.sampled_from([0.1, 0.5, 0.9, 1.0]))
def test_residual_quantiles_are_the_conditional_quantiles(values: list[int], weights: list[int],
                                                         quantile: float) -> None:
    """Per decoded count ``d``: the ``quantile`` of ``o − d`` given ``o > d``, read off the conditional
    distribution itself (1 beyond the longest output)."""
    from baselines.lookahead import residual_quantiles

    support = np.array(sorted(values), dtype=np.int64)
    mass = np.array(weights[:len(support)], dtype=np.float64)
    mass /= mass.sum()
    residual = residual_quantiles(support, mass, quantile)
    assert len(residual) == support[-1] + 1 and residual[-1] == 1
    for d in range(int(support[-1])):
        alive = support > d
        cdf = np.cumsum(mass[alive]) / mass[alive].sum()
        assert residual[d] == support[alive][min(np.searchsorted(cdf, quantile - 1e-12), alive.sum() - 1)] - d


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), block=st.sampled_from([1, 4, 16]), top=st.integers(1, 60),
       origin=st.integers(0, 10**6))
def test_batch_projection_followed_through_iterations_is_the_recomputed_projection(seed: int, block: int, top: int,
                                                                                    origin: int) -> None:
    """With lengths from a residual table (Nested WAIT's lookahead): requests that do not decode, ends that jump,
    a new table (an adaptive policy's solve), finishes and admissions, followed by :func:`carry_batch` and
    :func:`redraw`, leave the kept projection equal to the one recomputed from the requests' trajectories (its
    peak, and what fits)."""
    from baselines.lookahead import carry_batch, fits_lookahead, project_batch, redraw, trajectories_of, trajectory
    from llmsched_env.request_table import RequestColumns

    rng = np.random.default_rng(seed)
    size = 400
    columns = RequestColumns(**{name: np.zeros(size, dtype=np.int64) for name in RequestColumns._fields})
    columns.prompt[:] = rng.integers(1, 50, size)
    columns.context[:] = columns.prompt + rng.integers(0, top + 5, size)
    columns.kv_tokens[:] = columns.context
    residual = rng.integers(1, top + 1, top + 1)
    residual[-1] = 1
    running = np.arange(int(rng.integers(0, 20)), dtype=np.int64)
    next_id = len(running)
    projection = project_batch(running, columns, residual, block, origin)
    for _ in range(25):
        if rng.random() < 0.2:  # a new lookahead (adaptive policies re-solve): kept when it fits, as kept_projection
            shorter = rng.integers(1, int(residual.max()) + 1, top + 1)
            shorter[-1] = 1
            assert fits_lookahead(projection.held, shorter)
            residual = shorter
        for j, i in enumerate(running):  # what Nested WAIT's decision does as it reads its running requests
            context, remaining = trajectory(i, columns, residual)
            if context - origin != projection.base[j] or origin + remaining != projection.end[j]:
                redraw(projection, j, context, remaining, block)
        context, remaining = trajectories_of(running, columns, residual)
        assert held_peak(projection.held) == kernels.peak_blocks(context, remaining, block)
        c, r = int(rng.integers(0, 100)), int(rng.integers(1, top + 2))
        limit = int(rng.integers(0, 40)) + held_peak(projection.held)
        with_it = kernels.peak_blocks(np.append(context, c), np.append(remaining, r), block)
        assert held_fits(projection.held, c, r, block, limit) == (with_it <= limit)
        candidates = int(rng.integers(0, 5))
        candidate_context = rng.integers(0, 100, candidates)
        candidate_remaining = rng.integers(1, int(residual.max()) + 2, candidates)  # a waiting request's longest
        expected = kernels.fitting_prefix(context, remaining, candidate_context, candidate_remaining, block, limit)
        peak = held_peak(projection.held)
        assert held_fitting_count(projection.held, peak, candidate_context, candidate_remaining, block,
                                  limit) == expected
        assert held_peak(projection.held) == peak  # left as it was
        # An iteration: most decode, some finish, a few are admitted (and prefilled whole).
        before = running
        decodes = rng.random(len(running)) < 0.8
        columns.context[running[decodes]] += 1
        columns.kv_tokens[running] = columns.context[running]
        survivors = running[rng.random(len(running)) >= 0.15]
        admitted = np.arange(next_id, min(size, next_id + int(rng.integers(0, 4))), dtype=np.int64)
        next_id += len(admitted)
        running = np.concatenate([survivors, admitted])
        origin += 1
        projection = carry_batch(projection, before, running, columns, residual, block, origin)
