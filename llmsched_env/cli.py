"""The ``llmsched`` command line: ``fluid``, ``simulate`` and ``compare``.

JSON field names printed with ``--json`` are part of the interface and documented in the README.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from llmsched_env.errors import LLMSchedError
from llmsched_env.fluid import solve_fluid
from llmsched_env.metrics import json_safe, summarize
from llmsched_env.runner import run
from llmsched_env.scenario import DEFAULT_TYPES, build_scenario

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LLM-serving scheduling under KV-cache limits: fluid benchmark, simulator, policy comparison.")
console = Console(stderr=True)

TYPES_HELP = f"Request types, e.g. 'p=10,o=10,rate=20;p=10,o=20,rate=10' (tokens, req/s). Default: '{DEFAULT_TYPES}'."
TRACE_HELP = ("Trace CSV 'arrived_at,num_prefill_tokens,num_decode_tokens' (replayed), or a length-only CSV "
              "'num_prefill_tokens,num_decode_tokens' (needs --rate).")
PROFILE_HELP = "Hardware profile: a built-in name (llama2-7b-a100) or a JSON file. Sets the cost model and memory."
COST_HELP = "Cost model overriding the profile's: 'd0=..,d1=..' (paper) or 'c0=..,c_pf=..,c_dec=..,c_kv=..' (seconds)."
MEMORY_HELP = "KV capacity in tokens (default: the profile's)."


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def _print_json(payload: object) -> None:
    sys.stdout.write(json.dumps(json_safe(payload), indent=2) + "\n")


@app.command()
def fluid(
    types: Optional[str] = typer.Option(None, help=TYPES_HELP),
    trace: Optional[Path] = typer.Option(None, help=TRACE_HELP + " Its length mix at its mean rate is used."),
    rate: Optional[float] = typer.Option(None, help="Scale the total arrival rate to this (req/s)."),
    cost: Optional[str] = typer.Option(None, help=COST_HELP),
    profile: Optional[str] = typer.Option(None, help=PROFILE_HELP),
    memory_tokens: Optional[int] = typer.Option(None, help=MEMORY_HELP),
    objective: str = typer.Option("requests", help="What the memory-bound LP maximises: requests or tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The fluid benchmark: equilibrium iteration time, memory, throughput and stability of a load."""
    try:
        scenario = build_scenario(types=types, trace=trace, rate=rate, cost=cost, profile=profile,
                                  memory_tokens=memory_tokens)
        solution = solve_fluid(scenario.offered_mix(), scenario.cost, scenario.capacity_tokens,
                               objective)  # type: ignore[arg-type]
    except LLMSchedError as error:
        _fail(error)
        return
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
    Console().print(table)


@app.command()
def simulate(
    policy: str = typer.Option("vllm", help="Policy: vllm, sarathi, wait, wait-paper, nested-wait."),
    types: Optional[str] = typer.Option(None, help=TYPES_HELP),
    trace: Optional[Path] = typer.Option(None, help=TRACE_HELP),
    rate: Optional[float] = typer.Option(None, help="Total arrival rate (req/s): rescales --types or the trace."),
    horizon: float = typer.Option(300.0, help="Simulated seconds; arrivals in [0, horizon], stop at horizon."),
    seed: int = typer.Option(0, help="Seed of the arrival process."),
    cost: Optional[str] = typer.Option(None, help=COST_HELP),
    profile: Optional[str] = typer.Option(None, help=PROFILE_HELP),
    memory_tokens: Optional[int] = typer.Option(None, help=MEMORY_HELP),
    block_size: Optional[int] = typer.Option(None, help="KV block size in tokens (default: the profile's)."),
    arrivals: str = typer.Option("poisson", help="Arrival process for --types: poisson, gamma (see --cv), onoff."),
    cv: float = typer.Option(2.0, help="Coefficient of variation of gamma inter-arrival times."),
    hidden_lengths: bool = typer.Option(False, help="Hide output lengths from the policy until requests finish."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run one policy on the simulated engine and report throughput, latency, memory and regret."""
    from baselines import make_policy

    try:
        scenario = build_scenario(types=types, trace=trace, rate=rate, cost=cost, profile=profile,
                                  memory_tokens=memory_tokens, block_size=block_size, arrivals=arrivals,  # type: ignore[arg-type]
                                  cv=cv, hidden_lengths=hidden_lengths)
        requests = scenario.sample(horizon, seed)
        benchmark = scenario.fluid(requests, horizon)
        chosen = make_policy(policy, scenario, requests, horizon)
        result = run(scenario.engine(), chosen, requests, horizon)
    except LLMSchedError as error:
        _fail(error)
        return
    summary = {"policy": policy, **summarize(result, benchmark)}
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"{policy} on the simulated engine, {horizon:g} s", show_header=False)
    for key, value in json_safe(summary).items():  # type: ignore[union-attr]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def main() -> None:  # pragma: no cover - console-script entry point
    app()
