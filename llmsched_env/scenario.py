"""A scenario: the workload, the cost model and the memory a run or a sweep is set in.

It is what the command line and the comparison job share: it builds the arrivals for a rate, the
engine, and the fluid benchmark, so every policy of a comparison sees the same requests and the
same optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from llmsched_env.cost_model import DEFAULT_PROFILE, LinearCostModel, load_profile, parse_cost
from llmsched_env.errors import ConfigError
from llmsched_env.fluid import FluidSolution, lifetime_work, solve_fluid
from llmsched_env.simulator import SimulatedEngine
from llmsched_env.workload import (
    ArrivalKind,
    ArrivalProcess,
    Arrivals,
    LengthSampleWorkload,
    TraceWorkload,
    TypeMix,
    parse_types,
    read_trace_csv,
)

DEFAULT_TYPES = "p=50,o=156,rate=18;p=100,o=171,rate=18"


@dataclass(frozen=True)
class Scenario:
    """Everything but the policy: where requests come from, what an iteration costs, how much KV fits.

    Exactly one of ``mix`` (request types with rates) and ``trace`` (a replayed or length-sampled
    trace) is set.
    """

    cost: LinearCostModel
    capacity_tokens: int
    block_size: int
    mix: TypeMix | None = None
    trace: TraceWorkload | LengthSampleWorkload | None = None
    process: ArrivalProcess = ArrivalProcess()  # of a type mix's arrivals (a length sample carries its own)
    output_lengths_known: bool = True

    def __post_init__(self) -> None:
        if (self.mix is None) == (self.trace is None):
            raise ConfigError("a scenario needs exactly one of a type mix and a trace")
        if not isinstance(self.capacity_tokens, int) or self.capacity_tokens < 1:
            raise ConfigError(f"KV capacity must be an integer >= 1 token, got {self.capacity_tokens!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block size must be an integer >= 1 token, got {self.block_size!r}")
        if self.capacity_tokens < self.block_size:
            raise ConfigError(f"KV capacity of {self.capacity_tokens} tokens is less than one block of "
                              f"{self.block_size}")

    @property
    def capacity_blocks(self) -> int:
        return self.capacity_tokens // self.block_size

    @property
    def paged_capacity_tokens(self) -> int:
        """The capacity the engine really has: whole blocks only."""
        return self.capacity_blocks * self.block_size

    @property
    def base_rate(self) -> float:
        """The total arrival rate as given (req/s)."""
        assert self.mix is not None or self.trace is not None
        return self.mix.total_rate if self.mix is not None else self.trace.mean_rate  # type: ignore[union-attr]

    def at_rate(self, total_rate: float) -> "Scenario":
        """The same scenario with the total arrival rate set to ``total_rate`` (shares kept)."""
        if self.mix is not None:
            return replace(self, mix=self.mix.scaled_to(total_rate))
        assert self.trace is not None
        return replace(self, trace=self.trace.with_rate(total_rate))

    def rate_for_load(self, rho: float) -> float:
        """The total rate at which the load ``ρ = Σ λ_j u_j`` equals ``rho`` (mix shares kept)."""
        mix = self.offered_mix()
        per_request = float(mix.rates @ lifetime_work(mix.prompt_lens, mix.output_lens, self.cost)) / mix.total_rate
        return rho / per_request

    def offered_mix(self) -> TypeMix:
        """The offered load as a type mix: the given types, or one type per distinct length pair of a trace
        at its share of the trace's mean rate (exact for the fluid model, which is linear in the rates)."""
        if self.mix is not None:
            return self.mix
        assert self.trace is not None
        lengths = self.trace.prompt_len, self.trace.output_len
        return TypeMix.from_lengths(*lengths, duration_s=len(lengths[0]) / self.base_rate)

    def class_mix(self) -> TypeMix:
        """A few representative types: the given ones, or a 3 × 3 (prompt, output) quantile bucketing of a
        trace (:meth:`TypeMix.bucketed`). WAIT sizes its thresholds on it; the environment's classes are its types."""
        if self.mix is not None:
            return self.mix
        assert self.trace is not None
        return TypeMix.bucketed(self.trace.prompt_len, self.trace.output_len, self.base_rate)

    def sample(self, horizon: float, seed: int) -> Arrivals:
        """The requests arriving in ``[0, horizon]`` (the same seed, the same requests)."""
        rng = np.random.default_rng(seed)
        if self.trace is not None:
            return self.trace.sample(horizon, rng)
        assert self.mix is not None
        return self.process.workload(self.mix).sample(horizon, rng)

    def fluid_mix(self, arrivals: Arrivals, horizon: float) -> TypeMix:
        """The type mix the fluid benchmark is computed on: the given rates, or a trace's empirical mix."""
        if self.mix is not None:
            return self.mix
        if len(arrivals) == 0:
            raise ConfigError(f"no request of the trace arrives within the horizon of {horizon} s")
        return TypeMix.from_lengths(arrivals.prompt_len, arrivals.output_len, horizon)

    def fluid(self, arrivals: Arrivals, horizon: float) -> FluidSolution:
        return solve_fluid(self.fluid_mix(arrivals, horizon), self.cost, self.paged_capacity_tokens)

    def engine(self) -> SimulatedEngine:
        return SimulatedEngine(self.cost, capacity_tokens=self.capacity_tokens, block_size=self.block_size,
                               output_lengths_known=self.output_lengths_known)


def build_scenario(
    *,
    types: str | None = None,
    trace: str | Path | None = None,
    rate: float | None = None,
    profile: str | None = None,
    cost: str | None = None,
    memory_tokens: int | None = None,
    block_size: int | None = None,
    arrivals: ArrivalKind = "poisson",
    cv: float = 2.0,
    hidden_lengths: bool = False,
) -> Scenario:
    """Resolve command-line style options into a :class:`Scenario`.

    ``types`` or ``trace`` (default: the paper-style two-type mix); ``cost`` overrides the ``profile``'s
    cost model, ``memory_tokens``/``block_size`` its capacity and paging. A length-only trace needs
    ``rate``; a timed trace is replayed (``rate`` rescales its time axis).
    """
    if types is not None and trace is not None:
        raise ConfigError("give either --types or --trace, not both")
    chosen = load_profile(profile or DEFAULT_PROFILE)
    model = parse_cost(cost) if cost is not None else chosen.cost
    capacity = memory_tokens if memory_tokens is not None else chosen.kv_capacity_tokens
    block = block_size if block_size is not None else chosen.block_size
    if isinstance(capacity, int) and capacity < 1:
        raise ConfigError(f"--memory-tokens must be >= 1, got {capacity}")
    if not (math.isfinite(cv) and cv > 0):
        raise ConfigError(f"--cv must be finite and > 0, got {cv}")
    process = ArrivalProcess(arrivals, cv=cv)
    if trace is not None:
        times, prompts, outputs = read_trace_csv(trace, require_arrivals=False)
        if times is None:
            if rate is None:
                raise ConfigError(f"{trace} has no 'arrived_at' column: give --rate (req/s) for its arrivals")
            source: TraceWorkload | LengthSampleWorkload = LengthSampleWorkload(
                prompts, outputs, rate, process)
        else:
            replay = TraceWorkload(times - times[0], prompts, outputs)
            source = replay.with_rate(rate) if rate is not None else replay
        return Scenario(model, capacity, block, trace=source, output_lengths_known=not hidden_lengths)
    mix = parse_types(types or DEFAULT_TYPES)
    if rate is not None:
        mix = mix.scaled_to(rate)
    return Scenario(model, capacity, block, mix=mix, process=process, output_lengths_known=not hidden_lengths)
