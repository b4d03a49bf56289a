"""``llmsched bench-serve``: schedulers served by ``llmsched serve``, driven by vLLM's own client on identical arrivals.

For each scheduler (``vllm`` for vLLM's own, or any policy or agent ``llmsched serve`` takes) a server is started,
and for each seed ``vllm bench serve`` replays the same arrivals against it: a project workload (``--types`` or
``--trace``, Poisson or gamma arrivals at a rate or load, :class:`~llmsched_env.scenario.Scenario`) sampled for the
seed and written as a ``timed_trace`` JSONL file (``timestamp``, ``input_length``, ``output_length``), which the
client replays at its timestamps with ``ignore_eos``, so every scheduler sees the same requests at the same times
and every request produces exactly its output length. The seeds' runs share a server (its Numba kernels and model
loaded once); the preemptions of each run are the difference of ``vllm:num_preemptions_total`` on the server's
``/metrics`` before and after it.

Each row holds what the client measured (throughput, TTFT / TPOT / ITL / end-to-end latency percentiles, goodput
and the share of requests within the TTFT and TPOT targets: SLO attainment), the server's preemptions, the
scheduler's own counters (its decisions, fallbacks, time per iteration), and, beside it, the simulator's
prediction for the same arrivals (the policy on :class:`~llmsched_env.simulator.SimulatedEngine` with the cost
profile and the server's KV cache).

A workload request of output ``o`` asks for ``o + 1`` tokens, as on the in-process live backend: the first comes
from the prefill, the other ``o`` from decodes (``docs/model.md``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from live_backend.calibrate import calibrate_from_log, read_iteration_log, relative_errors
from live_backend.launcher import vllm_serve_arguments
from live_backend.serve_settings import (
    ServeSettings,
    build_serve_policy,
    needs_prior,
    parse_serve_settings,
    reads_lengths,
)
from llmsched_env.engine import FINISHED
from llmsched_env.errors import ConfigError, EngineFailure
from llmsched_env.runner import run
from llmsched_env.scenario import Scenario
from llmsched_env.workload import Arrivals

#: Seconds a server may take to load its model and warm its policy up.
START_TIMEOUT_S = 600.0
#: Token ids per ``hash_ids`` entry of a timed trace (``vllm bench serve``'s ``--timed-trace-chunk-hash-size``).
CHUNK_TOKENS = 16


@dataclass(frozen=True)
class ServeBenchPlan:
    """One comparison: the schedulers, the workload and its seeds, the server's options and the SLO targets.

    ``scenario`` is at the rate to replay (its mix and arrival process, or its trace), with the cost profile the
    policies plan with and the simulator predicts with. ``lengths`` is ``auto`` (the WAIT family reads
    ``max_tokens``, which the replay makes exact; every other policy runs with lengths hidden), ``hidden`` or
    ``max_tokens``.
    """

    model: str
    policies: tuple[str, ...]
    scenario: Scenario
    horizon_s: float
    seeds: tuple[int, ...]
    vllm_args: tuple[str, ...] = ()
    lengths: str = "auto"
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    extra_settings: dict[str, Any] = field(default_factory=dict)

    def settings_for(self, policy: str) -> ServeSettings:
        """The served settings of ``policy`` (``vllm``: vLLM's own scheduler), checked as a server checks them."""
        lengths = self.lengths
        if lengths == "auto":
            lengths = "max_tokens" if reads_lengths(policy) else "hidden"
        values: dict[str, Any] = {"policy": policy, "lengths": lengths, **self.extra_settings}
        if needs_prior(policy):
            values.update(self.prior())
        return parse_serve_settings({"llmsched": values})

    def prior(self) -> dict[str, Any]:
        """The workload as a prior, for the policies that size thresholds on known rates and lengths."""
        mix = self.scenario.mix
        if mix is None:
            raise ConfigError("the policies that need a workload prior are benchmarked on --types workloads; serve "
                              "their adaptive variants on a trace")
        return {"types": mix.to_text()}


def timed_trace_lines(arrivals: Arrivals, seed: int) -> list[str]:
    """The JSONL lines of ``vllm bench serve --dataset-name timed_trace`` for ``arrivals``: one request per line,
    ``output_length`` = ``o + 1``, and distinct ``hash_ids`` per request (no two prompts share a prefix)."""
    lines = []
    next_hash = seed * 10**9
    for t, p, o in zip(arrivals.arrival_time.tolist(), arrivals.prompt_len.tolist(), arrivals.output_len.tolist()):
        chunks = -(-int(p) // CHUNK_TOKENS)
        lines.append(json.dumps({"timestamp": round(float(t), 6), "input_length": int(p), "output_length": int(o) + 1,
                                 "hash_ids": list(range(next_hash, next_hash + chunks))}))
        next_hash += chunks
    return lines


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a local server
        return response.read().decode()


def metric_value(metrics_text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (every label set) in ``/metrics`` text; 0 if absent."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cache_blocks(metrics_text: str) -> tuple[int, int]:
    """``(KV blocks, block size)`` from vLLM's ``vllm:cache_config_info`` metric."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(item.split("=", 1) for item in line[line.index("{") + 1:line.rindex("}")].split(","))
            labels = {key: value.strip('"') for key, value in labels.items()}
            return int(labels["num_gpu_blocks"]), int(labels["block_size"])
    raise EngineFailure("the server's /metrics has no vllm:cache_config_info")


class Server:
    """A ``vllm serve`` process (through :mod:`live_backend.launcher`) on a free local port, its output in a log."""

    def __init__(self, model: str, settings: ServeSettings | None, vllm_args: Sequence[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "live_backend.launcher",
                   *vllm_serve_arguments(model, settings, [*vllm_args, "--port", str(self.port)])]
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log.read_text().splitlines()[-5:]
                raise EngineFailure(f"the server exited with status {self._process.returncode} before it was ready "
                                    f"(log {self.log}): {' | '.join(tail)}")
            try:
                if _get(self.url + "/health", timeout=2.0) is not None:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        raise EngineFailure(f"the server was not ready after {timeout_s:.0f} s (log {self.log})")

    def metrics(self) -> str:
        return _get(self.url + "/metrics")

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGINT)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._out.close()


def client_command(plan: ServeBenchPlan, server: Server, trace: Path, count: int, result: Path,
                   seed: int) -> list[str]:
    """``vllm bench serve`` replaying ``trace`` against ``server``, its result JSON written to ``result``."""
    return [sys.executable, "-m", "live_backend.launcher", "bench", "serve", "--backend", "vllm",
            "--base-url", server.url, "--model", plan.model, "--tokenizer", plan.model, "--seed", str(seed),
            "--dataset-name", "timed_trace", "--dataset-path", str(trace), "--num-prompts", str(count),
            "--timed-trace-chunk-hash-size", str(CHUNK_TOKENS), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--goodput", f"ttft:{plan.slo_ttft_ms:g}", f"tpot:{plan.slo_tpot_ms:g}",
            "--save-result", "--save-detailed", "--result-dir", str(result.parent), "--result-filename", result.name,
            "--disable-tqdm"]


def client_row(result: dict[str, Any], expected_outputs: np.ndarray) -> dict[str, Any]:
    """The figures a row keeps of ``vllm bench serve``'s result JSON, with the checks that every request completed
    with the output length it asked for."""
    completed = int(result["completed"])
    output_lens = np.asarray(result.get("output_lens", []), dtype=np.int64)
    goodput = result.get("request_goodput")
    row = {
        "requests": len(expected_outputs),
        "completed": completed,
        "failed": int(result.get("failed", len(expected_outputs) - completed)),
        "outputs_as_requested": bool(len(output_lens) == len(expected_outputs)
                                     and np.array_equal(output_lens, expected_outputs)),
        "duration_s": float(result["duration"]),
        "throughput_rps": float(result["request_throughput"]),
        "output_tps": float(result["output_throughput"]),
        "goodput_rps": None if goodput is None else float(goodput),
        "slo_attainment": (None if goodput is None or completed == 0
                           else float(goodput) * float(result["duration"]) / len(expected_outputs)),
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "p50", "p90", "p99"):
            value = result.get(f"{stat}_{metric}_ms")
            row[f"{stat}_{metric}_ms"] = None if value is None else float(value)
    return row


def simulated_row(plan: ServeBenchPlan, policy: str, arrivals: Arrivals, capacity_blocks: int,
                  block_size: int) -> dict[str, Any]:
    """The simulator's prediction for ``policy`` on the same arrivals and KV cache, run until every request is done."""
    settings = plan.settings_for(policy)
    scenario = replace(plan.scenario, capacity_tokens=capacity_blocks * block_size, block_size=block_size,
                       output_lengths_known=settings.lengths_known)
    served = build_serve_policy(settings, scenario)  # for vllm: llmsched's model of vLLM's scheduler
    # Until every request is done, as the client waits for every response (the run ends when nothing is left).
    drain = max(10 * plan.horizon_s, 600.0)
    result = run(scenario.engine(), served, arrivals, drain, keep_records=True, stall_after_s=None)
    records = result.records
    done = records.status == FINISHED
    finish = records.finish_time[done]
    span = (float(finish.max()) - float(records.arrival_time.min())) if done.any() else math.nan
    e2e = (finish - records.arrival_time[done]) * 1e3
    ttft = (records.first_token_time[done] - records.arrival_time[done]) * 1e3
    tpot = (finish - records.first_token_time[done]) / np.maximum(records.output_len[done], 1) * 1e3
    good = (ttft <= plan.slo_ttft_ms) & (tpot <= plan.slo_tpot_ms)
    return {"sim_completed": int(done.sum()), "sim_throughput_rps": float(done.sum() / span) if span > 0 else None,
            "sim_p50_e2el_ms": _quantile(e2e, 0.5), "sim_p99_e2el_ms": _quantile(e2e, 0.99),
            "sim_p99_ttft_ms": _quantile(ttft, 0.99), "sim_p50_tpot_ms": _quantile(tpot, 0.5),
            "sim_preemptions": int(result.evictions), "sim_slo_attainment": float(good.mean()) if done.any() else None}


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if len(values) else None


def bench_serve(plan: ServeBenchPlan, work: Path, on_run: Callable[[str, int], None] = lambda policy, seed: None,
                with_sim: bool = True) -> dict[str, Any]:
    """Run the plan (servers one after another, seeds on each); the rows, in policy then seed order, and the plan.

    Raises:
        EngineFailure: a server that does not start or dies, or a client run that fails (its log is named).
    """
    work.mkdir(parents=True, exist_ok=True)
    traces = {}
    for seed in plan.seeds:
        arrivals = plan.scenario.sample(plan.horizon_s, seed)
        if len(arrivals) == 0:
            raise ConfigError(f"seed {seed}: no request arrives in {plan.horizon_s:g} s; raise --horizon or --rate")
        path = work / f"arrivals-seed{seed}.jsonl"
        path.write_text("\n".join(timed_trace_lines(arrivals, seed)) + "\n")
        traces[seed] = (arrivals, path)
    rows = []
    calibration: dict[str, Any] = {}
    for policy in plan.policies:
        label = Path(policy).name
        iteration_log = work / f"{label}-iterations.jsonl"
        iteration_log.unlink(missing_ok=True)
        settings = replace(plan.settings_for(policy), stats_file=str((work / f"{label}-stats.json").resolve()),
                           iteration_log=str(iteration_log.resolve()))
        server = Server(plan.model, settings, plan.vllm_args, work / f"{label}-server.log")
        try:
            server.wait_ready()
            blocks, block_size = cache_blocks(server.metrics())
            for seed in plan.seeds:
                on_run(label, seed)
                arrivals, trace = traces[seed]
                before_metrics = server.metrics()
                stats_before = _read_stats(settings)
                result_path = work / f"{label}-seed{seed}.json"
                log_path = work / f"{label}-seed{seed}-client.log"
                with open(log_path, "w") as client_log:
                    code = subprocess.call(client_command(plan, server, trace, len(arrivals), result_path, seed),
                                           stdout=client_log, stderr=subprocess.STDOUT)
                if code != 0 or not result_path.is_file():
                    raise EngineFailure(f"vllm bench serve failed against {label} (seed {seed}, status {code}); "
                                        f"see {log_path}")
                time.sleep(1.5)  # the scheduler's counters reach its stats file at most once a second
                after_metrics = server.metrics()
                row = {"policy": label, "seed": seed, "kv_blocks": blocks, "block_size": block_size,
                       **client_row(json.loads(result_path.read_text()), arrivals.output_len + 1),
                       "preemptions": int(metric_value(after_metrics, "vllm:num_preemptions_total")
                                          - metric_value(before_metrics, "vllm:num_preemptions_total"))}
                stats_after = _read_stats(settings)
                if stats_after is not None:
                    before = stats_before or {}
                    for key in ("iterations", "decisions", "fallbacks", "policy_seconds", "schedule_seconds"):
                        row[f"scheduler_{key}"] = stats_after[key] - before.get(key, 0)
                    iterations = max(row["scheduler_iterations"], 1)
                    row["policy_us_per_iteration"] = 1e6 * row.pop("scheduler_policy_seconds") / iterations
                    row["schedule_us_per_iteration"] = 1e6 * row.pop("scheduler_schedule_seconds") / iterations
                    # An adaptive policy's view of the engine's speed at the run's end (null for the others).
                    row["engine_vs_profile"] = stats_after.get("engine_vs_profile")
                    row["cost_factor"] = stats_after.get("cost_factor", 1.0)
                if with_sim:
                    row.update(simulated_row(plan, policy, arrivals, blocks - 1, block_size))
                rows.append(row)
        finally:
            server.stop()
        calibration[label] = served_calibration(plan, iteration_log)
    return {"model": plan.model, "policies": list(plan.policies), "seeds": list(plan.seeds),
            "horizon_s": plan.horizon_s, "vllm_args": list(plan.vllm_args), "slo_ttft_ms": plan.slo_ttft_ms,
            "slo_tpot_ms": plan.slo_tpot_ms, "rows": rows, "calibration": calibration}


def served_calibration(plan: ServeBenchPlan, log: Path) -> dict[str, Any]:
    """How well the cost model predicts the iterations a server ran (its iteration log): the planning profile's
    mean relative error on them, and a fit to the log's own iterations measured on every third one, held out."""
    if not log.is_file():
        return {"iterations": 0}
    _, samples = read_iteration_log(log)
    summary: dict[str, Any] = {"iterations": len(samples)}
    if samples:
        summary["profile_error"] = float(np.mean(relative_errors(plan.scenario.cost, samples)))
    try:
        fitted = calibrate_from_log(samples).chosen
    except ConfigError as error:  # too few iterations to fit: say why, keep the rest of the report
        summary["fit"] = str(error)
        return summary
    summary.update(fitted_held_out_error=fitted.held_out_error, fitted_cost=fitted.cost.to_dict())
    return summary


def _read_stats(settings: ServeSettings) -> dict[str, Any] | None:
    if settings.stats_file is None or not Path(settings.stats_file).is_file():
        return None
    return json.loads(Path(settings.stats_file).read_text())


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per policy: the seeds' means, and its throughput paired with the first policy's on each seed."""
    rows = report["rows"]
    reference = report["policies"][0]
    reference_label = Path(reference).name
    by_seed = {row["seed"]: row for row in rows if row["policy"] == reference_label}
    table = []
    for label in dict.fromkeys(row["policy"] for row in rows):
        mine = [row for row in rows if row["policy"] == label]
        mean = {key: _mean([row.get(key) for row in mine])
                for key in ("throughput_rps", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_e2el_ms",
                            "slo_attainment", "policy_us_per_iteration", "schedule_us_per_iteration",
                            "sim_throughput_rps", "sim_p99_e2el_ms")}
        ratios = [row["throughput_rps"] / by_seed[row["seed"]]["throughput_rps"] for row in mine
                  if row["seed"] in by_seed and by_seed[row["seed"]]["throughput_rps"] > 0]
        table.append({"policy": label, "runs": len(mine), **mean,
                      "preemptions": sum(row["preemptions"] for row in mine),
                      "completed": sum(row["completed"] for row in mine),
                      "requests": sum(row["requests"] for row in mine),
                      "fallbacks": sum(row.get("scheduler_fallbacks", 0) for row in mine),
                      f"throughput_vs_{reference_label}": _mean(ratios)})
    return table


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(present) / len(present) if present else None


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (seeds' means per policy), with the simulator's prediction beside it."""
    table = summary_rows(report)
    reference = next(key for key in table[0] if key.startswith("throughput_vs_"))

    def f(value: Any, digits: int = 2) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    lines = [f"`vllm bench serve` on {report['model']}, seeds {', '.join(map(str, report['seeds']))}, "
             f"{report['horizon_s']:g} s of arrivals each; SLO: TTFT ≤ {report['slo_ttft_ms']:g} ms and TPOT ≤ "
             f"{report['slo_tpot_ms']:g} ms.", "",
             f"| scheduler | req/s | vs {reference.removeprefix('throughput_vs_')} | TTFT p50 / p99 ms | TPOT p50 ms | "
             "E2E p99 ms | SLO met | preemptions | completed | fallbacks | policy µs/it | vLLM schedule µs/it | "
             "sim req/s | sim E2E p99 ms |",
             "|" + "---|" * 14]
    for row in table:
        lines.append(
            f"| {row['policy']} | {f(row['throughput_rps'])} | {f(row[reference], 3)} | {f(row['p50_ttft_ms'], 0)} / "
            f"{f(row['p99_ttft_ms'], 0)} | {f(row['p50_tpot_ms'], 1)} | {f(row['p99_e2el_ms'], 0)} | "
            f"{'–' if row['slo_attainment'] is None else format(row['slo_attainment'], '.1%')} | {row['preemptions']} "
            f"| {row['completed']}/{row['requests']} | {row['fallbacks']} | {f(row['policy_us_per_iteration'], 0)} | "
            f"{f(row['schedule_us_per_iteration'], 0)} | {f(row['sim_throughput_rps'])} | "
            f"{f(row['sim_p99_e2el_ms'], 0)} |")
    lines += ["", "The cost model against the iterations each server ran (its iteration log): the planning profile's "
              "mean relative error, and a fit to the log measured on every third iteration, held out.", "",
              "| server | iterations | profile's error | fitted, held-out error |", "|---|---|---|---|"]
    for label, summary in report.get("calibration", {}).items():
        fitted = summary.get("fitted_held_out_error")
        lines.append(f"| {label} | {summary['iterations']:,} | "
                     f"{'–' if 'profile_error' not in summary else format(summary['profile_error'], '.0%')} | "
                     f"{'–' if fitted is None else format(fitted, '.0%')} |")
    return "\n".join(lines) + "\n"


def split_vllm_args(text: str | None) -> tuple[str, ...]:
    """``--vllm-args "..."`` as the server's argument list (shell quoting rules)."""
    return tuple(shlex.split(text)) if text else ()


def plot(report: dict[str, Any], path: Path) -> Path:
    """Throughput, SLO attainment and p99 end-to-end latency per scheduler (each seed a dot, the mean a bar), with
    the simulator's prediction for the same arrivals as a cross: ``bench-serve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = list(dict.fromkeys(row["policy"] for row in rows))
    panels = [("throughput_rps", "sim_throughput_rps", "requests / s", 1.0),
              ("slo_attainment", "sim_slo_attainment", "share within the SLO", 1.0),
              ("p99_e2el_ms", "sim_p99_e2el_ms", "p99 end-to-end latency (s)", 1e-3)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for axis, (key, sim_key, title, scale) in zip(axes, panels):
        for x, label in enumerate(labels):
            mine = [row for row in rows if row["policy"] == label]
            values = [row[key] * scale for row in mine if row.get(key) is not None]
            predicted = [row[sim_key] * scale for row in mine if row.get(sim_key) is not None]
            if values:
                axis.bar(x, float(np.mean(values)), color=f"C{x}", alpha=0.55)
                axis.scatter([x] * len(values), values, color=f"C{x}", s=14, zorder=3)
            if predicted:
                axis.scatter([x], [float(np.mean(predicted))], marker="x", color="black", s=40, zorder=4,
                             label="simulator" if x == 0 else None)
        axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"vllm bench serve, identical arrivals, seeds {', '.join(map(str, report['seeds']))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
