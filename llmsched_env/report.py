"""Reports of a comparison: a terminal table, CSV, JSON, and PNG plots.

Plots (matplotlib, Agg): throughput against arrival rate with the fluid optimum as a line; latency
against rate; and, at every rate (one panel each), regret, KV memory in use and queue length over time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from rich.table import Table

from llmsched_env.fluid import FluidSolution
from llmsched_env.metrics import RegretCurve, json_document, json_safe

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
    seed: int = 0


@dataclass(frozen=True)
class Comparison:
    """All runs of a sweep, and the fluid benchmark at each rate."""

    runs: list[PolicyRun]
    fluid: dict[float, FluidSolution]
    horizon: float
    policies: tuple[str, ...]
    rates: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    reference: str | None = None  # the policy regret ratios are taken against (summaries over seeds)
    # The sweep's tasks that failed at run time (an engine fault), each what it was and its error; their runs are
    # missing, the others' are all here (llmsched_env.executor).
    failed: tuple[dict[str, object], ...] = ()
    # Sections a command adds to the JSON document beside the comparison's own, each under its key (bench-serve:
    # ``serving``, the served model, the SLO targets and each server's calibration).
    extra: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def first_seed_runs(self) -> list[PolicyRun]:
        """At each rate, the runs on the first seed's arrivals there are (what the time-series plots show)."""
        first: dict[float, int] = {}
        order = {seed: i for i, seed in enumerate(self.seeds)}
        for run in self.runs:
            if run.rate not in first or order.get(run.seed, len(order)) < order.get(first[run.rate], len(order)):
                first[run.rate] = run.seed
        return [r for r in self.runs if r.seed == first[r.rate]]

    def summary(self) -> list[dict[str, object]]:
        """Per (rate, policy): the mean over seeds of :data:`SUMMARY_FIELDS` with 95 % confidence half-widths,
        and the ratio of mean regrets to :attr:`reference` with a paired-bootstrap 95 % interval."""
        return self._summary

    @cached_property
    def _summary(self) -> list[dict[str, object]]:
        # The table, the Markdown, the JSON and the plots all read it: bootstrap once.
        return summarize_over_seeds(self)

    @property
    def rows(self) -> list[dict[str, object]]:
        """One row per (policy, rate): :data:`ROW_FIELDS` first, then the other summary fields."""
        ordered = []
        for run in self.runs:
            row = {field: run.row[field] for field in ROW_FIELDS}
            row.update({k: v for k, v in run.row.items() if k not in row})
            ordered.append(row)
        return ordered


#: The figures a summary over seeds reports (mean and 95 % confidence half-width of each).
SUMMARY_FIELDS = ("throughput_rps", "regret_requests", "regret_realised_requests", "mean_latency_s", "p99_latency_s",
                  "p99_censored_latency_s", "mean_ttft_s", "evictions")


