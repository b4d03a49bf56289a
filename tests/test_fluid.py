"""The fluid benchmark against hand-computed closed forms, and the memory-bound LP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsched_env import LinearCostModel, RequestType, TypeMix, parse_types, solve_fluid
from llmsched_env.fluid import equilibrium, lifetime_work, memory_time

PAPER = LinearCostModel.paper(d0=0.01, d1=1e-4)


def test_memory_time_is_the_sum_over_stages() -> None:
    for p, o in ((10, 10), (1, 1), (50, 156), (7, 3)):
        assert memory_time(p, o) == sum(p + s for s in range(o + 1))


def test_single_type_closed_form() -> None:
    # p = 10, o = 10, λ = 20: w = 11 · 15 = 165, W = 3300, ρ = d1 W = 0.33
    solution = solve_fluid(parse_types("p=10,o=10,rate=20"), PAPER, capacity_tokens=10_000)
    tau = 0.01 / (1 - 0.33)
    assert solution.rho == pytest.approx(0.33)
    assert solution.tau_star_s == pytest.approx(tau)
    assert solution.n_star.tolist() == pytest.approx([20 * tau])
    assert solution.memory_tokens == pytest.approx(tau * 3300)
    assert (solution.throughput_rps, solution.throughput_tps) == pytest.approx((20.0, 200.0))
    assert solution.stable and not solution.memory_bound


def test_two_type_closed_form() -> None:
    # w = 165 and 21 · 20 = 420; W = 20·165 + 10·420 = 7500; ρ = 0.75; ΔT* = 0.04; M* = 300
    mix = parse_types("p=10,o=10,rate=20;p=10,o=20,rate=10")
    solution = solve_fluid(mix, PAPER, capacity_tokens=300)
    assert solution.rho == pytest.approx(0.75)
    assert solution.tau_star_s == pytest.approx(0.04)
    assert solution.n_star.tolist() == pytest.approx([0.8, 0.4])
    assert solution.memory_tokens == pytest.approx(300.0)
    assert solution.throughput_rps == pytest.approx(30.0)
    assert solution.throughput_tps == pytest.approx(400.0)
    assert solution.stable  # M* = C exactly is still inside the region
    assert solve_fluid(mix, PAPER, capacity_tokens=299).memory_bound


def test_general_cost_model_equilibrium_is_a_fixed_point() -> None:
    cost = LinearCostModel(c0=0.0086, c_pf=7e-5, c_dec=7.4e-5, c_kv=2.75e-7)
    mix = parse_types("p=50,o=156,rate=18;p=100,o=171,rate=18")
    solution = solve_fluid(mix, cost, capacity_tokens=118_784)
    u = lifetime_work(mix.prompt_lens, mix.output_lens, cost)
    assert u.tolist() == pytest.approx([7e-5 * 50 + 7.4e-5 * 156 + 2.75e-7 * 157 * 128,
                                        7e-5 * 100 + 7.4e-5 * 171 + 2.75e-7 * 172 * 185.5])
    assert solution.rho == pytest.approx(float(mix.rates @ u))
    # An iteration that holds n_j* of every stage of every type lasts exactly ΔT*.
    assert cost.c0 + float(solution.n_star @ u) == pytest.approx(solution.tau_star_s)
    memory = float(solution.n_star @ memory_time(mix.prompt_lens, mix.output_lens))
    assert solution.memory_tokens == pytest.approx(memory)


def test_unstable_load_has_no_equilibrium_but_an_lp_optimum() -> None:
    solution = solve_fluid(parse_types("p=10,o=10,rate=100"), PAPER, capacity_tokens=10_000)  # ρ = 1.65
    assert solution.rho > 1 and math.isinf(solution.tau_star_s) and math.isinf(solution.memory_tokens)
    assert not solution.stable and solution.memory_bound
    # Paper's model: Σ x_j w_j <= C / (d0 + d1 C)
    assert solution.throughput_rps == pytest.approx(10_000 / (0.01 + 1e-4 * 10_000) / 165)
    assert solution.summary()["tau_star_s"] is None


def test_lp_prefers_the_type_with_the_best_value_per_memory() -> None:
    # Type 1: w = 165 per request; type 2: w = 420 per request, 20 tokens. Memory binds.
    mix = parse_types("p=10,o=10,rate=20;p=10,o=20,rate=10")
    capacity = 200
    budget = capacity / (0.01 + 1e-4 * capacity)  # Σ x_j w_j <= budget
    by_requests = solve_fluid(mix, PAPER, capacity, objective="requests")
    assert by_requests.admitted_rates[0] == pytest.approx(min(20.0, budget / 165))
    assert by_requests.throughput_rps == pytest.approx(min(20.0, budget / 165) + max(0.0, budget - 20 * 165) / 420)
    by_tokens = solve_fluid(mix, PAPER, capacity, objective="tokens")  # tokens/memory: 10/165 > 20/420
    assert by_tokens.admitted_rates[0] == pytest.approx(min(20.0, budget / 165))
    assert by_tokens.memory_admitted_tokens == pytest.approx(capacity)


type_rows = st.lists(st.tuples(st.integers(1, 2000), st.integers(1, 1000), st.floats(0.01, 30.0)),
                     min_size=1, max_size=5)


@given(rows=type_rows, capacity=st.integers(500, 300_000), c0=st.floats(1e-3, 0.05), c_kv=st.floats(0.0, 1e-6),
       c_pf=st.floats(0.0, 1e-4))
def test_lp_matches_the_closed_form_and_binds_exactly_when_memory_does(rows, capacity, c0, c_kv, c_pf) -> None:  # type: ignore[no-untyped-def]
    mix = TypeMix(tuple(RequestType(p, o, r) for p, o, r in rows))
    cost = LinearCostModel(c0=c0, c_pf=c_pf, c_dec=5e-5, c_kv=c_kv)
    solution = solve_fluid(mix, cost, capacity)
    assert solution.memory_bound == (solution.rho >= 1 or solution.memory_tokens > capacity)
    assert solution.throughput_rps <= mix.total_rate * (1 + 1e-9)
    assert solution.memory_admitted_tokens <= capacity * (1 + 1e-6)
    if not solution.memory_bound:
        assert solution.throughput_rps == pytest.approx(mix.total_rate)
        assert solution.tau_admitted_s == pytest.approx(solution.tau_star_s)
    else:
        assert solution.throughput_rps < mix.total_rate
        # The LP spends the memory: it binds unless every type is admitted in full (impossible here).
        assert solution.memory_admitted_tokens == pytest.approx(capacity, rel=1e-6)
    # The fluid optimum never exceeds the greedy fractional-knapsack bound.
    weight = (c0 * memory_time(mix.prompt_lens, mix.output_lens)
              + capacity * lifetime_work(mix.prompt_lens, mix.output_lens, cost))
    order = np.argsort(weight)
    left, greedy = float(capacity), 0.0
    for j in order:
        take = min(mix.rates[j], left / weight[j])
        greedy, left = greedy + take, left - take * weight[j]
    assert solution.throughput_rps == pytest.approx(greedy, rel=1e-6)


@given(st.lists(st.tuples(st.floats(0.0, 50.0), st.integers(1, 4000), st.integers(1, 4000)), min_size=1,
                max_size=40),
       st.floats(1e-4, 0.1), st.floats(0.0, 1e-4), st.floats(0.0, 1e-6))
def test_equilibrium_is_the_dot_products_of_the_closed_form(rows, c0, c_dec, c_kv) -> None:  # type: ignore[no-untyped-def]
    """``ρ = λ·u`` and ``M* = c0 / (1 − ρ) · λ·w``, summed in index order: within rounding of NumPy's dot products
    (whose order depends on the CPU), and infinite exactly when ``ρ >= 1`` by that sum."""
    rates, prompts, outputs = (np.array(column, dtype=np.float64) for column in zip(*rows))
    cost = LinearCostModel(c0=c0, c_dec=c_dec, c_kv=c_kv)
    rho, tau, memory = equilibrium(rates, prompts, outputs, cost)
    assert rho == pytest.approx(float(rates @ lifetime_work(prompts, outputs, cost)), rel=1e-12, abs=1e-300)
    if rho >= 1.0:
        assert tau == memory == math.inf
    else:
        assert tau == cost.c0 / (1.0 - rho)
        assert memory == pytest.approx(tau * float(rates @ memory_time(prompts, outputs)), rel=1e-12, abs=1e-300)


def test_lifetime_work_and_memory_time_broadcast_as_numpy_does() -> None:
    cost = LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=2e-4, c_kv=1e-6, c_pf2=1e-8)
    prompts, outputs = np.array([[10.0], [300.0]]), np.array([1, 5, 80])
    p, o = np.broadcast_arrays(prompts, outputs.astype(np.float64))
    w = (o + 1.0) * (p + o / 2.0)
    np.testing.assert_array_equal(memory_time(prompts, outputs), w)
    np.testing.assert_array_equal(lifetime_work(prompts, outputs, cost),
                                  cost.c_pf * p + cost.c_dec * o + cost.c_kv * w + cost.c_pf2 * p * (p + 1) / 2)
    assert float(memory_time(50, 156)) == 157 * 128.0
