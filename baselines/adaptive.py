"""Adaptive WAIT and Nested WAIT: thresholds re-solved from what the scheduler has seen, not from the future.

``wait`` and ``nested-wait`` are sized on the scenario's offered rates and length mix: oracles, since
a deployed scheduler knows neither in advance. The adaptive variants learn both online:

* **Rates**: an exponentially weighted count of arrivals with time constant ``window_s`` (default
  60 s). Its relative standard error is ``1 / sqrt(2 λ W)``: 2 % at 30 req/s, 6 % at 3 req/s, small
  enough that thresholds (which scale like ``λ τ``) move by less than one request from noise alone,
  while a diurnal swing over an hour is tracked with a lag of about a minute. Bursts of a few seconds
  are deliberately *not* tracked: the thresholds are sized on the mean load, bursts wait in the queue.
* **Classes** (WAIT, lengths known): a ``grid × grid`` quantile grid of (prompt, output) over the last
  ``memory`` arrivals (cells with too few members merge into their neighbours by being skipped); each
  class is represented by its members' mean lengths, and its rate is its share of the estimated total.
* **Output lengths** (Nested WAIT, lengths hidden): the lengths of the last ``memory`` *completed*
  requests (a finished request's context less its prompt: the state shows it once it has finished). In a
  stationary system completions have the arrivals' length distribution, so this sample is unbiased once the
  system has run for a few lifetimes; no request's own length is read before it finishes.

* **Sizing** (``backlog_drain_s`` > 0, the ``*-backlog`` presets): the thresholds are sized for the estimate plus
  the queue beyond ``backlog_after_s`` seconds of arrivals, spread over ``backlog_drain_s`` (:func:`sizing_rate`).
  On bursty traffic the rate an oracle is told is not what even an hour of arrivals shows, and a rate a few percent
  low costs throughput through every backlog where one above costs little: sized on the backlog, WAIT-adaptive
  holds the oracle's level over an hour of bursts (docs/agents.md).

Thresholds are re-solved every ``resolve_every_s`` of engine time, and at once when the sizing rate
moves by more than ``resolve_on_change`` (relative) since the last solve. Until ``warmup`` arrivals (or
completions) have been seen, the policies admit as their memory lookahead allows (thresholds of 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from baselines.lookahead import (
    LOOKAHEAD_QUANTILE,
    MARGIN_QUANTILES,
    MARGIN_RESERVES,
    BatchProjection,
    HeldProfile,
    no_projection,
    residual_table,
)
from baselines.nested_wait import (
    LEVEL,
    Margin,
    NestedWaitPolicy,
    NestedWaitRule,
    kept_projection,
    lending_limit,
    nested_wait_step,
    segment_code_table,
)
from baselines.stall_free import scaled_budget
from baselines.thresholds import (
    NestedWaitThresholds,
    WaitThresholds,
    boundaries_at_quantiles,
    length_distribution,
    lifetime_blocks,
    nested_wait_report,
    nested_wait_solution,
    wait_thresholds,
)
from baselines.type_queues import TypeQueues
from baselines.wait import (
    WaitPolicy,
    WaitQueue,
    WaitQueueFollower,
    WaitRule,
    kept_profile,
    wait_begin,
    wait_step,
)
from llmsched_env import compiled_run, kernels
from llmsched_env.compiled import borrowed, compiled, compiled_inlined
from llmsched_env.compiled_run import GO_ON, LAST_ITERATION, NOW, PAUSE, RETIRED, ChunkArrays, RunState
from llmsched_env.cost_estimate import CostFollower, follow_iteration, followed_factor
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import equilibrium_point, lifetime_work
from llmsched_env.iteration import NUM_WAITING, EngineParams, N
from llmsched_env.policy import CompiledLoop
from llmsched_env.rate_estimate import ArrivalRateEstimator
from llmsched_env.request_table import RequestColumns
from llmsched_env.workload import RequestType, TypeMix

#: With backlog sizing on (``backlog_drain_s`` > 0), a queue longer than this many seconds of the estimated arrivals is
#: a backlog (:func:`sizing_rate`): ten seconds leave the ordinary queues of the suite's stable loads alone (up to
#: ρ 0.95 on the paper's workloads) and count the bursts' backlogs of thousands.
BACKLOG_AFTER_S = 10.0
#: The presets sized on the backlog (``wait-adaptive-backlog``, ``nested-wait-adaptive-backlog``) spread it over this
#: many seconds: the rate estimate's own window.
BACKLOG_DRAIN_S = 60.0


@dataclass
class _Learning:
    """What both adaptive policies keep: the rate estimate, and when thresholds were last solved."""

    cost: LinearCostModel
    capacity_tokens: int
    block_size: int
    window_s: float = 60.0
    resolve_every_s: float = 15.0
    resolve_on_change: float = 0.1
    memory: int = 4000
    warmup: int = 50
    cost_window_s: float = 30.0
    cost_tolerance: float = 0.1
    backlog_drain_s: float = 0.0
    backlog_after_s: float = BACKLOG_AFTER_S

    def __post_init__(self) -> None:
        for name in ("window_s", "resolve_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0 s, got {value!r}")
        for name in ("backlog_drain_s", "backlog_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0 s, got {value!r}")
        if not 0 < self.resolve_on_change:
            raise ConfigError(f"resolve_on_change must be > 0, got {self.resolve_on_change!r}")
        if self.memory < self.warmup or self.warmup < 1:
            raise ConfigError(f"need 1 <= warmup <= memory, got warmup {self.warmup}, memory {self.memory}")
        self.follower = CostFollower(self.cost, self.cost_window_s, self.cost_tolerance)
        self.reset()

    def reset(self) -> None:
        self.backlog_paused = False
        self.rates = ArrivalRateEstimator(self.window_s)
        self.seen = 0
        self.solved_at = -math.inf
        self.solved_rate = 0.0
        self.solved_factor = 1.0
        self.solves = 0
        self.follower.reset()

    def observe(self, state: SchedulerState) -> None:
        fresh = np.arange(self.seen, state.num_requests)
        self.rates.update(state.now, state.arrival_time[fresh])
        self.seen = state.num_requests
        self.follower.observe(state.last_iteration)

    def name_suffix(self) -> str:
        """What a preset's name adds for this learning: ``-backlog`` when it sizes on the backlog."""
        return "-backlog" if self.backlog_drain_s > 0 else ""

    def drain_s(self) -> float:
        """The backlog's drain as the sizing uses it now: 0 (off) while :meth:`pause_backlog` holds it."""
        return 0.0 if self.backlog_paused else self.backlog_drain_s

    def pause_backlog(self, paused: bool) -> None:
        """Size on the estimate alone while ``paused``: a residual agent's departure from its base (a threshold scale
        other than 1) replaces the backlog's sizing rather than multiplying it (on the diurnal day, the surge's
        larger batches on thresholds already sized on the peak's backlog took 8.7 s off the p99, where on the
        estimate's they take 12.8; docs/agents.md). A change solves again at the next decision."""
        if paused != self.backlog_paused and self.backlog_drain_s > 0:
            self.backlog_paused = paused
            self.solved_at = -math.inf

    def sizing_rate(self, waiting: int) -> float:
        """The total rate the thresholds are sized for, with ``waiting`` requests queued (:func:`sizing_rate`)."""
        return sizing_rate(self.rates.total, waiting, self.drain_s(), self.backlog_after_s)

    def due(self, now: float, enough_data: bool, waiting: int) -> bool:
        if not enough_data:
            return False
        return bool(_resolve_due(now - self.solved_at, self.resolve_every_s, self.sizing_rate(waiting),
                                 self.solved_rate, self.follower.factor, self.solved_factor, self.resolve_on_change))

    def solved(self, now: float, waiting: int) -> None:
        self.solved_at, self.solved_rate, self.solved_factor = now, self.sizing_rate(waiting), self.follower.factor
        self.solves += 1

    def current_cost(self) -> LinearCostModel:
        """The cost model to solve the thresholds with: the profile, or the profile scaled to the engine's speed
        when the engine runs off it (:class:`~llmsched_env.cost_estimate.CostFollower`)."""
        return self.follower.cost()

    def loop_state(self) -> "LearningState":
        """The learning's state as a compiled loop follows it (the rate estimator's sums are shared, in place)."""
        reals = np.array([self.rates.time, self.solved_at, self.solved_rate, self.window_s, self.resolve_every_s,
                          self.resolve_on_change, self.solved_factor, self.drain_s(), self.backlog_after_s],
                         dtype=np.float64)
        return LearningState(self.rates.sums, reals,
                             np.array([self.seen, self.warmup, 0, 0, self.solves], dtype=np.int64), self.follower.state)

    def to_loop(self, learn: "LearningState") -> None:
        """Hand the learning's state to a compiled loop (before each call)."""
        learn.reals[TIME], learn.reals[SOLVED_AT], learn.reals[SOLVED_RATE] = (self.rates.time, self.solved_at,
                                                                               self.solved_rate)
        learn.reals[SOLVED_FACTOR], learn.reals[BACKLOG_DRAIN] = self.solved_factor, self.drain_s()
        learn.ints[SEEN], learn.ints[SOLVES] = self.seen, self.solves

    def from_loop(self, learn: "LearningState") -> None:
        """Take back what a compiled loop observed, and the solves it made (after each call)."""
        self.rates.time, self.seen = float(learn.reals[TIME]), int(learn.ints[SEEN])
        self.solved_at, self.solved_rate = float(learn.reals[SOLVED_AT]), float(learn.reals[SOLVED_RATE])
        self.solved_factor, self.solves = float(learn.reals[SOLVED_FACTOR]), int(learn.ints[SOLVES])


