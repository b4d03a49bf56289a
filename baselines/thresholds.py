"""Thresholds of WAIT and Nested WAIT from the fluid model (arXiv 2504.11320; DESIGN.md section 4).

Pure functions of a type mix (or an output-length distribution), a cost model and a KV capacity.

**WAIT** (known lengths). With ``n_j`` requests in every stage of every type, one iteration lasts
``τ(n) = c0 + Σ_j n_j u_j`` and holds ``Σ_j n_j w_j`` KV tokens (:mod:`llmsched_env.fluid`). The paper's
conditions are

    τ(n) <= n_j / λ_j  for every j     (a cohort of n_j arrivals takes at least one iteration), and
    M* <= Σ_j n_j w_j <= C             (the full pipelines fit in memory).

The fluid point ``n_j* = λ_j ΔT*`` meets the first with equality. We round up to integers and iterate
``n_j <- max(1, ceil(λ_j τ(n)))`` to its least fixed point, which then meets the first condition, and
``Σ n_j w_j >= M*`` holds because ``n >= n*``. Memory is checked in blocks (paging rounds each stage
up). If the fixed point does not fit in ``C`` (the load is outside the stability region, or rounding
pushed it out), the thresholds are sized for the largest proportional scaling ``α λ`` that fits
(bisection on ``α``); the excess load then queues, as it must under any policy.

**Nested WAIT** (hidden lengths). Decode stages are cut at boundaries ``b_1 < … < b_K`` (output
lengths, or quantiles of their distribution). Segment ``k`` covers stages ``(b_{k-1}, b_k]`` (segment 1
starts at the prefill, stage 0). ``q_k = P(o > b_{k-1})`` is the share of requests reaching segment
``k`` and ``p_k = q_k / q_{k-1}`` the share of segment ``k-1``'s requests that survive into it. Thresholds:

    n_k = min(n_{k-1}, ceil(n_{k-1} · p_k · (1 + margin)))   for k >= 2,

so that ``p_k < n_k / n_{k-1} < 1``, with the smallest ``n_1`` such that ``ΔT(n) < n_1 / Σλ`` and, if
rounding breaks the ratio conditions (``n_k = n_{k-1}`` at small ``n``), the smallest larger ``n_1`` that
meets them within memory (otherwise they are reported unmet), where ``ΔT(n)`` is the iteration time
with ``n_k`` requests in every stage of every segment (prompt ``p̄``, the rate-weighted mean). ``M^π`` is
the memory of that configuration. Thresholds are sized for the offered rate when it lies inside the
fluid stability region (``ρ < 1``, ``M* <= C``), else for the largest share ``α λ`` inside it.
The paper's safety buffer: overflow has probability at most ``δ`` over horizon ``ζT`` if

    C >= M^π + Σ_{k>=2} (p̄ + b_{k-1}) · (n_k + ln(K (1 + ζT / d0) / δ) / θ_k),

``θ_k`` the positive root of ``exp(−θ n_k) (1 − p_k + p_k e^θ)^{n_{k−1}} = 1`` (solved with Brent's
method). Thresholds exactly proportional to the surviving traffic give ``θ_k = 0`` and an infinite
buffer: the ``margin`` (default 0.05, the authors' later choice) keeps them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from llmsched_env import kernels
from llmsched_env.compiled import compiled
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import equilibrium, equilibrium_point, lifetime_work, lifetime_works, memory_time, memory_times
from llmsched_env.workload import TypeMix

_MAX_FIXED_POINT_STEPS = 10_000


def lifetime_blocks(prompt_len: np.ndarray, output_len: np.ndarray, block_size: int) -> np.ndarray:
    """``Σ_{s=0}^{o} ceil((p + s) / B)``: the paged counterpart of ``w`` (blocks held, summed over stages)."""
    out = []
    for p, o in zip(np.atleast_1d(prompt_len), np.atleast_1d(output_len)):
        tokens = np.arange(int(p), int(p) + int(o) + 1)
        out.append(int((-(-tokens // block_size)).sum()))
    return np.array(out, dtype=np.int64)


@dataclass(frozen=True)
class WaitThresholds:
    """WAIT's per-type thresholds and the quantities the paper's conditions are stated in.

    Attributes:
        n: requests per stage (and per admitted cohort) of each type.
        iteration_time_s: ``τ(n) = c0 + Σ n_j u_j``.
        memory_tokens, memory_blocks: ``Σ n_j w_j`` and its paged counterpart.
        scale: ``α``: 1 when the offered rates fit; < 1 when the thresholds serve ``α λ``.
        fluid_memory_tokens: ``M*`` of the offered rates (``inf`` if ``ρ >= 1``).
        capacity_blocks: ``C`` in blocks.
    """

    n: np.ndarray
    iteration_time_s: float
    memory_tokens: float
    memory_blocks: int
    scale: float
    fluid_memory_tokens: float
    capacity_blocks: int

    @property
    def conditions_met(self) -> bool:
        """Both of the paper's conditions hold for the offered rates (not only a scaled-down share)."""
        return self.scale == 1.0 and self.memory_blocks <= self.capacity_blocks


