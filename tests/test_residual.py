"""The workload-independent residual interface (``LLMSched-Residual-v0``, :mod:`agents.residual`) and its judging
table (:mod:`agents.judge`)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmsched_env  # noqa: F401  (registers the ids)
from agents.judge import judge_network, judging_cells, named_cells, verdict
from agents.residual import (
    BASES,
    NUM_FEATURES,
    SURGE_END_LOAD,
    TREND_SETTLE_S,
    ConstantAction,
    LoadTrend,
    OverloadRule,
    ResidualAgentPolicy,
    SurgeOnlyRule,
    SurgeRule,
    action_for_residual,
    control_settings,
    dead_zoned,
    feature_names,
    threshold_scale,
)
from agents.residual_env import LLMSchedResidualEnv, suite_workloads
from baselines import make_policy
from llmsched_env import run
from llmsched_env.errors import ConfigError
from llmsched_env.metrics import summarize
from llmsched_env.scenarios import load_scenario

EXACT = ("completed", "arrived", "evictions", "iterations", "throughput_rps", "p99_latency_s", "mean_latency_s",
         "regret_requests", "waiting", "running")
WORKLOADS = ["paper-two-type", "bursty-high-hidden", "azure-code-like-hidden", "paper-two-type-512"]


def _episode(env: LLMSchedResidualEnv, options: dict[str, Any], act: Any) -> tuple[dict[str, Any], list[float]]:
    observation, _ = env.reset(seed=0, options=options)
    rewards, done, info = [], False, {}
    while not done:
        observation, reward, terminated, done, info = env.step(act(observation))
        assert not terminated and observation.shape == env.observation_space.shape
        rewards.append(reward)
    return info, rewards


def _wave(observations: np.ndarray) -> np.ndarray:
    """A deterministic stand-in network whose actions move with the observation (scales both ways)."""
    return np.sin(observations.sum(axis=1, keepdims=True) * 7.0)


def _observed_episode(env_id: str, workload: str) -> tuple[np.ndarray, dict[str, Any]]:
    """An episode of ``env_id`` on ``workload`` at 0.9 driven by :func:`_wave` on v0's entries alone (so that every
    id takes the same actions): its observations before the last step, and the last step's info."""
    env = gym.make(env_id, scenarios=workload, horizon=40.0, interval_s=2.0).unwrapped
    observation, _ = env.reset(seed=3, options={"load": 0.9})
    observations, done, info = [observation], False, {}
    while not done:
        observation, _, _, done, info = env.step(_wave(observations[-1][None, :NUM_FEATURES])[0])
        observations.append(observation)
    return np.array(observations[:-1]), info


@settings(max_examples=8, deadline=None)
@given(workload=st.sampled_from(WORKLOADS), load=st.sampled_from([0.6, 0.9, 1.1]), seed=st.integers(0, 50),
       compiled=st.booleans(), batching=st.sampled_from(sorted(BASES)))
