"""Reference scheduling policies: pure functions of the scheduler state behind one interface.

* :mod:`baselines.fcfs` — the engines' own schedulers (vLLM FCFS with preemption, Sarathi-Serve).
"""

from __future__ import annotations

from typing import Callable

from baselines.fcfs import FCFSPolicy, sarathi_policy, vllm_policy
from llmsched_env.errors import ConfigError
from llmsched_env.policy import Policy
from llmsched_env.scenario import Scenario
from llmsched_env.workload import Arrivals

PolicyFactory = Callable[[Scenario, Arrivals, float], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "vllm": lambda scenario, arrivals, horizon: vllm_policy(),
    "sarathi": lambda scenario, arrivals, horizon: sarathi_policy(),
}


def make_policy(name: str, scenario: Scenario, arrivals: Arrivals, horizon: float) -> Policy:
    """The policy called ``name``, configured for ``scenario`` (thresholds come from its fluid model).

    ``arrivals`` and ``horizon`` are what the run will replay: a trace's fluid-guided thresholds are
    sized on its length distribution (never on which request has which output length).
    """
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}") from None
    return factory(scenario, arrivals, horizon)


__all__ = ["FCFSPolicy", "POLICIES", "make_policy", "sarathi_policy", "vllm_policy"]
