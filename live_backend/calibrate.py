"""Calibrate the simulator's cost model on a live engine: sweep batch compositions, fit, check on held-out ones.

The sweep builds each composition for real on the live engine, through ordinary decisions: ``D``
running requests of context ``L`` decode while one fresh request prefills ``P`` tokens, so one
iteration has ``P`` prefill tokens, ``D`` decode requests and ``D·(L + 1) + P`` KV tokens (the
simulator's :class:`~llmsched_env.cost_model.LinearCostModel` terms). Every iteration the sweep runs
is a sample, the prefills that set a composition up included; each planned composition is repeated
and the order shuffled, so slow drifts of a shared machine do not line up with one term.

The fit is non-negative least squares on *relative* error (each sample weighted by ``1/τ``, because
a 10 % error matters as much on a 5 ms decode as on a 50 ms prefill). A second fit adds the
quadratic prefill-attention term ``c_pf2 · prefill_attention`` (query-key pairs, ≈ P²/2); :func:`calibrate`
reports both on held-out compositions (a sweep on another grid and seed) and keeps the quadratic term only if it lowers
the held-out error by at least :data:`QUADRATIC_GAIN` (relative).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.table import Table
from scipy.optimize import nnls

from llmsched_env.cost_model import LinearCostModel, prefill_attention
from llmsched_env.engine import Decision
from llmsched_env.errors import ConfigError

#: The quadratic prefill term is kept only if it lowers the held-out mean error by this fraction.
QUADRATIC_GAIN = 0.10


@dataclass(frozen=True)
class Sample:
    """One measured iteration: its composition and duration (seconds)."""

    prefill_tokens: int
    decode_requests: int
    kv_tokens: int
    duration: float
    prefill_attention: float = 0.0  # see llmsched_env.cost_model.prefill_attention


@dataclass(frozen=True)
class Grid:
    """The compositions a sweep visits: every (decode requests, context) pair, with every prefill size."""

    decode_requests: Sequence[int] = (1, 4, 12, 24, 48)
    contexts: Sequence[int] = (48, 160, 400)
    prefill_tokens: Sequence[int] = (0, 24, 96, 288, 640)
    repeats: int = 3


def grid_for(engine: object) -> Grid:
    """The fitting grid for an engine: decode batches from 1 to its ``max_num_seqs`` (geometric), so the fit
    covers the batch sizes its workloads reach; pairs that do not fit in its KV cache are skipped."""
    most = int(engine.config.max_num_seqs)  # type: ignore[attr-defined]
    decode = sorted({d for d in (1, 4, 16, 48, 96, 128, 192, 256) if d < most} | {most})
    return Grid(decode_requests=tuple(decode))


def held_out_grid_for(engine: object) -> Grid:
    """Held-out compositions: between the fitting grid's points, on another seed."""
    most = int(engine.config.max_num_seqs)  # type: ignore[attr-defined]
    decode = sorted({d for d in (2, 8, 32, 64, 112, 160, 224) if d < most})
    return Grid(decode_requests=tuple(decode), contexts=(96, 300), prefill_tokens=(0, 48, 192, 480), repeats=2)


