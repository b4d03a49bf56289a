"""Workloads: request types, arrival processes and trace replay.

A workload produces :class:`Arrivals`, the requests that arrive in ``[0, horizon]`` sorted by time, either
all at once (``sample``) or as a stream of chunks in time order (``chunks``), which is what a long run
consumes so that its memory does not grow with the horizon. ``sample`` is the chunks put together, so both
give the same requests. Every generator takes an explicit :class:`numpy.random.Generator`, so the same seed
gives the same requests. Whether the scheduler may *see* output lengths is not a property of the workload but of
the engine (``SimulatedEngine(output_lengths_known=...)``): the same arrivals serve both settings.

Types follow the paper's notation: type ``j`` has prompt length ``p_j``, output length ``o_j`` and
Poisson rate ``λ_j`` (requests per second).
"""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Protocol, Sequence

import numpy as np

from llmsched_env.errors import ConfigError, TraceFormatError
from llmsched_env.kernels import log_lengths, nearest_types

#: The largest prompt or output length accepted (tokens): int32's range, far beyond any model's context.
MAX_TOKENS = 2**31 - 1
#: The largest arrival rate accepted (req/s), per type and in total: ten thousand times any deployed service.
MAX_RATE = 1e9


@dataclass(frozen=True)
class RequestType:
    """One request type: prompt length ``p``, output length ``o`` (tokens) and arrival rate (req/s)."""

    prompt_len: int
    output_len: int
    rate: float

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_len, (int, np.integer)) or not 1 <= self.prompt_len <= MAX_TOKENS:
            raise ConfigError(f"prompt length must be an integer in [1, {MAX_TOKENS}], got {self.prompt_len!r}")
        if not isinstance(self.output_len, (int, np.integer)) or not 1 <= self.output_len <= MAX_TOKENS:
            raise ConfigError(f"output length must be an integer in [1, {MAX_TOKENS}], got {self.output_len!r}")
        if not (math.isfinite(self.rate) and 0 <= self.rate <= MAX_RATE):
            raise ConfigError(f"arrival rate must be in [0, {MAX_RATE:g}] req/s, got {self.rate!r}")


