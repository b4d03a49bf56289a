"""Metrics of a run: latency, TTFT, time between tokens, throughput, memory, and regret against the fluid optimum.

Definitions (seconds unless stated):

* end-to-end latency = finish − arrival, of the requests finished by the end of the run. Where many are not (a
  backlog at the horizon), that sample leaves out the oldest requests still waiting, and finishing one of them
  can raise its quantiles. The **censored latency** counts every arrival: finish − arrival if finished, else its
  age at the end of the run (end − arrival, a lower bound on its latency). A request's value only falls if it
  finishes sooner, so no quantile of it rewards leaving old requests unserved; with every request finished the
  two are the same.
* TTFT = end of the request's first prefill − arrival (an engine's prefill emits the first token); time between
  tokens (TBT) of a request = (finish − first token) / output length, its mean gap between output tokens.
* throughput over the horizon ``T``: completed requests / ``T`` and their output tokens / ``T``.
* memory: the peak fraction of KV blocks in use, and its time average over the run (idle time counts
  as what was held then: KV of paused requests stays allocated).
* regret at time ``t`` = ``Θ* · t − completions(t)``, in requests and in output tokens of completed
  requests, where ``Θ*`` is the fluid optimum (memory-bound when the offered load does not fit).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from llmsched_env.engine import RequestRecords
from llmsched_env.fluid import FluidSolution
from llmsched_env.runner import RunResult


def summarize(result: RunResult, fluid: FluidSolution) -> dict[str, float | int | None]:
    """One flat dict of the run's figures; the field names are the CLI's JSON interface (see README).

    Exact up to :data:`~llmsched_env.completions.EXACT_REQUESTS` requests per run; beyond, quantiles are within
    a relative :data:`~llmsched_env.completions.RELATIVE_ACCURACY` (counts, throughput and means stay exact)."""
    log = result.completions
    completed, tokens = log.completed()
    horizon = result.horizon
    summary: dict[str, float | int | None] = {
        "horizon_s": horizon,
        "arrived": result.arrived,
        "completed": completed,
        "waiting": result.waiting,
        "running": result.running,
        "evictions": result.evictions,
        "iterations": result.iterations,
        "throughput_rps": completed / horizon,
        "throughput_tps": tokens / horizon,
        "fluid_throughput_rps": fluid.throughput_rps,
        "fluid_throughput_tps": fluid.throughput_tps,
        "regret_requests": fluid.throughput_rps * horizon - completed,
        "regret_tokens": fluid.throughput_tps * horizon - tokens,
        "rho": fluid.rho,
        "fluid_stable": fluid.stable,
        "stalled_at_s": result.stalled_at,
    }
    for prefix, stats in log.distributions().items():
        summary.update({f"mean_{prefix}_s": stats.mean, f"p50_{prefix}_s": stats.p50, f"p90_{prefix}_s": stats.p90,
                        f"p99_{prefix}_s": stats.p99})
    summary["peak_memory_frac"] = result.peak_blocks_used / result.capacity_blocks
    summary["mean_memory_frac"] = (result.block_seconds / result.end_time / result.capacity_blocks
                                   if result.end_time > 0 else 0.0)
    return summary


def slowest_requests(records: RequestRecords, share: float = 0.01) -> dict[str, float]:
    """Who makes a run's latency tail: the mean output length (tokens), time to first token and decode time (first
    token to the last; s) of its ``share`` slowest completed requests, those at or above the ``1 - share`` quantile
    of latency. A tail that waited has a long first token; one of long outputs, a long decode. NaN with none done."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    done = np.isfinite(records.finish_time)
    if not done.any():
        return {"output_len": math.nan, "first_token_s": math.nan, "decode_s": math.nan}
    latency = (records.finish_time - records.arrival_time)[done]
    first = (records.first_token_time - records.arrival_time)[done]
    tail = latency >= np.quantile(latency, 1.0 - share)
    return {"output_len": float(np.mean(records.output_len[done][tail])), "first_token_s": float(np.mean(first[tail])),
            "decode_s": float(np.mean((latency - first)[tail]))}


@dataclass(frozen=True)
class RegretCurve:
    """Regret sampled on a time grid."""

    time: np.ndarray
    completions: np.ndarray
    regret_requests: np.ndarray
    regret_tokens: np.ndarray


def regret_curve(result: RunResult, fluid: FluidSolution, points: int = 200) -> RegretCurve:
    """``Θ* t − completions(t)`` on ``points`` evenly spaced times in ``(0, horizon]``."""
    grid = np.linspace(result.horizon / points, result.horizon, points)
    count, tokens = result.completions.completions_by(grid)
    return RegretCurve(time=grid, completions=count,
                       regret_requests=fluid.throughput_rps * grid - count,
                       regret_tokens=fluid.throughput_tps * grid - tokens)


#: The version of every JSON document llmsched writes (``--json`` output, comparison.json, suite.json): raised
#: when a field is renamed or removed or changes meaning, kept when fields are added (CHANGELOG.md).
SCHEMA_VERSION = 1


def json_document(payload: dict[str, object]) -> str:
    """``payload`` as indented JSON text led by ``schema_version``, non-finite floats as ``null``."""
    return json.dumps({"schema_version": SCHEMA_VERSION, **json_safe(payload)}, indent=2) + "\n"  # type: ignore[dict-item]


def json_safe(value: object) -> object:
    """Replace non-finite floats by ``None`` (JSON has no inf/NaN) and NumPy scalars by Python ones."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value
