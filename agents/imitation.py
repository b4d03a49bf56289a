"""Warm start by imitation: clone a baseline's admissions (and fit the value head to its returns) before PPO.

A policy network that starts uniform over admission counts admits at random and learns, first, to
throttle (DESIGN.md §6). Starting from WAIT's (or Nested WAIT's) behaviour puts PPO where the
baselines are and lets it look for improvements there. The teacher runs through the environment
itself (:meth:`LLMSchedEnv.action_for` turns its decision into the action that does the same), so
what is cloned is exactly what the agent can do.

A residual agent (``LLMSched-Residual-v*``) starts at its baseline already (the zero action); its warm start copies
a residual teacher instead (:data:`agents.residual.RESIDUAL_TEACHERS`: a hand rule on the observation), its mean
action fitted by squared error (:func:`clone_residual`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmsched_env.env import LLMSchedEnv


@dataclass(frozen=True)
class Demonstrations:
    """A teacher's episodes in the environment: what it saw, did and earned."""

    observations: np.ndarray
    actions: np.ndarray
    masks: np.ndarray
    returns: np.ndarray  # discounted return from each step to the end of its episode
    episode_returns: np.ndarray


def collect_demonstrations(env: LLMSchedEnv, teacher_name: str, episodes: int, seed: int,
                           gamma: float) -> Demonstrations:
    """Run the baseline ``teacher_name`` for ``episodes`` episodes of ``env`` (seeds ``seed, seed + 1, …``)."""
    from baselines import make_policy

    observations, actions, masks, returns, totals = [], [], [], [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        teacher = make_policy(teacher_name, env.scenario.at_rate(env.rate), env.horizon)
        teacher.reset(env.engine)
        rewards: list[float] = []
        done = False
        while not done:
            action = env.action_for(teacher.decide(env.scheduler_state()))
            observations.append(observation)
            actions.append(action)
            masks.append(env.action_masks())
            observation, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
            done = terminated or truncated
        returns.append(_discounted(rewards, gamma))
        totals.append(float(np.sum(rewards)))
    return Demonstrations(np.asarray(observations, np.float32), np.asarray(actions, np.int64),
                          np.asarray(masks, bool), np.concatenate(returns), np.asarray(totals))


def clone(model: Any, demonstrations: Demonstrations, *, epochs: int, batch_size: int, learning_rate: float,
          seed: int, value_coef: float = 0.5) -> dict[str, float]:
    """Fit ``model``'s policy to the demonstrations (cross-entropy on the actions, masked for MaskablePPO)
    and its value head to their discounted returns. Returns the last epoch's losses and the accuracy."""
    import torch
    from sb3_contrib import MaskablePPO

    policy = model.policy
    device = policy.device
    obs = torch.as_tensor(demonstrations.observations, device=device)
    act = torch.as_tensor(demonstrations.actions, device=device)
    masks = demonstrations.masks
    ret = torch.as_tensor(demonstrations.returns, dtype=torch.float32, device=device)
    masked = isinstance(model, MaskablePPO)

    def losses(batch: Any) -> tuple[Any, Any]:
        if masked:
            values, log_prob, _ = policy.evaluate_actions(obs[batch], act[batch], action_masks=masks[batch.numpy()])
        else:
            values, log_prob, _ = policy.evaluate_actions(obs[batch], act[batch])
        return -log_prob.mean(), torch.nn.functional.mse_loss(values.flatten(), ret[batch])

    count = len(obs)
    stats = _fit(policy, list(policy.parameters()), count, losses, epochs=epochs, batch_size=batch_size,
                 learning_rate=learning_rate, seed=seed, value_coef=value_coef)
    with torch.no_grad():
        predicted = np.concatenate([
            model.predict(demonstrations.observations[i:i + 4096], deterministic=True,
                          **({"action_masks": masks[i:i + 4096]} if masked else {}))[0]
            for i in range(0, count, 4096)])
    stats["accuracy"] = float(np.mean(np.all(predicted == demonstrations.actions, axis=1)))
    return stats


@dataclass(frozen=True)
class ResidualDemonstrations:
    """A residual teacher's episodes (``LLMSched-Residual-v*``): what it saw, the residual it asked for, and the
    returns of the path taken (the teacher's, with exploration)."""

    observations: np.ndarray
    actions: np.ndarray  # float32 (N, 1)
    returns: np.ndarray  # discounted return from each step to the end of its episode
    episode_returns: np.ndarray


def _discounted(rewards: list[float], gamma: float) -> np.ndarray:
    """The discounted return from each step of an episode to its end."""
    discounted, running = np.empty(len(rewards)), 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + gamma * running
        discounted[i] = running
    return discounted


def collect_residual_demonstrations(env: Any, teacher: Any, episodes: int, seed: int, gamma: float,
                                    explore: float = 0.5) -> ResidualDemonstrations:
    """Run ``teacher`` (a residual "network": a batch of observations to actions, such as
    :class:`agents.residual.OverloadRule`) for ``episodes`` episodes of the residual environment ``env`` (seeds
    ``seed, seed + 1, …``; each reset draws its workload and load as training does), labelling every step with the
    teacher's action. At a share ``explore`` of the steps a uniform action in ``[-1, 1]`` drives the episode
    instead: the observation carries the scale in force, which on the teacher's own path predicts its next action
    almost perfectly (it holds its action for a while), so a clone would learn to repeat its last action and never
    start; off that path the scale says nothing about the label."""
    if not 0.0 <= explore < 1.0:
        raise ValueError(f"explore must be in [0, 1), got {explore!r}")
    rng = np.random.default_rng(seed)
    observations, actions, returns, totals = [], [], [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        rewards: list[float] = []
        done = False
        while not done:
            action = np.asarray(teacher(observation[None]), dtype=np.float32).reshape(-1)
            observations.append(observation)
            actions.append(action)
            driven = rng.uniform(-1.0, 1.0, action.shape).astype(np.float32) if rng.random() < explore else action
            observation, reward, terminated, truncated, _ = env.step(driven)
            rewards.append(reward)
            done = terminated or truncated
        returns.append(_discounted(rewards, gamma))
        totals.append(float(np.sum(rewards)))
    return ResidualDemonstrations(np.asarray(observations, np.float32), np.asarray(actions, np.float32),
                                  np.concatenate(returns), np.asarray(totals))


def clone_residual(model: Any, demonstrations: ResidualDemonstrations, *, epochs: int, batch_size: int,
                   learning_rate: float, seed: int, value_coef: float = 0.5) -> dict[str, float]:
    """Fit a continuous-action PPO ``model``'s mean action to a residual teacher's actions (squared error) and its
    value head to their discounted returns. The log standard deviation is left as configured: a likelihood fit
    would shrink it to the fit's error and leave PPO nothing to explore with. Returns the last epoch's losses and
    the mean absolute error of the mean action over the demonstrations."""
    import torch

    policy = model.policy
    device = policy.device
    obs = torch.as_tensor(demonstrations.observations, device=device)
    act = torch.as_tensor(demonstrations.actions, device=device)
    ret = torch.as_tensor(demonstrations.returns, dtype=torch.float32, device=device)
    parameters = [p for name, p in policy.named_parameters() if name != "log_std"]

    def heads(batch: Any) -> tuple[Any, Any]:
        latent_pi, latent_vf = policy.mlp_extractor(policy.extract_features(batch))
        return policy.action_net(latent_pi), policy.value_net(latent_vf)

    def losses(batch: Any) -> tuple[Any, Any]:
        mean, values = heads(obs[batch])
        return (torch.nn.functional.mse_loss(mean, act[batch]),
                torch.nn.functional.mse_loss(values.flatten(), ret[batch]))

    count = len(obs)
    stats = _fit(policy, parameters, count, losses, epochs=epochs, batch_size=batch_size,
                 learning_rate=learning_rate, seed=seed, value_coef=value_coef)
    with torch.no_grad():
        mean = torch.cat([heads(obs[i:i + 4096])[0] for i in range(0, count, 4096)])
    stats["mean_abs_error"] = float(torch.mean(torch.abs(mean - act)).item())
    return stats


def _fit(policy: Any, parameters: list[Any], count: int, losses: Any, *, epochs: int, batch_size: int,
         learning_rate: float, seed: int, value_coef: float) -> dict[str, float]:
    """Adam on ``parameters`` over ``epochs`` shuffled passes (seeded by ``seed``) of ``count`` demonstrations in
    minibatches: ``losses(indices)`` gives the policy's and the value head's loss of a minibatch, minimised as
    ``policy + value_coef · value`` with the gradient's norm clipped at 1. Returns the last epoch's mean losses."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    stats: dict[str, float] = {}
    policy.set_training_mode(True)
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        totals = np.zeros(2)
        for start in range(0, count, batch_size):
            batch = order[start:start + batch_size]
            policy_loss, value_loss = losses(batch)
            loss = policy_loss + value_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            totals += [policy_loss.item() * len(batch), value_loss.item() * len(batch)]
        stats = {"policy_loss": totals[0] / count, "value_loss": totals[1] / count}
    policy.set_training_mode(False)
    return stats
