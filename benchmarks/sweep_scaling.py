"""How a sweep's wall time scales with workers: the same sweep on 1 and 2 local processes and through Ray.

The sweep is ``compare --suite``'s work for two scenarios of the suite (``paper-single``, ``bursty-low``; the
policies wait, nested-wait, vllm and sarathi; two loads, ``--seeds`` seeds, ``--horizon`` s): one task per
(scenario, load, seed). Each way runs it once after an untimed warm-up (Numba's cache loaded in every worker;
Ray's start-up timed separately), and the results are checked identical.

Run:  python benchmarks/sweep_scaling.py [--seeds 4] [--horizon 300] [--no-ray]

Prints each way's wall time, its speed-up over one process, and Ray's overhead per task: the wall time of
trivial tasks through Ray, per task.
"""

from __future__ import annotations

import argparse
import time

from baselines.suite import SweepPlan, run_sweeps
from llmsched_env.executor import Executor, LocalExecutor
from llmsched_env.scenarios import load_scenario


def _noop(value: int) -> int:
    return value


def _timed(plans: list[SweepPlan], executor: Executor) -> tuple[float, list]:
    run_sweeps(plans, executor=executor)  # warm: every worker has loaded the compiled code
    start = time.perf_counter()
    comparisons = run_sweeps(plans, executor=executor)
    return time.perf_counter() - start, [[r.row for r in c.runs] for c in comparisons]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--horizon", type=float, default=300.0)
    parser.add_argument("--no-ray", action="store_true", help="the local ways only")
    args = parser.parse_args()
    plans = [SweepPlan.of(load_scenario(name), policies=["wait", "nested-wait", "vllm", "sarathi"], loads=[0.7, 0.9],
                          horizon=args.horizon, seeds=list(range(args.seeds)))
             for name in ("paper-single", "bursty-low")]
    tasks = sum(len(plan.rates) * len(plan.seeds) for plan in plans)
    print(f"sweep: 2 scenarios x 2 loads x {args.seeds} seeds = {tasks} tasks of 4 policies x {args.horizon:g} s")
    one, reference = _timed(plans, LocalExecutor(1))
    print(f"local, 1 process     {one:7.2f} s   1.00x")
    two, rows = _timed(plans, LocalExecutor(2))
    assert rows == reference
    print(f"local, 2 processes   {two:7.2f} s   {one / two:4.2f}x")
    if args.no_ray:
        return
    import ray

    from llmsched_env.executor import RayExecutor

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    executor = RayExecutor()
    started = time.perf_counter() - start
    through_ray, rows = _timed(plans, executor)
    assert rows == reference
    print(f"Ray, 2 CPUs          {through_ray:7.2f} s   {one / through_ray:4.2f}x   "
          f"(ray.init: {started:.1f} s, not counted)")
    count = 200
    executor.map(_noop, [(i,) for i in range(count)])
    start = time.perf_counter()
    executor.map(_noop, [(i,) for i in range(count)])
    print(f"Ray's overhead per task: {1e3 * (time.perf_counter() - start) / count:.2f} ms ({count} trivial tasks, "
          "2 CPUs)")
    ray.shutdown()


if __name__ == "__main__":
    main()