def test_the_zero_action_is_the_baseline_bit_for_bit(workload: str, load: float, seed: int, compiled: bool,
                                                     batching: str) -> None:
    env = LLMSchedResidualEnv(scenarios=workload, horizon=40.0, compiled=compiled, batching=batching)
    info, rewards = _episode(env, {"load": load, "arrival_seed": seed}, lambda _: np.zeros(1, np.float32))
    scenario, horizon = env.workload(workload, load)
    arrivals = scenario.sample(horizon, seed)
    base = make_policy(BASES[batching][scenario.output_lengths_known], scenario, horizon)
    expected = summarize(run(scenario.engine(), base, arrivals, horizon), scenario.fluid(arrivals, horizon))
    assert {k: info[k] for k in EXACT} == {k: expected[k] for k in EXACT}
    # The return is minus the regret, in seconds of the fluid optimum's service (float sums: a stated tolerance).
    assert sum(rewards) == pytest.approx(-(expected["fluid_throughput_rps"] * horizon - info["completed"])
                                         / expected["fluid_throughput_rps"], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("workload, batching, compute_load, load, horizon, dead_zone", [
    ("paper-two-type", "whole", False, 0.9, 40.0, 0.0), ("bursty-high-hidden", "whole", False, 0.9, 40.0, 0.0),
    ("paper-two-type-512", "stall-free", False, 0.9, 40.0, 0.0),
    ("paper-two-type-hidden", "stall-free", False, 0.9, 40.0, 0.0),
    ("bursty-low-hidden", "stall-free-margin", False, 0.9, 40.0, 0.0),
    # v1: the network reads the compute load too, which each path must estimate alike.
    ("bursty-high", "stall-free", True, 0.9, 40.0, 0.0),
    ("azure-conv-like-hidden", "stall-free-margin", True, 0.9, 40.0, 0.0),
    # Sized on the backlog too: an overload long enough for a queue of more than 10 s of arrivals, where the actions
    # in the dead zone leave the base sized on the backlog and the others scale thresholds sized on the estimate.
    ("bursty-high", "stall-free-margin-backlog", True, 1.3, 150.0, 0.5),
    ("bursty-low-hidden", "stall-free-margin-backlog", True, 1.3, 150.0, 0.5)])
def test_an_agent_runs_through_run_as_in_the_environment_on_both_paths(workload: str, batching: str,
                                                                       compute_load: bool, load: float,
                                                                       horizon: float, dead_zone: float) -> None:
    results = []
    for compiled in (True, False):
        env = LLMSchedResidualEnv(scenarios=workload, horizon=horizon, compiled=compiled, batching=batching,
                                  compute_load=compute_load, dead_zone=dead_zone)
        info, _ = _episode(env, {"load": load, "arrival_seed": 3}, lambda o: _wave(o[None])[0])
        results.append({k: info[k] for k in EXACT})
    scenario, horizon = env.workload(workload, load)
    arrivals = scenario.sample(horizon, 3)
    fluid = scenario.fluid(arrivals, horizon)

    def agent_run(batching: str, compiled: bool = True) -> dict[str, Any]:
        policy = ResidualAgentPolicy(_wave, scenario, horizon, batching=batching, compute_load=compute_load,
                                     dead_zone=dead_zone)
        if not compiled:
            policy.compiled_loop = lambda: None  # type: ignore[method-assign]  # its Python rule, one call per iteration
        summary = summarize(run(scenario.engine(), policy, arrivals, horizon), fluid)
        return {k: summary[k] for k in EXACT}

    results += [agent_run(batching), agent_run(batching, compiled=False)]
    assert all(result == results[0] for result in results)
    assert results[0] != {k: summarize(run(scenario.engine(), make_policy(
        BASES[batching][scenario.output_lengths_known], scenario, horizon), arrivals,
        horizon), fluid)[k] for k in EXACT}  # the agent's scale changed something
    if batching.endswith("-backlog"):  # and the backlog's sizing did too
        assert results[0] != agent_run(batching.removesuffix("-backlog"))


def test_the_same_seed_gives_the_same_trajectory_and_resets_draw_workloads() -> None:
    env = gym.make("LLMSched-Residual-v0", horizon=20.0).unwrapped
    trajectories, drawn = [], set()
    for _ in range(2):
        rng = np.random.default_rng(0)
        observation, info = env.reset(seed=11)
        steps = [(observation.tolist(), info["scenario"], info["load"])]
        done = False
        while not done:
            observation, reward, _, done, info = env.step(rng.uniform(-1, 1, 1).astype(np.float32))
            steps.append((observation.tolist(), reward, info["scale"]))
        trajectories.append(steps)
    assert trajectories[0] == trajectories[1]
    for seed in range(12):
        observation, info = env.reset(seed=seed)
        drawn.add(info["scenario"])
        assert env.observation_space.contains(observation)
    assert len(drawn) > 3 and drawn <= set(suite_workloads())


def test_shapes_do_not_depend_on_the_workload_and_every_suite_workload_runs() -> None:
    env = LLMSchedResidualEnv(horizon=8.0)
    assert set(env.workloads) == set(suite_workloads()) and len(env.workloads) == 16
    for name in env.workloads:
        for load in env.load_range(name):
            info, _ = _episode(env, {"scenario": name, "load": load, "arrival_seed": 1},
                               lambda o: env.action_space.sample())
            assert info["scenario"] == name and info["arrived"] == info["completed"] + info["waiting"] + info["running"]
    assert env.action_space.shape == (1,) and env.observation_space.shape == (NUM_FEATURES,)


@pytest.mark.parametrize("workload", ["bursty-high", "azure-code-like-hidden"])
def test_v1_adds_the_compute_load_and_changes_nothing_else(workload: str) -> None:
    """``LLMSched-Residual-v1`` observes v0's twelve entries and the compute load after them; the same actions give
    the same episode, bit for bit."""
    (v0, info0), (v1, info1) = (_observed_episode(env_id, workload)
                                for env_id in ("LLMSched-Residual-v0", "LLMSched-Residual-v1"))
    assert v0.shape[1] == NUM_FEATURES and v1.shape[1] == NUM_FEATURES + 1
    np.testing.assert_array_equal(v1[:, :NUM_FEATURES], v0)
    assert {k: info1[k] for k in EXACT} == {k: info0[k] for k in EXACT}
    assert v1[0, -1] == 0.0 and v1[-1, -1] > 0.0  # nothing estimated before the first solve, then the estimate


@pytest.mark.parametrize("workload", ["paper-two-type", "paper-two-type-hidden", "azure-conv-like-hidden"])
def test_the_compute_load_estimate_tracks_the_offered_load(workload: str) -> None:
    """Both bases' ``ρ̂`` (rate estimate × a request's mean lifetime work, the lengths known or learnt from
    completions) is within 15 % of the offered load once warmed up, at a load inside the stability region and one
    beyond it, which the servable share cannot tell apart from the edge."""
    for load in (0.7, 1.2):
        env = gym.make("LLMSched-Residual-v1", scenarios=workload, horizon=240.0, interval_s=5.0).unwrapped
        env.reset(seed=0, options={"load": load, "arrival_seed": 4})
        estimates, done = [], False
        while not done:
            estimates.append(env.control.base.estimated_load)
            _, _, _, done, _ = env.step(np.zeros(1))
        assert float(np.median(estimates[24:])) == pytest.approx(load, rel=0.15)


def test_v2_adds_the_load_trend_and_changes_nothing_else() -> None:
    """``LLMSched-Residual-v2`` observes v1's thirteen entries and the load's trend after them; the same actions
    give the same episode, bit for bit. Before the trend has settled (:data:`TREND_SETTLE_S` after the first solve)
    its entries say "flat, no surge"."""
    (v1, info1), (v2, info2) = (_observed_episode(env_id, "bursty-high")
                                for env_id in ("LLMSched-Residual-v1", "LLMSched-Residual-v2"))
    assert v2.shape[1] == NUM_FEATURES + 4 == len(feature_names(True, True))
    np.testing.assert_array_equal(v2[:, :NUM_FEATURES + 1], v1)
    assert {k: info2[k] for k in EXACT} == {k: info1[k] for k in EXACT}
    np.testing.assert_array_equal(v2[:, -3:], np.tile([0.5, 0.5, 0.0], (len(v2), 1)))
    with pytest.raises(ConfigError, match="load_trend .* needs compute_load=True"):
        LLMSchedResidualEnv(load_trend=True)


def test_the_load_trend_starts_a_surge_on_a_smooth_rise_and_holds_it_until_the_load_falls() -> None:
    def path(loads: list[float], step: float = 5.0) -> list[tuple[float, float, bool]]:
        trend = LoadTrend()
        trend.update(0.0, 0.0, solved=True)  # the first solve: the trend counts from TREND_SETTLE_S on
        return [trend.update(TREND_SETTLE_S + step * k, load, solved=True) for k, load in enumerate(loads)]

    climb = [0.5 + 0.005 * k for k in range(120)]  # +0.3 over 300 s, +0.06 over every 60 s: a day climbing
    surged = [surge for _, _, surge in path(climb)]
    start = surged.index(True)
    assert climb[start] > 0.8 and all(surged[start:])
    rise, jump, _ = path(climb)[start]
    assert rise == pytest.approx(0.3) and jump == pytest.approx(0.06)
    # Held through the decline until the load falls below SURGE_END_LOAD, then over.
    decline = climb + [1.0 - 0.002 * k for k in range(300)]
    after = path(decline)
    end = next(k for k in range(len(climb), len(decline)) if decline[k] < SURGE_END_LOAD)
    assert all(surge for _, _, surge in after[start:end]) and not after[end][2]
    # A slower climb starts none; nor does a burst, which rises as much but in a jump, even once its own estimate
    # has levelled off (an on-period of minutes): the jump stays in the window for 300 s.
    assert not any(surge for _, _, surge in path([0.5 + 0.0025 * k for k in range(600)]))  # +0.15 per 300 s
    burst = path([0.6] * 80 + [1.2] * 80)
    assert not any(surge for _, _, surge in burst) and burst[100][1] == pytest.approx(0.6)
    # Nothing before the first solve and the settling after it.
    trend = LoadTrend()
    assert trend.update(100.0, 2.0, solved=False) == (0.0, 0.0, False)
    trend.update(200.0, 2.0, solved=True)
    assert trend.update(200.0 + TREND_SETTLE_S - 5, 5.0, solved=True) == (0.0, 0.0, False)
    assert len(trend.samples) == 0


def test_the_load_trend_keeps_bounded_memory() -> None:
    trend = LoadTrend()
    trend.update(0.0, 0.5, solved=True)
    for k in range(10_000):
        trend.update(TREND_SETTLE_S + k, 0.5, solved=True)
    assert len(trend.samples) <= 302  # one sample a second: the long window's and one before it


def test_the_surge_fires_on_the_diurnal_day_at_0_8_and_not_at_0_6() -> None:
    """On the diurnal day (lengths hidden, validation seed 1000, its first 1,500 s) the load estimate climbs toward
    the overload at 0.8 and a surge starts; at 0.6 it climbs more slowly and none starts (docs/agents.md)."""
    fired = {}
    for load in (0.6, 0.8):
        env = gym.make("LLMSched-Residual-v2", scenarios="diurnal-hidden", horizon=1500.0, interval_s=5.0,
                       batching="stall-free-margin").unwrapped
        observation, _ = env.reset(seed=0, options={"load": load, "arrival_seed": 1000})
        surges, done = [], False
        while not done:
            observation, _, _, done, _ = env.step(np.zeros(1))
            surges.append(observation[-1] == 1.0 and not done)
        fired[load] = sum(surges)
    assert fired[0.6] == 0 and fired[0.8] > 0


def test_the_surge_rule_acts_through_the_dead_zone_and_yields_to_the_overload_rule() -> None:
    names = feature_names(compute_load=True, load_trend=True)
    calm = np.zeros((1, len(names)), np.float32)
    calm[0, names.index("compute_load")] = 0.8 ** 4 / (1 + 0.8 ** 4)
    surge, known = calm.copy(), calm.copy()
    surge[0, names.index("load_surge")] = 1.0
    known[0, names.index("lengths_known")] = 1.0
    known[0, names.index("compute_load")] = 1.05 ** 4 / (1 + 1.05 ** 4)
    known[0, names.index("oldest_wait")] = 8 / 13  # a queued overload: the overload rule fires
    rule = SurgeRule(surge_action=0.8, dead_zone=0.25)
    assert rule(calm)[0, 0] == 0.0
    assert dead_zoned(float(rule(surge)[0, 0]), 0.25) == pytest.approx(0.8)
    assert dead_zoned(float(rule(known)[0, 0]), 0.25) == pytest.approx(1.0)
    both = known.copy()
    both[0, names.index("load_surge")] = 1.0
    assert rule(both)[0, 0] == rule(known)[0, 0]  # the larger of the two
    hidden_overload = known.copy()
    hidden_overload[0, names.index("lengths_known")] = 0.0
    assert rule(hidden_overload)[0, 0] == 0.0  # the overload rule is for known lengths only
    with pytest.raises(ConfigError, match="v2's 16 entries"):
        rule(calm[:, :NUM_FEATURES + 1])
    with pytest.raises(ConfigError, match="residuals must lie in"):
        SurgeRule(surge_action=1.5)
    for residual in (-1.0, -0.3, 0.0, 0.5, 1.0):  # the action a rule answers applies its residual, both signs
        assert dead_zoned(action_for_residual(residual, 0.25), 0.25) == pytest.approx(residual)
    assert action_for_residual(1.0, 0.25) == 1.0 and OverloadRule(dead_zone=0.25).action == 1.0
    with pytest.raises(ConfigError, match="dead_zone must be in"):
        SurgeRule(dead_zone=1.0)
    # Without the overload rule, the surge alone: the queued overload with lengths known is left to the base.
    alone = SurgeOnlyRule(surge_action=0.8, dead_zone=0.25)
    assert alone(calm)[0, 0] == 0.0 and alone(known)[0, 0] == 0.0
    assert alone(surge)[0, 0] == rule(surge)[0, 0] and alone(both)[0, 0] == rule(surge)[0, 0]


def test_scale_and_bad_input_name_what_is_wrong() -> None:
    assert threshold_scale(np.zeros(1)) == 1.0 and threshold_scale(1.0) == 4.0 and threshold_scale(-7.0) == 0.25
    with pytest.raises(ConfigError, match="finite"):
        threshold_scale(np.array([np.nan]))
    with pytest.raises(ConfigError, match="not one of"):
        LLMSchedResidualEnv(scenarios="paper-two-type").reset(options={"scenario": "bursty-high"})
    with pytest.raises(ConfigError, match="allowed"):
        LLMSchedResidualEnv(scenarios="paper-two-type").reset(options={"rate": 3})
    with pytest.raises(ConfigError, match="loads"):
        LLMSchedResidualEnv(loads=(0.9, 0.5))
    with pytest.raises(ConfigError, match="unknown scenario|no scenario|not a"):
        LLMSchedResidualEnv(scenarios="no-such-scenario")
    with pytest.raises(ConfigError, match="batching must be one of whole, stall-free, stall-free-margin, "
                                          "stall-free-margin-backlog, stall-free-margin-backlog-known, got 'chunky'"):
        LLMSchedResidualEnv(batching="chunky")
    with pytest.raises(ConfigError, match="wait_penalty must be finite and >= 0, got -0.1"):
        LLMSchedResidualEnv(wait_penalty=-0.1)
    with pytest.raises(ConfigError, match="adjusts one of .*wait-adaptive-stall-free.*not 'vllm'"):
        LLMSchedResidualEnv(base="vllm")
    env = LLMSchedResidualEnv(scenarios="paper-two-type", horizon=5.0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1))
    policy = make_policy("nested-wait-adaptive", env.workload("paper-two-type", 0.8)[0], 5.0)
    with pytest.raises(ConfigError, match="threshold scale"):
        policy.set_threshold_scale(0.0)  # type: ignore[attr-defined]


