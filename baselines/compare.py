"""The comparison job: every policy over a sweep of arrival rates on the simulated backend.

For each rate the same requests (same seed) are replayed to every policy, against the same fluid
optimum. Policies defined for known output lengths (WAIT) see them; every other policy runs with
lengths hidden, as a real engine would.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Collection, Mapping, Sequence

from baselines import POLICIES, PolicyFactory
from llmsched_env.errors import ConfigError
from llmsched_env.metrics import regret_curve, summarize
from llmsched_env.report import Comparison, PolicyRun
from llmsched_env.runner import TimeSeriesRecorder, run
from llmsched_env.scenario import Scenario

#: Policies that are defined with output lengths known at arrival.
SEES_OUTPUT_LENGTHS = frozenset({"wait", "wait-paper"})

DEFAULT_LOADS = (0.7, 0.85, 0.9, 0.93, 0.95, 0.97)


def default_rates(scenario: Scenario, loads: Sequence[float] = DEFAULT_LOADS) -> list[float]:
    """Total arrival rates at which the load ``ρ`` takes the given values (the mix's shares kept)."""
    return [round(scenario.rate_for_load(load), 3) for load in loads]


def compare(scenario: Scenario, policies: Sequence[str], rates: Sequence[float], horizon: float, seed: int = 0,
            on_run_done: Callable[[PolicyRun], None] | None = None, *, seeds: Sequence[int] | None = None,
            factories: Mapping[str, PolicyFactory] | None = None,
            sees_output_lengths: Collection[str] = SEES_OUTPUT_LENGTHS) -> Comparison:
    """Run every policy at every rate on the arrivals of every seed (``seeds``, default ``[seed]``).

    ``factories`` adds policies beyond the baselines (a trained agent: ``{"agent": factory}``); those named
    in ``sees_output_lengths`` run with output lengths visible. ``on_run_done`` is called after each run.
    """
    available = {**POLICIES, **(factories or {})}
    unknown = [p for p in policies if p not in available]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; available: {', '.join(available)}")
    if not rates:
        raise ConfigError("the sweep needs at least one rate")
    seeds = list(seeds) if seeds is not None else [seed]
    if not seeds:
        raise ConfigError("the comparison needs at least one seed")
    runs, fluids = [], {}
    for rate in rates:
        at_rate = scenario.at_rate(rate)
        for arrival_seed in seeds:
            arrivals = at_rate.sample(horizon, arrival_seed)
            fluid = at_rate.fluid(arrivals, horizon)
            fluids.setdefault(rate, fluid)
            for name in policies:
                setting = replace(at_rate, output_lengths_known=name in sees_output_lengths)
                recorder = TimeSeriesRecorder()
                result = run(setting.engine(), available[name](setting, horizon), arrivals, horizon,
                             callbacks=[recorder])
                summary = summarize(result, fluid)
                row = {"policy": name, "rate_rps": rate, **summary, "seed": arrival_seed}
                done = PolicyRun(name, rate, row, regret_curve(result, fluid), recorder.arrays(),
                                 result.capacity_blocks, arrival_seed)
                runs.append(done)
                if on_run_done is not None:
                    on_run_done(done)
    return Comparison(runs, fluids, horizon, tuple(policies), tuple(rates), tuple(seeds))