# -- the learning's state in a compiled loop, as indices of LearningState.reals / .ints ---------------------------
(TIME, SOLVED_AT, SOLVED_RATE, WINDOW, RESOLVE_EVERY, RESOLVE_ON_CHANGE, SOLVED_FACTOR, BACKLOG_DRAIN,
 BACKLOG_AFTER) = range(9)
SEEN, WARMUP, RESUME, DUE, SOLVES = range(5)
_ONE_CLASS = np.empty(0, dtype=np.int64)  # count_arrivals' classes: every arrival counts toward the total rate


class LearningState(NamedTuple):
    """:class:`_Learning` in a compiled loop: the rate estimate, the engine's speed, when it was last solved, how
    often, and the loop's flags (``DUE``: thresholds are due to be solved again; ``RESUME``: go on with the
    decision whose observation found that, without observing again)."""

    sums: np.ndarray  # the rate estimator's sums (ArrivalRateEstimator.sums), updated in place
    reals: np.ndarray  # float64, indexed by TIME … BACKLOG_AFTER
    ints: np.ndarray  # int64, indexed by SEEN … SOLVES
    cost: np.ndarray  # the cost follower's state (CostFollower.state), updated in place


@compiled_inlined
def _observe(learn: LearningState, run: RunState, columns: RequestColumns, enough_data: bool) -> bool:
    """:meth:`_Learning.observe` of the requests that arrived since the last look, then :meth:`_Learning.due`."""
    reals, now = learn.reals, run.reals[NOW]
    seen, n = learn.ints[SEEN], run.counters[N]
    kernels.count_arrivals(learn.sums, reals[TIME], now, columns.arrival[seen:n], _ONE_CLASS, reals[WINDOW])
    reals[TIME] = now
    learn.ints[SEEN] = n
    follow_iteration(learn.cost, run.reals[LAST_ITERATION:])
    if not enough_data:
        return False
    return _resolve_due(now - reals[SOLVED_AT], reals[RESOLVE_EVERY], _sizing_rate(learn, run), reals[SOLVED_RATE],
                        followed_factor(learn.cost), reals[SOLVED_FACTOR], reals[RESOLVE_ON_CHANGE])


@compiled_inlined
def _total_rate(learn: LearningState) -> float:
    """``ArrivalRateEstimator.total`` of the loop's single class, at the time it last counted."""
    return learn.sums[0] / kernels.window_coverage(learn.reals[TIME], learn.reals[WINDOW])


@compiled_inlined
def _sizing_rate(learn: LearningState, run: RunState) -> float:
    """:meth:`_Learning.sizing_rate` in the loop, with the run's queue."""
    return sizing_rate(_total_rate(learn), run.counters[NUM_WAITING], learn.reals[BACKLOG_DRAIN],
                       learn.reals[BACKLOG_AFTER])


@compiled_inlined
def sizing_rate(estimate: float, waiting: int, drain_s: float, after_s: float) -> float:
    """The total rate (req/s) the adaptive policies size their thresholds for: the arrival ``estimate``, and with
    ``drain_s`` > 0 the backlog on top, the ``waiting`` requests beyond ``after_s`` seconds of the estimate's
    arrivals, spread over ``drain_s`` seconds. The sizing is lopsided on bursty traffic: a rate a few percent under
    the offered one costs throughput through every backlog, one above it little; and an hour of on-off arrivals
    shows their offered rate only to about ±14 % (docs/agents.md). A queue longer than ``after_s`` of arrivals is a
    backlog the estimate did not see coming; a shorter one is the ordinary wait, which larger cohorts would only
    lengthen."""
    if drain_s <= 0.0:
        return estimate
    return estimate + max(0.0, waiting - estimate * after_s) / drain_s


@compiled_inlined
def _resolve_due(since_solve: float, every: float, rate: float, solved_rate: float, factor: float,
                 solved_factor: float, change: float) -> bool:
    """:meth:`_Learning.due` once there is enough data: the thresholds are solved again every ``every`` seconds,
    and at once when the rate or the engine's speed against the profile has moved by more than ``change``
    (relative) since the last solve. The Python and the compiled loop's paths both call it."""
    moved = solved_rate > 0 and abs(rate - solved_rate) > change * solved_rate
    slower = abs(factor - solved_factor) > change * solved_factor
    return since_solve >= every or moved or slower