@dataclass(frozen=True)
class TypeMix:
    """A mixture of request types; the unit of the fluid model and of WAIT's thresholds."""

    types: tuple[RequestType, ...]

    def __post_init__(self) -> None:
        if not self.types:
            raise ConfigError("a type mix needs at least one request type")

    @property
    def prompt_lens(self) -> np.ndarray:
        return np.array([t.prompt_len for t in self.types], dtype=np.int64)

    @property
    def output_lens(self) -> np.ndarray:
        return np.array([t.output_len for t in self.types], dtype=np.int64)

    @property
    def rates(self) -> np.ndarray:
        return np.array([t.rate for t in self.types], dtype=np.float64)

    @property
    def total_rate(self) -> float:
        return float(self.rates.sum())

    def scaled_to(self, total_rate: float) -> "TypeMix":
        """The same mix with its rates scaled proportionally so that they sum to ``total_rate``."""
        if not (math.isfinite(total_rate) and 0 < total_rate <= MAX_RATE):
            raise ConfigError(f"total rate must be in (0, {MAX_RATE:g}] req/s, got {total_rate!r}")
        if self.total_rate <= 0:
            raise ConfigError("cannot scale a type mix whose rates are all zero")
        factor = total_rate / self.total_rate
        return TypeMix(tuple(RequestType(t.prompt_len, t.output_len, t.rate * factor) for t in self.types))

    def to_text(self) -> str:
        """The compact command-line form, inverse of :func:`parse_types`."""
        return ";".join(f"p={t.prompt_len},o={t.output_len},rate={t.rate:g}" for t in self.types)

    def nearest(self, prompt_len: np.ndarray, output_len: np.ndarray) -> np.ndarray:
        """Index of the type nearest to each request in log-length space (exact when lengths match a type)."""
        log_prompt, log_output = self.log_lengths()
        return nearest_types(np.ascontiguousarray(prompt_len, dtype=np.int64).reshape(-1),
                             np.ascontiguousarray(output_len, dtype=np.int64).reshape(-1), log_prompt, log_output)

    def log_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """The logarithms of the types' prompt and output lengths (what :meth:`nearest` measures distance in)."""
        return log_lengths(self.prompt_lens), log_lengths(self.output_lens)

    @classmethod
    def from_lengths(cls, prompt_lens: np.ndarray, output_lens: np.ndarray, duration_s: float) -> "TypeMix":
        """One type per distinct (prompt, output) pair, with its empirical rate over ``duration_s``.

        This is exact for the fluid model, whose terms are linear in ``λ_j w_j`` and ``λ_j u_j``.
        """
        mix = cls.from_arrivals([Arrivals(np.empty(len(prompt_lens)), np.asarray(prompt_lens, np.int64),
                                          np.asarray(output_lens, np.int64))], duration_s)
        if mix is None:
            raise ConfigError("a type mix needs at least one request type")
        return mix

    @classmethod
    def from_arrivals(cls, chunks: Iterable["Arrivals"], duration_s: float) -> "TypeMix | None":
        """:meth:`from_lengths` of requests read chunk by chunk (memory: one entry per distinct pair); ``None``
        when no request arrived."""
        if duration_s <= 0:
            raise ConfigError(f"duration must be > 0 s, got {duration_s!r}")
        counts: dict[tuple[int, int], int] = {}
        for chunk in chunks:
            pairs, found = np.unique(np.stack([chunk.prompt_len, chunk.output_len], axis=1), axis=0,
                                     return_counts=True)
            for (p, o), c in zip(pairs.tolist(), found.tolist()):
                counts[p, o] = counts.get((p, o), 0) + c
        if not counts:
            return None
        return cls(tuple(RequestType(p, o, c / duration_s) for (p, o), c in sorted(counts.items())))

    @classmethod
    def bucketed(cls, prompt_lens: np.ndarray, output_lens: np.ndarray, total_rate: float,
                 buckets: int = 3) -> "TypeMix":
        """A few representative types for a length sample: ``buckets × buckets`` quantile cells of
        (prompt, output), each typed by its mean lengths at its share of ``total_rate``.

        What WAIT needs for a trace: thresholds per type only make sense with few, well-populated types.
        """
        if buckets < 1:
            raise ConfigError(f"buckets must be >= 1, got {buckets}")
        prompt_lens, output_lens = np.asarray(prompt_lens), np.asarray(output_lens)
        quantiles = np.linspace(0, 1, buckets + 1)[1:-1]
        prompt_cell = np.searchsorted(np.quantile(prompt_lens, quantiles), prompt_lens, side="right")
        output_cell = np.searchsorted(np.quantile(output_lens, quantiles), output_lens, side="right")
        cell = prompt_cell * buckets + output_cell
        types = []
        for c in np.unique(cell):
            members = cell == c
            types.append(RequestType(max(1, int(round(prompt_lens[members].mean()))),
                                     max(1, int(round(output_lens[members].mean()))),
                                     total_rate * members.mean()))
        return cls(tuple(types))


_TYPE_KEYS = {"p": "prompt_len", "prompt": "prompt_len", "o": "output_len", "output": "output_len",
              "rate": "rate", "lambda": "rate"}


def parse_types(text: str) -> TypeMix:
    """Parse the compact command-line form ``"p=10,o=10,rate=20;p=10,o=20,rate=10"``.

    Keys: ``p``/``prompt``, ``o``/``output`` (tokens, integers >= 1), ``rate``/``lambda`` (req/s >= 0).
    """
    types = []
    for index, chunk in enumerate(part.strip() for part in text.split(";")):
        if not chunk:
            continue
        where = f"type {index + 1} ({chunk!r})"
        fields: dict[str, str] = {}
        for item in chunk.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep:
                raise ConfigError(f"{where}: expected key=value, got {item.strip()!r}")
            if key not in _TYPE_KEYS:
                raise ConfigError(f"{where}: unknown field {key!r}; allowed: p, o, rate (or prompt, output, lambda)")
            name = _TYPE_KEYS[key]
            if name in fields:
                raise ConfigError(f"{where}: field {key!r} given twice")
            fields[name] = value.strip()
        missing = {"prompt_len", "output_len", "rate"} - fields.keys()
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(sorted(missing))}; need p, o and rate")
        try:
            prompt_len, output_len = int(fields["prompt_len"]), int(fields["output_len"])
        except ValueError:
            raise ConfigError(f"{where}: p and o must be integers, got p={fields['prompt_len']!r}, "
                              f"o={fields['output_len']!r}") from None
        try:
            rate = float(fields["rate"])
        except ValueError:
            raise ConfigError(f"{where}: rate must be a number, got {fields['rate']!r}") from None
        try:
            types.append(RequestType(prompt_len, output_len, rate))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
    if not types:
        raise ConfigError(f"no request type in {text!r}; expected e.g. 'p=10,o=10,rate=20;p=10,o=20,rate=10'")
    return TypeMix(tuple(types))


