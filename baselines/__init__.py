"""Reference scheduling policies: pure functions of the scheduler state behind one interface.

* :mod:`baselines.fcfs` — the engines' own schedulers (vLLM FCFS with preemption, Sarathi-Serve), and the
  paper's baselines as Vidur simulates them (``vllm-v0``, ``sarathi-512``);
* :mod:`baselines.wait` — WAIT (known output lengths): the project's measured variant and the paper's
  Algorithm 1 as written (``wait-pausing``);
* :mod:`baselines.nested_wait` — Nested WAIT (hidden output lengths), likewise (``nested-wait-pausing``);
* :mod:`baselines.wait_cp` — WAIT-CP and Nested WAIT-CP, the schedulers the paper's authors ran
  (``wait-cp``, ``nested-wait-cp``);
* :mod:`baselines.adaptive` — WAIT and Nested WAIT learning rates and lengths online (``wait-adaptive``,
  ``nested-wait-adaptive``), sized on a backlog too (``*-backlog``), and their decisions batched stall-free
  (``*-stall-free``, :mod:`baselines.stall_free`);
* :mod:`baselines.thresholds` — the thresholds from the fluid model (pure functions).

Renamed presets: ``wait-paper`` and ``nested-wait-paper`` are now ``wait-pausing`` and
``nested-wait-pausing`` (the old names still resolve, with a warning): the paper's experiments ran WAIT-CP,
not these. ``wait-chunked`` (a 256-token budget per iteration, which is not how the authors chunked) is
gone; ``wait-cp`` is the paper's chunked WAIT.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from baselines.adaptive import BACKLOG_DRAIN_S, AdaptiveNestedWaitPolicy, AdaptiveWaitPolicy
from baselines.fcfs import (
    FCFSPolicy,
    sarathi_policy,
    sarathi_vidur_policy,
    vllm_policy,
    vllm_v0_policy,
)
from baselines.lookahead import LOOKAHEAD_QUANTILE, MARGIN_QUANTILES, MARGIN_RESERVES, residual_quantiles
from baselines.nested_wait import NestedWaitPolicy
from baselines.stall_free import DRAIN_ITERATIONS, LATENCY_ORDER, SARATHI_TOKEN_BUDGET
from baselines.thresholds import (
    OutputLengthDistribution,
    nested_wait_thresholds,
    wait_thresholds,
)
from baselines.wait import WaitPolicy
from baselines.wait_cp import ChunkedBookingPolicy, fluid_total_limit
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import equilibrium
from llmsched_env.policy import Policy
from llmsched_env.scenario import Scenario
from llmsched_env.workload import TypeMix

PolicyFactory = Callable[[Scenario, float], Policy]


def threshold_mix(scenario: Scenario) -> TypeMix:
    """The type mix WAIT sizes its thresholds on: the given types, or a 3×3 bucketing of a trace."""
    return scenario.class_mix()


def _wait(variant: str) -> PolicyFactory:
    def factory(scenario: Scenario, horizon: float) -> Policy:
        return WaitPolicy.for_mix(threshold_mix(scenario), scenario.cost, scenario.capacity_tokens,
                                  scenario.block_size, variant)  # type: ignore[arg-type]
    return factory


def _wait_cp(nested: bool) -> PolicyFactory:
    def factory(scenario: Scenario, horizon: float) -> Policy:
        # tl from the fluid model at the scenario's rate; `llmsched paper` sweeps it as the authors did.
        mix = scenario.offered_mix()
        total_limit = fluid_total_limit(mix, scenario.cost, scenario.paged_capacity_tokens)
        return ChunkedBookingPolicy.for_mix(mix, total_limit, nested=nested)
    return factory


def _nested_wait(variant: str, adaptive_margin: bool = False) -> PolicyFactory:
    def factory(scenario: Scenario, horizon: float) -> Policy:
        # Sized on the output-length *distribution* only; the policy never sees a request's length.
        mix = scenario.offered_mix()
        distribution = OutputLengthDistribution.from_samples(mix.output_lens, weights=mix.rates)
        prompt = float(mix.prompt_lens @ mix.rates / mix.total_rate)
        thresholds = nested_wait_thresholds(distribution, prompt, mix.total_rate, scenario.cost,
                                            scenario.paged_capacity_tokens, horizon_s=horizon)
        measured = variant == "measured"
        lookahead = (residual_quantiles(distribution.values, distribution.probabilities, LOOKAHEAD_QUANTILE)
                     if measured else None)
        levels = (np.stack([residual_quantiles(distribution.values, distribution.probabilities, quantile)
                            for quantile in MARGIN_QUANTILES]) if adaptive_margin else None)
        _, _, fluid_memory = equilibrium(mix.rates, mix.prompt_lens, mix.output_lens, scenario.cost)
        name = ("nested-wait-margin" if adaptive_margin else "nested-wait") if measured else "nested-wait-pausing"
        return NestedWaitPolicy(thresholds, variant, name, drain_when_idle=measured,  # type: ignore[arg-type]
                                lookahead=lookahead, lend_spare_memory=measured,
                                reserve_tokens=min(fluid_memory, thresholds.memory_tokens), lookahead_levels=levels,
                                reserve_levels=MARGIN_RESERVES if adaptive_margin else ())
    return factory


POLICIES: dict[str, PolicyFactory] = {
    "vllm": lambda scenario, horizon: vllm_policy(),
    "sarathi": lambda scenario, horizon: sarathi_policy(),
    # The paper's experiments as its authors ran them on Vidur (llmsched paper; docs/paper.md):
    "vllm-v0": lambda scenario, horizon: vllm_v0_policy(),
    "sarathi-512": lambda scenario, horizon: sarathi_vidur_policy(),
    "wait-cp": _wait_cp(nested=False),
    "nested-wait-cp": _wait_cp(nested=True),
    # Learning the rates and the length mix online (baselines.adaptive); wait / nested-wait are their oracles.
    "wait-adaptive": lambda scenario, horizon: AdaptiveWaitPolicy.create(scenario.cost, scenario.capacity_tokens,
                                                                         scenario.block_size),
    "nested-wait-adaptive": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon),
    # The same admissions batched as Sarathi batches (baselines.stall_free): decodes first, prefills chunked, the
    # budget raised where the queue outgrows it; with lengths known, the admissions served by projected latency.
    "wait-adaptive-stall-free": lambda scenario, horizon: AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, token_budget=SARATHI_TOKEN_BUDGET,
        drain_iterations=DRAIN_ITERATIONS, latency_order_weight=LATENCY_ORDER),
    "nested-wait-adaptive-stall-free": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon,
        token_budget=SARATHI_TOKEN_BUDGET, drain_iterations=DRAIN_ITERATIONS),
    # Nested-WAIT-adaptive with the adaptive margin of nested-wait-margin, its levels re-solved with every solve.
    "nested-wait-adaptive-margin": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon, adaptive_margin=True),
    "nested-wait-adaptive-margin-stall-free": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon,
        token_budget=SARATHI_TOKEN_BUDGET, drain_iterations=DRAIN_ITERATIONS, adaptive_margin=True),
    # Sized on the backlog too (baselines.adaptive.sizing_rate): over an hour of bursts, the oracle's level.
    "wait-adaptive-backlog": lambda scenario, horizon: AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, backlog_drain_s=BACKLOG_DRAIN_S),
    "nested-wait-adaptive-backlog": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon,
        backlog_drain_s=BACKLOG_DRAIN_S),
    "wait-adaptive-backlog-stall-free": lambda scenario, horizon: AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, token_budget=SARATHI_TOKEN_BUDGET,
        drain_iterations=DRAIN_ITERATIONS, latency_order_weight=LATENCY_ORDER, backlog_drain_s=BACKLOG_DRAIN_S),
    "nested-wait-adaptive-margin-backlog-stall-free": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon,
        token_budget=SARATHI_TOKEN_BUDGET, drain_iterations=DRAIN_ITERATIONS, adaptive_margin=True,
        backlog_drain_s=BACKLOG_DRAIN_S),
    "wait": _wait("measured"),
    "wait-pausing": _wait("paper"),
    "nested-wait": _nested_wait("measured"),
    "nested-wait-pausing": _nested_wait("paper"),
    # Nested WAIT with its lookahead's margin adapted to the evictions seen (nested_wait.adapt_lookahead).
    "nested-wait-margin": _nested_wait("measured", adaptive_margin=True),
}
DEFAULT_POLICIES = ("wait", "nested-wait", "vllm", "sarathi")

#: Old names that still resolve, with a warning, to the preset that replaced them.
DEPRECATED_ALIASES = {"wait-paper": "wait-pausing", "nested-wait-paper": "nested-wait-pausing"}
#: Old names that are gone, with why.
REMOVED = {"wait-chunked": "it read the paper's 256-token chunk as a budget for a whole iteration, which is not how "
                           "the authors chunked; use wait-cp (per-request chunks, the paper's WAIT-CP)"}


def resolve_alias(name: str) -> str:
    """``name``, or the preset that replaced a deprecated one (with a :class:`FutureWarning`); a removed name is
    a :class:`ConfigError` saying what to use. Other names pass unchanged (an agent's, an unknown one)."""
    if name in REMOVED:
        raise ConfigError(f"policy {name!r} was removed: {REMOVED[name]}")
    if name in DEPRECATED_ALIASES:
        new = DEPRECATED_ALIASES[name]
        warnings.warn(f"policy {name!r} is now called {new!r} (the paper's experiments ran WAIT-CP, not this rule); "
                      f"the old name will be removed", FutureWarning, stacklevel=2)
        return new
    return name


def canonical_name(name: str) -> str:
    """:func:`resolve_alias`, and a :class:`ConfigError` listing the presets when the name is none of them."""
    name = resolve_alias(name)
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    return name


def make_policy(name: str, scenario: Scenario, horizon: float) -> Policy:
    """The policy called ``name``, configured for ``scenario`` (thresholds come from its fluid model)."""
    return POLICIES[canonical_name(name)](scenario, horizon)


__all__ = ["DEFAULT_POLICIES", "DEPRECATED_ALIASES", "ChunkedBookingPolicy", "FCFSPolicy", "NestedWaitPolicy",
           "POLICIES", "WaitPolicy", "canonical_name", "make_policy", "resolve_alias", "nested_wait_thresholds",
           "sarathi_policy", "sarathi_vidur_policy", "threshold_mix", "vllm_policy", "vllm_v0_policy",
           "wait_thresholds"]
