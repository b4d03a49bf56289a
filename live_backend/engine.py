"""``LiveVLLMEngine``: a real, in-process vLLM engine behind llmsched's :class:`~llmsched_env.engine.Engine` protocol.

Any policy or agent runs on it unchanged through :func:`llmsched_env.run`: each ``step(decision)``
hands the decision to :class:`~live_backend.scheduler.DecisionScheduler` and runs one
``LLMEngine.step()``, which schedules exactly that batch, executes the model and samples. What comes
back is the same :class:`~llmsched_env.engine.IterationOutcome` the simulator returns, with the
iteration's measured duration and vLLM's own block accounting and preemptions.

Requests are real: a request of the workload with prompt ``p`` and output ``o`` becomes a vLLM request
of ``p`` prompt tokens asking for exactly ``o + 1`` tokens (``min_tokens = max_tokens``,
``ignore_eos``): the first comes from the prefill, the other ``o`` from decodes, as in the simulator's
stage model (``docs/model.md``). When a request finishes, the number of tokens vLLM produced is
checked against the workload.

The clock is *engine time*: the sum of measured iteration times plus the idle gaps the runner asks
for, so a run's idle waits cost no wall time and its figures compare with the simulator's. With
``pace=True`` idle gaps are slept through instead, for demonstrations against a wall clock.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from live_backend import vllm_adapter as adapter
from live_backend.config import LiveConfig
from llmsched_env.cost_model import prefill_attention
from llmsched_env.engine import (
    FINISHED,
    NO_ITERATION,
    RUNNING,
    WAITING,
    Decision,
    IterationOutcome,
    RequestRecords,
    SchedulerState,
    last_iteration_row,
    readonly_view,
)
from llmsched_env.errors import ConfigError, EngineFailure, RequestTooLargeError
from llmsched_env.request_table import (
    EMPTY_IDS,
    REQUEST_COLUMNS,
    checked_arrivals,
    grow_columns,
    records_of,
    retire_rows,
    start_rows,
    validated_batch,
)

# The live engine's columns: the shared ones, plus the KV tokens vLLM has computed for each request and
# the tokens it returned (checked at finish: o + 1).
_COLUMNS: dict[str, tuple[type, float | int]] = {
    **REQUEST_COLUMNS,
    "_kv": (np.int64, 0),
    "_produced": (np.int64, 0),
}


class LiveVLLMEngine:
    """A vLLM ``LLMEngine`` stepped one iteration at a time under llmsched decisions.

    Args:
        config: the engine's model, device and KV-cache settings.
        output_lengths_known: whether policies may see output lengths before requests finish (vLLM
            always gets the exact count to produce; this only controls the policy's view).
        pace: sleep through idle gaps (wall-clock pacing) instead of skipping them.

    Raises:
        ConfigError: a model path that does not exist, or settings vLLM refuses (e.g. a KV cache
            smaller than one request of ``max_model_len`` tokens); the message names the setting.
        UnsupportedVersionError: an installed vLLM other than the supported release.
    """

    def __init__(self, config: LiveConfig, *, output_lengths_known: bool = True, pace: bool = False) -> None:
        vllm = adapter.import_vllm()
        from live_backend.scheduler import DecisionScheduler, ExecutableDecision

        self._decision_type = ExecutableDecision
        self.config = config
        config.check_model()
        adapter.shield_from_kernel_override_scan()
        try:
            self._llm = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(**config.engine_args(DecisionScheduler)))
        except (ValueError, RuntimeError) as error:
            raise ConfigError(f"vLLM could not start with live config {config.name or config.model!r} "
                              f"(kv_blocks={config.kv_blocks}, block_size={config.block_size}, "
                              f"max_model_len={config.model_len()}): {error}") from None
        self._scheduler = adapter.scheduler_of(self._llm)
        if not isinstance(self._scheduler, DecisionScheduler):
            raise ConfigError(f"vLLM did not load the decision scheduler (got {type(self._scheduler).__name__})")
        self._vocab = int(self._llm.model_config.get_vocab_size())
        self._sampling = vllm.SamplingParams
        self._known = output_lengths_known
        self._pace = pace
        self._capacity = adapter.capacity_blocks(self._scheduler)
        self._block_size = adapter.block_size(self._scheduler)
        self._max_len = config.model_len()
        self._requests: dict[int, Any] = {}  # index -> vLLM Request, while unfinished
        self._running: list[int] = []
        self._now = 0.0
        self._wall_start = time.perf_counter()
        self._n = 0
        self._size = 0
        self._retired = 0  # ids before this one are finished and handed over (retire_finished)
        self._num_waiting = 0
        self._num_finished = 0
        self._iterations = 0
        self._last_iteration = NO_ITERATION  # what SchedulerState.last_iteration reads
        self._failed: str | None = None
        self._grow(256)

    # -- configuration -------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._now

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    @property
    def capacity_tokens(self) -> int:
        return self._capacity * self._block_size

    @property
    def output_lengths_known(self) -> bool:
        return self._known

    @property
    def num_requests(self) -> int:
        return self._n

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_finished(self) -> int:
        return self._num_finished

    def set_output_lengths_known(self, known: bool) -> None:
        """Choose whether policies see output lengths (before the first request only)."""
        if self._n:
            raise ConfigError("output-length visibility can only change before the first request is added")
        self._known = known

    def check_fits(self, prompt_len: np.ndarray, output_len: np.ndarray) -> None:
        """Raise :class:`RequestTooLargeError` if a request can never run: more KV than the cache holds,
        or more tokens (``p + o + 1``) than the engine's ``max_model_len``."""
        prompt_len, output_len = np.asarray(prompt_len, np.int64), np.asarray(output_len, np.int64)
        peak = -(-(prompt_len + output_len) // self._block_size)
        too_big = np.flatnonzero((peak > self._capacity) | (prompt_len + output_len + 1 > self._max_len))
        if len(too_big):
            i = int(too_big[0])
            raise RequestTooLargeError(
                f"request {i} (of this batch) needs {int(prompt_len[i]) + int(output_len[i])} KV tokens (prompt "
                f"{int(prompt_len[i])} + output {int(output_len[i])}), but the live engine holds "
                f"{self._capacity} blocks of {self._block_size} tokens ({self.capacity_tokens} tokens) and at most "
                f"{self._max_len} tokens per request (max_model_len); {len(too_big)} such request(s)")

    # -- storage -------------------------------------------------------------------------------
    def _grow(self, size: int) -> None:
        grow_columns(self, _COLUMNS, self._size, size, keep_from=self._retired)
        self._size = size

    def add_requests(self, arrival_time: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray) -> np.ndarray:
        """Create real vLLM requests of the given prompt lengths, each asking for exactly ``o + 1`` tokens."""
        self._check_alive()
        arrival_time, prompt_len, output_len = checked_arrivals(arrival_time, prompt_len, output_len)
        count = len(arrival_time)
        if count == 0:
            return EMPTY_IDS
        self.check_fits(prompt_len, output_len)
        start, end = self._n, self._n + count
        if end > self._size:
            self._grow(max(end, 2 * self._size))
        start_rows(self, _COLUMNS, start, end)
        self._arrival[start:end] = arrival_time
        self._prompt[start:end] = prompt_len
        self._output[start:end] = output_len
        self._context[start:end] = prompt_len
        self._status[start:end] = WAITING
        for index in range(start, end):
            p, o = int(self._prompt[index]), int(self._output[index])
            # Distinct token ids per request (prefix caching is off; distinct prompts keep it honest if on).
            prompt = [3 + (index * 131 + k) % (self._vocab - 3) for k in range(p)]
            params = self._sampling(max_tokens=o + 1, min_tokens=o + 1, ignore_eos=True, detokenize=False,
                                    temperature=0.0)
            self._llm.add_request(adapter.request_id(index), {"prompt_token_ids": prompt}, params)
        self._n = end
        self._num_waiting += count
        for request in self._scheduler.requests.values():
            index = adapter.request_index(request)
            if start <= index < end:
                self._requests[index] = request
        return np.arange(start, end, dtype=np.int64)

    # -- the policy's view -----------------------------------------------------------------------
    def _waiting_ids(self, limit: int | None = None) -> np.ndarray:
        ids = self._retired + np.flatnonzero(self._status[self._retired:self._n] == WAITING)
        return ids if limit is None else ids[:limit]

    def state(self) -> SchedulerState:
        return SchedulerState(
            now=self._now, block_size=self._block_size, capacity_blocks=self._capacity,
            used_blocks=adapter.used_blocks(self._scheduler),
            running=readonly_view(np.array(self._running, dtype=np.int64)),
            prompt_len=readonly_view(self._prompt),
            output_len=readonly_view(self._output) if self._known else None,
            context_len=readonly_view(self._context), kv_tokens=readonly_view(self._kv),
            arrival_time=readonly_view(self._arrival), num_evictions=readonly_view(self._evictions),
            num_requests=self._n, num_waiting=self.num_waiting, waiting_fn=self._waiting_ids,
            retired=self._retired, last_iteration=self._last_iteration)

    # -- the iteration -----------------------------------------------------------------------------
    def _validated(self, decision: Decision) -> tuple[np.ndarray, dict[int, int], np.ndarray]:
        """``(decode, prefill index -> chunk, preempt)`` or :class:`InvalidDecisionError`: the simulator's rules
        and messages (one function for both), so a policy valid on one engine is valid on the other."""
        batch = validated_batch(decision, self._n, self._status, self._prompt, self._context, self._kv, self._mark)
        return batch.decode, dict(zip(batch.prefill.tolist(), batch.chunk.tolist())), batch.preempt

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise EngineFailure(f"the live engine failed earlier and cannot go on: {self._failed}")

    def step(self, decision: Decision) -> IterationOutcome:
        """Run one vLLM iteration executing ``decision``; returns what it did, with its measured duration."""
        self._check_alive()
        decode, prefill, preempt = self._validated(decision)
        scheduler = self._scheduler
        scheduler.pending_decision = self._decision_type(
            decode=frozenset(int(i) for i in decode), prefill=prefill, preempt=tuple(int(i) for i in preempt))
        start = self._now
        wall = time.perf_counter()
        try:
            request_outputs = self._llm.step()
        except Exception as error:  # noqa: BLE001 - any failure inside vLLM ends the run, accounted for
            self._reconcile_after_failure()
            raise self._failure(f"vLLM raised {type(error).__name__} in iteration {self._iterations + 1} at engine "
                                f"time {start:.3f} s: {error}") from error
        duration = time.perf_counter() - wall
        executed = scheduler.last_executed
        scheduler.last_executed = None
        if executed is None:
            raise self._failure("vLLM stepped without calling the decision scheduler (an unsupported engine setup)")
        self._iterations += 1
        scheduled = executed.scheduled_tokens
        if not scheduled:
            duration = 0.0  # nothing ran (every admission deferred): no time passes, as in the simulator
        now = self._now = start + duration

        finished_tokens = {adapter.output_index(out): len(out.outputs[0].token_ids)
                           for out in request_outputs if out.finished}
        evicted = np.array(executed.preempted, dtype=np.int64)
        for i in executed.preempted:
            self._status[i], self._kv[i] = WAITING, 0
            self._evictions[i] += 1
        self._num_waiting += len(executed.preempted) - len(executed.admitted)
        gone = set(executed.preempted)
        self._running = [i for i in self._running if i not in gone] + list(executed.admitted)
        prefill_tokens = decode_tokens = batch_kv = 0
        attention = 0.0
        finished: list[int] = []
        for i, tokens in scheduled.items():
            request = self._requests[i]
            kv = adapter.computed_tokens(request)
            if i in prefill:
                prefill_tokens += tokens
                attention += float(prefill_attention(tokens, kv - tokens))
            else:
                decode_tokens += tokens
            self._status[i] = RUNNING
            produced = adapter.output_tokens(request)
            batch_kv += kv
            if produced and math.isnan(self._first_token[i]):
                self._first_token[i] = now
            if i in finished_tokens:
                finished.append(i)
                self._finish_request(i, finished_tokens[i], now)
            else:
                self._kv[i] = kv
                self._context[i] = self._prompt[i] + max(produced - 1, 0)
                self._produced[i] = produced
        if finished:
            done = set(finished)
            self._running = [i for i in self._running if i not in done]
        if duration > 0:
            self._last_iteration = last_iteration_row(now, duration, prefill_tokens, decode_tokens, batch_kv, attention)
        return IterationOutcome(
            start_time=start, duration=duration, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
            batch_kv_tokens=batch_kv, admitted=np.array(executed.admitted, dtype=np.int64),
            finished=np.array(finished, dtype=np.int64), evicted=evicted,
            deferred=np.array(executed.deferred, dtype=np.int64),
            kv_tokens_used=int(self._kv[self._retired:self._n].sum()), kv_blocks_used=adapter.used_blocks(scheduler),
            peak_blocks_used=executed.peak_used_blocks, capacity_blocks=self._capacity)

    def _finish_request(self, i: int, produced: int, now: float) -> None:
        expected = int(self._output[i]) + 1
        self._status[i], self._kv[i], self._finish[i] = FINISHED, 0, now
        self._context[i] = self._prompt[i] + self._output[i]
        self._produced[i] = produced
        self._num_finished += 1
        self._requests.pop(i, None)
        if produced != expected:
            raise self._failure(f"request {i} finished with {produced} tokens, but the workload asked for "
                                f"{expected} (output {expected - 1} + the prefill's first token)")

    def _failure(self, message: str) -> EngineFailure:
        """Record why the engine failed and shut it down now. An engine left to the garbage collector shuts
        down whenever it is collected, and vLLM's shutdown tears down process-wide state (its parallel
        groups) that a newer engine in the same process is using."""
        self._failed = message
        self.close()
        return EngineFailure(message)

    def _reconcile_after_failure(self) -> None:
        """After vLLM raised, make the records say where each request was (no request is lost)."""
        for i, request in list(self._requests.items()):
            if self._status[i] == FINISHED:
                continue
            running = adapter.is_running(request)
            self._status[i] = RUNNING if running else WAITING
            self._kv[i] = adapter.computed_tokens(request) if running else 0
        kept = [i for i in self._running if self._status[i] == RUNNING]
        # Requests vLLM admitted in the iteration that failed run now, but were never appended to the running list
        # (admissions are recorded after a step returns): after the ones that ran before, in admission (id) order.
        known = set(kept)
        self._running = kept + sorted(i for i in self._requests if self._status[i] == RUNNING and i not in known)
        self._num_waiting = int(np.count_nonzero(self._status[self._retired:self._n] == WAITING))

    def advance_to(self, time_s: float) -> None:
        """Let engine time pass until ``time_s`` (slept through with ``pace=True``)."""
        if not math.isfinite(time_s):
            raise ValueError(f"cannot advance the clock to {time_s!r}")
        if self._pace:
            lag = time_s - (time.perf_counter() - self._wall_start)
            if lag > 0:
                time.sleep(lag)
        self._now = max(self._now, float(time_s))

    def retire_finished(self) -> RequestRecords:
        """Hand over the records of the finished requests before every unfinished one, and free their rows
        (see :meth:`llmsched_env.simulator.SimulatedEngine.retire_finished`)."""
        records, self._retired = retire_rows(self, _COLUMNS, self._retired, self._n)
        return records

    def records(self) -> RequestRecords:
        """The records of the requests not retired yet (every request, until some are retired)."""
        return records_of(self, self._retired, self._n)

    def produced_tokens(self) -> np.ndarray:
        """Tokens vLLM returned per request not retired yet (``o + 1`` for every finished one; checked as each
        finishes)."""
        return self._produced[self._retired:self._n].copy()

    def close(self) -> None:
        """Release the engine's memory (the engine cannot step afterwards)."""
        self._failed = self._failed or "the engine was closed"
        llm, self._llm = self._llm, None
        if llm is None:
            return
        shutdown = getattr(getattr(llm, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
