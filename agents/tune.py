"""Many trainings as Ray Tune trials: seeds, hyperparameters and training distributions, each one ``llmsched train``.

A tune file (TOML) names the recipe every trial starts from (a config of ``agents/configs`` or a training TOML
file), the grid of values to try (dotted keys of the recipe, each a list) and the training seeds::

    train = "ppo"                      # the recipe: a built-in config's name, or a TOML file (relative to this one)
    seeds = [0, 1]                     # every point of the grid is trained once per seed
    cpus_per_trial = 1                 # what Ray reserves for a trial (a training uses one thread for torch)

    [grid]                             # trials = every combination of these × the seeds
    "hyperparameters.learning_rate" = [3e-4, 1e-3]
    "env.horizon" = [300.0, 600.0]

Each trial is :func:`agents.train.train` on its recipe, into ``OUT/trials/<trial>/`` (the agent, its checkpoints,
its TensorBoard logs, its curves: what ``llmsched train --out`` writes), reporting every validation to Ray Tune:
the regret ratio the training keeps its best model by (:func:`agents.train.validation_metric`, lower is better;
the agent's regret over its baseline's on the same validation episodes, the quantity its evaluation and judging
report) as ``regret_ratio``, beside every other validation metric. The summary (``OUT/tune.json``, ``tune.md``)
has one row per trial, best first; a trial that failed is listed with its error, and the others' rows stand.

Every trial's recipe is validated before Ray starts (a bad key or value exits 2, naming the file and the key).
"""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from agents.config import TrainConfig, config_from_dict, load_config
from llmsched_env.errors import ConfigError

#: The sections of a training recipe whose keys a grid may set (``section.key``); other grid keys are top-level.
SECTIONS = ("env", "hyperparameters", "imitation", "evaluation")
#: The top-level keys of a training recipe a grid may set.
TOP_LEVEL = ("algo", "env_id", "timesteps", "n_envs")
#: The metric every trial reports to Ray Tune and the summary is sorted by (lower is better).
METRIC = "regret_ratio"
#: The other validation metrics a trial's summary row keeps (residual agents' and per-workload agents').
SUMMARY_METRICS = ("throughput_ratio_to_base", "p99_difference_s", "regret_s", "throughput_rps", "p99_latency_s",
                   "regret_requests")


@dataclass(frozen=True)
class Trial:
    """One training of a tune: which grid point and seed, and the recipe they make."""

    index: int
    settings: dict[str, Any]  # the grid's dotted keys and this trial's values
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}-seed{self.seed}"


@dataclass(frozen=True)
class TuneConfig:
    """A tune file, read (see the module docstring)."""

    base: TrainConfig
    grid: dict[str, list[Any]]
    seeds: tuple[int, ...]
    cpus_per_trial: float
    source: str

    def trials(self) -> list[Trial]:
        """Every combination of the grid's values × every seed, in the grid's order; each recipe validated."""
        keys = list(self.grid)
        points = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        trials = []
        for point, seed in itertools.product(points, self.seeds):
            trials.append(Trial(len(trials), point, seed, with_settings(self.base, point, self.source)))
        return trials