def mean_and_halfwidth(values: np.ndarray) -> tuple[float, float]:
    """The mean and the half-width of its 95 % Student-t confidence interval (0 for a single value)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """``mean(numerator) / mean(denominator)`` and its paired-bootstrap 95 % interval (BCa, 2,000 resamples)."""
    from scipy import stats

    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    ratio = float(numerator.mean() / denominator.mean()) if denominator.mean() != 0 else float("nan")
    per_seed = numerator / np.where(denominator == 0, 1, denominator)
    if len(numerator) < 3 or not np.isfinite(ratio) or np.ptp(per_seed) == 0:
        return ratio, ratio, ratio  # too few seeds, or identical ratios (BCa is undefined on a constant sample)
    result = stats.bootstrap((numerator, denominator), lambda a, b, axis=-1: a.mean(axis) / b.mean(axis),
                             paired=True, vectorized=True, n_resamples=2000, confidence_level=0.95,
                             rng=np.random.default_rng(seed), method="BCa")
    low, high = result.confidence_interval
    return ratio, float(low), float(high)


def summarize_over_seeds(comparison: "Comparison") -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for rate in comparison.rates:
        at_rate = [r for r in comparison.runs if r.rate == rate]
        reference = {r.seed: r.row["regret_requests"] for r in at_rate if r.policy == comparison.reference}
        for policy in comparison.policies:
            runs = sorted((r for r in at_rate if r.policy == policy), key=lambda r: r.seed)
            row: dict[str, object] = {"policy": policy, "rate_rps": rate, "seeds": len(runs)}
            for field in SUMMARY_FIELDS:
                mean, half = mean_and_halfwidth(np.array([np.nan if r.row.get(field) is None else r.row[field]
                                                          for r in runs], dtype=float))
                row[field], row[f"{field}_ci95"] = mean, half
            if reference and len(reference) == len(runs):
                ratio, low, high = ratio_interval(np.array([r.row["regret_requests"] for r in runs], dtype=float),
                                                  np.array([reference[r.seed] for r in runs], dtype=float))
                row[f"regret_ratio_to_{comparison.reference}"] = ratio
                row["regret_ratio_ci95_low"], row["regret_ratio_ci95_high"] = low, high
            rows.append(row)
    return rows


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
    policy = run.policy if r.get("stalled_at_s") is None else f"{run.policy} (stalled at {r['stalled_at_s']:.0f} s)"
    return [f"{run.rate:.2f}", policy, _fmt(r["throughput_rps"]), _fmt(r["fluid_throughput_rps"]),
            _fmt(r["regret_requests"], 0), _fmt(r["mean_latency_s"], 1), _fmt(r["p99_latency_s"], 1),
            _fmt(r["mean_ttft_s"], 2), _fmt(r["evictions"]),
            "–" if r["peak_memory_frac"] is None else f"{r['peak_memory_frac']:.0%}"]  # None: not observed


def _summary_cells(row: dict[str, object], reference: str | None) -> list[str]:
    def pm(field: str, digits: int) -> str:
        return f"{_fmt(row[field], digits)} ± {_fmt(row[f'{field}_ci95'], digits)}"
    ratio = row.get(f"regret_ratio_to_{reference}")
    ratio_text = "–" if ratio is None else (f"{ratio:.3f} [{row['regret_ratio_ci95_low']:.3f}, "
                                            f"{row['regret_ratio_ci95_high']:.3f}]")
    cells = [f"{row['rate_rps']:.2f}", str(row["policy"]), pm("throughput_rps", 2), pm("regret_requests", 0),
             pm("regret_realised_requests", 0), pm("mean_latency_s", 1), pm("p99_latency_s", 1),
             pm("p99_censored_latency_s", 1), pm("evictions", 0)]
    return cells + [ratio_text] if reference is not None else cells


def _summary_headers(comparison: Comparison) -> list[str]:
    # The censored p99 counts a request unfinished at the horizon at its age then: beside the completed requests'
    # p99, it shows a policy that leaves its oldest requests waiting.
    headers = ["rate req/s", "policy", "throughput req/s", "regret (req)", "realised regret", "mean latency s",
               "p99 latency s", "censored p99 s", "evictions"]
    return headers + [f"regret ratio to {comparison.reference} [95% CI]"] if comparison.reference else headers


def summary_table(comparison: Comparison) -> Table:
    """Means over seeds with 95 % confidence half-widths, and the regret ratio to the reference."""
    result = Table(title=f"Means over {len(comparison.seeds)} seeds (± 95 % CI), {comparison.horizon:g} s per run",
                   caption="regret = Θ*·T − completed; realised: against the fluid optimum of the requests that "
                           "arrived; the ratio is of mean regrets, paired bootstrap interval",
                   padding=(0, 1))
    for header in _summary_headers(comparison):
        result.add_column(header, justify="left" if header == "policy" else "right", no_wrap=True)
    for row in comparison.summary():
        result.add_row(*_summary_cells(row, comparison.reference))
    return result


def table(comparison: Comparison) -> Table:
    """The comparison as a rich table, grouped by rate; the lowest mean latency of each rate in green.
    Over several seeds, the summary (:func:`summary_table`)."""
    if len(comparison.seeds) > 1:
        return summary_table(comparison)
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
    """The comparison as a Markdown table (for READMEs and pull requests); over several seeds, the summary
    table first, then one row per run (with its seed)."""
    lines = []
    if len(comparison.seeds) > 1:
        headers = _summary_headers(comparison)
        lines += ["| " + " | ".join(headers) + " |",
                  "| " + " | ".join("---" if h == "policy" else "---:" for h in headers) + " |"]
        lines += ["| " + " | ".join(_summary_cells(row, comparison.reference)) + " |" for row in comparison.summary()]
        lines += ["", "Per seed:", ""]
    seed_column = len(comparison.seeds) > 1
    lines += ["| " + " | ".join(header for _, header in _COLUMNS) + (" | seed |" if seed_column else " |"),
              "| " + " | ".join("---" if header == "policy" else "---:" for header, _ in _COLUMNS)
              + (" | ---: |" if seed_column else " |")]
    lines += ["| " + " | ".join(_cells(run)) + (f" | {run.seed} |" if seed_column else " |") for run in comparison.runs]
    agreement = sim_to_real(comparison)
    if agreement:
        lines += ["", "Simulator vs live engine (means over seeds; error = (sim − live) / live):", "",
                  "| rate req/s | policy | " + " | ".join(f"{label} live | sim | error"
                                                         for label in SIM_TO_REAL_FIELDS.values()) + " |",
                  "| ---: | --- | " + " | ".join("---: | ---: | ---:" for _ in SIM_TO_REAL_FIELDS) + " |"]
        for row in agreement:
            cells = [f"{row['rate_rps']:.2f}", str(row["policy"])]
            for field in SIM_TO_REAL_FIELDS:
                for key in (f"live_{field}", f"sim_{field}"):
                    cells.append(_fmt(row[key], 4))
                error = row[f"error_{field}"]
                cells.append("–" if error is None else f"{error:+.1%}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + failures_markdown(comparison.failed)


def failure_text(failure: dict[str, object]) -> str:
    """One failed task of a sweep (an entry of a report's ``failed`` list) as one line: what it was, then its error."""
    what = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in failure.items() if key != "error")
    return f"{what}: {failure['error']}"


