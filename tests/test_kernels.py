"""The compiled kernels against plain NumPy references.

Integers and decisions (ids, counts, fits, peaks) must be exactly the reference's. Floating-point results are
compared within a stated tolerance, never bit for bit: NumPy's vectorised ``exp`` and summation loops, libm's
``exp`` and the compiler's code for the kernels round differently on different CPUs and library builds
(AVX-512 or not, Intel or AMD). Where two paths of the project must *behave* identically (the environment's
compiled step and its Python loop, the simulator's two paths), they call the same kernel, so the tests of
those paths can compare their runs exactly on any machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched_env import kernels
from llmsched_env.admission import ObservationScales
from llmsched_env.engine import RUNNING, WAITING
from llmsched_env.kv_cache import projected_peak_blocks, projected_peak_tokens


def _queue_case(seed: int, count: int, classes: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    universe = 3 * count + 1
    waiting = np.sort(rng.choice(universe, size=count, replace=False)).astype(np.int64)
    return waiting, rng.integers(0, classes, universe).astype(np.int64), rng.integers(1, 6 * block, universe)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 300), classes=st.integers(1, 5),
       block=st.sampled_from([1, 4, 16]), room=st.integers(-5, 400), max_admit=st.integers(1, 70))
def test_scan_queue_matches_numpy(seed: int, count: int, classes: int, block: int, room: int, max_admit: int) -> None:
    waiting, cls, context = _queue_case(seed, count, classes, block)
    oldest, heads, fits, queued = kernels.scan_queue(waiting, cls, context, block, room, classes, max_admit)
    assert queued.tolist() == np.bincount(cls[waiting], minlength=classes).tolist()
    for k in range(classes):
        ids = waiting[cls[waiting] == k][:max_admit]
        assert oldest[k, : heads[k]].tolist() == ids.tolist()
        cumulative = np.cumsum(-(-context[ids] // block))
        expected = int(np.searchsorted(cumulative, room, side="right")) if room > 0 else 0
        assert fits[k] == expected
        assert kernels.fitting_prefix_count(ids, context, block, room) == expected
    counts = np.minimum(heads, fits)
    merged = kernels.merge_heads(oldest, counts)
    assert merged.tolist() == sorted(i for k in range(classes) for i in oldest[k, : counts[k]].tolist())
    # An agent's action: clipped per class to what fits, merged, cut jointly at the room, recounted.
    action = np.random.default_rng(seed).integers(-2, max_admit + 3, classes)
    admit, got_counts, clipped = kernels.admissions(action, oldest, fits, cls, context, block, room)
    want = np.clip(action, 0, fits)
    ids = np.sort(np.concatenate([oldest[k, : want[k]] for k in range(classes)]))
    keep = int(np.searchsorted(np.cumsum(-(-context[ids] // block)), room, side="right"))
    assert admit.tolist() == ids[:keep].tolist()
    assert got_counts.tolist() == np.bincount(cls[ids[:keep]], minlength=classes).tolist()
    assert clipped == bool((want != action).any() or keep < len(ids))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 200), classes=st.integers(1, 4),
       buckets=st.integers(1, 6), known=st.booleans())
def test_running_profile_matches_numpy(seed: int, count: int, classes: int, buckets: int, known: bool) -> None:
    rng = np.random.default_rng(seed)
    universe = count + 5
    running = rng.permutation(universe)[:count].astype(np.int64)
    prompt = rng.integers(1, 300, universe)
    output = rng.integers(1, 400, universe)
    context = prompt + rng.integers(0, output)  # decoded < output: still running
    cls = rng.integers(0, classes, universe).astype(np.int64)
    residual = rng.integers(1, 200, 401).astype(np.int64)
    edges = np.unique(rng.integers(1, 400, max(buckets - 1, 0))).astype(np.int64)
    cells, peak = kernels.running_profile(running, cls, context, prompt, output, residual, edges, known,
                                          classes, buckets)
    decoded = context[running] - prompt[running]
    if known:
        bucket = np.minimum(buckets * decoded // output[running], buckets - 1)
        remaining = output[running] - decoded
    else:
        bucket = np.minimum(np.searchsorted(edges, decoded, side="right"), buckets - 1)
        remaining = residual[np.minimum(decoded, len(residual) - 1)]
    expected = np.bincount(cls[running] * buckets + bucket, minlength=classes * buckets).reshape(classes, buckets)
    assert cells.tolist() == expected.tolist()
    assert peak == projected_peak_tokens(context[running], remaining)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), classes=st.integers(1, 5), buckets=st.integers(1, 5))
def test_observation_assembly_is_bit_identical_to_numpy(seed: int, classes: int, buckets: int) -> None:
    rng = np.random.default_rng(seed)
    queued = rng.integers(0, 500, classes)
    queue_scale = rng.uniform(0.5, 80, classes)
    cells = rng.integers(0, 100, (classes, buckets))
    running_scale = rng.uniform(0.5, 500, (classes, buckets))
    memory = rng.uniform(0, 1.2, 2)
    elapsed, time_scale = float(rng.exponential(0.5)), float(rng.uniform(0.01, 0.2))
    estimate, rate_scale = rng.exponential(20, classes), rng.uniform(1, 40, classes)
    fixed = rng.uniform(-0.1, 1.1, classes + 3)
    progress = float(rng.uniform(0, 1.2))
    scales = ObservationScales(queue=queue_scale, running=running_scale, rate=rate_scale, time=time_scale, fixed=fixed)
    got = kernels.assemble_observation(queued, cells, memory, elapsed, estimate, progress, scales)
    parts = [queued / (queued + queue_scale), (cells / (cells + running_scale)).reshape(-1), memory,
             [elapsed / (elapsed + time_scale)], estimate / (estimate + rate_scale), fixed, [progress]]
    expected = np.clip(np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]), 0.0, 1.0).astype(np.float32)
    # Divisions and clipping are correctly rounded in float64; the cast to float32 can then differ by one unit
    # where the reference's float64 sits on a float32 rounding boundary.
    assert got.dtype == np.float32
    np.testing.assert_array_max_ulp(got, expected, maxulp=1)


def test_decodable_and_growth() -> None:
    running = np.array([4, 0, 2, 7], dtype=np.int64)
    kv = np.array([16, 0, 5, 0, 32, 0, 0, 3])
    context = np.array([16, 0, 6, 0, 32, 0, 0, 3])
    assert kernels.decodable(running, kv, context).tolist() == [4, 0, 7]
    assert kernels.blocks_to_grow(running, kv, 16) == 2


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 40), block=st.sampled_from([1, 2, 4, 16, 32]))
def test_projected_peak_blocks_is_the_max_over_future_iterations(seed: int, count: int, block: int) -> None:
    rng = np.random.default_rng(seed)
    context, remaining = rng.integers(1, 200, count), rng.integers(1, 60, count)
    brute = max((int((-(-(context + t) // block) * (remaining >= t)).sum()) for t in range(1, 61)), default=0)
    assert projected_peak_blocks(context, remaining, block) == brute


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), held=st.integers(0, 40), candidates=st.integers(0, 12),
       block=st.sampled_from([1, 2, 4, 16, 32]), spread=st.sampled_from([60, 5_000]), slack=st.integers(-20, 60))
def test_fitting_prefix_is_the_longest_prefix_whose_projected_peak_fits(seed: int, held: int, candidates: int,
                                                                        block: int, spread: int, slack: int) -> None:
    """The incremental search gives what projecting every prefix from scratch gives (``spread`` 5,000 sorts the
    remaining lengths instead of counting them)."""
    rng = np.random.default_rng(seed)
    context, remaining = rng.integers(1, 200, held), rng.integers(1, spread, held)
    candidate_context, candidate_remaining = rng.integers(1, 200, candidates), rng.integers(1, spread, candidates)
    limit = projected_peak_blocks(context, remaining, block) + slack
    expected = 0
    while expected < candidates and projected_peak_blocks(
            np.concatenate([context, candidate_context[:expected + 1]]),
            np.concatenate([remaining, candidate_remaining[:expected + 1]]), block) <= limit:
        expected += 1
    assert kernels.fitting_prefix(context, remaining, candidate_context, candidate_remaining, block, limit) == expected


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 300), spread=st.sampled_from([3, 50, 10**6, 2**40]))
def test_peak_tokens_packed_sort_equals_the_stable_argsort(seed: int, count: int, spread: int) -> None:
    """Grouping by ``remaining`` (counted when the values are few, ``spread`` 3 and 50; sorted as packed keys
    when not, ``10**6``) gives the stable argsort's peak, ties included; values too large to pack (``2**40``)
    take the argsort itself."""
    rng = np.random.default_rng(seed)
    context, remaining = rng.integers(1, spread, count), rng.integers(1, spread, count)
    assert kernels.peak_tokens(context, remaining) == kernels._peak_tokens_by_argsort(context, remaining)
    if count and spread < 100:
        brute = max(int(((context + t) * (remaining >= t)).sum()) for t in range(1, remaining.max() + 1))
        assert kernels.peak_tokens(context, remaining) == brute


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 50), classes=st.integers(1, 4))
def test_count_arrivals_is_the_numpy_rate_update(seed: int, count: int, classes: int) -> None:
    rng = np.random.default_rng(seed)
    since, now, window = rng.uniform(0, 50), 0.0, rng.uniform(0.5, 20)
    now = since + rng.uniform(0, 10)
    arrivals, cls = np.sort(rng.uniform(since, now, count)), rng.integers(0, classes, count)
    sums = rng.uniform(0, 30, classes)
    expected = sums * math.exp(-(now - since) / window)
    expected += np.bincount(cls, weights=np.exp(-(now - arrivals) / window) / window, minlength=classes)
    before = sums.copy()
    kernels.count_arrivals(sums, since, now, arrivals, cls, window)
    # No class array: every arrival in class 0, exactly as with a class array of zeros (one code, one order).
    unclassed, zeros = before.copy(), before.copy()
    kernels.count_arrivals(unclassed, since, now, arrivals, np.empty(0, dtype=np.int64), window)
    kernels.count_arrivals(zeros, since, now, arrivals, np.zeros(count, dtype=np.int64), window)
    assert np.array_equal(unclassed, zeros)
    # Each exp is within 1 ulp on either side (libm's and NumPy's SIMD loop), and at most 51 positive terms
    # are added: the relative error is below 51 · 3 · 2^-53 ≈ 2e-14; 1e-12 leaves room and still catches a
    # wrong term (each is >= exp(-20) / 20 ≈ 1e-10 of the sum).
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=0)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.floats(-1e12, 1e12, allow_nan=False), max_size=700))
def test_pairwise_sum_is_numpys_sum_within_rounding(values: list[float]) -> None:
    """Pairwise summation's error bound: |error| <= ~log2(n) · ε · Σ|x|; a few ulps of Σ|x| covers it."""
    array = np.array(values, dtype=np.float64)
    bound = 16 * np.finfo(np.float64).eps * float(np.abs(array).sum())
    assert abs(kernels.pairwise_sum(array) - float(np.add.reduce(array))) <= bound


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 300))
def test_prefill_attention_sum_is_the_cost_models_formula(seed: int, count: int) -> None:
    from llmsched_env.cost_model import prefill_attention

    rng = np.random.default_rng(seed)
    chunk, cached = rng.integers(1, 4096, count), rng.integers(0, 8192, count)
    expected = float(np.sum(prefill_attention(chunk, cached)))
    assert kernels.prefill_attention_sum(chunk, cached) == pytest.approx(expected, rel=1e-12, abs=0)
    # Exactly the pairwise sum of the terms (short batches are summed without an array of them, in its order).
    terms = chunk.astype(np.float64) * cached + chunk.astype(np.float64) * (chunk.astype(np.float64) + 1) / 2
    assert kernels.prefill_attention_sum(chunk, cached) == kernels.pairwise_sum(terms)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60), start=st.integers(0, 60))
def test_waiting_ids_are_the_waiting_statuses_from_start(seed: int, n: int, start: int) -> None:
    rng = np.random.default_rng(seed)
    start = min(start, n)
    status = rng.integers(0, 3, n).astype(np.int8)
    status[:start] = np.where(status[:start] == WAITING, RUNNING, status[:start])  # none waits before start
    ids, first = kernels.waiting_ids(status, start, n, int(np.sum(status == WAITING)))
    assert ids.tolist() == np.flatnonzero(status == WAITING).tolist()
    for limit in (0, 1, 3, n + 1):
        assert kernels.first_waiting_ids(status, start, n, limit).tolist() == ids[:limit].tolist()
    if len(ids) == n - start:  # the queue is exactly start … n − 1: nothing to move
        assert first == start
    else:
        assert first == (ids[0] if len(ids) else n)
