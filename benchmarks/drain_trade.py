"""What the stall-free presets' draining budget trades: the p99 of the cells that pull it either way, drain by drain.

``wait-adaptive-stall-free`` and ``nested-wait-adaptive-stall-free`` batch their admissions under Sarathi's 2,048-token
budget, raised to prefill the queue's prompts within ``D`` iterations when they would take longer
(:func:`baselines.stall_free.backlog_budget`; ``DRAIN_ITERATIONS`` is ``D``). The raise pays where the queue's wait
makes the tail (the diurnal day's peak) and costs where decodes do (a heavy-tailed output mix: a larger iteration
stretches every step of a long decode). This script runs both presets at every ``D`` beside Sarathi on the same
arrivals and prints, per cell:

* the mean throughput and p99 of each (``D = 0``: the fixed budget; ``whole``: whole prefills, no budget);
* who makes the tail: for the 1 % slowest completed requests of each run, their mean output length, their mean
  time to first token (the queue's wait and the prefill) and their mean decode time (first token to the last).

The default cells are the two the presets' ``D`` was chosen between and the code workload's overload, whose
throughput the raise gives back; the seeds are validation seeds (never the judging table's held-out ones).

Run:  python benchmarks/drain_trade.py [--cells diurnal@0.8,...] [--drains 0,64,128] [--seeds 1000..1003] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from agents.judge import cell_scenario, default_data_dir, named_cells  # noqa: E402
from baselines import make_policy  # noqa: E402
from baselines.adaptive import AdaptiveNestedWaitPolicy, AdaptiveWaitPolicy  # noqa: E402
from baselines.stall_free import DRAIN_ITERATIONS, LATENCY_ORDER, SARATHI_TOKEN_BUDGET  # noqa: E402
from llmsched_env.cli import parse_seeds  # noqa: E402
from llmsched_env.errors import ConfigError  # noqa: E402
from llmsched_env.executor import LocalExecutor  # noqa: E402
from llmsched_env.metrics import slowest_requests  # noqa: E402
from llmsched_env.policy import Policy  # noqa: E402
from llmsched_env.runner import run  # noqa: E402
from llmsched_env.scenario import Scenario  # noqa: E402

DEFAULT_CELLS = ("diurnal@0.8", "azure-code-like@0.6", "azure-code-like@0.9")
DEFAULT_DRAINS = (0, 48, 64, 96, DRAIN_ITERATIONS, 192, 256)
#: The share of the slowest completed requests whose make-up is reported (the p99's).
TAIL_SHARE = 0.01
#: ``drain`` value that stands for whole prefills (no token budget at all).
WHOLE = -1


def preset(base: str, scenario: Scenario, horizon: float, drain: int) -> Policy:
    """``base``'s stall-free preset (``wait-adaptive`` or ``nested-wait-adaptive``) at drain ``drain``, built as
    :data:`baselines.POLICIES` builds it; :data:`WHOLE` prefills whole."""
    budget = 0 if drain == WHOLE else SARATHI_TOKEN_BUDGET
    drain = max(drain, 0)
    if base == "wait-adaptive":
        return AdaptiveWaitPolicy.create(scenario.cost, scenario.capacity_tokens, scenario.block_size,
                                         token_budget=budget, drain_iterations=drain,
                                         latency_order_weight=LATENCY_ORDER)
    return AdaptiveNestedWaitPolicy.create(scenario.cost, scenario.paged_capacity_tokens, scenario.block_size,
                                           horizon_s=horizon, token_budget=budget, drain_iterations=drain)


def one_run(cell: dict[str, Any], base: str, drain: int, seed: int) -> dict[str, float]:
    """One run on ``cell``'s arrivals of ``seed`` (``base`` ``"sarathi"``: Sarathi itself): throughput, p99 and
    the make-up of its slowest :data:`TAIL_SHARE` of completed requests."""
    scenario = cell_scenario(cell)
    horizon = cell["horizon"]
    policy = make_policy("sarathi", scenario, horizon) if base == "sarathi" else preset(base, scenario, horizon, drain)
    result = run(scenario.engine(), policy, scenario.chunks(horizon, seed), horizon, keep_records=True)
    records = result.records
    done = np.isfinite(records.finish_time)
    latency = (records.finish_time - records.arrival_time)[done]
    tail = slowest_requests(records, TAIL_SHARE)
    return {"throughput": float(done.sum()) / horizon, "p99": float(np.quantile(latency, 0.99)),
            "tail_output": tail["output_len"], "tail_first": tail["first_token_s"], "tail_decode": tail["decode_s"]}


def _label(drain: int) -> str:
    return "whole" if drain == WHOLE else "fixed" if drain == 0 else f"D = {drain}"


def report(cell: dict[str, Any], rows: Sequence[tuple[str, int]], runs: Sequence[dict[str, float]],
           seeds: int) -> None:
    """One cell's table: a row per (policy, drain), means over the seeds."""
    print(f"\n{cell['workload']} at ρ {cell['load']:g} ({cell['horizon']:g} s, {seeds} seeds); the slowest "
          f"{TAIL_SHARE:.0%} of completed requests: mean output tokens, first token s, decode s")
    print("| policy | drain | throughput req/s | p99 s | tail output | tail first token s | tail decode s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for index, (base, drain) in enumerate(rows):
        mine = runs[index * seeds:(index + 1) * seeds]
        mean = {key: float(np.mean([r[key] for r in mine])) for key in mine[0]}
        print(f"| {base} | {'–' if base == 'sarathi' else _label(drain)} | {mean['throughput']:.3f} | "
              f"{mean['p99']:.2f} | {mean['tail_output']:.0f} | {mean['tail_first']:.1f} | "
              f"{mean['tail_decode']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS), help="WORKLOAD@LOAD,...")
    parser.add_argument("--drains", default=",".join(str(d) for d in DEFAULT_DRAINS),
                        help="drain iterations D,... (0: the fixed budget)")
    parser.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True,
                        help="also whole prefills (no token budget)")
    parser.add_argument("--seeds", default="1000..1003")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default every core)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    drains = [int(d) for d in args.drains.split(",") if d.strip().isdigit()]
    if len(drains) != len(args.drains.split(",")):
        parser.error(f"--drains: each must be 0 (the fixed budget) or a positive number of iterations, "
                     f"got {args.drains}")
    drains += [WHOLE] if args.whole else []
    try:
        cells = named_cells(args.cells, default_data_dir())
    except ConfigError as error:
        parser.error(str(error))
    executor = LocalExecutor(args.jobs)
    for cell in cells:
        bases = ("wait-adaptive", "nested-wait-adaptive") if cell["known"] else ("nested-wait-adaptive",)
        rows = [("sarathi", 0)] + [(base, drain) for base in bases for drain in drains]
        tasks = [(cell, base, drain, seed) for base, drain in rows for seed in seeds]
        report(cell, rows, executor.map(one_run, tasks), len(seeds))


if __name__ == "__main__":
    main()
