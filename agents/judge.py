"""The judging table: a workload-independent agent on every scenario and load of the suite, against the best baseline
of each cell, on the same arrivals.

Per cell (a workload of the suite in one length setting, or a held-out real trace, at one load), the agent and every
baseline with the same information run on the same arrivals of each held-out seed (:func:`baselines.compare.compare`,
the evaluation loop of every policy): with output lengths known WAIT and Nested WAIT (oracle, adaptive, and Nested
WAIT's adaptive margin), vLLM and Sarathi; with them hidden, the Nested WAIT family, vLLM and Sarathi. The cell's
**best baseline** has the lowest mean p99 latency among those whose mean throughput is within the throughput margin
(1 %) of the highest: where several serve the same load, 0.16 % more throughput (noise) does not make one with a
23 % higher p99 the reference.

**Verdict.** Paired over seeds (agent − best baseline; the same arrivals, so the arrival noise cancels), with 95 %
Student-t intervals: **worse** when the throughput difference's interval reaches below −1 % of the best baseline's
throughput, or the p99 difference's reaches above +5 % of its p99, or the censored p99's (every arrival, those not
finished at their age at the end of the run: :mod:`llmsched_env.metrics`) above +5 % of its censored p99
(non-inferiority fails); otherwise **better** when the throughput interval is above 0 or the p99 interval below 0;
otherwise **level**. ``decided_by`` names the quantity that set a *worse* or *better* verdict. The censored p99 guards
the p99 of the completed requests, which leaves out the requests still waiting at the horizon (up to 37 % of them
in the bursty cells): leaving the oldest unserved lowers that p99, and raises the censored one. The realised regret
difference is reported beside them; a ratio of regrets is not used, being unstable where the best baseline's regret
is near zero.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from baselines.compare import SEES_OUTPUT_LENGTHS, compare
from llmsched_env.errors import ConfigError
from llmsched_env.executor import Executor, LocalExecutor, TaskFailure, failed_task
from llmsched_env.report import failures_markdown, mean_and_halfwidth
from llmsched_env.scenario import Scenario
from llmsched_env.scenarios import load_scenario
from llmsched_env.workload import ArrivalProcess, LengthSampleWorkload, read_trace_csv

#: The baselines a cell's agent is judged against, by what they know: with lengths known every one, hidden only
#: those that never read a request's output length. The residual agents' bases (:data:`agents.residual.BASES`) are
#: among them, so that the table shows what an agent adds to its base.
HIDDEN_BASELINES = ("nested-wait", "nested-wait-adaptive", "nested-wait-adaptive-stall-free",
                    "nested-wait-adaptive-margin-stall-free", "nested-wait-adaptive-margin-backlog-stall-free",
                    "nested-wait-margin", "vllm", "sarathi")
KNOWN_BASELINES = ("wait", "wait-adaptive", "wait-adaptive-stall-free", "wait-adaptive-backlog-stall-free",
                   *HIDDEN_BASELINES)
#: Non-inferiority margins: throughput no lower than −1 % of the best baseline's, p99 no higher than +5 % of its.
THROUGHPUT_MARGIN = 0.01
P99_MARGIN = 0.05
#: The p99 over every arrival, each request not finished at its age at the end of the run (a guard: module docstring).
CENSORED_P99 = "p99_censored_latency_s"
#: Held-out real traces (``../shared/data``): their lengths, Poisson arrivals, on the Azure-like scenario's engine.
TRACES = {"azure-conv-trace": ("azure_conv_trace.csv", "azure-conv-like"),
          "azure-code-trace": ("azure_code_trace.csv", "azure-code-like")}
TRACE_LOADS = (0.8, 0.9)
#: The held-out seeds of the judging table. Ten leave some bursty cells' throughput intervals wider than the 1 %
#: margin itself (± 0.25 req/s against 0.20), so that a policy level on the mean is judged worse; thirty halve them.
JUDGING_SEEDS = tuple(range(30))


def default_data_dir() -> Path:
    """``../shared/data`` beside the project, where the real traces are when present."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def trace_cell_names() -> list[str]:
    """The names of the held-out trace cells (:data:`TRACES`), each with lengths known and hidden."""
    return [name + suffix for name in TRACES for suffix in ("", "-hidden")]


