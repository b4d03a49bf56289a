"""WAIT and Nested WAIT thresholds against hand-computed fluid values and the paper's conditions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.adaptive import solve_nested_wait
from baselines.lookahead import residual_quantiles
from baselines.thresholds import (
    OutputLengthDistribution,
    lifetime_blocks,
    nested_wait_thresholds,
    overflow_exponent,
    wait_thresholds,
)
from llmsched_env import LinearCostModel, RequestType, TypeMix, load_profile, parse_types, solve_fluid
from llmsched_env.fluid import equilibrium, lifetime_work, memory_time

PAPER = LinearCostModel.paper(d0=0.01, d1=1e-4)
MIX = parse_types("p=10,o=10,rate=20;p=10,o=20,rate=10")  # w = 165, 420; ΔT* = 0.04; n* = (0.8, 0.4)


def test_wait_thresholds_by_hand() -> None:
    # u = d1 w = (0.0165, 0.042). From n = ceil(n*) = (1, 1): τ = 0.0685 → n = (ceil(1.37), ceil(0.685)) = (2, 1);
    # τ = 0.085 → (ceil(1.7), ceil(0.85)) = (2, 1): the fixed point.
    t = wait_thresholds(MIX, PAPER, capacity_tokens=10_000)
    assert t.n.tolist() == [2, 1]
    assert t.iteration_time_s == pytest.approx(0.085)
    assert t.memory_tokens == pytest.approx(2 * 165 + 420)
    assert t.scale == 1.0 and t.conditions_met
    # The paper's conditions: τ(n) <= n_j / λ_j and M* <= Σ n_j w_j <= C.
    assert np.all(t.iteration_time_s <= t.n / MIX.rates)
    assert t.fluid_memory_tokens == pytest.approx(300.0)
    assert t.fluid_memory_tokens <= t.memory_tokens <= 10_000


def test_wait_thresholds_scale_down_when_the_pipelines_do_not_fit() -> None:
    # C = 700 < 750: (1, 1) fits (585 tokens) and carries α λ for α <= 1 / (20 · 0.0685).
    t = wait_thresholds(MIX, PAPER, capacity_tokens=700)
    assert t.n.tolist() == [1, 1] and t.memory_tokens == pytest.approx(585)
    assert t.scale == pytest.approx(1 / (20 * 0.0685), rel=1e-6)
    assert not t.conditions_met


def test_lifetime_blocks_round_each_stage_up() -> None:
    assert lifetime_blocks(np.array([4]), np.array([2]), 2).tolist() == [2 + 3 + 3]
    assert lifetime_blocks(np.array([10]), np.array([10]), 1).tolist() == [165]


@given(rows=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 300), st.floats(0.1, 20.0)), min_size=1,
                     max_size=4), capacity=st.integers(2_000, 400_000), block=st.sampled_from([1, 16]))
def test_wait_thresholds_meet_the_conditions_whenever_they_claim_to(rows, capacity, block) -> None:  # type: ignore[no-untyped-def]
    mix = TypeMix(tuple(RequestType(p, o, r) for p, o, r in rows))
    cost = load_profile("llama2-7b-a100").cost
    t = wait_thresholds(mix, cost, capacity, block)
    u = lifetime_work(mix.prompt_lens, mix.output_lens, cost)
    assert t.iteration_time_s == pytest.approx(cost.c0 + float(t.n @ u))
    if t.scale == 1.0:  # the least fixed point: every cohort of n_j arrivals takes at least one iteration
        assert np.all(t.iteration_time_s <= t.n / mix.rates * (1 + 1e-9))
        for j in np.flatnonzero(t.n > 1):  # and one fewer of any type would not be one (within rounding)
            fewer = t.n - np.eye(len(t.n), dtype=np.int64)[j]
            assert np.any(fewer < mix.rates * (cost.c0 + float(fewer @ u)) + 1e-6)
    if t.conditions_met:
        assert np.all(t.iteration_time_s <= t.n / mix.rates * (1 + 1e-9))
        assert t.memory_blocks <= capacity // block
        assert t.memory_tokens >= solve_fluid(mix, cost, capacity).memory_tokens * (1 - 1e-9)


DISTRIBUTION = OutputLengthDistribution.from_samples(np.array([10, 20, 40, 80]), np.array([0.4, 0.3, 0.2, 0.1]))
COST = load_profile("llama2-7b-a100").cost


def test_output_length_distribution_and_quantile_boundaries() -> None:
    assert DISTRIBUTION.survival(10) == pytest.approx(0.6)
    assert DISTRIBUTION.survival(40) == pytest.approx(0.1)
    assert DISTRIBUTION.quantile_boundaries(4).tolist() == [10, 20, 40, 80]
    assert DISTRIBUTION.quantile_boundaries(2).tolist() == [20, 80]  # median at 20
    assert DISTRIBUTION.quantile_boundaries(1).tolist() == [80]


def test_overflow_exponent_solves_the_paper_equation() -> None:
    for n_k, n_prev, p in ((3, 4, 0.6), (2, 3, 0.5), (1, 2, 1 / 3), (40, 50, 0.7)):
        theta = overflow_exponent(n_k, n_prev, p)
        assert theta > 0
        assert math.exp(-theta * n_k) * (1 - p + p * math.exp(theta)) ** n_prev == pytest.approx(1.0, rel=1e-8)
    assert overflow_exponent(3, 3, 0.5) == 0.0  # n_k / n_{k-1} = 1: no positive root
    assert overflow_exponent(3, 6, 0.5) == 0.0  # exactly proportional: θ = 0, an infinite buffer


def test_nested_wait_thresholds_by_hand() -> None:
    t = nested_wait_thresholds(DISTRIBUTION, prompt_len=50, total_rate=30, cost=COST, capacity_tokens=118_784,
                               horizon_s=600, margin=0.05, delta=0.05)
    assert t.boundaries.tolist() == [10, 20, 40, 80]
    assert t.survival.tolist() == pytest.approx([1.0, 0.6, 0.5, 1 / 3])
    assert t.n.tolist() == [4, 3, 2, 1]  # ceil(4·0.6·1.05) = 3, ceil(3·0.5·1.05) = 2, ceil(2·(1/3)·1.05) = 1
    assert t.ratio_conditions_met and t.stability_condition_met
    # ΔT with n_k in every stage of segment k (prompt 50), and ΔT < n_1 / Σλ
    stages = [range(0, 11), range(11, 21), range(21, 41), range(41, 81)]
    decodes = [10, 10, 20, 40]
    kv = [sum(50 + s for s in r) for r in stages]
    tau = COST.c0 + COST.c_pf * 50 * 4 + sum(n * (COST.c_dec * d + COST.c_kv * m) for n, d, m in zip(t.n, decodes, kv))
    assert t.iteration_time_s == pytest.approx(tau)
    assert tau < 4 / 30
    assert t.memory_tokens == pytest.approx(sum(n * m for n, m in zip(t.n, kv)))
    log_term = math.log(4 * (1 + 600 / COST.c0) / 0.05)
    buffer = t.memory_tokens + sum((50 + b) * (t.n[k] + log_term / t.theta[k])
                                   for k, b in zip(range(1, 4), [10, 20, 40]))
    assert t.buffer_tokens == pytest.approx(buffer)
    assert t.buffer_met


def test_nested_wait_thresholds_report_an_unmet_buffer_and_scale_outside_the_region() -> None:
    small = nested_wait_thresholds(DISTRIBUTION, 50, 30, COST, capacity_tokens=6_000, horizon_s=600)
    assert not small.buffer_met
    overloaded = nested_wait_thresholds(DISTRIBUTION, 50, 5_000, COST, capacity_tokens=118_784, horizon_s=600)
    assert overloaded.scale < 1 and not overloaded.stability_condition_met
    rates = 5_000 * overloaded.scale * DISTRIBUTION.probabilities
    rho = float(rates @ lifetime_work(np.full(4, 50), DISTRIBUTION.values, COST))
    assert rho < 1
    tau = COST.c0 / (1 - rho)
    assert tau * float(rates @ memory_time(np.full(4, 50), DISTRIBUTION.values)) == pytest.approx(118_784, rel=1e-6)


@given(st.lists(st.integers(0, 3_000_000), min_size=1, max_size=60), st.booleans())
def test_a_length_sample_counts_as_np_unique_counts_it(lengths: list[int], short: bool) -> None:
    """Short lengths are counted without a sort, long ones sorted: the same values and probabilities either way."""
    sample = np.array([length % 500 if short else length for length in lengths], dtype=np.int64)
    distribution = OutputLengthDistribution.from_samples(sample)
    values, counts = np.unique(sample, return_counts=True)
    np.testing.assert_array_equal(distribution.values, values)
    np.testing.assert_array_equal(distribution.probabilities, counts / counts.sum())


def _nested_wait_by_numpy(distribution: OutputLengthDistribution, prompt_len: float, cost: LinearCostModel
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The segment terms of Nested WAIT's sizing written with NumPy, as the module docstring states them: the
    quantile boundaries, ``p_k``, each segment's work and KV tokens per request present in every stage."""
    cdf = np.cumsum(distribution.probabilities)
    picks = [distribution.values[min(int(np.searchsorted(cdf, k / 4 - 1e-12)), len(cdf) - 1)] for k in (1, 2, 3)]
    bounds = np.unique(np.array(picks + [distribution.values[-1]], dtype=np.int64))
    reach = np.array([1.0] + [float(distribution.probabilities[distribution.values > b].sum()) for b in bounds[:-1]])
    survival = np.ones(len(bounds))
    survival[1:] = np.divide(reach[1:], reach[:-1], out=np.zeros(len(bounds) - 1), where=reach[:-1] > 0)
    starts = np.concatenate([[0], bounds[:-1] + 1])
    kv = np.array([float(np.sum(prompt_len + np.arange(s, b + 1))) for s, b in zip(starts, bounds)])
    work = cost.c_dec * np.where(starts == 0, bounds, bounds - starts + 1) + cost.c_kv * kv
    work[0] += cost.c_pf * prompt_len + cost.c_pf2 * prompt_len * (prompt_len + 1) / 2
    return bounds, survival, work, kv


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 400), min_size=1, max_size=300), prompt=st.floats(1.0, 2000.0),
       rate=st.floats(0.01, 500.0), capacity=st.integers(2_000, 2_000_000), attention=st.booleans())
