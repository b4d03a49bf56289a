"""The paper's experiment as its authors ran it (``llmsched paper``; docs/paper.md).

arXiv 2504.11320 (v4, section 6 and appendix B) compares WAIT / Nested WAIT with vLLM and Sarathi on
Vidur's Llama-2-7B / A100 model. This module runs that protocol on the simulated engine:

1. **Workloads** (:data:`WORKLOADS`): single type p512/d20 at λ = 12 … 24, two types 0.7·p512/d20 +
   0.3·p512/d50 at λ = 12 … 24, long decode p512/d1000 at λ = 0.5 … 5.0. Decode lengths are Vidur's (the
   prefill emits the first token), so ``o = d − 1`` decode iterations in this project's notation.
2. **Policies** with the authors' knobs: ``vllm-v0`` and ``sarathi-512`` as Vidur simulates them, and
   WAIT-CP (single type, long decode) or Nested WAIT-CP (two types) with 256-token chunks.
3. **The ``tl`` sweep**: for each rate, WAIT-CP's ``tl`` is the value of ``{20, 30, …, 200}`` with the lowest
   mean latency on *tuning* seeds, disjoint from the reported ones, over runs as long as the reported ones
   (``tuning_requests``; the authors tuned per λ, their seeds and run lengths are not stated; shorter tuning
   runs hide instability and pick smaller ``tl``, docs/paper.md measures by how much).
4. **Replications**: each (policy, rate) point is the mean over ``replications`` runs of ``requests``
   requests (Poisson arrivals), each measured over a central window: the authors' ``steady_slice`` drops
   the first quarter of the requests (warm-up) and the last 300 (drain), by arrival order.
5. **Transition λ*** by two rules, both reported: the paper's (the largest rate up to which mean latency
   stays bounded, "a stable policy's empirical mean latency converges to a finite limit" while an unstable
   one's grows linearly, here the window's second half averages at most :data:`GROWTH_LIMIT` times its
   first; and the effective completion rate, completions net of eviction restarts, tracks the offered load
   within :data:`COMPLETION_TOLERANCE`) and the project's bounded-backlog rule (backlog when arrivals end at
   most 10 s of arrivals, as ``llmsched stability``, plus what a request takes at the lowest rate). Each with its
   interval: the transition lies between λ* and the next rate of the grid; the spread of λ* over replications is
   given too.
6. **Repeated runs** at the two rates next to the highest transition (λ* and the first rate above it; the two
   highest rates when λ* is the grid's top), ``repeats`` seeds each (20, as the paper's appendix B.3), mean ±
   sample standard deviation.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from baselines.fcfs import sarathi_vidur_policy, vllm_v0_policy
from baselines.wait_cp import (
    AUTHORS_COMMIT,
    PAPER_CHUNK,
    PAPER_TOTAL_LIMITS,
    ChunkedBookingPolicy,
)
from llmsched_env.engine import FINISHED, Engine, IterationOutcome
from llmsched_env.errors import ConfigError
from llmsched_env.policy import Policy
from llmsched_env.runner import run
from llmsched_env.scenario import Scenario, build_scenario
from llmsched_env.workload import Arrivals

#: Latency counts as bounded while its mean over the second half of the window is at most this multiple of
#: its mean over the first half (an unstable queue's latency grows linearly in time: about 1.8 over this window).
GROWTH_LIMIT = 1.4
#: The effective completion rate tracks the offered load when it is at least (1 - this) of it (a run's window
#: holds 7,200 requests: Poisson noise of about 1.2 % per run).
COMPLETION_TOLERANCE = 0.02
#: The bounded-backlog rule: at most this many seconds of arrivals still in the system when arrivals end.
BACKLOG_WINDOW_S = 10.0
#: The fewest requests a run's measurement window may hold.
MIN_WINDOW_REQUESTS = 100
#: Seeds: reported runs 0 .., tuning runs from 10,000, repeated runs from 20,000 (disjoint by construction).
TUNING_SEED_BASE = 10_000
REPEAT_SEED_BASE = 20_000


@dataclass(frozen=True)
class PaperWorkload:
    """One of the paper's synthetic workloads: types ``(prompt, decode tokens as Vidur counts them, share)``."""

    name: str
    types: tuple[tuple[int, int, float], ...]
    rates: tuple[float, ...]
    nested: bool  # Nested WAIT-CP (segments at the output lengths) rather than WAIT-CP
    source: str

    def types_option(self, rate: float, prefill_emits_token: bool = True) -> str:
        """The ``--types`` text of this workload at total rate ``rate``: ``o = d - 1`` decode iterations after
        the prefill when the prefill emits the first of the ``d`` tokens (Vidur), else ``o = d``."""
        offset = 1 if prefill_emits_token else 0
        return ";".join(f"p={p},o={d - offset},rate={rate * share:.12g}" for p, d, share in self.types)