@dataclass(frozen=True)
class Arrivals:
    """Requests in arrival order: parallel arrays, one entry per request."""

    arrival_time: np.ndarray  # float64 seconds, nondecreasing
    prompt_len: np.ndarray  # int64 >= 1
    output_len: np.ndarray  # int64 >= 1

    def __post_init__(self) -> None:
        n = len(self.arrival_time)
        if len(self.prompt_len) != n or len(self.output_len) != n:
            raise ConfigError("arrival_time, prompt_len and output_len must have the same length")

    def __len__(self) -> int:
        return len(self.arrival_time)

    def until(self, horizon: float) -> "Arrivals":
        """The requests arriving in ``[0, horizon]``."""
        end = int(np.searchsorted(self.arrival_time, horizon, side="right"))
        return Arrivals(self.arrival_time[:end], self.prompt_len[:end], self.output_len[:end])

    @classmethod
    def concatenate(cls, chunks: Iterable["Arrivals"]) -> "Arrivals":
        """Consecutive chunks of one stream (each after the last) as one :class:`Arrivals`."""
        chunks = [cls(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)), *chunks]
        return cls(np.concatenate([c.arrival_time for c in chunks]), np.concatenate([c.prompt_len for c in chunks]),
                   np.concatenate([c.output_len for c in chunks]))

    def chunked(self, size: int = 4096) -> Iterator["Arrivals"]:
        """These requests as a stream of chunks of ``size`` (views, no copy)."""
        for start in range(0, len(self), size):
            end = start + size
            yield Arrivals(self.arrival_time[start:end], self.prompt_len[start:end], self.output_len[start:end])

    @classmethod
    def merge(cls, parts: Sequence["Arrivals"]) -> "Arrivals":
        """All the requests of ``parts``, in arrival order (stable: ties keep the order of ``parts``)."""
        parts = [cls(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)), *parts]
        times = np.concatenate([p.arrival_time for p in parts])
        order = np.argsort(times, kind="stable")
        return cls(times[order], np.concatenate([p.prompt_len for p in parts]).astype(np.int64)[order],
                   np.concatenate([p.output_len for p in parts]).astype(np.int64)[order])


class Workload(Protocol):
    """Anything that samples the requests arriving in ``[0, horizon]``."""

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        """Requests arriving in ``[0, horizon]``, sorted by arrival time."""
        ...

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        """The same requests as :meth:`sample` with the same generator, generated lazily: chunks in time order,
        whose concatenation is :meth:`sample`'s result. A run holds one chunk at a time."""
        ...

    @property
    def mean_rate(self) -> float:
        """Long-run arrival rate in requests per second."""
        ...


def _check_horizon(horizon: float) -> None:
    if not (math.isfinite(horizon) and horizon > 0):
        raise ConfigError(f"horizon must be finite and > 0 s, got {horizon!r}")


_DRAW = 1024  # gaps drawn per batch: fixed, so that a longer horizon extends a shorter one's arrivals


