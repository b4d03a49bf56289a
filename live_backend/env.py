"""``LLMSched-vLLM-v0``: the Gymnasium environment on a live vLLM engine instead of the simulator.

Everything an agent sees and does is :class:`~llmsched_env.env.LLMSchedEnv`'s (same spaces, reward,
masks and info); only the engine differs: each episode starts a fresh :class:`LiveVLLMEngine`, so
iteration times are measured, not modelled, and episodes are not reproducible (the id is registered
``nondeterministic``). It is meant for evaluating trained agents on the real engine, and for slow
training if someone wants it: an episode costs real model iterations (milliseconds each on the
tiny CPU model, more on a GPU model).
"""

from __future__ import annotations

from typing import Any

from live_backend.config import default_profile, load_live_config
from live_backend.engine import LiveVLLMEngine
from llmsched_env.engine import Engine
from llmsched_env.env import LLMSchedEnv
from llmsched_env.scenario import Scenario, build_scenario

#: The load ``ρ`` (of the cost profile) the default arrival rate is set to.
DEFAULT_LOAD = 0.6


class LiveLLMSchedEnv(LLMSchedEnv):
    """:class:`LLMSchedEnv` on a live vLLM engine.

    Arguments beyond :class:`LLMSchedEnv`'s: ``model`` (a local model directory), ``live_config``
    (``cpu-tiny``, ``gpu-llama2-7b`` or a JSON file), ``kv_blocks`` and ``device`` (overrides of the
    config). The KV capacity and block size are the live engine's (a probe engine is started once to
    read them); the cost ``profile`` (default ``tiny-llama-cpu`` on CPU, ``llama2-7b-a100`` on GPU)
    sets the fluid targets and WAIT's thresholds; ``rate`` defaults to the load ``ρ = 0.6`` of that
    profile; ``horizon`` to 30 s of engine time.
    """

    def __init__(self, *, model: str, live_config: str | None = None, kv_blocks: int | None = None,
                 device: str | None = None, types: str | None = None, trace: str | None = None,
                 profile: str | None = None, arrivals: str | None = None, cv: float | None = None,
                 rate: Any = None, horizon: float = 30.0, output_lengths_known: bool = True,
                 **kwargs: Any) -> None:
        config = load_live_config(live_config, model=model, kv_blocks=kv_blocks, device=device)
        probe = LiveVLLMEngine(config)
        capacity, block = probe.capacity_tokens, probe.block_size
        probe.close()
        scenario = build_scenario(types=types, trace=trace,
                                  profile=profile or default_profile(config),
                                  memory_tokens=capacity, block_size=block, arrivals=arrivals,  # type: ignore[arg-type]
                                  cv=cv, hidden_lengths=not output_lengths_known)
        self.live_config = config
        self._live_engine: LiveVLLMEngine | None = None
        super().__init__(scenario=scenario, rate=rate if rate is not None else scenario.rate_for_load(DEFAULT_LOAD),
                         horizon=horizon, output_lengths_known=output_lengths_known, **kwargs)

    def make_engine(self, scenario: Scenario) -> Engine:
        """A fresh live engine per episode (the previous one is shut down first)."""
        self._close_engine()
        self._live_engine = LiveVLLMEngine(self.live_config, output_lengths_known=scenario.output_lengths_known)
        return self._live_engine

    def _close_engine(self) -> None:
        if self._live_engine is not None:
            self._live_engine.close()
            self._live_engine = None

    def close(self) -> None:
        self._close_engine()
        super().close()
