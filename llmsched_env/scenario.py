"""A scenario: the workload, the cost model and the memory a run or a sweep is set in.

It is what the command line and the comparison job share: it builds the arrivals for a rate, the
engine, and the fluid benchmark, so every policy of a comparison sees the same requests and the
same optimum.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmsched_env.cost_model import DEFAULT_PROFILE, LinearCostModel, load_profile, parse_cost
from llmsched_env.errors import ConfigError, RequestTooLargeError
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
        self._check_requests_fit()

    def _check_requests_fit(self) -> None:
        """A request whose last stage needs more KV than the cache holds can never finish, under any policy:
        refuse the scenario (the fluid benchmark would otherwise report a rate for it)."""
        if self.mix is not None:
            prompts, outputs, what = self.mix.prompt_lens, self.mix.output_lens, "request type"
        else:
            assert self.trace is not None
            prompts, outputs, what = self.trace.prompt_len, self.trace.output_len, "trace request"
        tokens = np.asarray(prompts, np.int64) + np.asarray(outputs, np.int64)
        too_big = np.flatnonzero(-(-tokens // self.block_size) > self.capacity_blocks)
        if len(too_big):
            i = int(too_big[0])
            raise RequestTooLargeError(
                f"{what} {i + 1} (p={int(prompts[i])}, o={int(outputs[i])}) needs {int(tokens[i]):,} KV tokens at its "
                f"last stage, more than the capacity of {self.paged_capacity_tokens:,} tokens: it could never "
                f"finish ({len(too_big)} such); raise --memory-tokens or shorten it")

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
        return Arrivals.concatenate(self.chunks(horizon, seed))

    def chunks(self, horizon: float, seed: int) -> Iterator[Arrivals]:
        """:meth:`sample`'s requests as a stream of chunks in time order, drawn as they are read (what a run
        consumes: its memory then does not grow with the horizon). The work is checked against the cap
        (:func:`check_work`) when the stream is made."""
        if not (math.isfinite(horizon) and horizon > 0):
            raise ConfigError(f"horizon must be finite and > 0 s, got {horizon!r}")
        if self.mix is not None or isinstance(self.trace, LengthSampleWorkload):
            check_work(self.base_rate * horizon, f"a run of {horizon:g} s at {self.base_rate:g} req/s")
        rng = np.random.default_rng(seed)
        if self.trace is not None:
            return self.trace.chunks(horizon, rng)
        assert self.mix is not None
        return self.process.workload(self.mix).chunks(horizon, rng)

    def fluid_mix(self, arrivals: Arrivals | Iterable[Arrivals], horizon: float) -> TypeMix:
        """The type mix the fluid benchmark is computed on: the given rates, or the empirical mix of a trace's
        ``arrivals`` (whole, or a stream of chunks: read only for a trace)."""
        if self.mix is not None:
            return self.mix
        mix = TypeMix.from_arrivals([arrivals] if isinstance(arrivals, Arrivals) else arrivals, horizon)
        if mix is None:
            raise ConfigError(f"no request of the trace arrives within the horizon of {horizon} s")
        return mix

    def fluid(self, arrivals: Arrivals | Iterable[Arrivals], horizon: float) -> FluidSolution:
        return solve_fluid(self.fluid_mix(arrivals, horizon), self.cost, self.paged_capacity_tokens)

    def engine(self) -> SimulatedEngine:
        return SimulatedEngine(self.cost, capacity_tokens=self.capacity_tokens, block_size=self.block_size,
                               output_lengths_known=self.output_lengths_known)


#: The most requests one command (or one episode) may ask to simulate, over all its runs, unless the
#: ``LLMSCHED_MAX_REQUESTS`` environment variable sets another cap: beyond it the run is refused up front.
DEFAULT_MAX_REQUESTS = 10**8


def check_work(expected_requests: float, what: str) -> None:
    """Refuse, in one line with the numbers, a request for more simulated requests than the cap (see
    :data:`DEFAULT_MAX_REQUESTS`): they would take hours (memory is bounded by the requests in the system, not
    by those that arrive)."""
    raw = os.environ.get("LLMSCHED_MAX_REQUESTS")
    try:
        cap = float(raw) if raw else DEFAULT_MAX_REQUESTS
    except ValueError:
        raise ConfigError(f"LLMSCHED_MAX_REQUESTS must be a number, got {raw!r}") from None
    if not expected_requests <= cap:  # NaN and inf refused too
        raise ConfigError(f"{what} would simulate about {expected_requests:.3g} requests, above the cap of {cap:.3g} "
                          "(set LLMSCHED_MAX_REQUESTS to raise it): lower the rate, the horizon or the runs")


def build_scenario(
    *,
    types: str | None = None,
    trace: str | Path | None = None,
    rate: float | None = None,
    profile: str | None = None,
    cost: str | None = None,
    memory_tokens: int | None = None,
    block_size: int | None = None,
    arrivals: ArrivalKind | None = None,
    cv: float | None = None,
    hidden_lengths: bool = False,
) -> Scenario:
    """Resolve command-line style options into a :class:`Scenario`.

    ``types`` or ``trace`` (default: the paper-style two-type mix); ``cost`` overrides the ``profile``'s
    cost model, ``memory_tokens``/``block_size`` its capacity and paging. A length-only trace needs
    ``rate``; a timed trace is replayed (``rate`` rescales its time axis), so ``arrivals`` and ``cv`` are
    refused with it. ``arrivals`` defaults to poisson; ``cv`` (default 2) applies to gamma arrivals only.
    """
    if types is not None and trace is not None:
        raise ConfigError("give either --types or --trace, not both")
    if cv is not None and arrivals != "gamma":
        raise ConfigError(f"--cv sets the variability of gamma arrivals; give --arrivals gamma with it (got "
                          f"{arrivals or 'poisson'})")
    chosen = load_profile(profile or DEFAULT_PROFILE)
    model = parse_cost(cost, base=chosen.cost) if cost is not None else chosen.cost
    capacity = memory_tokens if memory_tokens is not None else chosen.kv_capacity_tokens
    block = block_size if block_size is not None else chosen.block_size
    if isinstance(capacity, int) and capacity < 1:
        raise ConfigError(f"--memory-tokens must be >= 1, got {capacity}")
    cv = 2.0 if cv is None else cv
    if not (math.isfinite(cv) and cv > 0):
        raise ConfigError(f"--cv must be finite and > 0, got {cv}")
    process = ArrivalProcess(arrivals or "poisson", cv=cv)
    if trace is not None:
        times, prompts, outputs = read_trace_csv(trace, require_arrivals=False)
        if times is not None and arrivals is not None:
            raise ConfigError(f"{trace} has its own arrival times (arrived_at): --arrivals and --cv apply to "
                              "generated arrivals and length-only traces")
        if times is None:
            if rate is None:
                raise ConfigError(f"{trace} has no 'arrived_at' column: give --rate (req/s) for its arrivals")
            source: TraceWorkload | LengthSampleWorkload = LengthSampleWorkload(
                prompts, outputs, rate, process)
        else:
            replay = TraceWorkload.from_rows(times, prompts, outputs, source=trace)
            source = replay.with_rate(rate) if rate is not None else replay
        return Scenario(model, capacity, block, trace=source, output_lengths_known=not hidden_lengths)
    mix = parse_types(DEFAULT_TYPES if types is None else types)
    if rate is not None:
        mix = mix.scaled_to(rate)
    return Scenario(model, capacity, block, mix=mix, process=process, output_lengths_known=not hidden_lengths)
