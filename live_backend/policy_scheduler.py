"""``PolicyScheduler``: WAIT, Nested WAIT, any registered policy or a trained agent scheduling inside ``vllm serve``.

    vllm serve MODEL --scheduler-cls live_backend.policy_scheduler.PolicyScheduler \\
        --additional-config '{"llmsched": {"policy": "nested-wait-adaptive"}}' --no-enable-prefix-caching

(``llmsched serve MODEL --policy NAME`` writes this command.) vLLM creates the scheduler inside its engine
process; at every ``schedule()`` it asks the policy for the next iteration's decision on
:class:`~live_backend.served_requests.ServedRequests` and has :class:`~live_backend.scheduler.DecisionScheduler`
execute it: the same decision path as the in-process live backend, so a policy valid there is valid here.

* **Settings** (:mod:`live_backend.serve_settings`) are checked whole when the scheduler is created, with the
  KV cache's capacity and block size taken from vLLM's own cache; a bad one stops the server at start, naming it.
* **Prefix caching must be off.** The policies' memory model gives each request its own KV blocks; a cached
  prefix shared between requests would make vLLM's block count disagree with it (``llmsched serve`` passes
  ``--no-enable-prefix-caching``; a server started without it is refused at start).
* **Never lose a request.** If the policy raises, or returns a decision the engine's rules refuse, that
  iteration is scheduled by vLLM's own scheduler; the event is logged and counted (:class:`ServeCounters`),
  the request view is reconciled with vLLM's, and serving goes on.
* **Warm-up.** The policy's compiled kernels are loaded (compiled on a first start, read from Numba's cache
  afterwards) by a short simulated run through the policy's Python decisions before the server takes traffic.
* **Time** is the engine process's monotonic clock, in seconds since the scheduler started; nothing reads a
  horizon (see :mod:`live_backend.serve_settings`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request, RequestStatus

from live_backend import vllm_adapter as adapter
from live_backend.scheduler import DecisionScheduler, ExecutableDecision
from live_backend.serve_settings import build_serve_policy, parse_serve_settings, serve_scenario, warm_up
from live_backend.served_requests import ServedRequests
from llmsched_env.cost_model import prefill_attention
from llmsched_env.errors import ConfigError
from llmsched_env.report import write_text_atomically
from llmsched_env.request_table import validated_batch

# Under vLLM's logger, so that its handlers and format (and VLLM_LOGGING_LEVEL) apply.
logger = logging.getLogger("vllm.llmsched")


@dataclass
class ServeCounters:
    """What the scheduler did since it started: its own decisions, the iterations that fell back to vLLM's, and the
    time its decisions and bookkeeping took against vLLM's own ``schedule()``."""

    policy: str = ""
    iterations: int = 0  # calls of schedule()
    decisions: int = 0  # iterations the policy decided
    fallbacks: int = 0  # iterations vLLM's own scheduler decided, because the policy's decision failed
    last_fallback: str = ""  # why, the last time
    named_preemptions: int = 0  # evictions the policy decided
    engine_preemptions: int = 0  # vLLM's own, when a request the policy scheduled found no free block
    arrived: int = 0
    finished: int = 0
    aborted: int = 0
    running_sum: int = 0  # running requests summed over the iterations (their mean: / iterations)
    policy_seconds: float = 0.0  # the policy's decide() and the request view's upkeep
    schedule_seconds: float = 0.0  # vLLM's schedule() executing the decision (or its own, on a fallback)
    engine_vs_profile: float | None = None  # an adaptive policy's measured / predicted iteration time (30 s)
    cost_factor: float = 1.0  # and the factor it plans with (1 within 10 %: the profile as given)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        iterations = max(self.iterations, 1)
        values.update(mean_running=self.running_sum / iterations,
                      policy_us_per_iteration=1e6 * self.policy_seconds / iterations,
                      schedule_us_per_iteration=1e6 * self.schedule_seconds / iterations)
        return values


