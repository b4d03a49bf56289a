"""The environment ids users ``gym.make``; registered when :mod:`llmsched_env` is imported.

Gymnasium 1.x does not load entry points by itself: ``import llmsched_env`` first, or write
``gym.make("llmsched_env:LLMSched-v0")``, which imports the package for you.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from llmsched_env.errors import ConfigError

_ENTRY_POINT = "llmsched_env.env:LLMSchedEnv"
#: ``gym.make_vec(id, num_envs=N, vectorization_mode="vector_entry_point")``: N episodes in one compiled call.
_VECTOR_ENTRY_POINT = "llmsched_env.vector:LLMSchedVectorEnv"

#: id → the keyword arguments it fixes (any of them can still be overridden in ``gym.make``).
ENV_IDS: dict[str, dict[str, Any]] = {
    # The README's tight-memory two-type workload, lengths known at arrival (WAIT's setting).
    "LLMSched-v0": {},
    # The same, output lengths hidden until a request finishes (Nested WAIT's setting).
    "LLMSched-Hidden-v0": {"output_lengths_known": False},
    # On-off (Markov-modulated) bursts around the same mean rate.
    "LLMSched-Bursty-v0": {"arrivals": "onoff"},
    "LLMSched-Bursty-Hidden-v0": {"arrivals": "onoff", "output_lengths_known": False},
}


#: The same environment on a live vLLM engine (needs ``model=PATH``; see :mod:`live_backend.env`). Measured
#: iteration times make its runs differ from one to the next, so it is registered nondeterministic.
LIVE_ENV_IDS: dict[str, dict[str, Any]] = {
    "LLMSched-vLLM-v0": {},
    "LLMSched-vLLM-Hidden-v0": {"output_lengths_known": False},
}
_LIVE_ENTRY_POINT = "live_backend.env:LiveLLMSchedEnv"

#: One agent for any workload (:mod:`agents.residual_env`): a workload-independent observation, and an action that
#: scales an adaptive baseline's thresholds; a scenario of the suite, a load and a length setting drawn per reset.
RESIDUAL_ENV_IDS: dict[str, dict[str, Any]] = {
    "LLMSched-Residual-v0": {},
    # v1: the observation adds the baseline's compute-load estimate (a 13th entry, ``compute_load``).
    "LLMSched-Residual-v1": {"compute_load": True},
    # v2: then that estimate's trend (its rise over 300 s, its largest 60 s rise within
    # them, a sustained surge's memory: 16 entries).
    "LLMSched-Residual-v2": {"compute_load": True, "load_trend": True},
}
_RESIDUAL_ENTRY_POINT = "agents.residual_env:LLMSchedResidualEnv"


def residual_env_kwargs(env_id: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``gym.make(env_id, **env_kwargs)`` gives a residual environment: the id's own
    (:data:`RESIDUAL_ENV_IDS`) overridden by ``env_kwargs``; a clear error if ``env_id`` is not a residual id."""
    if env_id not in RESIDUAL_ENV_IDS:
        raise ConfigError(f"{env_id!r} is not a workload-independent environment; one of "
                          f"{', '.join(RESIDUAL_ENV_IDS)}")
    return {**RESIDUAL_ENV_IDS[env_id], **env_kwargs}


def register_envs() -> None:
    """Register every id of :data:`ENV_IDS`, :data:`RESIDUAL_ENV_IDS` and :data:`LIVE_ENV_IDS` (idempotent; vLLM is
    imported only when a live environment is made, the residual environment's module when one is made)."""
    for env_id, kwargs in ENV_IDS.items():
        if env_id not in gym.registry:
            # Simulated runs are deterministic given the seed; no step cap (the horizon truncates).
            gym.register(id=env_id, entry_point=_ENTRY_POINT, vector_entry_point=_VECTOR_ENTRY_POINT, kwargs=kwargs,
                         nondeterministic=False)
    for env_id, kwargs in RESIDUAL_ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=_RESIDUAL_ENTRY_POINT, kwargs=kwargs, nondeterministic=False)
    for env_id, kwargs in LIVE_ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=_LIVE_ENTRY_POINT, kwargs=kwargs, nondeterministic=True)
