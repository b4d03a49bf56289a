"""The comparison job: every policy over a sweep of arrival rates on the simulated backend.

For each rate the same requests (same seed) are replayed to every policy, against the same fluid
optimum. Policies defined for known output lengths (WAIT) see them; every other policy runs with
lengths hidden, as a real engine would.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

from baselines import POLICIES, PolicyFactory, resolve_alias
from llmsched_env.engine import Engine
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import FluidSolution, solve_fluid
from llmsched_env.metrics import regret_curve, summarize
from llmsched_env.policy import Policy
from llmsched_env.report import SIM_SUFFIX, Comparison, PolicyRun
from llmsched_env.runner import RunResult, TimeSeriesRecorder, run
from llmsched_env.scenario import Scenario
from llmsched_env.workload import Arrivals, TypeMix

#: Policies that are defined with output lengths known at arrival.
SEES_OUTPUT_LENGTHS = frozenset({"wait", "wait-pausing", "wait-adaptive", "wait-adaptive-stall-free",
                                 "wait-adaptive-backlog", "wait-adaptive-backlog-stall-free"})

DEFAULT_LOADS = (0.7, 0.85, 0.9, 0.93, 0.95, 0.97)


def default_rates(scenario: Scenario, loads: Sequence[float] = DEFAULT_LOADS) -> list[float]:
    """Total arrival rates at which the load ``ρ`` takes the given values (the mix's shares kept)."""
    return [round(scenario.rate_for_load(load), 3) for load in loads]


EngineFactory = Callable[[Scenario], Engine]


def known_policies(policies: Sequence[str], available: Collection[str] = POLICIES) -> list[str]:
    """``policies`` by their current names (:func:`~baselines.resolve_alias`), each checked against ``available``:
    a sweep refuses an unknown one before any run, whether it runs in one process or as an executor's tasks."""
    resolved = [resolve_alias(p) for p in policies]
    unknown = [p for p in resolved if p not in available]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; available: {', '.join(available)}")
    return resolved


def compare(scenario: Scenario, policies: Sequence[str], rates: Sequence[float], horizon: float, seed: int = 0,
            on_run_done: Callable[[PolicyRun], None] | None = None, *, seeds: Sequence[int] | None = None,
            factories: Mapping[str, PolicyFactory] | None = None,
            sees_output_lengths: Collection[str] = SEES_OUTPUT_LENGTHS,
            engine: EngineFactory | None = None, with_sim: bool = False) -> Comparison:
    """Run every policy at every rate on the arrivals of every seed (``seeds``, default ``[seed]``).

    ``factories`` adds policies beyond the baselines (a trained agent: ``{"agent": factory}``); those named
    in ``sees_output_lengths`` run with output lengths visible. ``on_run_done`` is called after each run.

    ``engine`` builds the engine of each run from its scenario (default: the scenario's simulator); a
    live backend passes its own, and its rows carry ``backend``. With ``with_sim`` each live run is
    followed by the simulator's run of the same policy on the same arrivals, as the policy named
    ``<policy> (sim)``: the simulator's prediction beside each live row.
    """
    available = {**POLICIES, **(factories or {})}
    policies = known_policies(policies, available)
    if not rates:
        raise ConfigError("the sweep needs at least one rate")
    seeds = list(seeds) if seeds is not None else [seed]
    if not seeds:
        raise ConfigError("the comparison needs at least one seed")
    runs, fluids = [], {}
    for rate in rates:
        at_rate = scenario.at_rate(rate)
        for arrival_seed in seeds:
            # Every run reads its own stream of the seed's arrivals (drawn as read: memory bounded by the
            # requests in the system); the benchmarks read one more.
            fluid = at_rate.fluid(at_rate.chunks(horizon, arrival_seed), horizon)
            fluids.setdefault(rate, fluid)
            realised = realised_fluid(at_rate, at_rate.chunks(horizon, arrival_seed), horizon, fluid)
            for name in policies:
                setting = replace(at_rate, output_lengths_known=name in sees_output_lengths)
                backends = [(name, engine, "live")] if engine is not None else [(name, None, None)]
                if engine is not None and with_sim:
                    backends.append((name + SIM_SUFFIX, None, "sim"))
                for label, make_engine, backend in backends:
                    done = _one_run(label, available[name](setting, horizon),
                                    make_engine(setting) if make_engine else setting.engine(),
                                    at_rate.chunks(horizon, arrival_seed), horizon, fluid, realised, rate,
                                    arrival_seed, backend)
                    runs.append(done)
                    if on_run_done is not None:
                        on_run_done(done)
    names = tuple(label for name in policies
                  for label in ([name, name + SIM_SUFFIX] if engine is not None and with_sim else [name]))
    return Comparison(runs, fluids, horizon, names, tuple(rates), tuple(seeds))


def merge_comparisons(parts: Sequence[Comparison], policies: Sequence[str], rates: Sequence[float],
                      seeds: Sequence[int], horizon: float, failed: Sequence[dict[str, object]] = ()) -> Comparison:
    """One comparison from the comparisons of parts of a sweep (each some of its rates and seeds, run apart: on
    an executor's workers), as :func:`compare` would give it in one call: runs ordered by rate, seed and policy in
    the orders given, each rate's fluid from its first seed. ``failed`` names the parts that failed at run time; a
    rate none of whose parts ran is left out."""
    runs = [run for part in parts for run in part.runs]
    rate_index = {rate: i for i, rate in enumerate(rates)}
    seed_index = {seed: i for i, seed in enumerate(seeds)}
    policy_index = {policy: i for i, policy in enumerate(policies)}
    runs.sort(key=lambda r: (rate_index[r.rate], seed_index[r.seed], policy_index[r.policy]))
    fluid = {}
    for part in sorted(parts, key=lambda p: seed_index[p.seeds[0]]):
        for rate, solution in part.fluid.items():
            fluid.setdefault(rate, solution)
    return Comparison(runs, fluid, horizon, tuple(policies), tuple(rate for rate in rates if rate in fluid),
                      tuple(seeds), failed=tuple(failed))


def realised_fluid(scenario: Scenario, arrivals: Arrivals | Iterable[Arrivals], horizon: float,
                   offered: FluidSolution) -> FluidSolution:
    """The fluid optimum for the requests that actually arrived (whole, or a stream of chunks): each (prompt,
    output) pair at its realised rate (count / horizon). Regret against it removes the arrival noise of the
    sample. A trace's benchmark is already its realised one."""
    if scenario.trace is not None:
        return offered
    mix = TypeMix.from_arrivals([arrivals] if isinstance(arrivals, Arrivals) else arrivals, horizon)
    if mix is None:  # nothing arrived
        return offered
    return solve_fluid(mix, scenario.cost, scenario.paged_capacity_tokens)


def _one_run(label: str, policy: Policy, engine: Engine, arrivals: Arrivals | Iterable[Arrivals], horizon: float,
             fluid: FluidSolution, realised: FluidSolution, rate: float, seed: int, backend: str | None) -> PolicyRun:
    recorder = TimeSeriesRecorder()
    try:
        result = run(engine, policy, arrivals, horizon, callbacks=[recorder])
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()  # a live engine's memory goes back before the next run starts one
    return policy_run(label, result, recorder.arrays(), fluid, realised, rate, seed, backend)


def policy_run(label: str, result: RunResult, series: dict[str, np.ndarray], fluid: FluidSolution,
               realised: FluidSolution, rate: float, seed: int, backend: str | None = None) -> PolicyRun:
    """A comparison's run of ``label`` from what the run left (``result``, its time series): the row every report
    reads (:func:`~llmsched_env.metrics.summarize` against ``fluid``, the realised regret against ``realised``)
    and the regret curve. ``backend`` (``live``, ``sim``, ``serve``) is stated in the row with the mean iteration
    time, where the run's engine time is known."""
    row = {"policy": label, "rate_rps": rate, **summarize(result, fluid), "seed": seed}
    row["fluid_realised_throughput_rps"] = realised.throughput_rps
    row["regret_realised_requests"] = realised.throughput_rps * result.horizon - int(row["completed"])  # type: ignore[call-overload]
    if backend is not None:
        row["backend"] = backend
        row["mean_iteration_s"] = (result.busy_time / result.iterations if result.iterations and result.busy_time > 0
                                   else None)
    return PolicyRun(label, rate, row, regret_curve(result, fluid), series, result.capacity_blocks, seed)
