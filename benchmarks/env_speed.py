"""Environment and training speed: the single environment, the native vector environment, and PPO on both.

Workload: ``LLMSched-v0`` as registered (the README's tight-memory two-type mix, ρ = 0.8, 54,762 KV
tokens, Llama-2-7B/A100 profile), 300 simulated seconds per episode. Figures measured in one run, so
that they compare as ratios:

1. the raw engine: ``run(engine, vllm)`` on the same arrivals, in engine iterations per second;
2. the single environment under random actions (drawn before timing), in steps (decision epochs) per
   second, episodes reset as they end; each step is one compiled call (:mod:`llmsched_env.episode`);
3. the same on the environment's Python loop (``compiled=False``) for one episode;
4. the native vector environment (``gym.make_vec(..., vectorization_mode="vector_entry_point")``) at
   N = 16, 64, 256, in environment steps per second (N per vector step), on every core and on one
   (``numba.set_num_threads(1)``), with the ratio to (2);
5. PPO and MaskablePPO frames per second: one environment in SB3's ``DummyVecEnv`` (2,048 steps per
   rollout) next to the native vector environment with the same frames per update (16 × 128, 64 × 32),
   the same batch size (256), epochs (5) and network (SB3's default);
6. one validation as training runs it (three seeds, 600 s each, on the vector environment) beside the
   same episodes through the evaluation loop;
7. with ``--learn-frames F``: PPO trained for F frames both ways (``--train-seeds`` seeds each), then
   its deterministic policy's regret on the validation seeds (1000–1002): the speed must not come from
   learning less per frame.

Run:  python benchmarks/env_speed.py [--horizon 300] [--repeats 3] [--ppo-steps 16384] [--learn-frames 65536]

The best of ``--repeats`` is kept (the least disturbed by other load on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402

import llmsched_env  # noqa: E402,F401
from baselines import vllm_policy  # noqa: E402
from llmsched_env import run  # noqa: E402

ENV_ID = "LLMSched-v0"
VECTOR_SIZES = (16, 64, 256)
#: (n_envs, n_steps) with the frames per update of the one-environment baseline (2,048).
PPO_LAYOUTS = ((1, 2048), (16, 128), (64, 32))
BATCH_SIZE, EPOCHS = 256, 5


def raw_engine(horizon: float, repeats: int) -> tuple[float, int]:
    env = gym.make(ENV_ID, horizon=horizon).unwrapped
    env.reset(seed=0, options={"arrival_seed": 0})
    scenario = env.scenario.at_rate(env.rate)
    arrivals = scenario.sample(horizon, 0)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = run(scenario.engine(), vllm_policy(), arrivals, horizon)
        best = min(best, time.perf_counter() - start)
    return result.iterations / best, result.iterations


def _random_actions(nvec: np.ndarray, shape: tuple[int, ...], count: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, nvec, size=shape) for _ in range(count)]


def _steps_per_second(env, actions: list[np.ndarray], repeats: int, seconds: float, width: int = 1) -> float:  # noqa: ANN001
    """Steps/s (× ``width`` episodes per step) of ``env`` under ``actions`` for ``seconds``, the best of
    ``repeats``; a single environment is reset as its episodes end (a vector one resets its own)."""
    env.reset(seed=0)
    env.step(actions[0])  # loads the compiled code (from Numba's cache) before the clock starts
    best = 0.0
    for _ in range(repeats):
        env.reset(seed=0)
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(16):
                truncated = env.step(actions[steps % len(actions)])[3]
                steps += 1
                if width == 1 and truncated:
                    env.reset()
        best = max(best, steps * width / elapsed)
    return best


def single_env(horizon: float, repeats: int, seconds: float) -> float:
    """Steps/s of one environment under random actions for ``seconds``, resetting as episodes end."""
    env = gym.make(ENV_ID, horizon=horizon).unwrapped
    return _steps_per_second(env, _random_actions(env.action_space.nvec, env.action_space.shape), repeats, seconds)


def python_loop(horizon: float) -> tuple[float, float, int]:
    """``(compiled steps/s, Python-loop steps/s, steps)`` of the same random-action episode."""
    rates = []
    for compiled in (True, False):
        env = gym.make(ENV_ID, horizon=horizon, compiled=compiled).unwrapped
        actions = _random_actions(env.action_space.nvec, env.action_space.shape)
        env.reset(seed=0, options={"arrival_seed": 0})
        env.step(actions[0])  # loads the compiled code (from Numba's cache) before the clock starts
        env.reset(seed=0, options={"arrival_seed": 0})
        steps, truncated, start = 0, False, time.perf_counter()
        while not truncated:
            _, _, _, truncated, _ = env.step(actions[steps % 256])
            steps += 1
        rates.append((steps / (time.perf_counter() - start), steps))
    assert rates[0][1] == rates[1][1], "the two loops ran different episodes"
    return rates[0][0], rates[1][0], rates[0][1]


def vector_env(num_envs: int, horizon: float, repeats: int, seconds: float) -> float:
    """Environment steps/s of the native vector environment under random actions for ``seconds``."""
    vector = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", horizon=horizon)
    actions = _random_actions(vector.single_action_space.nvec, vector.action_space.shape, 64)
    try:
        return _steps_per_second(vector, actions, repeats, seconds, width=num_envs)
    finally:
        vector.close()


def _model(algo: str, n_envs: int, n_steps: int, horizon: float, seed: int):  # noqa: ANN202
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    from agents.vec_env import make_native_vec_env

    cls = MaskablePPO if algo == "maskable-ppo" else PPO
    if n_envs == 1:  # SB3's default: the environment in a DummyVecEnv (with its Monitor)
        env = gym.make(ENV_ID, horizon=horizon).unwrapped
    else:
        env = make_native_vec_env(ENV_ID, n_envs, {"horizon": horizon})
    return cls("MlpPolicy", env, n_steps=n_steps, batch_size=BATCH_SIZE, n_epochs=EPOCHS, seed=seed, device="cpu",
               verbose=0)


def ppo_fps(algo: str, n_envs: int, n_steps: int, frames: int, horizon: float, torch_threads: int) -> float:
    import torch

    torch.set_num_threads(torch_threads)
    model = _model(algo, n_envs, n_steps, horizon, seed=0)
    start = time.perf_counter()
    model.learn(total_timesteps=frames)
    return model.num_timesteps / (time.perf_counter() - start)


VALIDATION_SEEDS = (1000, 1001, 1002)


def validation_regret(n_envs: int, n_steps: int, frames: int, horizon: float, seed: int) -> float:
    """PPO trained for ``frames``; the mean regret of its deterministic policy on the validation seeds, as
    training validates it (:func:`agents.validation.validation_runs`)."""
    import torch

    from agents.validation import validation_runs

    torch.set_num_threads(1)
    model = _model("ppo", n_envs, n_steps, horizon, seed=seed)
    model.learn(total_timesteps=frames)
    rate = gym.make(ENV_ID, horizon=horizon).unwrapped.nominal_rate
    rows = validation_runs(model, ENV_ID, {"horizon": horizon}, VALIDATION_SEEDS, rate)
    return float(np.mean([row["regret_requests"] for row in rows]))


def validation_seconds(horizon: float) -> tuple[float, float]:
    """Wall seconds of one validation (an untrained PPO on the validation seeds): on the vector environment,
    as training runs it, and through the evaluation loop (``run(engine, AgentPolicy)``, one seed after another)."""
    import torch

    from agents.policy import AgentPolicy
    from agents.validation import validation_runs

    torch.set_num_threads(1)
    model = _model("ppo", 1, 2048, horizon, seed=0)
    env = gym.make(ENV_ID, horizon=horizon).unwrapped
    scenario = env.scenario.at_rate(env.nominal_rate)
    start = time.perf_counter()
    validation_runs(model, ENV_ID, {"horizon": horizon}, VALIDATION_SEEDS, env.nominal_rate)
    vector = time.perf_counter() - start
    start = time.perf_counter()
    for seed in VALIDATION_SEEDS:
        run(scenario.engine(), AgentPolicy(model, scenario, horizon, env.control.settings),
            scenario.sample(horizon, seed), horizon)
    return vector, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--horizon", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="wall seconds per steps/s measurement")
    parser.add_argument("--ppo-steps", type=int, default=16_384)
    parser.add_argument("--learn-frames", type=int, default=0, help="0: skip the learning check")
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--validation-horizon", type=float, default=600.0, help="the training configs' horizon")
    args = parser.parse_args()
    cores = numba.config.NUMBA_NUM_THREADS
    print(f"{ENV_ID}, {args.horizon:g} simulated s per episode, {cores} cores for the vector environment")
    engine_rate, engine_iterations = raw_engine(args.horizon, args.repeats)
    print(f"raw engine (vllm policy)    {engine_rate:9,.0f} iterations/s   ({engine_iterations:,} iterations)")
    single = single_env(args.horizon, args.repeats, args.seconds)
    print(f"single env, random actions  {single:9,.0f} steps/s")
    compiled_rate, python_rate, steps = python_loop(args.horizon)
    print(f"single env, Python loop     {python_rate:9,.0f} steps/s        (compiled=False; one episode of "
          f"{steps:,} steps: compiled / Python {compiled_rate / python_rate:.2f}x)")
    for num_envs in VECTOR_SIZES:
        numba.set_num_threads(1)
        one_core = vector_env(num_envs, args.horizon, args.repeats, args.seconds)
        numba.set_num_threads(cores)
        every_core = vector_env(num_envs, args.horizon, args.repeats, args.seconds)
        print(f"vector env, N = {num_envs:<3}        {every_core:9,.0f} steps/s        ({every_core / single:.2f}x "
              f"the single env; one core: {one_core:,.0f} steps/s, {one_core / single:.2f}x)")
    for algo in ("ppo", "maskable-ppo"):
        baseline = None
        for n_envs, n_steps in PPO_LAYOUTS:
            for threads in ((1,) if n_envs == 1 else (1, 2)):
                fps = ppo_fps(algo, n_envs, n_steps, args.ppo_steps, args.horizon, threads)
                baseline = baseline or fps
                where = "DummyVecEnv" if n_envs == 1 else "native vector env"
                print(f"{algo:<13} {n_envs:>3} x {n_steps:<5} {fps:9,.0f} frames/s       ({fps / baseline:.2f}x; "
                      f"{where}, torch threads {threads}, batch {BATCH_SIZE}, {EPOCHS} epochs, "
                      f"{args.ppo_steps:,} frames)")
    vector_s, loop_s = validation_seconds(args.validation_horizon)
    print(f"validation, {len(VALIDATION_SEEDS)} seeds x {args.validation_horizon:g} s: {vector_s:.1f} s on the vector "
          f"env, {loop_s:.1f} s through run(engine, AgentPolicy)")
    if args.learn_frames:
        for n_envs, n_steps in (PPO_LAYOUTS[0], PPO_LAYOUTS[1]):
            regrets = [validation_regret(n_envs, n_steps, args.learn_frames, args.horizon, seed)
                       for seed in range(args.train_seeds)]
            print(f"ppo {n_envs:>3} x {n_steps:<5} after {args.learn_frames:,} frames: validation regret "
                  f"{np.mean(regrets):,.1f} requests (per training seed: "
                  f"{', '.join(f'{r:,.1f}' for r in regrets)})")


if __name__ == "__main__":
    main()
