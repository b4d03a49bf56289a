"""Agents: configs, the agent-as-policy adapter, a real (short) training, resume, and evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("sb3_contrib")

from agents.config import EvaluationConfig, ImitationConfig, builtin_configs, config_from_dict, load_config  # noqa: E402
from agents.policy import AgentPolicy, read_agent  # noqa: E402
from agents.train import train  # noqa: E402
from llmsched_env import run  # noqa: E402
from llmsched_env.errors import ConfigError  # noqa: E402

PRETRAINED = Path(__file__).resolve().parents[1] / "agents" / "pretrained"


def _tiny(config_name: str = "maskable-ppo", timesteps: int = 512, **changes) -> object:
    config = load_config(config_name)
    settings = {"n_envs": 1, "env": {"horizon": 20.0},
                "hyperparameters": {**config.hyperparameters, "n_steps": 256, "batch_size": 128, "n_epochs": 2},
                "imitation": ImitationConfig(episodes=1, epochs=2) if config.imitation else None,
                "evaluation": EvaluationConfig(seeds=(1000,), every=256, checkpoint_every=256)}
    return replace(config, timesteps=timesteps, **{**settings, **changes})


def test_builtin_configs_load_and_bad_ones_name_the_key(tmp_path: Path) -> None:
    assert {"maskable-ppo", "ppo", "maskable-ppo-bursty-hidden"} <= set(builtin_configs())
    for name in builtin_configs():
        config = load_config(name)
        assert config.algo in ("ppo", "maskable-ppo") and config.timesteps > 0
    with pytest.raises(ConfigError, match="unknown key.*learning_rat"):
        config_from_dict({"learning_rat": 1}, "x.toml", "x")
    with pytest.raises(ConfigError, match=r"\[imitation\] unknown key.*epoch"):
        config_from_dict({"imitation": {"teacher": "wait", "epoch": 3}}, "x.toml", "x")
    with pytest.raises(ConfigError, match="algo must be one of"):
        config_from_dict({"algo": "dqn"}, "x.toml", "x")
    with pytest.raises(ConfigError, match="version 2 is not supported"):
        config_from_dict({"version": 2}, "x.toml", "x")
    bad = tmp_path / "bad.toml"
    bad.write_text("algo = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no training config"):
        load_config("nope")


def test_a_config_extends_another_table_by_table(tmp_path: Path) -> None:
    """``extends``: the parent's tables with the file's on top, key by key (nested tables too); other values, arrays
    included, replace; the name is the file's; chains resolve; a cycle or a missing parent names the file."""
    parent = load_config("ppo-residual-suite-v2")
    child = tmp_path / "child.toml"
    child.write_text('extends = "ppo-residual-suite-v2"\ntimesteps = 4096\n[env]\nbatching = "stall-free"\n'
                     '[hyperparameters]\npolicy_kwargs = { log_std_init = -2.0 }\n[evaluation]\nseeds = [7]\n')
    config = load_config(child)
    assert config.name == "child" and config.timesteps == 4096 and config.n_envs == parent.n_envs
    assert config.env == {**parent.env, "batching": "stall-free"}
    assert config.hyperparameters["policy_kwargs"] == {**parent.hyperparameters["policy_kwargs"], "log_std_init": -2.0}
    assert config.evaluation == replace(parent.evaluation, seeds=(7,)) and config.imitation == parent.imitation
    grandchild = tmp_path / "grandchild.toml"  # a path, relative to the extending file
    grandchild.write_text('extends = "child.toml"\n[env]\ninterval_s = 2.0\n')
    assert load_config(grandchild).env == {**config.env, "interval_s": 2.0}
    # The shipped variants state only how they differ, and resolve to the whole recipe.
    assert load_config("ppo-residual-suite-v4").to_dict() == {
        **parent.to_dict(), "name": "ppo-residual-suite-v4",
        "env": {**parent.env, "batching": "stall-free-margin-backlog-known"}}
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"b\.toml: extends 'a\.toml', a cycle: .*a\.toml -> .*b\.toml -> .*a\.toml$"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "orphan.toml").write_text('extends = "ppo-residual-suite-v9"\n')
    with pytest.raises(ConfigError, match=r"orphan\.toml: extends 'ppo-residual-suite-v9', which is neither"):
        load_config(tmp_path / "orphan.toml")
    (tmp_path / "typo.toml").write_text('extends = "ppo"\n[evaluation]\nevry = 5\n')
    with pytest.raises(ConfigError, match=r"typo\.toml: \[evaluation\] unknown key.*evry"):
        load_config(tmp_path / "typo.toml")
    (tmp_path / "number.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must name a built-in configuration or a TOML file, got 3"):
        load_config(tmp_path / "number.toml")


