"""Reference scheduling policies: pure functions of the scheduler state behind one interface.

* :mod:`baselines.fcfs` — the engines' own schedulers (vLLM FCFS with preemption, Sarathi-Serve), and the
  paper's presets of them (``vllm-v0``, ``sarathi-512``; ``wait-chunked`` is WAIT's);
* :mod:`baselines.wait` — WAIT (known output lengths), the measured and the paper's variants;
* :mod:`baselines.nested_wait` — Nested WAIT (hidden output lengths), the measured and the paper's variants;
* :mod:`baselines.thresholds` — their thresholds from the fluid model (pure functions).
"""

from __future__ import annotations

from typing import Callable

from baselines.adaptive import AdaptiveNestedWaitPolicy, AdaptiveWaitPolicy
from baselines.fcfs import FCFSPolicy, sarathi_policy, vllm_policy, vllm_v0_policy
from baselines.lookahead import LOOKAHEAD_QUANTILE, residual_quantiles
from baselines.nested_wait import NestedWaitPolicy
from baselines.thresholds import OutputLengthDistribution, nested_wait_thresholds, wait_thresholds
from baselines.wait import WaitPolicy
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import equilibrium
from llmsched_env.policy import Policy
from llmsched_env.scenario import Scenario
from llmsched_env.workload import TypeMix

PolicyFactory = Callable[[Scenario, float], Policy]


def threshold_mix(scenario: Scenario) -> TypeMix:
    """The type mix WAIT sizes its thresholds on: the given types, or a 3×3 bucketing of a trace."""
    return scenario.class_mix()


#: The paper's WAIT on Vidur prefilled in 256-token chunks; its Sarathi-Serve baseline used 512-token chunks.
PAPER_WAIT_CHUNK = 256
PAPER_SARATHI_CHUNK = 512


def _wait(variant: str, prefill_chunk: int | None = None) -> PolicyFactory:
    def factory(scenario: Scenario, horizon: float) -> Policy:
        return WaitPolicy.for_mix(threshold_mix(scenario), scenario.cost, scenario.capacity_tokens,
                                  scenario.block_size, variant, prefill_chunk)  # type: ignore[arg-type]
    return factory


def _nested_wait(variant: str) -> PolicyFactory:
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
        _, _, fluid_memory = equilibrium(mix.rates, mix.prompt_lens, mix.output_lens, scenario.cost)
        return NestedWaitPolicy(thresholds, variant, "nested-wait" if measured else "nested-wait-paper",  # type: ignore[arg-type]
                                drain_when_idle=measured, lookahead=lookahead, lend_spare_memory=measured,
                                reserve_tokens=min(fluid_memory, thresholds.memory_tokens))
    return factory


POLICIES: dict[str, PolicyFactory] = {
    "vllm": lambda scenario, horizon: vllm_policy(),
    "sarathi": lambda scenario, horizon: sarathi_policy(),
    # The paper's set-up on Vidur (vLLM V0's scheduler, 512-token Sarathi, 256-token chunked WAIT):
    "vllm-v0": lambda scenario, horizon: vllm_v0_policy(),
    "sarathi-512": lambda scenario, horizon: sarathi_policy(name="sarathi-512",
                                                            max_num_batched_tokens=PAPER_SARATHI_CHUNK),
    "wait-chunked": _wait("measured", PAPER_WAIT_CHUNK),
    # Learning the rates and the length mix online (baselines.adaptive); wait / nested-wait are their oracles.
    "wait-adaptive": lambda scenario, horizon: AdaptiveWaitPolicy.create(scenario.cost, scenario.capacity_tokens,
                                                                         scenario.block_size),
    "nested-wait-adaptive": lambda scenario, horizon: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon),
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
           "nested_wait_thresholds", "sarathi_policy", "threshold_mix", "vllm_policy", "vllm_v0_policy",
           "wait_thresholds"]