@compiled
def run_adaptive_wait(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                      engine: EngineParams, rule: WaitRule, types: np.ndarray, queue: WaitQueue,
                      learn: LearningState, held: HeldProfile
                      ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, HeldProfile]:
    """:class:`AdaptiveWaitPolicy`'s compiled loop: WAIT's (:func:`baselines.wait.run_wait`, the projection kept
    from call to call) with the rate observed before each decision, pausing for Python when the thresholds are due
    to be solved again (they do not move the projection: it is the running batch's at its known lengths). It runs
    on borrowed views of what the caller owns (:func:`~llmsched_env.compiled.borrowed`)."""
    return _adaptive_wait_iterations(borrowed(run), running, borrowed(columns), borrowed(arrivals), borrowed(engine),
                                     borrowed(rule), borrowed(types), borrowed(queue), borrowed(learn), held)


@compiled
def _adaptive_wait_iterations(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                              engine: EngineParams, rule: WaitRule, types: np.ndarray, queue: WaitQueue,
                              learn: LearningState, held: HeldProfile
                              ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, HeldProfile]:
    nothing = np.empty(0, dtype=np.int64)
    queue.scan_from[0] = max(queue.scan_from[0], run.ints[RETIRED])  # retired rows read as zeros
    held = kept_profile(rule, held, running, columns, engine, run)
    while True:
        if not learn.ints[RESUME]:
            stop = wait_begin(rule, run, columns, arrivals, types, queue)
            if stop != GO_ON:
                return stop, running, nothing, nothing, nothing, held
            if _observe(learn, run, columns, run.counters[N] >= learn.ints[WARMUP]):
                learn.ints[DUE] = 1
                learn.ints[RESUME] = 1
                return PAUSE, running, nothing, nothing, nothing, held
        learn.ints[RESUME] = 0
        stop, running, decode, admit, chunk, held = wait_step(rule, types, queue, running, run, columns, arrivals,
                                                              engine, held)
        if stop != GO_ON:
            return stop, running, decode, admit, chunk, held


@compiled
def run_adaptive_nested_wait(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                             engine: EngineParams, in_force: "RuleInForce", guard: np.ndarray, learn: LearningState,
                             learning: "NestedWaitLearning", projection: BatchProjection
                             ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, BatchProjection,
                                        "RuleInForce", "NestedWaitSolve"]:
    """:class:`AdaptiveNestedWaitPolicy`'s compiled loop: Nested WAIT's with the rate observed before each
    decision and the finished requests' lengths recorded after each iteration, the thresholds solved again in the
    loop when they are due (:func:`solve_nested_wait`). ``projection`` is the running batch's where the last call
    stopped, at this call's lookahead (see :func:`~baselines.nested_wait.kept_projection`). Returns, after the
    decision, the projection kept, the rule and the adaptive margin in force (``in_force``, :func:`adaptive_margin`)
    and the call's last solve (no boundaries: none). It runs its iterations on borrowed views of what the caller owns
    (:func:`~llmsched_env.compiled.borrowed`)."""
    solve = no_solve()
    rule, margin = in_force
    while True:
        stop, running, decode, admit, chunk, projection = _adaptive_nested_wait_iterations(
            borrowed(run), running, borrowed(columns), borrowed(arrivals), borrowed(engine),
            borrowed(RuleInForce(rule, margin)), borrowed(guard), borrowed(learn), borrowed(learning.completed),
            projection)
        if not learn.ints[DUE]:
            return stop, running, decode, admit, chunk, projection, RuleInForce(rule, margin), solve
        # The iterations stopped for a solve, their decision still to make: solve, and go on with the new rule
        # (the kept projection follows its lookahead: kept_projection).
        learn.ints[DUE] = 0
        solved = _solve_due(learn, run, columns, learning)
        if len(solved.boundaries):
            solve = solved
            margin = adaptive_margin(solve, learning.settings, learning.margin_reserves, margin.state, rule.pausing)
            rule = adaptive_rule(solve, learning.settings, rule.drain_when_idle, rule.pausing, margin)


@compiled
def _adaptive_nested_wait_iterations(run: RunState, running: np.ndarray, columns: RequestColumns,
                                     arrivals: ChunkArrays, engine: EngineParams, in_force: "RuleInForce",
                                     guard: np.ndarray, learn: LearningState, completed: "CompletionSample",
                                     projection: BatchProjection
                                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, BatchProjection]:
    nothing = np.empty(0, dtype=np.int64)
    rule, margin = in_force
    projection = kept_projection(rule, projection, running, columns, engine, run)
    while True:
        if not learn.ints[RESUME]:
            stop = compiled_run.begin(run, columns, arrivals)
            if stop != GO_ON:
                return stop, running, nothing, nothing, nothing, projection
            if _observe(learn, run, columns, completed.count[0] >= learn.ints[WARMUP]):
                learn.ints[DUE] = 1
                learn.ints[RESUME] = 1
                return PAUSE, running, nothing, nothing, nothing, projection
        learn.ints[RESUME] = 0
        stop, running, decode, admit, chunk, finished, projection = nested_wait_step(
            rule, guard, running, run, columns, arrivals, engine, projection, margin)
        _record_completions(completed, finished, columns)
        if stop != GO_ON:
            return stop, running, decode, admit, chunk, projection


@compiled
def _quantile_edges(values: np.ndarray, grid: int) -> np.ndarray:
    """``np.unique(np.quantile(values, np.arange(1, grid) / grid))`` (NumPy's default, linear, method), in NumPy's
    arithmetic: the same edges. Only the order statistics the quantiles interpolate between are found (a
    partition around them, not a sort)."""
    count = len(values)
    if grid <= 1:
        return np.empty(0, dtype=np.float64)
    virtuals = np.empty(grid - 1, dtype=np.float64)  # each quantile's position in the sorted sample
    ranks = np.empty(2 * (grid - 1), dtype=np.int64)  # and the two order statistics around it
    for k in range(1, grid):
        virtuals[k - 1] = (count - 1) * (k / grid)
        below = int(math.floor(virtuals[k - 1]))
        ranks[2 * k - 2], ranks[2 * k - 1] = below, min(below + 1, count - 1)
    ordered = np.partition(values, np.unique(ranks))
    edges = np.empty(grid - 1, dtype=np.float64)
    for k in range(1, grid):
        virtual = virtuals[k - 1]
        if virtual >= count - 1:
            edges[k - 1] = ordered[count - 1]
            continue
        below = int(math.floor(virtual))
        weight, low, high = virtual - below, ordered[below], ordered[below + 1]
        edges[k - 1] = high - (high - low) * (1 - weight) if weight >= 0.5 else low + (high - low) * weight
    return np.unique(edges)