#: What the simulator is judged on beside a live engine (``sim_to_real``): row field → label.
SIM_TO_REAL_FIELDS = {"mean_iteration_s": "mean iteration", "throughput_rps": "throughput",
                      "mean_latency_s": "mean latency"}
#: Suffix of the simulator's rows beside a live backend's (``compare(..., with_sim=True)``).
SIM_SUFFIX = " (sim)"


def sim_to_real(comparison: Comparison) -> list[dict[str, object]]:
    """For each live policy with simulator rows beside it (``<policy> (sim)``), at each rate: the live and
    simulated values of :data:`SIM_TO_REAL_FIELDS`, means over seeds, and the simulator's relative error
    ``(sim − live) / live`` of those means. Empty for a comparison without live rows."""
    runs = {(run.policy, run.rate, run.seed): run.row for run in comparison.runs}
    result = []
    for rate in comparison.rates:
        for policy in comparison.policies:
            if policy.endswith(SIM_SUFFIX) or policy + SIM_SUFFIX not in comparison.policies:
                continue
            pairs = [(runs[(policy, rate, seed)], runs[(policy + SIM_SUFFIX, rate, seed)])
                     for seed in comparison.seeds if (policy, rate, seed) in runs]
            row: dict[str, object] = {"policy": policy, "rate_rps": rate, "seeds": len(pairs)}
            for field in SIM_TO_REAL_FIELDS:
                live = [float(a[field]) for a, b in pairs if a.get(field) is not None and b.get(field) is not None]
                sim = [float(b[field]) for a, b in pairs if a.get(field) is not None and b.get(field) is not None]
                live_mean = float(np.mean(live)) if live else None
                sim_mean = float(np.mean(sim)) if sim else None
                row[f"live_{field}"], row[f"sim_{field}"] = live_mean, sim_mean
                row[f"error_{field}"] = ((sim_mean - live_mean) / live_mean
                                         if live_mean and sim_mean is not None else None)
            result.append(row)
    return result


