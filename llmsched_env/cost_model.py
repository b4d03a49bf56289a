"""Iteration-time models: how long one engine iteration (batch) takes.

The general linear model (DESIGN.md section 2), all coefficients in seconds::

    τ = c0 + c_pf · (prefill tokens) + c_dec · (decode requests) + c_kv · (KV tokens of the batch)

"KV tokens of the batch" counts, for every request in the batch, the KV tokens it holds after the
iteration: ``p + s`` for a request running stage ``s`` (for a prefill chunk, the prompt tokens cached
so far). The paper's model ``τ = d0 + d1 · KV`` is ``c0 = d0, c_kv = d1`` with the other terms zero.

Over its lifetime a request of type ``(p, o)`` costs the engine ``u = c_pf·p + c_dec·o + c_kv·w`` seconds
of iteration time, where ``w = (o + 1)(p + o/2)`` is its memory-time (see :mod:`llmsched_env.fluid`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from llmsched_env import kernels
from llmsched_env.config_files import builtin_names, read_json_config
from llmsched_env.errors import ConfigError

_COEFFICIENTS = ("c0", "c_pf", "c_dec", "c_kv", "c_pf2")
#: The largest coefficient accepted (seconds per iteration, token or request): an hour, far beyond any engine.
MAX_COEFFICIENT_S = 3600.0
_PROFILE_FIELDS = {"name", "description", "kv_capacity_tokens", "block_size", *_COEFFICIENTS}


@dataclass(frozen=True)
class LinearCostModel:
    """``τ = c0 + c_pf·prefill_tokens + c_dec·decode_requests + c_kv·kv_tokens [+ c_pf2·prefill_attention]`` (s).

    ``c_pf2`` (default 0) prices prefill attention, which grows with the square of a chunk: see
    :func:`prefill_attention`. Calibration adds it only where it measurably improves the fit.
    """

    c0: float
    c_pf: float = 0.0
    c_dec: float = 0.0
    c_kv: float = 0.0
    c_pf2: float = 0.0

    def __post_init__(self) -> None:
        for name in _COEFFICIENTS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_COEFFICIENT_S):
                raise ConfigError(f"cost coefficient {name} must be in [0, {MAX_COEFFICIENT_S:g}] s, got {value!r}")
        if self.c0 <= 0:
            raise ConfigError(f"cost coefficient c0 (fixed time per iteration) must be > 0 s, got {self.c0!r}")

    @classmethod
    def paper(cls, d0: float, d1: float) -> "LinearCostModel":
        """The paper's two-coefficient model ``τ = d0 + d1 · (KV tokens in the batch)``."""
        return cls(c0=d0, c_kv=d1)

    def iteration_time(self, prefill_tokens: int, decode_requests: int, kv_tokens: int,
                       prefill_attention: float = 0.0) -> float:
        """Duration in seconds of one iteration with the given batch composition."""
        return float(kernels.iteration_seconds(self.coefficients(), prefill_tokens, decode_requests, kv_tokens,
                                               float(prefill_attention)))

    def scaled(self, factor: float) -> "LinearCostModel":
        """Every coefficient times ``factor`` (> 0): the same engine, uniformly slower (> 1) or faster."""
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"a cost model is scaled by a finite factor > 0, got {factor!r}")
        return LinearCostModel(**{name: getattr(self, name) * factor for name in _COEFFICIENTS})

    def coefficients(self) -> np.ndarray:
        """``[c0, c_pf, c_dec, c_kv, c_pf2]``, the form the compiled iteration takes."""
        return np.array([getattr(self, name) for name in _COEFFICIENTS], dtype=np.float64)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """A named hardware/model profile: a cost model plus the KV capacity and block size it was measured with."""

    name: str
    cost: LinearCostModel
    kv_capacity_tokens: int
    block_size: int
    description: str = ""


def prefill_attention(chunk: int | np.ndarray, cached: int | np.ndarray = 0) -> float | np.ndarray:
    """Query-key pairs a prefill chunk of ``chunk`` tokens attends over, after ``cached`` tokens of its
    context are already in the KV cache: ``chunk·cached + chunk·(chunk + 1)/2`` (causal attention)."""
    return chunk * cached + chunk * (chunk + 1) / 2


@dataclass(frozen=True)
class AttentionFit:
    """A fit of prefill attention time ``a + b·chunk + c_pf2·prefill_attention(chunk, cached)`` (seconds per
    iteration, all layers), and its mean and largest relative error on the samples it was fitted to."""

    intercept_s: float
    per_token_s: float
    c_pf2: float
    mean_error: float
    max_error: float


