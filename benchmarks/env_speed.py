"""Environment speed on one core: random-action steps per second beside the raw engine, and PPO frames per second.

Workload: ``LLMSched-v0`` as registered (the README's tight-memory two-type mix, ρ = 0.8, 54,762 KV
tokens, Llama-2-7B/A100 profile). Four figures, measured in one run so that they compare as ratios:

1. the raw engine: ``run(engine, vllm)`` on the same arrivals, in engine iterations per second;
2. the environment under random actions (``env.action_space.sample()``, seeded), in steps (decision
   epochs) per second, with each step one compiled call (:mod:`llmsched_env.episode`, the default);
3. the same episode on the environment's Python loop (``compiled=False``): the same steps, observations
   and rewards, so the ratio is the compiled loop's gain;
4. MaskablePPO (and PPO) training on one environment (``DummyVecEnv``), in frames (steps) per second.

Run:  python benchmarks/env_speed.py [--horizon 300] [--repeats 3] [--ppo-steps 8192]

The best of ``--repeats`` is kept (the least disturbed by other load on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import llmsched_env  # noqa: E402,F401
from baselines import vllm_policy  # noqa: E402
from llmsched_env import run  # noqa: E402


def raw_engine(horizon: float, repeats: int) -> tuple[float, int]:
    env = gym.make("LLMSched-v0", horizon=horizon).unwrapped
    env.reset(seed=0, options={"arrival_seed": 0})
    scenario = env.scenario.at_rate(env.rate)
    arrivals = scenario.sample(horizon, 0)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = run(scenario.engine(), vllm_policy(), arrivals, horizon)
        best = min(best, time.perf_counter() - start)
    return result.iterations / best, result.iterations


def random_actions(horizon: float, repeats: int, compiled: bool) -> tuple[float, float, int]:
    """``(steps/s, engine iterations/s, steps)`` of one random-action episode, the best of ``repeats``."""
    env = gym.make("LLMSched-v0", horizon=horizon, compiled=compiled).unwrapped
    best = np.inf
    for _ in range(repeats):
        env.reset(seed=0, options={"arrival_seed": 0})
        env.action_space.seed(0)
        sample = env.action_space.sample
        steps, truncated = 0, False
        start = time.perf_counter()
        while not truncated:
            _, _, _, truncated, info = env.step(sample())
            steps += 1
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, iterations = elapsed, info["iterations"]
    return steps / best, iterations / best, steps


def ppo_fps(algo: str, steps: int) -> float:
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    torch.set_num_threads(1)
    env = gym.make("LLMSched-v0", horizon=300.0).unwrapped
    cls = MaskablePPO if algo == "maskable-ppo" else PPO
    model = cls("MlpPolicy", env, n_steps=2048, batch_size=256, n_epochs=5, seed=0, device="cpu", verbose=0)
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--horizon", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=8192)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    engine_rate, engine_iterations = raw_engine(args.horizon, args.repeats)
    steps_rate, env_iterations_rate, steps = random_actions(args.horizon, args.repeats, compiled=True)
    python_rate, _, python_steps = random_actions(args.horizon, args.repeats, compiled=False)
    assert python_steps == steps, "the two loops ran different episodes"
    print(f"raw engine (vllm policy)   {engine_rate:9,.0f} iterations/s   ({engine_iterations:,} iterations, "
          f"{args.horizon:g} simulated s)")
    print(f"env, random actions        {steps_rate:9,.0f} steps/s        ({steps:,} steps; "
          f"{env_iterations_rate:,.0f} engine iterations/s inside)")
    print(f"env, Python loop           {python_rate:9,.0f} steps/s        (compiled=False, the same episode; "
          f"compiled / Python {steps_rate / python_rate:.2f}x)")
    print(f"env steps / raw iterations {steps_rate / engine_rate:9.2f}")
    for algo in ("maskable-ppo", "ppo"):
        print(f"{algo:<26} {ppo_fps(algo, args.ppo_steps):9,.0f} frames/s      (1 env, {args.ppo_steps:,} steps, "
              f"n_steps 2048, 5 epochs)")


if __name__ == "__main__":
    main()