def judging_cells(workloads: Sequence[str], data_dir: Path | None, *, traces: Sequence[str] | None = None,
                  loads: Sequence[float] | None = None, horizon: float | None = None) -> list[dict[str, Any]]:
    """Every (workload, load) cell to judge: each workload's swept loads, and each trace of ``traces`` (default:
    every one found in ``data_dir``; :func:`trace_cell_names`) at :data:`TRACE_LOADS`.

    ``loads`` replaces every workload's and trace's loads, and ``horizon`` (seconds) every cell's run length: an
    hour's run shows what the suite's 300 s and 600 s episodes cannot (a backlog that builds over many bursts).
    A trace named in ``traces`` but not found in ``data_dir`` is a clear error.
    """
    if horizon is not None and not (math.isfinite(horizon) and horizon > 0):
        raise ConfigError(f"the judging horizon must be finite and > 0 s, got {horizon!r}")
    if loads is not None and (not loads or not all(math.isfinite(load) and load > 0 for load in loads)):
        raise ConfigError(f"the judging loads must be finite and > 0, got {list(loads)!r}")
    known_traces = trace_cell_names()
    for name in traces or ():
        if name not in known_traces:
            raise ConfigError(f"{name!r} is not a held-out trace: expected one of {', '.join(known_traces)}")
    cells = []
    for name in workloads:
        try:
            spec = load_scenario(name)
        except ConfigError:
            if name.endswith(".toml"):
                raise  # a scenario file's own error names the file, line and field
            raise ConfigError(f"the workload {name!r} is neither a scenario (llmsched scenarios lists them; "
                              f"NAME-hidden where declared) nor a held-out trace ({', '.join(known_traces)})"
                              ) from None
        for load, rate in zip(loads or spec.loads, spec.rates(tuple(loads) if loads else None)):
            cells.append({"workload": name, "load": load, "rate": rate, "horizon": horizon or spec.horizon_s,
                          "known": spec.scenario.output_lengths_known, "trace": None})
    for name, (file, engine_of) in TRACES.items():
        for known in (True, False):
            cell_name = name + ("" if known else "-hidden")
            if traces is not None and cell_name not in traces:
                continue
            path = data_dir / file if data_dir is not None else None
            if path is None or not path.is_file():
                if traces is not None:
                    raise ConfigError(f"the held-out trace {cell_name!r} needs {file} in "
                                      f"{data_dir if data_dir is not None else 'the data folder (../shared/data)'}: "
                                      "not found")
                continue
            spec = load_scenario(engine_of)
            for load in loads or TRACE_LOADS:
                cells.append({"workload": cell_name, "load": load, "rate": None, "horizon": horizon or spec.horizon_s,
                              "known": known, "trace": str(path), "engine_of": engine_of})
    return cells


def named_cells(text: str, data_dir: Path | None, *, horizon: float | None = None) -> list[dict[str, Any]]:
    """The cells named by ``WORKLOAD@LOAD,...`` (a suite scenario, ``NAME-hidden`` where declared, or a held-out
    trace of :func:`trace_cell_names`, read from ``data_dir``), in that order, as :func:`judging_cells` builds them.
    An item that names no such cell is a :class:`ConfigError` that quotes it."""
    cells: list[dict[str, Any]] = []
    for item in text.split(","):
        workload, at, load = item.strip().rpartition("@")
        try:
            try:
                rho = float(load)
            except ValueError:
                rho = math.nan
            if not (at and workload) or math.isnan(rho):
                raise ConfigError("expected WORKLOAD@LOAD, a load such as 0.9")
            if workload in trace_cell_names():
                cells += judging_cells([], data_dir, traces=[workload], loads=[rho], horizon=horizon)
            else:
                cells += judging_cells([workload], None, loads=[rho], horizon=horizon)
        except ConfigError as error:
            raise ConfigError(f"--cells: {item.strip()!r} is not WORKLOAD@LOAD of a suite scenario or a held-out "
                              f"trace: {error}") from None
    return cells