def test_nested_wait_thresholds_are_the_numpy_formulas(lengths: list[int], prompt: float, rate: float,
                                                        capacity: int, attention: bool) -> None:
    """The compiled sizing against the module docstring's terms computed with NumPy: the same boundaries, the
    same ``p_k`` (summed as NumPy sums), thresholds chained as the docstring says, and ``ΔT(n)``, ``M^π`` within
    rounding of NumPy's dot products (whose order of additions depends on the CPU)."""
    cost = COST if not attention else LinearCostModel(c0=COST.c0, c_pf=COST.c_pf, c_dec=COST.c_dec, c_kv=COST.c_kv,
                                                      c_pf2=1e-8)
    distribution = OutputLengthDistribution.from_samples(np.array(lengths))
    t = nested_wait_thresholds(distribution, prompt, rate, cost, capacity)
    bounds, survival, work, kv = _nested_wait_by_numpy(distribution, prompt, cost)
    np.testing.assert_array_equal(t.boundaries, bounds)
    np.testing.assert_allclose(t.survival, survival, rtol=1e-15, atol=0)
    assert t.iteration_time_s == pytest.approx(cost.c0 + float(t.n @ work), rel=1e-12)
    assert t.memory_tokens == pytest.approx(float(t.n @ kv), rel=1e-12)
    assert t.n[0] >= 1 and np.all(t.n[1:] <= t.n[:-1]) and np.all(t.n >= 1)
    for k in range(1, len(t.n)):  # n_k = min(n_{k-1}, ceil(n_{k-1} p_k (1 + margin))), at least 1
        assert t.n[k] == max(1, min(t.n[k - 1], math.ceil(t.n[k - 1] * survival[k] * 1.05 - 1e-9)))


