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


def validation_loads(env: Any, workload: str) -> tuple[float, ...]:
    """The loads a residual agent is validated at on ``workload``: its scenario's swept loads within the training
    range, and the range's top (where the scheduler's choices change the most). Every swept load, because a
    departure that pays at the top load can cost at a lower one (larger batches on the diurnal day: better at 0.8,
    worse at 0.6), which a validation at the top alone cannot see."""
    low, high = env.load_range(workload)
    return tuple(sorted({float(load) for load in env.workloads[workload].loads if low <= load <= high} | {high}))


def validation_point(row: dict[str, Any]) -> str:
    """The validation episode's workload and load, as the selection's bounds are keyed: ``"diurnal at 0.8"``."""
    return f"{row['scenario']} at {float(row['load']):g}"


def residual_validation_runs(model: Any, env_kwargs: dict[str, Any], seeds: Sequence[int],
                             zero_action: bool = False) -> list[dict[str, Any]]:
    """One episode of ``LLMSched-Residual-v*`` per workload of ``env_kwargs``, load of it (:func:`validation_loads`)
    and seed, the model acting by its mean action (``zero_action``: the baseline itself); each row the final info
    with ``scenario``, ``load`` and ``seed``."""
    from agents.residual import gaussian_action
    from agents.residual_env import LLMSchedResidualEnv

    env = LLMSchedResidualEnv(**env_kwargs)
    rows = []
    for name in env.workloads:
        for load in validation_loads(env, name):
            for seed in seeds:
                observation, _ = env.reset(seed=0, options={"scenario": name, "load": load, "arrival_seed": seed})
                done, info = False, {}
                while not done:
                    action = np.zeros(1) if zero_action else gaussian_action(model, observation[None])[0][0]
                    observation, _, _, done, info = env.step(action)
                rows.append({**info, "seed": seed})
    return rows


class Departures(NamedTuple):
    """The worst validation point's departure from its best baseline on a validation (:func:`worst_departures`)."""

    throughput_change: float  # the lowest ratio of mean throughputs (the agent's to the best baseline's), less 1
    throughput_point: str  # where (:func:`validation_point`)
    p99_change: float  # the highest ratio of mean p99 latencies, less 1
    p99_point: str  # where


class SelectionBound(NamedTuple):
    """What a validated model must hold at one validation point (a workload at a load) to be kept
    (:func:`selection_bounds`); means over the seeds."""

    best_baseline: str  # the point's best baseline on the validation episodes (the judging table's rule)
    best_throughput: float
    best_p99: float
    throughput_floor: float  # the agent's mean throughput must be at least this
    p99_ceiling: float  # and its mean p99 at most this


