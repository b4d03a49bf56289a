"""What sizing from the arrivals can do for Nested-WAIT-adaptive over an hour of bursts with lengths hidden.

Over an hour at ρ 0.9 the shipped generalist's hidden-length base (``nested-wait-adaptive-margin-stall-free``) falls
behind the oracle (Nested WAIT with the offered rates) on bursty traffic, and behind vLLM on the conversation
workload: its thresholds are sized for a 60 s estimate of the arrival rate, and with the offered rate in the
estimate's place its run is the oracle's (docs/agents.md, "Over an hour"). The cost of a wrong rate is lopsided (a
rate a few percent low costs a backlog's throughput, one above it little), so this script sizes the same base on more
than its estimate and judges each sizing as the judging table judges an agent (:func:`agents.judge.verdict`: paired
over the seeds against the cell's best baseline, throughput within 1 % and p99 within 5 %). A sizing is
``WINDOWxMARGIN`` (``MARGIN`` times a ``WINDOW``-second estimate), ``WINDOW|FLOORxMARGIN`` (the larger of the
``WINDOW``-second estimate and ``MARGIN`` times a ``FLOOR``-second one), either with ``+backlog`` (the queue beyond
10 s of estimated arrivals spread over 60 s on top, as ``nested-wait-adaptive-margin-backlog-stall-free``); ``60x1``
is the base itself. Each sized base runs through its Python rule (its compiled loop sizes on the plain estimate;
the rule decides as the loop does, tests/test_compiled_policies.py), so ``60x1`` gives the preset's run to the digit.

The seeds are validation seeds (never the judging table's held-out ones).

Run:  python benchmarks/hour_sizing.py [--cells bursty-high-hidden@0.9,...] [--sizings 60x1.1,60|3600x1.1+backlog]
      [--seeds 1000..1009] [--horizon 3600] [--jobs N]
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, NamedTuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from agents.judge import HIDDEN_BASELINES, cell_scenario, default_data_dir, named_cells, verdict  # noqa: E402
from baselines.adaptive import BACKLOG_DRAIN_S, AdaptiveNestedWaitPolicy  # noqa: E402
from baselines.compare import compare  # noqa: E402
from baselines.stall_free import DRAIN_ITERATIONS, SARATHI_TOKEN_BUDGET  # noqa: E402
from llmsched_env.cli import parse_seeds  # noqa: E402
from llmsched_env.engine import SchedulerState  # noqa: E402
from llmsched_env.errors import ConfigError  # noqa: E402
from llmsched_env.executor import LocalExecutor  # noqa: E402
from llmsched_env.policy import CompiledLoop, Policy  # noqa: E402
from llmsched_env.rate_estimate import ArrivalRateEstimator  # noqa: E402

#: The hour-long cells where the shipped generalist is worse (its hidden-length base's figures).
HIDDEN_HOUR_CELLS = ("bursty-high-hidden@0.9", "bursty-low-hidden@0.9", "azure-conv-like-hidden@0.9")
#: The sizings of docs/agents.md's table ("Sizing above the estimate").
SIZINGS = ("60x1", "60x1.1", "60x1.25", "3600x1.1", "3600x1.25", "60|3600x1", "60|3600x1.1", "60|3600x1.1+backlog")
BASE = "nested-wait-adaptive-margin-stall-free"


class Sizing(NamedTuple):
    """The rate a sized base solves its thresholds for (see the module docstring)."""

    window_s: float
    margin: float
    floor_window_s: float  # 0: none, the margin multiplies the window's estimate
    backlog: bool

    @classmethod
    def parse(cls, text: str) -> "Sizing":
        found = re.fullmatch(r"(\d+(?:\.\d+)?)(?:\|(\d+(?:\.\d+)?))?x(\d+(?:\.\d+)?)(\+backlog)?", text.strip())
        if found is None:
            raise ConfigError(f"--sizings: {text!r} is not WINDOWxMARGIN or WINDOW|FLOORxMARGIN (seconds, a factor "
                              f">= 1), optionally +backlog; e.g. 60x1.1, 60|3600x1.1+backlog")
        window, floor, margin, backlog = found.groups()
        sizing = cls(float(window), float(margin), float(floor or 0.0), backlog is not None)
        if not (sizing.window_s > 0 and sizing.margin >= 1 and math.isfinite(sizing.margin)):
            raise ConfigError(f"--sizings: {text!r}: the window must be > 0 s and the margin a factor >= 1")
        return sizing


class SizedRate:
    """A :class:`Sizing` in place of an adaptive policy's sizing rate: its learning's ``sizing_rate`` replaced on
    the instance, the floor's estimate fed from the same observations and reset with it."""

    def __init__(self, learning: Any, sizing: Sizing) -> None:
        self.sizing = sizing
        self.plain_rate, self.plain_observe, self.plain_reset = learning.sizing_rate, learning.observe, learning.reset
        self.learning = learning
        self.floor: ArrivalRateEstimator | None = None
        learning.sizing_rate, learning.observe, learning.reset = self.rate, self.observe, self.reset

    def reset(self) -> None:
        self.plain_reset()
        if self.sizing.floor_window_s > 0:
            self.floor = ArrivalRateEstimator(self.sizing.floor_window_s)

    def observe(self, state: SchedulerState) -> None:
        if self.floor is not None:
            self.floor.update(state.now, state.arrival_time[np.arange(self.learning.seen, state.num_requests)])
        self.plain_observe(state)

    def rate(self, waiting: int) -> float:
        """The total rate the thresholds are sized for, with ``waiting`` requests queued."""
        rate = self.plain_rate(waiting)
        return self.sizing.margin * rate if self.floor is None else max(rate, self.sizing.margin * self.floor.total)