WORKLOADS = {
    "single": PaperWorkload("single", ((512, 20, 1.0),), tuple(float(r) for r in range(12, 25)), False,
                            "v4 section 6.1, single-type p512d20, λ ∈ {12, …, 24}"),
    "two-type": PaperWorkload("two-type", ((512, 20, 0.7), (512, 50, 0.3)), tuple(float(r) for r in range(12, 25)),
                              True, "v4 section 6.1, two-type 0.7·p512d20 + 0.3·p512d50"),
    "long-decode": PaperWorkload("long-decode", ((512, 1000, 1.0),), tuple(r / 2 for r in range(1, 11)), False,
                                 "v4 section 6.1, long-decode p512d1000, λ = 0.5, 1.0, …, 5.0"),
}


@dataclass(frozen=True)
class PaperSetup:
    """The knobs of the experiment; each default is the paper's or its code's, or a stated assumption
    (docs/paper.md lists where each comes from)."""

    profile: str = "llama2-7b-a100"  # the project's fit to Vidur's Llama-2-7B / A100 profiles
    memory_tokens: int = 136_992  # ≈ 1.37·10^5 tokens (v4), 8,562 blocks of 16
    block_size: int = 16  # Vidur's default
    requests: int = 10_000  # per replication (assumption: the paper's eviction table and horizon check use 10,000)
    tuning_requests: int | None = None  # per tl-sweep run; None: as many as the reported runs (see docs/paper.md)
    warmup_fraction: float = 0.25  # the authors' steady_slice: the first quarter ...
    drain_requests: int = 300  # ... and the last 300 requests are left out
    chunk: int = PAPER_CHUNK
    total_limits: tuple[int, ...] = PAPER_TOTAL_LIMITS
    cost: str | None = None  # overrides of the profile's coefficients (sensitivity runs)
    wait_gate: bool = True  # WAIT-CP's per-segment gate (the authors' wait_gate; off = their "WAIT-no-wait")
    token_gate: bool = True  # WAIT-CP's batch-token gate (the authors' WAIT_CP_GATE)
    prefill_emits_token: bool = True  # Vidur: d decode tokens = the prefill's + d - 1 decode iterations

    def __post_init__(self) -> None:
        for name in ("requests", "tuning_requests"):
            count = getattr(self, name)
            if count is not None and len(range(count)[self.window(count)]) < MIN_WINDOW_REQUESTS:
                raise ConfigError(f"{name} must leave a measurement window of at least {MIN_WINDOW_REQUESTS} requests "
                                  f"after the first {self.warmup_fraction:.0%} and before the last "
                                  f"{self.drain_requests}, got {count}")
        if not self.total_limits or min(self.total_limits) < 1:
            raise ConfigError(f"total_limits must be >= 1, got {self.total_limits}")


    def window(self, requests: int) -> slice:
        """The measured requests of a run of ``requests``, by arrival order (the authors' ``steady_slice``)."""
        return slice(int(requests * self.warmup_fraction), requests - self.drain_requests)


def scenario_for(workload: PaperWorkload, rate: float, setup: PaperSetup) -> Scenario:
    """The simulated set-up of ``workload`` at total rate ``rate`` (lengths hidden: no policy here reads them)."""
    return build_scenario(types=workload.types_option(rate, setup.prefill_emits_token), profile=setup.profile,
                          cost=setup.cost,
                          memory_tokens=setup.memory_tokens, block_size=setup.block_size, hidden_lengths=True)