def fit_prefill_attention(chunk: np.ndarray, cached: np.ndarray, seconds: np.ndarray, layers: int = 1) -> AttentionFit:
    """Fit prefill attention samples (one chunk of ``chunk`` tokens after ``cached`` cached ones took ``seconds``
    per layer) by non-negative least squares on relative error; ``layers`` scales to the whole model.

    ``c_pf2`` is the coefficient the cost model takes; the constant and linear parts are reported so that
    the fit can be judged, and are left to ``c0`` and ``c_pf``, which the profile already fits.
    """
    from scipy.optimize import nnls

    chunk, cached, seconds = (np.asarray(v, dtype=np.float64) for v in (chunk, cached, seconds))
    if len(seconds) < 3 or np.any(seconds <= 0):
        raise ConfigError(f"an attention fit needs >= 3 samples with positive times, got {len(seconds)}")
    design = np.stack([np.ones_like(chunk), chunk, prefill_attention(chunk, cached)], axis=1)  # type: ignore[arg-type]
    coefficients, _ = nnls(design / seconds[:, None], np.ones_like(seconds))
    error = np.abs(design @ coefficients - seconds) / seconds
    a, b, c = (float(v) * layers for v in coefficients)
    return AttentionFit(a, b, c, float(error.mean()), float(error.max()))


def _profile_from_dict(data: object, source: str) -> Profile:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a JSON object with fields {', '.join(sorted(_PROFILE_FIELDS))}")
    unknown = set(data) - _PROFILE_FIELDS
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(_PROFILE_FIELDS))}")
    missing = [name for name in ("c0", "kv_capacity_tokens") if name not in data]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    try:
        cost = LinearCostModel(**{name: data[name] for name in _COEFFICIENTS if name in data})
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    capacity, block = data["kv_capacity_tokens"], data.get("block_size", 16)
    for field, value in (("kv_capacity_tokens", capacity), ("block_size", block)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: field {field!r} must be an integer >= 1, got {value!r}")
    return Profile(str(data.get("name", Path(source).stem)), cost, capacity, block, str(data.get("description", "")))


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped with llmsched."""
    return builtin_names("llmsched_env", "profiles")


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (see :func:`builtin_profiles`) or a JSON file by path.

    JSON fields: ``c0, c_pf, c_dec, c_kv`` (seconds; only ``c0`` required), optional ``c_pf2`` (the quadratic
    prefill term), ``kv_capacity_tokens``, optional ``block_size`` (default 16), ``name``, ``description``.
    """
    source, data = read_json_config(name_or_path, "llmsched_env", "profiles", "profile")
    return _profile_from_dict(data, source)


DEFAULT_PROFILE = "llama2-7b-a100"


def parse_cost(text: str, base: LinearCostModel | None = None) -> LinearCostModel:
    """Parse ``"d0=0.0086,d1=2.75e-7"`` (the paper's model: exactly these two terms) or
    ``"c0=..,c_pf=..,c_dec=..,c_kv=..,c_pf2=.."`` (seconds): the general form overrides the coefficients it
    names, the others keep ``base``'s (the profile's); without ``base`` they are 0 and ``c0`` is required."""
    values: dict[str, float] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"cost: expected key=value, got {item.strip()!r}")
        if key not in {"d0", "d1", *_COEFFICIENTS}:
            raise ConfigError(f"cost: unknown field {key!r}; allowed: d0, d1 (paper) or c0, c_pf, c_dec, c_kv, c_pf2")
        if key in values:
            raise ConfigError(f"cost: field {key!r} given twice")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ConfigError(f"cost: field {key!r} must be a number of seconds, got {raw.strip()!r}") from None
    paper_keys = {"d0", "d1"} & values.keys()
    general_keys = set(_COEFFICIENTS) & values.keys()
    if paper_keys and general_keys:
        raise ConfigError("cost: give either the paper's d0,d1 or the general c0,c_pf,c_dec,c_kv, not both")
    if paper_keys:
        if "d0" not in values:
            raise ConfigError("cost: the paper's model needs d0 (and d1)")
        return LinearCostModel.paper(values["d0"], values.get("d1", 0.0))
    if base is not None:
        return replace(base, **values)
    if "c0" not in values:
        raise ConfigError("cost: the general model needs c0")
    return LinearCostModel(**values)
