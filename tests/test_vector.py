"""The native vector environment (:mod:`llmsched_env.vector`) and its SB3 adapter (:mod:`agents.vec_env`)
give, episode by episode, exactly what single environments with the same seeds give."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numba
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import llmsched_env  # noqa: F401  (registers the ids)
from llmsched_env import episode as episode_module
from llmsched_env import vector as vector_module
from llmsched_env.errors import ConfigError
from llmsched_env.registration import ENV_IDS
from llmsched_env.vector import LLMSchedVectorEnv
from tests.invariants import unowned_arrays

HORIZON = 40.0


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a, b))


def _assert_same_info(vector_info: dict[str, Any], e: int, single: dict[str, Any], where: str) -> None:
    for key, value in single.items():
        assert _same(np.asarray(vector_info[key][e]).tolist() if isinstance(value, np.ndarray) else
                     vector_info[key][e], value.tolist() if isinstance(value, np.ndarray) else value), \
            f"{where}: info[{key!r}] {vector_info[key][e]!r} != {value!r}"


def _run_side_by_side(per_env: list[dict[str, Any]], steps: int, seed: int, high: int,
                      shared: dict[str, Any] | None = None) -> tuple[int, int]:
    """Step a vector env and single envs with the same seeds and actions; everything must agree.
    Returns (episodes ended, evictions seen in ended episodes)."""
    shared = dict(shared or {})
    vector = LLMSchedVectorEnv(len(per_env), env_kwargs=per_env, **shared)
    singles = [gym.make("LLMSched-v0", **{**shared, **kwargs}).unwrapped for kwargs in per_env]
    observations, info = vector.reset(seed=seed)
    for e, env in enumerate(singles):
        observation, single_info = env.reset(seed=seed + e)
        assert np.array_equal(observations[e], observation)
        _assert_same_info(info, e, single_info, "reset")
        assert np.array_equal(vector.action_masks()[e], env.action_masks())
    rng = np.random.default_rng(seed)
    ended = evictions = 0
    for step in range(steps):
        actions = rng.integers(0, high, size=vector.action_space.shape)
        observations, rewards, terminated, truncated, info = vector.step(actions)
        assert not terminated.any()
        for e, env in enumerate(singles):
            observation, reward, _, done, single_info = env.step(actions[e])
            where = f"step {step}, env {e}"
            assert truncated[e] == done, where
            assert rewards[e] == reward, f"{where}: reward {rewards[e]!r} != {reward!r}"
            if done:
                assert info["_final_obs"][e]
                assert np.array_equal(info["final_obs"][e], observation), where
                _assert_same_info(info["final_info"], e, single_info, where)
                ended += 1
                evictions += single_info["evictions"]
                observation, single_info = env.reset()
            else:
                assert "_final_obs" not in info or not info["_final_obs"][e]
            assert np.array_equal(observations[e], observation), where
            _assert_same_info(info, e, single_info, where)
            assert np.array_equal(vector.action_masks()[e], env.action_masks()), where
    return ended, evictions


def test_the_vector_env_gives_exactly_what_single_envs_give() -> None:
    # Large random admissions overrun memory (evictions on the engine's general path); short episodes end and
    # reset inside the run (same-step autoreset).
    ended, evictions = _run_side_by_side([{"horizon": 20.0, "memory_tokens": 12_000}] * 3, steps=1500, seed=7,
                                         high=40)
    assert ended >= 3
    assert evictions > 0


def test_episodes_of_one_vector_env_may_differ_in_what_a_reset_draws() -> None:
    per_env = [
        {"horizon": HORIZON},
        {"horizon": HORIZON, "memory_tokens": 30_000, "rate": (20.0, 40.0)},
        {"horizon": 25.0, "output_lengths_known": False, "max_classes": 2},
        {"horizon": HORIZON, "arrivals": "onoff", "reward": "tokens", "latency_penalty": 0.01},
    ]
    ended, _ = _run_side_by_side(per_env, steps=1200, seed=3, high=8)
    assert ended >= 1


def test_every_registered_id_makes_a_native_vector_env() -> None:
    for env_id in ENV_IDS:
        vector = gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", horizon=10.0)
        assert isinstance(vector, LLMSchedVectorEnv), env_id
        assert vector.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
        observations, _ = vector.reset(seed=0)
        assert observations.shape == (2, *vector.single_observation_space.shape)
        assert vector.observation_space.contains(observations)
        vector.close()


def test_a_vector_env_names_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="num_envs must be an integer >= 1"):
        LLMSchedVectorEnv(0)
    with pytest.raises(ConfigError, match="compiled=False is refused"):
        LLMSchedVectorEnv(2, compiled=False)
    with pytest.raises(ConfigError, match="does not render"):
        LLMSchedVectorEnv(2, render_mode="ansi")
    with pytest.raises(ConfigError, match="env_kwargs has 1 entries for num_envs = 2"):
        LLMSchedVectorEnv(2, env_kwargs=[{}])
    with pytest.raises(ConfigError, match="environment 1 has observation space"):
        LLMSchedVectorEnv(2, env_kwargs=[{}, {"stage_buckets": 2}])
    vector = LLMSchedVectorEnv(2, horizon=10.0)
    with pytest.raises(RuntimeError, match="reset"):
        vector.step(np.zeros((2, 2), dtype=np.int64))
    vector.reset(seed=0)
    with pytest.raises(ConfigError, match=r"actions must have shape \(num_envs, classes\) = \(2, 2\), got \(2,\)"):
        vector.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(ConfigError, match="3 seeds for 2 environments"):
        vector.reset(seed=[1, 2, 3])


def test_the_sb3_adapter_steps_as_dummy_vec_env_does() -> None:
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.vec_env import NativeVecEnv

    n = 3
    native = NativeVecEnv(LLMSchedVectorEnv(n, horizon=20.0))
    dummy = DummyVecEnv([lambda: gym.make("LLMSched-v0", horizon=20.0).unwrapped for _ in range(n)])
    native.seed(11)
    dummy.seed(11)
    assert np.array_equal(native.reset(), dummy.reset())
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(1500):
        actions = rng.integers(0, 6, size=(n, 2))
        assert np.array_equal(np.stack(native.env_method("action_masks")), np.stack(dummy.env_method("action_masks")))
        native.step_async(actions)
        dummy.step_async(actions)
        observations, rewards, dones, infos = native.step_wait()
        expected_observations, expected_rewards, expected_dones, expected_infos = dummy.step_wait()
        assert np.array_equal(observations, expected_observations)
        assert np.array_equal(rewards, expected_rewards)
        assert np.array_equal(dones, expected_dones)
        for info, expected in zip(infos, expected_infos):
            for key in ("completed", "regret_requests", "TimeLimit.truncated", "throughput_rps"):
                assert _same(info.get(key), expected.get(key)), key
            if "terminal_observation" in expected:
                ended += 1
                assert np.array_equal(info["terminal_observation"], expected["terminal_observation"])
    assert ended >= n


def test_maskable_ppo_learns_on_the_native_vector_env() -> None:
    from sb3_contrib import MaskablePPO

    from agents.vec_env import make_native_vec_env

    env = make_native_vec_env("LLMSched-v0", 4, {"horizon": 3.0})
    model = MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=4 * 64 * 2)
    assert model.num_timesteps == 512
    assert len(model.ep_info_buffer) >= 1  # VecMonitor saw episodes end
    env.close()


def test_validation_on_the_vector_env_is_the_evaluation_loops_run() -> None:
    import torch
    from sb3_contrib import MaskablePPO

    from agents.policy import AgentPolicy
    from agents.validation import validation_runs
    from llmsched_env import run
    from llmsched_env.metrics import summarize

    torch.manual_seed(0)
    env = gym.make("LLMSched-v0", horizon=60.0).unwrapped
    model = MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, device="cpu")
    rate = env.nominal_rate
    # One seed: the vector env's forward pass is then the evaluation's, batch of one (a larger batch may round
    # the network's logits differently on some CPUs).
    (validated,) = validation_runs(model, "LLMSched-v0", {"horizon": 60.0}, [1000], rate)
    scenario = env.scenario.at_rate(rate)
    arrivals = scenario.sample(60.0, 1000)
    expected = summarize(run(scenario.engine(), AgentPolicy(model, scenario, 60.0, env.control.settings), arrivals,
                             60.0), scenario.fluid(arrivals, 60.0))
    for key in ("regret_requests", "completed", "evictions", "throughput_rps"):
        assert validated[key] == expected[key], key


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="borrowed views exist in compiled code only")
def test_no_step_hands_python_a_view_of_a_borrowed_array() -> None:
    """The episode kernel runs on borrowed views of the request table and the episode's state
    (:func:`llmsched_env.compiled.borrowed`): nothing a single env's or the vector env's step hands back to Python
    (running ids, a general-path iteration's decode and prefill) may be one, or a view of one."""
    leaks: list[str] = []
    calls = [0, 0]
    advance, get_item = episode_module.advance_episode, vector_module.get_item

    def advance_checked(*args):  # type: ignore[no-untyped-def]
        result = advance(*args)
        calls[0] += 1
        leaks.extend(unowned_arrays(result, "advance_episode"))
        return result

    def get_item_checked(items, index):  # type: ignore[no-untyped-def]
        item = get_item(items, index)
        calls[1] += 1
        leaks.extend(unowned_arrays(item, "vector env item"))
        return item

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(episode_module, "advance_episode", advance_checked)
        patch.setattr(vector_module, "get_item", get_item_checked)
        ended, evictions = _run_side_by_side([{"horizon": 20.0, "memory_tokens": 12_000}] * 2, steps=800, seed=5,
                                             high=40)
    assert ended > 0 and evictions > 0 and min(calls) > 0 and leaks == []