@compiled
def _wait_fixed_point(rates: np.ndarray, u: np.ndarray, c0: float) -> tuple[np.ndarray, bool]:
    """Least integer ``n >= 1`` (for positive rates) with ``n_j >= λ_j (c0 + n·u)``, and whether it exists (the
    iteration from the fluid point diverges when ``λ·u >= 1``, or has not settled in ``_MAX_FIXED_POINT_STEPS``).
    Sums run in index order; ``n`` is exact whenever no ``λ_j τ`` lies within rounding of an integer + 1e-9."""
    count = len(rates)
    n = np.zeros(count, dtype=np.int64)
    load = 0.0
    for j in range(count):
        load += rates[j] * u[j]
    if load >= 1.0:
        return n, False
    least = np.zeros(count, dtype=np.int64)  # one request per stage of every type that arrives
    for j in range(count):  # from the fluid point n* = λ c0 / (1 − λ·u)
        least[j] = 1 if rates[j] > 0 else 0
        n[j] = max(least[j], math.ceil(rates[j] * c0 / (1.0 - load) - 1e-9))
    for _ in range(_MAX_FIXED_POINT_STEPS):
        tau = c0
        for j in range(count):
            tau += n[j] * u[j]
        settled = True
        for j in range(count):
            target = max(least[j], math.ceil(rates[j] * tau - 1e-9))
            if target != n[j]:
                settled = False
                n[j] = max(n[j], target)
        if settled:
            return n, True
    return n, False


@compiled
def _wait_counts(rates: np.ndarray, u: np.ndarray, c0: float, blocks: np.ndarray,
                 capacity_blocks: int) -> tuple[np.ndarray, float]:
    """WAIT's thresholds and the share ``α`` of the rates they are sized for (see :func:`wait_thresholds`)."""
    n, found = _wait_fixed_point(rates, u, c0)
    if found and np.sum(n * blocks) <= capacity_blocks:
        return n, 1.0
    low, high = 0.0, 1.0  # the thresholds of low·λ fit in the limit: n = 1 per type (checked below)
    for _ in range(40):
        middle = (low + high) / 2
        n, found = _wait_fixed_point(rates * middle, u, c0)
        if found and np.sum(n * blocks) <= capacity_blocks:
            low = middle
        else:
            high = middle
    found = False
    if low > 0:
        n, found = _wait_fixed_point(rates * low, u, c0)
    if not found or np.sum(n * blocks) > capacity_blocks:
        n = (rates > 0).astype(np.int64)  # one request per stage: the least WAIT can run
    return n, low


def wait_thresholds(mix: TypeMix, cost: LinearCostModel, capacity_tokens: int, block_size: int = 1) -> WaitThresholds:
    """WAIT's thresholds for ``mix`` under ``cost`` and a KV capacity (see the module docstring)."""
    p, o, lam = mix.prompt_lens, mix.output_lens, mix.rates
    capacity_blocks = capacity_tokens // block_size
    if capacity_blocks < 1:
        raise ConfigError(f"KV capacity of {capacity_tokens} tokens is less than one block of {block_size}")
    u = lifetime_work(p, o, cost)
    w = memory_time(p, o)
    blocks = lifetime_blocks(p, o, block_size)

    n, scale = _wait_counts(np.ascontiguousarray(lam, dtype=np.float64), np.ascontiguousarray(u, dtype=np.float64),
                            float(cost.c0), blocks, capacity_blocks)
    _, _, fluid_memory = equilibrium(lam, p, o, cost)
    return WaitThresholds(n=n, iteration_time_s=cost.c0 + float(n @ u), memory_tokens=float(n @ w),
                          memory_blocks=int(n @ blocks), scale=scale, fluid_memory_tokens=fluid_memory,
                          capacity_blocks=capacity_blocks)