def _renewal_chunks(rate: float, horizon: float, cv: float, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Arrival times in ``[0, horizon]`` of a renewal process with gamma gaps (cv = 1: Poisson), in non-empty
    chunks of at most ``_DRAW``, drawn as the stream is read.

    Prefix-consistent: with the same generator state, the arrivals before ``t`` do not depend on the horizon.
    """
    if rate <= 0:
        return
    shape = 1.0 / cv**2
    scale = 1.0 / (rate * shape)
    start = 0.0
    while True:
        gaps = rng.exponential(scale, _DRAW) if cv == 1.0 else rng.gamma(shape, scale, _DRAW)
        chunk = start + np.cumsum(gaps)
        if chunk[-1] > horizon:
            if chunk[0] <= horizon:
                yield chunk[chunk <= horizon]
            return
        yield chunk
        start = float(chunk[-1])


def _typed(times: np.ndarray, prompt_len: int, output_len: int) -> Arrivals:
    return Arrivals(times, np.full(len(times), prompt_len, np.int64), np.full(len(times), output_len, np.int64))


def _typed_chunks(request_type: RequestType, times: Iterator[np.ndarray]) -> Iterator[Arrivals]:
    for chunk in times:
        yield _typed(chunk, request_type.prompt_len, request_type.output_len)


def _merged_streams(streams: Sequence[Iterator[Arrivals]]) -> Iterator[Arrivals]:
    """Merge time-ordered streams into one, lazily, as :meth:`Arrivals.merge` would merge them whole (ties in
    the order of ``streams``): a request is let out once every stream not yet exhausted has drawn past it."""
    buffered = [Arrivals(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)) for _ in streams]
    frontier = [-math.inf] * len(streams)  # the last time each stream has drawn (inf once exhausted)
    while True:
        lagging = min(frontier)
        for j, stream in enumerate(streams):
            if frontier[j] == lagging:  # the streams that hold the merge back draw on (all of them at the start)
                chunk = next(stream, None)
                if chunk is None:
                    frontier[j] = math.inf
                elif len(chunk):
                    buffered[j] = Arrivals.concatenate([buffered[j], chunk])
                    frontier[j] = float(chunk.arrival_time[-1])
        safe = min(frontier)
        if safe == math.inf:
            out, buffered = list(buffered), []
        else:
            # Strictly before ``safe``: the stream that drew ``safe`` last may still draw another request at it.
            cut = [int(np.searchsorted(b.arrival_time, safe, side="left")) for b in buffered]
            out = [Arrivals(b.arrival_time[:k], b.prompt_len[:k], b.output_len[:k]) for b, k in zip(buffered, cut)]
            buffered = [Arrivals(b.arrival_time[k:], b.prompt_len[k:], b.output_len[k:]) for b, k in zip(buffered, cut)]
        merged = Arrivals.merge(out)
        if len(merged):
            yield merged
        if safe == math.inf:
            return


@dataclass(frozen=True)
class PoissonWorkload:
    """Independent Poisson arrivals per type (the paper's model)."""

    mix: TypeMix

    @property
    def mean_rate(self) -> float:
        return self.mix.total_rate

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        return Arrivals.concatenate(self.chunks(horizon, rng))

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        return GammaWorkload(self.mix, cv=1.0).chunks(horizon, rng)


@dataclass(frozen=True)
class GammaWorkload:
    """Bursty arrivals: per type, a renewal process with gamma gaps of coefficient of variation ``cv``.

    ``cv = 1`` is Poisson; ``cv > 1`` is burstier (clumps of arrivals, then lulls); the mean rate stays ``λ_j``.
    """

    mix: TypeMix
    cv: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cv) and self.cv > 0):
            raise ConfigError(f"coefficient of variation must be finite and > 0, got {self.cv!r}")

    @property
    def mean_rate(self) -> float:
        return self.mix.total_rate

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        return Arrivals.concatenate(self.chunks(horizon, rng))

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        _check_horizon(horizon)
        streams = [_typed_chunks(t, _renewal_chunks(t.rate, horizon, self.cv, g))
                   for t, g in zip(self.mix.types, rng.spawn(len(self.mix.types)))]  # one generator per type
        return _merged_streams(streams)


