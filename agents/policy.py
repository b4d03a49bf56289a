"""A trained agent is a policy: it runs through :func:`llmsched_env.run` on any engine, like a baseline.

An agent directory (what ``llmsched train`` writes, and ``agents/pretrained/<name>/``) holds
``model.zip`` (the stable-baselines3 model), ``agent.json`` (the algorithm, the environment id and
keyword arguments it was trained on, the command that produced it) and ``config.toml``.

An agent directory is data, never code. stable-baselines3's ``load`` unpickles the ``data`` entry of
``model.zip``, which would run whatever code someone put there; :func:`read_agent` never does. It builds the
network from the project's own description (``agent.json``'s environment gives the spaces, ``config.toml``'s
``policy_kwargs`` the layers) and loads only ``policy.pth``'s tensors, with ``torch.load(weights_only=True)``;
a directory whose weights do not match that network is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmsched_env.admission import AdmissionControl
from llmsched_env.engine import Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.scenario import Scenario

AGENT_FILE = "agent.json"
MODEL_FILE = "model.zip"


@dataclass(frozen=True)
class AgentSpec:
    """What ``agent.json`` records about a trained agent."""

    algo: str
    env_id: str
    env_kwargs: dict[str, Any]
    timesteps: int  # the run's frames
    seed: int
    command: str
    config_name: str
    #: The frame of the validation that kept ``model.zip`` (the best on the validation seeds, not necessarily the
    #: last); ``None`` where no validation kept it (the final model, or an ``agent.json`` written before this field).
    model_timesteps: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, **self.__dict__}


def algorithm_class(algo: str) -> type:
    """The SB3 algorithm of ``algo`` (``ppo`` or ``maskable-ppo``)."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    return MaskablePPO if algo == "maskable-ppo" else PPO


def read_weights(path: Path, entry: str = "policy.pth") -> dict[str, Any]:
    """The tensors of ``entry`` in an SB3 archive, read with ``weights_only=True`` (no other object is built)."""
    import io
    import pickle
    import zipfile

    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(entry)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ConfigError(f"{path}: not a readable model archive with {entry} ({error})") from None
    try:
        weights = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path}: {entry} is not a plain file of tensors, refused (only weights are loaded): "
                          f"{first}") from None
    if not isinstance(weights, dict):
        raise ConfigError(f"{path}: {entry} holds a {type(weights).__name__}, not a dict of tensors")
    return weights


@dataclass(frozen=True)
class TrainedNetwork:
    """A trained agent's policy network with its spaces: what :class:`AgentPolicy` needs of an SB3 model."""

    policy: Any
    observation_space: Any
    action_space: Any


def load_network(spec: "AgentSpec", policy_kwargs: dict[str, Any], path: Path) -> TrainedNetwork:
    """The network ``spec`` and ``policy_kwargs`` describe, with the weights of ``path`` (weights only)."""
    from llmsched_env.registration import ENV_IDS, RESIDUAL_ENV_IDS

    if spec.env_id not in ENV_IDS and spec.env_id not in RESIDUAL_ENV_IDS:
        raise ConfigError(f"{path.parent / AGENT_FILE}: unknown environment id {spec.env_id!r}; registered: "
                          f"{', '.join([*ENV_IDS, *RESIDUAL_ENV_IDS])}")
    import gymnasium as gym
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from stable_baselines3.common.policies import ActorCriticPolicy

    import llmsched_env  # noqa: F401  (registers the ids)

    env = gym.make(spec.env_id, **spec.env_kwargs).unwrapped
    cls = MaskableActorCriticPolicy if spec.algo == "maskable-ppo" else ActorCriticPolicy
    try:
        policy = cls(env.observation_space, env.action_space, lambda _: 0.0, **policy_kwargs)
    except TypeError as error:
        raise ConfigError(f"{path.parent / 'config.toml'}: [hyperparameters] policy_kwargs: {error}") from None
    try:
        policy.load_state_dict(read_weights(path))
    except RuntimeError as error:
        raise ConfigError(f"{path}: its weights do not match the network that agent.json and config.toml describe "
                          f"({str(error).splitlines()[0]})") from None
    policy.set_training_mode(False)
    return TrainedNetwork(policy, env.observation_space, env.action_space)


def read_agent(directory: str | Path) -> tuple[AgentSpec, Any]:
    """``(spec, model)`` of the agent saved in ``directory``; a clear error if it is not one."""
    spec, config_path = read_spec(directory)
    from agents.config import load_config

    policy_kwargs = load_config(str(config_path)).hyperparameters.get("policy_kwargs", {})
    return spec, load_network(spec, dict(policy_kwargs), Path(directory) / MODEL_FILE)


