"""The fluid benchmark (arXiv 2504.11320, section 3 of DESIGN.md) and its memory-bound extension.

Pure functions of a type mix, a cost model and a KV capacity. Notation, per type ``j``:

* ``w_j = (o_j + 1)(p_j + o_j / 2) = Σ_{s=0}^{o_j} (p_j + s)`` — memory-time: KV tokens summed over
  the ``o_j + 1`` iterations the request is in a batch;
* ``u_j = c_pf p_j + c_dec o_j + c_kv w_j`` — the iteration time it adds over its life
  (the paper's model: ``u_j = d1 w_j``);
* ``W = Σ_j λ_j w_j`` and ``ρ = Σ_j λ_j u_j`` (the paper's ``d1 W``).

In fluid equilibrium every stage of type ``j`` holds ``n_j* = λ_j ΔT*`` requests, where the iteration
time solves ``ΔT* = c0 + ΔT* ρ``, i.e. ``ΔT* = c0 / (1 − ρ)``; the memory it needs is ``M* = ΔT* · W``
and the throughput is ``Θ* = Σ_j λ_j`` requests/s, ``Σ_j λ_j o_j`` tokens/s. No policy is stable if
``ρ ≥ 1``; the fluid stability region under capacity ``C`` is ``{λ : ρ < 1 and M*(λ) ≤ C}``.

**Extension (ours, not in the paper).** When ``M* > C`` (or ``ρ ≥ 1``) the offered load cannot all be
served. Admitting rates ``0 ≤ x_j ≤ λ_j`` is feasible iff ``c0 Σ x_j w_j / (1 − Σ x_j u_j) ≤ C``, i.e.

    Σ_j x_j (c0 w_j + C u_j) ≤ C,

a linear constraint (for the paper's model ``Σ x_j w_j ≤ C / (d0 + d1 C)``). The memory-bound
benchmark maximises ``Σ x_j`` (requests) or ``Σ x_j o_j`` (tokens) over it: a fractional knapsack,
solved with SciPy's HiGHS. Its value is the fluid optimum reported when memory binds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linprog

from llmsched_env.compiled import compiled
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.errors import ConfigError
from llmsched_env.workload import TypeMix

Objective = Literal["requests", "tokens"]


def memory_time(prompt_len: np.ndarray, output_len: np.ndarray) -> np.ndarray:
    """``w = (o + 1)(p + o/2)``: KV tokens a request holds, summed over its ``o + 1`` stages."""
    shape, p, o = _vectors(prompt_len, output_len)
    return memory_times(p, o).reshape(shape)[()]


def lifetime_work(prompt_len: np.ndarray, output_len: np.ndarray, cost: LinearCostModel) -> np.ndarray:
    """``u = c_pf p + c_dec o + c_kv w (+ c_pf2 p(p+1)/2)``: seconds of iteration time a request adds over its
    life (the last term is the quadratic prefill attention of a profile that has one, for an unchunked prefill)."""
    shape, p, o = _vectors(prompt_len, output_len)
    return lifetime_works(p, o, cost.coefficients()).reshape(shape)[()]


def _vectors(prompt_len: np.ndarray, output_len: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """The broadcast shape of prompts and outputs, and each as a contiguous float64 vector (NumPy's semantics for
    the compiled loops: a scalar pair gives a scalar)."""
    p, o = np.broadcast_arrays(np.asarray(prompt_len, dtype=np.float64), np.asarray(output_len, dtype=np.float64))
    return p.shape, np.ascontiguousarray(p.ravel()), np.ascontiguousarray(o.ravel())


@compiled
def memory_times(prompt_len: np.ndarray, output_len: np.ndarray) -> np.ndarray:
    """:func:`memory_time` of float64 vectors: the one implementation the Python functions and the compiled
    threshold solves share."""
    held = np.empty(len(prompt_len), dtype=np.float64)
    for j in range(len(prompt_len)):
        held[j] = (output_len[j] + 1.0) * (prompt_len[j] + output_len[j] / 2.0)
    return held


@compiled
def lifetime_works(prompt_len: np.ndarray, output_len: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """:func:`lifetime_work` of float64 vectors under ``coefficients`` (``[c0, c_pf, c_dec, c_kv, c_pf2]``,
    :meth:`~llmsched_env.cost_model.LinearCostModel.coefficients`)."""
    c_pf, c_dec, c_kv, c_pf2 = coefficients[1], coefficients[2], coefficients[3], coefficients[4]
    held = memory_times(prompt_len, output_len)
    work = np.empty(len(prompt_len), dtype=np.float64)
    for j in range(len(prompt_len)):
        p = prompt_len[j]
        work[j] = c_pf * p + c_dec * output_len[j] + c_kv * held[j]
        if c_pf2:
            work[j] += c_pf2 * p * (p + 1) / 2
    return work


@compiled
def equilibrium_point(rate: float, shares: np.ndarray, work: np.ndarray, memory_time: np.ndarray,
                      c0: float) -> tuple[float, float, float]:
    """``(ρ, ΔT*, M*)`` of the rates ``rate · shares`` of request kinds whose lifetime work and memory-time are
    ``work`` and ``memory_time`` (``ΔT*`` and ``M*`` infinite when ``ρ >= 1``). The sums run in index order:
    the same rounding on every CPU and on every path that sizes thresholds (a BLAS dot product's order
    depends on the CPU's vector width)."""
    rho, held = 0.0, 0.0
    for j in range(len(shares)):
        rho += rate * shares[j] * work[j]
        held += rate * shares[j] * memory_time[j]
    if rho >= 1.0:
        return rho, math.inf, math.inf
    tau = c0 / (1.0 - rho)
    return rho, tau, tau * held


@dataclass(frozen=True)
class FluidSolution:
    """The fluid benchmark for one (mix, cost, capacity).

    Attributes:
        rho: load ``Σ λ_j u_j`` of the offered rates (``d1 W`` in the paper's model).
        tau_star_s: ``ΔT*`` of the offered load (``inf`` if ``rho >= 1``).
        memory_tokens: ``M*`` of the offered load (``inf`` if ``rho >= 1``).
        n_star: ``n_j* = λ_j ΔT*`` per type (requests per stage).
        stable: ``rho < 1`` and ``M* <= C``: the offered load is inside the fluid stability region.
        memory_bound: not ``stable``: the optimum below is the LP's, not ``Σ λ_j``.
        admitted_rates: ``x_j`` — the rates the fluid optimum serves (``λ_j`` when stable).
        throughput_rps, throughput_tps: the fluid optimum ``Θ*`` (requests/s, output tokens/s).
        tau_admitted_s, memory_admitted_tokens: ``ΔT`` and memory of the admitted rates.
        capacity_tokens: ``C``.
        objective: what the LP maximised when memory binds.
    """

    rho: float
    tau_star_s: float
    memory_tokens: float
    n_star: np.ndarray
    stable: bool
    memory_bound: bool
    admitted_rates: np.ndarray
    throughput_rps: float
    throughput_tps: float
    tau_admitted_s: float
    memory_admitted_tokens: float
    capacity_tokens: float
    objective: Objective

    def summary(self) -> dict[str, float | bool | None]:
        """The JSON fields of ``llmsched fluid --json`` (``None`` stands for an infinite value)."""
        def finite(value: float) -> float | None:
            return float(value) if math.isfinite(value) else None
        return {
            "rho": float(self.rho),
            "tau_star_s": finite(self.tau_star_s),
            "memory_tokens": finite(self.memory_tokens),
            "throughput_rps": float(self.throughput_rps),
            "throughput_tps": float(self.throughput_tps),
            "stable": bool(self.stable),
            "memory_bound": bool(self.memory_bound),
        }


def equilibrium(rates: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray,
                cost: LinearCostModel) -> tuple[float, float, float]:
    """``(ρ, ΔT*, M*)`` for the given rates; ``ΔT*`` and ``M*`` are ``inf`` when ``ρ >= 1``."""
    rates = np.ascontiguousarray(rates, dtype=np.float64)
    return equilibrium_point(1.0, rates, lifetime_work(prompt_len, output_len, cost),
                             memory_time(prompt_len, output_len), float(cost.c0))


def max_admissible_rates(rates: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray,
                         cost: LinearCostModel, capacity_tokens: float,
                         objective: Objective = "requests") -> np.ndarray:
    """The memory-bound LP: maximise ``Σ x_j`` (or ``Σ x_j o_j``) s.t. ``Σ x_j (c0 w_j + C u_j) <= C``,
    ``0 <= x <= λ``."""
    rates = np.asarray(rates, dtype=np.float64)
    weight = (cost.c0 * memory_time(prompt_len, output_len)
              + capacity_tokens * lifetime_work(prompt_len, output_len, cost))
    value = np.ones_like(rates) if objective == "requests" else np.asarray(output_len, dtype=np.float64)
    result = linprog(-value, A_ub=weight[None, :], b_ub=[capacity_tokens],
                     bounds=np.stack([np.zeros_like(rates), rates], axis=1), method="highs")
    if result.status != 0:  # pragma: no cover - the LP is always feasible (x = 0) and bounded
        raise RuntimeError(f"HiGHS failed on the memory-bound LP: {result.message}")
    return np.clip(result.x, 0.0, rates)


def solve_fluid(mix: TypeMix, cost: LinearCostModel, capacity_tokens: float,
                objective: Objective = "requests") -> FluidSolution:
    """The fluid benchmark of ``mix`` under ``cost`` and KV capacity ``capacity_tokens``."""
    if not (capacity_tokens > 0 and math.isfinite(capacity_tokens)):
        raise ConfigError(f"KV capacity must be finite and > 0 tokens, got {capacity_tokens!r}")
    if objective not in ("requests", "tokens"):
        raise ConfigError(f"objective must be 'requests' or 'tokens', got {objective!r}")
    p, o, lam = mix.prompt_lens, mix.output_lens, mix.rates
    rho, tau, memory = equilibrium(lam, p, o, cost)
    stable = rho < 1.0 and memory <= capacity_tokens
    if stable:
        admitted = lam.copy()
    else:
        admitted = max_admissible_rates(lam, p, o, cost, capacity_tokens, objective)
    _, tau_admitted, memory_admitted = equilibrium(admitted, p, o, cost)
    n_star = lam * tau if math.isfinite(tau) else np.full_like(lam, math.inf)
    return FluidSolution(
        rho=rho, tau_star_s=tau, memory_tokens=memory, n_star=n_star, stable=stable, memory_bound=not stable,
        admitted_rates=admitted, throughput_rps=float(admitted.sum()), throughput_tps=float(admitted @ o),
        tau_admitted_s=tau_admitted, memory_admitted_tokens=memory_admitted,
        capacity_tokens=float(capacity_tokens), objective=objective)
