"""``llmsched bench-serve``: schedulers served by ``llmsched serve``, driven by vLLM's own client on identical arrivals.

For each scheduler (``vllm`` for vLLM's own, or any policy or agent ``llmsched serve`` takes) a server is started,
and for each seed ``vllm bench serve`` replays the same arrivals against it: a project workload (``--types`` or
``--trace``, Poisson or gamma arrivals at a rate or load, :class:`~llmsched_env.scenario.Scenario`) sampled for the
seed and written as a ``timed_trace`` JSONL file (``timestamp``, ``input_length``, ``output_length``), which the
client replays at its timestamps with ``ignore_eos``, so every scheduler sees the same requests at the same times
and every request produces exactly its output length. The seeds' runs share a server (its Numba kernels and model
loaded once); the preemptions of each run are the difference of ``vllm:num_preemptions_total`` on the server's
``/metrics`` before and after it.

The result is a comparison (:class:`~llmsched_env.report.Comparison`, the report of ``llmsched compare``): one run
per replay, read as :mod:`live_backend.serve_report` says, with what the client measured (throughput, TTFT / TPOT
/ ITL / end-to-end latency percentiles, goodput and the share of requests within the TTFT and TPOT targets: SLO
attainment), the server's preemptions, the scheduler's own counters (its decisions, fallbacks, time per
iteration), and, beside it, the simulator's prediction for the same arrivals (the policy on
:class:`~llmsched_env.simulator.SimulatedEngine` with the cost profile and the server's KV cache).

A workload request of output ``o`` asks for ``o + 1`` tokens, as on the in-process live backend: the first comes
from the prefill, the other ``o`` from decodes (``docs/model.md``).
"""

from __future__ import annotations

import json
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

from baselines.compare import realised_fluid
from live_backend import serve_report
from live_backend.calibrate import calibrate_from_log, read_iteration_log, relative_errors
from live_backend.launcher import vllm_serve_arguments
from live_backend.serve_settings import (
    ServeSettings,
    build_serve_policy,
    needs_prior,
    parse_serve_settings,
    reads_lengths,
)
from llmsched_env.errors import ConfigError, EngineFailure
from llmsched_env.fluid import FluidSolution
from llmsched_env.report import SIM_SUFFIX, Comparison, PolicyRun
from llmsched_env.scenario import Scenario
from llmsched_env.workload import Arrivals

#: Seconds a server may take to load its model and warm its policy up.
START_TIMEOUT_S = 600.0
#: Seconds between two samples of a server's gauges while a replay runs (its KV memory and queue over time).
SAMPLE_EVERY_S = 0.1
#: Token ids per ``hash_ids`` entry of a timed trace (``vllm bench serve``'s ``--timed-trace-chunk-hash-size``).
CHUNK_TOKENS = 16
#: Seconds ``vllm bench serve``'s client keeps an idle connection for reuse (its ``aiohttp.TCPConnector``).
CLIENT_KEEP_ALIVE_S = 60
#: Seconds a served engine keeps an idle connection open (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, vLLM's default 5), unless
#: the environment sets it. Above the client's, so that the client always closes an idle connection first: with the
#: server's 5 s, a request sent on a pooled connection as the server closed it after a quiet spell in the arrivals
#: failed with "Server disconnected", a failed request that no scheduler caused.
SERVER_KEEP_ALIVE_S = CLIENT_KEEP_ALIVE_S + 15


def server_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment of a served engine started from ``base``: its output unbuffered (the log is read as it
    runs), and its idle connections kept longer than the client's (:data:`SERVER_KEEP_ALIVE_S`)."""
    return {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(SERVER_KEEP_ALIVE_S), **base, "PYTHONUNBUFFERED": "1"}


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
                                         env=server_environment(dict(os.environ)), start_new_session=True)

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