def test_the_adaptive_solve_is_the_public_thresholds_lookahead_and_fluid_memory() -> None:
    """:func:`baselines.adaptive.solve_nested_wait` (the adaptive policy's solve, compiled) is Nested WAIT's
    thresholds of the sample's distribution at the mean prompt, the lookahead's residual quantiles (and the
    adaptive margin's, per level) and the fluid memory of the rate over that distribution: the same code, so the
    same numbers."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 300, 800)
    prompts = rng.integers(1, 900, 500)
    distribution = OutputLengthDistribution.from_samples(lengths)
    prompt = float(prompts.mean())
    solve = solve_nested_wait(lengths, prompts, 7.5, COST.coefficients(), 60_000.0, 0.9, np.array([0.5, 0.7]))
    t = nested_wait_thresholds(distribution, prompt, 7.5, COST, 60_000)
    np.testing.assert_array_equal(solve.boundaries, t.boundaries)
    np.testing.assert_array_equal(solve.n, t.n)
    np.testing.assert_array_equal(solve.survival, t.survival)
    np.testing.assert_array_equal(solve.lookahead,
                                  residual_quantiles(distribution.values, distribution.probabilities, 0.9))
    for level, quantile in zip(solve.levels, (0.5, 0.7), strict=True):  # the adaptive margin's tables
        np.testing.assert_array_equal(level, residual_quantiles(distribution.values, distribution.probabilities,
                                                                quantile))
    rho, _, fluid_memory = equilibrium(7.5 * distribution.probabilities, np.full(len(distribution.values), prompt),
                                       distribution.values, COST)
    *reals, mean_work = solve.reals.tolist()
    assert reals == [prompt, 7.5, t.iteration_time_s, t.memory_tokens, t.scale, fluid_memory, COST.c0]
    # A request's mean lifetime work: the fluid load per unit of rate (summed in another order: within rounding).
    assert mean_work == pytest.approx(rho / 7.5, rel=1e-12)