def with_settings(base: TrainConfig, settings: dict[str, Any], source: str) -> TrainConfig:
    """``base`` with the dotted ``settings`` set (``section.key`` or a top-level key), validated as a recipe is."""
    data = base.to_dict()
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            data.setdefault(section, {})[name] = value
        elif not name and key in TOP_LEVEL:
            data[key] = value
        else:
            raise ConfigError(f"{source}: [grid] {key!r} is not a recipe key: give one of {', '.join(TOP_LEVEL)}, or "
                              f"SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
    return config_from_dict(data, f"{source} [grid] {settings}", base.name)


def load_tune_config(path: str | Path) -> TuneConfig:
    """Read and check a tune file (see the module docstring); every trial's recipe is validated here."""
    path = Path(path)
    source = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such tune file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from None
    allowed = {"train", "seeds", "cpus_per_trial", "grid"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    if "train" not in data:
        raise ConfigError(f"{source}: 'train' is missing: the recipe every trial starts from (a config name or file)")
    recipe = str(data["train"])
    beside = path.parent / recipe
    base = load_config(beside if recipe.endswith(".toml") and beside.is_file() else recipe)
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    cpus = data.get("cpus_per_trial", 1)
    if not isinstance(cpus, (int, float)) or not math.isfinite(cpus) or cpus <= 0:
        raise ConfigError(f"{source}: cpus_per_trial must be a number > 0, got {cpus!r}")
    grid = data.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: [grid] must be a table of KEY = [values]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: [grid] {key!r} must be a non-empty list of values, got {values!r}")
    config = TuneConfig(base, {k: list(v) for k, v in grid.items()}, tuple(seeds), float(cpus), source)
    _check_environments(config.trials(), source)  # every recipe checked now, before any trial starts
    return config


def _check_environments(trials: Sequence[Trial], source: str) -> None:
    """Build each distinct environment the trials train on, as ``llmsched train`` does first: a bad environment
    argument is refused here, naming the trial, not in a worker once the trials run."""
    from agents.train import make_env

    seen: set[str] = set()
    for trial in trials:
        key = repr((trial.config.env_id, sorted(trial.config.env.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            make_env(trial.config.env_id, dict(trial.config.env))
        except ConfigError as error:
            raise ConfigError(f"{source}: {trial.name} {trial.settings}: {error}") from None


def run_trial(trial: Trial, out: str, report: Callable[[dict[str, Any]], None]) -> None:
    """Train ``trial`` into ``out/trials/<name>``, handing ``report`` each validation's metrics with
    :data:`METRIC`."""
    from agents.train import train, validation_metric

    metric = validation_metric(trial.config)

    def reported(metrics: dict[str, float]) -> None:
        report({METRIC: float(metrics[metric]), **metrics})

    train(trial.config, Path(out) / "trials" / trial.name, seed=trial.seed, progress_bar=False, log=lambda _: None,
          command=f"llmsched tune: {trial.name} {trial.settings}", on_eval=reported)


def _ray_trial(parameters: dict[str, Any]) -> None:
    """A Ray Tune function trainable: :func:`run_trial`, reporting to Tune."""
    from ray import tune

    run_trial(parameters["trial"], parameters["out"], tune.report)


def tune(config: TuneConfig, out: Path, *, address: str | None = None, num_cpus: int | None = None,
         on_trial_done: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]],
                                                                                 list[dict[str, Any]]]:
    """Run every trial of ``config`` as a Ray Tune trial (on a local Ray of ``num_cpus`` CPUs, or the cluster at
    ``address``; every trial writes under ``out``, which a cluster's workers must reach at the same path). Returns
    ``(rows, failed)``: a row per finished trial (its settings, seed, folder and last validation, best
    :data:`METRIC` first) and the failed trials with their errors."""
    from llmsched_env.executor import init_ray

    init_ray(address, num_cpus)  # one line saying what to install when Ray is not there
    from ray import tune as ray_tune

    trials = config.trials()
    out = out.resolve()
    trainable = ray_tune.with_resources(_ray_trial, {"cpu": config.cpus_per_trial})
    callbacks = [_trial_done_callback(on_trial_done)] if on_trial_done is not None else []
    tuner = ray_tune.Tuner(
        trainable,
        param_space={"trial": ray_tune.grid_search(trials), "out": str(out)},
        tune_config=ray_tune.TuneConfig(metric=METRIC, mode="min"),
        run_config=ray_tune.RunConfig(name="tune", storage_path=str(out / "ray"), verbose=0, callbacks=callbacks))
    grid = tuner.fit()
    rows, failed = [], []
    for result in grid:
        trial: Trial = result.config["trial"]
        described = {"trial": trial.name, **trial.settings, "seed": trial.seed}
        if result.error is not None:
            cause = getattr(result.error, "cause", None)
            error = cause if isinstance(cause, BaseException) else result.error
            failed.append({**described, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
            continue
        metrics = result.metrics or {}
        rows.append({**described, METRIC: metrics.get(METRIC), "timesteps": metrics.get("timesteps"),
                     **{k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
                     "agent": str(out / "trials" / trial.name)})
    rows.sort(key=lambda row: (math.inf if row[METRIC] is None else row[METRIC], row["trial"]))
    failed.sort(key=lambda row: row["trial"])
    return rows, failed


def _trial_done_callback(on_done: Callable[[dict[str, Any]], None]) -> Any:
    """A Ray Tune callback that tells the command's progress when a trial ends (its name and last metric)."""
    from ray.tune import Callback

    class TrialDone(Callback):  # type: ignore[misc]
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            on_done({"trial": trial.config["trial"].name, METRIC: (trial.last_result or {}).get(METRIC)})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            on_done({"trial": trial.config["trial"].name, METRIC: None})

    return TrialDone()


def summary_markdown(rows: Sequence[dict[str, Any]], failed: Sequence[dict[str, Any]], metric: str) -> str:
    """The trials as a Markdown table, best first, then the failed ones."""
    from llmsched_env.report import failures_markdown

    settings = [k for k in (rows[0] if rows else {}) if k not in ("trial", "seed", METRIC, "timesteps", "agent",
                                                                  *SUMMARY_METRICS)]
    headers = ["trial", *settings, "seed", f"{METRIC} ({metric})", "timesteps", "folder"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        value = row[METRIC]
        lines.append("| " + " | ".join([row["trial"], *(str(row[k]) for k in settings), str(row["seed"]),
                                         "–" if value is None else f"{value:.4f}", f"{row['timesteps'] or 0:,}",
                                         row["agent"]]) + " |")
    return "\n".join(lines) + "\n" + failures_markdown(failed)
