"""The native vector environment: N ``LLMSched`` episodes advanced by one compiled call per step.

``gym.make_vec("LLMSched-v0", num_envs=N, vectorization_mode="vector_entry_point")`` (every registered
simulated id has it) returns a :class:`LLMSchedVectorEnv`. Gymnasium's ``SyncVectorEnv`` would step N
environments one Python call after another; here each step hands the N episodes to
:func:`~llmsched_env.episode.advance_episodes`, which runs every episode's step (the agent's admissions,
the iterations to its next decision epoch, the reward, the observation) in one compiled loop, writing
into batched arrays that the step returns without per-environment Python work. Only what is rare runs
in Python, per episode: an iteration that evicts (the engine's general path), and an episode's end
(its final metrics and the reset that follows it).

The sub-environments are :class:`~llmsched_env.env.LLMSchedEnv` instances, and each episode is theirs:
with the same seeds, the vector environment gives, episode by episode, exactly the observations,
rewards and final metrics of N single environments (``tests/test_vector.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from numba.typed import List as TypedList

from llmsched_env.env import LLMSchedEnv
from llmsched_env.episode import (
    ACT,
    ADVANCE,
    DONE,
    EPOCH,
    EVICTIONS,
    FIRST_REWARD,
    GENERAL_ACTION,
    ITERATIONS,
    MORE_REWARD,
    NOW,
    NUM_INTS,
    NUM_REALS,
    CompiledEpisode,
    LoopState,
    advance_episodes,
    get_item,
    repeated,
    set_item,
)
from llmsched_env.errors import ConfigError
from llmsched_env.iteration import NUM_FINISHED, NUM_WAITING
from llmsched_env.iteration import N as ARRIVED

_NO_IDS = np.empty(0, dtype=np.int64)


class LLMSchedVectorEnv(VectorEnv):
    """``num_envs`` independent ``LLMSched`` episodes stepped together, natively.

    Observation, action, reward, truncation: those of :class:`~llmsched_env.env.LLMSchedEnv`, batched
    (``observation_space`` is ``(num_envs, obs)`` float32, ``action_space`` ``MultiDiscrete`` of shape
    ``(num_envs, K)``). ``terminated`` is always ``False``.

    Autoreset: ``SAME_STEP`` (declared in ``metadata["autoreset_mode"]``): the step that ends an episode
    returns the next episode's first observation, with the last one in ``info["final_obs"]`` and the
    ended episode's info (every metric of ``llmsched simulate --json``) in ``info["final_info"]``, both
    masked by ``info["_final_obs"]``. The pending reward of the new episode's start (the fluid charge
    until its first epoch) comes with its first step, as in the single environment.

    Info, every step, as arrays over the environments (Gymnasium's vector convention, each key with its
    ``_key`` mask): ``time_s``, ``arrived``, ``completed``, ``waiting``, ``running``, ``evictions``,
    ``iterations``, ``regret_requests``, ``admitted`` (``(num_envs, K)``), ``clipped``.

    Seeds: ``reset(seed=s)`` seeds environment ``i`` with ``s + i`` (``seed`` may also be a list); later
    episodes draw from each environment's own generator, as a single environment's ``reset()`` does.

    Args:
        num_envs: how many episodes to step together.
        env_kwargs: per-environment keyword arguments of ``LLMSchedEnv`` (a list of ``num_envs`` dicts),
            over the shared ``kwargs``: the episodes may differ in scenario, rate range, memory, trace or
            length setting, as long as their observation and action spaces agree.
        **kwargs: ``LLMSchedEnv``'s keyword arguments, shared by every environment. ``render_mode`` and
            ``compiled=False`` are refused: the vector environment is the compiled loop.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, *, env_kwargs: Sequence[dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
            raise ConfigError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if kwargs.get("render_mode") is not None:
            raise ConfigError("the vector environment does not render; make single environments to render")
        if not kwargs.pop("compiled", True):
            raise ConfigError("the vector environment always runs the compiled loop (compiled=False is refused)")
        kwargs.pop("render_mode", None)
        if env_kwargs is not None and len(env_kwargs) != num_envs:
            raise ConfigError(f"env_kwargs has {len(env_kwargs)} entries for num_envs = {num_envs}")
        self.num_envs = int(num_envs)
        self.envs = [LLMSchedEnv(**{**kwargs, **(env_kwargs[i] if env_kwargs is not None else {})})
                     for i in range(self.num_envs)]
        first = self.envs[0]
        for i, env in enumerate(self.envs[1:], start=1):
            if env.observation_space != first.observation_space or env.action_space != first.action_space:
                raise ConfigError(
                    f"environment {i} has observation space {env.observation_space} and action space "
                    f"{env.action_space}; environment 0 has {first.observation_space} and {first.action_space} "
                    f"(a vector environment's episodes must agree on both)")
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = None

        n, k, width = self.num_envs, first.control.num_classes, first.control.max_admit
        self._nvec = np.asarray(first.action_space.nvec, dtype=np.int64)
        self._ints = np.zeros((n, NUM_INTS), dtype=np.int64)
        self._reals = np.zeros((n, NUM_REALS), dtype=np.float64)
        self._oldest = np.zeros((n, k, width), dtype=np.int64)
        self._heads = np.zeros((n, k), dtype=np.int64)
        self._fits = np.zeros((n, k), dtype=np.int64)
        self._queued = np.zeros((n, k), dtype=np.int64)
        self._observation = np.zeros((n, first.control.observation_size), dtype=np.float32)
        self._counts = np.zeros((n, k), dtype=np.int64)
        for i, env in enumerate(self.envs):
            env.use_loop_buffers(LoopState(self._ints[i], self._reals[i], np.zeros(k), self._oldest[i],
                                           self._heads[i], self._fits[i], self._queued[i], self._observation[i],
                                           self._counts[i]))
        self._episodes: list[CompiledEpisode] = []
        self._table: TypedList | None = None  # episode e's (columns, params, interface, loop)
        self._runnings: TypedList | None = None
        self._decodes: TypedList | None = None
        self._prefills: TypedList | None = None
        self._pending = np.zeros(n, dtype=np.float64)
        self._fluid_rps = np.zeros(n, dtype=np.float64)
        self._horizon = np.array([env.horizon for env in self.envs], dtype=np.float64)
        self._stops = np.zeros(n, dtype=np.int64)
        self._starts = np.zeros(n, dtype=np.int64)
        self._active = np.ones(n, dtype=bool)
        self._clipped = np.zeros(n, dtype=bool)
        self._mask_counts = np.arange(width + 1)

    # -- Gymnasium API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every environment (``seed + i`` for environment ``i``; ``options`` go to each, and an option
        given as a list of ``num_envs`` values gives environment ``i`` its ``i``-th, e.g.
        ``{"arrival_seed": [1000, 1001, 1002]}``)."""
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ConfigError(f"reset: {len(seeds)} seeds for {self.num_envs} environments")
        self._episodes = [self._reset_one(i, seeds[i], self._options_of(i, options)) for i in range(self.num_envs)]
        self._table = repeated(self._episodes[0].structures(), self.num_envs)
        self._runnings, self._decodes, self._prefills = (repeated(_NO_IDS, self.num_envs) for _ in range(3))
        for i, episode in enumerate(self._episodes):
            set_item(self._table, i, episode.structures())
            set_item(self._runnings, i, episode.running)
        self._stops[:] = EPOCH
        return self._observation.copy(), self._step_info()

    def _options_of(self, i: int, options: dict[str, Any] | None) -> dict[str, Any] | None:
        """Environment ``i``'s reset options: a list (or array) of ``num_envs`` values gives it the ``i``-th."""
        if not options:
            return options
        chosen = {}
        for key, value in options.items():
            if isinstance(value, (list, tuple, np.ndarray)):
                if len(value) != self.num_envs:
                    raise ConfigError(f"reset option {key!r} has {len(value)} values for {self.num_envs} environments")
                value = value[i]
            chosen[key] = value
        return chosen

    def _reset_one(self, i: int, seed: int | None, options: dict[str, Any] | None) -> CompiledEpisode:
        env = self.envs[i]
        env.reset(seed=seed, options=options)
        episode = env.compiled_episode
        assert episode is not None, "a simulated LLMSchedEnv without rendering runs the compiled loop"
        self._pending[i] = env.pending_reward
        self._fluid_rps[i] = env.fluid.throughput_rps
        self._clipped[i] = False
        self._counts[i] = 0
        return episode

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Apply one action per environment; see the class docstring for what comes back."""
        if self._table is None:
            raise RuntimeError("call reset() first")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, len(self._nvec)):
            raise ConfigError(f"actions must have shape (num_envs, classes) = ({self.num_envs}, {len(self._nvec)}), "
                              f"got {actions.shape}")
        actions = np.ascontiguousarray(actions, dtype=np.int64)
        reals = self._reals
        reals[:, FIRST_REWARD] = self._pending
        reals[:, MORE_REWARD] = 0.0
        self._pending[:] = 0.0
        self._starts[:] = ACT
        self._active[:] = True
        self._clipped[:] = False
        while True:
            advance_episodes(self._active, self._starts, actions, self._table, self._runnings, self._stops,
                             self._decodes, self._prefills, self._clipped)
            general = self._stops >= GENERAL_ACTION
            if not general.any():
                break
            # A decision the compiled iteration refused: that episode's rollout runs it, and names the error.
            for e in np.flatnonzero(general):
                episode = self._episodes[e]
                episode.running = get_item(self._runnings, e)
                if episode.run_general(int(self._stops[e]), get_item(self._decodes, e), get_item(self._prefills, e)):
                    set_item(self._table, e, episode.structures())
                set_item(self._runnings, e, episode.running)
            np.copyto(self._active, general)
            self._starts[:] = ADVANCE
        rewards = reals[:, FIRST_REWARD] + reals[:, MORE_REWARD]
        done = self._stops == DONE
        observations = self._observation.copy()
        info = self._step_info()
        for e in np.flatnonzero(done):
            info = self._end_episode(int(e), observations, info)
        return observations, rewards, np.zeros(self.num_envs, dtype=bool), done, info

    def _end_episode(self, e: int, observations: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        """Close episode ``e`` (its final info), start the next one in its place (same-step autoreset)."""
        episode = self._episodes[e]
        episode.running = get_item(self._runnings, e)
        episode.store()
        final_info = episode.env.episode_info(final=True, admitted=self._counts[e].copy(),
                                              clipped=bool(self._clipped[e]))
        final_obs = observations[e].copy()
        episode = self._episodes[e] = self._reset_one(e, None, None)
        set_item(self._table, e, episode.structures())
        set_item(self._runnings, e, episode.running)
        self._stops[e] = EPOCH
        observations[e] = self._observation[e]
        for key, value in self._step_info(e).items():  # the new episode's start, as reset() reports it
            info[key][e] = value
        return self._add_info(info, {"final_obs": final_obs, "final_info": final_info}, e)

    def _step_info(self, e: int | None = None) -> dict[str, Any]:
        """The per-step info of every environment (or of environment ``e``), from the loop's counters."""
        rows = slice(None) if e is None else e
        ints, reals = self._ints[rows], self._reals[rows]
        completed = ints[..., NUM_FINISHED].copy()
        waiting = ints[..., NUM_WAITING].copy()
        arrived = ints[..., ARRIVED].copy()
        now = reals[..., NOW].copy()
        info = {
            "time_s": now, "arrived": arrived, "completed": completed, "waiting": waiting,
            "running": arrived - completed - waiting, "evictions": ints[..., EVICTIONS].copy(),
            "iterations": ints[..., ITERATIONS].copy(),
            "regret_requests": self._fluid_rps[rows] * np.minimum(now, self._horizon[rows]) - completed,
            "admitted": self._counts[rows].copy(), "clipped": self._clipped[rows].copy(),
        }
        if e is None:
            mask = np.ones(self.num_envs, dtype=bool)
            info.update({f"_{key}": mask for key in list(info)})
        return info

    def action_masks(self) -> np.ndarray:
        """Allowed counts per class, flattened, per environment: ``(num_envs, sum(nvec))`` booleans."""
        return (self._mask_counts[None, None, :] <= self._fits[:, :, None]).reshape(self.num_envs, -1)

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()


def final_info_of(info: dict[str, Any], e: int) -> dict[str, Any]:
    """Environment ``e``'s ended episode's info from a step's ``info`` (``info["final_info"]``), as the
    single environment's last step gives it (Python scalars, the ``admitted`` array)."""
    final = info["final_info"]
    return {key: values[e].item() if isinstance(values[e], np.generic) else values[e]
            for key, values in final.items() if not key.startswith("_")}