_COUNTED_UP_TO = 1 << 20  # lengths up to this are counted in an array of that size rather than sorted


@dataclass(frozen=True)
class OutputLengthDistribution:
    """A discrete distribution of output lengths (values ascending, probabilities summing to 1)."""

    values: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def from_samples(cls, output_lens: np.ndarray, weights: np.ndarray | None = None) -> "OutputLengthDistribution":
        lengths = np.asarray(output_lens, dtype=np.int64)
        if weights is None and len(lengths) and lengths.min() >= 0:
            return cls(*length_distribution(np.ascontiguousarray(lengths)))
        if weights is None:
            values, counts = np.unique(lengths, return_counts=True)
            mass = counts.astype(np.float64)
        else:
            values, inverse = np.unique(lengths, return_inverse=True)
            mass = np.bincount(inverse, weights=weights, minlength=len(values)).astype(np.float64)
        if mass.sum() <= 0:
            raise ConfigError("an output-length distribution needs positive total weight")
        return cls(values, mass / mass.sum())

    def survival(self, length: float) -> float:
        """``P(o > length)``."""
        return float(_survival_beyond(np.ascontiguousarray(self.values, dtype=np.int64),
                                      np.ascontiguousarray(self.probabilities, dtype=np.float64), float(length)))

    def quantile_boundaries(self, segments: int) -> np.ndarray:
        """``segments`` boundaries at the output-length quantiles ``k / segments``; the last is the maximum."""
        if segments < 1:
            raise ConfigError(f"Nested WAIT needs at least one segment, got {segments}")
        return boundaries_at_quantiles(np.ascontiguousarray(self.values, dtype=np.int64),
                                       np.ascontiguousarray(self.probabilities, dtype=np.float64), int(segments))