def paper_policy(name: str, workload: PaperWorkload, scenario: Scenario, setup: PaperSetup,
                 total_limit: int | None) -> Policy:
    """``vllm-v0``, ``sarathi-512``, or the workload's WAIT-CP / Nested WAIT-CP with ``tl = total_limit``."""
    if name == "vllm-v0":
        return vllm_v0_policy()
    if name == "sarathi-512":
        return sarathi_vidur_policy()
    if name == wait_policy_name(workload):
        if total_limit is None:
            raise ConfigError(f"{name} needs a total limit (tl)")
        return ChunkedBookingPolicy.for_mix(scenario.offered_mix(), total_limit, nested=workload.nested,
                                            chunk=setup.chunk, wait_gate=setup.wait_gate,
                                            token_gate=setup.token_gate)
    raise ConfigError(f"the paper's experiment runs vllm-v0, sarathi-512 and {wait_policy_name(workload)}, "
                      f"not {name!r}")


def wait_policy_name(workload: PaperWorkload) -> str:
    return "nested-wait-cp" if workload.nested else "wait-cp"


def first_requests(scenario: Scenario, count: int, seed: int) -> Arrivals:
    """The first ``count`` Poisson arrivals of ``seed``."""
    horizon = count / scenario.base_rate
    while True:
        arrivals = scenario.sample(horizon * 1.2 + 10.0, seed)
        if len(arrivals) >= count:
            return Arrivals(arrivals.arrival_time[:count], arrivals.prompt_len[:count], arrivals.output_len[:count])
        horizon *= 2


