"""The environment's episode loop, compiled: one call per decision epoch on the simulated engine.

:class:`~llmsched_env.env.LLMSchedEnv` steps its episodes through the evaluation loop
(:class:`~llmsched_env.runner.Rollout`) and the agent's interface
(:class:`~llmsched_env.admission.AdmissionControl`). Written in Python, a step is two dozen calls
across those objects, each doing a little work on a few hundred requests, and the calls, not the
work, take most of its time. On the simulated engine, :class:`CompiledEpisode` runs the same step as
one compiled call, :func:`advance_episode`: the agent's admissions, the engine iterations up to the
next decision epoch (with the fixed rule between epochs), the arrivals they let in, the reward and
the next observation. :func:`advance_episodes` runs that step for many episodes in one call (the
native vector environment, :mod:`llmsched_env.vector`).

**State.** The compiled loop sees an episode as four explicit structures, each owned by one object and
built once per episode (:meth:`CompiledEpisode.structures`):

* :class:`~llmsched_env.request_table.RequestColumns`: the engine's request table (its own columns,
  written in place; :meth:`~llmsched_env.simulator.SimulatedEngine.request_columns`);
* :class:`EpisodeParams`: what the episode fixes: memory, cost coefficients, the arrivals, the horizon
  and the reward's terms;
* :class:`~llmsched_env.admission.InterfaceParams`: what the agent interface fixes: each request's class,
  the observation's scales and fluid targets, the stage buckets
  (:meth:`~llmsched_env.admission.AdmissionControl.interface_params`);
* :class:`LoopState`: what the loop changes besides the table: the counters (``ints``/``reals``, indexed
  by the constants below), the rate estimator's sums (the interface's own array), the epoch's
  candidates, the observation and the admitted counts.

The engine, the rollout and the interface hand over their counters as typed tuples
(``counters()``) and take them back (``restore()``). Typed tuples rather than Numba structrefs: they
cross the Python/compiled boundary as they are (a tuple of arrays is unboxed without copying), a typed
list of them is how the vector environment hands N episodes to one call, and ``NUMBA_DISABLE_JIT=1``
runs the same code as plain Python.

It is the same loop: it calls the simulator's compiled iteration kernels
(:func:`~llmsched_env.kernels.plan_iteration`, :func:`~llmsched_env.kernels.run_iteration`) and the
agent interface's (queue scan, admissions, running profile, observation), and repeats the Python
loop's floating-point operations in its order, so it returns exactly what the Python loop returns:
``tests/test_env.py`` compares both, step by step, bit for bit. An iteration that needs eviction (or
anything but the fast path) goes back to Python, which runs it through the rollout and the engine's
general path, then the compiled loop goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import prange
from numba.typed import List as TypedList

from llmsched_env import kernels
from llmsched_env.admission import Candidates, InterfaceCounters, InterfaceParams
from llmsched_env.compiled import borrowed, compiled, compiled_parallel
from llmsched_env.engine import LAST_ITERATION_FIELDS, Decision
from llmsched_env.iteration import (
    FIRST_MAYBE_WAITING,
    INVALID,
    NUM_ENGINE_COUNTERS,
    NUM_WAITING,
    USED_BLOCKS,
    EngineParams,
    N,
    enqueue_due,
    iterate,
    note_last_iteration,
)
from llmsched_env.request_table import RequestColumns
from llmsched_env.runner import RolloutCounters
from llmsched_env.simulator import EngineCounters

if TYPE_CHECKING:  # pragma: no cover
    from llmsched_env.env import LLMSchedEnv

# -- the loop's scalars, kept in two small arrays so that the compiled loop updates them in place -----------
# integers: the engine's counters first (llmsched_env.iteration's N … STAMP, which the compiled iteration
# advances in place), then the rollout's and the agent interface's
NEXT_ARRIVAL, ENDED, ITERATIONS, PEAK_BLOCKS, EVICTIONS, SEEN, ROOM = range(NUM_ENGINE_COUNTERS,
                                                                          NUM_ENGINE_COUNTERS + 7)
NUM_INTS = NUM_ENGINE_COUNTERS + 7
# reals
NOW, BLOCK_SECONDS, BUSY_TIME, ACCOUNTED, LAST_ADMISSION, RATE_TIME, FIRST_REWARD, MORE_REWARD = range(8)
LAST_ITERATION = 8  # the engine's last iteration that ran: SchedulerState.last_iteration's fields, from here on
NUM_REALS = LAST_ITERATION + LAST_ITERATION_FIELDS

#: What :func:`advance_episode` stopped at: an epoch, the episode's end, or a decision the compiled iteration
#: refused as invalid (the agent's, or the fixed rule's: neither happens, the interface only admits what it
#: may; Python runs it through the rollout, which names the error).
EPOCH, DONE, GENERAL_ACTION, GENERAL_FIXED = 0, 1, 2, 3
#: Where it starts: with the agent's action at an epoch, or going on to the next epoch.
ACT, ADVANCE = 0, 1

_EMPTY = np.empty(0, dtype=np.int64)


class EpisodeParams(NamedTuple):
    """What an episode fixes for the engine, the arrivals and the reward."""

    engine: EngineParams  # the simulated engine's paging, capacity and cost model
    times: np.ndarray  # arrival times of the episode's requests, in order
    arrival_prompt: np.ndarray
    arrival_output: np.ndarray
    horizon: float
    fluid_rate: float  # Θ* in the reward's unit (requests or output tokens per second)
    tokens_reward: bool
    latency_penalty: float
    eviction_penalty: float


class LoopState(NamedTuple):
    """What the loop changes besides the request table (the constants above index ``ints`` and ``reals``)."""

    ints: np.ndarray  # int64[NUM_INTS]
    reals: np.ndarray  # float64[NUM_REALS]
    rate_sum: np.ndarray  # the rate estimator's per-class sums (updated in place)
    oldest: np.ndarray  # the epoch's candidates (Candidates.oldest)
    heads: np.ndarray
    fits: np.ndarray
    queued: np.ndarray
    observation: np.ndarray  # float32: the observation at the epoch
    counts: np.ndarray  # admitted per class by the last action


@compiled
def _scan(loop: LoopState, running: np.ndarray, columns: RequestColumns, episode: EpisodeParams,
          interface: InterfaceParams) -> None:
    """:meth:`AdmissionControl.candidates` of the engine's state into the loop's candidates (``ROOM`` too),
    reading the queue as the engine does (:func:`~llmsched_env.kernels.waiting_ids`, moving its start too)."""
    ints = loop.ints
    block_size = episode.engine.block_size
    room = (episode.engine.capacity_blocks - ints[USED_BLOCKS]
            - kernels.blocks_to_grow(running, columns.kv_tokens, block_size))
    waiting, ints[FIRST_MAYBE_WAITING] = kernels.waiting_ids(columns.status, ints[FIRST_MAYBE_WAITING], ints[N],
                                                             ints[NUM_WAITING])
    o, h, f, q = kernels.scan_queue(waiting, interface.classes, columns.context, block_size, room,
                                    len(loop.heads), interface.max_admit)
    loop.oldest[:, :] = o
    loop.heads[:] = h
    loop.fits[:] = f
    loop.queued[:] = q
    ints[ROOM] = room


@compiled
def _observe(loop: LoopState, running: np.ndarray, columns: RequestColumns, episode: EpisodeParams,
             interface: InterfaceParams) -> None:
    """:meth:`AdmissionControl.observe`, rate update included, into ``loop.observation``."""
    ints, reals = loop.ints, loop.reals
    now = reals[NOW]
    seen, n = ints[SEEN], ints[N]
    kernels.count_arrivals(loop.rate_sum, reals[RATE_TIME], now, columns.arrival[seen:n],
                           interface.classes[seen:n], interface.rate_window)
    reals[RATE_TIME] = now
    ints[SEEN] = n
    rates = loop.rate_sum / kernels.window_coverage(now, interface.rate_window)
    cells, peak = kernels.running_profile(running, interface.classes, columns.context, columns.prompt,
                                          columns.output, interface.residual, interface.segment_edges,
                                          interface.known_lengths, len(loop.queued), interface.stage_buckets)
    capacity_blocks = episode.engine.capacity_blocks
    memory = np.empty(2)
    memory[0] = ints[USED_BLOCKS] / capacity_blocks
    memory[1] = min(peak / (capacity_blocks * episode.engine.block_size), 2.0) / 2.0
    loop.observation[:] = kernels.assemble_observation(loop.queued, cells, memory, now - reals[LAST_ADMISSION], rates,
                                                       min(now / episode.horizon, 1.0), interface.scales)


@compiled
def _run(decode: np.ndarray, prefill: np.ndarray, loop: LoopState, running: np.ndarray, columns: RequestColumns,
         episode: EpisodeParams) -> tuple[bool, np.ndarray, float]:
    """``Rollout.apply`` of an iteration that decodes ``decode`` and admits ``prefill`` (whole prompts), through the
    engine's compiled iteration (:func:`~llmsched_env.iteration.iterate`: evictions included), and
    ``LLMSchedEnv._reward`` of it: ``(ran, running, reward)``. ``ran`` is ``False`` (and nothing changed) when
    the decision is invalid (Python names the error)."""
    ints, reals, times = loop.ints, loop.reals, episode.times
    context = columns.context
    now = reals[NOW]
    in_system = ints[NUM_WAITING] + len(running)
    earned = 0.0
    evicted = 0
    ran = False
    stalled = len(decode) == 0 and len(prefill) == 0
    if not stalled:
        done = iterate(decode, prefill, prefill[:0], True, prefill[:0], running, columns, ints, episode.engine, now)
        if done.verdict == INVALID:
            return False, running, 0.0
        ran, running, duration = True, done.running, done.duration
        now = now + duration
        note_last_iteration(reals[LAST_ITERATION:], now, done)
        evicted = len(done.evicted)
        ints[ITERATIONS] += 1
        ints[EVICTIONS] += evicted
        ints[PEAK_BLOCKS] = max(ints[PEAK_BLOCKS], done.peak_blocks)
        reals[BLOCK_SECONDS] += done.peak_blocks * duration
        reals[BUSY_TIME] += duration
        stalled = duration == 0.0 and evicted == 0
        if len(done.finished):
            if episode.tokens_reward:
                generated = 0
                for i in done.finished:
                    generated += context[i] - columns.prompt[i]
                earned += float(generated)
            else:
                earned += len(done.finished)
    if stalled:
        ended, held, now = kernels.stall(times, ints[NEXT_ARRIVAL], ints[USED_BLOCKS], now)
        if ended:
            ints[ENDED] = 1
        else:
            reals[BLOCK_SECONDS] += held
    before = reals[NOW]
    reals[NOW] = now
    reward, reals[ACCOUNTED] = kernels.reward_increment(earned, before, now, reals[ACCOUNTED], episode.horizon,
                                                        episode.fluid_rate, episode.latency_penalty, in_system)
    if episode.eviction_penalty and ran:
        reward -= episode.eviction_penalty * evicted
    return True, running, reward


@compiled
def advance_episode(start: int, action: np.ndarray, running: np.ndarray, columns: RequestColumns,
                    episode: EpisodeParams, interface: InterfaceParams, loop: LoopState
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, bool]:
    """One environment step from ``start``: ``ACT`` applies ``action`` at the current epoch (the candidates
    in ``loop``, ``ints[ROOM]`` included), then, as ``ADVANCE`` does, runs fixed-rule iterations until the
    next epoch or the episode's end, and observes.

    Returns ``(stop, running, decode, prefill, clipped)``: ``stop`` is ``EPOCH`` or ``DONE`` (the candidates,
    ``loop.observation`` and, after ``ACT``, the admitted ``loop.counts`` are written), or ``GENERAL_ACTION`` /
    ``GENERAL_FIXED``: the iteration ``decode``/``prefill`` (the agent's, or the fixed rule's) needs the
    engine's general path (nothing of it ran; the caller runs it and its reward, then goes on with
    ``ADVANCE``). The reward of the agent's decision goes to ``FIRST_REWARD``, the
    rest to ``MORE_REWARD``, as ``LLMSchedEnv.step`` adds them. It runs on borrowed views of what the caller owns
    (:func:`~llmsched_env.compiled.borrowed`).
    """
    return _advance(start, action, running, borrowed(columns), borrowed(episode), borrowed(interface), borrowed(loop))


@compiled
def _advance(start: int, action: np.ndarray, running: np.ndarray, columns: RequestColumns, episode: EpisodeParams,
             interface: InterfaceParams, loop: LoopState) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, bool]:
    # A local empty array, not the module's: Numba types a global array as a read-only constant, and each
    # distinct argument type compiles the callees again.
    nothing = np.empty(0, dtype=np.int64)
    ints, reals = loop.ints, loop.reals
    clipped = False
    acting = start == ACT  # the agent's decision runs first; then the fixed rule's, until the next epoch
    prefill = nothing
    if acting:
        prefill, admitted_counts, clipped = kernels.admissions(action, loop.oldest, loop.fits, interface.classes,
                                                               columns.context, episode.engine.block_size,
                                                               ints[ROOM])
        loop.counts[:] = admitted_counts
        if len(prefill):
            reals[LAST_ADMISSION] = reals[NOW]
    while True:
        if not acting:
            ints[NEXT_ARRIVAL] = enqueue_due(episode.times, episode.arrival_prompt, episode.arrival_output,
                                             ints[NEXT_ARRIVAL], reals[NOW], columns, ints)
            if ints[ENDED] or reals[NOW] >= episode.horizon:
                break
            _scan(loop, running, columns, episode, interface)
            if kernels.has_choice(loop.fits):
                _observe(loop, running, columns, episode, interface)
                return EPOCH, running, nothing, nothing, clipped
            prefill = nothing
        decode = kernels.decodable(running, columns.kv_tokens, columns.context)
        ran, running, earned = _run(decode, prefill, loop, running, columns, episode)
        if not ran:
            return GENERAL_ACTION if acting else GENERAL_FIXED, running, decode, prefill, clipped
        reals[FIRST_REWARD if acting else MORE_REWARD] += earned
        acting = False
    # The regret counts to the horizon: charge the fluid optimum's service of the time left.
    charge, reals[ACCOUNTED] = kernels.reward_increment(0.0, episode.horizon, episode.horizon, reals[ACCOUNTED],
                                                        episode.horizon, episode.fluid_rate, 0.0, 0)
    reals[MORE_REWARD] = reals[MORE_REWARD] + charge
    _scan(loop, running, columns, episode, interface)
    _observe(loop, running, columns, episode, interface)
    return DONE, running, nothing, nothing, clipped


@compiled_parallel
def advance_episodes(active: np.ndarray, starts: np.ndarray, actions: np.ndarray, episodes: TypedList,
                     runnings: TypedList, stops: np.ndarray, decodes: TypedList, prefills: TypedList,
                     clipped: np.ndarray) -> None:
    """:func:`advance_episode` for each episode ``e`` with ``active[e]`` (from ``starts[e]``, with
    ``actions[e]``): ``episodes[e]`` holds its ``(columns, episode, interface, loop)``, ``runnings[e]`` its
    running ids (replaced); its stop goes to ``stops[e]``, a general-path iteration to ``decodes[e]`` /
    ``prefills[e]``, and whether its action was clipped is or-ed into ``clipped[e]``."""
    for j in prange(len(active)):  # the episodes are independent: each thread writes its own e's
        e = np.int64(j)  # prange counts unsigned; a typed list takes a signed index
        if not active[e]:
            continue
        columns, episode, interface, loop = episodes[e]
        stop, running, decode, prefill, clipped_now = advance_episode(starts[e], actions[e], runnings[e], columns,
                                                                      episode, interface, loop)
        runnings[e] = running
        stops[e] = stop
        decodes[e] = decode
        prefills[e] = prefill
        clipped[e] = clipped[e] or clipped_now


# A typed list's methods called from Python compile anew in every process (seconds), and assigning a tuple to
# one unboxes it slowly: the vector environment builds and updates its typed lists through these.
@compiled
def repeated(item: object, count: int) -> TypedList:
    """A typed list of ``count`` references to ``item``."""
    items = TypedList()
    for _ in range(count):
        items.append(item)
    return items


@compiled
def get_item(items: TypedList, e: int) -> object:
    """``items[e]``."""
    return items[e]


@compiled
def set_item(items: TypedList, e: int, item: object) -> None:
    """``items[e] = item``."""
    items[e] = item


def _writable(values: np.ndarray, dtype: type) -> np.ndarray:
    # One array type for every episode (C-contiguous, writable): Numba compiles once per argument type, and a
    # typed list holds a single type.
    return np.require(values, dtype=dtype, requirements=["C", "W"])


class CompiledEpisode:
    """Drives an :class:`~llmsched_env.env.LLMSchedEnv` episode on a compiled simulated engine through
    :func:`advance_episode`, keeping the engine, the rollout and the agent interface in step with it.

    Built by the environment at reset when its engine is a compiled
    :class:`~llmsched_env.simulator.SimulatedEngine` and nothing observes single iterations (no
    ``rgb_array`` rendering); otherwise the environment runs its Python loop. The request table and the
    rate sums are the engine's and the interface's own arrays, written in place. Their counters are
    copied into :class:`LoopState` (:meth:`load`), which is the truth while the loop runs, and handed back
    by :meth:`store` (after every step of a single environment; in a vector environment only when needed:
    an iteration on the general path, the episode's end).

    Args:
        env: the environment whose episode (just reset) this runs.
        buffers: where the loop's arrays live (the vector environment passes rows of its batched arrays);
            fresh ones when ``None``. The rate sums are always the agent interface's own.
    """

    def __init__(self, env: "LLMSchedEnv", buffers: LoopState | None = None) -> None:
        self.env = env
        rollout = env.rollout
        engine = rollout.engine
        control = env.control
        arrivals = rollout.arrivals
        engine.reserve(len(arrivals))  # the compiled loop enqueues arrivals into columns that are already there
        k = control.num_classes
        if buffers is None:
            buffers = LoopState(np.zeros(NUM_INTS, dtype=np.int64), np.zeros(NUM_REALS, dtype=np.float64),
                                control.rate_sums, np.zeros((k, control.max_admit), dtype=np.int64),
                                np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64),
                                np.zeros(k, dtype=np.int64),
                                np.zeros(control.observation_size, dtype=np.float32), np.zeros(k, dtype=np.int64))
        else:
            buffers = buffers._replace(rate_sum=control.rate_sums)
        self.loop = buffers
        self.episode = EpisodeParams(
            engine.engine_params(), _writable(arrivals.arrival_time, np.float64),
            _writable(arrivals.prompt_len, np.int64), _writable(arrivals.output_len, np.int64),
            float(rollout.horizon), float(env.fluid_rate), env.reward_unit == "tokens", float(env.latency_penalty),
            float(env.eviction_penalty))
        self.interface = control.interface_params()
        self.columns = engine.request_columns()
        self.running = engine.counters().running
        self.load()

    def structures(self) -> tuple[RequestColumns, EpisodeParams, InterfaceParams, LoopState]:
        """What :func:`advance_episode` takes besides the start, the action and the running ids."""
        return self.columns, self.episode, self.interface, self.loop

    def load(self) -> None:
        """Read the loop's counters from the engine, the rollout, the agent interface and the environment."""
        env = self.env
        rollout = env.rollout
        engine = rollout.engine.counters()
        loop = rollout.counters()
        interface = env.control.counters()
        ints, reals = self.loop.ints, self.loop.reals
        ints[:NUM_ENGINE_COUNTERS] = engine[:NUM_ENGINE_COUNTERS]  # in the compiled iteration's order
        ints[NUM_ENGINE_COUNTERS:ROOM] = (loop.next_arrival, loop.ended, loop.iterations, loop.peak_blocks_used,
                                          loop.evictions, interface.seen)
        reals[:FIRST_REWARD] = (engine.now, loop.block_seconds, loop.busy_time, env.accounted_time,
                                interface.last_admission, interface.rate_time)
        reals[LAST_ITERATION:] = engine.last_iteration
        self.running = engine.running

    def store(self) -> None:
        """Hand the loop's counters back (the inverse of :meth:`load`)."""
        env = self.env
        rollout = env.rollout
        ints = self.loop.ints.tolist()
        next_arrival, ended, iterations, peak_blocks, evictions, seen, _ = ints[NUM_ENGINE_COUNTERS:]
        reals = self.loop.reals
        now, block_seconds, busy_time, accounted, last_admission, rate_time, _, _ = reals[:LAST_ITERATION].tolist()
        rollout.engine.restore(EngineCounters(*ints[:NUM_ENGINE_COUNTERS], now, self.running,
                                              reals[LAST_ITERATION:]))
        rollout.restore(RolloutCounters(next_arrival, bool(ended), iterations, peak_blocks, evictions, block_seconds,
                                        busy_time))
        env.control.restore(InterfaceCounters(seen, last_admission, rate_time))
        env.accounted_time = accounted

    def run_general(self, stop: int, decode: np.ndarray, prefill: np.ndarray) -> bool:
        """Run the decision :func:`advance_episode` stopped at (``GENERAL_ACTION`` or ``GENERAL_FIXED``: refused as
        invalid) through the rollout, which names the error (or runs it, and its reward goes where the loop's would).
        Returns whether :attr:`columns` changed (the structures must be handed over again)."""
        self.store()
        reward = self.env.apply_decision(Decision(decode=decode, prefill=prefill))
        self.load()
        self.loop.reals[FIRST_REWARD if stop == GENERAL_ACTION else MORE_REWARD] += reward
        columns = self.env.rollout.engine.request_columns()
        if any(new is not old for new, old in zip(columns, self.columns)):
            self.columns = columns  # the general path grew the table (it does not, after reserve(); be safe)
            return True
        return False

    def candidates(self) -> Candidates:
        """The current epoch's candidates (this object's buffers, valid until the next step)."""
        loop = self.loop
        return Candidates(loop.oldest, loop.heads, loop.fits, int(loop.ints[ROOM]), loop.queued)

    def advance(self, action: np.ndarray | None, candidates: Candidates | None, first_reward: float
                ) -> tuple[np.ndarray, float, float, np.ndarray, bool, Candidates | None]:
        """Apply ``action`` to the epoch's ``candidates`` (``None`` and ``None`` when no decision is due, as
        at reset) and run to the next epoch or the end.

        Returns ``(observation, first_reward, more_reward, admitted counts, clipped, candidates)``, with
        ``candidates`` ``None`` when the episode is over; ``first_reward`` starts from the given value (the
        reward pending from reset), as ``LLMSchedEnv.step`` adds it. The counts and the candidates are
        this object's buffers, valid until the next call; the observation is a new array.
        """
        loop = self.loop
        reals, ints = loop.reals, loop.ints
        start = ADVANCE if action is None else ACT
        reals[FIRST_REWARD], reals[MORE_REWARD] = first_reward, 0.0
        room = 0
        if action is not None and candidates is not None:
            if candidates.oldest is not loop.oldest:  # not the ones this object found
                loop.oldest[:], loop.fits[:] = candidates.oldest, candidates.fits
            room = candidates.room
        ints[ROOM] = room
        clipped = False
        while True:
            stop, self.running, decode, prefill, clipped_now = advance_episode(
                start, _EMPTY if action is None else action, self.running, self.columns, self.episode,
                self.interface, loop)
            clipped = clipped or clipped_now
            if stop == EPOCH or stop == DONE:
                break
            self.run_general(stop, decode, prefill)
            start = ADVANCE
        self.store()
        found = None if stop == DONE else self.candidates()
        return loop.observation.copy(), float(reals[FIRST_REWARD]), float(reals[MORE_REWARD]), loop.counts, \
            clipped, found