def _means(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Mean throughput and mean p99 of validation rows (a missing p99, no request finished, counts 0)."""
    return (float(np.mean([row["throughput_rps"] for row in rows])),
            float(np.mean([row["p99_latency_s"] or 0.0 for row in rows])))


def _means_by_point(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """:func:`_means` of validation rows (each with ``scenario`` and ``load``) per :func:`validation_point`, in the
    order they first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(validation_point(row), []).append(row)
    return {point: _means(group) for point, group in groups.items()}


def selection_bounds(base_rows: Sequence[dict[str, Any]], baseline_rows: dict[str, dict[str, list[dict[str, Any]]]],
                     throughput_margin: float, p99_margin: float) -> dict[str, SelectionBound]:
    """Per validation point (:func:`validation_point`), the non-inferiority test a validated model must pass to be
    kept: the judging table's, on the validation episodes, against the point's **best baseline** there
    (:func:`agents.judge.best_baseline` over ``baseline_rows``, :func:`baseline_validation_runs`): mean throughput at
    least ``1 - throughput_margin`` of the best's and mean p99 at most ``1 + p99_margin`` of its, except that where
    the baseline the agent adjusts (``base_rows``) already falls short of that, the bound is the base's own figure:
    the agent may never add to its base's shortfall, and the zero action always passes."""
    from agents.judge import best_baseline

    by_point: dict[str, dict[str, tuple[float, float]]] = {}  # point -> baseline -> its means there
    for runs in baseline_rows.values():
        for policy, rows in runs.items():
            for point, means in _means_by_point(rows).items():
                by_point.setdefault(point, {})[policy] = means
    bounds, base_means = {}, _means_by_point(base_rows)
    for point, means in by_point.items():
        best = best_baseline(means)
        base_throughput, base_p99 = base_means[point]
        best_throughput, best_p99 = means[best]
        bounds[point] = SelectionBound(best, best_throughput, best_p99,
                                       min(base_throughput, (1 - throughput_margin) * best_throughput),
                                       max(base_p99, (1 + p99_margin) * best_p99))
    return bounds


def worst_departures(rows: Sequence[dict[str, Any]], bounds: dict[str, SelectionBound]) -> Departures:
    """Over the validation points of ``rows`` (:func:`validation_point`), means over the seeds: the lowest ratio of
    the agent's throughput to the point's best baseline's and the highest of their p99 latencies, each less 1, and
    where (a p99 where the best baseline has none is an infinite excess)."""
    throughput, p99 = (np.inf, ""), (-np.inf, "")
    for point, mine in _means_by_point(rows).items():
        bound = bounds[point]
        throughput = min(throughput, (mine[0] / bound.best_throughput - 1 if bound.best_throughput > 0 else 0.0,
                                      point), key=lambda change: change[0])
        p99 = max(p99, (mine[1] / bound.best_p99 - 1 if bound.best_p99 > 0 else (np.inf if mine[1] > 0 else 0.0),
                        point), key=lambda change: change[0])
    return Departures(float(throughput[0]), throughput[1], float(p99[0]), p99[1])


def within_bounds(rows: Sequence[dict[str, Any]], bounds: dict[str, SelectionBound]) -> bool:
    """Whether validation rows pass every validation point's :class:`SelectionBound`."""
    return not any(throughput < bounds[point].throughput_floor or p99 > bounds[point].p99_ceiling
                   for point, (throughput, p99) in _means_by_point(rows).items())


def baseline_validation_runs(env_kwargs: dict[str, Any], seeds: Sequence[int]
                             ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per workload of ``env_kwargs`` and baseline with the workload's information
    (:data:`agents.judge.KNOWN_BASELINES` / :data:`~agents.judge.HIDDEN_BASELINES`): the summaries of its runs on the
    validation episodes' arrivals (:func:`residual_validation_runs`), one per load and seed, each with ``scenario``,
    ``load`` and ``seed``."""
    from agents.judge import HIDDEN_BASELINES, KNOWN_BASELINES
    from agents.residual_env import LLMSchedResidualEnv
    from baselines import make_policy
    from baselines.compare import SEES_OUTPUT_LENGTHS
    from llmsched_env.metrics import summarize
    from llmsched_env.runner import run

    env = LLMSchedResidualEnv(**env_kwargs)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in env.workloads:
        runs[name] = {}
        for load in validation_loads(env, name):
            scenario, horizon = env.workload(name, load)
            known = scenario.output_lengths_known
            for policy in KNOWN_BASELINES if known else HIDDEN_BASELINES:
                setting = replace(scenario, output_lengths_known=known and policy in SEES_OUTPUT_LENGTHS)
                for seed in seeds:
                    arrivals = setting.sample(horizon, seed)
                    row = summarize(run(setting.engine(), make_policy(policy, setting, horizon), arrivals, horizon),
                                    setting.fluid(arrivals, horizon))
                    runs[name].setdefault(policy, []).append({**row, "scenario": name, "load": load, "seed": seed})
    return runs


def validation_levels(baseline_rows: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, float]]:
    """Per workload and baseline of :func:`baseline_validation_runs`, its mean regret over the loads and seeds
    (seconds of the fluid optimum's service): the levels a residual agent's validation curves are drawn against."""
    return {name: {policy: float(np.mean([float(row["regret_requests"]) / float(row["fluid_throughput_rps"])
                                          for row in rows])) for policy, rows in runs.items()}
            for name, runs in baseline_rows.items()}
