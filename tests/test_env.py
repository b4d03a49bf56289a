"""The Gymnasium environment: API conformance, determinism, exact expressiveness of the baselines, fuzzing."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmsched_env
from baselines import make_policy
from llmsched_env import run
from llmsched_env.env import LLMSchedEnv
from llmsched_env.errors import ConfigError, LLMSchedError
from llmsched_env.kv_cache import projected_peak_tokens
from tests.invariants import check_engine

ENV_IDS = list(llmsched_env.ENV_IDS)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_every_registered_id_passes_gymnasiums_and_sb3s_checkers(env_id: str) -> None:
    from gymnasium.utils.env_checker import check_env as gymnasium_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = gym.make(env_id, horizon=20.0, render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker's warning fails the test
        gymnasium_check(env.unwrapped, skip_render_check=False)
        sb3_check(env.unwrapped, warn=True)


def test_make_with_the_module_prefix_works_in_a_fresh_interpreter() -> None:
    code = ("import sys, gymnasium as gym\n"
            "assert 'llmsched_env' not in sys.modules\n"
            "env = gym.make('llmsched_env:LLMSched-v0', horizon=5.0)\n"
            "obs, info = env.reset(seed=1)\n"
            "print(obs.shape, env.action_space)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(21,)" in out.stdout and "MultiDiscrete([65 65])" in out.stdout


def _trajectory(env_id: str, seed: int, steps: int) -> list[tuple]:
    env = gym.make(env_id, horizon=40.0)
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    rows = [(obs.tobytes(), info["arrived"])]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        rows.append((obs.tobytes(), reward, terminated, truncated, info["completed"], info["evictions"],
                     info["admitted"].tolist(), info["clipped"]))
        if truncated:
            break
    return rows


@pytest.mark.parametrize("env_id", ["LLMSched-v0", "LLMSched-Bursty-Hidden-v0"])
def test_the_same_seed_gives_the_same_trajectory_and_another_seed_another(env_id: str) -> None:
    first, again, other = _trajectory(env_id, 7, 300), _trajectory(env_id, 7, 300), _trajectory(env_id, 8, 300)
    assert first == again
    assert first != other


def _scripted_run(env: LLMSchedEnv, baseline: str, arrival_seed: int) -> dict:
    """Drive ``env`` with the actions that reproduce ``baseline``'s decisions; returns the final info."""
    env.reset(seed=0, options={"arrival_seed": arrival_seed})
    teacher = make_policy(baseline, env.scenario.at_rate(env.rate), env.horizon)
    teacher.reset(env.engine)
    info: dict = {}
    truncated = False
    while not truncated:
        action = env.action_for(teacher.decide(env.scheduler_state()))
        assert env.action_masks().reshape(len(action), -1)[np.arange(len(action)), action].all()
        _, _, _, truncated, info = env.step(action)
        assert not info["clipped"]
    return info


@pytest.mark.parametrize("baseline, env_id, memory", [
    ("wait", "LLMSched-v0", None),
    ("vllm", "LLMSched-v0", None),
    ("vllm", "LLMSched-Hidden-v0", None),
    ("vllm", "LLMSched-Hidden-v0", 20_000),  # memory so tight that vLLM evicts: the eviction path is exact too
    ("wait", "LLMSched-Bursty-v0", 20_000),
])
def test_scripted_agents_reproduce_wait_and_vllm_exactly(baseline: str, env_id: str, memory: int | None) -> None:
    kwargs = {"horizon": 120.0, **({"memory_tokens": memory} if memory else {})}
    env = gym.make(env_id, **kwargs).unwrapped
    info = _scripted_run(env, baseline, arrival_seed=3)
    scenario = env.scenario.at_rate(env.rate)
    reference = run(scenario.engine(), make_policy(baseline, scenario, env.horizon),
                    scenario.sample(env.horizon, 3), env.horizon)
    ours, theirs = env.result().records, reference.records
    for field in ("status", "finish_time", "first_token_time", "num_evictions", "decoded"):
        assert np.array_equal(getattr(ours, field), getattr(theirs, field), equal_nan=True), field
    assert info["completed"] == reference.finished and info["evictions"] == reference.evictions
    if memory:
        assert baseline != "vllm" or reference.evictions > 0


def test_the_return_is_minus_the_regret_and_penalties_are_charged() -> None:
    for reward, key in (("requests", "regret_requests"), ("tokens", "regret_tokens")):
        env = gym.make("LLMSched-v0", horizon=60.0, memory_tokens=15_000, reward=reward, eviction_penalty=2.0,
                       latency_penalty=0.01)
        env.reset(seed=2)
        env.action_space.seed(2)
        total, truncated, info = 0.0, False, {}
        while not truncated:
            _, r, terminated, truncated, info = env.step(env.action_space.sample())
            assert terminated is False
            total += r
        assert info["evictions"] > 0  # random admissions at this memory do evict
        penalties = total + info[key]
        assert penalties < -2.0 * info["evictions"]  # eviction penalty plus a positive latency penalty
        plain = gym.make("LLMSched-v0", horizon=60.0, memory_tokens=15_000, reward=reward)
        plain.reset(seed=2)
        plain.action_space.seed(2)
        total, truncated = 0.0, False
        while not truncated:
            _, r, _, truncated, info = plain.step(plain.action_space.sample())
            total += r
        assert total == pytest.approx(-info[key], abs=1e-6)
        assert {"throughput_rps", "p99_latency_s", "mean_memory_frac", "fluid_throughput_rps"} <= set(info)


