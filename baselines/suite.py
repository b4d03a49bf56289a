"""The scenario suite's job: every scenario's sweep, in parallel, and the summary a reader checks first.

Each (scenario, rate, seed) is one job (:func:`baselines.compare.compare` on one rate and one seed);
jobs run in worker processes, and their comparisons are merged back per scenario, so a scenario's
report is exactly what ``llmsched compare`` would write for it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from baselines import DEFAULT_POLICIES
from baselines.compare import SEES_OUTPUT_LENGTHS, compare, known_policies, merge_comparisons
from llmsched_env.errors import ConfigError
from llmsched_env.executor import Executor, LocalExecutor, TaskFailure, failed_task
from llmsched_env.report import Comparison, mean_and_halfwidth
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
        chosen = tuple(known_policies(policies or spec.policies or DEFAULT_POLICIES))
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


def run_sweeps(plans: Sequence[SweepPlan], *, jobs: int | None = None, executor: Executor | None = None,
               on_job_done: Callable[[SweepPlan, float, int, int], None] | None = None) -> list[Comparison]:
    """Run every plan's (rate, seed) jobs on ``executor`` (default: a :class:`~llmsched_env.executor.LocalExecutor`
    of ``jobs`` processes, every core by default); one merged :class:`Comparison` per plan, in order, the same
    whatever runs the jobs. ``on_job_done(plan, rate, seed, runs)`` follows each job. A job that fails at run time
    (an engine fault) loses its own runs only: it is named, with its error, in its plan's ``Comparison.failed``."""
    executor = executor or LocalExecutor(jobs)
    tasks = [(index, plan, rate, seed)
             for index, plan in enumerate(plans) for rate in plan.rates for seed in plan.seeds]
    # Longest first, so that a long diurnal day does not start last and run alone.
    tasks.sort(key=lambda task: -task[1].horizon * len(task[1].policies))

    def done(position: int, _: object) -> None:
        if on_job_done is not None:
            _, plan, rate, seed = tasks[position]
            on_job_done(plan, rate, seed, len(plan.policies))

    results = executor.map(_job, [(plan, rate, seed) for _, plan, rate, seed in tasks], on_done=done, keep_going=True)
    parts: list[list[Comparison]] = [[] for _ in plans]
    failures: list[list[tuple[float, int, TaskFailure]]] = [[] for _ in plans]
    for (index, _, rate, seed), result in zip(tasks, results):
        if isinstance(result, TaskFailure):
            failures[index].append((rate, seed, result))
        else:
            parts[index].append(result)
    return [merge(plan, found, failed) for plan, found, failed in zip(plans, parts, failures)]


def merge(plan: SweepPlan, parts: Sequence[Comparison],
          failures: Sequence[tuple[float, int, TaskFailure]] = ()) -> Comparison:
    """One comparison of a plan from its per-(rate, seed) parts (:func:`~baselines.compare.merge_comparisons`:
    what ``compare`` gives for the whole sweep); the ``(rate, seed, failure)`` of the jobs that failed are listed in
    its ``failed``."""
    rate_index, seed_index = {r: i for i, r in enumerate(plan.rates)}, {s: i for i, s in enumerate(plan.seeds)}
    load_of = dict(zip(plan.rates, plan.loads))
    failed = [failed_task({"scenario": plan.spec.name, **({"load": load_of[rate]} if load_of[rate] is not None
                                                           else {}), "rate_rps": rate, "seed": seed}, failure)
              for rate, seed, failure in sorted(failures, key=lambda f: (rate_index[f[0]], seed_index[f[1]]))]
    return merge_comparisons(parts, plan.policies, plan.rates, plan.seeds, plan.horizon, failed)


def verdicts(plan: SweepPlan, comparison: Comparison) -> list[dict[str, object]]:
    """Per rate: the best fluid-guided policy and the best engine policy by mean throughput over seeds, and
    the paired differences between them (the same arrivals on every seed, so the arrival noise cancels):
    *level* when the 95 % interval of the throughput difference reaches 0 or above, *better* when the
    interval of the throughput difference is above 0 or that of the p99 latency difference below 0."""
    rows = []
    for rate, load in zip(plan.rates, plan.loads):
        per_policy: dict[str, dict[int, dict[str, object]]] = {}
        for run in comparison.runs:
            if run.rate == rate:
                per_policy.setdefault(run.policy, {})[run.seed] = run.row
        guided = [p for p in FLUID_GUIDED if p in per_policy]
        engines = [p for p in ENGINE_POLICIES if p in per_policy]
        if not guided or not engines:
            continue

        def mean_of(policy: str, field: str) -> float:
            return float(np.mean([float(row[field]) for row in per_policy[policy].values()]))  # type: ignore[arg-type]

        best_guided = max(guided, key=lambda p: mean_of(p, "throughput_rps"))
        best_engine = max(engines, key=lambda p: mean_of(p, "throughput_rps"))
        seeds = sorted(set(per_policy[best_guided]) & set(per_policy[best_engine]))

        def paired(field: str) -> tuple[float, float]:
            diffs = np.array([_number(per_policy[best_guided][s][field]) - _number(per_policy[best_engine][s][field])
                              for s in seeds])
            return mean_and_halfwidth(diffs)

        tp_diff, tp_half = paired("throughput_rps")
        p99_diff, p99_half = paired("p99_latency_s")
        rows.append({"scenario": plan.spec.name, "load": load, "rate_rps": rate, "seeds": len(seeds),
                     "fluid_guided": best_guided, "fluid_guided_throughput_rps": mean_of(best_guided, "throughput_rps"),
                     "fluid_guided_p99_latency_s": mean_of(best_guided, "p99_latency_s"),
                     "fluid_guided_evictions": mean_of(best_guided, "evictions"),
                     "engine": best_engine, "engine_throughput_rps": mean_of(best_engine, "throughput_rps"),
                     "engine_p99_latency_s": mean_of(best_engine, "p99_latency_s"),
                     "engine_evictions": mean_of(best_engine, "evictions"),
                     "throughput_diff_rps": tp_diff, "throughput_diff_ci95": tp_half,
                     "p99_diff_s": p99_diff, "p99_diff_ci95": p99_half,
                     "level_on_throughput": bool(tp_diff + tp_half >= 0),
                     "better_throughput": bool(tp_diff - tp_half > 0),
                     "better_p99_latency": bool(p99_diff + p99_half < 0)})
    return rows


def _number(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]
