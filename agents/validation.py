"""Validation during training: the model's deterministic policy on fixed seeds, on the native vector environment.

The validation episodes are the evaluation's (``scenario.sample(T, seed)`` at the nominal rate, as
``llmsched evaluate`` runs them through ``run(engine, AgentPolicy)``), stepped together in one
:class:`~llmsched_env.vector.LLMSchedVectorEnv` with one forward pass of the network per step for all of
them: a validation costs a few seconds, not the minutes of a Python loop per seed, so training can
validate often.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple, Sequence

import gymnasium as gym
import numpy as np

from agents.policy import action_logits, greedy_actions
from llmsched_env.vector import final_info_of


def validation_runs(model: Any, env_id: str, env_kwargs: dict[str, Any], seeds: Sequence[int],
                    rate: float) -> list[dict[str, Any]]:
    """The final info (every metric of ``llmsched simulate --json``) of one episode per seed, arrivals
    pinned to ``seed`` at ``rate``, the model acting by its most likely action (masked for MaskablePPO)."""
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    import llmsched_env  # noqa: F401  (registers the ids)

    vector = gym.make_vec(env_id, num_envs=len(seeds), vectorization_mode="vector_entry_point", **env_kwargs)
    try:
        observations, _ = vector.reset(seed=0, options={"arrival_seed": list(seeds), "rate": rate})
        masked = isinstance(model.policy, MaskableActorCriticPolicy)
        splits = np.cumsum(vector.single_action_space.nvec)[:-1]
        finals: list[dict[str, Any] | None] = [None] * len(seeds)
        while any(final is None for final in finals):
            masks = vector.action_masks() if masked else None
            actions = greedy_actions(action_logits(model, observations), masks, splits)
            observations, _, _, truncated, info = vector.step(actions)
            for e in np.flatnonzero(truncated):
                if finals[e] is None:  # later episodes of that slot (autoreset) are not validation episodes
                    finals[e] = final_info_of(info, e)
        return finals  # type: ignore[return-value]
    finally:
        vector.close()


def validation_load(env: Any, workload: str) -> float:
    """The load a residual agent is validated at on ``workload``: the top of its range, where the scheduler's
    choices change the most (at light load every policy serves every request)."""
    return float(env.load_range(workload)[1])


def residual_validation_runs(model: Any, env_kwargs: dict[str, Any], seeds: Sequence[int],
                             zero_action: bool = False) -> list[dict[str, Any]]:
    """One episode of ``LLMSched-Residual-v0`` per workload of ``env_kwargs`` (at :func:`validation_load`) and
    seed, the model acting by its mean action (``zero_action``: the baseline itself); each row the final info with
    ``scenario``, ``load`` and ``seed``."""
    from agents.residual import gaussian_action
    from agents.residual_env import LLMSchedResidualEnv

    env = LLMSchedResidualEnv(**env_kwargs)
    rows = []
    for name in env.workloads:
        load = validation_load(env, name)
        for seed in seeds:
            observation, _ = env.reset(seed=0, options={"scenario": name, "load": load, "arrival_seed": seed})
            done, info = False, {}
            while not done:
                action = np.zeros(1) if zero_action else gaussian_action(model, observation[None])[0][0]
                observation, _, _, done, info = env.step(action)
            rows.append({**info, "seed": seed})
    return rows


class Departures(NamedTuple):
    """The worst workload's departure from the baseline on a validation (:func:`worst_departures`)."""

    throughput_change: float  # the lowest ratio of mean throughputs (agent's to the baseline's), less 1
    throughput_workload: str  # where
    p99_change: float  # the highest ratio of mean p99 latencies, less 1
    p99_workload: str  # where


def worst_departures(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> Departures:
    """Over the workloads of paired validation rows (the agent's, the baseline's on the same episode; each with
    ``scenario``), means over the seeds: the lowest ratio of the agent's throughput to the baseline's and the
    highest of their p99 latencies, each less 1, and where (a missing p99, no request finished, counts 0; a p99
    where the baseline has none is an infinite excess). What the best model's non-inferiority test reads
    (:class:`~agents.config.EvaluationConfig`)."""
    throughput, p99 = (np.inf, ""), (-np.inf, "")
    for name in dict.fromkeys(agent["scenario"] for agent, _ in pairs):
        mine = [(a, b) for a, b in pairs if a["scenario"] == name]
        rates = np.mean([a["throughput_rps"] for a, _ in mine]), np.mean([b["throughput_rps"] for _, b in mine])
        tails = np.mean([a["p99_latency_s"] or 0.0 for a, _ in mine]), np.mean([b["p99_latency_s"] or 0.0
                                                                               for _, b in mine])
        throughput = min(throughput, (float(rates[0] / rates[1] - 1) if rates[1] > 0 else 0.0, name),
                         key=lambda change: change[0])
        p99 = max(p99, (float(tails[0] / tails[1] - 1) if tails[1] > 0 else (np.inf if tails[0] > 0 else 0.0), name),
                  key=lambda change: change[0])
    return Departures(throughput[0], throughput[1], p99[0], p99[1])


def baseline_validation_regrets(env_kwargs: dict[str, Any], seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per workload of ``env_kwargs``: each baseline's mean regret over ``seeds`` (seconds of the fluid optimum's
    service) on the validation episodes' arrivals (:func:`residual_validation_runs`), for every baseline with the
    workload's information (:data:`agents.judge.KNOWN_BASELINES` / :data:`~agents.judge.HIDDEN_BASELINES`): the
    levels a residual agent's validation curves are drawn against."""
    from agents.judge import HIDDEN_BASELINES, KNOWN_BASELINES
    from agents.residual_env import LLMSchedResidualEnv
    from baselines import make_policy
    from baselines.compare import SEES_OUTPUT_LENGTHS
    from llmsched_env.metrics import summarize
    from llmsched_env.runner import run

    env = LLMSchedResidualEnv(**env_kwargs)
    levels: dict[str, dict[str, float]] = {}
    for name in env.workloads:
        scenario, horizon = env.workload(name, validation_load(env, name))
        known = scenario.output_lengths_known
        levels[name] = {}
        for policy in KNOWN_BASELINES if known else HIDDEN_BASELINES:
            setting = replace(scenario, output_lengths_known=known and policy in SEES_OUTPUT_LENGTHS)
            regrets = []
            for seed in seeds:
                arrivals = setting.sample(horizon, seed)
                row = summarize(run(setting.engine(), make_policy(policy, setting, horizon), arrivals, horizon),
                                setting.fluid(arrivals, horizon))
                regrets.append(float(row["regret_requests"]) / float(row["fluid_throughput_rps"]))
            levels[name][policy] = float(np.mean(regrets))
    return levels