class PolicyScheduler(DecisionScheduler):
    """vLLM's V1 scheduler with an llmsched policy deciding every iteration (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        settings = parse_serve_settings(getattr(self.vllm_config, "additional_config", None))
        if self.cache_config.enable_prefix_caching:
            raise ConfigError("llmsched's PolicyScheduler needs prefix caching off (its memory model gives each "
                              "request its own KV blocks): start vLLM with --no-enable-prefix-caching, as "
                              "`llmsched serve` does")
        capacity, block = adapter.capacity_blocks(self), adapter.block_size(self)
        max_len = int(self.vllm_config.model_config.max_model_len)
        if capacity * block < max_len:
            raise ConfigError(f"vLLM's KV cache holds {capacity} blocks of {block} tokens ({capacity * block} "
                              f"tokens), less than one request of max_model_len {max_len}: lower --max-model-len "
                              f"to at most {capacity * block} or give the cache more memory")
        device = adapter.platform_device()
        self.settings = settings
        self.native = settings.native
        self.counters = ServeCounters(policy="vllm (its own scheduler)" if self.native else "")
        self._stats_file = Path(settings.stats_file) if settings.stats_file else None
        self._stop_writing = threading.Event()
        self._log_lock = threading.Lock()  # the stats thread flushes the log the engine's thread writes
        self._iteration_log = None
        self._composition: tuple[int, int, int, float] | None = None  # of the batch schedule() just sent
        self._sent_at = 0.0
        if settings.iteration_log:
            self._iteration_log = open(settings.iteration_log, "a", buffering=1 << 16)  # noqa: SIM115 - shutdown()
            self._iteration_log.write(json.dumps({"capacity_blocks": capacity, "block_size": block,
                                                  "model": str(self.vllm_config.model_config.model)}) + "\n")
        self.view = ServedRequests(capacity, block, lengths_known=settings.lengths_known, max_model_len=max_len)
        self._started = time.monotonic()
        if self.native:
            self._keep_writing_stats()
            logger.info("llmsched: vLLM's own scheduler, timed (%d KV blocks of %d tokens)", capacity, block)
            return
        self.scenario = serve_scenario(settings, capacity_tokens=capacity * block, block_size=block, device=device)
        self.policy = build_serve_policy(settings, self.scenario)
        self.counters.policy = self.policy.name
        try:
            warm = warm_up(settings, capacity * block, block, device)
        except Exception as error:  # noqa: BLE001 - a policy that fails now and then is served, with fallbacks
            warm = math.nan
            logger.warning("llmsched: %s failed in its warm-up (%s: %s); serving it, with vLLM scheduling the "
                           "iterations where it fails", self.policy.name, type(error).__name__, error)
        self.policy.reset(self.view)
        self._started = time.monotonic()
        self._keep_writing_stats()
        logger.info("llmsched: serving with %s (lengths %s, %d KV blocks of %d tokens; warmed up in %.1f s)",
                    self.policy.name, settings.lengths, capacity, block, warm)

    def index_of(self, request: Request) -> int:
        return self.view.index_of(request.request_id)

    def _clock(self) -> float:
        return time.monotonic() - self._started

    # -- requests in and out -----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:  # (a known id is a streaming request's next input)
            self.counters.arrived += 1
            if not self.native:
                # Never too large here: vLLM's API server keeps prompt + max_tokens within max_model_len, which the
                # start check keeps within the KV cache.
                self.view.arrive(request.request_id, request.num_prompt_tokens, request.max_tokens, self._clock())
        super().add_request(request)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):  # type: ignore[no-untyped-def]
        # The one path every leaving request takes: a finish (update_from_output) or an abort (finish_requests).
        aborted = request.status == RequestStatus.FINISHED_ABORTED
        if self.native or request.request_id in self.view:  # (vLLM may free a request twice: count it once)
            self.counters.aborted += aborted
            self.counters.finished += not aborted
        self.view.finished(request.request_id, adapter.output_tokens(request), self._clock(), aborted=aborted)
        return super()._free_request(request, delay_free_blocks)

    # -- the iteration ---------------------------------------------------------------------------------------------
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        output = self._schedule_iteration(throttle_prefills)
        if (self._iteration_log is not None or not self.native) and output.total_num_scheduled_tokens:
            # What the iteration log records, and what the view shows a policy that follows the engine's speed.
            self._composition = self._batch_composition(output)
            self._sent_at = time.perf_counter()
        return output

    def _batch_composition(self, output: SchedulerOutput) -> tuple[int, int, int, float]:
        """``(prefill tokens, decode requests, KV tokens, prefill attention)`` of the batch ``output`` sends."""
        prefill = decodes = kv = 0
        attention = 0.0
        for request_id, tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            computed = adapter.computed_tokens(request)  # after this iteration (vLLM counts them at schedule time)
            before = computed - tokens
            kv += computed
            if before < request.num_prompt_tokens:
                prefill += tokens
                attention += float(prefill_attention(tokens, before))
            else:
                decodes += 1
        return prefill, decodes, kv, attention

    def _schedule_iteration(self, throttle_prefills: bool) -> SchedulerOutput:
        started = time.perf_counter()
        now = self._clock()
        self.view.set_now(now)
        self.counters.iterations += 1
        if self.native:  # vLLM's own scheduler, timed
            self.counters.running_sum += len(self.running)
            output = DecisionScheduler.schedule(self, throttle_prefills)
            self.counters.schedule_seconds += time.perf_counter() - started
            return output
        try:
            decision = self.policy.decide(self.view.state(adapter.used_blocks(self)))
            status, prompt, context, kv, mark = self.view.columns()
            batch = validated_batch(decision, self.view.num_requests, status, prompt, context, kv, mark)
        except Exception as error:  # noqa: BLE001 - a policy's fault must not stop the server
            self.counters.policy_seconds += time.perf_counter() - started
            return self._fall_back(f"{type(error).__name__}: {error}", throttle_prefills)
        self.pending_decision = ExecutableDecision(
            decode=frozenset(batch.decode.tolist()), prefill=dict(zip(batch.prefill.tolist(), batch.chunk.tolist())),
            preempt=tuple(batch.preempt.tolist()))
        decided = time.perf_counter()
        self.counters.policy_seconds += decided - started
        try:
            output = super().schedule(throttle_prefills)
        except Exception as error:  # noqa: BLE001 - DecisionScheduler restores vLLM's queues before raising
            self.pending_decision = None
            self.counters.schedule_seconds += time.perf_counter() - decided
            return self._fall_back(f"executing the decision raised {type(error).__name__}: {error}",
                                   throttle_prefills)
        self.counters.schedule_seconds += time.perf_counter() - decided
        executed, self.last_executed = self.last_executed, None
        kept = time.perf_counter()
        self.counters.decisions += 1
        self.counters.running_sum += self.view.num_running
        if executed is not None:
            named = len(batch.preempt)
            self.counters.named_preemptions += named
            self.counters.engine_preemptions += len(executed.preempted) - named
            self.view.preempted(executed.preempted)
            self.view.admitted(executed.admitted)
        self.counters.policy_seconds += time.perf_counter() - kept
        return output

    def _fall_back(self, why: str, throttle_prefills: bool) -> SchedulerOutput:
        """This iteration is vLLM's own; the view is made to agree with it afterwards."""
        self.counters.fallbacks += 1
        self.counters.last_fallback = why
        logger.warning("llmsched: %s's decision failed (%s); vLLM schedules this iteration (%d fallbacks so far)",
                       self.policy.name, why, self.counters.fallbacks)
        started = time.perf_counter()
        output = DecisionScheduler.schedule(self, throttle_prefills)  # no pending decision: vLLM's scheduler
        self.counters.schedule_seconds += time.perf_counter() - started
        self.view.reconcile([request.request_id for request in self.running],
                            {request_id: (adapter.computed_tokens(request), adapter.output_tokens(request))
                             for request_id, request in self.requests.items()})
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        if self._composition is not None:
            prefill, decodes, kv, attention = self._composition
            seconds = time.perf_counter() - self._sent_at
            if self._iteration_log is not None:
                line = json.dumps({"prefill_tokens": prefill, "decode_requests": decodes, "kv_tokens": kv,
                                   "prefill_attention": attention, "duration_s": seconds})
                with self._log_lock:
                    self._iteration_log.write(line + "\n")
            if not self.native:
                self.view.iteration_ran(self._clock(), seconds, prefill, decodes, kv, attention)
            self._composition = None
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.native:
            return outputs
        started = time.perf_counter()
        now = self._clock()
        self.view.set_now(now)
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is not None and request_id in self.view:  # finished ones left through _free_request
                self.view.progressed(self.view.index_of(request_id), adapter.computed_tokens(request),
                                     adapter.output_tokens(request), now)
        self.counters.policy_seconds += time.perf_counter() - started
        return outputs

    def _keep_writing_stats(self) -> None:
        """Write the stats now, then every second from a daemon thread, whether or not the engine is busy (an idle
        engine calls no ``schedule()``, and a server stopped by a signal may never reach :meth:`shutdown`)."""
        self.write_stats()
        if self._stats_file is None and self._iteration_log is None:
            return

        def keep() -> None:
            while not self._stop_writing.wait(1.0):
                self.write_stats()

        threading.Thread(target=keep, name="llmsched-stats", daemon=True).start()

    def write_stats(self) -> None:
        """Write the counters to the settings' ``stats_file`` (atomically: a reader never sees half a file), and
        flush the iteration log."""
        with self._log_lock:
            if self._iteration_log is not None:
                self._iteration_log.flush()
        follower = getattr(getattr(self.policy, "learning", None), "follower", None)
        if follower is not None:  # read between iterations; a torn read only delays a figure by a second
            ratio = follower.measured_ratio
            self.counters.engine_vs_profile = None if math.isnan(ratio) else ratio
            self.counters.cost_factor = follower.factor
        if self._stats_file is not None:
            write_text_atomically(self._stats_file, json.dumps(self.counters.as_dict(), indent=2) + "\n")

    def shutdown(self) -> None:
        self._stop_writing.set()
        self.write_stats()
        with self._log_lock:
            if self._iteration_log is not None:
                self._iteration_log.close()
                self._iteration_log = None
        logger.info("llmsched: %s", json.dumps(self.counters.as_dict()))
        super().shutdown()
