"""Speed of the workload-independent environment: ``LLMSched-Residual-v0`` beside ``-v1`` and ``-v2``, in steps/s.

A step is one decision interval of engine time: the adaptive baseline's compiled loop over it (hundreds of engine
iterations), then the observation; ``-v1`` adds the base's compute-load estimate to it, ``-v2`` that estimate's
trend (which counts from 600 s after the base's first solve, so the default horizon runs it for half of each
episode). For each workload at the top of its load range, 1,200 s episodes (``--horizon``) under the zero action,
after one warm-up episode (compilation and the first solve), episodes reset as they end until ``--seconds`` of wall
time have passed; the best of ``--repeats`` measurements is kept (the least disturbed by other load on a shared
machine). The ids run in the same process, in turn, so that their ratios are the figures to read.

Two settings: 1 s decisions on the whole-prefill bases (the environment's defaults), and the shipped generalist's
(5 s decisions, stall-free bases with the adaptive margin, ``vs_baseline`` reward, whose reset also runs the base
alone on the same arrivals).

Run:  python benchmarks/residual_speed.py [--horizon 1200] [--seconds 2] [--repeats 3] [--workloads W,...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import llmsched_env  # noqa: E402,F401  (registers the environment ids)

ENV_IDS = ("LLMSched-Residual-v0", "LLMSched-Residual-v1", "LLMSched-Residual-v2")
WORKLOADS = ("paper-two-type", "bursty-high-hidden", "azure-conv-like-hidden", "diurnal")
#: (label, environment keyword arguments): the defaults, and the shipped config's (agents/configs).
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("1 s, whole prefills", {"interval_s": 1.0}),
    ("5 s, stall-free with margin, vs_baseline",
     {"interval_s": 5.0, "batching": "stall-free-margin", "reward": "vs_baseline", "dead_zone": 0.25}),
)


def steps_per_second(env: gym.Env, workload: str, seconds: float, repeats: int) -> float:
    """The best of ``repeats`` measurements of zero-action steps per second on ``workload`` at its top load."""
    residual = env.unwrapped
    load = residual.load_range(workload)[1]
    action = np.zeros(1, dtype=np.float32)
    episode = itertools.count()

    def reset() -> None:
        env.reset(seed=0, options={"scenario": workload, "load": load, "arrival_seed": next(episode)})

    reset()
    done = False
    while not done:  # warm-up: compilation and the base's first solve
        _, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    best = 0.0
    for _ in range(repeats):
        steps, start = 0, time.perf_counter()
        reset()
        while time.perf_counter() - start < seconds:
            _, _, terminated, truncated, _ = env.step(action)
            steps += 1
            if terminated or truncated:
                reset()
        best = max(best, steps / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=1200.0)
    parser.add_argument("--seconds", type=float, default=2.0, help="wall seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    for label, kwargs in SETTINGS:
        print(f"{label}: steps/s (the best of {args.repeats} x {args.seconds:g} s)")
        print(f"  {'workload':24s} {'v0':>8s} {'v1':>8s} {'v2':>8s} {'v1/v0':>6s} {'v2/v0':>6s}")
        for workload in workloads:
            rates = []
            for env_id in ENV_IDS:
                env = gym.make(env_id, scenarios=[workload], horizon=args.horizon, **kwargs)
                rates.append(steps_per_second(env, workload, args.seconds, args.repeats))
                env.close()
            print(f"  {workload:24s} {rates[0]:8.0f} {rates[1]:8.0f} {rates[2]:8.0f} {rates[1] / rates[0]:6.2f} "
                  f"{rates[2] / rates[0]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