def sim_to_real_table(comparison: Comparison) -> Table | None:
    """The simulator's error beside a live engine, one row per policy and rate (``None`` without live rows)."""
    rows = sim_to_real(comparison)
    if not rows:
        return None
    table = Table(title="simulator vs live engine (means over seeds; error = (sim − live) / live)")
    table.add_column("rate req/s", justify="right")
    table.add_column("policy")
    for label in SIM_TO_REAL_FIELDS.values():
        table.add_column(f"{label} live → sim", justify="right")
        table.add_column("error", justify="right")
    for row in rows:
        cells = [f"{row['rate_rps']:.2f}", str(row["policy"])]
        for field in SIM_TO_REAL_FIELDS:
            live, sim, error = row[f"live_{field}"], row[f"sim_{field}"], row[f"error_{field}"]
            scale, unit = (1e3, " ms") if field == "mean_iteration_s" else (1.0, "")
            cells.append("–" if live is None or sim is None else f"{live * scale:.3g} → {sim * scale:.3g}{unit}")
            cells.append("–" if error is None else f"{error:+.1%}")
        table.add_row(*cells)
    return table


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: a reader (or a crash) never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_csv(comparison: Comparison, path: Path) -> None:
    rows = comparison.rows
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in json_safe(row).items()})  # type: ignore[union-attr]
    write_text_atomically(path, buffer.getvalue())


def to_json(comparison: Comparison) -> dict[str, object]:
    payload: dict[str, object] = {
        "horizon_s": comparison.horizon,
        "policies": list(comparison.policies),
        "rates_rps": list(comparison.rates),
        "fluid": {str(rate): solution.summary() for rate, solution in comparison.fluid.items()},
        "rows": comparison.rows,
    }
    if len(comparison.seeds) > 1:
        payload["seeds"] = list(comparison.seeds)
        payload["summary"] = comparison.summary()
    agreement = sim_to_real(comparison)
    if agreement:
        payload["sim_to_real"] = agreement
    if comparison.failed:
        payload["failed"] = list(comparison.failed)
    for key, section in comparison.extra.items():
        if key in payload:
            raise ValueError(f"a comparison's extra section {key!r} would replace the document's own field")
        payload[key] = section
    return json_safe(payload)  # type: ignore[return-value]


def write_json(comparison: Comparison, path: Path) -> None:
    write_text_atomically(path, json_document(to_json(comparison)))


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
    summary = comparison.summary()  # means over seeds (the runs themselves with one seed)
    for policy in comparison.policies:
        rows = [r for r in summary if r["policy"] == policy]
        x = [r["rate_rps"] for r in rows]
        axes[0].errorbar(x, [r["throughput_rps"] for r in rows], yerr=[r["throughput_rps_ci95"] for r in rows],
                         fmt="o-", color=colors[policy], label=policy, capsize=3)
        axes[1].plot(x, [r["mean_latency_s"] for r in rows], "o-", color=colors[policy], label=f"{policy} mean")
        axes[1].plot(x, [r["p99_latency_s"] for r in rows], "s--", color=colors[policy], alpha=0.5,
                     label=f"{policy} p99")
    axes[0].set(xlabel="arrival rate (req/s)", ylabel="throughput (req/s)",
                title="Throughput against the fluid optimum")
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
            for run in (r for r in comparison.first_seed_runs() if r.rate == rate):
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


