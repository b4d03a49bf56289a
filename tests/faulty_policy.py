"""A policy that fails now and then, for the tests of the served scheduler's fallback (tests/test_live_serve.py):
``vllm`` FCFS, except that every 5th decision raises and every 7th names a request that does not exist."""

from __future__ import annotations

import numpy as np

from baselines import vllm_policy
from llmsched_env.engine import Decision, Engine, SchedulerState
from llmsched_env.policy import Policy
from llmsched_env.scenario import Scenario


class FaultyPolicy:
    name = "faulty"

    def __init__(self) -> None:
        self.inner = vllm_policy()
        self.calls = 0

    def reset(self, engine: Engine) -> None:
        self.inner.reset(engine)
        self.calls = 0

    def decide(self, state: SchedulerState) -> Decision:
        self.calls += 1
        if self.calls % 5 == 0:
            raise RuntimeError(f"injected fault at decision {self.calls}")
        if self.calls % 7 == 0:
            return Decision(decode=np.array([state.num_requests + 100]))
        return self.inner.decide(state)


def faulty(scenario: Scenario, horizon_s: float) -> Policy:
    return FaultyPolicy()