@dataclass(frozen=True)
class OnOffWorkload:
    """Markov-modulated bursts: a two-state (on/off) modulated Poisson process over a type mix.

    The chain stays in each state an exponential time (means ``mean_on_s``, ``mean_off_s``); while on,
    type ``j`` arrives at ``λ_j · peak_factor``, while off at ``λ_j · off_factor``, where ``peak_factor``
    is set so that the long-run mean rate stays ``λ_j``.
    """

    mix: TypeMix
    mean_on_s: float = 5.0
    mean_off_s: float = 5.0
    off_factor: float = 0.2

    def __post_init__(self) -> None:
        if self.mean_on_s <= 0 or self.mean_off_s <= 0:
            raise ConfigError("mean_on_s and mean_off_s must be > 0 s")
        if not 0 <= self.off_factor < 1:
            raise ConfigError(f"off_factor must be in [0, 1), got {self.off_factor!r}")

    @property
    def mean_rate(self) -> float:
        return self.mix.total_rate

    @property
    def peak_factor(self) -> float:
        share_on = self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        return (1.0 - (1.0 - share_on) * self.off_factor) / share_on

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        return Arrivals.concatenate(self.chunks(horizon, rng))

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        _check_horizon(horizon)
        return self._chunks(horizon, rng)

    def _chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        # A sojourn's arrivals all come at or before the next one's: merging sojourn by sojourn is merging all.
        parts: list[Arrivals] = []
        pending = 0
        start, on = 0.0, bool(rng.random() < self.mean_on_s / (self.mean_on_s + self.mean_off_s))
        while start < horizon:
            length = rng.exponential(self.mean_on_s if on else self.mean_off_s)
            end = min(horizon, start + length)
            factor = self.peak_factor if on else self.off_factor
            for t in self.mix.types:
                count = rng.poisson(t.rate * factor * (end - start))
                parts.append(_typed(np.sort(rng.uniform(start, end, count)), t.prompt_len, t.output_len))
                pending += count
            start, on = end, not on
            if pending >= _DRAW:
                yield Arrivals.merge(parts)
                parts, pending = [], 0
        if pending:
            yield Arrivals.merge(parts)


ArrivalKind = Literal["poisson", "gamma", "onoff", "diurnal"]