def bench_serve(plan: ServeBenchPlan, work: Path, on_run: Callable[[str, int], None] = lambda policy, seed: None,
                with_sim: bool = True) -> Comparison:
    """Run the plan (servers one after another, seeds on each): a comparison of every served replay, in policy then
    seed order, each followed (``with_sim``) by the simulator's run of it, ``<policy> (sim)``
    (:mod:`live_backend.serve_report`); the servers' calibration in ``extra["serving"]``.

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
    runs: list[PolicyRun] = []
    fluids: dict[float, FluidSolution] = {}
    benchmarks: dict[tuple[int, int], tuple[FluidSolution, FluidSolution]] = {}  # (seed, KV tokens): offered, realised
    calibration: dict[str, Any] = {}
    rate = plan.scenario.base_rate
    labels = []
    for policy in plan.policies:
        label = Path(policy).name
        labels += [label, label + SIM_SUFFIX] if with_sim else [label]
        iteration_log = work / f"{label}-iterations.jsonl"
        iteration_log.unlink(missing_ok=True)
        settings = replace(plan.settings_for(policy), stats_file=str((work / f"{label}-stats.json").resolve()),
                           iteration_log=str(iteration_log.resolve()))
        server = Server(plan.model, settings, plan.vllm_args, work / f"{label}-server.log")
        try:
            server.wait_ready()
            blocks, block_size = cache_blocks(server.metrics())
            # The cache a request may use: vLLM keeps one block back (its null block).
            scenario = replace(plan.scenario, capacity_tokens=(blocks - 1) * block_size, block_size=block_size,
                               output_lengths_known=settings.lengths_known)
            logged = len(_logged_iterations(iteration_log))  # iterations in the server's log before a replay
            for seed in plan.seeds:
                on_run(label, seed)
                arrivals, trace = traces[seed]
                benchmark = (seed, scenario.capacity_tokens)  # every server of a bench has the same cache, as a rule
                if benchmark not in benchmarks:
                    fluid = scenario.fluid(arrivals, plan.horizon_s)  # a trace's: the seed's realised mix
                    benchmarks[benchmark] = (fluid, realised_fluid(scenario, arrivals, plan.horizon_s, fluid))
                fluid, realised = benchmarks[benchmark]
                fluids.setdefault(rate, fluid)
                before_metrics = server.metrics()
                stats_before = _read_stats(settings)
                result_path = work / f"{label}-seed{seed}.json"
                log_path = work / f"{label}-seed{seed}-client.log"
                with open(log_path, "w") as client_log:
                    client_process = subprocess.Popen(
                        client_command(plan, server, trace, len(arrivals), result_path, seed), stdout=client_log,
                        stderr=subprocess.STDOUT)
                    samples = watch_server(server, client_process)
                    code = client_process.returncode
                if code != 0 or not result_path.is_file():
                    raise EngineFailure(f"vllm bench serve failed against {label} (seed {seed}, status {code}); "
                                        f"see {log_path}")
                time.sleep(1.5)  # the scheduler's counters reach its stats file at most once a second
                after_metrics = server.metrics()
                client = json.loads(result_path.read_text())
                preemptions = int(metric_value(after_metrics, "vllm:num_preemptions_total")
                                  - metric_value(before_metrics, "vllm:num_preemptions_total"))
                # The batches this replay ran (the log is flushed with the stats): their count and engine time.
                durations = _logged_iterations(iteration_log)
                ran, logged = durations[logged:], len(durations)
                server_figures: dict[str, Any] = {"batches": len(ran), "busy_s": float(sum(ran))}
                stats_after = _read_stats(settings)
                if stats_after is not None:
                    before = stats_before or {}
                    for key in ("iterations", "decisions", "fallbacks", "policy_seconds", "schedule_seconds"):
                        server_figures[f"scheduler_{key}"] = stats_after[key] - before.get(key, 0)
                    iterations = max(server_figures["scheduler_iterations"], 1)
                    server_figures["policy_us_per_iteration"] = (
                        1e6 * server_figures.pop("scheduler_policy_seconds") / iterations)
                    server_figures["schedule_us_per_iteration"] = (
                        1e6 * server_figures.pop("scheduler_schedule_seconds") / iterations)
                    # An adaptive policy's view of the engine's speed at the run's end (null for the others).
                    server_figures["engine_vs_profile"] = stats_after.get("engine_vs_profile")
                    server_figures["cost_factor"] = stats_after.get("cost_factor", 1.0)
                runs.append(serve_report.served_run(
                    label, client, arrivals, plan.horizon_s, fluid=fluid, realised=realised, rate=rate, seed=seed,
                    kv_blocks=blocks, block_size=block_size, preemptions=preemptions, server_figures=server_figures,
                    samples=samples))
                if with_sim:
                    served_policy = build_serve_policy(settings, scenario)  # for vllm: llmsched's model of vLLM's
                    runs.append(serve_report.simulated_run(
                        label + SIM_SUFFIX, served_policy, scenario, arrivals, plan.horizon_s, fluid=fluid,
                        realised=realised, rate=rate, seed=seed, slo_ms=(plan.slo_ttft_ms, plan.slo_tpot_ms)))
        finally:
            server.stop()
        calibration[label] = served_calibration(plan, iteration_log)
    serving = {"model": plan.model, "vllm_args": list(plan.vllm_args), "slo_ttft_ms": plan.slo_ttft_ms,
               "slo_tpot_ms": plan.slo_tpot_ms, "calibration": calibration}
    return Comparison(runs, fluids, plan.horizon_s, tuple(labels), (rate,), tuple(plan.seeds),
                      extra={"serving": serving})


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


def watch_server(server: Server, client: subprocess.Popen, every_s: float = SAMPLE_EVERY_S
                 ) -> serve_report.ServerSamples:
    """Sample the server's KV-cache usage and its running and waiting requests (``/metrics``) every ``every_s``
    until ``client`` exits; a sample the server does not answer is skipped."""
    rows = []
    while client.poll() is None:
        started = time.perf_counter()
        try:
            text = server.metrics()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            text = None
        if text is not None:
            rows.append((started, metric_value(text, "vllm:kv_cache_usage_perc"),
                         metric_value(text, "vllm:num_requests_running"),
                         metric_value(text, "vllm:num_requests_waiting")))
        time.sleep(max(every_s - (time.perf_counter() - started), 0.0))
    table = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return serve_report.ServerSamples(*table.T)


def _logged_iterations(log: Path) -> list[float]:
    """The durations (s) of the iterations a server's iteration log holds so far, in order."""
    if not log.is_file():
        return []
    return [sample.duration for sample in read_iteration_log(log)[1]]


def _read_stats(settings: ServeSettings) -> dict[str, Any] | None:
    if settings.stats_file is None or not Path(settings.stats_file).is_file():
        return None
    return json.loads(Path(settings.stats_file).read_text())


def split_vllm_args(text: str | None) -> tuple[str, ...]:
    """``--vllm-args "..."`` as the server's argument list (shell quoting rules)."""
    return tuple(shlex.split(text)) if text else ()