class _EvictionTimes:
    """Records when evictions happen (the effective completion rate nets them out)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, engine: Engine, outcome: IterationOutcome) -> None:
        if len(outcome.evicted):
            self.times.extend([outcome.start_time] * len(outcome.evicted))


@dataclass(frozen=True)
class PointTask:
    workload: str
    policy: str
    rate: float
    seed: int
    total_limit: int | None
    setup: PaperSetup


def run_point(task: PointTask) -> dict[str, object]:
    """One replication: the window's mean latency, effective completion rate, evictions, and the backlog
    when arrivals end. Unfinished window requests (an overloaded run cut at twice the arrival span) count
    with their time so far: a lower bound, and flagged in ``censored``."""
    workload, setup = WORKLOADS[task.workload], task.setup
    scenario = scenario_for(workload, task.rate, setup)
    arrivals = first_requests(scenario, setup.requests, task.seed)
    last_arrival = float(arrivals.arrival_time[-1])
    horizon = 2.0 * last_arrival + 60.0
    evictions = _EvictionTimes()
    policy = paper_policy(task.policy, workload, scenario, setup, task.total_limit)
    result = run(scenario.engine(), policy, arrivals, horizon, callbacks=[evictions], stall_after_s=None,
                 keep_records=True)
    records = result.records
    window = setup.window(setup.requests)
    arrived = records.arrival_time[window]
    done = records.status[window] == FINISHED
    finish = np.where(done, records.finish_time[window], result.end_time)
    latency = finish - arrived
    half = len(latency) // 2
    span_start, span_end = float(arrived[0]), float(arrived[-1])
    finished_at = records.finish_time[records.status == FINISHED]
    completions = int(np.count_nonzero((finished_at >= span_start) & (finished_at <= span_end)))
    evicted = np.asarray(evictions.times)
    restarts = int(np.count_nonzero((evicted >= span_start) & (evicted <= span_end)))
    backlog = setup.requests - int(np.count_nonzero(finished_at <= last_arrival))
    return {"workload": task.workload, "policy": task.policy, "rate_rps": task.rate, "seed": task.seed,
            "total_limit": task.total_limit, "mean_latency_s": float(latency.mean()),
            "p99_latency_s": float(np.percentile(latency, 99)),
            "latency_growth": float(latency[half:].mean() / latency[:half].mean()),
            "effective_completion_rps": (completions - restarts) / (span_end - span_start),
            "evictions": int(result.evictions), "restarts_in_window": restarts,
            "backlog_at_last_arrival": backlog, "censored": int(np.count_nonzero(~done))}


def _map(tasks: Sequence[PointTask], jobs: int, on_done: Callable[[dict[str, object]], None] | None
         ) -> list[dict[str, object]]:
    with contextlib.ExitStack() as stack:
        mapper = map if jobs <= 1 else stack.enter_context(ProcessPoolExecutor(max_workers=jobs)).map
        results = []
        for result in mapper(run_point, tasks):
            results.append(result)
            if on_done:
                on_done(result)
    return results


def _last_passing(rates: Sequence[float], passes: Sequence[bool]) -> float | None:
    """The largest rate up to which every rate passes (``None`` if the first fails)."""
    best = None
    for rate, ok in zip(rates, passes):
        if not ok:
            break
        best = rate
    return best


def transition(rates: Sequence[float], growth: Sequence[float], completion: Sequence[float]) -> float | None:
    """The paper's λ*: the largest rate up to which the latency stays bounded (its growth over the window at
    most :data:`GROWTH_LIMIT`) and the effective completion rate within :data:`COMPLETION_TOLERANCE` of the
    offered rate (``None`` if the lowest rate already fails)."""
    return _last_passing(rates, [grows <= GROWTH_LIMIT and done >= (1 - COMPLETION_TOLERANCE) * rate
                                 for rate, grows, done in zip(rates, growth, completion)])


def backlog_transition(rates: Sequence[float], backlog: Sequence[float], base_latency_s: float = 0.0) -> float | None:
    """The bounded-backlog λ*: the largest rate up to which the backlog when arrivals end is at most
    ``BACKLOG_WINDOW_S + base_latency_s`` seconds of arrivals (``base_latency_s``: the policy's latency at the
    lowest rate, what a request takes when the system keeps up; at 0.5 req/s a p512/d1000 request takes 11 s,
    more than the 10 s window alone)."""
    return _last_passing(rates, [left <= (BACKLOG_WINDOW_S + base_latency_s) * rate
                                 for rate, left in zip(rates, backlog)])


def _next_rate(rates: Sequence[float], rate: float | None) -> float | None:
    if rate is None:
        return rates[0]
    later = [r for r in rates if r > rate]
    return later[0] if later else None


@dataclass
class PaperResult:
    """What :func:`run_paper` measured (``to_json`` is the command's JSON document)."""

    workload: PaperWorkload
    setup: PaperSetup
    replications: int
    policies: list[str]
    tuned_total_limit: dict[float, int]
    tuning: list[dict[str, object]]
    points: list[dict[str, object]]
    curves: list[dict[str, object]] = field(default_factory=list)
    transitions: list[dict[str, object]] = field(default_factory=list)
    repeats: list[dict[str, object]] = field(default_factory=list)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"workload": asdict(self.workload), "setup": asdict(self.setup), "replications": self.replications,
                "policies": self.policies, "authors_commit": AUTHORS_COMMIT,
                "rules": {"growth_limit": GROWTH_LIMIT, "completion_tolerance": COMPLETION_TOLERANCE,
                          "backlog_window_s": BACKLOG_WINDOW_S},
                "tuned_total_limit": {f"{r:g}": tl for r, tl in self.tuned_total_limit.items()},
                "curves": self.curves, "transitions": self.transitions, "repeats": self.repeats,
                "tuning": self.tuning, "points": self.points, "wall_s": self.wall_s}


