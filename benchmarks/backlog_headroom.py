"""How much faster could any scheduler serve a cell's backlogs than its baselines do? A bound from the cost model.

Under the linear cost model (:mod:`llmsched_env.cost_model`) an iteration costs ``c0`` plus per-token and
per-request terms. Over a request's life those terms add up to the same work ``u`` under every schedule (its
memory-time ``w`` priced by ``c_kv`` included), unless it is evicted and its context recomputed. What a schedule
can shrink is therefore the fixed cost ``c0`` per iteration, and the recompute. An iteration holds at most ``C`` KV
tokens, so work that filled iterations to ``kv_i`` tokens could have run in ``Σ kv_i / C`` iterations at the least:
the iterations' fixed cost beyond that, ``c0 · Σ (1 − kv_i / C)``, is the most that fuller batches save.

This script counts both over the iterations that start with requests waiting (a backlog: work was there to fill
memory with), for each baseline of a judging cell on the same arrivals (:func:`agents.judge.judging_cells`), and
prints:

* ``backlog s``: engine time in those iterations; the p99 of a bursty cell is set by how fast they drain;
* ``c0 %``, ``memory %``: the share of it that is fixed cost, and the mean memory in use (``kv_i / C``);
* ``recompute %``: the share spent recomputing evicted requests' contexts (``c_pf`` per token);
* ``headroom %``: ``(c0 · Σ (1 − kv_i / C) + recompute) / backlog s``: no schedule serves those iterations' work
  faster than by this share. It is an upper bound (it assumes every such iteration could be full and none evicts).

The default cells are the bursty ones the judging table asks an agent to be better in; the seeds are validation
seeds (never the table's held-out ones).

Run:  python benchmarks/backlog_headroom.py [--cells bursty-high@0.8,...] [--seeds 1000..1009] [--horizon S]
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from agents.judge import HIDDEN_BASELINES, KNOWN_BASELINES, cell_scenario, default_data_dir, named_cells  # noqa: E402
from baselines import make_policy  # noqa: E402
from llmsched_env.cli import parse_seeds  # noqa: E402
from llmsched_env.engine import Engine, IterationOutcome  # noqa: E402
from llmsched_env.errors import ConfigError  # noqa: E402
from llmsched_env.executor import LocalExecutor  # noqa: E402
from llmsched_env.runner import run  # noqa: E402

#: The cells the judging table asks a generalist to be better in, bar the diurnal day's.
BURSTY_CELLS = ("bursty-high@0.8", "bursty-high@0.9", "bursty-low@0.9", "bursty-high-hidden@0.8",
                "bursty-high-hidden@0.9", "bursty-low-hidden@0.9")


class BacklogCounter:
    """An iteration callback that adds up, over iterations that start with requests waiting, their number, engine
    time, the fixed cost beyond full memory, the recompute and the memory they held."""

    def __init__(self, c0: float, c_pf: float, capacity_tokens: int) -> None:
        self.c0, self.c_pf, self.capacity = c0, c_pf, capacity_tokens
        self.waiting_before = 0
        self.iterations = 0
        self.seconds = self.beyond_full = self.recompute = self.memory = 0.0

    def __call__(self, engine: Engine, outcome: IterationOutcome) -> None:
        if self.waiting_before > 0:
            fullness = min(outcome.batch_kv_tokens / self.capacity, 1.0)
            self.iterations += 1
            self.seconds += outcome.duration
            self.beyond_full += self.c0 * (1.0 - fullness)
            self.memory += fullness
            if len(outcome.evicted):
                # An evicted request keeps its context length and prefills all of it again when readmitted.
                context = engine.state().context_len[outcome.evicted]
                self.recompute += self.c_pf * float(np.sum(context))
        self.waiting_before = engine.num_waiting


def count_backlog(cell: dict[str, Any], policy: str, seed: int) -> dict[str, float]:
    """One run of ``policy`` on ``cell``'s arrivals of ``seed``: its backlog iterations' sums and its p99."""
    scenario = cell_scenario(cell)  # in the cell's length setting
    cost = scenario.cost
    counter = BacklogCounter(cost.c0, cost.c_pf, scenario.paged_capacity_tokens)
    result = run(scenario.engine(), make_policy(policy, scenario, cell["horizon"]),
                 scenario.chunks(cell["horizon"], seed), cell["horizon"], callbacks=[counter])
    p99 = result.completions.distributions()["latency"].p99
    return {"seconds": counter.seconds, "fixed": cost.c0 * counter.iterations, "beyond_full": counter.beyond_full,
            "recompute": counter.recompute, "memory": counter.memory, "iterations": counter.iterations,
            "p99": float("nan") if p99 is None else p99}


def report(cell: dict[str, Any], policies: Sequence[str], runs: Sequence[dict[str, float]], seeds: int) -> None:
    print(f"{cell['workload']} at ρ {cell['load']:g} ({cell['horizon']:g} s, {seeds} seeds)")
    print(f"    {'policy':40s} {'backlog s':>9s} {'c0 %':>6s} {'memory %':>8s} {'recompute %':>11s} "
          f"{'headroom %':>10s} {'p99 s':>7s}")
    for p, policy in enumerate(policies):
        mine = runs[p * seeds:(p + 1) * seeds]
        total = {key: float(np.sum([r[key] for r in mine])) for key in mine[0]}
        seconds = max(total["seconds"], 1e-12)
        print(f"    {policy:40s} {total['seconds'] / seeds:9.1f} {100 * total['fixed'] / seconds:6.1f} "
              f"{100 * total['memory'] / max(total['iterations'], 1):8.1f} {100 * total['recompute'] / seconds:11.1f} "
              f"{100 * (total['beyond_full'] + total['recompute']) / seconds:10.1f} "
              f"{np.mean([r['p99'] for r in mine]):7.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(BURSTY_CELLS), help="WORKLOAD@LOAD,...")
    parser.add_argument("--seeds", default="1000..1009")
    parser.add_argument("--horizon", type=float, default=None, help="seconds per run (default: the scenario's)")
    parser.add_argument("--policies", default=None, help="default: the cell's judging baselines")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default every core)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    try:
        cells = named_cells(args.cells, default_data_dir(), horizon=args.horizon)
    except ConfigError as error:
        parser.error(str(error))
    executor = LocalExecutor(args.jobs)
    for cell in cells:
        policies = (args.policies.split(",") if args.policies
                    else list(KNOWN_BASELINES if cell["known"] else HIDDEN_BASELINES))
        tasks = [(cell, policy, seed) for policy in policies for seed in seeds]
        report(cell, policies, executor.map(count_backlog, tasks), len(seeds))


if __name__ == "__main__":
    main()
