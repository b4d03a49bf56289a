"""A trained agent is a policy: it runs through :func:`llmsched_env.run` on any engine, like a baseline.

An agent directory (what ``llmsched train`` writes, and ``agents/pretrained/<name>/``) holds
``model.zip`` (the stable-baselines3 model), ``agent.json`` (the algorithm, the environment id and
keyword arguments it was trained on, the command that produced it) and ``config.toml``.
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
    timesteps: int
    seed: int
    command: str
    config_name: str

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, **self.__dict__}


def load_model(algo: str, path: Path) -> Any:
    """The stable-baselines3 model saved at ``path``."""
    from stable_baselines3 import PPO
    from sb3_contrib import MaskablePPO

    cls = MaskablePPO if algo == "maskable-ppo" else PPO
    return cls.load(path, device="cpu")


def read_agent(directory: str | Path) -> tuple[AgentSpec, Any]:
    """``(spec, model)`` of the agent saved in ``directory``; a clear error if it is not one."""
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
    return spec, load_model(spec.algo, model_path)


class AgentPolicy:
    """A trained agent behind the :class:`~llmsched_env.policy.Policy` interface.

    At each iteration it does what the environment does: if the agent has a choice (someone waits and
    fits), it observes, asks the model for per-class admission counts (masked for MaskablePPO), and
    turns them into a decision; otherwise every running request decodes and nothing is admitted. So
    ``run(engine, agent_policy, ...)`` reproduces the environment's episode on the same arrivals.

    Args:
        model: a stable-baselines3 ``PPO`` or sb3-contrib ``MaskablePPO`` trained on ``LLMSched-*``.
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
        from sb3_contrib import MaskablePPO

        self._masked = isinstance(model, MaskablePPO)
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
        import torch

        policy = self.model.policy
        with torch.no_grad():
            features = policy.extract_features(torch.as_tensor(observation[None]), policy.pi_features_extractor)
            logits = policy.action_net(policy.mlp_extractor.forward_actor(features))[0].numpy().astype(np.float64)
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        action = np.empty(len(self._splits) + 1, dtype=np.int64)
        for k, part in enumerate(np.split(logits, self._splits)):
            if self.deterministic:
                action[k] = int(np.argmax(part))
            else:
                p = np.exp(part - part.max())
                action[k] = int(self._rng.choice(len(p), p=p / p.sum()))
        return action
