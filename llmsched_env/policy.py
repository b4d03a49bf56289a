"""The policy interface: every scheduler (baseline, fluid-guided or learned) implements it."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from llmsched_env.compiled_run import ChunkArrays, RunState
from llmsched_env.engine import Decision, Engine, SchedulerState
from llmsched_env.iteration import EngineParams
from llmsched_env.request_table import RequestColumns


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


#: A policy's compiled loop, bound to its parameters: ``loop(run, running, columns, arrivals, engine)`` runs
#: iterations (:mod:`llmsched_env.compiled_run`) until Python's turn and returns ``(stop, running, decode, prefill,
#: prefill_tokens)`` (the last three: the decision an ``INVALID_DECISION`` stop refers to).
CompiledLoop = Callable[[RunState, np.ndarray, RequestColumns, ChunkArrays, EngineParams],
                        tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@runtime_checkable
class CompiledPolicy(Policy, Protocol):
    """A policy whose decision is also a compiled function: :func:`~llmsched_env.runner.run` on the simulated
    engine runs it many iterations per call (its Python :meth:`decide` stays, for every other engine and as the
    reference the compiled rule is tested against, bit for bit)."""

    def compiled_loop(self) -> CompiledLoop | None:
        """The compiled loop for the run ``reset`` prepared, or ``None`` when this configuration has none."""
        ...
