"""The policy interface: every scheduler (baseline, fluid-guided or learned) implements it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from llmsched_env.engine import Decision, Engine, SchedulerState


@runtime_checkable
class Policy(Protocol):
    """A (possibly stateful) map from scheduler state to the next iteration's decision.

    Policies see only :class:`~llmsched_env.engine.SchedulerState`, so they run unchanged on every
    engine. ``reset`` is called once before each run with the engine the policy will drive, so that it
    can size itself to the capacity and block size and clear per-run memory.
    """

    name: str

    def reset(self, engine: Engine) -> None:
        """Prepare for a fresh run on ``engine``."""
        ...

    def decide(self, state: SchedulerState) -> Decision:
        """The decision for the next iteration; an empty decision waits for the next arrival."""
        ...
