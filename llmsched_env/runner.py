"""The evaluation loop: feed arrivals to an engine, ask a policy for each iteration, record what happened.

One loop serves every policy and every engine (simulated or live). Observers hook in through
callbacks rather than forks of the loop; :class:`TimeSeriesRecorder` is the one the reports use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from llmsched_env import compiled_run, kernels
from llmsched_env.compiled_run import LAST_ITERATION
from llmsched_env.completions import CompletionLog
from llmsched_env.engine import Decision, Engine, IterationOutcome, RequestRecords
from llmsched_env.errors import ConfigError, EngineFailure, InvalidDecisionError
from llmsched_env.policy import CompiledLoop, Policy
from llmsched_env.simulator import EngineCounters, SimulatedEngine
from llmsched_env.workload import Arrivals

IterationCallback = Callable[[Engine, IterationOutcome], None]


class TimeSeriesRecorder:
    """Records one row per iteration: end time, KV blocks used, queue length, running, finished.

    At most ``max_rows`` rows are kept: when they are full, every other row is dropped and from then on every
    other iteration is recorded (then every fourth, …), so a long run's series stays evenly spaced in
    iterations and its memory bounded (a plot shows no more points than that anyway).
    """

    def __init__(self, max_rows: int = 20_000) -> None:
        if max_rows < 2:
            raise ConfigError(f"max_rows must be >= 2, got {max_rows}")
        self.max_rows = max_rows
        self._rows: list[tuple[float, int, int, int, int]] = []
        self._stride = 1  # record every stride-th iteration
        self._seen = 0

    def __call__(self, engine: Engine, outcome: IterationOutcome) -> None:
        self._add((outcome.end_time, outcome.kv_blocks_used, engine.num_waiting, engine.num_running,
                   engine.num_finished))

    def add_rows(self, rows: np.ndarray) -> None:
        """Record iterations given as rows (end time, KV blocks used, waiting, running, finished), as calls for
        each would (a compiled run's iterations, :meth:`Rollout.run_compiled`)."""
        for time, blocks, waiting, running, finished in rows.tolist():
            self._add((time, int(blocks), int(waiting), int(running), int(finished)))

    def _add(self, row: tuple[float, int, int, int, int]) -> None:
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        if len(self._rows) == self.max_rows:
            del self._rows[1::2]
            self._stride *= 2
            if (self._seen - 1) % self._stride:
                return
        self._rows.append(row)

    def arrays(self) -> dict[str, np.ndarray]:
        rows = np.array(self._rows, dtype=np.float64).reshape(-1, 5)
        return {"time": rows[:, 0], "kv_blocks_used": rows[:, 1], "waiting": rows[:, 2],
                "running": rows[:, 3], "finished": rows[:, 4]}


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: its requests' records (:class:`~llmsched_env.completions.CompletionLog`), counters at
    the end, and the run's bounds."""

    completions: CompletionLog
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
    busy_time: float = 0.0  # seconds the engine spent in iterations (end_time less the idle gaps)
    stalled_at: float | None = None  # start of the first stall (see Rollout), or None

    @property
    def records(self) -> RequestRecords:
        """Every request's record, indexed by id: kept for runs of up to
        :data:`~llmsched_env.completions.EXACT_REQUESTS` requests, or any run with ``keep_records=True``."""
        return self.completions.records()


#: The span after which a run that makes no progress while requests wait is reported as stalled (:class:`Rollout`).
STALL_AFTER_S = 60.0
#: Requests finished between two retirements (:meth:`~llmsched_env.engine.Engine.retire_finished`) of a run.
RETIRE_EVERY = 1 << 12
#: Iterations a compiled run records before it hands its time-series rows over.
_ROW_BUFFER = 1 << 12
#: Arrivals a compiled run reads per call (a window of the current chunk).
_ARRIVALS_WINDOW = 1 << 12
_NO_ARRIVALS = Arrivals(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64))


class RolloutCounters(NamedTuple):
    """The evaluation loop's state besides the engine's (:meth:`Rollout.counters`)."""

    next_arrival: int  # index of the next arrival to enqueue
    ended: bool  # nothing runs and nothing more arrives
    iterations: int
    peak_blocks_used: int
    evictions: int
    block_seconds: float  # ∫ KV blocks held dt
    busy_time: float  # simulated seconds of iterations