def test_an_agent_runs_through_run_exactly_as_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """… also when the run retires finished requests every 32 finishes (the agent's interface then releases the
    classes it kept for them: reading a released one would change its choices)."""
    from sb3_contrib import MaskablePPO

    from llmsched_env import runner

    env = gym.make("LLMSched-v0", horizon=60.0, memory_tokens=20_000).unwrapped
    model = MaskablePPO("MlpPolicy", env, seed=0, device="cpu")  # untrained: its choices are arbitrary, not trivial
    obs, _ = env.reset(seed=0, options={"arrival_seed": 5})
    truncated = False
    while not truncated:
        action, _ = model.predict(obs, deterministic=True, action_masks=env.action_masks())
        obs, _, _, truncated, info = env.step(action)
    scenario = env.scenario.at_rate(env.rate)
    monkeypatch.setattr(runner, "RETIRE_EVERY", 32)
    engine = scenario.engine()
    result = run(engine, AgentPolicy(model, scenario, env.horizon), scenario.chunks(env.horizon, 5), env.horizon)
    assert engine.retired > 500
    ours = env.result().records
    assert np.array_equal(ours.finish_time, result.records.finish_time, equal_nan=True)
    assert np.array_equal(ours.num_evictions, result.records.num_evictions)
    assert result.finished == info["completed"] and result.evictions == info["evictions"] > 0


def test_an_agent_refuses_a_workload_with_other_classes() -> None:
    from sb3_contrib import MaskablePPO

    env = gym.make("LLMSched-v0", horizon=10.0).unwrapped
    model = MaskablePPO("MlpPolicy", env, seed=0, device="cpu")
    other = gym.make("LLMSched-v0", types="p=10,o=10,rate=1;p=20,o=20,rate=1;p=30,o=5,rate=1").unwrapped.scenario
    with pytest.raises(ConfigError, match="3 class"):
        AgentPolicy(model, other, 10.0)


@pytest.mark.parametrize("config_name", ["maskable-ppo", "ppo"])
def test_training_saves_an_agent_that_reloads_and_resumes(tmp_path: Path, config_name: str) -> None:
    out = tmp_path / "agent"
    spec = train(_tiny(config_name), out, seed=1, progress_bar=False, log=lambda _: None)
    assert spec.timesteps == 512
    assert spec.model_timesteps is not None and 0 < spec.model_timesteps <= 512  # the validation that kept it
    for name in ("model.zip", "agent.json", "config.toml"):
        assert (out / name).is_file()
    assert json.loads((out / "agent.json").read_text())["env_id"] == "LLMSched-v0"
    assert (out / "checkpoints" / "model_512_steps.zip").is_file()  # a checkpoint at the end, whatever the cadence
    loaded_spec, network = read_agent(out)
    assert loaded_spec == spec
    written = json.loads((out / "agent.json").read_text())
    del written["model_timesteps"]  # an agent.json from before the field: read, the frame unknown
    (out / "agent.json").write_text(json.dumps(written))
    assert read_agent(out)[0] == replace(spec, model_timesteps=None)
    from agents.policy import algorithm_class

    trusted = algorithm_class(config_name).load(out / "model.zip", device="cpu")  # our own file: SB3's loader is fine
    ours, theirs = network.policy.state_dict(), trusted.policy.state_dict()
    assert ours.keys() == theirs.keys() and all(bool((ours[k] == theirs[k]).all()) for k in ours)
    resumed = train(_tiny(config_name, timesteps=1024), out, seed=1, resume=True, progress_bar=False,
                    log=lambda _: None)
    assert resumed.timesteps == 1024
    # The model kept before the interruption is what the resumed run's validations had to beat.
    assert resumed.model_timesteps == json.loads((out / "best_model.json").read_text())["timesteps"]
    # Resumed without validation, the run keeps its own final model, not the best model an earlier run left.
    unvalidated = train(_tiny(config_name, timesteps=1536, evaluation=EvaluationConfig(seeds=())), out, seed=1,
                        resume=True, progress_bar=False, log=lambda _: None)
    assert unvalidated.model_timesteps == 1536
    assert (out / "model.zip").read_bytes() != (out / "best_model.zip").read_bytes()
    other = "ppo" if config_name == "maskable-ppo" else "maskable-ppo"
    with pytest.raises(ConfigError, match="was trained with algo"):
        train(replace(_tiny(config_name, timesteps=2048), algo=other), out, resume=True, progress_bar=False,
              log=lambda _: None)
    with pytest.raises(ConfigError, match="no checkpoint|holds no training run"):
        train(_tiny(config_name), tmp_path / "empty", resume=True, progress_bar=False, log=lambda _: None)


