"""What ``vllm serve --scheduler-cls live_backend.policy_scheduler.PolicyScheduler`` is told to run, checked whole.

The settings arrive as ``--additional-config '{"llmsched": {...}}'`` (vLLM hands the dictionary to the
scheduler as ``vllm_config.additional_config``) and use the CLI's vocabulary:

``policy``
    a registered policy (``llmsched compare``'s names; default ``nested-wait-adaptive``), the directory of a
    workload-independent agent (``LLMSched-Residual-v0`` to ``-v2``, e.g. ``agents/pretrained/suite-residual``), or
    ``vllm``: vLLM's own scheduler, unchanged, with its ``schedule()`` timed (the other side of a comparison; the
    registered ``vllm`` policy, llmsched's model of that scheduler, is what the simulator runs for it), or
    ``package.module:factory``: your own policy, a callable ``factory(scenario, horizon_s) -> Policy`` (what
    :data:`baselines.POLICIES` holds), importable in vLLM's engine process.
``lengths``
    ``hidden`` (default: a policy learns a request's output length only when it finishes) or ``max_tokens``
    (the operator guarantees every request produces exactly its ``max_tokens``, e.g. ``ignore_eos`` traffic;
    policies that need known lengths, WAIT, read ``max_tokens - 1`` as the output length, the first token
    coming from the prefill as in the simulator's stage model).
``types`` / ``trace`` / ``rate``
    a workload prior, needed only by the policies that size their thresholds on known rates and lengths
    (``wait``, ``nested-wait``, ...). The adaptive variants and agents learn them online and need none.
``profile`` / ``cost``
    the cost model the fluid-guided policies plan with (a shipped profile name or JSON file, and an override
    ``c0=..,c1=..``); default: the profile of vLLM's device.
``stats_file``
    a JSON file the scheduler keeps up to date (at most once a second, and at shutdown) with its counters: its
    decisions, the iterations that fell back to vLLM's own scheduling and why, and the time its decisions took
    beside vLLM's own ``schedule()`` (:class:`~live_backend.policy_scheduler.ServeCounters`).
``iteration_log``
    a JSONL file to append each iteration's composition and duration to (off by default): its first line says the
    KV cache, each next one ``prefill_tokens``, ``decode_requests``, ``kv_tokens``, ``prefill_attention`` and
    ``duration_s`` (from the end of ``schedule()`` to the engine's output: the model's step as this server ran it).
    ``llmsched calibrate --from-log FILE`` fits the simulator's cost model to it.
``buffer_horizon_s``
    the window of Nested WAIT's overflow bound (its ``√ log`` safety buffer; default 3600 s). A server has no
    horizon: nothing else depends on one.

Everything is checked before the server loads a model (:func:`parse_serve_settings`, which the launcher calls)
and again inside vLLM's engine process, where the KV cache's size is known (:func:`build_serve_policy`).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from live_backend.config import DEFAULT_PROFILES
from llmsched_env.errors import ConfigError
from llmsched_env.policy import Policy
from llmsched_env.scenario import Scenario, build_scenario

#: The key of ``--additional-config`` that holds llmsched's settings.
CONFIG_KEY = "llmsched"
#: Policies that learn rates and lengths online, or need neither: they serve without a workload prior.
PRIOR_FREE_POLICIES = ("vllm", "sarathi", "vllm-v0", "sarathi-512", "wait-adaptive", "nested-wait-adaptive")
DEFAULT_SERVE_POLICY = "nested-wait-adaptive"
_KEYS = ("policy", "lengths", "types", "trace", "rate", "profile", "cost", "stats_file", "iteration_log",
         "buffer_horizon_s")


@dataclass(frozen=True)
class ServeSettings:
    """llmsched's settings of one server (see the module docstring for each field)."""

    policy: str = DEFAULT_SERVE_POLICY
    lengths: Literal["hidden", "max_tokens"] = "hidden"
    types: str | None = None
    trace: str | None = None
    rate: float | None = None
    profile: str | None = None
    cost: str | None = None
    stats_file: str | None = None
    iteration_log: str | None = None
    buffer_horizon_s: float = 3600.0

    @property
    def is_agent(self) -> bool:
        """Whether ``policy`` names an agent directory rather than a registered policy."""
        return Path(self.policy).is_dir()

    @property
    def native(self) -> bool:
        """Whether vLLM's own scheduler decides (``policy`` ``vllm``): the scheduler only times it."""
        return self.policy == "vllm"

    @property
    def lengths_known(self) -> bool:
        return self.lengths == "max_tokens"

    def to_additional_config(self) -> str:
        """The ``--additional-config`` JSON that gives a server these settings."""
        values = {key: getattr(self, key) for key in _KEYS if getattr(self, key) != getattr(ServeSettings, key)}
        for key in ("trace", "stats_file", "iteration_log"):  # the engine process may start in another directory
            if values.get(key) is not None:
                values[key] = str(Path(values[key]).resolve())
        if self.is_agent:
            values["policy"] = str(Path(self.policy).resolve())
        return json.dumps({CONFIG_KEY: values})