class Rollout:
    """The evaluation loop as a stepper: :func:`run` drives it with a policy, the Gymnasium environment
    (:mod:`llmsched_env.env`) drives it with an agent's actions. One loop, so both see the same runs.

    Requests enter the engine's queue when the clock reaches their arrival time. No iteration starts
    at or after ``horizon`` (the last one may end slightly past it). When a decision is empty, or
    nothing of it could run (every admission deferred for lack of memory), the clock jumps to the next
    arrival; with none left the rollout ends, and what is stuck is reported as waiting or running.

    A policy can stop making progress while requests wait: no iteration runs at all (paused cohorts that
    hold the memory: a deadlock), or nothing is admitted or finished although the oldest waiting request
    would fit in free memory (a threshold rule whose cohorts never fill). With ``stall_after_s`` set, the
    first time either lasts ``stall_after_s`` simulated seconds is recorded as :attr:`RunResult.stalled_at`
    (its start); the run goes on, and its reports flag it.

    Arrivals come whole (:class:`Arrivals`) or as a stream of chunks in time order (a workload's ``chunks``),
    which the loop reads as the clock reaches them. Finished requests are handed from the engine to a
    :class:`~llmsched_env.completions.CompletionLog` every :data:`RETIRE_EVERY` finishes, so with a stream a
    run's memory is bounded by the requests in the system, whatever its horizon.

    Use: ``while rollout.needs_decision(): rollout.apply(decision_for(engine.state()))``.
    """

    def __init__(self, engine: Engine, arrivals: Arrivals | Iterable[Arrivals], horizon: float,
                 callbacks: Sequence[IterationCallback] = (), max_iterations: int | None = None,
                 stall_after_s: float | None = None, keep_records: bool = False) -> None:
        if not (math.isfinite(horizon) and horizon > 0):
            raise ConfigError(f"horizon must be finite and > 0 s, got {horizon!r}")
        self.engine = engine
        self.horizon = horizon
        self.callbacks = tuple(callbacks)
        self.max_iterations = max_iterations
        self._whole: Arrivals | None = None
        if isinstance(arrivals, Arrivals):
            self._whole = arrivals.until(horizon)
            engine.check_fits(self._whole.prompt_len, self._whole.output_len)  # fail before running, not midway
            self._stream: Iterable[Arrivals] = iter(())
            self._chunk = self._whole
        else:
            self._stream = iter(arrivals)
            self._chunk = _NO_ARRIVALS
        self._times = self._chunk.arrival_time
        self._next = 0
        self._more = self._whole is None  # the stream may hold more chunks
        self._pull()
        self._ended = False
        self.iterations = 0
        self.evictions = 0
        self.peak_blocks_used = engine.state().used_blocks
        self.block_seconds = 0.0
        self.busy_time = 0.0
        self.stall_after_s = stall_after_s
        self.stalled_at: float | None = None
        self._progress_at = engine.now  # the last admission or finish, or when the queue last became non-empty
        self._iterated_at = engine.now  # the last iteration that ran, or when the queue last became non-empty
        self._log = CompletionLog(horizon, keep_records=keep_records)
        self._retire_at = RETIRE_EVERY

    def _pull(self) -> None:
        """Once the current chunk is used up, read the stream's next non-empty chunk (within the horizon)."""
        while self._next >= len(self._times):
            chunk = next(self._stream, None)  # type: ignore[call-overload]
            if chunk is None:
                self._more = False
                return
            within = chunk.until(self.horizon)
            if len(within) < len(chunk):
                self._stream = iter(())  # the rest arrives after the horizon
            self.engine.check_fits(within.prompt_len, within.output_len)
            self._chunk, self._times, self._next = within, within.arrival_time, 0

    @property
    def arrivals(self) -> Arrivals:
        """The run's arrivals (up to the horizon), in order: given whole only."""
        if self._whole is None:
            raise ConfigError("this rollout reads its arrivals as a stream; it has no whole arrivals to hand out")
        return self._whole

    def counters(self) -> RolloutCounters:
        """The loop's state besides the engine's: what a compiled episode loop advances with it."""
        return RolloutCounters(self._next, self._ended, self.iterations, self.peak_blocks_used, self.evictions,
                               self.block_seconds, self.busy_time)

    def restore(self, counters: RolloutCounters) -> None:
        """Take ``counters`` (those a compiled loop reached) as the loop's state: the inverse of :meth:`counters`."""
        (self._next, ended, self.iterations, self.peak_blocks_used, self.evictions, self.block_seconds,
         self.busy_time) = counters
        self._ended = bool(ended)

    @property
    def next_arrival_time(self) -> float:
        """When the next request arrives (``inf`` when none is left)."""
        return float(self._times[self._next]) if self._next < len(self._times) else math.inf

    def needs_decision(self) -> bool:
        """Enqueue the requests that have arrived by now; whether the loop goes on (a decision is due)."""
        now = self.engine.now
        while self._next < len(self._times) and self._times[self._next] <= now:
            end = int(np.searchsorted(self._times, now, side="right"))
            a = self._chunk
            if self.engine.num_waiting == 0:
                self._progress_at = self._iterated_at = now
            self.engine.add_requests(self._times[self._next:end], a.prompt_len[self._next:end],
                                     a.output_len[self._next:end])
            self._next = end
            self._pull()
        if self._ended or now >= self.horizon:
            return False
        return self.max_iterations is None or self.iterations < self.max_iterations

    def apply(self, decision: Decision) -> IterationOutcome | None:
        """Run ``decision`` for one iteration (``None`` if it ran nothing), or let time pass if it cannot run."""
        engine = self.engine
        outcome = None
        stalled = decision.is_idle
        if not stalled:
            outcome = engine.step(decision)
            self.iterations += 1
            self.evictions += len(outcome.evicted)
            self.peak_blocks_used = max(self.peak_blocks_used, outcome.peak_blocks_used)
            self.block_seconds += outcome.peak_blocks_used * outcome.duration
            self.busy_time += outcome.duration
            if engine.num_finished >= self._retire_at:
                self._log.add(engine.retire_finished())
                self._retire_at = engine.num_finished + RETIRE_EVERY  # even if an old request held most back
            for callback in self.callbacks:
                callback(engine, outcome)
            # Nothing could run (every admission deferred for memory) and nothing changed: asking again
            # would get the same answer, so wait for the world to change, as after an idle decision.
            stalled = outcome.duration == 0.0 and len(outcome.evicted) == 0
        if stalled:
            ended, held, wake = kernels.stall(self._times, self._next, engine.state().used_blocks, engine.now)
            if ended:
                self._ended = True  # nothing runs and nothing more arrives
            else:
                # Python floats whether or not the kernel ran compiled (NUMBA_DISABLE_JIT returns NumPy scalars).
                self.block_seconds += float(held)  # paused KV stays
                engine.advance_to(float(wake))
        if self.stall_after_s is not None and self.stalled_at is None:
            self._watch_for_stall(outcome)
        return outcome

    def _watch_for_stall(self, outcome: IterationOutcome | None) -> None:
        engine = self.engine
        now, span = engine.now, self.stall_after_s
        if engine.num_waiting == 0:
            self._progress_at = self._iterated_at = now
            return
        if outcome is not None and outcome.duration > 0:
            self._iterated_at = now
            if len(outcome.admitted) or len(outcome.finished):
                self._progress_at = now
        if now - self._iterated_at >= span:  # type: ignore[operator]
            self.stalled_at = self._iterated_at
        elif now - self._progress_at >= span:  # type: ignore[operator]
            state = engine.state()
            head = state.oldest_waiting(1)
            if len(head) and state.blocks_for(int(state.context_len[head[0]])) <= state.free_blocks:
                self.stalled_at = self._progress_at

    def can_run_compiled(self) -> bool:
        """Whether :meth:`run_compiled` can run this rollout: a simulated engine, and no callback but time
        series (which the compiled loop records itself)."""
        return (isinstance(self.engine, SimulatedEngine)
                and all(type(callback) is TimeSeriesRecorder for callback in self.callbacks))

    def run_compiled(self, loop: CompiledLoop, until: float = math.inf) -> bool:
        """Run to the end, or to the first iteration boundary at or after ``until`` (s), with a policy's compiled
        loop (:mod:`llmsched_env.compiled_run`): the same rules as :meth:`needs_decision` / :meth:`apply`, many
        iterations per call. Between calls the loop's state is handed back to the engine and this rollout, which
        refill the arrivals, retire finished requests and take the time series' rows; an invalid decision is run
        through :meth:`apply`, which names the error. Returns whether the run is over (stopping at ``until`` and
        calling again runs exactly what one call would: the loop stops there as at the horizon, before deciding).
        """
        engine = self.engine
        assert isinstance(engine, SimulatedEngine) and self.can_run_compiled()
        params = engine.engine_params()
        run = compiled_run.new_run_state(engine.counter_array(), _ROW_BUFFER if self.callbacks else 0)
        running = engine.counters().running
        while True:
            # The loop reads the arrivals a window at a time (a whole run's arrivals are one chunk): what a policy
            # prepares per arrival (WAIT types them) stays bounded, and a window ends like a chunk.
            start, chunk = self._next, self._chunk
            end = min(len(self._times), start + _ARRIVALS_WINDOW)
            engine.reserve(engine.num_requests + end - start)  # the window's arrivals, enqueued in place
            self._load(run, start, end < len(self._times), until)
            arrivals = compiled_run.ChunkArrays(self._times[start:end], chunk.prompt_len[start:end],
                                                chunk.output_len[start:end])
            stop, running, decode, prefill, tokens = loop(run, running, engine.request_columns(), arrivals, params)
            self._store(run, running, start)
            if stop == compiled_run.INVALID_DECISION:
                self.apply(Decision(decode=decode, prefill=prefill, prefill_tokens=tokens))
                raise AssertionError("a compiled policy's decision was refused by its loop but not by the engine")
            if stop == compiled_run.DONE:
                return self._ended or engine.now >= self.horizon
            if engine.num_finished >= self._retire_at:
                self._log.add(engine.retire_finished())
                self._retire_at = engine.num_finished + RETIRE_EVERY
            if self._next >= len(self._times):
                self._pull()

    def _load(self, run: compiled_run.RunState, window_start: int, window_cut: bool, until: float) -> None:
        """Copy the engine's counters and this rollout's state into ``run`` (a compiled loop's), which reads the
        current chunk's arrivals from ``window_start`` on (``window_cut``: the window ends before the chunk) and
        stops at ``until`` as at the horizon."""
        run.counters[:] = self.engine.counter_array()  # type: ignore[attr-defined]
        run.ints[:] = (self._next - window_start, self._ended, self.iterations, self.peak_blocks_used,
                       self.evictions, self._retire_at, 0, self._more or window_cut,
                       -1 if self.max_iterations is None else self.max_iterations, self.engine.retired)
        run.reals[:LAST_ITERATION] = (self.engine.now, self.block_seconds, self.busy_time, self._progress_at,
                                      self._iterated_at, math.nan if self.stalled_at is None else self.stalled_at,
                                      math.inf if self.stall_after_s is None else self.stall_after_s,
                                      min(self.horizon, until))
        run.reals[LAST_ITERATION:] = self.engine.counters().last_iteration  # type: ignore[attr-defined]

    def _store(self, run: compiled_run.RunState, running: np.ndarray, window_start: int) -> None:
        """Take back what a compiled loop advanced (the inverse of :meth:`_load`), and the time series' rows."""
        counters = run.counters.tolist()
        (next_in_window, ended, self.iterations, self.peak_blocks_used, self.evictions, _, rows, _, _,
         _) = run.ints.tolist()
        (now, self.block_seconds, self.busy_time, self._progress_at, self._iterated_at, stalled_at, _,
         _) = run.reals[:LAST_ITERATION].tolist()
        self._next = window_start + next_in_window
        self.engine.restore(EngineCounters(*counters, now, running,  # type: ignore[attr-defined]
                                           run.reals[LAST_ITERATION:]))
        self._ended = bool(ended)
        self.stalled_at = None if math.isnan(stalled_at) else stalled_at
        for recorder in self.callbacks:
            recorder.add_rows(run.rows[:rows])  # type: ignore[attr-defined]

    def result(self) -> RunResult:
        """What the rollout left so far (final once :meth:`needs_decision` has returned ``False``)."""
        engine = self.engine
        completions = self._log.copy()
        completions.add(engine.records(), now=engine.now)  # the requests not retired yet
        return RunResult(
            completions=completions, horizon=self.horizon, end_time=engine.now, iterations=self.iterations,
            capacity_blocks=engine.capacity_blocks, block_size=engine.block_size,
            peak_blocks_used=self.peak_blocks_used, block_seconds=self.block_seconds, evictions=self.evictions,
            arrived=engine.num_requests, waiting=engine.num_waiting, running=engine.num_running,
            finished=engine.num_finished, busy_time=self.busy_time, stalled_at=self.stalled_at)