def summarize_points(result: PaperResult) -> None:
    """Fill ``result.curves`` (per policy and rate: means over replications, 95 % CIs) and ``result.transitions``
    (λ* by both rules, with the next rate and the spread over replications) from ``result.points``."""
    from llmsched_env.report import mean_and_halfwidth

    grid = sorted({float(p["rate_rps"]) for p in result.points})  # type: ignore[arg-type]
    result.curves, result.transitions = [], []
    for policy in result.policies:
        mine = [p for p in result.points if p["policy"] == policy]
        curve = []
        for rate in grid:
            at = [p for p in mine if p["rate_rps"] == rate]
            latency, half = mean_and_halfwidth(np.array([p["mean_latency_s"] for p in at]))
            completion, completion_half = mean_and_halfwidth(np.array([p["effective_completion_rps"] for p in at]))
            curve.append({"policy": policy, "rate_rps": rate, "mean_latency_s": latency, "latency_ci95": half,
                          "effective_completion_rps": completion, "completion_ci95": completion_half,
                          "latency_growth": float(np.mean([p["latency_growth"] for p in at])),
                          "backlog": float(np.mean([p["backlog_at_last_arrival"] for p in at])),
                          "evictions": float(np.mean([p["evictions"] for p in at])),
                          "censored": int(sum(int(p["censored"]) for p in at)),  # type: ignore[call-overload]
                          "total_limit": at[0]["total_limit"]})
        result.curves.extend(curve)
        paper_star = transition(grid, [c["latency_growth"] for c in curve],
                                [c["effective_completion_rps"] for c in curve])
        backlog_star = backlog_transition(grid, [c["backlog"] for c in curve], curve[0]["mean_latency_s"])
        per_replication = []
        for seed in sorted({int(p["seed"]) for p in mine}):  # type: ignore[call-overload]
            runs = sorted((p for p in mine if p["seed"] == seed), key=lambda p: p["rate_rps"])  # type: ignore[arg-type, return-value]
            per_replication.append(transition(grid, [p["latency_growth"] for p in runs],
                                              [p["effective_completion_rps"] for p in runs]))
        known = [r for r in per_replication if r is not None]
        result.transitions.append({
            "policy": policy, "paper_rate_rps": paper_star, "paper_next_rps": _next_rate(grid, paper_star),
            "backlog_rate_rps": backlog_star, "backlog_next_rps": _next_rate(grid, backlog_star),
            "per_replication_min_rps": min(known) if known else None,
            "per_replication_max_rps": max(known) if known else None})


def load_result(document: dict[str, Any]) -> PaperResult:
    """A :class:`PaperResult` from its ``paper.json``, summarised again from its runs (with today's rules)."""
    workload = document["workload"]
    setup = dict(document["setup"])
    setup["total_limits"] = tuple(setup["total_limits"])
    result = PaperResult(
        PaperWorkload(workload["name"], tuple(tuple(t) for t in workload["types"]), tuple(workload["rates"]),
                      workload["nested"], workload["source"]),
        PaperSetup(**setup), int(document["replications"]), list(document["policies"]),
        {float(r): int(tl) for r, tl in document["tuned_total_limit"].items()}, list(document["tuning"]),
        list(document["points"]), repeats=list(document["repeats"]), wall_s=float(document["wall_s"]))
    summarize_points(result)
    return result


