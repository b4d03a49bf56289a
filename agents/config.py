"""Training configurations: small versioned TOML files under ``agents/configs/`` (rl-zoo3 has no MaskablePPO).

A file names the algorithm, the environment and its keyword arguments, the SB3 hyperparameters, the
optional imitation warm start and the evaluation protocol. Unknown keys are errors, so a typo never
silently falls back to a default.

A file may start from another: ``extends = "ppo-residual-suite-v2"`` (a built-in name, or a TOML path relative to
the extending file) takes that configuration's tables and overrides what the file sets, table by table and key by
key (:func:`merged`): a variant states only how it differs. A name is its own file's, never inherited. A trained
agent's ``config.toml`` holds the resolved configuration, so it reads without its parents.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsched_env.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ALGORITHMS = ("ppo", "maskable-ppo")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImitationConfig:
    """Warm start: behaviour cloning of a baseline (and its returns, for the value head) before PPO."""

    teacher: str = "wait"
    episodes: int = 4
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class EvaluationConfig:
    """Validation during training: the agent and a reference baseline on fixed arrival seeds.

    A residual agent's best model is chosen among the validations that are no worse than each workload's best
    baseline on the validation episodes by ``throughput_margin`` and ``p99_margin`` (shares of its mean over the
    seeds: throughput at least ``1 - throughput_margin`` of it, p99 at most ``1 + p99_margin`` of it; the judging
    table's non-inferiority test, :mod:`agents.judge`, on the validation seeds), nor worse than the baseline the
    agent adjusts where that one already falls short (:func:`agents.validation.selection_bounds`). Infinite (the
    default): no such test, the lowest regret wins.

    ``regret_tolerance`` (a share of the reference's validation regret: the adjusted baseline's for a residual
    agent, ``reference``'s otherwise) is the difference in regret that validation cannot tell from a tie: among the
    models whose regrets lie within it of the least, a residual agent's kept model is the one of the lowest p99
    difference to its base, any other agent's the earliest (:class:`agents.train.KeptModel`). 0 (the default):
    the least regret wins.
    """

    seeds: tuple[int, ...] = (1000, 1001, 1002)
    every: int = 50_000
    reference: str = "wait"
    checkpoint_every: int = 50_000
    throughput_margin: float = float("inf")
    p99_margin: float = float("inf")
    regret_tolerance: float = 0.0

    def __post_init__(self) -> None:
        for key in ("throughput_margin", "p99_margin", "regret_tolerance"):
            value = getattr(self, key)
            # An infinite margin is no test; an infinite tolerance would make every regret level.
            finite = key == "regret_tolerance"
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or \
                    (finite and math.isinf(value)):  # NaN fails ``>= 0``
                bound = "a finite number" if key == "regret_tolerance" else "a number"
                raise ConfigError(f"[evaluation] {key} must be {bound} >= 0 (a share of the baseline's), "
                                  f"got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe (see ``agents/configs/*.toml``)."""

    name: str
    algo: str
    env_id: str
    timesteps: int
    n_envs: int
    env: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    imitation: ImitationConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "name": self.name, "algo": self.algo, "env_id": self.env_id,
                                "timesteps": self.timesteps, "n_envs": self.n_envs, "env": dict(self.env),
                                "hyperparameters": dict(self.hyperparameters),
                                "evaluation": {**self.evaluation.__dict__, "seeds": list(self.evaluation.seeds)}}
        if self.imitation is not None:
            data["imitation"] = dict(self.imitation.__dict__)
        return data


def builtin_configs() -> list[str]:
    """Names of the configurations shipped in ``agents/configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _section(data: dict[str, Any], cls: type, source: str, section: str) -> Any:
    allowed = set(cls.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{source}: [{section}] unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    if "seeds" in data:
        data = {**data, "seeds": tuple(int(s) for s in data["seeds"])}
    try:
        return cls(**data)
    except TypeError as error:  # pragma: no cover - keys were checked above
        raise ConfigError(f"{source}: [{section}] {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def config_from_dict(data: dict[str, Any], source: str, name: str) -> TrainConfig:
    """Validate a parsed configuration (the TOML file's tables) into a :class:`TrainConfig`."""
    top = {"version", "algo", "env_id", "timesteps", "n_envs", "env", "hyperparameters", "imitation", "evaluation",
           "name"}
    unknown = set(data) - top
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(top))}")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ConfigError(f"{source}: version {version!r} is not supported; this llmsched reads version "
                          f"{FORMAT_VERSION}")
    algo = data.get("algo", "maskable-ppo")
    if algo not in ALGORITHMS:
        raise ConfigError(f"{source}: algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    for key in ("timesteps", "n_envs"):
        value = data.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    imitation = data.get("imitation")
    return TrainConfig(
        name=str(data.get("name", name)), algo=algo, env_id=str(data.get("env_id", "LLMSched-v0")),
        timesteps=int(data.get("timesteps", 100_000)), n_envs=int(data.get("n_envs", 1)),
        env=dict(data.get("env", {})), hyperparameters=dict(data.get("hyperparameters", {})),
        imitation=None if not imitation or not imitation.get("teacher", "wait") else
        _section(dict(imitation), ImitationConfig, source, "imitation"),
        evaluation=_section(dict(data.get("evaluation", {})), EvaluationConfig, source, "evaluation"),
        version=version)


def to_toml(data: dict[str, Any]) -> str:
    """A resolved configuration (:meth:`TrainConfig.to_dict`) as TOML text, tables after scalars; it reads back
    with :func:`tomllib.loads` to the same tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, content in data.items():
        if isinstance(content, dict):
            lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in content.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # what we write must read back
    return text


def parent_of(name: str) -> str | None:
    """What the built-in configuration ``name`` ``extends`` (None: it is whole)."""
    parent = tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text()).get("extends")
    return None if parent is None else str(parent)


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: tables merge key by key (recursively); any other value, arrays included,
    replaces the base's."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def _config_path(text: str, relative_to: Path | None = None) -> Path | None:
    """A built-in configuration's file, or ``text`` as a path (relative to ``relative_to`` when given); None if
    neither is a file."""
    if text in builtin_configs():
        return CONFIG_DIR / f"{text}.toml"
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    return path if path.is_file() else None


def _resolved_tables(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The tables of the TOML file at ``path`` on top of those of the configuration it ``extends`` (if any),
    followed up its ``chain`` of parents; a cycle or a missing parent is an error naming the file."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends must name a built-in configuration or a TOML file, got {parent!r}")
    parent_path = _config_path(parent, relative_to=path.parent)
    if parent_path is None:
        raise ConfigError(f"{path}: extends {parent!r}, which is neither a built-in "
                          f"({', '.join(builtin_configs())}) nor a TOML file beside it")
    family = (*chain, path.resolve())
    if parent_path.resolve() in family:
        cycle = " -> ".join(str(p) for p in (*family, parent_path.resolve()))
        raise ConfigError(f"{path}: extends {parent!r}, a cycle: {cycle}")
    base = _resolved_tables(parent_path, family)
    base.pop("name", None)  # a name is its own file's
    return merged(base, data)


def load_config(name_or_path: str | Path) -> TrainConfig:
    """A built-in configuration by name (see :func:`builtin_configs`) or a TOML file by path, with the configurations
    it ``extends`` beneath it."""
    text = str(name_or_path)
    path = _config_path(text)
    if path is None:
        raise ConfigError(f"no training config {text!r}: neither a built-in ({', '.join(builtin_configs())}) "
                          f"nor a TOML file")
    return config_from_dict(_resolved_tables(path), str(path), path.stem)
