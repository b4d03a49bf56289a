"""Regenerate the golden set (``python tests/golden/regenerate.py``): a short sweep's JSON and a few seeded
environment episodes. A change that moves them updates them in the same commit and says why (CHANGELOG.md)."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np

HERE = Path(__file__).resolve().parent
SWEEP_ARGS = ["compare", "--policies", "wait,nested-wait,vllm,sarathi", "--rates", "30,38", "--horizon", "40",
              "--memory-tokens", "60000", "--no-plots", "--json"]
EPISODES = [("LLMSched-v0", {"horizon": 30.0}, 0), ("LLMSched-v0", {"horizon": 30.0, "memory_tokens": 15_000}, 1),
            ("LLMSched-Hidden-v0", {"horizon": 30.0}, 2), ("LLMSched-Bursty-v0", {"horizon": 30.0}, 3)]


def sweep(out: Path) -> dict:
    from typer.testing import CliRunner

    from llmsched_env.cli import app

    result = CliRunner().invoke(app, [*SWEEP_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "comparison.json").read_text())


def episode(env_id: str, kwargs: dict, seed: int) -> dict:
    import llmsched_env  # noqa: F401  (registers the ids)

    env = gym.make(env_id, **kwargs).unwrapped
    rng = np.random.default_rng(seed)
    observation, _ = env.reset(seed=seed)
    total, steps, truncated, info = 0.0, 0, False, {}
    while not truncated:
        observation, reward, _, truncated, info = env.step(rng.integers(0, env.action_space.nvec))
        total += float(reward)
        steps += 1
    return {"env_id": env_id, "kwargs": kwargs, "seed": seed, "steps": steps, "return": total,
            "final_observation_sum": float(observation.astype(np.float64).sum()),
            **{key: info[key] for key in ("arrived", "completed", "evictions", "iterations", "waiting", "running")},
            "regret_requests": float(info["regret_requests"])}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (HERE / "sweep.json").write_text(json.dumps(sweep(Path(folder)), indent=2) + "\n")
    (HERE / "episodes.json").write_text(json.dumps([episode(*e) for e in EPISODES], indent=2) + "\n")
    print(f"wrote {HERE / 'sweep.json'} and {HERE / 'episodes.json'}")