@compiled
def quantile_classes(prompt: np.ndarray, output: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The adaptive WAIT's classes of a length sample: the non-empty cells of its ``grid × grid`` quantile grid of
    (prompt, output), in cell order (prompt cell major), each as its members' mean prompt, mean output and share
    of the sample."""
    prompt_edges, output_edges = _quantile_edges(prompt, grid), _quantile_edges(output, grid)
    columns = len(output_edges) + 1
    cells = (len(prompt_edges) + 1) * columns
    members = np.zeros(cells, dtype=np.int64)
    prompt_sum = np.zeros(cells, dtype=np.float64)  # sums of integers, exact in any order
    output_sum = np.zeros(cells, dtype=np.float64)
    for i in range(len(prompt)):
        cell = np.searchsorted(prompt_edges, prompt[i], side="right") * columns + np.searchsorted(
            output_edges, output[i], side="right")
        members[cell] += 1
        prompt_sum[cell] += prompt[i]
        output_sum[cell] += output[i]
    found = np.flatnonzero(members)
    return prompt_sum[found] / members[found], output_sum[found] / members[found], members[found] / len(prompt)


# -- the adaptive Nested WAIT's solve, in one compiled path for the loop and for `decide` ----------------------
SEGMENTS, MARGIN = 4, 0.05  # nested_wait_thresholds' defaults: quantile segments, and the margin between them
PROMPT, RATE, TAU, MEMORY, SCALE, FLUID_MEMORY, C0, WORK = range(8)  # indices of NestedWaitSolve.reals
# indices of NestedWaitLearning.settings
(CAPACITY_TOKENS, CAPACITY_BLOCKS, BLOCK_SIZE, QUANTILE, THRESHOLD_SCALE, LENDS, TOKEN_BUDGET, DRAIN_ITERATIONS,
 CALM_DECISIONS) = range(9)


class NestedWaitSolve(NamedTuple):
    """One solve of the adaptive Nested WAIT (:func:`solve_nested_wait`): what its rule and its report are made
    of."""

    boundaries: np.ndarray  # int64 b_1 < … < b_K (none: no solve)
    n: np.ndarray  # int64 threshold per segment, as solved (before the threshold scale)
    survival: np.ndarray  # float64 p_k per segment
    lookahead: np.ndarray  # int64 residual_quantiles table of the lengths' distribution
    levels: np.ndarray  # int64 (levels, len(lookahead)): the adaptive margin's tables, boldest first (no rows: none)
    reals: np.ndarray  # float64, indexed by PROMPT (mean), RATE (sized for), TAU, MEMORY (M^π), SCALE (α),
    # FLUID_MEMORY (M* of the rate and distribution), C0 (the cost model's), WORK (a request's mean lifetime work, s)


class RuleInForce(NamedTuple):
    """The adaptive Nested WAIT's rule between two solves, and the adaptive margin that moves its lookahead."""

    rule: NestedWaitRule
    margin: Margin


class NestedWaitLearning(NamedTuple):
    """What the adaptive Nested WAIT's compiled loop learns and solves from, besides the rate
    (:class:`LearningState`)."""

    completed: "CompletionSample"
    settings: np.ndarray  # float64, indexed by CAPACITY_TOKENS … CALM_DECISIONS (THRESHOLD_SCALE: the agent's)
    profile: np.ndarray  # float64 the cost profile's coefficients (LinearCostModel.coefficients)
    margin_quantiles: np.ndarray  # float64 the adaptive margin's lookahead quantile per level (none: no margin)
    margin_reserves: np.ndarray  # float64 and its share of the reserve kept from lending


@compiled
def no_solve() -> NestedWaitSolve:
    """A :class:`NestedWaitSolve` that stands for none."""
    return NestedWaitSolve(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64),
                           np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.int64), np.zeros(8, dtype=np.float64))


@compiled
def solve_nested_wait(lengths: np.ndarray, prompts: np.ndarray, rate: float, coefficients: np.ndarray,
                      capacity_tokens: float, quantile: float, margin_quantiles: np.ndarray) -> NestedWaitSolve:
    """The adaptive Nested WAIT's thresholds and lookahead from the output ``lengths`` of recent completions (any
    order), the ``prompts`` of recent arrivals, the total ``rate`` and the cost ``coefficients``: Nested WAIT's
    sizing (:func:`~baselines.thresholds.nested_wait_solution`, four quantile segments, margin 0.05) for the
    lengths' distribution at the mean prompt, the lookahead's ``quantile`` of each residual (and, for an adaptive
    margin, the ``margin_quantiles``' tables), the fluid memory ``M*`` the reserve is capped at, and a request's mean
    lifetime work (the compute load per unit of rate, :attr:`AdaptiveNestedWaitPolicy.estimated_load`)."""
    values, probabilities = length_distribution(lengths)
    bounds = boundaries_at_quantiles(values, probabilities, SEGMENTS)
    total = 0.0
    for prompt_len in prompts:
        total += prompt_len  # integers: exact in any order, as NumPy's mean sums them
    prompt = total / len(prompts)
    survival, n, scale, tau, memory, work, held = nested_wait_solution(
        values, probabilities, bounds, prompt, rate, coefficients, capacity_tokens, MARGIN)
    _, _, fluid_memory = equilibrium_point(rate, probabilities, work, held, coefficients[0])
    mean_work = 0.0
    for j in range(len(probabilities)):
        mean_work += probabilities[j] * work[j]
    reals = np.array([prompt, rate, tau, memory, scale, fluid_memory, coefficients[0], mean_work], dtype=np.float64)
    lookahead = residual_table(values, probabilities, quantile)
    levels = np.empty((len(margin_quantiles), len(lookahead)), dtype=np.int64)
    for level in range(len(margin_quantiles)):
        levels[level] = residual_table(values, probabilities, margin_quantiles[level])
    return NestedWaitSolve(bounds, n, survival, lookahead, levels, reals)


@compiled
def scaled_counts(n: np.ndarray, scale: float) -> np.ndarray:
    """Thresholds times a residual agent's ``scale``, rounded (half to even), at least 1."""
    scaled = np.empty(len(n), dtype=np.int64)
    for k in range(len(n)):
        scaled[k] = max(1, int(np.rint(n[k] * scale)))
    return scaled


@compiled
def _scaled_reserve(solve: NestedWaitSolve, settings: np.ndarray) -> float:
    """The memory a solve keeps back from lending (``min(M*, M^π)``), at the settings' threshold scale."""
    scale = settings[THRESHOLD_SCALE]
    reserve = min(solve.reals[FLUID_MEMORY], solve.reals[MEMORY])
    if scale != 1.0:
        reserve *= scale
    return reserve


