"""The environment's episode loop, compiled: one call per decision epoch on the simulated engine.

:class:`~llmsched_env.env.LLMSchedEnv` steps its episodes through the evaluation loop
(:class:`~llmsched_env.runner.Rollout`) and the agent's interface
(:class:`~llmsched_env.admission.AdmissionControl`). Written in Python, a step is two dozen calls
across those objects, each doing a little work on a few hundred requests, and the calls, not the
work, take most of its time. On the simulated engine, :class:`CompiledEpisode` runs the same step as
one compiled call, :func:`advance_episode`: the agent's admissions, the engine iterations up to the
next decision epoch (with the fixed rule between epochs), the arrivals they let in, the reward and
the next observation. It updates the engine's, the rollout's and the agent interface's own state in
place, so everything else (``info``, ``result()``, rendering, a baseline's view of the engine) reads
them as before.

It is the same loop: it calls the simulator's compiled iteration kernels
(:func:`~llmsched_env.kernels.plan_iteration`, :func:`~llmsched_env.kernels.run_iteration`) and the
agent interface's (queue scan, admissions, running profile, observation), and repeats the Python
loop's floating-point operations in its order, so it returns exactly what the Python loop returns:
``tests/test_env.py`` compares both, step by step, bit for bit. An iteration that needs eviction (or
anything but the fast path) goes back to Python, which runs it through the rollout and the engine's
general path, then the compiled loop goes on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from llmsched_env import kernels
from llmsched_env.admission import Candidates
from llmsched_env.compiled import compiled
from llmsched_env.engine import WAITING, Decision

if TYPE_CHECKING:  # pragma: no cover
    from llmsched_env.env import LLMSchedEnv

# -- the loop's scalars, kept in two small arrays so that the compiled loop updates them in place -----------
# integers
N, NUM_WAITING, NUM_FINISHED, FIRST_MAYBE_WAITING, USED_BLOCKS, USED_TOKENS, STAMP = range(7)
NEXT_ARRIVAL, ENDED, ITERATIONS, PEAK_BLOCKS, SEEN, ROOM = range(7, 13)
NUM_INTS = 13
# reals
NOW, BLOCK_SECONDS, BUSY_TIME, ACCOUNTED, LAST_ADMISSION, RATE_TIME, FIRST_REWARD, MORE_REWARD = range(8)
NUM_REALS = 8

#: What :func:`advance_episode` stopped at: an epoch, the episode's end, or an iteration for the engine's
#: general path (the agent's decision, or one of the fixed rule's).
EPOCH, DONE, GENERAL_ACTION, GENERAL_FIXED = 0, 1, 2, 3
#: Where it starts: with the agent's action at an epoch, or going on to the next epoch.
ACT, ADVANCE = 0, 1

_EMPTY = np.empty(0, dtype=np.int64)


@compiled
def _scan(ints: np.ndarray, running: np.ndarray, status: np.ndarray, context: np.ndarray, kv_tokens: np.ndarray,
          classes: np.ndarray, block_size: int, capacity_blocks: int, max_admit: int,
          oldest: np.ndarray, heads: np.ndarray, fits: np.ndarray, queued: np.ndarray) -> None:
    """:meth:`AdmissionControl.candidates` of the engine's state into the given arrays (``ROOM`` too),
    reading the queue as the engine does (:func:`~llmsched_env.kernels.waiting_ids`, moving its start too)."""
    room = capacity_blocks - ints[USED_BLOCKS] - kernels.blocks_to_grow(running, kv_tokens, block_size)
    waiting, ints[FIRST_MAYBE_WAITING] = kernels.waiting_ids(status, ints[FIRST_MAYBE_WAITING], ints[N],
                                                             ints[NUM_WAITING])
    o, h, f, q = kernels.scan_queue(waiting, classes, context, block_size, room, len(heads), max_admit)
    oldest[:, :] = o
    heads[:] = h
    fits[:] = f
    queued[:] = q
    ints[ROOM] = room


@compiled
def _observe(ints: np.ndarray, reals: np.ndarray, running: np.ndarray, classes: np.ndarray, context: np.ndarray,
             prompt: np.ndarray, output: np.ndarray, arrival: np.ndarray, block_size: int, capacity_blocks: int,
             queued: np.ndarray, rate_sum: np.ndarray, window: float, queue_scale: np.ndarray,
             running_scale: np.ndarray, rate_scale: np.ndarray, time_scale: float, fixed: np.ndarray,
             residual: np.ndarray, segment_edges: np.ndarray, known: bool, buckets: int, horizon: float,
             observation: np.ndarray) -> None:
    """:meth:`AdmissionControl.observe`, rate update included, into ``observation``."""
    now = reals[NOW]
    kernels.count_arrivals(rate_sum, reals[RATE_TIME], now, arrival[ints[SEEN]:ints[N]], classes[ints[SEEN]:ints[N]],
                           window)
    reals[RATE_TIME] = now
    ints[SEEN] = ints[N]
    rates = rate_sum / (-math.expm1(-now / window)) if now > 0 else rate_sum.copy()
    cells, peak = kernels.running_profile(running, classes, context, prompt, output, residual, segment_edges, known,
                                          len(queued), buckets)
    memory = np.empty(2)
    memory[0] = ints[USED_BLOCKS] / capacity_blocks
    memory[1] = min(peak / (capacity_blocks * block_size), 2.0) / 2.0
    observation[:] = kernels.assemble_observation(queued, queue_scale, cells, running_scale, memory,
                                                  now - reals[LAST_ADMISSION], time_scale, rates, rate_scale, fixed,
                                                  min(now / horizon, 1.0))


@compiled
def _run(decode: np.ndarray, prefill: np.ndarray, ints: np.ndarray, reals: np.ndarray, running: np.ndarray,
         status: np.ndarray, context: np.ndarray, final_context: np.ndarray, prompt: np.ndarray, kv_tokens: np.ndarray,
         mark: np.ndarray, first_token: np.ndarray, finish: np.ndarray, block_size: int, capacity_blocks: int,
         cost: np.ndarray, times: np.ndarray, horizon: float, fluid_rate: float, tokens_reward: bool,
         latency_penalty: float) -> tuple[bool, np.ndarray, float]:
    """``Rollout.apply`` of an iteration that decodes ``decode`` and admits ``prefill`` (whole prompts), and
    ``LLMSchedEnv._reward`` of it: ``(ran, running, reward)``. ``ran`` is ``False`` (and nothing changed)
    when the iteration needs the engine's general path."""
    now = reals[NOW]
    in_system = ints[NUM_WAITING] + len(running)
    earned = 0.0
    stalled = len(decode) == 0 and len(prefill) == 0
    if not stalled:
        ints[STAMP] -= 1
        (verdict, decode_before, prefill_before, chunk, decode_new_blocks, prefill_new_blocks, prefill_tokens,
         batch_kv) = kernels.plan_iteration(decode, prefill, prefill[:0], True, ints[N], status, context, kv_tokens, mark,
                                            ints[STAMP], block_size, capacity_blocks - ints[USED_BLOCKS])
        if verdict != kernels.PLANNED:
            return False, running, 0.0
        attention = kernels.prefill_attention_sum(chunk, prefill_before) if cost[4] != 0.0 else 0.0
        duration = kernels.iteration_seconds(cost, prefill_tokens, len(decode), batch_kv, attention)
        now = now + duration
        admitted, finished, running, tokens_added, blocks_freed, tokens_freed = kernels.run_iteration(
            decode, decode_before, prefill, prefill_before, chunk, running, status, context, final_context, kv_tokens,
            first_token, finish, block_size, now)
        ints[USED_BLOCKS] += decode_new_blocks + prefill_new_blocks
        ints[USED_TOKENS] += tokens_added
        peak_blocks = ints[USED_BLOCKS]
        ints[USED_BLOCKS] -= blocks_freed
        ints[USED_TOKENS] -= tokens_freed
        ints[NUM_WAITING] -= len(admitted)
        ints[NUM_FINISHED] += len(finished)
        ints[ITERATIONS] += 1
        ints[PEAK_BLOCKS] = max(ints[PEAK_BLOCKS], peak_blocks)
        reals[BLOCK_SECONDS] += peak_blocks * duration
        reals[BUSY_TIME] += duration
        stalled = duration == 0.0
        if len(finished):
            if tokens_reward:
                generated = 0
                for i in finished:
                    generated += context[i] - prompt[i]
                earned += float(generated)
            else:
                earned += len(finished)
    if stalled:
        if ints[NEXT_ARRIVAL] >= len(times):
            ints[ENDED] = 1
        else:
            wake = times[ints[NEXT_ARRIVAL]]
            reals[BLOCK_SECONDS] += ints[USED_BLOCKS] * max(0.0, wake - now)
            now = max(now, wake)
    before = reals[NOW]
    reals[NOW] = now
    end = min(now, horizon)
    elapsed = max(0.0, end - reals[ACCOUNTED])
    reals[ACCOUNTED] = max(reals[ACCOUNTED], end)
    earned -= fluid_rate * elapsed
    if latency_penalty:
        earned -= latency_penalty * in_system * (now - before)
    return True, running, earned


