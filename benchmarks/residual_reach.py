"""What a residual agent can reach: each constant action of ``LLMSched-Residual-v0`` against the baseline it adjusts.

For every workload of the suite (both length settings) at the top of its load range, the environment runs each
constant action ``a`` (the threshold scale ``2 ** (2 a)`` held for the whole episode) on the same arrivals as the
baseline (``reward="vs_baseline"``), and prints the completions it adds in seconds of the fluid optimum's service
(the return) and its p99 latency, averaged over the seeds (the validation seeds by default: never the held-out ones).
A workload where no constant action gains is one where the agent can only match the baseline; one where the best
action differs between workloads is one the agent must tell apart from what it observes.

``--judge`` asks the judging table's question instead: in every cell of ``llmsched evaluate --suite`` (each workload
at each of its loads, at its own horizon, and the held-out traces), each constant action against the cell's best
baseline, with the table's verdict (:func:`agents.judge.judge_network`), on validation seeds (1000..1009 by
default; never the table's held-out seeds). It prints, per cell, the verdict of every action and the best of them:
what an agent that learnt the best constant scale of every cell could reach, and where no scale reaches *level*.

Run:  python benchmarks/residual_reach.py [--horizon 300] [--seeds 1000,1001] [--actions -1,-0.5,-0.25,0.25,0.5]
      python benchmarks/residual_reach.py --judge [--seeds 1000..1009] [--actions -1,-0.5,0.5,1] [--cells W@0.9,...]
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from agents.judge import default_data_dir, judge_network, judging_cells, named_cells
from agents.residual import ConstantAction
from agents.residual_env import LLMSchedResidualEnv, suite_workloads
from llmsched_env.cli import parse_seeds
from llmsched_env.errors import ConfigError
from llmsched_env.executor import LocalExecutor

#: The residual agent's decision interval in the shipped config (s).
INTERVAL_S = 5.0
#: Verdicts from the agent's point of view, best first.
RANK = {"better": 0, "level": 1, "worse": 2}


def _verdict(row: dict[str, Any]) -> str:
    decided = f" ({row['decided_by']})" if row["decided_by"] else ""
    return (f"{row['verdict']}{decided}: req/s {row['throughput_diff_rps']:+.3f} ± {row['throughput_diff_ci95']:.3f}, "
            f"p99 {row['p99_diff_s']:+.2f} ± {row['p99_diff_ci95']:.2f} s")


def judge_constant_actions(cells: Sequence[dict[str, Any]], actions: Sequence[float], seeds: Sequence[int],
                           jobs: int | None) -> None:
    """Print every cell's verdict for every constant action, the best of them, and a count per action."""
    tasks = [(ConstantAction(action), INTERVAL_S, cell, tuple(seeds)) for cell in cells for action in actions]
    rows = LocalExecutor(jobs).map(judge_network, tasks)
    counts = {action: dict.fromkeys(RANK, 0) for action in actions}
    reach = dict.fromkeys(RANK, 0)
    for c, cell in enumerate(cells):
        verdicts = rows[c * len(actions):(c + 1) * len(actions)]
        print(f"{cell['workload']} at {cell['load']:g} (best baseline {verdicts[0]['best_baseline']}, "
              f"{verdicts[0]['best_throughput_rps']:.3f} req/s, p99 {verdicts[0]['best_p99_latency_s']:.2f} s)")
        for action, row in zip(actions, verdicts):
            counts[action][row["verdict"]] += 1
            print(f"    a = {action:+.2f}: {_verdict(row)}")
        best = min(range(len(actions)),
                   key=lambda i: (RANK[verdicts[i]["verdict"]], verdicts[i]["regret_diff_requests"]))
        reach[verdicts[best]["verdict"]] += 1
        print(f"    best: a = {actions[best]:+.2f} ({verdicts[best]['verdict']})", flush=True)
    print(f"\n{len(cells)} cells, {len(seeds)} seeds each ({seeds[0]}..{seeds[-1]})")
    for action in actions:
        print(f"a = {action:+.2f}: " + ", ".join(f"{n} {v}" for v, n in counts[action].items()))
    print("best action per cell: " + ", ".join(f"{n} {v}" for v, n in reach.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=300.0)
    parser.add_argument("--seeds", default=None, help="1000,1001 (default), or 1000..1009 with --judge")
    parser.add_argument("--actions", default="-1,-0.5,-0.25,0.25,0.5")
    parser.add_argument("--workloads", default=",".join(suite_workloads()))
    parser.add_argument("--judge", action="store_true",
                        help="each cell of the judging table, against its best baseline")
    parser.add_argument("--cells", default=None, help="with --judge: these cells instead, WORKLOAD@LOAD,...")
    parser.add_argument("--jobs", type=int, default=None, help="with --judge: worker processes (default every core)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds or ("1000..1009" if args.judge else "1000,1001"))
    actions = [0.0, *[float(a) for a in args.actions.split(",")]]
    if args.judge:
        try:
            cells = (named_cells(args.cells, default_data_dir()) if args.cells
                     else judging_cells(args.workloads.split(","), default_data_dir()))
        except ConfigError as error:
            parser.error(str(error))
        judge_constant_actions(cells, actions, seeds, args.jobs)
        return
    env = LLMSchedResidualEnv(scenarios=args.workloads.split(","), horizon=args.horizon, reward="vs_baseline")
    print(f"{'workload':26s} {'ρ':>5s}  " + "  ".join(f"a={a:+.2f} gain s / p99 s" for a in actions))
    for name in env.workloads:
        load = env.load_range(name)[1]
        cells = []
        for action in actions:
            gains, p99 = [], []
            for seed in seeds:
                env.reset(seed=0, options={"scenario": name, "load": load, "arrival_seed": seed})
                done, total, info = False, 0.0, {}
                while not done:
                    _, reward, _, done, info = env.step(np.array([action], dtype=np.float32))
                    total += reward
                gains.append(total)
                p99.append(info["p99_latency_s"] or 0.0)
            cells.append(f"{np.mean(gains):+13.2f} / {np.mean(p99):5.1f}")
        print(f"{name:26s} {load:5.2f}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
