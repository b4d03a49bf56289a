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
  requests (a finished request's context less its prompt: the state shows it once it has finished). In a stationary system completions have the arrivals' length distribution, so this
  sample is unbiased once the system has run for a few lifetimes; no request's own length is read
  before it finishes.

Thresholds are re-solved every ``resolve_every_s`` of engine time, and at once when the rate estimate
moves by more than ``resolve_on_change`` (relative) since the last solve. Until ``warmup`` arrivals (or
completions) have been seen, the policies admit as their memory lookahead allows (thresholds of 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from baselines.lookahead import LOOKAHEAD_QUANTILE, residual_quantiles
from baselines.nested_wait import NestedWaitPolicy
from baselines.thresholds import (
    NestedWaitThresholds,
    OutputLengthDistribution,
    WaitThresholds,
    nested_wait_thresholds,
    wait_thresholds,
)
from baselines.type_queues import TypeQueues
from baselines.wait import WaitPolicy
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import equilibrium
from llmsched_env.rate_estimate import ArrivalRateEstimator
from llmsched_env.workload import RequestType, TypeMix


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

    def __post_init__(self) -> None:
        for name in ("window_s", "resolve_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0 s, got {value!r}")
        if not 0 < self.resolve_on_change:
            raise ConfigError(f"resolve_on_change must be > 0, got {self.resolve_on_change!r}")
        if self.memory < self.warmup or self.warmup < 1:
            raise ConfigError(f"need 1 <= warmup <= memory, got warmup {self.warmup}, memory {self.memory}")
        self.reset()

    def reset(self) -> None:
        self.rates = ArrivalRateEstimator(self.window_s)
        self.seen = 0
        self.solved_at = -math.inf
        self.solved_rate = 0.0
        self.solves = 0

    def observe(self, state: SchedulerState) -> None:
        fresh = np.arange(self.seen, state.num_requests)
        self.rates.update(state.now, state.arrival_time[fresh])
        self.seen = state.num_requests

    def due(self, now: float, enough_data: bool) -> bool:
        if not enough_data:
            return False
        rate = self.rates.total
        moved = self.solved_rate > 0 and abs(rate - self.solved_rate) > self.resolve_on_change * self.solved_rate
        return now - self.solved_at >= self.resolve_every_s or moved

    def solved(self, now: float) -> None:
        self.solved_at, self.solved_rate = now, self.rates.total
        self.solves += 1


def _unit_thresholds(mix: TypeMix, capacity_tokens: int, block_size: int) -> WaitThresholds:
    count = len(mix.types)
    return WaitThresholds(n=np.ones(count, np.int64), iteration_time_s=0.0, memory_tokens=0.0, memory_blocks=0,
                          scale=1.0, fluid_memory_tokens=0.0, capacity_blocks=capacity_tokens // block_size)


@dataclass
class AdaptiveWaitPolicy(WaitPolicy):
    """WAIT (memory-safe, lengths known) with classes and rates learnt online; see the module docstring."""

    learning: _Learning | None = None
    grid: int = 3

    @classmethod
    def create(cls, cost: LinearCostModel, capacity_tokens: int, block_size: int, *, grid: int = 3,
               **learning: float) -> "AdaptiveWaitPolicy":
        if grid < 1:
            raise ConfigError(f"grid must be >= 1, got {grid}")
        placeholder = TypeMix((RequestType(1, 1, 1.0),))
        return cls(placeholder, _unit_thresholds(placeholder, capacity_tokens, block_size), name="wait-adaptive",
                   learning=_Learning(cost, capacity_tokens, block_size, **learning), grid=grid)  # type: ignore[arg-type]

    def reset(self, engine: Engine) -> None:
        super().reset(engine)
        assert self.learning is not None
        self.learning.reset()
        self.mix = TypeMix((RequestType(1, 1, 1.0),))
        self.thresholds = _unit_thresholds(self.mix, self.learning.capacity_tokens, self.learning.block_size)
        self._queues = TypeQueues(len(self.thresholds.n))

    def decide(self, state: SchedulerState) -> Decision:
        learning = self.learning
        assert learning is not None and state.output_len is not None
        learning.observe(state)
        if learning.due(state.now, state.num_requests >= learning.warmup):
            self._resolve(state)
        return super().decide(state)

    def _resolve(self, state: SchedulerState) -> None:
        learning = self.learning
        assert learning is not None and state.output_len is not None
        recent = np.arange(max(0, state.num_requests - learning.memory), state.num_requests)
        prompt, output = state.prompt_len[recent], state.output_len[recent]
        p_edges = np.unique(np.quantile(prompt, np.arange(1, self.grid) / self.grid))
        o_edges = np.unique(np.quantile(output, np.arange(1, self.grid) / self.grid))
        cell = np.searchsorted(p_edges, prompt, side="right") * (len(o_edges) + 1) + \
            np.searchsorted(o_edges, output, side="right")
        total = learning.rates.total
        types = []
        for c in np.unique(cell):
            members = cell == c
            share = members.mean()
            types.append(RequestType(max(1, int(round(prompt[members].mean()))), max(1, int(round(output[members].mean()))),
                                     total * share))
        self.mix = TypeMix(tuple(types))
        self.thresholds = wait_thresholds(self.mix, learning.cost, learning.capacity_tokens, learning.block_size)
        self._reclassify(state)
        learning.solved(state.now)


@dataclass
class AdaptiveNestedWaitPolicy(NestedWaitPolicy):
    """Nested WAIT (lengths hidden) with its rate and output-length distribution learnt online from arrivals
    and completions; see the module docstring."""

    learning: _Learning | None = None
    lookahead_quantile: float = LOOKAHEAD_QUANTILE
    horizon_s: float = 3600.0

    @classmethod
    def create(cls, cost: LinearCostModel, capacity_tokens: int, block_size: int, *, horizon_s: float = 3600.0,
               **learning: float) -> "AdaptiveNestedWaitPolicy":
        return cls(_single_segment(capacity_tokens), name="nested-wait-adaptive",
                   learning=_Learning(cost, capacity_tokens, block_size, **learning),  # type: ignore[arg-type]
                   horizon_s=horizon_s, lend_spare_memory=True)

    def reset(self, engine: Engine) -> None:
        super().reset(engine)
        assert self.learning is not None
        self.learning.reset()
        self.thresholds = _single_segment(self.learning.capacity_tokens)
        self.lookahead = None
        self.reserve_tokens = None

    def decide(self, state: SchedulerState) -> Decision:
        learning = self.learning
        assert learning is not None
        learning.observe(state)
        if learning.due(state.now, True):
            finished = _finished_ids(state)
            if len(finished) >= learning.warmup:
                self._resolve(state, finished[-learning.memory:])
        return super().decide(state)

    def _resolve(self, state: SchedulerState, finished: np.ndarray) -> None:
        learning = self.learning
        assert learning is not None
        lengths = state.context_len[finished] - state.prompt_len[finished]  # a finished request's output, known now
        recent = np.arange(max(0, state.num_requests - learning.memory), state.num_requests)
        prompt = float(state.prompt_len[recent].mean())
        distribution = OutputLengthDistribution.from_samples(lengths)
        rate = max(learning.rates.total, 1e-9)
        self.thresholds = nested_wait_thresholds(distribution, prompt, rate, learning.cost, learning.capacity_tokens,
                                                 horizon_s=self.horizon_s)
        self.lookahead = residual_quantiles(distribution.values, distribution.probabilities, self.lookahead_quantile)
        _, _, fluid_memory = equilibrium(rate * distribution.probabilities, np.full(len(distribution.values), prompt),
                                         distribution.values, learning.cost)
        self.reserve_tokens = min(fluid_memory, self.thresholds.memory_tokens)
        learning.solved(state.now)


def _finished_ids(state: SchedulerState) -> np.ndarray:
    """Requests that have finished (neither waiting nor running), in arrival order."""
    done = np.ones(state.num_requests, dtype=bool)
    done[state.running] = False
    done[state.waiting] = False
    return np.flatnonzero(done)


def _single_segment(capacity_tokens: int) -> NestedWaitThresholds:
    """Before any completion: one segment, threshold 1 (FCFS under the overflow guard)."""
    return NestedWaitThresholds(boundaries=np.array([10**9]), n=np.array([1]), survival=np.ones(1), prompt_len=0.0,
                                iteration_time_s=0.0, memory_tokens=0.0, buffer_tokens=0.0, theta=np.zeros(1),
                                scale=1.0, ratio_conditions_met=True, stability_condition_met=True,
                                capacity_tokens=capacity_tokens)