@compiled
def advance_episode(start: int, action: np.ndarray, ints: np.ndarray, reals: np.ndarray, running: np.ndarray,
                    status: np.ndarray, prompt: np.ndarray, output: np.ndarray, context: np.ndarray,
                    final_context: np.ndarray, arrival: np.ndarray, first_token: np.ndarray, finish: np.ndarray,
                    mark: np.ndarray, kv_tokens: np.ndarray, block_size: int, capacity_blocks: int, cost: np.ndarray,
                    times: np.ndarray, arrival_prompt: np.ndarray, arrival_output: np.ndarray, horizon: float,
                    fluid_rate: float, tokens_reward: bool, latency_penalty: float, classes: np.ndarray,
                    max_admit: int, rate_sum: np.ndarray, window: float, queue_scale: np.ndarray,
                    running_scale: np.ndarray, rate_scale: np.ndarray, time_scale: float, fixed: np.ndarray,
                    residual: np.ndarray, segment_edges: np.ndarray, known: bool, buckets: int,
                    oldest: np.ndarray, heads: np.ndarray, fits: np.ndarray, queued: np.ndarray,
                    observation: np.ndarray, counts: np.ndarray
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, bool]:
    """One environment step from ``start``: ``ACT`` applies ``action`` at the current epoch (the candidates
    in ``oldest``/``fits`` and ``ints[ROOM]``), then, as ``ADVANCE`` does, runs fixed-rule iterations until the
    next epoch or the episode's end, and observes.

    Returns ``(stop, running, decode, prefill, clipped)``: ``stop`` is ``EPOCH`` or ``DONE`` (the candidates,
    ``observation`` and, after ``ACT``, the admitted ``counts`` are written), or ``GENERAL_ACTION`` /
    ``GENERAL_FIXED``: the iteration ``decode``/``prefill`` (the agent's, or the fixed rule's) needs the
    engine's general path (nothing of it ran; the caller runs it and its reward, then goes on with
    ``ADVANCE``). The reward of the agent's decision goes to ``FIRST_REWARD``, the
    rest to ``MORE_REWARD``, as ``LLMSchedEnv.step`` adds them.
    """
    # A local empty array, not the module's: Numba types a global array as a read-only constant, and each
    # distinct argument type compiles the callees again.
    nothing = np.empty(0, dtype=np.int64)
    clipped = False
    acting = start == ACT  # the agent's decision runs first; then the fixed rule's, until the next epoch
    prefill = nothing
    if acting:
        prefill, admitted_counts, clipped = kernels.admissions(action, oldest, fits, classes, context, block_size,
                                                               ints[ROOM])
        counts[:] = admitted_counts
        if len(prefill):
            reals[LAST_ADMISSION] = reals[NOW]
    while True:
        if not acting:
            # Rollout.needs_decision: let in what has arrived; the horizon or a stalled end stops the loop.
            now = reals[NOW]
            nxt = ints[NEXT_ARRIVAL]
            while nxt < len(times) and times[nxt] <= now:
                i = ints[N]
                arrival[i] = times[nxt]
                prompt[i] = arrival_prompt[nxt]
                output[i] = arrival_output[nxt]
                context[i] = arrival_prompt[nxt]
                final_context[i] = arrival_prompt[nxt] + arrival_output[nxt]
                status[i] = WAITING
                ints[N] = i + 1
                ints[NUM_WAITING] += 1
                nxt += 1
            ints[NEXT_ARRIVAL] = nxt
            if ints[ENDED] or now >= horizon:
                break
            _scan(ints, running, status, context, kv_tokens, classes, block_size, capacity_blocks, max_admit,
                  oldest, heads, fits, queued)
            if fits.any():
                _observe(ints, reals, running, classes, context, prompt, output, arrival, block_size,
                         capacity_blocks, queued, rate_sum, window, queue_scale, running_scale, rate_scale,
                         time_scale, fixed, residual, segment_edges, known, buckets, horizon, observation)
                return EPOCH, running, nothing, nothing, clipped
            prefill = nothing
        decode = kernels.decodable(running, kv_tokens, context)
        ran, running, earned = _run(decode, prefill, ints, reals, running, status, context, final_context, prompt,
                                    kv_tokens, mark, first_token, finish, block_size, capacity_blocks, cost, times,
                                    horizon, fluid_rate, tokens_reward, latency_penalty)
        if not ran:
            return GENERAL_ACTION if acting else GENERAL_FIXED, running, decode, prefill, clipped
        reals[FIRST_REWARD if acting else MORE_REWARD] += earned
        acting = False
    # The regret counts to the horizon: charge the fluid optimum's service of the time left.
    rest = max(0.0, horizon - reals[ACCOUNTED])
    reals[ACCOUNTED] = horizon
    reals[MORE_REWARD] = reals[MORE_REWARD] - fluid_rate * rest
    _scan(ints, running, status, context, kv_tokens, classes, block_size, capacity_blocks, max_admit,
          oldest, heads, fits, queued)
    _observe(ints, reals, running, classes, context, prompt, output, arrival, block_size, capacity_blocks,
             queued, rate_sum, window, queue_scale, running_scale, rate_scale, time_scale, fixed, residual,
             segment_edges, known, buckets, horizon, observation)
    return DONE, running, nothing, nothing, clipped