def sweep(engine: object, grid: Grid, seed: int, on_sample: Callable[[Sample], None] | None = None) -> list[Sample]:
    """Measure every composition of ``grid`` on a live ``engine`` (each (D, L) pair ends by preempting its
    requests, so the next starts from an empty cache). Pairs that do not fit in the KV cache are skipped."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    pairs = [(d, length) for d in grid.decode_requests for length in grid.contexts]
    rng.shuffle(pairs)
    for decode_requests, context in pairs:
        capacity = engine.capacity_tokens  # type: ignore[attr-defined]
        steps = grid.repeats * len(grid.prefill_tokens)
        largest = max(grid.prefill_tokens)
        if decode_requests * (context + steps + engine.block_size) + largest + engine.block_size > capacity:  # type: ignore[attr-defined]
            continue
        samples.extend(_measure_pair(engine, decode_requests, context, grid, rng, on_sample))
    return samples


def _record(engine: object, decision: Decision, attention: float, samples: list[Sample],
            on_sample: Callable[[Sample], None] | None) -> None:
    outcome = engine.step(decision)  # type: ignore[attr-defined]
    if outcome.duration > 0:
        sample = Sample(outcome.prefill_tokens, outcome.decode_tokens, outcome.batch_kv_tokens, outcome.duration,
                        attention)
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)


def _measure_pair(engine: object, decode_requests: int, context: int, grid: Grid, rng: np.random.Generator,
                  on_sample: Callable[[Sample], None] | None) -> list[Sample]:
    samples: list[Sample] = []
    steps = grid.repeats * len(grid.prefill_tokens)
    now = engine.now  # type: ignore[attr-defined]
    ids = engine.add_requests(np.full(decode_requests, now), np.full(decode_requests, context),  # type: ignore[attr-defined]
                              np.full(decode_requests, steps + 2))
    # Set up: prefill the decoding set (itself a sample: a pure prefill of D·L tokens, unless the engine's
    # token budget cuts it into chunks; then the chunks are the samples).
    while True:
        state = engine.state()  # type: ignore[attr-defined]
        behind = ids[state.kv_tokens[ids] < state.context_len[ids]]
        if not len(behind):
            break
        cached = state.kv_tokens[behind]
        attention = float(sum(prefill_attention(context - int(c), int(c)) for c in cached))
        _record(engine, Decision(prefill=behind), attention, samples, on_sample)
    plan = [p for p in grid.prefill_tokens for _ in range(grid.repeats)]
    rng.shuffle(plan)
    for prefill in plan:
        if prefill == 0:
            _record(engine, Decision(decode=ids), 0, samples, on_sample)
            continue
        fresh = engine.add_requests(np.array([engine.now]), np.array([prefill]), np.array([1]))  # type: ignore[attr-defined]
        _record(engine, Decision(decode=ids, prefill=fresh), prefill_attention(prefill), samples, on_sample)
        engine.step(Decision(preempt=fresh))  # type: ignore[attr-defined]  # free its KV for the next one
    engine.step(Decision(preempt=ids))  # type: ignore[attr-defined]
    return samples


def _design(samples: Sequence[Sample], quadratic: bool) -> tuple[np.ndarray, np.ndarray]:
    columns = [np.ones(len(samples)), [s.prefill_tokens for s in samples], [s.decode_requests for s in samples],
               [s.kv_tokens for s in samples]]
    if quadratic:
        columns.append([s.prefill_attention for s in samples])
    return np.column_stack(columns).astype(np.float64), np.array([s.duration for s in samples])


@dataclass(frozen=True)
class Fit:
    """A fitted cost model and its relative errors on the fitting and the held-out samples."""

    cost: LinearCostModel
    fit_error: float  # mean |predicted − measured| / measured on the fitting samples
    held_out_error: float  # the same on held-out samples
    held_out_p90_error: float
    quadratic: bool


def predict(cost: LinearCostModel, samples: Sequence[Sample]) -> np.ndarray:
    """The cost model's iteration time for each sample's composition."""
    return np.array([cost.iteration_time(s.prefill_tokens, s.decode_requests, s.kv_tokens, s.prefill_attention)
                     for s in samples])


def relative_errors(cost: LinearCostModel, samples: Sequence[Sample]) -> np.ndarray:
    measured = np.array([s.duration for s in samples])
    return np.abs(predict(cost, samples) - measured) / measured


def fit(samples: Sequence[Sample], held_out: Sequence[Sample], quadratic: bool) -> Fit:
    """Non-negative least squares on relative error (rows weighted by 1/τ)."""
    design, durations = _design(samples, quadratic)
    weights = 1.0 / durations
    coefficients, _ = nnls(design * weights[:, None], np.ones_like(durations))
    c0 = max(float(coefficients[0]), 1e-6)  # c0 must be > 0 for the fluid benchmark (ΔT* = c0 / (1 − ρ))
    cost = LinearCostModel(c0=c0, c_pf=float(coefficients[1]), c_dec=float(coefficients[2]),
                           c_kv=float(coefficients[3]), c_pf2=float(coefficients[4]) if quadratic else 0.0)
    held = relative_errors(cost, held_out)
    return Fit(cost, float(relative_errors(cost, samples).mean()), float(held.mean()),
               float(np.quantile(held, 0.9)), quadratic)


def medians(samples: Sequence[Sample]) -> list[Sample]:
    """One sample per composition, its median duration: single iterations on a shared CPU jitter by tens of
    per cent, and a least-squares fit on raw samples chases the outliers."""
    groups: dict[tuple[int, int, int, float], list[float]] = {}
    for sample in samples:
        key = (sample.prefill_tokens, sample.decode_requests, sample.kv_tokens, sample.prefill_attention)
        groups.setdefault(key, []).append(sample.duration)
    return [Sample(p, d, k, float(np.median(durations)), a) for (p, d, k, a), durations in groups.items()]


@dataclass(frozen=True)
class Calibration:
    """Both fits, the one kept, and how many iterations were measured."""

    linear: Fit
    quadratic: Fit
    chosen: Fit
    samples: int
    held_out_samples: int

    def to_json(self) -> dict[str, object]:
        def one(fit_: Fit) -> dict[str, object]:
            return {"cost": fit_.cost.to_dict(), "fit_error": fit_.fit_error, "held_out_error": fit_.held_out_error,
                    "held_out_p90_error": fit_.held_out_p90_error}

        return {"linear": one(self.linear), "quadratic": one(self.quadratic),
                "quadratic_term_needed": self.chosen.quadratic, "samples": self.samples,
                "held_out_samples": self.held_out_samples}


def calibrate(samples: Sequence[Sample], held_out: Sequence[Sample]) -> Calibration:
    """Fit the linear and the quadratic model on per-composition medians; keep the quadratic one only if it
    lowers the held-out error by :data:`QUADRATIC_GAIN`."""
    fitting, checking = medians(samples), medians(held_out)
    if len(fitting) < 6 or not checking:
        raise ConfigError(f"calibration measured {len(fitting)} fitting and {len(checking)} held-out compositions; "
                          f"the KV cache is too small for the sweep (give more --kv-blocks)")
    linear, quadratic = fit(fitting, checking, False), fit(fitting, checking, True)
    chosen = quadratic if quadratic.held_out_error < (1 - QUADRATIC_GAIN) * linear.held_out_error else linear
    return Calibration(linear, quadratic, chosen, len(samples), len(held_out))


def report_table(result: Calibration) -> Table:
    """The two fits side by side: coefficients and relative errors."""
    table = Table(title="cost model fits (relative error of the iteration time)")
    for column in ("model", "c0 (ms)", "c_pf (µs/token)", "c_dec (µs/request)", "c_kv (ns/token)", "c_pf2 (ns/pair)",
                   "fit error", "held-out error", "held-out p90", "kept"):
        table.add_column(column, justify="right")
    for label, fit_ in (("linear", result.linear), ("+ quadratic prefill", result.quadratic)):
        c = fit_.cost
        table.add_row(label, f"{c.c0 * 1e3:.3f}", f"{c.c_pf * 1e6:.2f}", f"{c.c_dec * 1e6:.2f}", f"{c.c_kv * 1e9:.2f}",
                      f"{c.c_pf2 * 1e9:.3f}", f"{fit_.fit_error:.1%}", f"{fit_.held_out_error:.1%}",
                      f"{fit_.held_out_p90_error:.1%}", "yes" if fit_ is result.chosen else "")
    return table


def write_profile(path: Path, chosen: Fit, *, name: str, description: str, capacity_tokens: int,
                  block_size: int) -> None:
    """Write a profile JSON that ``--profile`` loads."""
    data = {"name": name, "description": description, **chosen.cost.to_dict(),
            "kv_capacity_tokens": capacity_tokens, "block_size": block_size}
    if not chosen.quadratic:
        data.pop("c_pf2", None)
    path.write_text(json.dumps(data, indent=2) + "\n")


#: Every how many logged iterations one is held out (interleaved, so that a drift of the machine moves both sets).
HELD_OUT_EVERY = 3


def read_iteration_log(path: str | Path) -> tuple[dict[str, object], list[Sample]]:
    """``(header, samples)`` of a served engine's iteration log (``iteration_log`` of ``llmsched serve``; see
    :mod:`live_backend.serve_settings`); :class:`ConfigError` naming the file, line and field that is wrong."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the iteration log ({error.strerror or error})") from None
    header: dict[str, object] = {}
    samples: list[Sample] = []
    fields = ("prefill_tokens", "decode_requests", "kv_tokens", "prefill_attention", "duration_s")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {line[:40]!r}")
        if "capacity_blocks" in row:  # a server's header (a log may hold several runs)
            header = row
            continue
        if not header:
            raise ConfigError(f"{path}:{number}: an iteration before any header line (capacity_blocks, block_size): "
                              "not an llmsched serve iteration log")
        for name in fields:
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ConfigError(f"{path}:{number}: field {name!r} must be a number >= 0, got {value!r}")
        if row["duration_s"] <= 0:
            raise ConfigError(f"{path}:{number}: field 'duration_s' must be > 0, got {row['duration_s']!r}")
        samples.append(Sample(int(row["prefill_tokens"]), int(row["decode_requests"]), int(row["kv_tokens"]),
                              float(row["duration_s"]), float(row["prefill_attention"])))
    if not header:
        raise ConfigError(f"{path}: no header line (capacity_blocks, block_size): not an llmsched serve iteration log")
    return header, samples


def calibrate_from_log(samples: Sequence[Sample]) -> Calibration:
    """Fit on the logged iterations but every :data:`HELD_OUT_EVERY`-th, and measure the error on those."""
    compositions = len(medians(samples))
    if compositions < 3 * HELD_OUT_EVERY:
        raise ConfigError(f"the iteration log holds {len(samples)} iterations of {compositions} batch compositions; "
                          f"a fit needs {3 * HELD_OUT_EVERY} or more: serve more traffic with the log on")
    held_out = [sample for k, sample in enumerate(samples) if k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    fitting = [sample for k, sample in enumerate(samples) if k % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return calibrate(fitting, held_out)