def read_spec(directory: str | Path) -> tuple[AgentSpec, Path]:
    """What ``agent.json`` in ``directory`` records, and the path of its ``config.toml``; a clear error if it is
    not an agent directory."""
    directory = Path(directory)
    spec_path, model_path = directory / AGENT_FILE, directory / MODEL_FILE
    if not spec_path.is_file() or not model_path.is_file():
        raise ConfigError(f"{directory} is not an agent directory: it needs {AGENT_FILE} and {MODEL_FILE} "
                          f"(what `llmsched train --out DIR` writes)")
    try:
        data = json.loads(spec_path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{spec_path}:{error.lineno}: invalid JSON: {error.msg}") from None
    data.pop("format", None)
    try:
        spec = AgentSpec(**data)
    except TypeError as error:
        raise ConfigError(f"{spec_path}: {error}") from None
    if spec.algo not in ("ppo", "maskable-ppo"):
        raise ConfigError(f"{spec_path}: field 'algo' must be ppo or maskable-ppo, got {spec.algo!r}")
    config_path = directory / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"{directory} has no config.toml: its network cannot be built without it")
    return spec, config_path


class AgentPolicy:
    """A trained agent behind the :class:`~llmsched_env.policy.Policy` interface.

    At each iteration it does what the environment does: if the agent has a choice (someone waits and
    fits), it observes, asks the model for per-class admission counts (masked for MaskablePPO), and
    turns them into a decision; otherwise every running request decodes and nothing is admitted. So
    ``run(engine, agent_policy, ...)`` reproduces the environment's episode on the same arrivals.

    Args:
        model: a stable-baselines3 ``PPO`` or sb3-contrib ``MaskablePPO`` trained on ``LLMSched-*``, or the
            :class:`TrainedNetwork` that :func:`read_agent` loads.
        scenario: where the agent runs (its classes and fluid targets come from it).
        horizon: the run's horizon (the observation's progress ``t/T``).
        interface: the settings of the training environment's observation and action
            (``env.control.settings``: ``max_admit``, ``stage_buckets``, …).
        deterministic: the mode of the action distribution (else a sample, from a generator seeded by ``seed``
            at every reset).
    """

    def __init__(self, model: Any, scenario: Scenario, horizon: float, interface: dict[str, Any] | None = None, *,
                 deterministic: bool = True, seed: int = 0, name: str = "agent") -> None:
        self.name = name
        self.model = model
        self.scenario = scenario
        self.horizon = horizon
        self.deterministic = deterministic
        self.seed = seed
        self.control = AdmissionControl(scenario, **(interface or {}))
        expected = (self.control.observation_size,)
        if tuple(model.observation_space.shape) != expected or \
                not np.array_equal(model.action_space.nvec, self.control.action_nvec):
            raise ConfigError(
                f"this agent observes {tuple(model.observation_space.shape)} and acts on "
                f"{model.action_space.nvec.tolist()}, but the scenario gives {self.control.num_classes} class(es): "
                f"observation {expected}, action {self.control.action_nvec.tolist()}; evaluate it on a workload "
                f"with as many request classes as it was trained on")
        from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

        self._masked = isinstance(model.policy, MaskableActorCriticPolicy)
        self._splits = np.cumsum(self.control.action_nvec)[:-1]
        self._rng = np.random.default_rng(seed)

    def reset(self, engine: Engine) -> None:
        if self.control.known_lengths and not engine.output_lengths_known:
            raise ConfigError(f"{self.name} was trained with output lengths known; this engine hides them")
        self.control.reset(self.control.targets_for(self.scenario, self.horizon))
        self._rng = np.random.default_rng(self.seed)

    def decide(self, state: SchedulerState) -> Decision:
        control = self.control
        candidates = control.candidates(state)
        if not control.is_epoch(candidates):
            return control.fixed_decision(state)
        observation = control.observe(state, candidates)
        mask = control.action_mask(candidates) if self._masked else None
        return control.decision(state, self.act(observation, mask), candidates)[0]

    def act(self, observation: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The action for one observation: per class, the most likely count (or a sample), masked counts excluded.

        The same as the model's ``predict`` but on the network directly: ``predict`` builds tensors and
        distribution objects per call, which costs more than the whole engine iteration.
        """
        logits = action_logits(self.model, observation[None])[0]
        if self.deterministic:
            return greedy_actions(logits[None], None if mask is None else mask[None], self._splits)[0]
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        action = np.empty(len(self._splits) + 1, dtype=np.int64)
        for k, part in enumerate(np.split(logits, self._splits)):
            p = np.exp(part - part.max())
            action[k] = int(self._rng.choice(len(p), p=p / p.sum()))
        return action


def action_logits(model: Any, observations: np.ndarray) -> np.ndarray:
    """The policy network's action logits for a batch of observations, ``(N, sum(nvec))`` float64."""
    import torch

    policy = model.policy
    with torch.no_grad():
        features = policy.extract_features(torch.as_tensor(observations), policy.pi_features_extractor)
        return policy.action_net(policy.mlp_extractor.forward_actor(features)).numpy().astype(np.float64)


def greedy_actions(logits: np.ndarray, masks: np.ndarray | None, splits: np.ndarray) -> np.ndarray:
    """Per row and class, the most likely count (the first on ties), masked counts excluded: ``(N, K)``."""
    if masks is not None:
        logits = np.where(masks, logits, -np.inf)
    return np.stack([part.argmax(axis=1) for part in np.split(logits, splits, axis=1)], axis=1).astype(np.int64)
