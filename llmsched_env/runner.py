"""The evaluation loop: feed arrivals to an engine, ask a policy for each iteration, record what happened.

One loop serves every policy and every engine (simulated or live). Observers hook in through
callbacks rather than forks of the loop; :class:`TimeSeriesRecorder` is the one the reports use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from llmsched_env.engine import Engine, IterationOutcome, RequestRecords
from llmsched_env.errors import ConfigError
from llmsched_env.policy import Policy
from llmsched_env.workload import Arrivals


IterationCallback = Callable[[Engine, IterationOutcome], None]


class TimeSeriesRecorder:
    """Records one row per iteration: end time, KV blocks used, queue length, running, finished."""

    def __init__(self) -> None:
        self._rows: list[tuple[float, int, int, int, int]] = []

    def __call__(self, engine: Engine, outcome: IterationOutcome) -> None:
        self._rows.append((outcome.end_time, outcome.kv_blocks_used, engine.num_waiting,
                           engine.num_running, engine.num_finished))

    def arrays(self) -> dict[str, np.ndarray]:
        rows = np.array(self._rows, dtype=np.float64).reshape(-1, 5)
        return {"time": rows[:, 0], "kv_blocks_used": rows[:, 1], "waiting": rows[:, 2],
                "running": rows[:, 3], "finished": rows[:, 4]}


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: per-request records, counters at the end, and the run's bounds."""

    records: RequestRecords
    horizon: float
    end_time: float
    iterations: int
    capacity_blocks: int
    block_size: int
    peak_blocks_used: int
    block_seconds: float  # KV blocks in use integrated over time (iterations at their peak, idle time included)
    evictions: int
    arrived: int
    waiting: int
    running: int
    finished: int


def run(engine: Engine, policy: Policy, arrivals: Arrivals, horizon: float,
        callbacks: Sequence[IterationCallback] = (), max_iterations: int | None = None) -> RunResult:
    """Run ``policy`` on ``engine`` over the requests of ``arrivals`` that arrive in ``[0, horizon]``.

    Requests enter the engine's queue when the clock reaches their arrival time. No iteration starts
    at or after ``horizon`` (the last one may end slightly past it); what is then waiting or running is
    reported as such. When the policy returns an empty decision, or one of which nothing could run
    (every admission deferred for lack of memory), the clock jumps to the next arrival; with none left
    the run ends, and what is stuck is reported as waiting or running.
    """
    if not (math.isfinite(horizon) and horizon > 0):
        raise ConfigError(f"horizon must be finite and > 0 s, got {horizon!r}")
    arrivals = arrivals.until(horizon)
    times = arrivals.arrival_time
    total = len(times)
    engine.check_fits(arrivals.prompt_len, arrivals.output_len)  # fail before running, not midway
    policy.reset(engine)
    next_arrival = 0
    iterations = 0
    peak = engine.state().used_blocks
    block_seconds = 0.0
    evictions = 0
    while True:
        now = engine.now
        if next_arrival < total and times[next_arrival] <= now:
            end = int(np.searchsorted(times, now, side="right"))
            engine.add_requests(times[next_arrival:end], arrivals.prompt_len[next_arrival:end],
                                arrivals.output_len[next_arrival:end])
            next_arrival = end
        if now >= horizon or (max_iterations is not None and iterations >= max_iterations):
            break
        decision = policy.decide(engine.state())
        stalled = decision.is_idle
        if not stalled:
            outcome = engine.step(decision)
            iterations += 1
            evictions += len(outcome.evicted)
            peak = max(peak, outcome.peak_blocks_used)
            block_seconds += outcome.peak_blocks_used * outcome.duration
            for callback in callbacks:
                callback(engine, outcome)
            # Nothing could run (every admission deferred for memory) and nothing changed: asking again
            # would get the same answer, so wait for the world to change, as after an idle decision.
            stalled = outcome.duration == 0.0 and len(outcome.evicted) == 0
        if stalled:
            if next_arrival >= total:
                break  # nothing runs and nothing more arrives
            wake = float(times[next_arrival])
            block_seconds += engine.state().used_blocks * max(0.0, wake - engine.now)  # paused KV stays held
            engine.advance_to(wake)
    return RunResult(
        records=engine.records(), horizon=horizon, end_time=engine.now, iterations=iterations,
        capacity_blocks=engine.capacity_blocks, block_size=engine.block_size, peak_blocks_used=peak,
        block_seconds=block_seconds, evictions=evictions, arrived=engine.num_requests, waiting=engine.num_waiting,
        running=engine.num_running, finished=engine.num_finished)