def run_paper(workload_name: str, *, replications: int = 10, repeats: int = 20, tuning_seeds: int = 1,
              setup: PaperSetup | None = None, rates: Sequence[float] | None = None, jobs: int | None = None,
              on_done: Callable[[str, dict[str, object]], None] | None = None) -> PaperResult:
    """The whole protocol for one workload (see the module docstring); ``on_done(phase, point)`` after each run."""
    import time

    if workload_name not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload_name!r}; the paper's are {', '.join(WORKLOADS)}")
    if replications < 1 or repeats < 0 or tuning_seeds < 1:
        raise ConfigError(f"need replications >= 1, repeats >= 0 and tuning seeds >= 1, got {replications}, "
                          f"{repeats}, {tuning_seeds}")
    started = time.perf_counter()
    workload = WORKLOADS[workload_name]
    setup = setup or PaperSetup()
    grid = tuple(sorted(rates)) if rates is not None else workload.rates
    if not grid or min(grid) <= 0:
        raise ConfigError(f"rates must be > 0, got {list(grid)}")
    jobs = jobs or os.cpu_count() or 1
    wait_name = wait_policy_name(workload)
    policies = ["vllm-v0", "sarathi-512", wait_name]

    def phase(name: str) -> Callable[[dict[str, object]], None] | None:
        return (lambda point: on_done(name, point)) if on_done else None

    # 1. The tl sweep, on tuning seeds.
    tuning_setup = replace(setup, requests=min(setup.requests, setup.tuning_requests or setup.requests))
    tuning_tasks = [PointTask(workload.name, wait_name, rate, TUNING_SEED_BASE + s, tl, tuning_setup)
                    for rate in grid for tl in setup.total_limits for s in range(tuning_seeds)]
    tuning = _map(tuning_tasks, jobs, phase("tuning tl"))
    tuned: dict[float, int] = {}
    for rate in grid:
        by_tl = {tl: np.mean([p["mean_latency_s"] for p in tuning if p["rate_rps"] == rate
                              and p["total_limit"] == tl]) for tl in setup.total_limits}
        tuned[rate] = min(by_tl, key=lambda tl: (by_tl[tl], tl))

    # 2. The sweep, on the reported seeds.
    tasks = [PointTask(workload.name, policy, rate, seed, tuned[rate] if policy == wait_name else None, setup)
             for policy in policies for rate in grid for seed in range(replications)]
    points = _map(tasks, jobs, phase("sweep"))
    result = PaperResult(workload, setup, replications, policies, tuned, tuning, points)
    summarize_points(result)

    # 3. Repeated runs next to the highest transition.
    stars = [t["paper_rate_rps"] for t in result.transitions if t["paper_rate_rps"] is not None]
    if repeats and stars:
        top = max(stars)  # type: ignore[type-var]
        above = _next_rate(grid, top)
        below = [r for r in grid if r < top]
        # The last rate below the transition and the first above; at the grid's top, the two highest rates.
        near = [top, above] if above is not None else ([below[-1], top] if below else [top])
        repeat_tasks = [PointTask(workload.name, policy, rate, REPEAT_SEED_BASE + s,
                                  tuned[rate] if policy == wait_name else None, setup)
                        for rate in near for policy in policies for s in range(repeats)]
        repeated = _map(repeat_tasks, jobs, phase("repeated runs"))
        for rate in near:
            for policy in policies:
                values = np.array([p["mean_latency_s"] for p in repeated if p["rate_rps"] == rate
                                   and p["policy"] == policy])
                result.repeats.append({"rate_rps": rate, "policy": policy, "mean_latency_s": float(values.mean()),
                                       "std_s": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                       "runs": len(values)})
    result.wall_s = time.perf_counter() - started
    return result


def _interval(low: object, high: object) -> str:
    if low is None:
        return f"below {high:g}"
    return f"{low:g} [{low:g}, {high:g})" if high is not None else f"≥ {low:g} (the grid's top)"


def transition_rows(result: PaperResult) -> list[list[str]]:
    """Per policy: λ* by the paper's rule with its interval and spread, and by the bounded-backlog rule."""
    rows = []
    for t in result.transitions:
        low, high = t["per_replication_min_rps"], t["per_replication_max_rps"]
        spread = "–" if low is None else (f"{low:g}" if low == high else f"{low:g} – {high:g}")
        rows.append([str(t["policy"]), _interval(t["paper_rate_rps"], t["paper_next_rps"]), spread,
                     _interval(t["backlog_rate_rps"], t["backlog_next_rps"])])
    return rows