def cell_scenario(cell: dict[str, Any]) -> Scenario:
    """The scenario a cell runs (at its load's rate)."""
    if cell["trace"] is None:
        spec = load_scenario(cell["workload"])
        return spec.scenario.at_rate(cell["rate"])
    base = load_scenario(cell["engine_of"]).scenario
    _, prompts, outputs = read_trace_csv(cell["trace"], require_arrivals=False)
    lengths = LengthSampleWorkload(prompts, outputs, 1.0, ArrivalProcess("poisson"))
    scenario = replace(base, trace=lengths, output_lengths_known=cell["known"])
    return scenario.at_rate(round(scenario.rate_for_load(cell["load"]), 4))


@lru_cache(maxsize=4)
def _agent(agent_dir: str) -> tuple[Any, dict[str, Any], str]:
    from agents.residual import read_residual_agent

    spec, network = read_residual_agent(agent_dir)
    return network, spec.env_kwargs, spec.env_id


def judge_cell(agent_dir: str, cell: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """One cell's runs (the agent in ``agent_dir`` and its baselines on every seed) and verdict."""
    from agents.residual import control_settings

    network, env_kwargs, env_id = _agent(agent_dir)
    settings = control_settings(env_kwargs, env_id)
    return judge_network(network, settings.pop("interval_s"), cell, seeds, **settings)


def judge_network(network: Any, interval_s: float, cell: dict[str, Any], seeds: Sequence[int], *,
                  base: str | None = None, batching: str = "whole", dead_zone: float = 0.0,
                  compute_load: bool = False, load_trend: bool = False) -> dict[str, Any]:
    """One cell's verdict for a residual ``network`` deciding every ``interval_s`` (what
    :class:`~agents.residual.ResidualAgentPolicy` takes: a trained actor, or a
    :class:`~agents.residual.ConstantAction`, adjusting ``base`` or the ``batching`` family's, with its
    ``dead_zone``, reading the compute load with ``compute_load`` and its trend with ``load_trend``), run beside
    the cell's baselines on every seed."""
    from agents.residual import ResidualAgentPolicy

    scenario = cell_scenario(cell)
    baselines = KNOWN_BASELINES if cell["known"] else HIDDEN_BASELINES

    def factory(setting: Scenario, horizon: float) -> ResidualAgentPolicy:
        return ResidualAgentPolicy(network, setting, horizon, interval_s=interval_s, base=base, batching=batching,
                                   dead_zone=dead_zone, compute_load=compute_load, load_trend=load_trend)

    sees = (SEES_OUTPUT_LENGTHS | {"agent"}) if cell["known"] else frozenset()
    comparison = compare(scenario, ["agent", *baselines], [scenario.base_rate], cell["horizon"], seeds=seeds,
                         factories={"agent": factory}, sees_output_lengths=sees)
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for run in comparison.runs:
        rows.setdefault(run.policy, {})[run.seed] = run.row
    return verdict(cell, rows, baselines)


def _value(row: dict[str, Any], field: str) -> float:
    value = row.get(field)
    return float("nan") if value is None else float(value)


def best_baseline(means: dict[str, tuple[float, float]]) -> str:
    """The cell's best baseline from each one's ``(mean throughput, mean p99)``: the lowest p99 among those within
    :data:`THROUGHPUT_MARGIN` of the highest throughput (the higher throughput on a tie; a p99 that is not a number
    counts as the highest)."""
    top = max(throughput for throughput, _ in means.values())
    tied = [p for p, (throughput, _) in means.items() if throughput >= (1 - THROUGHPUT_MARGIN) * top]

    def p99(policy: str) -> float:
        value = means[policy][1]
        return value if np.isfinite(value) else float("inf")

    return min(tied, key=lambda p: (p99(p), -means[p][0]))


def verdict(cell: dict[str, Any], rows: dict[str, dict[int, dict[str, Any]]], baselines: Sequence[str]
            ) -> dict[str, Any]:
    """The cell's verdict (see the module docstring) from each policy's row per seed."""
    def mean(policy: str, field: str) -> float:
        return float(np.nanmean([_value(row, field) for row in rows[policy].values()]))

    best = best_baseline({p: (mean(p, "throughput_rps"), mean(p, "p99_latency_s")) for p in baselines})
    seeds = sorted(set(rows["agent"]) & set(rows[best]))

    def paired(field: str) -> tuple[float, float]:
        return mean_and_halfwidth(np.array([_value(rows["agent"][s], field) - _value(rows[best][s], field)
                                            for s in seeds]))

    tp, tp_half = paired("throughput_rps")
    p99, p99_half = paired("p99_latency_s")
    censored, censored_half = paired(CENSORED_P99)
    regret, regret_half = paired("regret_requests")
    best_tp, best_p99, best_censored = (mean(best, "throughput_rps"), mean(best, "p99_latency_s"),
                                        mean(best, CENSORED_P99))
    worse = {"throughput": tp - tp_half < -THROUGHPUT_MARGIN * best_tp,
             "p99": p99 + p99_half > P99_MARGIN * best_p99,
             "censored p99": censored + censored_half > P99_MARGIN * best_censored}
    if any(worse.values()):
        outcome, decided = "worse", next(quantity for quantity, failed in worse.items() if failed)
    elif tp - tp_half > 0 or p99 + p99_half < 0:
        outcome, decided = "better", "throughput" if tp - tp_half > 0 else "p99"
    else:
        outcome, decided = "level", ""
    return {"workload": cell["workload"], "load": cell["load"], "known_lengths": cell["known"],
            "horizon_s": cell.get("horizon"), "seeds": len(seeds),
            "best_baseline": best, "best_throughput_rps": best_tp, "best_p99_latency_s": best_p99,
            "agent_throughput_rps": mean("agent", "throughput_rps"),
            "agent_p99_latency_s": mean("agent", "p99_latency_s"),
            "best_censored_p99_latency_s": best_censored, "agent_censored_p99_latency_s": mean("agent", CENSORED_P99),
            "agent_evictions": mean("agent", "evictions"), "best_evictions": mean(best, "evictions"),
            "throughput_diff_rps": tp, "throughput_diff_ci95": tp_half, "p99_diff_s": p99, "p99_diff_ci95": p99_half,
            "censored_p99_diff_s": censored, "censored_p99_diff_ci95": censored_half,
            "regret_diff_requests": regret, "regret_diff_ci95": regret_half, "verdict": outcome, "decided_by": decided,
            "baselines": {p: {"throughput_rps": mean(p, "throughput_rps"), "p99_latency_s": mean(p, "p99_latency_s"),
                              CENSORED_P99: mean(p, CENSORED_P99)}
                          for p in baselines}}


class Judging(NamedTuple):
    """What :func:`judge` found: a verdict per cell, and the cells that failed at run time."""

    cells: list[dict[str, Any]]  # in the order of the workloads and loads judged, the failed ones left out
    failed: list[dict[str, Any]]  # each failed cell's workload, load and error (llmsched_env.executor)


def judge(agent_dir: str | Path, *, seeds: Sequence[int] = JUDGING_SEEDS, workloads: Sequence[str] | None = None,
          data_dir: Path | None = None, loads: Sequence[float] | None = None, horizon: float | None = None,
          jobs: int | None = None, executor: Executor | None = None,
          on_cell_done: Callable[[dict[str, Any]], None] | None = None) -> Judging:
    """The judging table of the agent in ``agent_dir``: one verdict per cell, on ``executor`` (default: a
    :class:`~llmsched_env.executor.LocalExecutor` of ``jobs`` processes, every core by default; on Ray, the agent's
    folder must be readable at the same path on the workers).

    ``workloads`` default to the suite in both length settings and every held-out trace found in ``data_dir``;
    given, they name scenarios and traces (:func:`trace_cell_names`) to judge, and only those. ``loads`` and
    ``horizon`` replace the cells' own (:func:`judging_cells`). A cell that fails at run time (an engine fault)
    loses only its own verdict: it is listed in ``failed``."""
    from agents.residual_env import suite_workloads

    _agent(str(agent_dir))  # a directory that is not a residual agent fails here, before any run
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if workloads is None:
        scenarios, traces = suite_workloads(), None
    else:
        named_traces = set(trace_cell_names())
        scenarios = [name for name in workloads if name not in named_traces]
        traces = [name for name in workloads if name in named_traces]
    cells = judging_cells(scenarios, data_dir, traces=traces, loads=loads, horizon=horizon)
    # Longest first, so that a diurnal day does not start last and run alone.
    order = sorted(range(len(cells)), key=lambda i: -cells[i]["horizon"])
    executor = executor or LocalExecutor(jobs)

    def done(_: int, row: dict[str, Any] | TaskFailure) -> None:
        if on_cell_done is not None and not isinstance(row, TaskFailure):
            on_cell_done(row)

    rows = executor.map(judge_cell, [(str(agent_dir), cells[i], tuple(seeds)) for i in order], on_done=done,
                        keep_going=True)
    results: list[dict[str, Any] | TaskFailure] = [{} for _ in cells]
    for position, i in enumerate(order):
        results[i] = rows[position]
    return Judging([row for row in results if not isinstance(row, TaskFailure)],
                   [failed_task({"workload": cell["workload"], "load": cell["load"], "known_lengths": cell["known"]},
                                row) for cell, row in zip(cells, results) if isinstance(row, TaskFailure)])


def markdown_table(rows: Sequence[dict[str, Any]], failed: Sequence[dict[str, Any]] = (),
                   horizon: float | None = None) -> str:
    """The judging table as Markdown, one line per cell, then the cells that failed at run time, if any; with
    ``horizon``, a line saying that every cell ran for that long (instead of its scenario's horizon)."""
    lines = ["| workload | ρ | best baseline | its req/s | its p99 s | agent − best req/s (95 %) | agent − best p99 s "
             "(95 %) | agent − best censored p99 s (95 %) | regret diff | verdict |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        decided = f" ({r['decided_by']})" if r["decided_by"] else ""
        lines.append(f"| {r['workload']} | {r['load']:g} | {r['best_baseline']} | {r['best_throughput_rps']:.3f} | "
                     f"{r['best_p99_latency_s']:.2f} | "
                     f"{r['throughput_diff_rps']:+.3f} ± {r['throughput_diff_ci95']:.3f} | "
                     f"{r['p99_diff_s']:+.2f} ± {r['p99_diff_ci95']:.2f} | "
                     f"{r['censored_p99_diff_s']:+.2f} ± {r['censored_p99_diff_ci95']:.2f} | "
                     f"{r['regret_diff_requests']:+.1f} | "
                     f"{r['verdict']}{decided} |")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("better", "level", "worse")}
    lines.append("")
    cells = f"{len(rows)} cell" + ("" if len(rows) == 1 else "s")
    lines.append(f"{cells}: {counts['better']} better, {counts['level']} level, {counts['worse']} worse.")
    if horizon is not None:
        lines.append(f"Every cell ran for {horizon:,g} s, not its scenario's horizon.")
    return "\n".join(lines) + "\n" + failures_markdown(failed)
