"""Warm start by imitation: clone a baseline's admissions (and fit the value head to its returns) before PPO.

A policy network that starts uniform over admission counts admits at random and learns, first, to
throttle (DESIGN.md §6). Starting from WAIT's (or Nested WAIT's) behaviour puts PPO where the
baselines are and lets it look for improvements there. The teacher runs through the environment
itself (:meth:`LLMSchedEnv.action_for` turns its decision into the action that does the same), so
what is cloned is exactly what the agent can do.
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
        discounted = np.empty(len(rewards))
        running = 0.0
        for i in range(len(rewards) - 1, -1, -1):
            running = rewards[i] + gamma * running
            discounted[i] = running
        returns.append(discounted)
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
    generator = torch.Generator().manual_seed(seed)
    obs = torch.as_tensor(demonstrations.observations, device=device)
    act = torch.as_tensor(demonstrations.actions, device=device)
    masks = demonstrations.masks
    ret = torch.as_tensor(demonstrations.returns, dtype=torch.float32, device=device)
    masked = isinstance(model, MaskablePPO)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    count = len(obs)
    stats: dict[str, float] = {}
    policy.set_training_mode(True)
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        totals = np.zeros(2)
        for start in range(0, count, batch_size):
            batch = order[start:start + batch_size]
            if masked:
                values, log_prob, _ = policy.evaluate_actions(obs[batch], act[batch], action_masks=masks[batch.numpy()])
            else:
                values, log_prob, _ = policy.evaluate_actions(obs[batch], act[batch])
            policy_loss = -log_prob.mean()
            value_loss = torch.nn.functional.mse_loss(values.flatten(), ret[batch])
            loss = policy_loss + value_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            totals += [policy_loss.item() * len(batch), value_loss.item() * len(batch)]
        stats = {"policy_loss": totals[0] / count, "value_loss": totals[1] / count}
    policy.set_training_mode(False)
    with torch.no_grad():
        predicted = np.concatenate([
            model.predict(demonstrations.observations[i:i + 4096], deterministic=True,
                          **({"action_masks": masks[i:i + 4096]} if masked else {}))[0]
            for i in range(0, count, 4096)])
    stats["accuracy"] = float(np.mean(np.all(predicted == demonstrations.actions, axis=1)))
    return stats
