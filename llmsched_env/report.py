"""Reports of a comparison: a terminal table, CSV, JSON, and PNG plots.

Plots (matplotlib, Agg): throughput against arrival rate with the fluid optimum as a line; latency
against rate; and, at every rate (one panel each), regret, KV memory in use and queue length over time.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from llmsched_env.fluid import FluidSolution
from llmsched_env.metrics import RegretCurve, json_safe

#: The fields every row of ``llmsched compare --json`` carries first (more follow; see README).
ROW_FIELDS = ("policy", "rate_rps", "arrived", "completed", "throughput_rps", "fluid_throughput_rps",
              "regret_requests", "mean_latency_s", "p99_latency_s", "mean_ttft_s", "evictions", "peak_memory_frac")


@dataclass(frozen=True)
class PolicyRun:
    """One (policy, rate) run: its summary row, regret curve and per-iteration series."""

    policy: str
    rate: float
    row: dict[str, object]
    regret: RegretCurve
    series: dict[str, np.ndarray]
    capacity_blocks: int


@dataclass(frozen=True)
class Comparison:
    """All runs of a sweep, and the fluid benchmark at each rate."""

    runs: list[PolicyRun]
    fluid: dict[float, FluidSolution]
    horizon: float
    policies: tuple[str, ...]
    rates: tuple[float, ...]

    @property
    def rows(self) -> list[dict[str, object]]:
        """One row per (policy, rate): :data:`ROW_FIELDS` first, then the other summary fields."""
        ordered = []
        for run in self.runs:
            row = {field: run.row[field] for field in ROW_FIELDS}
            row.update({k: v for k, v in run.row.items() if k not in row})
            ordered.append(row)
        return ordered


def _fmt(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# (compact terminal header, Markdown header) of the columns both tables show, in order.
_COLUMNS = (("rate", "rate req/s"), ("policy", "policy"), ("thrpt", "throughput req/s"), ("Θ*", "fluid Θ*"),
            ("regret", "regret (req)"), ("lat", "mean latency s"), ("p99", "p99 latency s"),
            ("TTFT", "mean TTFT s"), ("evict", "evictions"), ("mem", "peak memory"))
_LATENCY, _EVICTIONS = 5, 8  # the columns the terminal table highlights


def _cells(run: PolicyRun) -> list[str]:
    """One run's row, formatted: the same figures in the terminal and in Markdown."""
    r = run.row
    return [f"{run.rate:.2f}", run.policy, _fmt(r["throughput_rps"]), _fmt(r["fluid_throughput_rps"]),
            _fmt(r["regret_requests"], 0), _fmt(r["mean_latency_s"], 1), _fmt(r["p99_latency_s"], 1),
            _fmt(r["mean_ttft_s"], 2), _fmt(r["evictions"]), f"{r['peak_memory_frac']:.0%}"]


def table(comparison: Comparison) -> Table:
    """The comparison as a rich table, grouped by rate; the lowest mean latency of each rate in green."""
    result = Table(title=f"Policies against the fluid optimum, {comparison.horizon:g} s per run",
                   caption="rates and throughputs in req/s, latencies in s; regret = Θ*·T − completed",
                   padding=(0, 1))
    for header, _ in _COLUMNS:
        result.add_column(header, justify="left" if header == "policy" else "right", no_wrap=True)
    for index, rate in enumerate(comparison.rates):
        runs = [r for r in comparison.runs if r.rate == rate]
        best = min((r.row["mean_latency_s"] for r in runs if r.row["mean_latency_s"] is not None), default=None)
        for run in runs:
            cells = _cells(run)
            if run.row["mean_latency_s"] == best:
                cells[_LATENCY] = f"[bold green]{cells[_LATENCY]}[/]"
            if run.row["evictions"]:
                cells[_EVICTIONS] = f"[red]{cells[_EVICTIONS]}[/]"
            result.add_row(*cells)
        if index < len(comparison.rates) - 1:
            result.add_section()
    return result


def to_markdown(comparison: Comparison) -> str:
    """The comparison as a Markdown table (for READMEs and pull requests)."""
    lines = ["| " + " | ".join(header for _, header in _COLUMNS) + " |",
             "| " + " | ".join("---" if header == "policy" else "---:" for header, _ in _COLUMNS) + " |"]
    lines += ["| " + " | ".join(_cells(run)) + " |" for run in comparison.runs]
    return "\n".join(lines) + "\n"


def write_csv(comparison: Comparison, path: Path) -> None:
    rows = comparison.rows
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in json_safe(row).items()})  # type: ignore[union-attr]


def to_json(comparison: Comparison) -> dict[str, object]:
    return json_safe({
        "horizon_s": comparison.horizon,
        "policies": list(comparison.policies),
        "rates_rps": list(comparison.rates),
        "fluid": {str(rate): solution.summary() for rate, solution in comparison.fluid.items()},
        "rows": comparison.rows,
    })  # type: ignore[return-value]


def write_json(comparison: Comparison, path: Path) -> None:
    path.write_text(json.dumps(to_json(comparison), indent=2) + "\n")


def plot(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Write the PNG plots into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {policy: f"C{i}" for i, policy in enumerate(comparison.policies)}
    rates = np.array(comparison.rates)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    fluid = [comparison.fluid[r].throughput_rps for r in comparison.rates]
    axes[0].plot(rates, fluid, "k--", lw=2, label="fluid optimum Θ*")
    axes[0].plot(rates, rates, ":", color="grey", label="offered rate")
    for policy in comparison.policies:
        runs = [r for r in comparison.runs if r.policy == policy]
        axes[0].plot([r.rate for r in runs], [r.row["throughput_rps"] for r in runs], "o-", color=colors[policy],
                     label=policy)
        axes[1].plot([r.rate for r in runs], [r.row["mean_latency_s"] for r in runs], "o-", color=colors[policy],
                     label=f"{policy} mean")
        axes[1].plot([r.rate for r in runs], [r.row["p99_latency_s"] for r in runs], "s--", color=colors[policy],
                     alpha=0.5, label=f"{policy} p99")
    axes[0].set(xlabel="arrival rate (req/s)", ylabel="throughput (req/s)", title="Throughput against the fluid optimum")
    axes[1].set(xlabel="arrival rate (req/s)", ylabel="end-to-end latency (s)", title="Latency", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    def over_time(filename: str, title: str, ylabel: str, values) -> None:  # type: ignore[no-untyped-def]
        fig, axes = plt.subplots(1, len(rates), figsize=(3.6 * len(rates), 3.6), squeeze=False, sharey=False)
        for ax, rate in zip(axes[0], comparison.rates):
            for run in (r for r in comparison.runs if r.rate == rate):
                x, y = values(run)
                ax.plot(x, y, color=colors[run.policy], label=run.policy, lw=1.2)
            ax.set(title=f"{rate:g} req/s", xlabel="time (s)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        paths.append(out_dir / filename)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    over_time("regret.png", "Regret against the fluid optimum: Θ*·t − completions(t)", "requests",
              lambda run: (run.regret.time, run.regret.regret_requests))
    over_time("memory.png", "KV memory in use", "fraction of capacity",
              lambda run: (run.series["time"], run.series["kv_blocks_used"] / run.capacity_blocks))
    over_time("queue.png", "Queue length (waiting requests)", "requests",
              lambda run: (run.series["time"], run.series["waiting"]))
    return paths