class CompiledEpisode:
    """Drives an :class:`~llmsched_env.env.LLMSchedEnv` episode on a compiled simulated engine through
    :func:`advance_episode`, keeping the engine, the rollout and the agent interface in step with it.

    Built by the environment at reset when its engine is a compiled
    :class:`~llmsched_env.simulator.SimulatedEngine` and nothing observes single iterations (no
    ``rgb_array`` rendering); otherwise the environment runs its Python loop.
    """

    def __init__(self, env: "LLMSchedEnv") -> None:
        self.env = env
        rollout = env._live_rollout()
        engine = rollout.engine
        control = env.control
        cost = engine.cost
        arrivals = rollout._arrivals
        engine.reserve(len(arrivals))  # the compiled loop enqueues arrivals into columns that are already there
        self._ints = np.zeros(NUM_INTS, dtype=np.int64)
        self._reals = np.zeros(NUM_REALS, dtype=np.float64)
        coefficients = cost.coefficients()
        self._fixed = (coefficients, rollout._times, arrivals.prompt_len, arrivals.output_len, rollout.horizon,
                       env._fluid_rate(), env.reward_unit == "tokens", env.latency_penalty)
        self._control = (control._class, control.max_admit, control._rates._sum, control._rates.window_s,
                         control._queue_scale, control._running_scale, control._rate_scale, control._time_scale,
                         control._fixed_observation, control._residual, control._segment_edges,
                         bool(control.known_lengths), control.stage_buckets)
        k = control.num_classes
        # The current epoch's candidates (the action applies to them) and the counts admitted.
        self._buffers = (np.zeros((k, control.max_admit), dtype=np.int64), np.zeros(k, dtype=np.int64),
                         np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64))
        self._observation_size = control.observation_size

    def _load(self) -> None:
        """Copy the loop's scalars from the engine, rollout, agent interface and environment."""
        env = self.env
        rollout = env._rollout
        engine = rollout.engine  # type: ignore[union-attr]
        kv = engine._kv
        control = env.control
        self._ints[:ROOM] = (engine._n, engine._num_waiting, engine._num_finished, engine._first_maybe_waiting,
                             kv.used_blocks, kv.used_tokens, engine._stamp, rollout._next, rollout._ended,
                             rollout.iterations, rollout.peak_blocks_used, control._seen)
        self._reals[:FIRST_REWARD] = (engine._now, rollout.block_seconds, rollout.busy_time, env._accounted_time,
                                      control._last_admission, control._rates._time)

    def _store(self, running: np.ndarray) -> None:
        """Copy the loop's scalars back (the inverse of :meth:`_load`)."""
        env = self.env
        rollout = env._rollout
        engine = rollout.engine  # type: ignore[union-attr]
        kv = engine._kv
        control = env.control
        (engine._n, engine._num_waiting, engine._num_finished, engine._first_maybe_waiting, kv.used_blocks,
         kv.used_tokens, engine._stamp, rollout._next, ended, rollout.iterations, rollout.peak_blocks_used,
         control._seen, _) = self._ints.tolist()
        rollout._ended = bool(ended)
        engine._running = running
        (engine._now, rollout.block_seconds, rollout.busy_time, env._accounted_time, control._last_admission,
         control._rates._time, _, _) = self._reals.tolist()

    def advance(self, action: np.ndarray | None, candidates: Candidates | None, first_reward: float
                ) -> tuple[np.ndarray, float, float, np.ndarray, bool, Candidates | None]:
        """Apply ``action`` to the epoch's ``candidates`` (``None`` and ``None`` when no decision is due, as
        at reset) and run to the next epoch or the end.

        Returns ``(observation, first_reward, more_reward, admitted counts, clipped, candidates)``, with
        ``candidates`` ``None`` when the episode is over; ``first_reward`` starts from the given value (the
        reward pending from reset), as ``LLMSchedEnv.step`` adds it. The counts and the candidates are
        this object's buffers, valid until the next call; the observation is a new array.
        """
        env = self.env
        reals, ints = self._reals, self._ints
        oldest, heads, fits, queued, counts = self._buffers
        observation = np.empty(self._observation_size, dtype=np.float32)
        start = ADVANCE if action is None else ACT
        reals[FIRST_REWARD], reals[MORE_REWARD] = first_reward, 0.0
        room = 0
        if action is not None and candidates is not None:
            if candidates.oldest is not oldest:  # not the ones this object found
                oldest[:], fits[:] = candidates.oldest, candidates.fits
            room = candidates.room
        ints[ROOM] = room  # _load leaves it
        clipped = False
        while True:
            self._load()
            engine = env._rollout.engine  # type: ignore[union-attr]
            kv = engine._kv
            stop, running, decode, prefill, clipped_now = advance_episode(
                start, _EMPTY if action is None else action, ints, reals, engine._running,
                engine._status, engine._prompt, engine._output, engine._context, engine._final_context,
                engine._arrival, engine._first_token, engine._finish, engine._mark, kv._tokens, kv.block_size,
                kv.capacity_blocks, *self._fixed, *self._control, oldest, heads, fits, queued, observation, counts)
            self._store(running)
            clipped = clipped or clipped_now
            if stop == EPOCH or stop == DONE:
                break
            # An iteration that needs eviction: the rollout runs it on the engine's general path.
            slot = FIRST_REWARD if stop == GENERAL_ACTION else MORE_REWARD
            reals[slot] += env._apply(Decision(decode=decode, prefill=prefill))
            start = ADVANCE
        found = None if stop == DONE else Candidates(oldest, heads, fits, int(ints[ROOM]), queued)
        return observation, float(reals[FIRST_REWARD]), float(reals[MORE_REWARD]), counts, clipped, found
