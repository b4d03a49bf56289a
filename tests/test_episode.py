"""The compiled episode loop (:mod:`llmsched_env.episode`) runs exactly the environment's Python loop."""

from __future__ import annotations

import hashlib

import gymnasium as gym
import numpy as np
import pytest

import llmsched_env  # noqa: F401  (registers the ids)
from llmsched_env.env import LLMSchedEnv
from tests.invariants import check_engine

_RECORD_FIELDS = ("arrival_time", "prompt_len", "output_len", "first_token_time", "finish_time", "num_evictions",
                  "decoded", "status")


def _digest(*values: object) -> str:
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return digest.hexdigest()


def _info_key(info: dict) -> str:
    return _digest(*[(key, info[key].tolist() if isinstance(info[key], np.ndarray) else info[key])
                     for key in sorted(info)])


def _run(env: LLMSchedEnv, seed: int, episodes: int, overflow_every: int = 0) -> list[str]:
    """Every observation, reward (its bits), info and mask of ``episodes`` random-action episodes, then the
    run's records and counters. With ``overflow_every``, every so many epochs the candidates' room is
    inflated, so that the admissions overflow the KV cache and the engine must defer some."""
    rng = np.random.default_rng(seed)
    rows: list[str] = []
    for episode in range(episodes):
        observation, info = env.reset(seed=seed + episode)
        rows.append(_digest(observation) + _info_key(info))
        truncated, step = False, 0
        while not truncated:
            rows.append(_digest(env.action_masks()))
            if overflow_every and step % overflow_every == 0:
                env._candidates = env._candidates._replace(room=10**9)  # type: ignore[union-attr]
            action = rng.integers(0, env.action_space.nvec + 2)
            observation, reward, _, truncated, info = env.step(action)
            rows.append(_digest(observation, np.float64(reward)) + _info_key(info))
            step += 1
        result = env.result()
        rows.append(_digest(*[getattr(result.records, name) for name in _RECORD_FIELDS]))
        rows.append(repr((result.iterations, result.evictions, result.peak_blocks_used, result.block_seconds,
                          result.busy_time, result.end_time, env.engine.used_tokens, env.engine.used_blocks)))
        check_engine(env.engine)
    return rows


@pytest.mark.parametrize("env_id, kwargs", [
    ("LLMSched-v0", {}),
    ("LLMSched-v0", {"reward": "tokens", "latency_penalty": 0.01, "eviction_penalty": 0.5, "memory_tokens": 12_000}),
    ("LLMSched-v0", {"profile": "llama2-7b-a100-attention", "memory_tokens": 20_000}),  # the quadratic term
    ("LLMSched-Hidden-v0", {"memory_tokens": 15_000}),
    ("LLMSched-Bursty-v0", {}),
    ("LLMSched-Bursty-Hidden-v0", {"reward": "tokens", "latency_penalty": 0.002}),
    ("LLMSched-v0", {"scenario": "azure-conv-like-hidden", "output_lengths_known": False}),
])
def test_compiled_steps_are_bit_identical_to_the_python_loop(env_id: str, kwargs: dict) -> None:
    compiled = gym.make(env_id, horizon=60.0, **kwargs).unwrapped
    python = gym.make(env_id, horizon=60.0, compiled=False, **kwargs).unwrapped
    ours = _run(compiled, 11, episodes=2)
    assert compiled._episode is not None and python._episode is None
    assert ours == _run(python, 11, episodes=2)
    if kwargs.get("memory_tokens"):  # tight memory: evictions took the engine's general path midway
        assert compiled.result().evictions > 0


def test_an_admission_that_overflows_takes_the_general_path_in_both_loops() -> None:
    kwargs = {"horizon": 40.0, "memory_tokens": 10_000}
    compiled = gym.make("LLMSched-v0", **kwargs).unwrapped
    python = gym.make("LLMSched-v0", compiled=False, **kwargs).unwrapped
    ours = _run(compiled, 5, episodes=1, overflow_every=3)
    assert ours == _run(python, 5, episodes=1, overflow_every=3)
    assert compiled.result().evictions > 0


def test_the_compiled_loop_is_the_default_and_rgb_rendering_runs_the_python_loop() -> None:
    env = gym.make("LLMSched-v0", horizon=5.0).unwrapped
    env.reset(seed=0)
    assert env._episode is not None
    recorded = gym.make("LLMSched-v0", horizon=5.0, render_mode="rgb_array").unwrapped
    recorded.reset(seed=0)
    assert recorded._episode is None