def run(engine: Engine, policy: Policy, arrivals: Arrivals | Iterable[Arrivals], horizon: float,
        callbacks: Sequence[IterationCallback] = (), max_iterations: int | None = None,
        stall_after_s: float | None = STALL_AFTER_S, keep_records: bool = False) -> RunResult:
    """Run ``policy`` on ``engine`` over the requests of ``arrivals`` that arrive in ``[0, horizon]``.

    ``arrivals`` is whole or a stream of chunks (``scenario.chunks(horizon, seed)``: memory bounded whatever the
    horizon). See :class:`Rollout` for the loop's rules (arrivals, the horizon, idle and stalled decisions).
    Per-request records are kept up to :data:`~llmsched_env.completions.EXACT_REQUESTS` requests, or always with
    ``keep_records``. If a live engine fails mid-run, the :class:`~llmsched_env.errors.EngineFailure` it raises
    carries the run's result up to the failure in ``result``.
    """
    rollout = Rollout(engine, arrivals, horizon, callbacks, max_iterations, stall_after_s, keep_records)
    policy.reset(engine)
    compiled_loop = getattr(policy, "compiled_loop", None)
    loop = compiled_loop() if callable(compiled_loop) and rollout.can_run_compiled() else None
    if loop is not None:
        rollout.run_compiled(loop)
        return rollout.result()
    try:
        while rollout.needs_decision():
            decision = policy.decide(engine.state())
            if not isinstance(decision, Decision):
                raise InvalidDecisionError(f"{type(policy).__name__}.decide returned {decision!r}, not a Decision")
            rollout.apply(decision)
    except EngineFailure as failure:
        failure.result = rollout.result()  # every request, finished, waiting or running, up to the failure
        raise
    return rollout.result()