@compiled
def length_distribution(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`OutputLengthDistribution.from_samples` of a non-empty sample of lengths >= 0, unweighted: the
    distinct lengths ascending and their shares. Lengths up to ``_COUNTED_UP_TO`` are counted in an array (no
    sort); the shares are exact counts over the sample's size, so any order of counting gives the same."""
    largest = 0
    for length in lengths:
        largest = max(largest, length)
    if largest <= _COUNTED_UP_TO:
        counts = np.zeros(largest + 1, dtype=np.int64)
        for length in lengths:
            counts[length] += 1
        values = np.flatnonzero(counts)
        mass = counts[values].astype(np.float64)
    else:
        ordered = np.sort(lengths)
        values = np.unique(ordered)
        mass = np.zeros(len(values), dtype=np.float64)
        k = 0
        for length in ordered:
            if length != values[k]:
                k += 1
            mass[k] += 1.0
    return values, mass / float(len(lengths))


@compiled
def _survival_beyond(values: np.ndarray, probabilities: np.ndarray, length: float) -> float:
    """``P(o > length)``: the probabilities of the values beyond ``length`` (ascending: a suffix), summed as
    NumPy sums."""
    first = np.searchsorted(values, length, side="right")
    return kernels.pairwise_sum(probabilities[first:]) if first < len(values) else 0.0


@compiled
def boundaries_at_quantiles(values: np.ndarray, probabilities: np.ndarray, segments: int) -> np.ndarray:
    """:meth:`OutputLengthDistribution.quantile_boundaries` of int64 ``values`` and their float64
    ``probabilities``."""
    cdf = np.cumsum(probabilities)
    picks = np.empty(segments, dtype=np.int64)
    for k in range(1, segments):
        picks[k - 1] = values[min(np.searchsorted(cdf, k / segments - 1e-12), len(values) - 1)]
    picks[segments - 1] = values[-1]
    return np.unique(picks)


@dataclass(frozen=True)
class NestedWaitThresholds:
    """Nested WAIT's segments, thresholds, and the paper's conditions and safety buffer.

    Attributes:
        boundaries: ``b_1 < … < b_K`` (output lengths at which segments end; ``b_K`` the largest).
        n: threshold per segment.
        survival: ``p_k`` per segment (``p_1 = 1``).
        iteration_time_s: ``ΔT`` with ``n_k`` requests in every stage of every segment.
        memory_tokens: ``M^π`` of that configuration.
        buffer_tokens: the capacity the paper's overflow bound asks for (``inf`` if some ``θ_k = 0``).
        theta: ``θ_k`` per segment (``θ_1`` unused, 0).
        scale: 1, or ``α < 1`` when the offered load is outside the fluid stability region and the
            thresholds serve the largest proportional share ``α λ`` inside it.
        ratio_conditions_met: ``p_k < n_k / n_{k-1} < 1`` for every ``k >= 2``.
        stability_condition_met: ``ΔT < n_1 / Σλ`` for the offered rate.
        capacity_tokens: ``C``.
    """

    boundaries: np.ndarray
    n: np.ndarray
    survival: np.ndarray
    prompt_len: float
    iteration_time_s: float
    memory_tokens: float
    buffer_tokens: float
    theta: np.ndarray
    scale: float
    ratio_conditions_met: bool
    stability_condition_met: bool
    capacity_tokens: int

    @property
    def buffer_met(self) -> bool:
        """``C`` covers the paper's safety buffer: overflow has probability at most ``δ``."""
        return self.buffer_tokens <= self.capacity_tokens


def overflow_exponent(n_k: int, n_prev: int, p_k: float) -> float:
    """``θ_k > 0`` solving ``−θ n_k + n_{k−1} ln(1 − p_k + p_k e^θ) = 0``; 0 when no positive root exists.

    A positive root exists exactly when ``p_k n_{k−1} < n_k < n_{k−1}`` (the ratio conditions).
    """
    if not (0 < p_k and p_k * n_prev < n_k < n_prev):
        return 0.0
    if p_k >= 1.0:
        return 0.0

    def f(theta: float) -> float:
        # log(1 - p + p e^θ) computed stably for large θ
        return -theta * n_k + n_prev * (theta + math.log(p_k + (1.0 - p_k) * math.exp(-theta)))

    high = 1.0
    while f(high) <= 0:
        high *= 2.0
        if high > 1e6:  # pragma: no cover - f grows like θ (n_prev − n_k) > 0
            return 0.0
    low = high / 2.0
    while f(low) > 0 and low > 1e-12:
        low /= 2.0
    return float(brentq(f, low, high, xtol=1e-12)) if f(low) < 0 else 0.0


@compiled
def _nested_chain(n_first: int, survival: np.ndarray, margin: float) -> np.ndarray:
    """``n_1 = n_first``, ``n_k = max(1, min(n_{k-1}, ceil(n_{k-1} p_k (1 + margin))))``."""
    n = np.empty(len(survival), dtype=np.int64)
    n[0] = n_first
    for k in range(1, len(survival)):
        n[k] = max(1, min(n[k - 1], math.ceil(n[k - 1] * survival[k] * (1.0 + margin) - 1e-9)))
    return n


@compiled
def _nested_ratios_hold(n: np.ndarray, survival: np.ndarray) -> bool:
    """``p_k < n_k / n_{k-1} < 1`` for every ``k >= 2``."""
    for k in range(1, len(n)):
        if not survival[k] < n[k] / n[k - 1] < 1:
            return False
    return True


@compiled
def _inside_stability_region(rate: float, probabilities: np.ndarray, fluid_work: np.ndarray,
                             fluid_memory_time: np.ndarray, c0: float, capacity_tokens: float) -> bool:
    """Whether total ``rate`` split as ``probabilities`` over the output lengths whose lifetime work and
    memory-time are ``fluid_work`` and ``fluid_memory_time`` lies inside the fluid stability region (``ρ < 1``,
    ``M* <= C``; :func:`llmsched_env.fluid.equilibrium_point`)."""
    rho, _, memory = equilibrium_point(rate, probabilities, fluid_work, fluid_memory_time, c0)
    return rho < 1.0 and memory <= capacity_tokens


@compiled
def _nested_wait_counts(survival: np.ndarray, work: np.ndarray, kv_per_request: np.ndarray,
                        probabilities: np.ndarray, fluid_work: np.ndarray, fluid_memory_time: np.ndarray,
                        total_rate: float, c0: float, capacity_tokens: float,
                        margin: float) -> tuple[np.ndarray, float]:
    """Nested WAIT's thresholds per segment and the share ``α`` of the offered rate they are sized for (see
    :func:`nested_wait_thresholds`): ``survival``, ``work`` and ``kv_per_request`` per segment; the output
    lengths' ``probabilities`` with each length's ``fluid_work`` and ``fluid_memory_time`` (the stability region's
    terms). Sums run in index order."""
    scale = 1.0
    args = (probabilities, fluid_work, fluid_memory_time, c0, capacity_tokens)
    if not _inside_stability_region(total_rate, *args):
        low, high = 0.0, 1.0
        for _ in range(50):
            middle = (low + high) / 2
            if _inside_stability_region(total_rate * middle, *args):
                low = middle
            else:
                high = middle
        scale = low
    n = _nested_chain(1, survival, margin)
    found = False
    if scale > 0:
        # The smallest n_1 with ΔT(n) < n_1 / rate. When the load is too high ΔT outgrows n_1 / rate and the
        # search runs away: give up past a size no real batch reaches.
        rate, n_first = total_rate * scale, 1
        for _ in range(_MAX_FIXED_POINT_STEPS):
            candidate = _nested_chain(n_first, survival, margin)
            tau = c0
            for k in range(len(work)):
                tau += candidate[k] * work[k]
            if tau < n_first / rate:
                n, found = candidate, True
                break
            n_first = max(n_first + 1, math.floor(rate * tau) + 1)
            if n_first > 10**7:
                break
    if found and not _nested_ratios_hold(n, survival):
        # Small integer thresholds cannot shrink from segment to segment (n_k = n_{k-1} breaks n_k/n_{k-1} < 1):
        # take the smallest larger n_1 whose chain meets the ratio conditions, while memory allows.
        for n_first in range(n[0] + 1, 64 * n[0] + 64):
            candidate = _nested_chain(n_first, survival, margin)
            held = 0.0
            for k in range(len(kv_per_request)):
                held += candidate[k] * kv_per_request[k]
            if held > capacity_tokens:
                break
            if _nested_ratios_hold(candidate, survival):
                n = candidate
                break
    return n, scale


@compiled
def nested_wait_solution(values: np.ndarray, probabilities: np.ndarray, bounds: np.ndarray, prompt_len: float,
                         total_rate: float, coefficients: np.ndarray, capacity_tokens: float, margin: float
                         ) -> tuple[np.ndarray, np.ndarray, float, float, float, np.ndarray, np.ndarray]:
    """Nested WAIT's sizing (see :func:`nested_wait_thresholds`) for the output-length distribution ``values``,
    ``probabilities``, segment ``bounds`` (ascending, the last the longest value), mean prompt ``prompt_len``,
    total rate and cost ``coefficients`` (:meth:`~llmsched_env.cost_model.LinearCostModel.coefficients`):
    ``(survival p_k, thresholds n_k, scale α, ΔT(n), M^π, each length's lifetime work, memory-time)``, the last
    two for the fluid point. The one implementation behind the oracle's thresholds and the adaptive policy's
    solves (:mod:`baselines.adaptive`), whichever path runs them. Sums run in index order (pairwise where NumPy
    summed pairwise)."""
    c0, c_pf, c_dec, c_kv, c_pf2 = coefficients[0], coefficients[1], coefficients[2], coefficients[3], coefficients[4]
    k_count = len(bounds)
    survival = np.ones(k_count, dtype=np.float64)  # p_k = q_k / q_{k-1}, q_k = P(o > b_{k-1})
    reach = 1.0
    for k in range(1, k_count):
        beyond = _survival_beyond(values, probabilities, float(bounds[k - 1]))
        survival[k] = beyond / reach if reach > 0 else 0.0
        reach = beyond
    # Per request present in every stage of segment k: decode stages and KV tokens summed over its stages.
    kv_per_request = np.empty(k_count, dtype=np.float64)
    work = np.empty(k_count, dtype=np.float64)
    for k in range(k_count):
        start = 0 if k == 0 else bounds[k - 1] + 1  # first stage of the segment (segment 1: the prefill)
        tokens = np.empty(bounds[k] - start + 1, dtype=np.float64)
        for s in range(len(tokens)):
            tokens[s] = prompt_len + (start + s)
        kv_per_request[k] = kernels.pairwise_sum(tokens)
        decode_stages = bounds[k] if start == 0 else bounds[k] - start + 1
        work[k] = c_dec * decode_stages + c_kv * kv_per_request[k]
    work[0] += c_pf * prompt_len + c_pf2 * prompt_len * (prompt_len + 1) / 2
    lengths = values.astype(np.float64)
    prompts = np.full(len(values), prompt_len)
    fluid_work, fluid_memory_time = lifetime_works(prompts, lengths, coefficients), memory_times(prompts, lengths)
    # Size for the offered rate when it lies inside the fluid stability region; otherwise for the largest
    # proportional share of it that does. The full-pipeline memory M^π over-counts the fluid's (every stage
    # full, n_k rounded up), so exceeding C with it is reported, and the policy's guard handles it.
    n, scale = _nested_wait_counts(survival, work, kv_per_request, probabilities, fluid_work, fluid_memory_time,
                                   total_rate, c0, capacity_tokens, margin)
    pipeline_work, memory = 0.0, 0.0
    for k in range(k_count):
        pipeline_work += n[k] * work[k]
        memory += n[k] * kv_per_request[k]
    return survival, n, scale, c0 + pipeline_work, memory, fluid_work, fluid_memory_time


def nested_wait_thresholds(
    distribution: OutputLengthDistribution,
    prompt_len: float,
    total_rate: float,
    cost: LinearCostModel,
    capacity_tokens: int,
    *,
    boundaries: np.ndarray | None = None,
    segments: int = 4,
    margin: float = 0.05,
    delta: float = 0.05,
    horizon_s: float = 3600.0,
) -> NestedWaitThresholds:
    """Nested WAIT's thresholds (see the module docstring). ``boundaries`` default to quantiles."""
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if total_rate <= 0:
        raise ConfigError(f"total rate must be > 0, got {total_rate}")
    bounds = (np.unique(np.asarray(boundaries, dtype=np.int64)) if boundaries is not None
              else distribution.quantile_boundaries(segments))
    if bounds[0] < 1:
        raise ConfigError(f"segment boundaries must be output lengths >= 1, got {bounds.tolist()}")
    if bounds[-1] < distribution.values[-1]:
        bounds = np.append(bounds, distribution.values[-1])  # the last segment reaches the longest output
    survival, n, scale, tau, memory, _, _ = nested_wait_solution(
        np.ascontiguousarray(distribution.values, dtype=np.int64),
        np.ascontiguousarray(distribution.probabilities, dtype=np.float64), bounds, float(prompt_len),
        float(total_rate), cost.coefficients(), float(capacity_tokens), float(margin))
    return nested_wait_report(bounds, survival, n, scale, tau, memory, float(prompt_len), float(total_rate),
                              cost.c0, capacity_tokens, delta=delta, horizon_s=horizon_s)


def nested_wait_report(bounds: np.ndarray, survival: np.ndarray, n: np.ndarray, scale: float, tau: float,
                       memory: float, prompt_len: float, total_rate: float, c0: float, capacity_tokens: int, *,
                       delta: float = 0.05, horizon_s: float = 3600.0) -> NestedWaitThresholds:
    """:class:`NestedWaitThresholds` of a sizing (:func:`nested_wait_solution`'s): the paper's ratio and
    stability conditions and its safety buffer for overflow probability ``delta`` over ``horizon_s``."""
    k_count = len(bounds)
    theta = np.zeros(k_count)
    for k in range(1, k_count):
        theta[k] = overflow_exponent(int(n[k]), int(n[k - 1]), float(survival[k]))
    log_term = math.log(k_count * (1.0 + horizon_s / c0) / delta)
    buffer = memory
    for k in range(1, k_count):
        size = prompt_len + bounds[k - 1]
        buffer += math.inf if theta[k] == 0 else size * (n[k] + log_term / theta[k])
    return NestedWaitThresholds(
        boundaries=bounds, n=n, survival=survival, prompt_len=prompt_len, iteration_time_s=tau,
        memory_tokens=memory, buffer_tokens=buffer, theta=theta, scale=scale,
        ratio_conditions_met=bool(_nested_ratios_hold(n, survival)),
        stability_condition_met=bool(scale == 1.0 and tau < n[0] / total_rate), capacity_tokens=capacity_tokens)
