"""Simulator speed: simulated seconds per wall second, and iterations per second, on one core.

Workload (issue 2): the Llama-2-7B/A100 profile, the two-type mix ``p=50,o=156`` and ``p=100,o=171`` in
equal shares, total rate set so that ``ρ = Σ λ_j u_j`` equals ``--rho`` (default 0.9), Poisson arrivals,
the vLLM-style policy. Target: at least 1000x real time.

Run:  python benchmarks/simulator_speed.py [--horizon 600] [--repeats 3] [--rho 0.9]

Prints two lines per policy, the engine's compiled iterations (the default) and its NumPy path
(``SimulatedEngine(compiled=False)``, the reference the kernels are tested against), each the best of
``--repeats`` runs (the least disturbed by other load on a shared machine), with the share of wall time
spent in the policy, and the ratio of the two engines' time (wall less policy).
"""

from __future__ import annotations

import argparse
import os
import time

# One core, as the target says: keep BLAS from spreading (the simulator does not use BLAS anyway).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from baselines import sarathi_policy, vllm_policy  # noqa: E402
from llmsched_env import SimulatedEngine, run  # noqa: E402
from llmsched_env.scenario import build_scenario  # noqa: E402


class _TimedPolicy:
    """Wraps a policy to measure the wall time spent deciding."""

    def __init__(self, policy):  # type: ignore[no-untyped-def]
        self.policy, self.name, self.seconds = policy, policy.name, 0.0

    def reset(self, engine):  # type: ignore[no-untyped-def]
        self.policy.reset(engine)

    def decide(self, state):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        decision = self.policy.decide(state)
        self.seconds += time.perf_counter() - start
        return decision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=600.0, help="simulated seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.9)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    base = build_scenario(types="p=50,o=156,rate=1;p=100,o=171,rate=1", profile="llama2-7b-a100")
    scenario = base.at_rate(base.rate_for_load(args.rho))
    arrivals = scenario.sample(args.horizon, seed=0)
    fluid = scenario.fluid(arrivals, args.horizon)
    assert scenario.mix is not None
    print(f"workload: {scenario.mix.to_text()}  rho={fluid.rho:.3f}  fluid tau*={fluid.tau_star_s * 1e3:.1f} ms  "
          f"M*={fluid.memory_tokens:,.0f} of {scenario.capacity_tokens:,} tokens  {len(arrivals):,} requests")
    for make in (vllm_policy, sarathi_policy):
        engine_s = {}
        for compiled in (True, False):
            best = None
            for _ in range(args.repeats):
                policy = _TimedPolicy(make())
                engine = SimulatedEngine(scenario.cost, capacity_tokens=scenario.capacity_tokens,
                                         block_size=scenario.block_size, compiled=compiled)
                start = time.perf_counter()
                result = run(engine, policy, arrivals, args.horizon)
                wall = time.perf_counter() - start
                if best is None or wall < best[0]:
                    best = (wall, result, policy.seconds)
            assert best is not None
            wall, result, policy_s = best
            engine_s[compiled] = wall - policy_s
            label = f"{make().name} ({'compiled' if compiled else 'numpy'})"
            print(f"{label:19s} {args.horizon / wall:6.0f}x real time  {result.iterations / wall:7.0f} iterations/s  "
                  f"{result.iterations:,} iterations in {wall:.2f} s wall  (policy {policy_s / wall:.0%} of wall)")
        print(f"{'':19s} engine time, numpy / compiled: {engine_s[False] / engine_s[True]:.2f}")


if __name__ == "__main__":
    main()
