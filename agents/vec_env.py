"""stable-baselines3's ``VecEnv`` over the native vector environment (:mod:`llmsched_env.vector`).

SB3 steps its learners through its own ``VecEnv`` interface (a list of infos, ``terminal_observation``
in the info of an episode's last step, ``env_method`` for MaskablePPO's ``action_masks``).
:class:`NativeVecEnv` gives that interface to a :class:`~llmsched_env.vector.LLMSchedVectorEnv`, so one
compiled call steps every environment of a rollout. What SB3's ``DummyVecEnv`` would give on the same
seeds, it gives too: the same observations, rewards, dones and final infos (``tests/test_vector.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from llmsched_env.vector import LLMSchedVectorEnv, final_info_of


class NativeVecEnv(VecEnv):
    """An SB3 ``VecEnv`` whose environments are the episodes of one :class:`LLMSchedVectorEnv`.

    Args:
        vector: the vector environment (``gym.make_vec(id, num_envs=N, vectorization_mode="vector_entry_point")``).
    """

    def __init__(self, vector: LLMSchedVectorEnv) -> None:
        self.vector = vector
        self._actions: np.ndarray | None = None
        super().__init__(vector.num_envs, vector.single_observation_space, vector.single_action_space)

    # -- stepping -------------------------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seeds = None if all(seed is None for seed in self._seeds) else list(self._seeds)
        options = self._options[0] if self._options and self._options[0] else None
        if any(option != self._options[0] for option in self._options):
            raise ValueError("NativeVecEnv resets every environment with the same options")
        observations, info = self.vector.reset(seed=seeds, options=options)
        self.reset_infos = self._infos(info)
        self._reset_seeds()
        self._reset_options()
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        observations, rewards, terminated, truncated, info = self.vector.step(self._actions)  # type: ignore
        dones = terminated | truncated
        infos = self._infos(info)
        if dones.any():
            for e in np.flatnonzero(dones):
                ended = final_info_of(info, e)
                ended["terminal_observation"] = info["final_obs"][e]
                # As SB3's DummyVecEnv says it: the horizon cut the episode (PPO bootstraps its value).
                ended["TimeLimit.truncated"] = bool(truncated[e] and not terminated[e])
                infos[e] = ended
        return observations, rewards.astype(np.float32), dones, infos

    def _infos(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        """Gymnasium's dict of arrays (the per-step keys, one value or row per environment) as SB3's list of
        dicts."""
        keys = [key for key in info if not key.startswith("_") and key not in ("final_obs", "final_info")]
        # Python scalars for one value per environment, array rows for a row per environment (``admitted``).
        columns = [info[key].tolist() if info[key].ndim == 1 else list(info[key]) for key in keys]
        # DummyVecEnv's key on every step: truncated but not terminated (set on an episode's last step).
        return [dict(zip(keys, row), **{"TimeLimit.truncated": False}) for row in zip(*columns)]

    def close(self) -> None:
        self.vector.close()

    # -- attributes and methods, as SB3's wrappers and MaskablePPO ask for them ---------------------------
    def action_masks(self) -> np.ndarray:
        """Every environment's mask, ``(num_envs, sum(nvec))``."""
        return self.vector.action_masks()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.vector.envs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._get_indices(indices):
            setattr(self.vector.envs[i], attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        chosen = list(self._get_indices(indices))
        if method_name == "action_masks":  # one batched call, not one per environment
            masks = self.vector.action_masks()
            return [masks[i] for i in chosen]
        return [getattr(self.vector.envs[i], method_name)(*method_args, **method_kwargs) for i in chosen]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def make_native_vec_env(env_id: str, n_envs: int, env_kwargs: dict[str, Any],
                        per_env_kwargs: Sequence[dict[str, Any]] | None = None) -> VecEnv:
    """``n_envs`` episodes of ``env_id`` as one native vector environment, in SB3's ``VecMonitor`` (episode
    returns and lengths for SB3's logs). Seeding is SB3's: ``model.set_random_seed`` / ``VecEnv.seed``."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import VecMonitor

    import llmsched_env  # noqa: F401  (registers the ids)

    kwargs = dict(env_kwargs)
    if per_env_kwargs is not None:
        kwargs["env_kwargs"] = list(per_env_kwargs)
    vector = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **kwargs)
    return VecMonitor(NativeVecEnv(vector))