def test_actions_outside_the_mask_are_clipped_never_raised() -> None:
    env = gym.make("LLMSched-v0", horizon=30.0, memory_tokens=6_000).unwrapped
    env.reset(seed=0)
    seen_clip = False
    for step in range(400):
        mask = env.action_masks().reshape(env.control.num_classes, -1)
        allowed = mask.sum(axis=1) - 1
        action = np.array([64, -3]) if step % 2 else allowed + 5
        _, _, _, truncated, info = env.step(action)
        seen_clip |= info["clipped"]
        assert (info["admitted"] <= allowed).all()
        if truncated:
            break
    assert seen_clip
    with pytest.raises(ConfigError, match="one count per class"):
        env.reset(seed=0)
        env.step(np.array([1, 2, 3]))


def test_masks_allow_exactly_the_counts_that_fit() -> None:
    env = gym.make("LLMSched-v0", horizon=30.0).unwrapped
    env.reset(seed=4)
    for _ in range(200):
        mask = env.action_masks().reshape(env.control.num_classes, -1)
        assert mask[:, 0].all()  # admitting nothing is always allowed
        fits = mask.sum(axis=1) - 1
        assert (np.diff(mask.astype(int), axis=1) <= 0).all()  # a prefix of counts
        assert fits.max() >= 1  # every step is a real decision
        state = env.scheduler_state()
        classes = env.control._classes(state)
        waiting = np.bincount(classes[state.waiting], minlength=len(fits))
        assert (fits <= waiting).all()
        # Exactly what fits: the oldest fits_k of class k fit in the blocks left after the decodes grow; one more
        # does not.
        running = state.running
        room = state.free_blocks - int(np.count_nonzero(state.kv_tokens[running] % state.block_size == 0))
        for k, count in enumerate(fits):
            queue = state.waiting[classes[state.waiting] == k]
            blocks = np.cumsum(state.blocks_for(state.context_len[queue]))
            assert count == 0 or blocks[count - 1] <= room
            assert count == min(len(queue), env.control.max_admit) or blocks[count] > room
        _, _, _, truncated, _ = env.step(fits)  # the most the mask allows, class by class
        if truncated:
            break


ids = st.sampled_from(ENV_IDS)


@settings(max_examples=15)
@given(env_id=ids, seed=st.integers(0, 2**31 - 1), memory=st.integers(2_000, 60_000),
       block=st.sampled_from([1, 16, 32]), rate=st.floats(5.0, 60.0),
       types=st.sampled_from([None, "p=20,o=40,rate=1", "p=300,o=20,rate=2;p=30,o=300,rate=1;p=64,o=64,rate=1"]))
def test_random_actions_keep_the_engine_invariants(env_id: str, seed: int, memory: int, block: int, rate: float,
                                                   types: str | None) -> None:
    env = gym.make(env_id, horizon=15.0, memory_tokens=memory, block_size=block, rate=rate, types=types)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    truncated = False
    while not truncated:
        assert env.observation_space.contains(obs)
        action = rng.integers(-2, env.unwrapped.control.max_admit + 4, env.action_space.shape)
        obs, reward, terminated, truncated, info = env.step(action)
        assert np.isfinite(reward) and not terminated
        check_engine(env.unwrapped.engine)
    assert info["arrived"] == info["completed"] + info["waiting"] + info["running"]


def test_a_rate_range_is_drawn_at_each_reset_and_options_pin_it() -> None:
    env = gym.make("LLMSched-v0", rate=(20.0, 30.0), horizon=10.0).unwrapped
    rates = set()
    for seed in range(5):
        env.reset(seed=seed)
        assert 20.0 <= env.rate <= 30.0
        rates.add(env.rate)
    assert len(rates) == 5
    env.reset(seed=0, options={"rate": 25.0, "arrival_seed": 9})
    assert env.rate == 25.0 and env.arrival_seed == 9
    with pytest.raises(ConfigError, match="unknown reset option"):
        env.reset(options={"speed": 1})


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": (30.0, 20.0)}, "0 < low <= high"),
    ({"reward": "latency"}, "reward must be"),
    ({"render_mode": "svg"}, "render_mode must be"),
    ({"horizon": -1.0}, "horizon must be"),
    ({"max_admit": 0}, "max_admit"),
    ({"types": "p=100,o=100,rate=1", "memory_tokens": 64, "block_size": 16}, "needs 200 KV tokens"),
])
def test_bad_arguments_name_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(LLMSchedError, match=message):
        gym.make("LLMSched-v0", **kwargs)


def test_rendering_ansi_and_rgb_array() -> None:
    env = gym.make("LLMSched-v0", horizon=20.0, render_mode="ansi")
    env.reset(seed=0)
    for _ in range(50):
        env.step(env.action_space.sample())
    text = env.render()
    assert "KV [" in text and "regret" in text and "queue" in text
    env = gym.make("LLMSched-Hidden-v0", horizon=20.0, render_mode="rgb_array")
    env.reset(seed=0)
    for _ in range(50):
        env.step(env.action_space.sample())
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and frame.std() > 0


def test_projected_peak_is_the_max_over_future_iterations() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 20))
        context, remaining = rng.integers(1, 100, n), rng.integers(1, 30, n)
        brute = max(int(((context + t) * (remaining >= t)).sum()) for t in range(1, remaining.max() + 1))
        assert projected_peak_tokens(context, remaining) == brute
    assert projected_peak_tokens(np.empty(0, np.int64), np.empty(0, np.int64)) == 0