class PythonRule(AdaptiveNestedWaitPolicy):
    """Nested-WAIT-adaptive deciding through :meth:`decide` only: its compiled loop sizes on the plain estimate."""

    def compiled_loop(self) -> CompiledLoop | None:
        return None


def sized_base(scenario: Any, horizon: float, sizing: Sizing) -> Policy:
    """The shipped generalist's hidden-length base (``nested-wait-adaptive-margin-stall-free``) on ``sizing``."""
    policy = PythonRule.create(scenario.cost, scenario.paged_capacity_tokens, scenario.block_size, horizon_s=horizon,
                               token_budget=SARATHI_TOKEN_BUDGET, drain_iterations=DRAIN_ITERATIONS,
                               adaptive_margin=True, window_s=sizing.window_s,
                               backlog_drain_s=BACKLOG_DRAIN_S if sizing.backlog else 0.0)
    SizedRate(policy.learning, sizing)
    return policy


def one_run(cell: dict[str, Any], label: str, seed: int) -> dict[str, Any]:
    """The row of one run (a baseline by name, or a sizing by its text) on ``cell``'s arrivals of ``seed``, as
    :func:`~baselines.compare.compare` writes it."""
    scenario = cell_scenario(cell)
    factories = {} if label in HIDDEN_BASELINES else {
        label: lambda setting, horizon: sized_base(setting, horizon, Sizing.parse(label))}
    comparison = compare(scenario, [label], [scenario.base_rate], cell["horizon"], seeds=[seed], factories=factories,
                         sees_output_lengths=frozenset())
    return comparison.runs[0].row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(HIDDEN_HOUR_CELLS), help="WORKLOAD@LOAD,... (lengths hidden)")
    parser.add_argument("--sizings", default=",".join(SIZINGS))
    parser.add_argument("--seeds", default="1000..1009")
    parser.add_argument("--horizon", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default every core)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    try:
        cells = named_cells(args.cells, default_data_dir(), horizon=args.horizon)
        sizings = [text.strip() for text in args.sizings.split(",")]
        for text in sizings:
            Sizing.parse(text)
        known = [cell["workload"] for cell in cells if cell["known"]]
        if known:
            raise ConfigError(f"--cells: {known[0]} shows output lengths; this script sizes the hidden-length base")
    except ConfigError as error:
        parser.error(str(error))
    executor = LocalExecutor(args.jobs)
    labels = [*HIDDEN_BASELINES, *sizings]
    for cell in cells:
        tasks = [(cell, label, seed) for label in labels for seed in seeds]
        done = executor.map(one_run, tasks)
        rows: dict[str, dict[int, dict[str, Any]]] = {}
        for (_, label, seed), row in zip(tasks, done):
            rows.setdefault(label, {})[seed] = row
        print(f"{cell['workload']} at ρ {cell['load']:g} ({cell['horizon']:g} s, seeds {args.seeds}): "
              f"throughput req/s / p99 s against the best baseline")
        for sizing in sizings:
            found = verdict(cell, {**rows, "agent": rows[sizing]}, HIDDEN_BASELINES)
            print(f"    {sizing:22s} {found['throughput_diff_rps']:+.3f} ± {found['throughput_diff_ci95']:.3f} / "
                  f"{found['p99_diff_s']:+.2f} ± {found['p99_diff_ci95']:.2f}  {found['verdict']:6s} "
                  f"{found['decided_by'] or '':12s} (against {found['best_baseline']}: "
                  f"{found['best_throughput_rps']:.3f} req/s, p99 {found['best_p99_latency_s']:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
