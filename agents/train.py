"""Training: PPO or MaskablePPO on an ``LLMSched-*`` environment, with TensorBoard metrics of the serving run.

Everything is stable-baselines3's own loop; what llmsched adds comes in through callbacks:
:func:`serving_metrics_callback` logs, beside SB3's curves, the regret, throughput, p99 latency and
evictions of the training episodes, and every ``evaluation.every`` steps those of the agent on fixed
validation seeds with its **regret ratio to the reference baseline** (WAIT by default) on the same
arrivals; it keeps the best validated model. Checkpoints come from SB3's ``CheckpointCallback``.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agents.config import TrainConfig, to_toml
from agents.policy import AGENT_FILE, MODEL_FILE, AgentSpec, algorithm_class, read_weights
from agents.validation import (
    baseline_validation_runs,
    residual_validation_runs,
    selection_bounds,
    validation_levels,
    validation_runs,
    within_bounds,
    worst_departures,
)
from llmsched_env.errors import ConfigError
from llmsched_env.metrics import summarize
from llmsched_env.registration import ENV_IDS, RESIDUAL_ENV_IDS, residual_env_kwargs
from llmsched_env.runner import run

CHECKPOINTS = "checkpoints"
#: A residual agent's run: every baseline's validation regret per workload (the curves' reference levels).
VALIDATION_LEVELS = "validation_baselines.json"
#: A residual agent's run: per validation point (a workload at a load), the best baseline on the validation episodes
#: and the selection's bounds.
SELECTION_BOUNDS = "selection_bounds.json"
BEST_MODEL = "best_model.zip"
#: The validation that kept ``best_model.zip``: its frame and the figures it was chosen by.
BEST_RECORD = "best_model.json"
#: Validated models that may yet be kept (:class:`KeptModel`).
VALIDATED = "validated"


def make_env(env_id: str, env_kwargs: dict[str, Any]) -> Any:
    """One environment, unwrapped of Gymnasium's checkers (SB3's Monitor wraps it in the vector env)."""
    import gymnasium as gym

    import llmsched_env  # noqa: F401  (registers the ids)

    if env_id not in ENV_IDS and env_id not in RESIDUAL_ENV_IDS:
        raise ConfigError(f"unknown environment id {env_id!r}; registered: {', '.join([*ENV_IDS, *RESIDUAL_ENV_IDS])}")
    return gym.make(env_id, **env_kwargs).unwrapped


class KeptModel:
    """A run's best validated model: ``best_model.zip`` and what it was chosen by (``best_model.json``).

    The model kept has the least regret, where regrets within ``tolerance`` of the least offered so far count as
    level; among those, the lowest tie-break (a residual agent's p99 difference to its base), the earliest on a
    tie. With a tolerance of 0 that is the least regret, then the lowest tie-break. A validation with more regret
    than the kept one's may be chosen later, when a lower regret moves the band past the kept one: such a model is
    saved under ``validated/`` while it stays within the band. A resumed run reads the record back, so that it
    keeps a later model only where that one beats the models kept before the interruption."""

    def __init__(self, out: Path, resume: bool, tolerance: float = 0.0) -> None:
        self.out = out
        self.tolerance = float(tolerance)  # in the regret's own unit
        self.key: tuple[float, float] | None = None  # the kept model's (regret, tie-break)
        self.timesteps: int | None = None  # the frame of the model kept
        self.standby: dict[int, tuple[float, float]] = {}  # frame → key of the models saved under validated/
        record = out / BEST_RECORD
        if resume and record.is_file() and (out / BEST_MODEL).is_file():
            data = json.loads(record.read_text())
            key = [float(x) for x in data["key"]]
            self.key, self.timesteps = (key[0], key[1] if len(key) > 1 else 0.0), int(data["timesteps"])
            self.standby = {int(frame): (float(regret), float(tiebreak))
                            for frame, regret, tiebreak in data.get("standby", ())
                            if self._standby_file(int(frame)).is_file()}

    def _standby_file(self, timesteps: int) -> Path:
        return self.out / VALIDATED / f"model_{timesteps}_steps.zip"

    def offer(self, model: Any, regret: float, tiebreak: float = 0.0) -> None:
        """Offer ``model``, validated at ``regret`` (lower is better) and ``tiebreak`` (lower is better)."""
        timesteps, key = int(model.num_timesteps), (float(regret), float(tiebreak))
        # A resumed run validates some frames again: the new validation replaces the old one's.
        before = {frame: k for frame, k in self.standby.items() if frame != timesteps}
        if self.key is not None and self.timesteps is not None and self.timesteps != timesteps:
            before[self.timesteps] = self.key
        candidates = {**before, timesteps: key}
        least = min(regret for regret, _ in candidates.values())
        level = {frame: k for frame, k in candidates.items() if k[0] <= least + self.tolerance}
        chosen = min(level, key=lambda frame: (level[frame][1], frame))
        # Those in the band with less regret than the chosen one may outlast it there: they stay on standby.
        standby = {frame: k for frame, k in level.items() if frame != chosen and k[0] < level[chosen][0]}
        if standby:
            (self.out / VALIDATED).mkdir(exist_ok=True)
        if self.timesteps in standby:  # the model kept so far goes on standby: before best_model.zip is replaced
            shutil.copyfile(self.out / BEST_MODEL, self._standby_file(self.timesteps))
        if chosen == timesteps:
            model.save(self.out / BEST_MODEL)
        elif chosen != self.timesteps:  # a model on standby takes over
            shutil.copyfile(self._standby_file(chosen), self.out / BEST_MODEL)
        if timesteps in standby:
            model.save(self._standby_file(timesteps))
        for frame in set(self.standby) - set(standby):  # out of the band for good, or kept now
            self._standby_file(frame).unlink(missing_ok=True)
        self.key, self.timesteps, self.standby = level[chosen], chosen, standby
        (self.out / BEST_RECORD).write_text(json.dumps({
            "timesteps": chosen, "key": list(self.key), "tolerance": self.tolerance,
            "standby": [[frame, *k] for frame, k in sorted(standby.items())]}) + "\n")


def residual_metrics_callback(env_kwargs: dict[str, Any], seeds: tuple[int, ...], every: int, out: Path,
                              on_eval: Callable[[dict[str, float]], None] | None = None, *,
                              throughput_margin: float = np.inf, p99_margin: float = np.inf,
                              regret_tolerance: float = 0.0, resume: bool = False) -> Any:
    """The SB3 callback of a residual agent (``LLMSched-Residual-v*``): every ``every`` steps (and at the start, and
    when asked) the agent's validation episodes on every workload of its training distribution, at each of its
    swept loads (:func:`~agents.validation.validation_loads`), beside the baseline it adjusts on the same arrivals:
    the regret ratio per scenario over its loads (``eval/ratio/<scenario>``) and over all
    (``eval/regret_ratio_to_base``, the ratio of the summed regrets in seconds of the fluid optimum's service), the
    throughput ratio and the p99 difference, and the worst validation point's against its best baseline
    (:func:`~agents.validation.worst_departures`). It keeps in ``out`` the validated model of least regret (regrets
    within ``regret_tolerance`` times the base's regret of the least counting as level; among those, the lowest mean
    p99 difference to the base) among those within the margins of every point's best baseline (``eval/admissible``;
    :func:`~agents.validation.selection_bounds`, :class:`~agents.config.EvaluationConfig`); with ``resume``, against
    the models kept before (:class:`KeptModel`)."""
    from stable_baselines3.common.callbacks import BaseCallback

    base_rows = residual_validation_runs(None, env_kwargs, seeds, zero_action=True)
    reference = {(row["scenario"], row["load"], row["seed"]): row for row in base_rows}
    # Every baseline on the same validation episodes: the curves' reference lines (agents/curves.py) and, the best
    # of each workload, what the selection's margins are measured against.
    baselines = baseline_validation_runs(env_kwargs, seeds)
    (out / VALIDATION_LEVELS).write_text(json.dumps(validation_levels(baselines), indent=1) + "\n")
    bounds = selection_bounds(base_rows, baselines, throughput_margin, p99_margin)
    (out / SELECTION_BOUNDS).write_text(json.dumps({name: bound._asdict() for name, bound in bounds.items()},
                                                   indent=1) + "\n")

    def regret_s(row: dict[str, Any]) -> float:
        return float(row["regret_requests"]) / float(row["fluid_throughput_rps"])

    class Callback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.last_evaluated = -1
            # Keyed by the regret, then the p99 difference to the base.
            self.kept = KeptModel(out, resume, tolerance=regret_tolerance * sum(regret_s(b) for b in base_rows))

        def _on_step(self) -> bool:
            if self.last_evaluated < 0 or self.num_timesteps - self.last_evaluated >= every:
                self.evaluate()
            return True

        def evaluate(self) -> dict[str, float]:
            self.last_evaluated = self.num_timesteps
            rows = residual_validation_runs(self.model, env_kwargs, seeds)
            pairs = [(row, reference[row["scenario"], row["load"], row["seed"]]) for row in rows]
            agent, base = sum(regret_s(a) for a, _ in pairs), sum(regret_s(b) for _, b in pairs)
            metrics = {"regret_s": agent / len(pairs), "base_regret_s": base / len(pairs),
                       "regret_ratio_to_base": agent / base if base > 0 else float("nan"),
                       "throughput_ratio_to_base": float(np.mean([a["throughput_rps"] / b["throughput_rps"]
                                                                  for a, b in pairs])),
                       "p99_difference_s": float(np.mean([(a["p99_latency_s"] or 0.0) - (b["p99_latency_s"] or 0.0)
                                                          for a, b in pairs]))}
            worst = worst_departures(rows, bounds)
            metrics["worst_throughput_change"], metrics["worst_p99_change"] = worst.throughput_change, worst.p99_change
            metrics["admissible"] = float(within_bounds(rows, bounds))
            for name in dict.fromkeys(row["scenario"] for row in rows):
                mine = [(a, b) for a, b in pairs if a["scenario"] == name]
                base_regret = sum(regret_s(b) for _, b in mine)
                self.logger.record(f"eval/ratio/{name}", sum(regret_s(a) for a, _ in mine) / base_regret
                                   if base_regret > 0 else float("nan"))
                self.logger.record(f"eval/regret_s/{name}", sum(regret_s(a) for a, _ in mine) / len(mine))
            for key, value in metrics.items():
                self.logger.record(f"eval/{key}", value)
            self.logger.dump(self.num_timesteps)
            # Where every policy serves the load the regrets tie (to the bit where they make the same completions,
            # within the tolerance where two seeds cannot tell them apart): the tail decides.
            if metrics["admissible"]:
                self.kept.offer(self.model, agent, metrics["p99_difference_s"])
            if on_eval is not None:  # with where the worst departures were (text, not logged to TensorBoard)
                on_eval({"timesteps": self.num_timesteps, **metrics, "worst_throughput_point":
                         worst.throughput_point, "worst_p99_point": worst.p99_point})
            return metrics

    return Callback()


def serving_metrics_callback(env_id: str, env_kwargs: dict[str, Any], seeds: tuple[int, ...], every: int,
                             reference: str, out: Path,
                             on_eval: Callable[[dict[str, float]], None] | None = None, *,
                             regret_tolerance: float = 0.0, resume: bool = False) -> Any:
    """The SB3 callback that logs serving metrics (see the module docstring); it evaluates at the start,
    every ``every`` steps and when asked (``callback.evaluate()``), and saves the best model to ``out``
    (:class:`KeptModel`, regrets within ``regret_tolerance`` times the reference's regret of the least counting as
    level, the earliest kept among them; with ``resume``, against the models kept before)."""
    from stable_baselines3.common.callbacks import BaseCallback

    from baselines import make_policy
    from baselines.compare import SEES_OUTPUT_LENGTHS

    template = make_env(env_id, env_kwargs)
    rate = template.nominal_rate
    scenario = template.scenario.at_rate(rate)
    horizon = template.horizon
    arrivals = {seed: scenario.sample(horizon, seed) for seed in seeds}
    fluids = {seed: scenario.fluid(arrivals[seed], horizon) for seed in seeds}
    ref_setting = replace(scenario, output_lengths_known=reference in SEES_OUTPUT_LENGTHS)
    reference_regret = np.array([
        summarize(run(ref_setting.engine(), make_policy(reference, ref_setting, horizon), arrivals[s], horizon),
                  fluids[s])["regret_requests"] for s in seeds])

    class Callback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self._episodes: list[dict[str, float]] = []
            self._latest: dict[int, dict[str, float]] = {}  # each env's last step info (its episode so far)
            self.last_evaluated = -1
            self.kept = KeptModel(out, resume, tolerance=regret_tolerance * float(np.mean(reference_regret)))

        def _on_step(self) -> bool:
            for index, info in enumerate(self.locals.get("infos", ())):
                if "throughput_rps" in info:  # an episode's last step carries the run's metrics
                    self._episodes.append(info)
                self._latest[index] = info
            if self.last_evaluated < 0 or self.num_timesteps - self.last_evaluated >= every:
                self.evaluate()
            return True

        def _on_rollout_end(self) -> None:
            if self._episodes:
                for key in ("regret_requests", "throughput_rps", "p99_latency_s", "evictions"):
                    values = [e[key] for e in self._episodes if e.get(key) is not None]
                    if values:
                        self.logger.record(f"serving/{key}", float(np.mean(values)))
                self._episodes = []
            elif self._latest:
                # No training episode ended in this rollout (an episode can be longer than a short run): log the
                # episodes in progress, whose infos carry the regret and time so far, so a run always has curves.
                for key in ("regret_requests", "time_s", "completed"):
                    values = [info[key] for info in self._latest.values() if info.get(key) is not None]
                    if values:
                        self.logger.record(f"serving_in_progress/{key}", float(np.mean(values)))

        def evaluate(self) -> dict[str, float]:
            self.last_evaluated = self.num_timesteps
            rows = validation_runs(self.model, env_id, env_kwargs, seeds, rate)
            metrics = {key: float(np.mean([r[key] for r in rows if r[key] is not None] or [np.nan]))
                       for key in ("regret_requests", "throughput_rps", "p99_latency_s", "evictions")}
            metrics[f"regret_ratio_to_{reference}"] = float(np.mean([r["regret_requests"] for r in rows])
                                                            / np.mean(reference_regret))
            metrics[f"{reference}_regret_requests"] = float(np.mean(reference_regret))
            for key, value in metrics.items():
                self.logger.record(f"eval/{key}", value)
            self.logger.dump(self.num_timesteps)
            self.kept.offer(self.model, metrics["regret_requests"])
            if on_eval is not None:
                on_eval({"timesteps": self.num_timesteps, **metrics})
            return metrics

    return Callback()


def _resume_from(model: Any, checkpoint: Path) -> None:
    """Load a checkpoint's network and optimizer state into ``model`` (weights only, never SB3's pickled
    ``data``) and its step count from its name."""
    try:
        model.policy.load_state_dict(read_weights(checkpoint))
        model.policy.optimizer.load_state_dict(read_weights(checkpoint, "policy.optimizer.pth"))
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"--resume: {checkpoint} does not match this run's network and optimizer "
                          f"({str(error).splitlines()[0]})") from None
    model.num_timesteps = int(re.search(r"model_(\d+)_steps", checkpoint.name).group(1))  # type: ignore[union-attr]


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the most timesteps in ``out/checkpoints`` (SB3 names them ``model_<N>_steps.zip``)."""
    found = []
    for path in (out / CHECKPOINTS).glob("model_*_steps.zip"):
        match = re.fullmatch(r"model_(\d+)_steps\.zip", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def train(config: TrainConfig, out: Path, *, seed: int = 0, resume: bool = False, progress_bar: bool = True,
          command: str = "", log: Callable[[str], None] = print,
          on_eval: Callable[[dict[str, float]], None] | None = None) -> AgentSpec:
    """Train ``config`` into ``out`` (``model.zip``, ``agent.json``, ``config.toml``, ``tb/``, ``checkpoints/``,
    ``curves.png``).

    With ``resume``, training continues from the latest checkpoint in ``out`` up to ``config.timesteps``
    in all. ``on_eval`` is given each validation's metrics (``timesteps`` and what the validation callback logs
    under ``eval/``; :func:`validation_metric` names the one the best model is chosen by). Returns what
    ``agent.json`` records.
    """
    import torch
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback

    from agents.imitation import clone, clone_residual, collect_demonstrations, collect_residual_demonstrations
    from agents.residual import residual_teacher
    from agents.vec_env import make_native_vec_env

    residual = config.env_id in RESIDUAL_ENV_IDS
    if config.env_id not in ENV_IDS and not residual:
        raise ConfigError(f"unknown environment id {config.env_id!r}; registered: "
                          f"{', '.join([*ENV_IDS, *RESIDUAL_ENV_IDS])}")
    # One thread for the small MLP: its batches are too small to gain from more, and the environments' compiled
    # step takes every core between updates (more threads than cores oversubscribe the machine and slow both).
    torch.set_num_threads(1)
    if resume and not (out / "config.toml").is_file():
        raise ConfigError(f"--resume: {out} holds no training run (no config.toml)")
    if resume:
        stored = tomllib.loads((out / "config.toml").read_text())
        for key in ("algo", "env_id"):
            if stored.get(key) != getattr(config, key):
                raise ConfigError(f"--resume: the run in {out} was trained with {key} {stored.get(key)!r}, not "
                                  f"{getattr(config, key)!r}; resume it with the same {key}")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "config.toml").write_text(to_toml(config.to_dict()))
        for stale in (out / BEST_MODEL, out / BEST_RECORD):  # an earlier run's in the same folder: not this one's
            stale.unlink(missing_ok=True)
        shutil.rmtree(out / VALIDATED, ignore_errors=True)
    env_kwargs = dict(config.env)
    probe = make_env(config.env_id, env_kwargs)  # bad arguments fail here, with the single environment's message
    # And a residual teacher the environment cannot run, before any training; the probe runs its demonstrations.
    teacher = residual_teacher(config.imitation.teacher, probe) if residual and config.imitation is not None \
        else None
    if residual:
        # Each step runs a baseline's compiled loop for a decision interval (hundreds of iterations): SB3's own
        # DummyVecEnv costs nothing beside it. Seeded seed + i.
        from stable_baselines3.common.env_util import make_vec_env

        vec_env = make_vec_env(lambda: make_env(config.env_id, env_kwargs), n_envs=config.n_envs, seed=seed)
    else:
        # All n_envs episodes step in one compiled call (the native vector environment), seeded seed + i.
        vec_env = make_native_vec_env(config.env_id, config.n_envs, env_kwargs)
        vec_env.seed(seed)
    algorithm = algorithm_class(config.algo)
    try:
        checkpoint = latest_checkpoint(out) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS}")
        try:
            model = algorithm("MlpPolicy", vec_env, seed=seed, device="cpu", tensorboard_log=str(out / "tb"),
                              verbose=0, **config.hyperparameters)
        except TypeError as error:
            raise ConfigError(f"[hyperparameters]: {error}") from None
        if checkpoint is not None:
            log(f"resuming from {checkpoint}")
            _resume_from(model, checkpoint)
        else:
            if config.imitation is not None and teacher is not None:
                imitation = config.imitation
                log(f"imitating the residual teacher {imitation.teacher} for {imitation.episodes} episode(s)")
                residual_demos = collect_residual_demonstrations(probe, teacher, imitation.episodes,
                                                                 seed=10_000 + seed, gamma=float(model.gamma))
                stats = clone_residual(model, residual_demos, epochs=imitation.epochs,
                                       batch_size=imitation.batch_size, learning_rate=imitation.learning_rate,
                                       seed=seed)
                log(f"warm start: {len(residual_demos.actions):,} decisions, mean action error "
                    f"{stats['mean_abs_error']:.3f}, teacher return {residual_demos.episode_returns.mean():.2f}")
            elif config.imitation is not None:
                imitation = config.imitation
                log(f"imitating {imitation.teacher} for {imitation.episodes} episode(s)")
                teacher_env = make_env(config.env_id, env_kwargs)
                demos = collect_demonstrations(teacher_env, imitation.teacher, imitation.episodes,
                                               seed=10_000 + seed, gamma=float(model.gamma))
                stats = clone(model, demos, epochs=imitation.epochs, batch_size=imitation.batch_size,
                              learning_rate=imitation.learning_rate, seed=seed)
                log(f"warm start: {len(demos.actions):,} decisions, accuracy {stats['accuracy']:.3f}, "
                    f"teacher return {demos.episode_returns.mean():.1f}")
        evaluation = config.evaluation
        validation = None
        if evaluation.seeds and residual:
            # The id's own arguments too (LLMSched-Residual-v1's compute_load, v2's load_trend): validation builds
            # the environment directly, not through gym.make.
            validation = residual_metrics_callback(
                residual_env_kwargs(config.env_id, env_kwargs), evaluation.seeds, evaluation.every, out,
                on_eval=_logged(log, on_eval, lambda m: (
                    "eval @ {timesteps:,}: regret {regret_s:.2f} s of service, ratio to the baseline "
                    "{regret_ratio_to_base:.3f}, throughput ratio {throughput_ratio_to_base:.4f}, "
                    "p99 {p99_difference_s:+.2f} s; worst against the best baseline: throughput "
                    "{worst_throughput_change:+.2%} ({worst_throughput_point}), p99 {worst_p99_change:+.2%} "
                    "({worst_p99_point}){within}".format(
                        within="" if m["admissible"] else " (outside the bounds: not kept)", **m))),
                throughput_margin=evaluation.throughput_margin, p99_margin=evaluation.p99_margin,
                regret_tolerance=evaluation.regret_tolerance, resume=resume)
        elif evaluation.seeds:
            validation = serving_metrics_callback(
                config.env_id, env_kwargs, evaluation.seeds, evaluation.every, evaluation.reference, out,
                on_eval=_logged(log, on_eval, lambda m: (
                    "eval @ {timesteps:,}: regret {regret_requests:.1f}, ratio to reference {ratio:.3f}".format(
                        ratio=m[f"regret_ratio_to_{evaluation.reference}"], **m))),
                regret_tolerance=evaluation.regret_tolerance, resume=resume)
        callbacks = [CheckpointCallback(save_freq=max(1, evaluation.checkpoint_every // config.n_envs),
                                        save_path=str(out / CHECKPOINTS), name_prefix="model")]
        if validation is not None:
            callbacks.append(validation)
        remaining = max(0, config.timesteps - model.num_timesteps)
        rollout = int(model.n_steps) * config.n_envs
        if remaining % rollout:  # PPO learns in whole rollouts: say so rather than overshoot the bar's total
            log(f"{remaining:,} steps rounded up to {-(-remaining // rollout) * rollout:,}: PPO collects whole "
                f"rollouts of n_steps × n_envs = {rollout:,}")
            remaining = -(-remaining // rollout) * rollout
        model.learn(total_timesteps=remaining, callback=CallbackList(callbacks), progress_bar=progress_bar,
                    reset_num_timesteps=not resume, tb_log_name="run")
        (out / CHECKPOINTS).mkdir(exist_ok=True)
        model.save(out / CHECKPOINTS / f"model_{model.num_timesteps}_steps.zip")  # --resume starts from the end
        if validation is not None and validation.last_evaluated != model.num_timesteps:
            validation.evaluate()  # the final model is always validated
        # Without validation this run keeps its final model, even where an earlier run's best model lies in ``out``.
        if validation is not None and (out / BEST_MODEL).is_file():
            shutil.copyfile(out / BEST_MODEL, out / MODEL_FILE)  # the best model on the validation seeds
            kept_at = validation.kept.timesteps
        else:
            model.save(out / MODEL_FILE)
            kept_at = int(model.num_timesteps)
    finally:
        vec_env.close()
    spec = AgentSpec(algo=config.algo, env_id=config.env_id, env_kwargs=env_kwargs,
                     timesteps=int(model.num_timesteps), seed=seed, command=command, config_name=config.name,
                     model_timesteps=kept_at)
    (out / AGENT_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    from agents.curves import plot_curves, plot_residual_curves

    if residual:
        plot_residual_curves(out / "tb", out / VALIDATION_LEVELS, out / "curves.png",
                             margins=(config.evaluation.throughput_margin, config.evaluation.p99_margin),
                             kept_at=kept_at, regret_tolerance=config.evaluation.regret_tolerance)
    else:
        plot_curves(out / "tb", out / "curves.png")
    return spec


def _logged(log: Callable[[str], None], on_eval: Callable[[dict[str, float]], None] | None,
            text: Callable[[dict[str, float]], str]) -> Callable[[dict[str, float]], None]:
    """A validation callback's ``on_eval``: the metrics logged as ``text`` gives them, then handed on."""
    def evaluated(metrics: dict[str, float]) -> None:
        log(text(metrics))
        if on_eval is not None:
            on_eval(metrics)
    return evaluated


def validation_metric(config: TrainConfig) -> str:
    """The validation metric a training keeps its best model by (lower is better): the agent's regret over the
    baseline's it adjusts on the same episodes (residual agents), or over the reference baseline's."""
    return "regret_ratio_to_base" if config.env_id in RESIDUAL_ENV_IDS else \
        f"regret_ratio_to_{config.evaluation.reference}"

