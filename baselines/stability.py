"""Stability points: the highest arrival rate at which a policy's queue stays bounded.

Below its stability point a policy keeps up and its backlog (requests arrived but not finished)
stays of the order of what arrives in a few seconds; above it the backlog grows linearly, by
``(λ − μ)·T`` over a run of ``T`` seconds. A run is judged *stable* when its backlog at the end is at
most ``backlog_window_s`` seconds of arrivals (10 s by default; over a 600 s run an overload of 2 %
leaves 12 s of backlog, so the test resolves about 2 %). The stability point is found by bisection
on the rate, between a rate that is stable and one that is not, on the same seed's arrivals at each
rate; the spread over seeds is reported with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Sequence

from baselines import canonical_name, make_policy
from baselines.compare import SEES_OUTPUT_LENGTHS
from llmsched_env.errors import ConfigError
from llmsched_env.executor import Executor, LocalExecutor, TaskFailure, failed_task
from llmsched_env.runner import run
from llmsched_env.scenario import Scenario


@dataclass(frozen=True)
class StabilityPoint:
    """The result of :func:`stability_point` for one policy and seed."""

    policy: str
    seed: int
    rate_rps: float  # the highest rate judged stable
    load: float  # that rate as a load ρ of the scenario's fluid model
    unstable_rate_rps: float  # the lowest rate judged unstable (the bracket's other end)
    runs: int


def is_stable(scenario: Scenario, policy: str, rate: float, horizon: float, seed: int,
              backlog_window_s: float = 10.0) -> bool:
    """Whether ``policy``'s backlog after ``horizon`` seconds at ``rate`` is at most ``backlog_window_s``
    seconds of arrivals (see the module docstring)."""
    at_rate = replace(scenario.at_rate(rate), output_lengths_known=policy in SEES_OUTPUT_LENGTHS)
    result = run(at_rate.engine(), make_policy(policy, at_rate, horizon), at_rate.chunks(horizon, seed), horizon)
    return result.waiting + result.running <= backlog_window_s * rate


def _check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and 0 < tolerance < 1):
        raise ConfigError(f"tolerance must be in (0, 1) (relative width of the final bracket), got {tolerance!r}")


def stability_point(scenario: Scenario, policy: str, *, seed: int = 0, horizon: float = 600.0,
                    low_load: float = 0.5, high_load: float = 1.2, tolerance: float = 0.01,
                    backlog_window_s: float = 10.0) -> StabilityPoint:
    """Bisect the rate between loads ``low_load`` and ``high_load`` of the scenario's fluid model until the
    bracket is narrower than ``tolerance`` (relative)."""
    _check_tolerance(tolerance)
    if not 0 < low_load < high_load:
        raise ConfigError(f"need 0 < low_load < high_load, got {low_load}, {high_load}")
    low, high = scenario.rate_for_load(low_load), scenario.rate_for_load(high_load)
    runs = 0

    def stable(rate: float) -> bool:
        nonlocal runs
        runs += 1
        return is_stable(scenario, policy, rate, horizon, seed, backlog_window_s)

    if not stable(low):
        return StabilityPoint(policy, seed, 0.0, 0.0, low, runs)  # unstable already at the bottom of the bracket
    if stable(high):
        return StabilityPoint(policy, seed, high, high_load, math.inf, runs)
    while (high - low) / low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if stable(middle) else (low, middle)
    return StabilityPoint(policy, seed, low, low / scenario.rate_for_load(1.0), high, runs)


def _stability_task(scenario: Scenario, policy: str, seed: int, horizon: float, tolerance: float) -> StabilityPoint:
    return stability_point(scenario, policy, seed=seed, horizon=horizon, tolerance=tolerance)


class StabilityPoints(NamedTuple):
    """What :func:`stability_points` found: a row per policy, and the searches that failed at run time."""

    rows: list[dict[str, object]]  # per policy with at least one search done (see stability_points)
    failed: list[dict[str, object]]  # each failed search's policy, seed and error (llmsched_env.executor)


def stability_points(scenario: Scenario, policies: Sequence[str], seeds: Sequence[int], *, horizon: float = 600.0,
                     tolerance: float = 0.01, jobs: int | None = None, executor: Executor | None = None,
                     on_point: Callable[[StabilityPoint], None] | None = None) -> StabilityPoints:
    """:func:`stability_point` for every policy and seed, on ``executor`` (default: a
    :class:`~llmsched_env.executor.LocalExecutor` of ``jobs`` processes, every core by default), and per policy the
    mean rate with its 95 % Student-t half-width over seeds, the spread, the mean load and the runs. A search that
    fails at run time (an engine fault) loses its own seed only: it is listed in ``failed``, and its policy's row
    is over the seeds that were searched (none: no row)."""
    import numpy as np

    from llmsched_env.report import mean_and_halfwidth

    _check_tolerance(tolerance)
    policies = [canonical_name(p) for p in policies]  # refused up front, not in a worker
    executor = executor or LocalExecutor(jobs)
    tasks = [(scenario, name, seed, horizon, tolerance) for name in policies for seed in seeds]

    def done(_: int, point: StabilityPoint | TaskFailure) -> None:
        if on_point is not None and isinstance(point, StabilityPoint):
            on_point(point)

    points = executor.map(_stability_task, tasks, on_done=done, keep_going=True)
    rows: list[dict[str, object]] = []
    for name in policies:
        mine = [p for p in points if isinstance(p, StabilityPoint) and p.policy == name]
        if not mine:
            continue
        rates = np.array([p.rate_rps for p in mine])
        mean, half = mean_and_halfwidth(rates)
        rows.append({"policy": name, "stability_rate_rps": mean, "ci95": half, "min_rps": float(rates.min()),
                     "max_rps": float(rates.max()), "load": float(np.mean([p.load for p in mine])),
                     "per_seed_rps": rates.tolist(), "runs": sum(p.runs for p in mine)})
    failed = [failed_task({"policy": task[1], "seed": task[2]}, point)
              for task, point in zip(tasks, points) if isinstance(point, TaskFailure)]
    return StabilityPoints(rows, failed)
