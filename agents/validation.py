"""Validation during training: the model's deterministic policy on fixed seeds, on the native vector environment.

The validation episodes are the evaluation's (``scenario.sample(T, seed)`` at the nominal rate, as
``llmsched evaluate`` runs them through ``run(engine, AgentPolicy)``), stepped together in one
:class:`~llmsched_env.vector.LLMSchedVectorEnv` with one forward pass of the network per step for all of
them: a validation costs a few seconds, not the minutes of a Python loop per seed, so training can
validate often.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from agents.policy import action_logits, greedy_actions
from llmsched_env.vector import final_info_of


def validation_runs(model: Any, env_id: str, env_kwargs: dict[str, Any], seeds: Sequence[int],
                    rate: float) -> list[dict[str, Any]]:
    """The final info (every metric of ``llmsched simulate --json``) of one episode per seed, arrivals
    pinned to ``seed`` at ``rate``, the model acting by its most likely action (masked for MaskablePPO)."""
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    import llmsched_env  # noqa: F401  (registers the ids)

    vector = gym.make_vec(env_id, num_envs=len(seeds), vectorization_mode="vector_entry_point", **env_kwargs)
    try:
        observations, _ = vector.reset(seed=0, options={"arrival_seed": list(seeds), "rate": rate})
        masked = isinstance(model.policy, MaskableActorCriticPolicy)
        splits = np.cumsum(vector.single_action_space.nvec)[:-1]
        finals: list[dict[str, Any] | None] = [None] * len(seeds)
        while any(final is None for final in finals):
            masks = vector.action_masks() if masked else None
            actions = greedy_actions(action_logits(model, observations), masks, splits)
            observations, _, _, truncated, info = vector.step(actions)
            for e in np.flatnonzero(truncated):
                if finals[e] is None:  # later episodes of that slot (autoreset) are not validation episodes
                    finals[e] = final_info_of(info, e)
        return finals  # type: ignore[return-value]
    finally:
        vector.close()
