"""Time and memory against the horizon, per policy.

Time: CPU seconds of ``llmsched simulate``'s work (arrivals, fluid benchmark, the run) at ρ = 2.0 (twice what
the default mix's memory and compute carry, so the queue grows all run long) for horizons 1,200 … 19,200 s, less
a near-zero horizon's run (start-up excluded), and the growth per doubling: linear time doubles, the target is
at most 2.3x. Memory: the peak resident memory of runs at ρ = 0.9 (``--memory-rho``) for horizons 10^4 and
10^5 s, each in a fresh process, less a near-zero horizon's, with the requests in the system at the end: memory
bounded by the requests in the system keeps them within 20 % of each other for a policy that is stable at that
load (one whose queue grows holds its queue).

Run:  python benchmarks/scaling.py [--policies wait,nested-wait,vllm,sarathi] [--horizons 1200,2400,4800,9600,19200]
      [--repeats 3] [--memory-horizons 10000,100000] [--memory-rho 0.9] [--no-memory] [--no-time]

Each time is the least of ``--repeats`` runs (the least disturbed by other load on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LLMSCHED_MAX_REQUESTS", "1e12")  # these runs are large on purpose

_RUN = """
import json, resource, sys, time
from baselines import make_policy
from baselines.compare import SEES_OUTPUT_LENGTHS
from llmsched_env.runner import run
from llmsched_env.scenario import build_scenario
policy, rho, horizon = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
scenario = build_scenario(hidden_lengths=policy not in SEES_OUTPUT_LENGTHS)
scenario = scenario.at_rate(scenario.rate_for_load(rho))
start = time.process_time()
scenario.fluid(scenario.chunks(horizon, 0), horizon)
result = run(scenario.engine(), make_policy(policy, scenario, horizon), scenario.chunks(horizon, 0), horizon)
print(json.dumps({"cpu_s": time.process_time() - start, "iterations": result.iterations,
                  "arrived": result.arrived, "in_system": result.waiting + result.running,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(policy: str, rho: float, horizon: float) -> dict[str, float]:
    """One run in a fresh process (so that its peak memory is its own)."""
    done = subprocess.run([sys.executable, "-c", _RUN, policy, str(rho), str(horizon)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="wait,nested-wait,vllm,sarathi")
    parser.add_argument("--horizons", default="1200,2400,4800,9600,19200")
    parser.add_argument("--memory-horizons", default="10000,100000")
    parser.add_argument("--memory-rho", type=float, default=0.9,
                        help="load of the memory runs (a policy whose queue grows at it holds more requests)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    args = parser.parse_args()
    policies = args.policies.split(",")
    horizons = [float(h) for h in args.horizons.split(",")]
    if not args.no_time:
        time_table(policies, horizons, args.repeats)
    if not args.no_memory:
        memory_table(policies, [float(h) for h in args.memory_horizons.split(",")], args.memory_rho)


def time_table(policies: list[str], horizons: list[float], repeats: int) -> None:
    print(f"time at rho = 2.0: CPU s less a 1 s run's, least of {repeats}; growth per doubling "
          "(linear: 2.0, target <= 2.3)")
    print(f"{'policy':<14}" + "".join(f"{h:>10g}" for h in horizons) + "   growth per doubling")
    for policy in policies:
        def cpu(horizon: float) -> float:
            return min(measure(policy, 2.0, horizon)["cpu_s"] for _ in range(repeats))

        base = cpu(1.0)
        times = [max(cpu(h) - base, 1e-9) for h in horizons]
        growth = [b / a for a, b in zip(times, times[1:])]
        print(f"{policy:<14}" + "".join(f"{t:>10.2f}" for t in times) + "   "
              + " ".join(f"{g:.2f}" for g in growth), flush=True)


def memory_table(policies: list[str], memory_horizons: list[float], rho: float) -> None:
    print(f"\npeak memory at rho = {rho:g}: MiB above a 1 s run's (bounded: within 20 % of each other while the "
          "requests in the system are)")
    print(f"{'policy':<14}" + "".join(f"{h:>12g}" for h in memory_horizons) + "   ratio   requests (in the system at "
          "the end)")
    for policy in policies:
        measure(policy, rho, 1.0)  # compiles the kernels into the cache if they were not (a higher peak)
        base = measure(policy, rho, 1.0)["peak_rss_mib"]
        runs = [measure(policy, rho, h) for h in memory_horizons]
        extra = [r["peak_rss_mib"] - base for r in runs]
        print(f"{policy:<14}" + "".join(f"{e:>12.1f}" for e in extra)
              + f"   {extra[-1] / max(extra[0], 1e-9):.2f}   "
              + " / ".join(f"{r['arrived']:,} ({r['in_system']:,})" for r in runs),
              flush=True)


if __name__ == "__main__":
    main()
