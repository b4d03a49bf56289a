"""The scenario suite's job: every scenario's sweep, in parallel, and the summary a reader checks first.

Each (scenario, rate, seed) is one job (:func:`baselines.compare.compare` on one rate and one seed);
jobs run in worker processes, and their comparisons are merged back per scenario, so a scenario's
report is exactly what ``llmsched compare`` would write for it alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from baselines.compare import SEES_OUTPUT_LENGTHS, compare
from llmsched_env.errors import ConfigError
from llmsched_env.report import Comparison
from llmsched_env.scenarios import NamedScenario

#: Policies the fluid-guided verdict is about, and the engines' own they are held against.
FLUID_GUIDED = ("wait", "nested-wait")
ENGINE_POLICIES = ("vllm", "sarathi")


@dataclass(frozen=True)
class SweepPlan:
    """What to run of one named scenario (its own sweep unless overridden)."""

    spec: NamedScenario
    policies: tuple[str, ...]
    rates: tuple[float, ...]
    loads: tuple[float | None, ...]
    horizon: float
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, spec: NamedScenario, *, policies: Sequence[str] | None = None, loads: Sequence[float] | None = None,
           rates: Sequence[float] | None = None, horizon: float | None = None,
           seeds: Sequence[int] | None = None) -> "SweepPlan":
        if loads is not None and rates is not None:
            raise ConfigError("give loads or rates, not both")
        chosen = tuple(policies or spec.policies)
        if not spec.scenario.output_lengths_known:  # a hidden-length scenario: no policy may see lengths
            chosen = tuple(p for p in chosen if p not in SEES_OUTPUT_LENGTHS)
            if not chosen:
                raise ConfigError(f"{spec.name} hides output lengths; every policy asked for needs them")
        if rates is not None:
            rate_list, load_list = tuple(rates), tuple(None for _ in rates)
        else:
            load_list = tuple(loads or spec.loads)
            rate_list = tuple(spec.rates(load_list))
        return cls(spec, chosen, rate_list, load_list, float(horizon or spec.horizon_s), tuple(seeds or spec.seeds))

    @property
    def runs(self) -> int:
        return len(self.policies) * len(self.rates) * len(self.seeds)


def _job(plan: SweepPlan, rate: float, seed: int) -> Comparison:
    sees = SEES_OUTPUT_LENGTHS if plan.spec.scenario.output_lengths_known else frozenset()
    return compare(plan.spec.scenario, plan.policies, [rate], plan.horizon, seeds=[seed], sees_output_lengths=sees)


def run_sweeps(plans: Sequence[SweepPlan], *, jobs: int | None = None,
               on_job_done: Callable[[SweepPlan, float, int, int], None] | None = None) -> list[Comparison]:
    """Run every plan's (rate, seed) jobs on ``jobs`` processes (default: every core; 1 runs in this
    process); one merged :class:`Comparison` per plan, in order. ``on_job_done(plan, rate, seed, runs)``
    follows each job."""
    jobs = jobs or os.cpu_count() or 1
    tasks = [(index, plan, rate, seed) for index, plan in enumerate(plans) for rate in plan.rates for seed in plan.seeds]
    # Longest first, so that a long diurnal day does not start last and run alone.
    tasks.sort(key=lambda task: -task[1].horizon * len(task[1].policies))
    parts: list[list[Comparison]] = [[] for _ in plans]
    if jobs == 1:
        for index, plan, rate, seed in tasks:
            parts[index].append(_job(plan, rate, seed))
            if on_job_done is not None:
                on_job_done(plan, rate, seed, len(plan.policies))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_job, plan, rate, seed): (index, plan, rate, seed) for index, plan, rate, seed in tasks}
            for future in as_completed(futures):
                index, plan, rate, seed = futures[future]
                parts[index].append(future.result())
                if on_job_done is not None:
                    on_job_done(plan, rate, seed, len(plan.policies))
    return [merge(plan, found) for plan, found in zip(plans, parts)]


def merge(plan: SweepPlan, parts: Sequence[Comparison]) -> Comparison:
    """One comparison of a plan from its per-(rate, seed) parts, runs ordered by rate, seed, policy."""
    runs = [run for part in parts for run in part.runs]
    rate_index = {rate: i for i, rate in enumerate(plan.rates)}
    policy_index = {policy: i for i, policy in enumerate(plan.policies)}
    runs.sort(key=lambda r: (rate_index[r.rate], r.seed, policy_index[r.policy]))
    fluid = {}
    for part in sorted(parts, key=lambda p: p.seeds[0]):  # the first seed's fluid, as compare() keeps it
        for rate, solution in part.fluid.items():
            fluid.setdefault(rate, solution)
    return Comparison(runs, fluid, plan.horizon, plan.policies, plan.rates, plan.seeds)


def verdicts(plan: SweepPlan, comparison: Comparison) -> list[dict[str, object]]:
    """Per rate: the best fluid-guided policy and the best engine policy by mean throughput, and whether
    the first is level (its 95 % interval reaches the other's mean) and strictly better on throughput or
    p99 latency (intervals apart)."""
    summary = comparison.summary()
    rows = []
    for rate, load in zip(plan.rates, plan.loads):
        at_rate = {str(r["policy"]): r for r in summary if r["rate_rps"] == rate}
        guided = [at_rate[p] for p in FLUID_GUIDED if p in at_rate]
        engines = [at_rate[p] for p in ENGINE_POLICIES if p in at_rate]
        if not guided or not engines:
            continue
        best_guided = max(guided, key=lambda r: float(r["throughput_rps"]))  # type: ignore[arg-type]
        best_engine = max(engines, key=lambda r: float(r["throughput_rps"]))  # type: ignore[arg-type]

        def value(row: dict[str, object], field: str) -> tuple[float, float]:
            mean, half = row[field], row[f"{field}_ci95"]
            return (float(mean) if mean is not None else float("nan"),  # type: ignore[arg-type]
                    float(half) if half is not None and np.isfinite(half) else 0.0)  # type: ignore[arg-type]

        g_tp, g_tp_ci = value(best_guided, "throughput_rps")
        e_tp, e_tp_ci = value(best_engine, "throughput_rps")
        g_p99, g_p99_ci = value(best_guided, "p99_latency_s")
        e_p99, e_p99_ci = value(best_engine, "p99_latency_s")
        level = g_tp + g_tp_ci + e_tp_ci >= e_tp
        better_tp = g_tp - g_tp_ci > e_tp + e_tp_ci
        better_p99 = g_p99 + g_p99_ci < e_p99 - e_p99_ci
        rows.append({"scenario": plan.spec.name, "load": load, "rate_rps": rate,
                     "fluid_guided": best_guided["policy"], "fluid_guided_throughput_rps": g_tp,
                     "fluid_guided_p99_latency_s": g_p99, "fluid_guided_evictions": best_guided["evictions"],
                     "engine": best_engine["policy"], "engine_throughput_rps": e_tp, "engine_p99_latency_s": e_p99,
                     "engine_evictions": best_engine["evictions"],
                     "level_on_throughput": bool(level), "better_throughput": bool(better_tp),
                     "better_p99_latency": bool(better_p99)})
    return rows
