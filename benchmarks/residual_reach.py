"""What a residual agent can reach: each constant action of ``LLMSched-Residual-v0`` against the baseline it adjusts.

For every workload of the suite (both length settings) at the top of its load range, the environment runs each
constant action ``a`` (the threshold scale ``2 ** (2 a)`` held for the whole episode) on the same arrivals as the
baseline (``reward="vs_baseline"``), and prints the completions it adds in seconds of the fluid optimum's service
(the return) and its p99 latency, averaged over the seeds (the validation seeds by default: never the held-out ones).
A workload where no constant action gains is one where the agent can only match the baseline; one where the best
action differs between workloads is one the agent must tell apart from what it observes.

Run:  python benchmarks/residual_reach.py [--horizon 300] [--seeds 1000,1001] [--actions -1,-0.5,-0.25,0.25,0.5]
"""

from __future__ import annotations

import argparse

import numpy as np

from agents.residual_env import LLMSchedResidualEnv, suite_workloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=300.0)
    parser.add_argument("--seeds", default="1000,1001")
    parser.add_argument("--actions", default="-1,-0.5,-0.25,0.25,0.5")
    parser.add_argument("--workloads", default=",".join(suite_workloads()))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    actions = [0.0, *[float(a) for a in args.actions.split(",")]]
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
