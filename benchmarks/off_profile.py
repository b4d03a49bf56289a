"""A cost profile off by a factor: the adaptive policies with and without following the engine, against vLLM.

The engine runs the scenario's cost model; the adaptive policies plan with that model divided by ``--factor``
(3: the engine is 3x slower than the profile says, as a busy or throttled machine is). Each policy runs three
ways on the same arrivals: with the exact profile, with the wrong one followed online
(:mod:`llmsched_env.cost_estimate`, the default), and with the wrong one kept (``cost_tolerance=inf``).

Run:  python benchmarks/off_profile.py [--rho 0.9] [--factor 3] [--seeds 5] [--horizon 600]

Prints, per policy and way, the mean throughput, its paired difference against vLLM's on the same arrivals (mean
and worst seed), the mean p99 time to first token and the evictions, over the seeds.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from baselines import make_policy
from baselines.adaptive import AdaptiveNestedWaitPolicy, AdaptiveWaitPolicy
from llmsched_env import run
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.metrics import summarize
from llmsched_env.policy import Policy
from llmsched_env.scenario import Scenario, build_scenario


def _adaptive(name: str, scenario: Scenario, cost: LinearCostModel, horizon: float, tolerance: float) -> Policy:
    if name == "wait-adaptive":
        return AdaptiveWaitPolicy.create(cost, scenario.capacity_tokens, scenario.block_size,
                                         cost_tolerance=tolerance)
    return AdaptiveNestedWaitPolicy.create(cost, scenario.paged_capacity_tokens, scenario.block_size,
                                           horizon_s=horizon, cost_tolerance=tolerance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=0.9, help="load, at the engine's real speed")
    parser.add_argument("--factor", type=float, default=3.0, help="how much slower the engine is than the profile")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--horizon", type=float, default=600.0)
    args = parser.parse_args()
    base = build_scenario(types="p=50,o=156,rate=1;p=100,o=171,rate=1", profile="llama2-7b-a100")
    scenario = base.at_rate(base.rate_for_load(args.rho))
    wrong = scenario.cost.scaled(1 / args.factor)
    ways = {"exact profile": (scenario.cost, 0.1), "followed": (wrong, 0.1), "kept": (wrong, math.inf)}
    rows: dict[str, list[tuple[float, float, float, int]]] = {}
    for seed in range(args.seeds):
        arrivals = scenario.sample(args.horizon, seed=seed)
        fluid = scenario.fluid(arrivals, args.horizon)
        vllm = run(scenario.engine(), make_policy("vllm", scenario, args.horizon), arrivals, args.horizon)
        runs = {"vllm": vllm}
        for name in ("wait-adaptive", "nested-wait-adaptive"):
            for way, (cost, tolerance) in ways.items():
                policy = _adaptive(name, scenario, cost, args.horizon, tolerance)
                runs[f"{name}, {way}"] = run(scenario.engine(), policy, arrivals, args.horizon)
        for label, result in runs.items():
            summary = summarize(result, fluid)
            rows.setdefault(label, []).append((result.finished / args.horizon,
                                               (result.finished - vllm.finished) / vllm.finished,
                                               float(summary["p99_ttft_s"] or math.nan), result.evictions))
    print(f"rho {args.rho} at the engine's speed, profile {args.factor:g}x too fast, {args.seeds} seeds x "
          f"{args.horizon:g} s, {scenario.mix.to_text() if scenario.mix else ''}")
    print(f"{'policy, profile':42s} {'req/s':>8s} {'vs vLLM':>9s} {'worst':>8s} {'p99 TTFT':>9s} {'evictions':>10s}")
    for label, values in rows.items():
        table = np.array(values)
        gap = 100 * table[:, 1]
        print(f"{label:42s} {table[:, 0].mean():8.3f} {gap.mean():+8.2f}% {gap.min():+7.2f}% "
              f"{table[:, 2].mean():8.2f}s "
              f"{table[:, 3].mean():10.0f}")


if __name__ == "__main__":
    main()
