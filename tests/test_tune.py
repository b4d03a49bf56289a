"""``llmsched tune``: trainings as Ray Tune trials (agents/tune.py). The tune file is checked without Ray; the
trials run on a local Ray of two CPUs where Ray is installed (CI's environment of the ``ray`` extra, with
``LLMSCHED_REQUIRE_RAY=1`` so that they fail rather than skip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agents.tune import METRIC, load_tune_config, run_trial
from llmsched_env.cli import app
from llmsched_env.errors import ConfigError
from tests.ray_support import needs_ray, ray_installed

runner = CliRunner()

#: A training recipe that trains in seconds: 256 frames of PPO on 30 s episodes, validated on one seed.
TINY_RECIPE = """
version = 1
algo = "ppo"
env_id = "LLMSched-v0"
timesteps = 256
n_envs = 2

[env]
horizon = 30.0

[hyperparameters]
n_steps = 64
batch_size = 64
n_epochs = 1
policy_kwargs = { net_arch = [16] }

[evaluation]
seeds = [1000]
every = 1_000_000
checkpoint_every = 128
"""


def _tune_file(folder: Path, body: str) -> Path:
    (folder / "tiny.toml").write_text(TINY_RECIPE)
    path = folder / "tune.toml"
    path.write_text(body)
    return path


TWO_TRIALS = """train = "tiny.toml"
seeds = [0]

[grid]
"hyperparameters.learning_rate" = [3e-4, 1e-3]
"""


def test_a_tune_file_makes_every_combination_of_its_grid_for_every_seed(tmp_path: Path) -> None:
    config = load_tune_config(_tune_file(tmp_path, """train = "tiny.toml"
seeds = [0, 1]
[grid]
"hyperparameters.learning_rate" = [3e-4, 1e-3]
"env.horizon" = [20.0, 30.0, 40.0]
timesteps = [128]
"""))
    trials = config.trials()
    assert len(trials) == 2 * 3 * 2 and [t.name for t in trials[:2]] == ["trial-000-seed0", "trial-001-seed1"]
    assert {(t.config.hyperparameters["learning_rate"], t.config.env["horizon"], t.seed) for t in trials} == {
        (lr, h, s) for lr in (3e-4, 1e-3) for h in (20.0, 30.0, 40.0) for s in (0, 1)}
    assert all(t.config.timesteps == 128 and t.config.hyperparameters["n_steps"] == 64 for t in trials)


@pytest.mark.parametrize("body, message", [
    ('train = "tiny.toml"\n[grid]\n"hyperparams.learning_rate" = [1e-3]\n',
     "'hyperparams.learning_rate' is not a recipe key"),
    ('train = "tiny.toml"\n[grid]\ntimesteps = [0]\n', "timesteps must be an integer >= 1, got 0"),
    ('train = "tiny.toml"\n[grid]\nalgo = []\n', "'algo' must be a non-empty list of values"),
    ('train = "tiny.toml"\nseeds = []\n', "seeds must be a non-empty list of integers >= 0"),
    ('train = "tiny.toml"\nsamples = 3\n', "unknown key(s) samples"),
    ('seeds = [0]\n', "'train' is missing"),
    ('train = "tiny.toml"\ncpus_per_trial = 0\n', "cpus_per_trial must be a number > 0"),
    ('train = "tiny.toml"\n[grid]\n"env.horizon" = [30.0, -5.0]\n', "trial-001-seed0 {'env.horizon': -5.0}: "),
])
def test_a_bad_tune_file_is_refused_naming_the_file_and_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = _tune_file(tmp_path, body)
    with pytest.raises(ConfigError) as error:
        load_tune_config(path)
    assert message in str(error.value) and str(path) in str(error.value)
    result = runner.invoke(app, ["tune", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_a_trial_trains_its_recipe_and_reports_each_validation(tmp_path: Path) -> None:
    (trial, _) = load_tune_config(_tune_file(tmp_path, TWO_TRIALS)).trials()
    reports: list[dict] = []
    run_trial(trial, str(tmp_path / "out"), reports.append)
    folder = tmp_path / "out" / "trials" / trial.name
    assert (folder / "model.zip").is_file() and any((folder / "tb").iterdir())
    assert any((folder / "checkpoints").iterdir())
    assert reports and all(report[METRIC] == report["regret_ratio_to_wait"] for report in reports)
    assert reports[-1]["timesteps"] == 256
    assert json.loads((folder / "agent.json").read_text())["timesteps"] == 256


def test_tune_without_ray_says_what_to_install(tmp_path: Path) -> None:
    if ray_installed():
        pytest.skip("Ray is installed here")
    result = runner.invoke(app, ["tune", "--config", str(_tune_file(tmp_path, TWO_TRIALS)), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs Ray, which is not installed: pip install -e '.[ray]'" in result.output


@needs_ray
def test_two_short_trials_run_end_to_end_on_ray(tmp_path: Path) -> None:
    import ray

    out = tmp_path / "out"
    try:
        result = runner.invoke(app, ["tune", "--config", str(_tune_file(tmp_path, TWO_TRIALS)), "--out", str(out),
                                     "--jobs", "2", "--json"])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    document = json.loads((out / "tune.json").read_text())
    assert document["metric"] == "regret_ratio_to_wait" and "failed" not in document
    trials = document["trials"]
    assert sorted(t["hyperparameters.learning_rate"] for t in trials) == [3e-4, 1e-3]
    assert [t[METRIC] for t in trials] == sorted(t[METRIC] for t in trials)  # best first
    for trial in trials:
        folder = Path(trial["agent"])
        assert trial["timesteps"] == 256 and (folder / "model.zip").is_file() and any((folder / "tb").iterdir())
    assert "| trial | hyperparameters.learning_rate | seed |" in (out / "tune.md").read_text()


def test_the_shipped_tune_file_reads() -> None:
    example = Path(__file__).resolve().parents[1] / "agents" / "tunes" / "ppo-learning-rate.toml"
    trials = load_tune_config(example).trials()
    assert len(trials) == 3 * 2 * 3 and {t.config.name for t in trials} == {"ppo"}


@needs_ray
def test_a_trial_that_fails_is_listed_with_its_error(tmp_path: Path) -> None:
    import ray

    out = tmp_path / "out"
    body = 'train = "tiny.toml"\n[grid]\n"hyperparameters.batch_size" = [1]\n'  # PPO refuses it when it starts
    try:
        result = runner.invoke(app, ["tune", "--config", str(_tune_file(tmp_path, body)), "--out", str(out),
                                     "--jobs", "2"])
    finally:
        ray.shutdown()
    assert result.exit_code == 1, result.output
    document = json.loads((out / "tune.json").read_text())
    (failed,) = document["failed"]
    assert document["trials"] == [] and failed["trial"] == "trial-000-seed0"
    assert failed["hyperparameters.batch_size"] == 1
    assert failed["error"].startswith("AssertionError: ") and "failed: trial trial-000-seed0" in result.output
    assert "Failed at run time (1 tasks" in (out / "tune.md").read_text()