def parse_serve_settings(additional_config: Any) -> ServeSettings:
    """:class:`ServeSettings` from vLLM's ``additional_config`` (a dictionary, or its JSON text), with the policy
    checked to exist and to fit serving; :class:`ConfigError` naming the first key that is wrong."""
    where = f"--additional-config {CONFIG_KEY!r}"
    if isinstance(additional_config, str):
        try:
            additional_config = json.loads(additional_config)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--additional-config is not JSON (line {error.lineno}, column {error.colno}: "
                              f"{error.msg})") from None
    if additional_config is None:
        additional_config = {}
    if not isinstance(additional_config, dict):
        raise ConfigError(f"--additional-config must be a JSON object, got {type(additional_config).__name__}")
    raw = additional_config.get(CONFIG_KEY, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object of settings, got {raw!r}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; the settings are {', '.join(_KEYS)}")
    for key in ("policy", "lengths", "types", "trace", "profile", "cost", "stats_file", "iteration_log"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{where}: {key!r} must be a string, got {raw[key]!r}")
    for key in ("rate", "buffer_horizon_s"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"{where}: {key!r} must be a number > 0, got {value!r}")
    settings = ServeSettings(**raw)
    if settings.lengths not in ("hidden", "max_tokens"):
        raise ConfigError(f"{where}: 'lengths' must be hidden or max_tokens, got {settings.lengths!r}")
    if settings.types is not None and settings.trace is not None:
        raise ConfigError(f"{where}: give either 'types' or 'trace' as the workload prior, not both")
    _check_policy(settings, where)
    return settings


def _check_policy(settings: ServeSettings, where: str) -> None:
    if ":" in settings.policy and not settings.is_agent:
        _import_factory(settings.policy, where)
        return
    if settings.is_agent:
        from agents.residual import read_residual_agent

        read_residual_agent(settings.policy)  # refuses an agent whose interface depends on one workload
        return
    from baselines import POLICIES, canonical_name

    if "/" in settings.policy or settings.policy.startswith("."):
        raise ConfigError(f"{where}: 'policy' {settings.policy!r} is neither a directory nor a registered policy "
                          f"({', '.join(POLICIES)})")
    name = canonical_name(settings.policy)
    if needs_prior(name) and settings.types is None and settings.trace is None:
        raise ConfigError(f"{where}: policy {name!r} sizes its thresholds on known arrival rates and lengths: give "
                          f"'types' (with rates) or 'trace' and 'rate' as the prior, or serve "
                          f"'{'nested-wait' if 'nested' in name else 'wait'}-adaptive', which learns them online")
    if reads_lengths(name) and not settings.lengths_known:
        raise ConfigError(f"{where}: policy {name!r} needs each request's output length: set 'lengths' to "
                          "max_tokens (every request then produces exactly its max_tokens) or serve a nested-wait "
                          "policy")


def needs_prior(policy: str) -> bool:
    """Whether ``policy`` sizes its thresholds on known arrival rates and lengths, so that a server needs a workload
    prior for it (agents and policies served from an import path bring their own)."""
    if ":" in policy or Path(policy).is_dir():
        return False
    from baselines import canonical_name

    return canonical_name(policy) not in PRIOR_FREE_POLICIES


def reads_lengths(policy: str) -> bool:
    """Whether ``policy`` reads each request's output length before it finishes (the WAIT family)."""
    return Path(policy).name.startswith("wait")


def serve_scenario(settings: ServeSettings, *, capacity_tokens: int, block_size: int, device: str) -> Scenario:
    """The scenario the policy plans with: the prior's mix (if any), the cost model, and vLLM's own KV cache."""
    return build_scenario(types=settings.types, trace=settings.trace, rate=settings.rate,
                          profile=settings.profile or DEFAULT_PROFILES.get(device, DEFAULT_PROFILES["cuda"]),
                          cost=settings.cost, memory_tokens=capacity_tokens, block_size=block_size,
                          hidden_lengths=not settings.lengths_known)


def build_serve_policy(settings: ServeSettings, scenario: Scenario) -> Policy:
    """The policy (or agent) ``settings`` name, configured for ``scenario``, with no run horizon: the only horizon
    any of them reads is the overflow bound's window, ``buffer_horizon_s``."""
    if settings.is_agent:
        from agents.residual import ResidualAgentPolicy, control_settings, read_residual_agent

        spec, actor = read_residual_agent(settings.policy)
        return ResidualAgentPolicy(actor, scenario, settings.buffer_horizon_s,
                                   **control_settings(spec.env_kwargs, spec.env_id),
                                   name=f"agent:{Path(settings.policy).name}")
    if ":" in settings.policy:
        return _import_factory(settings.policy, "policy")(scenario, settings.buffer_horizon_s)
    from baselines import make_policy

    return make_policy(settings.policy, scenario, settings.buffer_horizon_s)


def _import_factory(path: str, where: str) -> Any:
    """The callable ``package.module:name`` names, or :class:`ConfigError` saying what could not be imported."""
    module_name, _, attribute = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{where}: policy {path!r} cannot be imported ({type(error).__name__}: {error})") from None
    if not callable(factory):
        raise ConfigError(f"{where}: policy {path!r} is not callable; give factory(scenario, horizon_s) -> Policy")
    return factory


class _PythonDecisions:
    """A policy seen through its Python ``decide`` only (no compiled loop): the path a server calls."""

    def __init__(self, policy: Policy) -> None:
        self.name = policy.name
        self._policy = policy

    def reset(self, engine: Any) -> None:
        self._policy.reset(engine)

    def decide(self, state: Any) -> Any:
        return self._policy.decide(state)


def warm_up(settings: ServeSettings, capacity_tokens: int, block_size: int, device: str) -> float:
    """Run a fresh copy of the served policy on the simulator for a few seconds of light traffic, through its Python
    decisions, so that every kernel a decision calls is loaded before the first request; the wall seconds it took."""
    from llmsched_env import run

    start = time.perf_counter()
    prompt = max(1, min(64, capacity_tokens // 64))
    probe_settings = replace(settings, types=f"p={prompt},o=32,rate=1;p={2 * prompt},o=64,rate=1", trace=None,
                             rate=None)
    probe = serve_scenario(probe_settings, capacity_tokens=capacity_tokens, block_size=block_size, device=device)
    probe = probe.at_rate(probe.rate_for_load(0.7))
    horizon = 40.0  # past the adaptive policies' first re-solve (every 15 s, after their warm-up completions)
    policy = build_serve_policy(settings, serve_scenario(settings, capacity_tokens=capacity_tokens,
                                                         block_size=block_size, device=device))
    run(probe.engine(), _PythonDecisions(policy), probe.sample(horizon, 0), horizon)
    return time.perf_counter() - start
