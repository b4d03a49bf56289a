"""A live evaluation (``llmsched evaluate --backend vllm``): in the command's process on one engine, or one task per
seed on a Ray cluster, each task starting its own engine on a GPU of its own.

The scenario a live run is judged in depends on the engine: its KV capacity is known once vLLM has started
(:class:`~live_backend.runs.LiveEngineFactory`), and the default rate is a load of that scenario. So a task is
given what the command was asked (:class:`LiveEvaluation`), not a scenario, and builds the rest after its engine
has started; every task builds the same scenario from the same engine settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from baselines.compare import compare, merge_comparisons
from live_backend.config import LiveConfig, default_profile
from live_backend.runs import LiveEngineFactory
from llmsched_env.executor import Executor, TaskFailure, failed_task
from llmsched_env.report import Comparison, PolicyRun
from llmsched_env.scenario import Scenario, build_scenario

#: The default horizon of a live run (s), and the load its default rate puts on the scenario.
DEFAULT_HORIZON_S = 30.0
DEFAULT_LOAD = 0.6


@dataclass(frozen=True)
class LiveEvaluation:
    """What a live evaluation runs: the engine's settings, the policies (and an agent), the sweep's point."""

    config: LiveConfig
    policies: tuple[str, ...]
    horizon: float | None = None  # default DEFAULT_HORIZON_S
    rate: float | None = None  # default: the agent's training rate, or DEFAULT_LOAD of the scenario
    with_sim: bool = True  # the simulator's run of each policy beside its live run
    types: str | None = None
    trace: str | None = None
    profile: str | None = None  # default: the device's (live_backend.config.default_profile)
    agent: str | None = None  # an agent's folder, run beside the policies
    reference: str | None = None
    deterministic: bool = True

    @property
    def gpus(self) -> float:
        """What one of its tasks asks a cluster for: a GPU for an engine on one (one engine per GPU)."""
        return 0.0 if self.config.device == "cpu" else 1.0

    def scenario(self, factory: LiveEngineFactory) -> Scenario:
        """The scenario on the started engine's capacity and block size, priced by the profile."""
        return build_scenario(types=self.types, trace=self.trace, profile=self.profile or default_profile(self.config),
                              memory_tokens=factory.capacity_tokens, block_size=factory.block_size)


def evaluate_live(request: LiveEvaluation, factory: LiveEngineFactory, seeds: Sequence[int],
                  on_start: Callable[[int], None] | None = None,
                  on_run_done: Callable[[PolicyRun], None] | None = None) -> Comparison:
    """``request`` on the engines of ``factory`` (started), for each seed, in this process."""
    scenario = request.scenario(factory)
    horizon = request.horizon if request.horizon is not None else DEFAULT_HORIZON_S
    rate = request.rate
    if request.agent is not None:
        from agents.evaluate import evaluate_agent

        return evaluate_agent(request.agent, policies=request.policies, seeds=seeds, horizon=horizon, rate=rate,
                              reference=request.reference, deterministic=request.deterministic, on_start=on_start,
                              on_run_done=on_run_done, scenario=scenario, engine=factory, with_sim=request.with_sim)
    if rate is None:
        rate = round(scenario.rate_for_load(DEFAULT_LOAD), 3)
    if on_start is not None:
        on_start(len(request.policies) * len(seeds) * (2 if request.with_sim else 1))
    comparison = compare(scenario, request.policies, [rate], horizon, seeds=seeds, on_run_done=on_run_done,
                         engine=factory, with_sim=request.with_sim)
    return comparison if request.reference is None else replace(comparison, reference=request.reference)


def evaluate_live_seed(request: LiveEvaluation, seed: int) -> Comparison:
    """One seed of ``request`` as an executor's task: its own engine started, run and released."""
    factory = LiveEngineFactory(request.config)
    try:
        return evaluate_live(request, factory, [seed])
    finally:
        factory.close()


def evaluate_live_on(executor: Executor, request: LiveEvaluation, seeds: Sequence[int],
                     on_seed_done: Callable[[int], None] | None = None) -> Comparison:
    """``request`` with each seed a task of ``executor`` (:func:`evaluate_live_seed`; on Ray each asks for
    :attr:`LiveEvaluation.gpus`), merged as one process's comparison would be ordered; a seed whose task failed (an
    engine that died) is named in the comparison's ``failed``. ``on_seed_done(seed)`` follows each seed that ran."""
    def done(index: int, part: Comparison | TaskFailure) -> None:
        if on_seed_done is not None and isinstance(part, Comparison):
            on_seed_done(seeds[index])

    parts = executor.map(evaluate_live_seed, [(request, seed) for seed in seeds], on_done=done, keep_going=True,
                         gpus=request.gpus)
    ran = [part for part in parts if isinstance(part, Comparison)]
    failed = [failed_task({"seed": seed}, part) for seed, part in zip(seeds, parts) if isinstance(part, TaskFailure)]
    if not ran:
        return Comparison([], {}, request.horizon or DEFAULT_HORIZON_S, request.policies, (), tuple(seeds),
                          request.reference, tuple(failed))
    first = ran[0]  # every task built the same scenario, rate and policies from the same settings
    merged = merge_comparisons(ran, first.policies, first.rates, seeds, first.horizon, failed)
    return replace(merged, reference=first.reference)
