"""Simulator speed: simulated seconds per wall second for every registered baseline, on one core.

Workload (issue 2): the Llama-2-7B/A100 profile, the two-type mix ``p=50,o=156`` and ``p=100,o=171`` in
equal shares, total rate set so that ``ρ = Σ λ_j u_j`` equals ``--rho`` (default 0.9), Poisson arrivals.
Each policy (``baselines.POLICIES``, configured for this scenario as ``llmsched compare`` configures it) runs
``--horizon`` simulated seconds through ``llmsched_env.run``, the best of ``--repeats`` runs (the least
disturbed by other load on a shared machine; the repeats are rounds over every policy), after one untimed run
that loads the compiled code.

Targets (issue 17): every policy at least 3,000x real time (goal 10,000x), and none more than 1.5x slower than
vLLM's run in the same benchmark.

Run:  python benchmarks/simulator_speed.py [--horizon 600] [--repeats 3] [--rho 0.9] [--policies a,b]

Prints one line per policy: x real time, iterations per second, whether its decisions ran in a compiled loop
(``compiled``) or one Python call per iteration (``python``), and its wall time against vLLM's.
"""

from __future__ import annotations

import argparse
import os
import time

# One core, as the target says: keep BLAS from spreading (the simulator does not use BLAS anyway).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from baselines import POLICIES, make_policy  # noqa: E402
from llmsched_env import run  # noqa: E402
from llmsched_env.policy import Policy  # noqa: E402
from llmsched_env.runner import RunResult  # noqa: E402
from llmsched_env.scenario import build_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=600.0, help="simulated seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.9)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated registered policies")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    base = build_scenario(types="p=50,o=156,rate=1;p=100,o=171,rate=1", profile="llama2-7b-a100")
    scenario = base.at_rate(base.rate_for_load(args.rho))
    arrivals = scenario.sample(args.horizon, seed=0)
    fluid = scenario.fluid(arrivals, args.horizon)
    assert scenario.mix is not None
    print(f"workload: {scenario.mix.to_text()}  rho={fluid.rho:.3f}  fluid tau*={fluid.tau_star_s * 1e3:.1f} ms  "
          f"M*={fluid.memory_tokens:,.0f} of {scenario.capacity_tokens:,} tokens  {len(arrivals):,} requests  "
          f"{args.horizon:,.0f} s")
    names = ["vllm", *[name for name in args.policies.split(",") if name != "vllm"]]
    makers = {name: (lambda name=name: make_policy(name, scenario, args.horizon)) for name in names}
    for name in names:
        run(scenario.engine(), makers[name](), arrivals, args.horizon)  # loads (or compiles) the kernels
    # Rounds over every policy, not each policy's repeats in a row: a burst of load from a neighbour on a shared
    # machine then slows one run of each policy rather than all the runs of one, and the best-of ratios hold.
    best: dict[str, tuple[float, RunResult, Policy]] = {}
    for _ in range(args.repeats):
        for name in names:
            policy = makers[name]()
            start = time.perf_counter()
            result = run(scenario.engine(), policy, arrivals, args.horizon)
            wall = time.perf_counter() - start
            if name not in best or wall < best[name][0]:
                best[name] = (wall, result, policy)
    for name in names:
        wall, result, policy = best[name]
        compiled_loop = getattr(policy, "compiled_loop", None)  # the policy was reset by its run
        path = "compiled" if callable(compiled_loop) and compiled_loop() is not None else "python"
        print(f"{name:21s} {args.horizon / wall:7,.0f}x real time  {result.iterations / wall:8,.0f} iterations/s  "
              f"{result.iterations:6,} iterations  {wall:6.3f} s wall  {path:8s}  "
              f"{wall / best['vllm'][0]:5.2f}x vLLM's time")

if __name__ == "__main__":
    main()