@compiled
def adaptive_margin(solve: NestedWaitSolve, settings: np.ndarray, reserves: np.ndarray, state: np.ndarray,
                    pausing: bool) -> Margin:
    """The adaptive margin (:func:`~baselines.nested_wait.adapt_lookahead`) of a solve: its lookahead tables
    (``solve.levels``) and, per level, lending up to the capacity less that level's share (``reserves``) of the
    scaled reserve; it moves on ``state``, which outlives the solve (a level barred by an eviction stays barred).
    None (no levels) without a margin, for the paper's variant, or before the first solve."""
    count = len(solve.levels) if not pausing else 0
    spares = np.full(count, -1, dtype=np.int64)
    if settings[LENDS]:
        reserve = _scaled_reserve(solve, settings)
        for level in range(count):
            spares[level] = lending_limit(reserves[level] * reserve, int(settings[CAPACITY_BLOCKS]),
                                          int(settings[BLOCK_SIZE]))
    return Margin(solve.levels[:count], spares, int(settings[CALM_DECISIONS]), state)


@compiled
def adaptive_rule(solve: NestedWaitSolve, settings: np.ndarray, drain_when_idle: bool, pausing: bool,
                  margin: Margin) -> NestedWaitRule:
    """The compiled rule of a solve, at the settings' threshold scale: the scaled thresholds, the lookahead (the
    measured variant projects; the paper's pauses), lending up to the capacity less the scaled reserve
    (``min(M*, M^π)``), and the scaled token budget (:func:`~baselines.stall_free.scaled_budget`), following the
    queue at the solve's mean prompt with the settings' drain (:func:`~baselines.stall_free.backlog_budget`). With
    an adaptive ``margin`` (:func:`adaptive_margin` of the same solve) the lookahead and lending are its level's."""
    scale = settings[THRESHOLD_SCALE]
    n = scaled_counts(solve.n, scale) if scale != 1.0 else solve.n.copy()
    spare = -1
    if settings[LENDS] and not pausing:
        spare = lending_limit(_scaled_reserve(solve, settings), int(settings[CAPACITY_BLOCKS]),
                              int(settings[BLOCK_SIZE]))
    residual = np.empty(0, dtype=np.int64) if pausing else solve.lookahead.copy()
    if len(margin.levels):
        residual = margin.levels[margin.state[LEVEL]].copy()
        spare = margin.spares[margin.state[LEVEL]]
    return NestedWaitRule(solve.boundaries.copy(), segment_code_table(solve.boundaries), n, residual,
                          np.array([spare], dtype=np.int64), drain_when_idle, pausing,
                          scaled_budget(int(settings[TOKEN_BUDGET]), scale), int(settings[DRAIN_ITERATIONS]),
                          solve.reals[PROMPT])


@compiled
def _solve_due(learn: LearningState, run: RunState, columns: RequestColumns,
               learning: NestedWaitLearning) -> NestedWaitSolve:
    """:meth:`AdaptiveNestedWaitPolicy.decide`'s solve in the loop: once ``warmup`` requests have finished, the
    thresholds of the recent completions and arrivals (none when every recent request has retired: the
    thresholds stay), then the solve recorded (:meth:`_Learning.solved`)."""
    completed, settings = learning.completed, learning.settings
    count, size = completed.count[0], len(completed.lengths)
    if count < learn.ints[WARMUP]:
        return no_solve()
    now, rate, factor = run.reals[NOW], _sizing_rate(learn, run), followed_factor(learn.cost)
    first, arrived = max(run.ints[RETIRED], run.counters[N] - size), run.counters[N]
    solve = no_solve()
    if first < arrived:
        coefficients = learning.profile * factor if factor != 1.0 else learning.profile
        solve = solve_nested_wait(completed.lengths[:min(count, size)], columns.prompt[first:arrived],
                                  max(rate, 1e-9), coefficients, settings[CAPACITY_TOKENS], settings[QUANTILE],
                                  learning.margin_quantiles)
    learn.reals[SOLVED_AT], learn.reals[SOLVED_RATE], learn.reals[SOLVED_FACTOR] = now, rate, factor
    learn.ints[SOLVES] += 1
    return solve