def _rows(tp: list[float], p99: list[float], censored: list[float] | None = None) -> dict[int, dict[str, Any]]:
    return {s: {"throughput_rps": t, "p99_latency_s": p, "p99_censored_latency_s": c, "regret_requests": 100 - t,
                "evictions": 0}
            for s, (t, p, c) in enumerate(zip(tp, p99, p99 if censored is None else censored))}


def test_the_verdict_follows_the_non_inferiority_margins() -> None:
    cell = {"workload": "w", "load": 0.9, "known": False}
    base = _rows([10.0, 10.2, 9.8, 10.1], [20.0, 21.0, 19.0, 20.5])
    slower = _rows([9.7, 9.9, 9.5, 9.8], [20.0, 21.0, 19.0, 20.5])
    faster_p99 = _rows([10.0, 10.2, 9.8, 10.1], [18.0, 19.0, 17.1, 18.4])
    late = _rows([10.0, 10.2, 9.8, 10.1], [22.0, 23.0, 21.0, 22.5])
    same = _rows([10.0, 10.2, 9.8, 10.1], [20.0, 21.0, 19.0, 20.5])
    # A lower p99 of the completed requests, bought by leaving the oldest unserved: their ages raise the censored p99.
    hiding = _rows([10.0, 10.2, 9.8, 10.1], [18.0, 19.0, 17.1, 18.4], [22.0, 23.0, 21.0, 22.5])
    judged = {name: verdict(cell, {"agent": agent, "vllm": base, "sarathi": _rows([5] * 4, [1] * 4)},
                            ["vllm", "sarathi"]) for name, agent in
              (("slower", slower), ("faster_p99", faster_p99), ("late", late), ("same", same), ("hiding", hiding))}
    assert judged["slower"]["best_baseline"] == "vllm"  # the most throughput, whatever its p99
    assert (judged["slower"]["verdict"], judged["slower"]["decided_by"]) == ("worse", "throughput")
    assert (judged["late"]["verdict"], judged["late"]["decided_by"]) == ("worse", "p99")
    assert (judged["faster_p99"]["verdict"], judged["faster_p99"]["decided_by"]) == ("better", "p99")
    assert judged["same"]["verdict"] == "level"
    assert (judged["hiding"]["verdict"], judged["hiding"]["decided_by"]) == ("worse", "censored p99")
    assert judged["hiding"]["censored_p99_diff_s"] == pytest.approx(2.0)
    # Within 1 % of the top throughput, the lowest p99 is the reference, however small its throughput deficit.
    tied = verdict(cell, {"agent": same, "vllm": base, "sarathi": _rows([9.95, 10.15, 9.75, 10.05], [1] * 4)},
                   ["vllm", "sarathi"])
    assert (tied["best_baseline"], tied["verdict"], tied["decided_by"]) == ("sarathi", "worse", "p99")


@pytest.mark.parametrize("workload, base", [("paper-single", "wait-adaptive"),
                                            ("paper-two-type-hidden", "nested-wait-adaptive")])
def test_a_zero_constant_action_is_judged_as_the_baseline_it_adjusts(workload: str, base: str) -> None:
    cell = next(c for c in judging_cells([workload], None) if c["load"] in (0.5, 0.6))
    row = judge_network(ConstantAction(0.0), 5.0, cell, (0, 1))
    assert row["seeds"] == 2
    # The same runs as the baseline's own, so the same means (exactly: the same numbers summed the same way).
    assert row["agent_throughput_rps"] == row["baselines"][base]["throughput_rps"]
    assert row["agent_p99_latency_s"] == row["baselines"][base]["p99_latency_s"]
    assert row["agent_censored_p99_latency_s"] == row["baselines"][base]["p99_censored_latency_s"]
    moved = judge_network(ConstantAction(1.0), 5.0, cell, (0, 1))
    assert moved["best_baseline"] == row["best_baseline"]  # the baselines' runs do not depend on the agent
    assert moved["baselines"] == row["baselines"]
    with pytest.raises(ConfigError, match="finite"):
        ConstantAction(float("nan"))


def test_a_curve_panel_shows_at_least_a_second_of_regret_around_float_noise() -> None:
    from agents.curves import readable_limits

    assert readable_limits([1.4e-7, 1.4e-7, 0.0]) == pytest.approx((0.7e-7 - 0.5, 0.7e-7 + 0.5))
    assert readable_limits([0.0, 3.0, 17.5]) is None  # spread already: matplotlib's own
    assert readable_limits([float("nan")]) is None
    assert readable_limits([2.0, 2.25], span=2.0) == (1.125, 3.125)


def test_every_residual_base_is_among_the_baselines_its_agent_is_judged_against() -> None:
    # The table then shows what an agent adds to its base, beside the base's own runs.
    from agents.judge import HIDDEN_BASELINES, KNOWN_BASELINES
    from baselines.compare import SEES_OUTPUT_LENGTHS

    for bases in BASES.values():
        assert bases[True] in KNOWN_BASELINES and bases[False] in HIDDEN_BASELINES
        assert bases[True] in SEES_OUTPUT_LENGTHS and bases[False] not in SEES_OUTPUT_LENGTHS
    assert set(HIDDEN_BASELINES) <= set(KNOWN_BASELINES)


def test_the_best_baseline_is_the_lowest_p99_within_the_throughput_margin_of_the_top() -> None:
    from agents.judge import best_baseline

    assert best_baseline({"a": (10.0, 20.0), "b": (9.95, 15.0), "c": (9.0, 1.0)}) == "b"
    assert best_baseline({"a": (10.0, 20.0), "b": (9.89, 15.0)}) == "a"  # 1.1 % below: not a tie
    assert best_baseline({"a": (10.0, 15.0), "b": (9.95, 15.0)}) == "a"  # equal p99: the higher throughput
    assert best_baseline({"a": (10.0, float("nan")), "b": (10.0, 30.0)}) == "b"


def test_the_judging_cells_cover_the_suite_and_the_held_out_traces(tmp_path: Path) -> None:
    cells = judging_cells(suite_workloads(), None)
    assert {c["workload"] for c in cells} == set(suite_workloads()) and len(cells) == 46
    (tmp_path / "azure_conv_trace.csv").write_text("num_prefill_tokens,num_decode_tokens\n100,20\n200,40\n")
    traced = judging_cells([], tmp_path)
    assert [(c["workload"], c["load"]) for c in traced] == [
        ("azure-conv-trace", 0.8), ("azure-conv-trace", 0.9), ("azure-conv-trace-hidden", 0.8),
        ("azure-conv-trace-hidden", 0.9)]


