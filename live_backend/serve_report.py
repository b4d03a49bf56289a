"""The report of ``llmsched bench-serve``: every served replay as a run of a comparison, in ``llmsched compare``'s
own rows, tables, JSON, Markdown and plots, with the simulator's prediction beside it, and the serving figures.

A replay becomes a comparison's run through its requests' records: each request as ``vllm bench serve`` measured
it (:func:`client_records`: sent at its arrival, its first token after its TTFT, done after its end-to-end
latency), or as the simulator ran it on the same arrivals and KV cache. Both are read at the horizon (the span of
the arrivals, :func:`result_at`) and summarised by the comparison's own code (:func:`baselines.compare.policy_run`):
completions, latencies and regret against the fluid optimum at the horizon, as ``llmsched compare`` defines them.
The counters a client cannot see at the horizon are the whole replay's, for both rows alike: evictions (the
server's preemptions), iterations and peak memory (a served run's: the highest of its KV gauge's samples, taken
while the replay ran; ``None`` without them). A served run's time series are those samples (``ServerSamples``).
The fluid optimum is priced by the planning profile on the served KV cache, the same for every scheduler of a bench.

The serving figures are over the whole replay, every request waited for, as serving engineers compare them
(``run_`` fields, and TTFT / TPOT / ITL / end-to-end percentiles in ms): the served row's from the client's result,
the simulator's row's from its records by the same definitions (ITL excepted: the simulator has no token stream).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from baselines.compare import policy_run
from llmsched_env.completions import CompletionLog, exact_distribution
from llmsched_env.engine import FINISHED, RUNNING, WAITING, RequestRecords
from llmsched_env.errors import EngineFailure
from llmsched_env.fluid import FluidSolution
from llmsched_env.policy import Policy
from llmsched_env.report import SIM_SUFFIX, Comparison, PolicyRun
from llmsched_env.runner import RunResult, TimeSeriesRecorder, run
from llmsched_env.scenario import Scenario
from llmsched_env.workload import Arrivals

#: The serving figures' latency metrics and statistics (``<stat>_<metric>_ms`` fields).
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
LATENCY_STATS = ("mean", "p50", "p90", "p99")
#: The backend a served row names (a simulator's row beside it: ``sim``).
SERVED = "serve"


def client_records(result: Mapping[str, Any], arrivals: Arrivals) -> RequestRecords:
    """The replay's requests as ``vllm bench serve`` measured them (its ``--save-detailed`` result, in the order of
    ``arrivals``): each arrives when the client sent it (its send times, from the first arrival on), gets its first
    token after its TTFT and finishes after its end-to-end latency; a request the client reports failed never
    finishes. Output lengths are the workload's (``o``; the server produced ``o + 1`` tokens, the first from the
    prefill)."""
    n = len(arrivals)
    columns = {key: np.asarray(result.get(key, ()), dtype=np.float64) for key in ("start_times", "ttfts", "latencies")}
    for key, values in columns.items():
        if len(values) != n:
            raise EngineFailure(f"vllm bench serve's result has {len(values)} {key} for {n} requests (run it with "
                                "--save-detailed)")
    errors = list(result.get("errors", [""] * n))
    failed = np.array([bool(error) for error in errors], dtype=bool)
    start = columns["start_times"]
    arrival = start - start[0] + float(arrivals.arrival_time[0])
    first_token = np.where(failed, np.nan, arrival + columns["ttfts"])
    finish = np.where(failed, np.nan, arrival + columns["latencies"])
    status = np.where(failed, WAITING, FINISHED).astype(np.int8)
    return RequestRecords(arrival, arrivals.prompt_len.copy(), arrivals.output_len.copy(), first_token, finish,
                          np.zeros(n, dtype=np.int64), np.where(failed, 0, arrivals.output_len), status)


def records_at(records: RequestRecords, horizon: float) -> RequestRecords:
    """The requests that had arrived by ``horizon``, as they stood then: finished if they were done by then,
    running if they had their first token, else waiting; the events after it not yet happened (NaN). Decoded
    tokens are known for the finished ones only (0 for the others)."""
    arrived = records.arrival_time <= horizon
    finish, first_token = records.finish_time[arrived], records.first_token_time[arrived]
    finished = finish <= horizon  # NaN (never) compares False
    started = first_token <= horizon
    status = np.where(finished, FINISHED, np.where(started, RUNNING, WAITING)).astype(records.status.dtype)
    output_len = records.output_len[arrived]
    return RequestRecords(records.arrival_time[arrived], records.prompt_len[arrived], output_len,
                          np.where(started, first_token, np.nan), np.where(finished, finish, np.nan),
                          records.num_evictions[arrived], np.where(finished, output_len, 0), status)


def result_at(records: RequestRecords, horizon: float, *, capacity_blocks: int, block_size: int, evictions: int,
              iterations: int, peak_blocks_used: int = 0, busy_time: float = 0.0) -> RunResult:
    """A run's result read at ``horizon`` from its requests' ``records`` (:func:`records_at`), with the counters of
    the whole run (``evictions``, ``iterations``, ``peak_blocks_used``, ``busy_time``: its engine seconds; 0 where
    unknown)."""
    at = records_at(records, horizon)
    log = CompletionLog(horizon, keep_records=True)
    log.add(at, now=horizon)
    status = at.status
    return RunResult(log, horizon, horizon, iterations, capacity_blocks, block_size, peak_blocks_used, 0.0,
                     evictions, arrived=len(status), waiting=int(np.count_nonzero(status == WAITING)),
                     running=int(np.count_nonzero(status == RUNNING)),
                     finished=int(np.count_nonzero(status == FINISHED)), busy_time=busy_time)


class ServerSamples(NamedTuple):
    """The server's gauges sampled while a replay ran (``/metrics``): at each sample's time (``time.perf_counter``,
    the clock of the client's send times: one monotonic clock for every process of the machine), the share of
    the KV cache's usable blocks in use, and the requests running and waiting."""

    time: np.ndarray
    kv_usage: np.ndarray
    running: np.ndarray
    waiting: np.ndarray


def served_series(records: RequestRecords, horizon: float, samples: ServerSamples | None = None, origin: float = 0.0,
                  capacity_blocks: int = 0, points: int = 200) -> dict[str, np.ndarray]:
    """The time series a comparison plots of a served run, up to ``horizon``: the server's sampled gauges at their
    times (``samples``; on the replay's clock, which starts at ``origin`` on theirs), KV blocks in use of
    ``capacity_blocks``, with the requests finished by then; without samples, what the client sees on ``points``
    times, waiting (arrived, no first token yet), running and finished, KV memory unknown (NaN)."""
    def by(times: np.ndarray, grid: np.ndarray) -> np.ndarray:  # how many of ``times`` by each time of ``grid``
        return np.searchsorted(np.sort(times[~np.isnan(times)]), grid, side="right").astype(np.float64)

    if samples is not None and len(samples.time):
        grid = samples.time - origin
        kept = (grid > 0) & (grid <= horizon)
        grid = grid[kept]
        return {"time": grid, "kv_blocks_used": samples.kv_usage[kept] * capacity_blocks,
                "waiting": samples.waiting[kept].astype(np.float64),
                "running": samples.running[kept].astype(np.float64), "finished": by(records.finish_time, grid)}
    grid = np.linspace(horizon / points, horizon, points)
    arrived, started = by(records.arrival_time, grid), by(records.first_token_time, grid)
    finished = by(records.finish_time, grid)
    return {"time": grid, "kv_blocks_used": np.full(points, np.nan), "waiting": arrived - started,
            "running": started - finished, "finished": finished}


def client_figures(result: Mapping[str, Any], expected_outputs: np.ndarray) -> dict[str, Any]:
    """The serving figures of ``vllm bench serve``'s result JSON (the whole replay), with the checks that every
    request completed with the output length it asked for (``expected_outputs`` tokens)."""
    completed = int(result["completed"])
    output_lens = np.asarray(result.get("output_lens", []), dtype=np.int64)
    goodput = result.get("request_goodput")
    figures = {
        "requests": len(expected_outputs),
        "run_completed": completed,
        "run_failed": int(result.get("failed", len(expected_outputs) - completed)),
        "outputs_as_requested": bool(len(output_lens) == len(expected_outputs)
                                     and np.array_equal(output_lens, expected_outputs)),
        "run_duration_s": float(result["duration"]),
        "run_throughput_rps": float(result["request_throughput"]),
        "run_output_tps": float(result["output_throughput"]),
        "goodput_rps": None if goodput is None else float(goodput),
        "slo_attainment": (None if goodput is None or completed == 0
                           else float(goodput) * float(result["duration"]) / len(expected_outputs)),
    }
    for metric in LATENCY_METRICS:
        for stat in LATENCY_STATS:
            value = result.get(f"{stat}_{metric}_ms")
            figures[f"{stat}_{metric}_ms"] = None if value is None else float(value)
    return figures


def simulated_figures(records: RequestRecords, slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """:func:`client_figures` of a simulated replay run until every request was done, from its ``records`` by the
    client's definitions: the run from its first arrival to its last completion; TPOT the time after the first
    token per later token; SLO attainment the share of requests within both targets (ITL: none)."""
    done = records.status == FINISHED
    arrival, first, finish = records.arrival_time[done], records.first_token_time[done], records.finish_time[done]
    span = float(finish.max() - records.arrival_time.min()) if done.any() else math.nan
    ttft, e2el = (first - arrival) * 1e3, (finish - arrival) * 1e3
    tpot = (finish - first) / np.maximum(records.output_len[done], 1) * 1e3
    good = int(np.count_nonzero((ttft <= slo_ttft_ms) & (tpot <= slo_tpot_ms)))
    requests = len(records.status)
    figures: dict[str, Any] = {
        "requests": requests, "run_completed": int(done.sum()), "run_failed": 0, "outputs_as_requested": True,
        "run_duration_s": span if done.any() else None,
        "run_throughput_rps": float(done.sum()) / span if span > 0 else None,
        "run_output_tps": float((records.output_len[done] + 1).sum()) / span if span > 0 else None,
        "goodput_rps": good / span if span > 0 else None,
        "slo_attainment": good / requests if requests else None,
    }
    for metric, values in (("ttft", ttft), ("tpot", tpot), ("itl", np.empty(0)), ("e2el", e2el)):
        figures.update(zip((f"{stat}_{metric}_ms" for stat in LATENCY_STATS), exact_distribution(values)))
    return figures


def served_run(label: str, client: Mapping[str, Any], arrivals: Arrivals, horizon: float, *, fluid: FluidSolution,
               realised: FluidSolution, rate: float, seed: int, kv_blocks: int, block_size: int, preemptions: int,
               server_figures: Mapping[str, Any], samples: ServerSamples | None = None) -> PolicyRun:
    """A served replay of ``arrivals`` as a comparison's run: the client's result (``client``) read at ``horizon``
    against ``fluid`` and ``realised`` (the comparison's row), the whole replay's serving figures, and what the
    server reported (``kv_blocks`` of ``block_size`` tokens, the replay's ``preemptions``, ``server_figures``: the
    scheduler's counters, with ``batches`` and ``busy_s``, the iterations that ran a batch and their seconds, from
    the server's iteration log: the run's iterations and engine time, as the simulator counts them; ``samples``:
    its gauges during the replay, the time series and the peak memory, the highest sample of the replay)."""
    records = client_records(client, arrivals)
    sampled = samples is not None and len(samples.time) > 0
    peak = float(samples.kv_usage.max()) if sampled else None  # type: ignore[union-attr]
    result = result_at(records, horizon, capacity_blocks=kv_blocks - 1, block_size=block_size, evictions=preemptions,
                       iterations=int(server_figures.get("batches", 0)),
                       busy_time=float(server_figures.get("busy_s", 0.0)))
    origin = float(client["start_times"][0]) - float(arrivals.arrival_time[0])  # the replay's time 0, client clock
    served = policy_run(label, result, served_series(records, horizon, samples, origin, kv_blocks - 1), fluid,
                        realised, rate, seed, SERVED)
    served.row.update(peak_memory_frac=peak, mean_memory_frac=None)  # None: not reported (no samples)
    served.row.update(client_figures(client, arrivals.output_len + 1), kv_blocks=kv_blocks, block_size=block_size,
                      **server_figures)
    return served


def simulated_run(label: str, policy: Policy, scenario: Scenario, arrivals: Arrivals, horizon: float, *,
                  fluid: FluidSolution, realised: FluidSolution, rate: float, seed: int,
                  slo_ms: tuple[float, float]) -> PolicyRun:
    """The simulator's prediction for ``policy`` on the same ``arrivals`` and KV cache (``scenario``), run until
    every request is done, as the client waits for every response, and read as a served replay is: at ``horizon``
    for the comparison's row, over the whole run for the serving figures (SLO targets ``slo_ms``: TTFT, TPOT)."""
    recorder = TimeSeriesRecorder()
    # Long enough to drain: the run ends when nothing is left, well before.
    result = run(scenario.engine(), policy, arrivals, max(10 * horizon, 600.0), keep_records=True,
                 stall_after_s=None, callbacks=[recorder])
    records = result.records
    at_horizon = result_at(records, horizon, capacity_blocks=result.capacity_blocks, block_size=result.block_size,
                           evictions=result.evictions, iterations=result.iterations,
                           peak_blocks_used=result.peak_blocks_used, busy_time=result.busy_time)
    series = recorder.arrays()
    kept = series["time"] <= horizon
    simulated = policy_run(label, at_horizon, {key: values[kept] for key, values in series.items()}, fluid, realised,
                           rate, seed, "sim")
    simulated.row["mean_memory_frac"] = None  # known over the whole run only
    simulated.row.update(simulated_figures(records, *slo_ms))
    return simulated


# -- the serving table: one row per scheduler, the seeds' means --------------------------------------------------
_SUMMARY_MEANS = ("run_throughput_rps", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_e2el_ms", "slo_attainment",
                  "policy_us_per_iteration", "schedule_us_per_iteration")


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(present) / len(present) if present else None


def summary_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """One row per served scheduler: the seeds' means of the serving figures, its throughput over the replay paired
    with the first scheduler's on each seed, and the simulator's prediction of the same figures (its ``sim_``
    fields, from the rows beside it)."""
    rows = comparison.rows
    served = [row for row in rows if row.get("backend") == SERVED]
    simulated = {(row["policy"], row["seed"]): row for row in rows if row.get("backend") == "sim"}
    labels = list(dict.fromkeys(row["policy"] for row in served))
    if not labels:
        return []
    reference = labels[0]
    by_seed = {row["seed"]: row for row in served if row["policy"] == reference}
    table = []
    for label in labels:
        mine = [row for row in served if row["policy"] == label]
        sims = [simulated.get((label + SIM_SUFFIX, row["seed"]), {}) for row in mine]
        ratios = [row["run_throughput_rps"] / by_seed[row["seed"]]["run_throughput_rps"] for row in mine
                  if row["seed"] in by_seed and by_seed[row["seed"]]["run_throughput_rps"]]
        table.append({"policy": label, "runs": len(mine),
                      **{key: _mean([row.get(key) for row in mine]) for key in _SUMMARY_MEANS},
                      f"throughput_vs_{reference}": _mean(ratios),
                      "evictions": sum(row["evictions"] for row in mine),
                      "run_completed": sum(row["run_completed"] for row in mine),
                      "requests": sum(row["requests"] for row in mine),
                      "fallbacks": sum(row.get("scheduler_fallbacks", 0) for row in mine),
                      "sim_run_throughput_rps": _mean([sim.get("run_throughput_rps") for sim in sims]),
                      "sim_p99_e2el_ms": _mean([sim.get("p99_e2el_ms") for sim in sims]),
                      "sim_slo_attainment": _mean([sim.get("slo_attainment") for sim in sims]),
                      "sim_evictions": sum(sim.get("evictions", 0) for sim in sims)})
    return table


def markdown(comparison: Comparison) -> str:
    """The serving section of a bench's report (Markdown): the seeds' means per scheduler with the simulator's
    prediction beside them, and each server's calibration (``comparison.extra["serving"]``)."""
    serving: Mapping[str, Any] = comparison.extra.get("serving", {})  # type: ignore[assignment]
    table = summary_rows(comparison)

    def f(value: Any, digits: int = 2) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    def share(value: Any) -> str:
        return "–" if value is None else format(value, ".1%")

    reference = next((key for key in table[0] if key.startswith("throughput_vs_")), "throughput_vs_–") if table \
        else "throughput_vs_–"
    lines = [f"`vllm bench serve` on {serving.get('model', '?')}, seeds {', '.join(map(str, comparison.seeds))}, "
             f"{comparison.horizon:g} s of arrivals each, every request waited for; SLO: TTFT ≤ "
             f"{serving.get('slo_ttft_ms', math.nan):g} ms and TPOT ≤ {serving.get('slo_tpot_ms', math.nan):g} ms.",
             "",
             f"| scheduler | req/s | vs {reference.removeprefix('throughput_vs_')} | TTFT p50 / p99 ms | TPOT p50 ms | "
             "E2E p99 ms | SLO met | preemptions | completed | fallbacks | policy µs/it | vLLM schedule µs/it | "
             "sim req/s | sim E2E p99 ms | sim SLO met | sim preemptions |",
             "|" + "---|" * 16]
    for row in table:
        lines.append(
            f"| {row['policy']} | {f(row['run_throughput_rps'])} | {f(row[reference], 3)} | "
            f"{f(row['p50_ttft_ms'], 0)} / {f(row['p99_ttft_ms'], 0)} | {f(row['p50_tpot_ms'], 1)} | "
            f"{f(row['p99_e2el_ms'], 0)} | {share(row['slo_attainment'])} | {row['evictions']} | "
            f"{row['run_completed']}/{row['requests']} | {row['fallbacks']} | {f(row['policy_us_per_iteration'], 0)} | "
            f"{f(row['schedule_us_per_iteration'], 0)} | {f(row['sim_run_throughput_rps'])} | "
            f"{f(row['sim_p99_e2el_ms'], 0)} | {share(row['sim_slo_attainment'])} | {row['sim_evictions']} |")
    lines += ["", "The cost model against the iterations each server ran (its iteration log): the planning profile's "
              "mean relative error, and a fit to the log measured on every third iteration, held out.", "",
              "| server | iterations | profile's error | fitted, held-out error |", "|---|---|---|---|"]
    for label, summary in serving.get("calibration", {}).items():
        fitted = summary.get("fitted_held_out_error")
        lines.append(f"| {label} | {summary['iterations']:,} | "
                     f"{'–' if 'profile_error' not in summary else format(summary['profile_error'], '.0%')} | "
                     f"{'–' if fitted is None else format(fitted, '.0%')} |")
    return "\n".join(lines) + "\n"


def plot(comparison: Comparison, path: Path) -> Path:
    """Throughput over the replay, SLO attainment and p99 end-to-end latency per scheduler (each seed a dot, the
    mean a bar), with the simulator's prediction for the same arrivals as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison.rows
    served = [row for row in rows if row.get("backend") == SERVED]
    simulated = {(row["policy"], row["seed"]): row for row in rows if row.get("backend") == "sim"}
    labels = list(dict.fromkeys(row["policy"] for row in served))
    panels = [("run_throughput_rps", "requests / s", 1.0), ("slo_attainment", "share within the SLO", 1.0),
              ("p99_e2el_ms", "p99 end-to-end latency (s)", 1e-3)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for axis, (key, title, scale) in zip(axes, panels):
        for x, label in enumerate(labels):
            mine = [row for row in served if row["policy"] == label]
            values = [row[key] * scale for row in mine if row.get(key) is not None]
            predicted = [sim[key] * scale for row in mine
                         if (sim := simulated.get((label + SIM_SUFFIX, row["seed"]))) and sim.get(key) is not None]
            if values:
                axis.bar(x, float(np.mean(values)), color=f"C{x}", alpha=0.55)
                axis.scatter([x] * len(values), values, color=f"C{x}", s=14, zorder=3)
            if predicted:
                axis.scatter([x], [float(np.mean(predicted))], marker="x", color="black", s=40, zorder=4,
                             label="simulator" if x == 0 else None)
        axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    if any(axis.get_legend_handles_labels()[0] for axis in axes):
        axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"vllm bench serve, identical arrivals, seeds {', '.join(map(str, comparison.seeds))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