def memory_and_queue_image(time: np.ndarray, memory_frac: np.ndarray, waiting: np.ndarray,
                           title: str = "") -> np.ndarray:
    """KV memory in use and queue length over time, as an RGB array (the environment's ``rgb_array`` frame;
    the same two panels as the comparison's ``memory.png`` and ``queue.png``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=80)
    canvas = FigureCanvasAgg(fig)
    memory_ax, queue_ax = fig.subplots(1, 2)
    memory_ax.plot(time, memory_frac, color="C0", lw=1.2)
    memory_ax.axhline(1.0, color="k", ls="--", lw=1)
    memory_ax.set(title="KV memory in use", xlabel="time (s)", ylabel="fraction of capacity", ylim=(0, 1.05))
    queue_ax.plot(time, waiting, color="C1", lw=1.2)
    queue_ax.set(title="Queue length", xlabel="time (s)", ylabel="waiting requests")
    for ax in (memory_ax, queue_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# (header, field, format) of the suite's summary, one row per (scenario, load).
_SUITE_COLUMNS = (("scenario", "scenario", "{}"), ("load ρ", "load", "{:g}"),
                  ("fluid-guided", "fluid_guided", "{}"), ("thrpt", "fluid_guided_throughput_rps", "{:.2f}"),
                  ("p99 s", "fluid_guided_p99_latency_s", "{:.1f}"), ("evict", "fluid_guided_evictions", "{:.0f}"),
                  ("engine", "engine", "{}"), ("thrpt ", "engine_throughput_rps", "{:.2f}"),
                  ("p99 s ", "engine_p99_latency_s", "{:.1f}"), ("evict ", "engine_evictions", "{:.0f}"),
                  ("Δ thrpt", "throughput_diff_rps", "{:+.2f}"), ("±", "throughput_diff_ci95", "{:.2f}"),
                  ("Δ p99", "p99_diff_s", "{:+.1f}"), ("± ", "p99_diff_ci95", "{:.1f}"))


def _suite_cells(row: dict[str, object]) -> list[str]:
    cells = ["–" if row[field] is None else fmt.format(row[field]) for _, field, fmt in _SUITE_COLUMNS]
    verdict = ("better" if row["better_throughput"] or row["better_p99_latency"] else
               "level" if row["level_on_throughput"] else "behind")
    return cells + [verdict]


_SUITE_CAPTION = ("best fluid-guided policy (wait, nested-wait) against the best engine policy (vllm, sarathi) by mean "
                  "throughput over seeds; Δ: their paired difference over seeds (same arrivals) ± its 95 % interval; "
                  "better: Δ throughput above 0 or Δ p99 below 0 beyond the interval; level: Δ throughput reaches 0 "
                  "within it; behind: neither")


def suite_table(rows: list[dict[str, object]]) -> Table:
    """The suite's summary for a terminal: per scenario and load, the paired differences and the verdict
    (:func:`suite_markdown` has every column)."""
    table = Table(title="Scenario suite: fluid-guided against the engines' own", caption=_SUITE_CAPTION, padding=(0, 1))
    for header in ("scenario", "ρ", "fluid-guided", "engine", "Δ thrpt req/s", "Δ p99 s", "evictions", "verdict"):
        table.add_column(header, justify="left" if header in ("scenario", "fluid-guided", "engine", "verdict")
                         else "right", no_wrap=True)
    for row in rows:
        verdict = _suite_cells(row)[-1]
        colour = {"better": "green", "level": "yellow", "behind": "red"}[verdict]
        table.add_row(str(row["scenario"]), "–" if row["load"] is None else f"{row['load']:g}",
                      str(row["fluid_guided"]), str(row["engine"]),
                      f"{row['throughput_diff_rps']:+.2f} ± {row['throughput_diff_ci95']:.2f}",
                      f"{row['p99_diff_s']:+.1f} ± {row['p99_diff_ci95']:.1f}",
                      f"{row['fluid_guided_evictions']:.0f} / {row['engine_evictions']:.0f}", f"[{colour}]{verdict}[/]")
    return table


def suite_markdown(rows: list[dict[str, object]], failed: Sequence[dict[str, object]] = ()) -> str:
    """The suite's summary as a Markdown table, then the jobs that failed at run time, if any."""
    headers = [header.strip() for header, _, _ in _SUITE_COLUMNS] + ["verdict"]
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" if h in ("scenario", "fluid-guided", "engine", "verdict") else "---:"
                               for h in headers) + " |"]
    lines += ["| " + " | ".join(_suite_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + _SUITE_CAPTION + ".\n" + failures_markdown(failed)


def failures_markdown(failed: Sequence[dict[str, object]]) -> str:
    """The tasks of a sweep that failed at run time, as a Markdown list after a report ('' when none did)."""
    if not failed:
        return ""
    return (f"\nFailed at run time ({len(failed)} tasks; their results are missing above):\n\n"
            + "".join(f"- {failure_text(failure)}\n" for failure in failed))
