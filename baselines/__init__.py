"""Reference scheduling policies: pure functions of the scheduler state behind one interface.

* :mod:`baselines.fcfs` — the engines' own schedulers (vLLM FCFS with preemption, Sarathi-Serve);
* :mod:`baselines.wait` — WAIT (known output lengths), the measured and the paper's variants;
* :mod:`baselines.nested_wait` — Nested WAIT (hidden output lengths), the measured and the paper's variants;
* :mod:`baselines.thresholds` — their thresholds from the fluid model (pure functions).
"""

from __future__ import annotations

from typing import Callable

from baselines.fcfs import FCFSPolicy, sarathi_policy, vllm_policy
from baselines.nested_wait import NestedWaitPolicy
from baselines.thresholds import OutputLengthDistribution, nested_wait_thresholds, wait_thresholds
from baselines.wait import WaitPolicy
from llmsched_env.errors import ConfigError
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


def _nested_wait(variant: str) -> PolicyFactory:
    def factory(scenario: Scenario, horizon: float) -> Policy:
        # Sized on the output-length *distribution* only; the policy never sees a request's length.
        mix = scenario.offered_mix()
        distribution = OutputLengthDistribution.from_samples(mix.output_lens, weights=mix.rates)
        prompt = float(mix.prompt_lens @ mix.rates / mix.total_rate)
        thresholds = nested_wait_thresholds(distribution, prompt, mix.total_rate, scenario.cost,
                                            scenario.paged_capacity_tokens, horizon_s=horizon)
        name = "nested-wait" if variant == "measured" else "nested-wait-paper"
        return NestedWaitPolicy(thresholds, variant, name, drain_when_idle=variant == "measured")  # type: ignore[arg-type]
    return factory


POLICIES: dict[str, PolicyFactory] = {
    "vllm": lambda scenario, horizon: vllm_policy(),
    "sarathi": lambda scenario, horizon: sarathi_policy(),
    "wait": _wait("measured"),
    "wait-paper": _wait("paper"),
    "nested-wait": _nested_wait("measured"),
    "nested-wait-paper": _nested_wait("paper"),
}
DEFAULT_POLICIES = ("wait", "nested-wait", "vllm", "sarathi")


def make_policy(name: str, scenario: Scenario, horizon: float) -> Policy:
    """The policy called ``name``, configured for ``scenario`` (thresholds come from its fluid model)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}") from None
    return factory(scenario, horizon)


__all__ = ["DEFAULT_POLICIES", "FCFSPolicy", "NestedWaitPolicy", "POLICIES", "WaitPolicy", "make_policy",
           "nested_wait_thresholds", "sarathi_policy", "threshold_mix", "vllm_policy", "wait_thresholds"]