@dataclass(frozen=True)
class ArrivalProcess:
    """How arrival times are drawn at a given mean rate: the part of a workload that is not lengths.

    * ``poisson``; ``gamma``: a renewal process with gamma gaps of coefficient of variation ``cv``;
    * ``onoff``: a two-state Markov-modulated Poisson process (MMPP), ``mean_on_s`` / ``mean_off_s`` the
      mean sojourns, the off rate ``off_factor`` times the mean and the on rate set so that the long-run
      mean is kept (:class:`OnOffWorkload`). The *shift* is on rate / off rate;
    * ``diurnal``: a Poisson process whose rate follows ``mean · (1 − amplitude · cos(2π t / period_s))``:
      a trough at ``t = 0``, the peak at half a period (a day compressed into ``period_s``).
    """

    kind: ArrivalKind = "poisson"
    cv: float = 2.0
    mean_on_s: float = 5.0
    mean_off_s: float = 5.0
    off_factor: float = 0.2
    period_s: float = 3600.0
    amplitude: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "gamma", "onoff", "diurnal"):
            raise ConfigError(f"arrival process must be poisson, gamma, onoff or diurnal, got {self.kind!r}")
        # The workloads check their own parameters (gamma's cv, on-off's sojourns and factor); diurnal's are here.
        self.workload(TypeMix((RequestType(1, 1, 1.0),)))
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ConfigError(f"period_s must be finite and > 0 s, got {self.period_s!r}")
        if not 0 <= self.amplitude < 1:
            raise ConfigError(f"amplitude must be in [0, 1), got {self.amplitude!r}")

    def times(self, rate: float, horizon: float, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in ``[0, horizon]`` at long-run mean ``rate`` (req/s), sorted."""
        return np.concatenate([np.empty(0), *self.time_chunks(rate, horizon, rng)])

    def time_chunks(self, rate: float, horizon: float, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """:meth:`times` in chunks, drawn as they are read."""
        _check_horizon(horizon)
        if rate <= 0:
            return iter(())
        if self.kind in ("poisson", "gamma"):
            return _renewal_chunks(rate, horizon, 1.0 if self.kind == "poisson" else self.cv, rng)
        if self.kind == "onoff":
            one = TypeMix((RequestType(1, 1, rate),))
            return (chunk.arrival_time for chunk in
                    OnOffWorkload(one, self.mean_on_s, self.mean_off_s, self.off_factor).chunks(horizon, rng))
        return self._thinned_chunks(rate, horizon, rng)

    def _thinned_chunks(self, rate: float, horizon: float, rng: np.random.Generator) -> Iterator[np.ndarray]:
        # Diurnal: thin a Poisson process at the peak rate (Lewis and Shedler). The thinning draws come after all
        # the candidates from the same generator; a copy run past the candidates first draws them in step.
        peak = rate * (1.0 + self.amplitude)
        thinning = copy.deepcopy(rng)
        for _ in _renewal_chunks(peak, horizon, 1.0, thinning):
            pass
        for candidates in _renewal_chunks(peak, horizon, 1.0, rng):
            keep = thinning.random(len(candidates)) * (1.0 + self.amplitude) < (
                1.0 - self.amplitude * np.cos(2.0 * np.pi * candidates / self.period_s))
            if keep.any():
                yield candidates[keep]

    def workload(self, mix: "TypeMix") -> "Workload":
        """The workload of this process over a type mix."""
        if self.kind == "poisson":
            return PoissonWorkload(mix)
        if self.kind == "gamma":
            return GammaWorkload(mix, self.cv)
        if self.kind == "onoff":
            return OnOffWorkload(mix, self.mean_on_s, self.mean_off_s, self.off_factor)
        return ModulatedWorkload(mix, self)


@dataclass(frozen=True)
class ModulatedWorkload:
    """A type mix whose total arrivals follow ``process``; each arrival's type is drawn by the mix's shares
    (the same modulation for every type, as a diurnal cycle modulates all traffic at once)."""

    mix: TypeMix
    process: ArrivalProcess

    @property
    def mean_rate(self) -> float:
        return self.mix.total_rate

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        return Arrivals.concatenate(self.chunks(horizon, rng))

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        arrival_stream, type_stream = rng.spawn(2)
        shares = self.mix.rates / self.mix.total_rate
        for times in self.process.time_chunks(self.mix.total_rate, horizon, arrival_stream):
            # Drawn chunk by chunk, the types are those drawn all at once (each draw takes one uniform).
            kinds = type_stream.choice(len(self.mix.types), size=len(times), p=shares)
            yield Arrivals(times, self.mix.prompt_lens[kinds], self.mix.output_lens[kinds])


@dataclass(frozen=True)
class QuantileLengths:
    """A length distribution given by quantile knots, log-linear between them (a heavy tail is kept:
    the top knots carry it). Fitted to a trace by :meth:`fit`; stored as two lists in a scenario file."""

    probabilities: tuple[float, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        p, v = np.asarray(self.probabilities, float), np.asarray(self.values, float)
        if len(p) < 2 or len(p) != len(v):
            raise ConfigError(f"quantile lengths need >= 2 (probability, length) knots of equal count, got "
                              f"{len(p)} probabilities and {len(v)} lengths")
        if p[0] != 0.0 or p[-1] != 1.0 or np.any(np.diff(p) <= 0):
            raise ConfigError(f"quantile probabilities must rise strictly from 0 to 1, got {list(self.probabilities)}")
        if np.any(v < 1) or np.any(np.diff(v) < 0):
            raise ConfigError(f"quantile lengths must be integers >= 1, non-decreasing, got {list(self.values)}")

    @classmethod
    def fit(cls, lengths: np.ndarray, probabilities: Sequence[float] = (0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9,
                                                                          0.95, 0.99, 0.999, 1)) -> "QuantileLengths":
        knots = np.quantile(np.asarray(lengths, float), probabilities)
        return cls(tuple(float(p) for p in probabilities), tuple(int(round(k)) for k in knots))

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(count)
        log_lengths = np.interp(u, self.probabilities, np.log(np.asarray(self.values, float)))
        return np.maximum(1, np.rint(np.exp(log_lengths))).astype(np.int64)


_LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")
_OPTIONAL_COLUMNS = ("arrived_at", "num_total_tokens", "pd_ratio")


def _parse_positive_int(value: str, path: Path, line: int, field: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise TraceFormatError(f"{path}:{line}: field {field!r} must be an integer >= 1, got {value!r}") from None
    if not (number.is_integer() and 1 <= number <= MAX_TOKENS):
        raise TraceFormatError(f"{path}:{line}: field {field!r} must be an integer in [1, {MAX_TOKENS}], "
                               f"got {value!r}")
    return int(number)


def read_trace_csv(path: str | Path, *, require_arrivals: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Read a trace CSV: ``arrived_at,num_prefill_tokens,num_decode_tokens`` (header required).

    Length-only files (no ``arrived_at``) are accepted when ``require_arrivals`` is false; the extra
    columns of the arXiv length file (``num_total_tokens``, ``pd_ratio``) are allowed and ignored.
    Any other column, a missing value, a non-integer or non-positive length, a negative, non-finite or
    decreasing arrival time raises :class:`TraceFormatError` naming the file, line and field.

    Returns ``(arrival_times or None, prompt_lens, output_lens)``.
    """
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as error:
        raise TraceFormatError(f"{path}: cannot open trace: {error.strerror}") from None
    try:
        return _read_trace_rows(handle, path, require_arrivals)
    except UnicodeDecodeError as error:
        raise TraceFormatError(f"{path}: not a UTF-8 text CSV (undecodable byte at offset {error.start})") from None
    except csv.Error as error:
        raise TraceFormatError(f"{path}: not a CSV file: {error}") from None


def trace_has_arrival_times(path: str | Path) -> bool:
    """Whether a trace CSV's header has ``arrived_at`` (a timed trace, replayed) rather than lengths only (whose
    arrivals a rate generates). The file itself is checked when it is read (:func:`read_trace_csv`)."""
    try:
        with Path(path).open(newline="") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False  # reading it names the problem
    return header is not None and "arrived_at" in [column.strip() for column in header]


def _read_trace_rows(handle, path: Path, require_arrivals: bool  # type: ignore[no-untyped-def]
                     ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(f"{path}:1: empty file; expected a header "
                                   f"'arrived_at,num_prefill_tokens,num_decode_tokens'")
        header = [h.strip() for h in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise TraceFormatError(f"{path}:1: column(s) {', '.join(map(repr, repeated))} given more than once")
        unknown = [h for h in header if h not in _LENGTH_COLUMNS + _OPTIONAL_COLUMNS]
        if unknown:
            raise TraceFormatError(f"{path}:1: unknown column(s) {', '.join(map(repr, unknown))}; allowed: "
                                   f"{', '.join(_LENGTH_COLUMNS + _OPTIONAL_COLUMNS)}")
        missing = [c for c in _LENGTH_COLUMNS if c not in header]
        if require_arrivals and "arrived_at" not in header:
            missing.insert(0, "arrived_at")
        if missing:
            raise TraceFormatError(f"{path}:1: missing column(s) {', '.join(missing)}")
        col = {name: header.index(name) for name in header}
        has_times = "arrived_at" in col
        times: list[float] = []
        prompts: list[int] = []
        outputs: list[int] = []
        previous = 0.0
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise TraceFormatError(f"{path}:{line}: expected {len(header)} fields ({','.join(header)}), "
                                       f"got {len(row)}")
            prompts.append(_parse_positive_int(row[col["num_prefill_tokens"]].strip(), path, line,
                                               "num_prefill_tokens"))
            outputs.append(_parse_positive_int(row[col["num_decode_tokens"]].strip(), path, line, "num_decode_tokens"))
            if has_times:
                raw = row[col["arrived_at"]].strip()
                try:
                    t = float(raw)
                except ValueError:
                    raise TraceFormatError(f"{path}:{line}: field 'arrived_at' must be a number of seconds, "
                                           f"got {raw!r}") from None
                if not math.isfinite(t) or t < 0:
                    raise TraceFormatError(f"{path}:{line}: field 'arrived_at' must be finite and >= 0, got {raw!r}")
                if t < previous:
                    raise TraceFormatError(f"{path}:{line}: field 'arrived_at' decreases ({t} < {previous}); "
                                           f"a trace must be sorted by arrival time")
                previous = t
                times.append(t)
    if not prompts:
        raise TraceFormatError(f"{path}: no requests after the header")
    return (np.array(times) if has_times else None,
            np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64))


@dataclass(frozen=True)
class TraceWorkload:
    """Replay of a recorded trace; ``time_scale`` < 1 compresses time (a higher rate), > 1 stretches it.

    Arrival times are shifted so the first request arrives at 0.
    """

    arrival_time: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    time_scale: float = 1.0

    @classmethod
    def from_csv(cls, path: str | Path) -> "TraceWorkload":
        times, prompts, outputs = read_trace_csv(path, require_arrivals=True)
        assert times is not None
        return cls.from_rows(times, prompts, outputs, source=path)

    @classmethod
    def from_rows(cls, times: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
                  source: str | Path = "trace") -> "TraceWorkload":
        """The replay of rows read from ``source`` (sorted arrival times), shifted to start at 0."""
        if times[-1] == times[0]:
            raise TraceFormatError(f"{source}: every arrival is at {times[0]:g} s: a replayed trace needs two "
                                   "distinct arrival times to have a rate (for its lengths alone, drop the "
                                   "arrived_at column and give --rate)")
        return cls(times - times[0], prompts, outputs)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_time[-1]) * self.time_scale

    @property
    def mean_rate(self) -> float:
        return len(self.arrival_time) / self.duration_s if self.duration_s > 0 else math.inf

    def with_rate(self, total_rate: float) -> "TraceWorkload":
        """The same trace, time-scaled so that its mean rate is ``total_rate`` req/s."""
        if not (math.isfinite(total_rate) and total_rate > 0):
            raise ConfigError(f"rate must be finite and > 0 req/s, got {total_rate!r}")
        natural = len(self.arrival_time) / float(self.arrival_time[-1])
        return TraceWorkload(self.arrival_time, self.prompt_len, self.output_len, natural / total_rate)

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        _check_horizon(horizon)
        return Arrivals(self.arrival_time * self.time_scale, self.prompt_len, self.output_len).until(horizon)

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        return self.sample(horizon, rng).chunked()  # the trace is in memory already


@dataclass(frozen=True)
class LengthSampleWorkload:
    """Lengths drawn i.i.d. (with replacement) from a length-only sample, arrival times from ``process``
    (Poisson by default; gamma gaps, on-off bursts or a diurnal cycle: :class:`ArrivalProcess`)."""

    prompt_len: np.ndarray
    output_len: np.ndarray
    rate: float
    process: ArrivalProcess = ArrivalProcess()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"rate must be finite and > 0 req/s, got {self.rate!r}")

    @classmethod
    def from_csv(cls, path: str | Path, rate: float,
                 process: ArrivalProcess = ArrivalProcess()) -> "LengthSampleWorkload":
        _, prompts, outputs = read_trace_csv(path, require_arrivals=False)
        return cls(prompts, outputs, rate, process)

    @property
    def mean_rate(self) -> float:
        return self.rate

    def with_rate(self, total_rate: float) -> "LengthSampleWorkload":
        return LengthSampleWorkload(self.prompt_len, self.output_len, total_rate, self.process)

    def sample(self, horizon: float, rng: np.random.Generator) -> Arrivals:
        return Arrivals.concatenate(self.chunks(horizon, rng))

    def chunks(self, horizon: float, rng: np.random.Generator) -> Iterator[Arrivals]:
        _check_horizon(horizon)
        arrival_stream, length_stream = rng.spawn(2)
        for times in self.process.time_chunks(self.rate, horizon, arrival_stream):
            # NumPy's bounded integers keep their buffered bits in the generator: chunk by chunk draws the same rows.
            rows = length_stream.integers(0, len(self.prompt_len), len(times))
            yield Arrivals(times, self.prompt_len[rows], self.output_len[rows])
