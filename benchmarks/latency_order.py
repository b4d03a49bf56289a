"""What serving the admissions by projected latency buys: WAIT-adaptive's stall-free preset at each latency order.

With output lengths known, ``wait-adaptive-stall-free`` serves the admissions its budget has room for by projected
latency, largest first (:func:`baselines.stall_free.latency_order`): the arrival time less the remaining output at
``w`` times the last iteration's seconds per token (``LATENCY_ORDER`` is ``w``; 0 is queue order). Where outputs
are heavy-tailed, the tail is the long outputs: in queue order one admitted behind short ones starts its decode last.
This script runs the preset at every ``w`` beside Sarathi on the same arrivals and prints, per cell:

* the mean throughput, p99 and censored p99 (every arrival, an unfinished one at its age) of each;
* who makes the tail: for the 1 % slowest completed requests of each run, their mean output length, their mean
  time to first token (the queue's wait and the prefill) and their mean decode time (first token to the last).

The default cells are those where the order moves the p99 (the heavy-tailed code workload and trace) and two where
every policy serves the load; the seeds are validation seeds (never the judging table's held-out ones).

Run:  python benchmarks/latency_order.py [--cells azure-code-like@0.6,azure-code-trace@0.9,...] [--weights 0,1,2,4]
          [--seeds 1000..1009] [--jobs N]
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from agents.judge import cell_scenario, default_data_dir, named_cells  # noqa: E402
from baselines import make_policy  # noqa: E402
from baselines.adaptive import AdaptiveWaitPolicy  # noqa: E402
from baselines.stall_free import DRAIN_ITERATIONS, LATENCY_ORDER, SARATHI_TOKEN_BUDGET  # noqa: E402
from llmsched_env.cli import parse_seeds  # noqa: E402
from llmsched_env.errors import ConfigError  # noqa: E402
from llmsched_env.executor import LocalExecutor  # noqa: E402
from llmsched_env.metrics import slowest_requests  # noqa: E402
from llmsched_env.policy import Policy  # noqa: E402
from llmsched_env.runner import run  # noqa: E402
from llmsched_env.scenario import Scenario  # noqa: E402

DEFAULT_CELLS = ("azure-code-like@0.6", "azure-code-like@0.8", "azure-code-like@0.9", "azure-code-trace@0.8",
                 "azure-code-trace@0.9", "diurnal@0.6", "paper-two-type-512@0.95")
DEFAULT_WEIGHTS = (0.0, 1.0, LATENCY_ORDER, 4.0)
#: The share of the slowest completed requests whose make-up is reported (the p99's).
TAIL_SHARE = 0.01
#: ``weight`` value that stands for Sarathi itself.
SARATHI = -1.0


def preset(scenario: Scenario, weight: float) -> Policy:
    """``wait-adaptive-stall-free`` as :data:`baselines.POLICIES` builds it, at latency order ``weight``."""
    return AdaptiveWaitPolicy.create(scenario.cost, scenario.capacity_tokens, scenario.block_size,
                                     token_budget=SARATHI_TOKEN_BUDGET, drain_iterations=DRAIN_ITERATIONS,
                                     latency_order_weight=weight)


def one_run(cell: dict[str, Any], weight: float, seed: int) -> dict[str, float]:
    """One run on ``cell``'s arrivals of ``seed`` (``weight`` :data:`SARATHI`: Sarathi itself): throughput, p99,
    censored p99 and the make-up of its slowest :data:`TAIL_SHARE` of completed requests."""
    scenario = cell_scenario(cell)
    horizon = cell["horizon"]
    policy = make_policy("sarathi", scenario, horizon) if weight == SARATHI else preset(scenario, weight)
    result = run(scenario.engine(), policy, scenario.chunks(horizon, seed), horizon, keep_records=True)
    records = result.records
    done = np.isfinite(records.finish_time)
    latency = (records.finish_time - records.arrival_time)[done]
    tail = slowest_requests(records, TAIL_SHARE)
    censored = result.completions.distributions()["censored_latency"]  # what the judging table reads
    return {"throughput": float(done.sum()) / horizon, "p99": float(np.quantile(latency, 0.99)),
            "censored_p99": float(censored.p99),
            "tail_output": tail["output_len"], "tail_first": tail["first_token_s"], "tail_decode": tail["decode_s"]}


def report(cell: dict[str, Any], weights: Sequence[float], runs: Sequence[dict[str, float]], seeds: int) -> None:
    """One cell's table: a row per policy and weight, means over the seeds."""
    print(f"\n{cell['workload']} at ρ {cell['load']:g} ({cell['horizon']:g} s, {seeds} seeds); the slowest "
          f"{TAIL_SHARE:.0%} of completed requests: mean output tokens, first token s, decode s")
    print("| policy | latency order | throughput req/s | p99 s | censored p99 s | tail output | tail first token s | "
          "tail decode s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for index, weight in enumerate(weights):
        mine = runs[index * seeds:(index + 1) * seeds]
        mean = {key: float(np.mean([r[key] for r in mine])) for key in mine[0]}
        name, order = ("sarathi", "–") if weight == SARATHI else (
            "wait-adaptive-stall-free", "queue" if weight == 0 else f"w = {weight:g}")
        print(f"| {name} | {order} | {mean['throughput']:.3f} | {mean['p99']:.2f} | {mean['censored_p99']:.2f} | "
              f"{mean['tail_output']:.0f} | {mean['tail_first']:.1f} | {mean['tail_decode']:.1f} |", flush=True)


def parse_cells(text: str, parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """``WORKLOAD@LOAD,...``: suite scenarios with known lengths, or the real traces (``azure-code-trace``)."""
    try:
        cells = named_cells(text, default_data_dir())
    except ConfigError as error:
        parser.error(str(error))
    for cell in cells:
        if not cell["known"]:
            parser.error(f"--cells: {cell['workload']}@{cell['load']:g} hides the output lengths; the latency order "
                         "needs them known")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS), help="WORKLOAD@LOAD,...")
    parser.add_argument("--weights", default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
                        help="latency orders w,... (0: queue order)")
    parser.add_argument("--seeds", default="1000..1009")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default every core)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
        parser.error(f"--weights: each must be 0 (queue order) or a finite positive weight, got {args.weights}")
    cells = parse_cells(args.cells, parser)
    executor = LocalExecutor(args.jobs)
    rows = [SARATHI, *weights]
    for cell in cells:
        tasks = [(cell, weight, seed) for weight in rows for seed in seeds]
        report(cell, rows, executor.map(one_run, tasks), len(seeds))


if __name__ == "__main__":
    main()