def test_the_judging_cells_take_other_loads_a_longer_horizon_and_named_traces(tmp_path: Path) -> None:
    (tmp_path / "azure_conv_trace.csv").write_text("num_prefill_tokens,num_decode_tokens\n100,20\n200,40\n")
    cells = judging_cells(["bursty-low"], tmp_path, traces=["azure-conv-trace-hidden"], loads=[0.95],
                          horizon=3600.0)
    assert [(c["workload"], c["load"], c["horizon"], c["known"]) for c in cells] == [
        ("bursty-low", 0.95, 3600.0, True), ("azure-conv-trace-hidden", 0.95, 3600.0, False)]
    assert cells[0]["rate"] == load_scenario("bursty-low").rates((0.95,))[0]
    assert judging_cells(["bursty-low"], tmp_path, traces=[]) == judging_cells(["bursty-low"], None)  # none named
    with pytest.raises(ConfigError, match="azure-code-trace.*needs azure_code_trace.csv.*not found"):
        judging_cells([], tmp_path, traces=["azure-code-trace"])
    with pytest.raises(ConfigError, match="'azure-trace' is not a held-out trace: expected one of azure-conv-trace"):
        judging_cells([], tmp_path, traces=["azure-trace"])
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="judging horizon must be finite and > 0 s"):
            judging_cells(["bursty-low"], None, horizon=bad)
    with pytest.raises(ConfigError, match="judging loads must be finite and > 0"):
        judging_cells(["bursty-low"], None, loads=[0.9, -1.0])


def test_cells_named_workload_at_load_are_the_judging_cells_in_order(tmp_path: Path) -> None:
    (tmp_path / "azure_code_trace.csv").write_text("num_prefill_tokens,num_decode_tokens\n100,20\n200,40\n")
    cells = named_cells("bursty-high-hidden@0.9, azure-code-trace@0.8,bursty-low@0.95", tmp_path, horizon=600.0)
    assert cells == [*judging_cells(["bursty-high-hidden"], None, loads=[0.9], horizon=600.0),
                     *judging_cells([], tmp_path, traces=["azure-code-trace"], loads=[0.8], horizon=600.0),
                     *judging_cells(["bursty-low"], None, loads=[0.95], horizon=600.0)]
    assert [(c["workload"], c["load"]) for c in cells] == [
        ("bursty-high-hidden", 0.9), ("azure-code-trace", 0.8), ("bursty-low", 0.95)]
    for text, why in (("bursty-low", "expected WORKLOAD@LOAD"), ("bursty-low@", "expected WORKLOAD@LOAD"),
                      ("@0.9", "expected WORKLOAD@LOAD"), ("bursty-low@high", "expected WORKLOAD@LOAD"),
                      ("bursty-low@nan", "expected WORKLOAD@LOAD"), ("bursty-low@-1", "loads must be finite"),
                      ("bursty-lo@0.9", "neither a scenario"), ("azure-conv-trace@0.9", "needs azure_conv_trace")):
        with pytest.raises(ConfigError, match=rf"--cells: '{re.escape(text)}' is not WORKLOAD@LOAD .*{why}"):
            named_cells(f"bursty-low@0.9,{text}", tmp_path)


