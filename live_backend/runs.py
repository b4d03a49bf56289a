"""Live runs for the evaluation loop: an engine factory that ``baselines.compare.compare`` calls once per run.

Starting vLLM takes seconds, and how much KV cache it gets is known only once it has started (on a
GPU vLLM sizes it from free memory), so the factory starts the first engine up front: the scenario
(policies' thresholds, the fluid benchmark) is built on the capacity that engine reports, and the
first run reuses it. Every later run gets a fresh engine, so runs never share a cache or a clock.
"""

from __future__ import annotations

from live_backend.config import LiveConfig
from live_backend.engine import LiveVLLMEngine
from llmsched_env.scenario import Scenario


class LiveEngineFactory:
    """``factory(scenario)`` → a fresh :class:`LiveVLLMEngine` for one run (see the module docstring)."""

    def __init__(self, config: LiveConfig, *, pace: bool = False) -> None:
        self.config = config
        self.pace = pace
        self._first: LiveVLLMEngine | None = LiveVLLMEngine(config, pace=pace)
        self.capacity_tokens = self._first.capacity_tokens
        self.block_size = self._first.block_size

    def __call__(self, scenario: Scenario) -> LiveVLLMEngine:
        engine, self._first = self._first, None
        if engine is None:
            engine = LiveVLLMEngine(self.config, pace=self.pace)
        engine.set_output_lengths_known(scenario.output_lengths_known)
        return engine

    def close(self) -> None:
        """Release the engine started up front if no run used it."""
        if self._first is not None:
            self._first.close()
            self._first = None