def test_a_short_run_rounds_to_whole_rollouts_and_says_so(tmp_path: Path) -> None:
    said: list[str] = []
    spec = train(replace(_tiny(timesteps=300), evaluation=EvaluationConfig(seeds=(), checkpoint_every=10**6)),
                 tmp_path / "agent", progress_bar=False, log=said.append)
    assert spec.timesteps == 512 and any("300 steps rounded up to 512" in line for line in said)
    assert spec.model_timesteps == 512  # nothing validated: the final model
    assert (tmp_path / "agent" / "checkpoints" / "model_512_steps.zip").is_file()


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for code someone hid in a shared agent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _rewrite_archive(path: Path, replace_entry: str, content: bytes) -> None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries[replace_entry] = content
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_an_agent_directory_is_data_a_pickled_payload_never_runs(tmp_path: Path) -> None:
    import base64
    import pickle
    import shutil

    import torch

    directory = tmp_path / "shared-agent"
    shutil.copytree(PRETRAINED / "tight-memory-wait", directory)
    marker = tmp_path / "payload-ran"
    data = json.loads(__import__("zipfile").ZipFile(directory / "model.zip").read("data"))
    data["policy_class"][":serialized:"] = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    _rewrite_archive(directory / "model.zip", "data", json.dumps(data).encode())
    from agents.policy import algorithm_class

    spec, network = read_agent(directory)  # the weights are intact: it loads, and the payload never runs
    assert not marker.exists()
    assert network.observation_space == gym.make(spec.env_id, **spec.env_kwargs).observation_space
    with pytest.raises(TypeError):  # SB3's own loader runs the payload (whose result is no policy class) ...
        algorithm_class("maskable-ppo").load(directory / "model.zip", device="cpu")
    assert marker.exists()  # ... so the payload is live, and the assertion above could fail
    marker.unlink()

    buffer = __import__("io").BytesIO()
    torch.save({"weights": _Payload(marker)}, buffer)  # a payload in the weights themselves: refused, not run
    _rewrite_archive(directory / "model.zip", "policy.pth", buffer.getvalue())
    with pytest.raises(ConfigError, match="not a plain file of tensors"):
        read_agent(directory)
    assert not marker.exists()

    (directory / "model.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="not a readable model archive"):
        read_agent(directory)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    import shutil

    directory = tmp_path / "agent"
    shutil.copytree(PRETRAINED / "tight-memory-wait", directory)
    config = (directory / "config.toml").read_text().replace("net_arch = [128, 128]", "net_arch = [64, 64]")
    assert config != (directory / "config.toml").read_text()
    (directory / "config.toml").write_text(config)
    with pytest.raises(ConfigError, match="do not match the network"):
        read_agent(directory)


def test_read_agent_names_a_folder_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not an agent directory"):
        read_agent(tmp_path)


@pytest.mark.slow
def test_a_short_real_training_logs_the_serving_metrics_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = replace(_tiny(timesteps=4096), env={"horizon": 60.0})
    out = tmp_path / "agent"
    train(config, out, seed=0, progress_bar=False, log=lambda _: None)
    (run_dir,) = (out / "tb").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/regret_requests", "eval/throughput_rps", "eval/p99_latency_s", "eval/evictions",
            "eval/regret_ratio_to_wait", "serving/regret_requests", "train/value_loss"} <= tags
    assert events.Scalars("eval/regret_ratio_to_wait")[-1].step >= 4096


def test_the_pretrained_agents_load_and_match_their_environment() -> None:
    agents = [p for p in PRETRAINED.iterdir() if (p / "agent.json").is_file()]
    assert agents, "agents/pretrained holds no agent"
    for directory in agents:
        spec, model = read_agent(directory)
        env = gym.make(spec.env_id, **spec.env_kwargs)
        assert model.observation_space.shape == env.observation_space.shape
        assert spec.command.startswith("llmsched train")