def _unit_thresholds(mix: TypeMix, capacity_tokens: int, block_size: int) -> WaitThresholds:
    count = len(mix.types)
    return WaitThresholds(n=np.ones(count, np.int64), iteration_time_s=0.0, memory_tokens=0.0, memory_blocks=0,
                          scale=1.0, fluid_memory_tokens=0.0, capacity_blocks=capacity_tokens // block_size)


@dataclass
class AdaptiveWaitPolicy(WaitPolicy):
    """WAIT (memory-safe, lengths known) with classes and rates learnt online; see the module docstring."""

    learning: _Learning | None = None
    grid: int = 3
    threshold_scale: float = 1.0  # every threshold and the reserve, times this (see set_threshold_scale)

    @classmethod
    def create(cls, cost: LinearCostModel, capacity_tokens: int, block_size: int, *, grid: int = 3,
               token_budget: int = 0, drain_iterations: int = 0, latency_order_weight: float = 0.0,
               **learning: float) -> "AdaptiveWaitPolicy":
        """WAIT-adaptive; with a ``token_budget``, its decisions batched stall-free within it
        (``wait-adaptive-stall-free``, :mod:`baselines.stall_free`), raised with the queue given
        ``drain_iterations`` (:func:`~baselines.stall_free.backlog_budget`), its admissions served by projected
        latency given ``latency_order_weight`` (:func:`~baselines.stall_free.latency_order`)."""
        if grid < 1:
            raise ConfigError(f"grid must be >= 1, got {grid}")
        placeholder = TypeMix((RequestType(1, 1, 1.0),))
        learnt = _Learning(cost, capacity_tokens, block_size, **learning)  # type: ignore[arg-type]
        name = "wait-adaptive" + learnt.name_suffix() + ("-stall-free" if token_budget else "")
        return cls(placeholder, _unit_thresholds(placeholder, capacity_tokens, block_size), name=name,
                   token_budget=token_budget, drain_iterations=drain_iterations,
                   latency_order_weight=latency_order_weight, learning=learnt, grid=grid)

    def reset(self, engine: Engine) -> None:
        super().reset(engine)
        assert self.learning is not None
        self.learning.reset()
        self.learning.pause_backlog(self.threshold_scale != 1.0)
        self._engine = engine
        self.mix = TypeMix((RequestType(1, 1, 1.0),))
        self._solved = _unit_thresholds(self.mix, self.learning.capacity_tokens, self.learning.block_size)
        self.thresholds = self._scaled(self._solved)
        self._work_per_request = 0.0
        self._rule_stale = False
        self._queues = TypeQueues(len(self.thresholds.n))

    def set_threshold_scale(self, scale: float) -> None:
        """Multiply every threshold (rounded, at least 1), the memory kept back from lending and the token budget of
        stall-free batching (if any) by ``scale``, from the next decision on and after every solve; 1 is
        WAIT-adaptive itself, bit for bit. Sized on the backlog, a scale other than 1 sizes on the estimate alone
        (:meth:`_Learning.pause_backlog`). A residual agent's action (:mod:`agents.residual`)."""
        self.threshold_scale = _checked_scale(scale)
        if self.learning is not None:
            self.learning.pause_backlog(self.threshold_scale != 1.0)
        self.thresholds = self._scaled(self._solved)
        self._rule_stale = True

    @property
    def iteration_budget(self) -> int:
        """The token budget times the threshold scale (:func:`~baselines.stall_free.scaled_budget`)."""
        return scaled_budget(self.token_budget, self.threshold_scale)

    @property
    def solved_thresholds(self) -> WaitThresholds:
        """The thresholds as last solved, before the scale."""
        return self._solved

    @property
    def reserved_tokens(self) -> float:
        """The KV memory kept back from lending now (tokens): the thresholds' pipelines, scaled."""
        assert self.learning is not None
        return float(self.thresholds.memory_blocks * self.learning.block_size)

    @property
    def estimated_load(self) -> float:
        """The compute load it estimates now, ``ρ̂ = λ̂ · E[u]``: the rate estimate times a request's mean lifetime
        work (s of iteration time) over its learnt classes, under the cost model it last solved with; 0 before the
        first solve. It does not saturate at the stability region's edge, as the thresholds' scale does."""
        assert self.learning is not None
        return self.learning.rates.total * self._work_per_request

    def _scaled(self, solved: WaitThresholds) -> WaitThresholds:
        if self.threshold_scale == 1.0:
            return solved
        assert self.learning is not None
        n = scaled_counts(solved.n, self.threshold_scale)
        blocks = lifetime_blocks(self.mix.prompt_lens, self.mix.output_lens, self.learning.block_size)
        return replace(solved, n=n, memory_blocks=int(n @ blocks))

    def decide(self, state: SchedulerState) -> Decision:
        learning = self.learning
        assert learning is not None and state.output_len is not None
        learning.observe(state)
        if learning.due(state.now, state.num_requests >= learning.warmup, state.num_waiting):
            self._resolve(state)
        return super().decide(state)

    def compiled_loop(self) -> CompiledLoop:
        """This policy compiled (:func:`run_adaptive_wait`): WAIT's compiled rule between solves, the solves in
        Python; the same decisions as :meth:`decide`, bit for bit."""
        learning, engine = self.learning, self._engine
        assert learning is not None
        follow, learn = WaitQueueFollower(len(self.thresholds.n)), learning.loop_state()
        rule = [self.compiled_rule()]

        def loop(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                 params: EngineParams) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            if learn.ints[DUE]:  # the loop stopped for a solve, its decision still to make
                state = engine.state()
                if self._learn_mix(state):
                    follow.reclassify(self.mix, state, run, arrivals)
                learning.solved(state.now, state.num_waiting)
                rule[0], learn.ints[DUE] = self.compiled_rule(), 0
                run.counters[:] = engine.counter_array()  # type: ignore[attr-defined]  # the queue was read
            elif self._rule_stale:  # rescaled between two calls
                rule[0] = self.compiled_rule()
            self._rule_stale = False
            follow.make_room(run, arrivals)
            learning.to_loop(learn)
            *stop, follow.held = run_adaptive_wait(run, running, columns, arrivals, params, rule[0],
                                                   follow.types.data, follow.queue, learn, follow.held)
            learning.from_loop(learn)
            return tuple(stop)  # type: ignore[return-value]
        return loop

    def _resolve(self, state: SchedulerState) -> None:
        learning = self.learning
        assert learning is not None
        if self._learn_mix(state):
            self._reclassify(state)
        learning.solved(state.now, state.num_waiting)

    def _learn_mix(self, state: SchedulerState) -> bool:
        """New classes (a quantile grid of the recent arrivals' lengths) and their thresholds; ``False`` (nothing
        changed) when no arrival is left in the engine to learn from (all retired)."""
        learning = self.learning
        assert learning is not None and state.output_len is not None
        # The last `memory` arrivals still in the engine (retired rows are gone): a sample of arrivals, unbiased.
        recent = np.arange(max(state.retired, state.num_requests - learning.memory), state.num_requests)
        if len(recent) == 0:
            return False
        total = learning.sizing_rate(state.num_waiting)
        mean_prompt, mean_output, share = quantile_classes(np.ascontiguousarray(state.prompt_len[recent]),
                                                           np.ascontiguousarray(state.output_len[recent]), self.grid)
        types = [RequestType(max(1, int(round(p))), max(1, int(round(o))), total * f)
                 for p, o, f in zip(mean_prompt.tolist(), mean_output.tolist(), share.tolist())]
        self.mix = TypeMix(tuple(types))
        cost = learning.current_cost()
        self._solved = wait_thresholds(self.mix, cost, learning.capacity_tokens, learning.block_size)
        # Shares, not the classes' rates: these are 0 when nothing arrived in the last minute, the work is not.
        # fsum: the same sum on every CPU, whatever the vector width.
        self._work_per_request = math.fsum((share * lifetime_work(self.mix.prompt_lens, self.mix.output_lens,
                                                                   cost)).tolist())
        self.thresholds = self._scaled(self._solved)
        return True


#: Eviction-free decisions (with requests waiting) before the adaptive policy's margin steps down a level: ten times
#: the oracle's (``nested-wait-margin``). Stepping down after 200, it evicted 2 to 6 times a run on bursty and
#: two-type traffic at ρ 0.8 to 0.9 and lost up to 2 s of p99 there; after 2,000, none, and it still keeps most of
#: what the margin gains on heavy tails (docs/results.md).
MARGIN_CALM_DECISIONS = 2000


@dataclass
class AdaptiveNestedWaitPolicy(NestedWaitPolicy):
    """Nested WAIT (lengths hidden) with its rate and output-length distribution learnt online from arrivals
    and completions; see the module docstring."""

    learning: _Learning | None = None
    lookahead_quantile: float = LOOKAHEAD_QUANTILE
    horizon_s: float = 3600.0
    threshold_scale: float = 1.0  # every threshold and the reserve, times this (see set_threshold_scale)
    # The adaptive margin (item 7 of baselines.nested_wait): the lookahead's quantile and the lending reserve move
    # between MARGIN_QUANTILES × MARGIN_RESERVES on the evictions seen, their tables re-solved with every solve.
    adaptive_margin: bool = False

    @classmethod
    def create(cls, cost: LinearCostModel, capacity_tokens: int, block_size: int, *, horizon_s: float = 3600.0,
               token_budget: int = 0, drain_iterations: int = 0, adaptive_margin: bool = False, **learning: float
               ) -> "AdaptiveNestedWaitPolicy":
        """Nested-WAIT-adaptive; with a ``token_budget``, its decisions batched stall-free within it
        (``nested-wait-adaptive-stall-free``, :mod:`baselines.stall_free`), raised with the queue given
        ``drain_iterations`` (:func:`~baselines.stall_free.backlog_budget`); with ``adaptive_margin``, its
        lookahead's margin adapted to the evictions seen (``nested-wait-adaptive-margin``)."""
        learnt = _Learning(cost, capacity_tokens, block_size, **learning)  # type: ignore[arg-type]
        name = ("nested-wait-adaptive" + ("-margin" if adaptive_margin else "") + learnt.name_suffix()
                + ("-stall-free" if token_budget else ""))
        return cls(_single_segment(capacity_tokens), name=name, token_budget=token_budget,
                   drain_iterations=drain_iterations, learning=learnt,
                   horizon_s=horizon_s, lend_spare_memory=True, adaptive_margin=adaptive_margin,
                   calm_decisions=MARGIN_CALM_DECISIONS if adaptive_margin else NestedWaitPolicy.calm_decisions)

    def reset(self, engine: Engine) -> None:
        if self.adaptive_margin and (self.variant != "measured" or self.calm_decisions < 1):
            raise ConfigError("an adaptive lookahead margin needs the measured variant and calm_decisions >= 1, got "
                              f"{self.variant!r}, {self.calm_decisions}")
        self._solve: NestedWaitSolve | None = None  # the last solve (None: thresholds not solved yet)
        levels = MARGIN_QUANTILES if self.adaptive_margin else ()
        self._margin_quantiles = np.array(levels, dtype=np.float64)
        self._margin_reserves = np.array(MARGIN_RESERVES if self.adaptive_margin else (), dtype=np.float64)
        # The margin's level (the most cautious to start), the lowest not barred, its calm count and the evictions
        # seen: one state for the whole run, whichever solve's tables the levels hold.
        self._margin_state = np.array([max(len(levels) - 1, 0), 0, 0, 0], dtype=np.int64)
        super().reset(engine)
        learning = self.learning
        assert learning is not None
        if not 0 < self.lookahead_quantile <= 1:
            raise ConfigError(f"the lookahead quantile must be in (0, 1], got {self.lookahead_quantile}")
        learning.reset()
        learning.pause_backlog(self.threshold_scale != 1.0)
        self._solved = (_single_segment(learning.capacity_tokens), None)
        self.thresholds, self.reserve_tokens = self._scaled(*self._solved)
        self.lookahead = None
        self._rule_stale = False
        self._completed = Completions(learning.memory)
        self._settings = np.array([learning.capacity_tokens, engine.capacity_blocks, engine.block_size,
                                   self.lookahead_quantile, self.threshold_scale, float(self.lend_spare_memory),
                                   self.token_budget, self.drain_iterations, self.calm_decisions],
                                  dtype=np.float64)
        self._profile = learning.cost.coefficients()
        self._follow_margin()

    def set_threshold_scale(self, scale: float) -> None:
        """Multiply every segment's threshold (rounded, at least 1), the memory kept back from lending and the token
        budget of stall-free batching (if any) by ``scale``, from the next decision on and after every solve; 1 is
        Nested-WAIT-adaptive itself, bit for bit. Sized on the backlog, a scale other than 1 sizes on the estimate
        alone (:meth:`_Learning.pause_backlog`). A residual agent's action (:mod:`agents.residual`)."""
        self.threshold_scale = _checked_scale(scale)
        if self.learning is not None:
            self.learning.pause_backlog(self.threshold_scale != 1.0)
        self.thresholds, self.reserve_tokens = self._scaled(*self._solved)
        self._settings[THRESHOLD_SCALE] = self.threshold_scale
        self._rule_stale = True
        self._follow_margin()  # its levels' lending limits are the scaled reserve's

    @property
    def iteration_budget(self) -> int:
        """The token budget times the threshold scale (:func:`~baselines.stall_free.scaled_budget`)."""
        return scaled_budget(self.token_budget, self.threshold_scale)

    @property
    def solved_thresholds(self) -> NestedWaitThresholds:
        """The thresholds as last solved, before the scale."""
        return self._solved[0]

    @property
    def reserved_tokens(self) -> float:
        """The KV memory kept back from lending now (tokens): the fluid memory, scaled (the pipelines' before the
        first solve)."""
        return float(self.thresholds.memory_tokens if self.reserve_tokens is None else self.reserve_tokens)

    @property
    def estimated_load(self) -> float:
        """The compute load it estimates now, ``ρ̂ = λ̂ · E[u]``: the rate estimate times a request's mean lifetime
        work (s of iteration time) under the output lengths and prompts of its last solve; 0 before the first. It
        does not saturate at the stability region's edge, as the solve's scale does."""
        assert self.learning is not None
        return 0.0 if self._solve is None else self.learning.rates.total * float(self._solve.reals[WORK])

    def _scaled(self, solved: NestedWaitThresholds, reserve: float | None
                ) -> tuple[NestedWaitThresholds, float | None]:
        scale = self.threshold_scale
        if scale == 1.0:
            return solved, reserve
        return (replace(solved, n=scaled_counts(solved.n, scale), memory_tokens=solved.memory_tokens * scale),
                None if reserve is None else reserve * scale)

    @property
    def completions(self) -> "Completions":
        """The output lengths it has seen requests finish with (what it learns its distribution from)."""
        return self._completed

    def compiled_rule(self, margin: Margin | None = None) -> NestedWaitRule:
        """The rule as the compiled loop takes it: its last solve's (:func:`adaptive_rule`, the one the loop builds
        when it solves; at the adaptive margin's level now, ``margin`` when the caller has built it already with
        :meth:`compiled_margin`), or Nested WAIT's of the thresholds before the first."""
        if self._solve is None:
            return super().compiled_rule()
        return adaptive_rule(self._solve, self._settings, self.drain_when_idle, self.variant == "paper",
                             self.compiled_margin() if margin is None else margin)

    def compiled_margin(self) -> Margin:
        """The adaptive margin of the last solve (:func:`adaptive_margin`) on the run's margin state; no levels
        without one, or before the first solve."""
        if self._solve is None or not self.adaptive_margin:
            return Margin(np.empty((0, 0), dtype=np.int64), np.empty(0, dtype=np.int64), max(self.calm_decisions, 1),
                          self._margin_state)
        return adaptive_margin(self._solve, self._settings, self._margin_reserves, self._margin_state,
                               self.variant == "paper")

    def _follow_margin(self) -> None:
        """After a solve or a rescale: the Python rule's margin (:meth:`NestedWaitPolicy.decide`) is built anew at
        its next decision (:meth:`_refresh_margin`), not here, since a residual agent rescales before every one of
        its decisions and the compiled loop, which builds its own, never reads it."""
        self._margin_stale = self.adaptive_margin

    def _refresh_margin(self) -> None:
        """The Python rule's margin and the rule it moves, at the last solve and scale, if either changed since they
        were built; it counts evictions from the start, before the first solve gives it levels."""
        if self._margin_stale:
            self._margin_rule, self._margin = self._rule_in_force()
            self._margin_stale = False

    def _rule_in_force(self) -> RuleInForce:
        """The rule at the last solve and scale with its margin, the margin built once for both."""
        margin = self.compiled_margin()
        return RuleInForce(self.compiled_rule(margin), margin)

    def compiled_loop(self) -> CompiledLoop:
        """This policy compiled (:func:`run_adaptive_nested_wait`): Nested WAIT's compiled rule, the thresholds
        solved again within the loop (:func:`solve_nested_wait`, the solve :meth:`decide` calls); the same
        decisions as :meth:`decide`, bit for bit."""
        learning = self.learning
        assert learning is not None
        learn, guard = learning.loop_state(), np.zeros(2, dtype=np.int64)
        in_force = [self._rule_in_force()]
        kept = [no_projection()]  # the running batch's projection where the loop last stopped
        follows = NestedWaitLearning(self._completed.sample, self._settings, self._profile, self._margin_quantiles,
                                     self._margin_reserves)

        def loop(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                 params: EngineParams) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            if self._rule_stale:  # rescaled between two calls: the lookahead is the same
                in_force[0] = self._rule_in_force()
                self._rule_stale = False
            learning.to_loop(learn)
            stop, running, *decision, kept[0], in_force[0], solve = run_adaptive_nested_wait(
                run, running, columns, arrivals, params, in_force[0], guard, learn, follows, kept[0])
            learning.from_loop(learn)
            if len(solve.boundaries):
                self._adopt(solve)
            self.count_guard(guard)
            return (stop, running, *decision)  # type: ignore[return-value]
        return loop

    def decide(self, state: SchedulerState) -> Decision:
        learning = self.learning
        assert learning is not None
        learning.observe(state)
        self._completed.observe(state)
        if learning.due(state.now, True, state.num_waiting) and self._completed.count >= learning.warmup:
            self._resolve_at(state.now, state.retired, state.num_requests, state.num_waiting, state.prompt_len,
                             self._completed.lengths())
        self._refresh_margin()
        return super().decide(state)

    def _resolve_at(self, now: float, retired: int, num_requests: int, waiting: int, prompt_len: np.ndarray,
                    lengths: np.ndarray) -> None:
        """New thresholds, lookahead and reserve (:func:`solve_nested_wait`) from the recent completions' output
        ``lengths``, at engine time ``now``, with ``num_requests`` arrived (ids ``retired`` on still in the
        engine, prompts in ``prompt_len``)."""
        learning = self.learning
        assert learning is not None
        recent = slice(max(retired, num_requests - learning.memory), num_requests)
        if recent.start < recent.stop:  # else every request retired: nothing to learn the prompt from; keep them
            self._adopt(solve_nested_wait(
                np.ascontiguousarray(lengths, dtype=np.int64), np.ascontiguousarray(prompt_len[recent], np.int64),
                max(learning.sizing_rate(waiting), 1e-9), learning.current_cost().coefficients(),
                float(learning.capacity_tokens), float(self.lookahead_quantile), self._margin_quantiles))
        learning.solved(now, waiting)

    def _adopt(self, solve: NestedWaitSolve) -> None:
        """Take a solve's thresholds (with the paper's report of them), lookahead and reserve."""
        assert self.learning is not None
        reals = solve.reals
        thresholds = nested_wait_report(solve.boundaries, solve.survival, solve.n, float(reals[SCALE]),
                                        float(reals[TAU]), float(reals[MEMORY]), float(reals[PROMPT]),
                                        float(reals[RATE]), float(reals[C0]), self.learning.capacity_tokens,
                                        horizon_s=self.horizon_s)
        self._solve = solve
        self._solved = (thresholds, min(float(reals[FLUID_MEMORY]), thresholds.memory_tokens))
        self.thresholds, self.reserve_tokens = self._scaled(*self._solved)
        self.lookahead = solve.lookahead
        self._follow_margin()


class CompletionSample(NamedTuple):
    """The output lengths of the last ``len(lengths)`` requests to finish (a ring), and how many finished in all."""

    lengths: np.ndarray  # int64 ring
    count: np.ndarray  # int64[1]


@compiled_inlined
def _record_completions(sample: CompletionSample, finished: np.ndarray, columns: RequestColumns) -> None:
    """Add the lengths of requests that have just finished (their rows still hold them) to ``sample``."""
    size = len(sample.lengths)
    for i in finished:
        sample.lengths[sample.count[0] % size] = columns.context[i] - columns.prompt[i]
        sample.count[0] += 1


class Completions:
    """What the adaptive Nested WAIT learns its length distribution from: the output lengths of the last ``memory``
    requests to finish, seen as they finish. A finished request's row may be retired (released) before the
    policy's next look, so the length is taken from what the policy saw the iteration before: a request that
    decoded ``d`` tokens and then left the batch without going back to the queue has finished with ``d + 1``
    (finishing takes a decode; an evicted one keeps its context). The compiled loop records the same lengths
    right after each iteration (:func:`_record_completions`)."""

    def __init__(self, memory: int) -> None:
        self.sample = CompletionSample(np.zeros(memory, dtype=np.int64), np.zeros(1, dtype=np.int64))
        self._ids = np.empty(0, dtype=np.int64)  # running at the last look
        self._decoded = np.empty(0, dtype=np.int64)  # and what each had decoded then

    @property
    def count(self) -> int:
        """Requests seen to finish."""
        return int(self.sample.count[0])

    def lengths(self) -> np.ndarray:
        """The recorded lengths, oldest first."""
        size, count = len(self.sample.lengths), self.count
        if count <= size:
            return self.sample.lengths[:count].copy()
        return np.roll(self.sample.lengths, -(count % size))

    def observe(self, state: SchedulerState) -> None:
        """Record the requests that finished since the last look (the Python path, one look per decision)."""
        running = state.running
        if len(self._ids):
            left = kernels.not_among(self._ids, np.asarray(running, dtype=np.int64))
            ids, decoded = self._ids[left], self._decoded[left]
            if len(ids):
                retired = ids < state.retired  # finished and handed over: the row is gone
                alive = np.flatnonzero(~retired)
                grew = np.zeros(len(ids), dtype=bool)
                grew[alive] = state.context_len[ids[alive]] - state.prompt_len[ids[alive]] == decoded[alive] + 1
                for length in (decoded[retired | grew] + 1).tolist():
                    self.sample.lengths[self.count % len(self.sample.lengths)] = length
                    self.sample.count[0] += 1
        self._ids = np.array(running, dtype=np.int64)
        self._decoded = state.context_len[running] - state.prompt_len[running]


def _checked_scale(scale: float) -> float:
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"threshold scale must be finite and > 0, got {scale!r}")
    return scale


def _single_segment(capacity_tokens: int) -> NestedWaitThresholds:
    """Before any completion: one segment, threshold 1 (FCFS under the overflow guard)."""
    return NestedWaitThresholds(boundaries=np.array([10**9]), n=np.array([1]), survival=np.ones(1), prompt_len=0.0,
                                iteration_time_s=0.0, memory_tokens=0.0, buffer_tokens=0.0, theta=np.zeros(1),
                                scale=1.0, ratio_conditions_met=True, stability_condition_met=True,
                                capacity_tokens=capacity_tokens)