def to_markdown(result: PaperResult) -> str:
    """The command's report: set-up, λ* per policy, the latency table, the repeated runs."""
    w, s = result.workload, result.setup
    window = s.window(s.requests)
    lines = [f"# The paper's experiment: {w.name}", "",
             f"{w.source}; {result.replications} replications of {s.requests:,} requests, measured on requests "
             f"{window.start:,} to {window.stop:,} (arrival order); "
             f"{s.memory_tokens:,} KV tokens in blocks of {s.block_size}, profile {s.profile}"
             + (f" with {s.cost}" if s.cost else "")
             + ("" if s.prefill_emits_token else "; o = d decode iterations (the prefill's token not counted)")
             + ("" if s.wait_gate else "; WAIT gate off") + ("" if s.token_gate else "; token gate off")
             + f"; WAIT-CP chunk {s.chunk}, tl tuned per rate over "
             f"{min(s.total_limits)}–{max(s.total_limits)} on runs of "
             f"{min(s.requests, s.tuning_requests or s.requests):,} requests "
             f"with seeds disjoint from the reported ones. "
             f"Wall time {result.wall_s / 60:.1f} min.", "",
             "## Transition λ* (req/s)", "",
             "| policy | paper's rule: λ* [λ*, next rate) | λ* per replication | bounded-backlog rule |",
             "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in transition_rows(result)]
    lines += ["", f"Paper's rule: bounded latency (the window's second half averages ≤ {GROWTH_LIMIT:g} × its "
              f"first) and effective completion rate ≥ {1 - COMPLETION_TOLERANCE:.2f} λ at every rate up to λ*; "
              f"bounded backlog: at most {BACKLOG_WINDOW_S:g} s of arrivals, plus the policy's latency at the lowest "
              f"rate, left when arrivals end.", "",
              "## Mean end-to-end latency (s, ± 95 % CI) and effective completion rate (req/s)", ""]
    header = "| λ | " + " | ".join(f"{p} latency | {p} completion" for p in result.policies) + " | tl |"
    lines += [header, "|" + "---|" * (2 * len(result.policies) + 2)]
    rates = sorted({float(c["rate_rps"]) for c in result.curves})  # type: ignore[arg-type]
    for rate in rates:
        cells = []
        tl = ""
        for policy in result.policies:
            c = next(c for c in result.curves if c["policy"] == policy and c["rate_rps"] == rate)
            cells.append(f"{c['mean_latency_s']:.2f} ± {c['latency_ci95']:.2f}"
                         + (f" ({c['censored']} unfinished)" if c["censored"] else ""))
            cells.append(f"{c['effective_completion_rps']:.2f}")
            if c["total_limit"] is not None:
                tl = str(c["total_limit"])
        lines.append(f"| {rate:g} | " + " | ".join(cells) + f" | {tl} |")
    if result.repeats:
        lines += ["", f"## Repeated runs ({result.repeats[0]['runs']} seeds; mean latency ± sample std, s)", "",
                  "| λ | " + " | ".join(result.policies) + " |", "|---|" + "---|" * len(result.policies)]
        for rate in sorted({float(r["rate_rps"]) for r in result.repeats}):  # type: ignore[arg-type]
            cells = [next(f"{r['mean_latency_s']:.2f} ± {r['std_s']:.2f}" for r in result.repeats
                          if r["rate_rps"] == rate and r["policy"] == p) for p in result.policies]
            lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: PaperResult, path: "os.PathLike[str] | str") -> None:
    """The paper's figure layout: mean latency against λ (symlog), effective completion rate against λ with
    the ideal line; arrows at each policy's λ* (paper's rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = sorted({float(c["rate_rps"]) for c in result.curves})  # type: ignore[arg-type]
    for i, policy in enumerate(result.policies):
        curve = sorted((c for c in result.curves if c["policy"] == policy), key=lambda c: c["rate_rps"])  # type: ignore[arg-type, return-value]
        x = [c["rate_rps"] for c in curve]
        left.errorbar(x, [c["mean_latency_s"] for c in curve], yerr=[c["latency_ci95"] for c in curve], fmt="o-",
                      color=f"C{i}", label=policy, capsize=3)
        right.plot(x, [c["effective_completion_rps"] for c in curve], "o-", color=f"C{i}", label=policy)
        star = next(t["paper_rate_rps"] for t in result.transitions if t["policy"] == policy)
        if star is not None:
            y = next(c["mean_latency_s"] for c in curve if c["rate_rps"] == star)
            left.annotate(f"λ*={star:g}", xy=(star, y), xytext=(star, y * 3 + 1), color=f"C{i}", ha="center",
                          arrowprops={"arrowstyle": "->", "color": f"C{i}"})
    right.plot(rates, rates, ":", color="grey", label="ideal (= λ)")
    left.set(xlabel="arrival rate λ (req/s)", ylabel="mean end-to-end latency (s)", yscale="symlog",
             title=f"{result.workload.name}: latency")
    right.set(xlabel="arrival rate λ (req/s)", ylabel="effective completion rate (req/s)",
              title="completions net of eviction restarts")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