def test_the_cli_judges_the_cells_asked_for_over_the_horizon_asked_for(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmsched_env.cli import app

    generalist = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "suite-residual"
    done = CliRunner().invoke(app, ["evaluate", "--suite", "--agent", str(generalist), "--workloads",
                                    "paper-two-type-hidden", "--loads", "0.7", "--horizon", "40", "--seeds", "0,1",
                                    "--jobs", "1", "--json", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    document = json.loads((tmp_path / "judging.json").read_text())
    assert document["schema_version"] == 1 and document["horizon_s"] == 40.0 and document["seeds"] == [0, 1]
    [cell] = document["cells"]
    assert (cell["workload"], cell["load"], cell["horizon_s"], cell["seeds"]) == ("paper-two-type-hidden", 0.7, 40.0, 2)
    assert "Every cell ran for 40 s" in (tmp_path / "judging.md").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--rate", "5"], "--rate"), (["--policies", "wait"], "--policies"), (["--reference", "wait"], "--reference"),
    (["--stochastic"], "most likely action"), (["--loads", "0"], "finite numbers > 0"),
    (["--horizon", "0"], "finite number of seconds > 0"), (["--workloads", "no-such"], "neither a scenario"),
])
def test_the_cli_judging_refuses_what_it_would_not_use(tmp_path: Path, extra: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from llmsched_env.cli import app

    generalist = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "suite-residual"
    done = CliRunner().invoke(app, ["evaluate", "--suite", "--agent", str(generalist), "--jobs", "1",
                                    "--out", str(tmp_path), *extra])
    assert done.exit_code == 2 and message in done.output, done.output
    assert not (tmp_path / "judging.json").exists()


def test_the_cli_names_the_judging_options_outside_the_judging(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmsched_env.cli import app

    generalist = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "suite-residual"
    for option in ("--workloads", "--loads"):
        done = CliRunner().invoke(app, ["evaluate", "--agent", str(generalist), option, "0.9", "--out",
                                        str(tmp_path)])
        assert done.exit_code == 2 and "add --suite" in done.output, done.output


def test_the_dead_zone_leaves_the_baseline_and_keeps_the_reach() -> None:
    assert [dead_zoned(a, 0.25) for a in (0.0, 0.25, -0.25, 0.1, 1.0, -1.0)] == [0.0, 0.0, 0.0, 0.0, 1.0, -1.0]
    assert dead_zoned(0.625, 0.25) == 0.5 and dead_zoned(-0.625, 0.25) == -0.5  # continuous beyond it
    assert dead_zoned(0.1, 0.0) == 0.1  # none: every action counts
    with pytest.raises(ConfigError, match=r"dead_zone must be in \[0, 1\), got 1.0"):
        LLMSchedResidualEnv(dead_zone=1.0)


@pytest.mark.parametrize("known", [True, False])
def test_an_action_within_the_dead_zone_is_the_baseline_and_one_beyond_it_is_not(known: bool) -> None:
    env = LLMSchedResidualEnv(scenarios="paper-two-type-512", horizon=40.0)
    scenario, horizon = env.workload("paper-two-type-512", 0.95)
    scenario = replace(scenario, output_lengths_known=known)
    arrivals = scenario.sample(horizon, 5)
    fluid = scenario.fluid(arrivals, horizon)
    base = summarize(run(scenario.engine(), make_policy(BASES["stall-free"][known], scenario, horizon), arrivals,
                         horizon), fluid)
    runs = {}
    for action in (0.2, -0.2, -0.8):
        policy = ResidualAgentPolicy(ConstantAction(action), scenario, horizon, interval_s=5.0, batching="stall-free",
                                     dead_zone=0.25)
        runs[action] = summarize(run(scenario.engine(), policy, arrivals, horizon), fluid)
        assert policy.control.action == dead_zoned(action, 0.25)
    for action in (0.2, -0.2):
        assert {k: runs[action][k] for k in EXACT} == {k: base[k] for k in EXACT}
    assert {k: runs[-0.8][k] for k in EXACT} != {k: base[k] for k in EXACT}


def test_a_saved_agent_runs_on_the_base_it_was_trained_on() -> None:
    assert control_settings({"interval_s": 5.0}) == {"interval_s": 5.0, "base": None, "batching": "whole",
                                                     "dead_zone": 0.0, "compute_load": False,
                                                     "load_trend": False}
    assert control_settings({"interval_s": 5.0, "dead_zone": 0.25})["dead_zone"] == 0.25
    # The id's own arguments count: a v1 agent reads the compute load, as gym.make gave it when it trained.
    assert control_settings({"interval_s": 5.0}, "LLMSched-Residual-v1")["compute_load"] is True
    assert control_settings({"interval_s": 5.0}, "LLMSched-Residual-v2")["load_trend"] is True
    with pytest.raises(ConfigError, match="LLMSched-v0.*not a workload-independent"):
        control_settings({}, "LLMSched-v0")
    env = LLMSchedResidualEnv(scenarios="paper-two-type")
    for known, batching, base in [(True, "whole", "wait-adaptive"), (True, "stall-free", "wait-adaptive-stall-free"),
                                  (False, "stall-free", "nested-wait-adaptive-stall-free"),
                                  (False, "stall-free-margin", "nested-wait-adaptive-margin-stall-free"),
                                  (True, "stall-free-margin-backlog", "wait-adaptive-backlog-stall-free"),
                                  (False, "stall-free-margin-backlog",
                                   "nested-wait-adaptive-margin-backlog-stall-free"),
                                  (True, "stall-free-margin-backlog-known", "wait-adaptive-backlog-stall-free"),
                                  (False, "stall-free-margin-backlog-known", "nested-wait-adaptive-margin-stall-free")]:
        scenario = replace(env.workload("paper-two-type", 0.8)[0], output_lengths_known=known)
        policy = ResidualAgentPolicy(ConstantAction(0.0), scenario, 10.0,
                                     **control_settings({"interval_s": 2, "batching": batching}))
        policy.reset(scenario.engine())
        assert policy.control.base.name == base and policy.control.interval_s == 2.0


def test_a_short_training_saves_reloads_and_is_judged_on_two_scenarios(tmp_path: Path) -> None:
    from agents.config import load_config
    from agents.judge import judge
    from agents.policy import read_agent
    from agents.residual import gaussian_action, read_residual_agent
    from agents.train import train

    # The shipped generalist's config, on two workloads, with a short warm start and a short run.
    config = tmp_path / "residual.toml"
    config.write_text('extends = "ppo-residual-suite-v4"\n[env]\nscenarios = ["paper-two-type", "bursty-low-hidden"]\n'
                      '[evaluation]\nseeds = [1000]\n')
    out = tmp_path / "agent"
    shipped = load_config(str(config))
    assert shipped.imitation is not None and shipped.imitation.teacher == "surge-only"
    short = replace(shipped, timesteps=2048, n_envs=2, env={**shipped.env, "horizon": 30.0},
                    imitation=replace(shipped.imitation, episodes=2, epochs=5))
    spec = train(short, out, progress_bar=False, log=lambda _: None)
    assert spec.timesteps == 2048 and spec.env_id == "LLMSched-Residual-v2"
    assert spec.model_timesteps is not None and 0 < spec.model_timesteps <= 2048  # the validation that kept it
    assert spec.env_kwargs["batching"] == "stall-free-margin-backlog-known"  # the shipped config's bases
    levels = json.loads((out / "validation_baselines.json").read_text())
    assert set(levels) == {"paper-two-type", "bursty-low-hidden"} and "wait" not in levels["bursty-low-hidden"]
    bounds = json.loads((out / "selection_bounds.json").read_text())  # the selection's, against each best baseline
    # One bound per workload at each of its swept loads: a departure that pays at the top can cost below it.
    assert set(bounds) == {f"{name} at {load:g}" for name in levels for load in (0.6, 0.8, 0.9)}
    assert all(bound["best_baseline"] in levels[point.split(" at ")[0]] for point, bound in bounds.items())
    assert (out / "curves.png").stat().st_size > 10_000  # a panel per workload, the baselines' levels drawn
    loaded, network = read_agent(out)
    assert loaded == spec and network.action_space.shape == (1,)
    loaded, actor = read_residual_agent(out)  # weights only, without stable-baselines3
    observations = np.random.default_rng(0).uniform(0, 1, (16, len(feature_names(True, True)))).astype(np.float32)
    # float32 torch against float64 NumPy: the same actions within a stated tolerance.
    np.testing.assert_allclose(actor(observations), gaussian_action(network, observations)[0], rtol=0, atol=1e-5)
    rows, failed = judge(out, seeds=[0, 1], workloads=["paper-two-type", "bursty-low-hidden"], jobs=1)
    assert failed == []
    assert [(r["workload"], r["load"]) for r in rows] == [(w, x) for w in ("paper-two-type", "bursty-low-hidden")
                                                          for x in (0.6, 0.8, 0.9)]
    assert all(r["verdict"] in ("better", "level", "worse") and r["seeds"] == 2 for r in rows)
    assert all(r["best_baseline"] in r["baselines"] for r in rows)
    assert "wait" not in rows[-1]["baselines"]  # hidden lengths: only baselines that do not see them


def test_the_overload_rule_fires_on_a_queued_overload_or_a_stale_head_with_lengths_known() -> None:
    names = feature_names(compute_load=True)
    calm = np.zeros((1, len(names)), np.float32)
    calm[0, names.index("lengths_known")] = 1.0
    calm[0, names.index("compute_load")] = 0.8 ** 4 / (1 + 0.8 ** 4)
    calm[0, names.index("oldest_wait")] = 100 / 105  # a head 100 s old

    def entries(**values: float) -> np.ndarray:
        moved = calm.copy()
        for name, value in values.items():
            moved[0, names.index(name)] = value
        return moved

    def load(rho: float) -> float:
        return rho ** 4 / (1 + rho ** 4)

    rule = OverloadRule()
    assert rule(calm)[0, 0] == 0.0
    assert rule(entries(compute_load=load(1.05)))[0, 0] == 1.0
    assert rule(entries(compute_load=load(1.05), oldest_wait=5 / 10))[0, 0] == 0.0  # no queue yet: a head 5 s old
    assert rule(entries(compute_load=load(1.05), oldest_wait=8 / 13))[0, 0] == 1.0  # a queue: a head 8 s old
    assert rule(entries(compute_load=load(1.6)))[0, 0] == 0.0  # a burst's rate
    assert rule(entries(oldest_wait=170 / 175))[0, 0] == 1.0  # a stale head, whatever the load
    assert rule(entries(compute_load=load(1.6), oldest_wait=170 / 175))[0, 0] == 1.0
    hidden = entries(lengths_known=0.0, oldest_wait=170 / 175)
    assert rule(hidden)[0, 0] == 0.0 and OverloadRule(known_only=False)(hidden)[0, 0] == 1.0
    with pytest.raises(ConfigError, match="13 entries"):
        rule(calm[:, :NUM_FEATURES])
    with pytest.raises(ConfigError, match="load < load_cap"):
        OverloadRule(load=1.5, load_cap=1.2)


def test_a_residual_warm_start_copies_its_teacher(tmp_path: Path) -> None:
    """``[imitation] teacher = "overload"`` on ``LLMSched-Residual-v1``: the network's mean action is the teacher's,
    within the dead zone where the teacher holds the baseline and beyond it where it acts; on v0, which does not
    observe the compute load, the config is refused before any training."""
    from agents.config import ImitationConfig, load_config
    from agents.imitation import collect_residual_demonstrations
    from agents.residual import read_residual_agent, residual_teacher
    from agents.train import make_env, train

    shipped = load_config("ppo-residual-suite")
    env_kwargs = {**shipped.env, "scenarios": ["paper-two-type", "paper-two-type-hidden"], "loads": 1.15,
                  "horizon": 150.0}
    env = make_env("LLMSched-Residual-v1", env_kwargs)
    teacher = residual_teacher("overload", env)
    demos = collect_residual_demonstrations(env, teacher, 4, seed=3, gamma=0.95)
    fires = demos.actions[:, 0] == 1.0
    assert 0 < fires.sum() < len(fires)  # an overload, once a queue has formed, with lengths known
    # The scale in force (an entry of the observation) would give the label away on the teacher's own path; the
    # exploring steps break that: where the teacher acts, the scale in force is often not its action's.
    scale = feature_names(compute_load=True).index("scale")
    own_path = collect_residual_demonstrations(env, teacher, 4, seed=3, gamma=0.95, explore=0.0)
    at_own = own_path.observations[own_path.actions[:, 0] == 1.0, scale]
    assert np.mean(at_own == 1.0) > 0.8 and np.mean(demos.observations[fires, scale] == 1.0) < 0.7
    short = replace(shipped, env_id="LLMSched-Residual-v1", timesteps=256, n_envs=2, env=env_kwargs,
                    imitation=ImitationConfig(teacher="overload", episodes=8, epochs=100, batch_size=64,
                                              learning_rate=3e-3),
                    evaluation=replace(shipped.evaluation, seeds=()))
    out = tmp_path / "agent"
    logged: list[str] = []
    spec = train(short, out, progress_bar=False, log=logged.append)
    assert spec.env_id == "LLMSched-Residual-v1" and any("mean action error" in line for line in logged)
    _, actor = read_residual_agent(out)  # 13 entries
    dead_zone = shipped.env["dead_zone"]
    # On its own path, from the baseline's scale, the clone acts where the teacher would (beyond the dead zone) and
    # holds where it would hold, on all but a few decisions (PPO's 256 frames moved it little; the fit is not exact,
    # so a share rather than every one). A clone of the teacher's path alone would repeat the scale in force, and
    # never start.
    observation, _ = env.reset(seed=0, options={"scenario": "paper-two-type", "arrival_seed": 7})
    agreed, acted, done = [], 0, False
    while not done:
        action = actor(observation[None])[0]
        agreed.append((action[0] > dead_zone) == (teacher(observation[None])[0, 0] > 0))
        acted += int(action[0] > dead_zone)
        observation, _, _, done, _ = env.step(action)
    assert acted > 0 and np.mean(agreed) >= 0.9
    with pytest.raises(ConfigError, match="compute load: train on LLMSched-Residual-v1"):
        train(replace(short, env_id="LLMSched-Residual-v0"), tmp_path / "v0", progress_bar=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="not a residual teacher"):
        residual_teacher("wait", env)
    with pytest.raises(ConfigError, match="load's trend: train on LLMSched-Residual-v2"):
        residual_teacher("surge", env)
    v2 = make_env("LLMSched-Residual-v2", env_kwargs)
    assert isinstance(residual_teacher("surge", v2), SurgeRule)
    assert isinstance(residual_teacher("surge-only", v2), SurgeOnlyRule)
    assert isinstance(residual_teacher("overload", v2), OverloadRule)  # v2's first 13 entries are v1's


@pytest.mark.parametrize("compiled", [True, False])
def test_the_paired_reward_is_zero_for_the_baseline_and_sums_to_the_completions_it_adds(compiled: bool) -> None:
    env = LLMSchedResidualEnv(scenarios="bursty-high-hidden", horizon=40.0, reward="vs_baseline", compiled=compiled)
    _, rewards = _episode(env, {"load": 0.9, "arrival_seed": 2}, lambda _: np.zeros(1))
    assert rewards == [0.0] * len(rewards)  # the baseline's own run, read at the same decision points
    rng = np.random.default_rng(0)
    info, rewards = _episode(env, {"load": 0.9, "arrival_seed": 2}, lambda _: rng.uniform(-1, 1, 1))
    scenario, horizon = env.workload("bursty-high-hidden", 0.9)
    arrivals = scenario.sample(horizon, 2)
    base = summarize(run(scenario.engine(), make_policy("nested-wait-adaptive", scenario, horizon), arrivals, horizon),
                     scenario.fluid(arrivals, horizon))
    assert info["completed"] != base["completed"]
    assert sum(rewards) == pytest.approx((info["completed"] - base["completed"]) / env.fluid.throughput_rps,
                                         rel=1e-9, abs=1e-9)
    # The action penalty takes a² per step off the same episode, and nothing off the baseline's.
    penalised = LLMSchedResidualEnv(scenarios="bursty-high-hidden", horizon=40.0, reward="vs_baseline",
                                    compiled=compiled, action_penalty=0.5)
    _, zero = _episode(penalised, {"load": 0.9, "arrival_seed": 2}, lambda _: np.zeros(1))
    assert zero == [0.0] * len(zero)
    actions = iter(np.random.default_rng(0).uniform(-1, 1, (len(rewards), 1)))
    played: list[float] = []
    _, charged = _episode(penalised, {"load": 0.9, "arrival_seed": 2},
                          lambda _: played.append(float(next(actions)[0])) or np.array(played[-1:]))
    np.testing.assert_allclose(np.array(rewards) - charged, 0.5 * np.square(played), rtol=0, atol=1e-12)


def test_judging_a_per_workload_agent_says_why_it_cannot() -> None:
    from agents.judge import judge

    pretrained = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "tight-memory-wait"
    with pytest.raises(ConfigError, match="per request type of one workload"):
        judge(pretrained, seeds=[0], workloads=["paper-two-type"], jobs=1)


def test_the_pretrained_generalist_runs_on_every_suite_workload_and_the_traces() -> None:
    from agents.judge import TRACES, cell_scenario, default_data_dir
    from agents.residual import read_residual_agent

    directory = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "suite-residual"
    spec, actor = read_residual_agent(directory)
    settings = control_settings(spec.env_kwargs, spec.env_id)  # the bases and observation it was trained with
    cells = judging_cells(suite_workloads(), default_data_dir() if default_data_dir().is_dir() else None)
    seen = set()
    for cell in cells:
        if cell["workload"] in seen:
            continue
        seen.add(cell["workload"])
        scenario = cell_scenario(cell)
        arrivals = scenario.sample(20.0, 0)
        policy = ResidualAgentPolicy(actor, scenario, 20.0, **settings)
        result = run(scenario.engine(), policy, arrivals, 20.0)
        assert result.arrived == result.finished + result.waiting + result.running and result.finished > 0
        assert policy.control.base.name == BASES[settings["batching"]][cell["known"]]
    assert seen >= set(suite_workloads())
    if default_data_dir().is_dir():
        assert {name for name in TRACES} <= seen


def test_the_cli_judging_needs_a_workload_independent_agent(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmsched_env.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["evaluate", "--suite", "--out", str(tmp_path / "a")])
    assert done.exit_code != 0 and "--suite judges an agent" in done.output
    pretrained = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "tight-memory-wait"
    done = runner.invoke(app, ["evaluate", "--suite", "--agent", str(pretrained), "--out", str(tmp_path / "b")])
    assert done.exit_code != 0 and "per request type of one workload" in done.output


def test_the_cli_judges_on_thirty_held_out_seeds_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import agents.judge
    from llmsched_env.cli import app

    asked: list[list[int]] = []

    def recording(agent_dir: Any, *, seeds: Any, **_: Any) -> agents.judge.Judging:
        asked.append(list(seeds))
        return agents.judge.Judging([], [])

    monkeypatch.setattr(agents.judge, "judge", recording)
    generalist = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "suite-residual"
    runner = CliRunner()
    for extra in ([], ["--seeds", "3,5"]):
        done = runner.invoke(app, ["evaluate", "--suite", "--agent", str(generalist), "--jobs", "1",
                                   "--out", str(tmp_path / str(len(extra))), *extra])
        assert done.exit_code == 0, done.output
    assert asked == [list(range(30)), [3, 5]]


def test_render_gives_one_status_line() -> None:
    env = LLMSchedResidualEnv(scenarios="bursty-low", horizon=10.0, render_mode="ansi")
    env.reset(seed=0)
    env.step(np.array([0.3], dtype=np.float32))
    text = env.render()
    assert text is not None and text.startswith("bursty-low at load") and "scale 1.52" in text


def test_memory_is_drawn_per_reset_and_an_impossible_range_names_the_scenario() -> None:
    env = LLMSchedResidualEnv(scenarios=["paper-two-type", "bursty-low-hidden"], memory=(0.5, 1.5), horizon=10.0)
    drawn = set()
    for seed in range(6):
        _, info = env.reset(seed=seed)
        drawn.add(round(info["memory"], 6))
        assert 0.5 <= info["memory"] <= 1.5
        capacity = env.workloads[info["scenario"]].scenario.capacity_tokens
        assert env.result().capacity_blocks == int(capacity * info["memory"]) // env.result().block_size
    assert len(drawn) == 6
    info, _ = _episode(env, {"scenario": "paper-two-type", "load": 0.9, "memory": 0.5, "arrival_seed": 1},
                       lambda _: np.zeros(1))
    assert info["memory"] == 0.5 and info["arrived"] == info["completed"] + info["waiting"] + info["running"]
    with pytest.raises(ConfigError, match="paper-long-decode.*could never finish"):
        LLMSchedResidualEnv(scenarios="paper-long-decode", memory=(0.001, 1.0))
    with pytest.raises(ConfigError, match="memory must be"):
        LLMSchedResidualEnv(scenarios="paper-long-decode", memory=(1.0, 0.5))


def _validation_row(scenario: str, seed: int, throughput: float, p99: float | None, regret: float,
                    load: float = 0.8) -> dict[str, Any]:
    return {"scenario": scenario, "load": load, "seed": seed, "throughput_rps": throughput, "p99_latency_s": p99,
            "regret_requests": regret, "fluid_throughput_rps": 1.0}


def test_the_selection_bounds_are_each_workloads_best_baseline_never_beyond_the_adjusted_ones_shortfall() -> None:
    from agents.validation import selection_bounds

    baselines = {  # per workload and baseline, its validation rows
        "a": {"x": [_validation_row("a", 0, 10.0, 100.0, 5)], "y": [_validation_row("a", 0, 9.95, 90.0, 5)]},
        "b": {"x": [_validation_row("b", 0, 10.0, 100.0, 5)], "y": [_validation_row("b", 0, 8.0, 50.0, 5)]}}
    base = [_validation_row("a", 0, 10.0, 100.0, 5), _validation_row("b", 0, 10.0, 99.0, 5)]
    bounds = {point.removesuffix(" at 0.8"): bound
              for point, bound in selection_bounds(base, baselines, 0.005, 0.025).items()}
    # a: y's throughput is within the judging table's 1 % of the top and its p99 is lower: y is the best. The base
    # is 11 % above its p99, beyond the 2.5 % margin: the ceiling is the base's own p99 (the zero action passes).
    assert bounds["a"].best_baseline == "y" and (bounds["a"].best_throughput, bounds["a"].best_p99) == (9.95, 90.0)
    assert bounds["a"].throughput_floor == pytest.approx(0.995 * 9.95, abs=1e-12) and bounds["a"].p99_ceiling == 100.0
    # b: y serves 20 % less, so x is the best; the base is within the margins, so they bound it.
    assert bounds["b"].best_baseline == "x"
    assert bounds["b"].throughput_floor == pytest.approx(9.95, abs=1e-12)
    assert bounds["b"].p99_ceiling == pytest.approx(102.5, abs=1e-12)
    # Without margins nothing is bounded.
    free = selection_bounds(base, baselines, np.inf, np.inf)["a at 0.8"]
    assert free.throughput_floor == -np.inf and free.p99_ceiling == np.inf


def test_validation_covers_every_swept_load_within_the_training_range() -> None:
    from agents.validation import validation_loads, validation_point

    suite = LLMSchedResidualEnv(scenarios=["diurnal", "paper-two-type-hidden"])
    assert validation_loads(suite, "diurnal") == (0.6, 0.8)
    assert validation_loads(suite, "paper-two-type-hidden") == (0.6, 0.8, 0.9)
    # A training range picks the swept loads within it, and always its top (where a policy's choices matter most).
    ranged = LLMSchedResidualEnv(scenarios=["diurnal", "paper-two-type-hidden"], loads=(0.7, 0.85))
    assert validation_loads(ranged, "diurnal") == (0.8, 0.85)
    assert validation_loads(ranged, "paper-two-type-hidden") == (0.8, 0.85)
    assert validation_loads(LLMSchedResidualEnv(scenarios="diurnal", loads=0.8), "diurnal") == (0.8,)
    assert validation_point({"scenario": "diurnal", "load": 0.6}) == "diurnal at 0.6"


def test_a_departure_that_costs_at_a_lower_load_alone_is_out_of_bounds() -> None:
    from agents.validation import selection_bounds, within_bounds, worst_departures

    base = [_validation_row("a", 0, 10.0, 100.0, 5, load=0.6), _validation_row("a", 0, 20.0, 300.0, 5, load=0.8)]
    bounds = selection_bounds(base, {"a": {"x": base}}, 0.005, 0.025)
    assert set(bounds) == {"a at 0.6", "a at 0.8"} and bounds["a at 0.6"].p99_ceiling == pytest.approx(102.5)
    # 4 % better at the top load, 4 % worse below it: averaged over the workload it would pass.
    agent = [_validation_row("a", 0, 10.0, 104.0, 5, load=0.6), _validation_row("a", 0, 20.0, 288.0, 5, load=0.8)]
    assert not within_bounds(agent, bounds)
    assert worst_departures(agent, bounds).p99_point == "a at 0.6"
    assert within_bounds(agent[1:], bounds)


def test_worst_departures_read_the_worst_workload_against_its_best_baseline_on_the_seeds_mean() -> None:
    from agents.validation import SelectionBound, within_bounds, worst_departures

    bounds = {"a at 0.8": SelectionBound("x", 10.0, 30.0, 9.9, 31.0),
              "b at 0.8": SelectionBound("y", 4.0, 10.0, 3.9, 11.0)}
    agent = [_validation_row("a", 0, 9.0, 30.0, 5), _validation_row("a", 1, 10.6, 42.0, 5),  # a: -2 %, p99 +20 %
             _validation_row("b", 0, 4.2, 9.0, 5)]  # b: +5 %, p99 -10 %
    worst = worst_departures(agent, bounds)
    assert worst.throughput_change == pytest.approx(-0.02, abs=1e-12) and worst.throughput_point == "a at 0.8"
    assert worst.p99_change == pytest.approx(0.2, abs=1e-12) and worst.p99_point == "a at 0.8"
    assert not within_bounds(agent, bounds)  # a: 9.8 < 9.9 and 36 > 31
    worst = worst_departures(agent[2:], bounds)
    assert worst.throughput_change == pytest.approx(0.05, abs=1e-12) and worst.p99_change == pytest.approx(-0.1)
    assert within_bounds(agent[2:], bounds)
    assert not within_bounds([_validation_row("b", 0, 4.2, 11.5, 5)], bounds)  # p99 above the ceiling alone
    assert not within_bounds([_validation_row("b", 0, 3.8, 9.0, 5)], bounds)  # throughput below the floor alone
    # No request finished: a p99 of 0 against 0 is no change; one where the best baseline has none is unbounded.
    empty = {"c at 0.8": SelectionBound("x", 0.0, 0.0, 0.0, 0.0)}
    assert worst_departures([_validation_row("c", 0, 0.0, None, 0)], empty) == (0.0, "c at 0.8", 0.0, "c at 0.8")
    assert worst_departures([_validation_row("c", 0, 1.0, 3.0, 0)], empty).p99_change == np.inf


def test_the_best_model_is_kept_only_within_the_bounds_on_every_workload(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import agents.train as training

    base = [_validation_row(name, 1000, 10.0, 100.0, 50) for name in ("a", "b")]
    validations = iter([
        base,  # the baseline itself: kept
        [base[0], _validation_row("b", 1000, 10.0, 110.0, 10)],  # less regret, p99 +10 % on b: not kept
        [_validation_row("a", 1000, 9.9, 100.0, 30), base[1]],  # less regret, throughput -1 % on a: not kept
        [_validation_row("a", 1000, 9.97, 102.0, 40), base[1]],  # -0.3 %, +2 % of a's best (the base), less regret
        # +1 % p99 on b, within the margin of the base but not of b's best (90 s), whose 2.5 % the base already
        # exceeds: not kept, though its regret is the least.
        [base[0], _validation_row("b", 1000, 10.0, 101.0, 20)],
    ])
    monkeypatch.setattr(training, "residual_validation_runs",
                        lambda model, kwargs, seeds, zero_action=False: base if zero_action else next(validations))
    monkeypatch.setattr(training, "baseline_validation_runs", lambda kwargs, seeds: {
        "a": {"base": [base[0]]}, "b": {"base": [base[1]], "other": [_validation_row("b", 1000, 10.0, 90.0, 45)]}})
    saved: list[int] = []

    class Model:  # what the callback reads of SB3's model
        num_timesteps = 0
        logger = type("Logger", (), {"record": lambda *a: None, "dump": lambda *a: None})()

        def save(self, path: Path) -> None:
            saved.append(self.num_timesteps)
            path.write_bytes(b"")

    callback = training.residual_metrics_callback({}, (1000,), 1, tmp_path, throughput_margin=0.005,
                                                  p99_margin=0.025)
    callback.model = Model()
    kept = []
    for step in range(5):
        callback.model.num_timesteps = step
        kept.append(callback.evaluate()["admissible"])
    assert kept == [1.0, 0.0, 0.0, 1.0, 0.0] and saved == [0, 3]
    bounds = json.loads((tmp_path / "selection_bounds.json").read_text())
    assert bounds["b at 0.8"]["best_baseline"] == "other" and bounds["b at 0.8"]["p99_ceiling"] == 100.0
    # Without margins (the default) the least regret wins wherever it costs.
    validations = iter([base, [base[0], _validation_row("b", 1000, 10.0, 110.0, 10)]])
    saved.clear()
    callback = training.residual_metrics_callback({}, (1000,), 1, tmp_path)
    callback.model = Model()
    for step in range(2):
        callback.model.num_timesteps = step
        callback.evaluate()
    assert saved == [0, 1]
    # Where every policy serves the load the regrets tie: the lower p99 is kept, and a tie on both keeps the first.
    validations = iter([base, base, [base[0], _validation_row("b", 1000, 10.0, 99.0, 50)],
                        [base[0], _validation_row("b", 1000, 10.0, 99.5, 50)]])
    saved.clear()
    callback = training.residual_metrics_callback({}, (1000,), 1, tmp_path, throughput_margin=0.005,
                                                  p99_margin=0.025)
    callback.model = Model()
    for step in range(4):
        callback.model.num_timesteps = step
        callback.evaluate()
    assert saved == [0, 2]
    # A resumed run goes on against the model kept before it (regret 50, p99 -1 on b): not its own first validation.
    validations = iter([base, [base[0], _validation_row("b", 1000, 10.0, 98.0, 50)]])
    saved.clear()
    callback = training.residual_metrics_callback({}, (1000,), 1, tmp_path, throughput_margin=0.005,
                                                  p99_margin=0.025, resume=True)
    assert callback.kept.timesteps == 2
    callback.model = Model()
    for step in (10, 11):
        callback.model.num_timesteps = step
        callback.evaluate()
    assert saved == [11] and json.loads((tmp_path / "best_model.json").read_text())["timesteps"] == 11
    # A regret tolerance is a share of the base's regret (100 in all here): 102 against 100 is level within 5 %, and
    # the lower p99 is kept; without it, the lower regret.
    for tolerance, kept_frames in ((0.05, [0, 1]), (0.0, [0])):
        validations = iter([[base[0], _validation_row("b", 1000, 10.0, 99.0, 50)],
                            [base[0], _validation_row("b", 1000, 10.0, 98.0, 52)]])
        saved.clear()
        (tmp_path / str(tolerance)).mkdir()
        callback = training.residual_metrics_callback({}, (1000,), 1, tmp_path / str(tolerance),
                                                      regret_tolerance=tolerance)
        callback.model = Model()
        for step in range(2):
            callback.model.num_timesteps = step
            callback.evaluate()
        assert saved == kept_frames


class _Validated:
    """What :class:`agents.train.KeptModel` reads of SB3's model: its frame, and a save that writes it."""

    def __init__(self, timesteps: int) -> None:
        self.num_timesteps = timesteps

    def save(self, path: Path) -> None:
        path.write_text(f"model {self.num_timesteps}")


def test_regrets_within_the_tolerance_are_level_and_the_tail_decides_among_them(tmp_path: Path) -> None:
    from agents.train import KeptModel

    kept = KeptModel(tmp_path, resume=False, tolerance=1.0)
    offers = [(10.0, 0.0), (9.5, -1.0), (9.6, -2.0), (8.9, 5.0)]
    expected = [(0, []), (1, []), (2, [1]), (2, [1, 3])]  # (the model kept, those on standby)
    for frame, ((regret, tiebreak), (chosen, standby)) in enumerate(zip(offers, expected)):
        kept.offer(_Validated(frame), regret, tiebreak)
        assert (kept.timesteps, sorted(kept.standby)) == (chosen, standby)
    assert (tmp_path / "best_model.zip").read_text() == "model 2"
    # 8.55 moves the band to 9.55: the model at frame 2 (9.6) leaves it, the one on standby at frame 1 takes over.
    kept.offer(_Validated(4), 8.55, 6.0)
    assert (kept.timesteps, sorted(kept.standby)) == (1, [3, 4])
    assert (tmp_path / "best_model.zip").read_text() == "model 1"
    assert sorted(p.name for p in (tmp_path / "validated").iterdir()) == ["model_3_steps.zip", "model_4_steps.zip"]
    # A resumed run goes on from the record: frame 3's model takes over when a lower regret leaves frame 1 out.
    resumed = KeptModel(tmp_path, resume=True, tolerance=1.0)
    assert (resumed.timesteps, resumed.key, sorted(resumed.standby)) == (1, (9.5, -1.0), [3, 4])
    resumed.offer(_Validated(5), 8.4, 7.0)
    assert (resumed.timesteps, sorted(resumed.standby)) == (3, [4, 5])
    assert (tmp_path / "best_model.zip").read_text() == "model 3"
    assert json.loads((tmp_path / "best_model.json").read_text())["timesteps"] == 3
    # A lower regret beyond the band of all the others: kept alone, nothing on standby.
    resumed.offer(_Validated(6), 1.0, 9.0)
    assert (resumed.timesteps, resumed.standby) == (6, {})
    assert list((tmp_path / "validated").iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(offers=st.lists(st.tuples(st.integers(0, 20), st.integers(-3, 3)), min_size=1, max_size=12),
       tolerance=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_the_model_kept_online_is_the_one_the_whole_run_would_choose(offers: list[tuple[int, int]],
                                                                   tolerance: float) -> None:
    import tempfile

    from agents.train import KeptModel

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        kept = KeptModel(out, resume=False, tolerance=tolerance)
        for frame, (regret, tiebreak) in enumerate(offers):
            kept.offer(_Validated(frame), regret / 2, tiebreak / 2)
        least = min(regret for regret, _ in offers) / 2
        level = [frame for frame, (regret, _) in enumerate(offers) if regret / 2 <= least + tolerance]
        chosen = min(level, key=lambda frame: (offers[frame][1], frame))
        assert kept.timesteps == chosen and (out / "best_model.zip").read_text() == f"model {chosen}"
        on_disk = {int(p.name.split("_")[1]) for p in (out / "validated").glob("*.zip")}
        assert on_disk == set(kept.standby) and all(offers[f][0] < offers[chosen][0] for f in on_disk)


@pytest.mark.parametrize("key, value", [("p99_margin", -0.1), ("throughput_margin", float("nan")),
                                        ("p99_margin", "5 %"), ("regret_tolerance", float("inf")),
                                        ("regret_tolerance", -0.01)])
def test_a_bad_selection_margin_is_refused_naming_it(key: str, value: Any) -> None:
    from agents.config import config_from_dict

    with pytest.raises(ConfigError, match=rf"x.toml: \[evaluation\] {key} must be a (finite )?number >= 0"):
        config_from_dict({"evaluation": {key: value}}, "x.toml", "x")


@pytest.mark.parametrize("compiled", [True, False])
def test_the_wait_penalty_integrates_the_queue_heads_age_beyond_the_baselines(compiled: bool) -> None:
    from agents.residual import oldest_wait_s

    options = {"load": 0.9, "arrival_seed": 3}
    # Against the baseline: the zero action is the baseline's own run, so its queue head waits exactly as long.
    paired = LLMSchedResidualEnv(scenarios="bursty-high-hidden", horizon=40.0, reward="vs_baseline",
                                 compiled=compiled, wait_penalty=0.5)
    _, zero = _episode(paired, options, lambda _: np.zeros(1))
    assert zero == [0.0] * len(zero)
    # Alone (the regret reward): λ times the head's age integrated over each step, by the trapezoid of its two ends.
    plain = LLMSchedResidualEnv(scenarios="bursty-high-hidden", horizon=40.0, compiled=compiled)
    charged = LLMSchedResidualEnv(scenarios="bursty-high-hidden", horizon=40.0, compiled=compiled, wait_penalty=0.5)
    actions = np.random.default_rng(1).uniform(-1, 1, (400, 1))
    plain.reset(seed=0, options=options)
    charged.reset(seed=0, options=options)
    engine = plain._rollout.engine
    expected, ages, times, done, step = [], [oldest_wait_s(engine.state())], [engine.now], False, 0
    while not done:
        _, reward, _, done, _ = plain.step(actions[step])
        _, penalised, _, charged_done, _ = charged.step(actions[step])
        assert charged_done == done
        ages.append(oldest_wait_s(engine.state()))
        times.append(engine.now)
        expected.append(0.5 * (ages[-2] + ages[-1]) / 2 * (times[-1] - times[-2]))
        assert reward - penalised == pytest.approx(expected[-1], rel=1e-12, abs=1e-12)
        step += 1
    assert max(ages) > 1.0 and sum(expected) > 0  # the queue's head did wait: the test measured something


def test_the_wait_penalty_sees_the_diurnal_peak_that_completions_do_not() -> None:
    """Every policy serves the whole day, so completions reward no scale; the queue head's wait tells them apart:
    smaller batches at the peak (a < 0) wait longer than the baseline, larger ones (a > 0) less (seed 1000)."""
    returns = {}
    for penalty in (0.0, 1e-3):
        env = LLMSchedResidualEnv(scenarios="diurnal", interval_s=5.0, batching="stall-free", reward="vs_baseline",
                                  dead_zone=0.25, wait_penalty=penalty)
        for action in (-0.6, 0.6):
            returns[penalty, action] = sum(_episode(env, {"load": 0.8, "arrival_seed": 1000},
                                                    lambda _: np.array([action]))[1])
    assert abs(returns[0.0, -0.6]) < 0.5 and abs(returns[0.0, 0.6]) < 0.5
    assert returns[1e-3, -0.6] < -10 and returns[1e-3, 0.6] > 5
