"""A vLLM V1 scheduler that executes llmsched decisions, loaded through vLLM's ``scheduler_cls`` option.

Each iteration it is handed an :class:`ExecutableDecision` (which requests decode, which prefill and
how many tokens, which to preempt) and makes vLLM's own ``Scheduler.schedule`` run exactly that:

* named preemptions are carried out first, by vLLM's recompute preemption;
* requests the decision does not name are set aside for the call (running ones stay *paused*,
  keeping their KV blocks; waiting ones stay queued), so vLLM schedules only the named ones;
* a prefill's chunk is capped per request through the scheduler's prefill-lookahead hook, so a
  chunk ends exactly where the decision says (a resumed request's recompute stops at the context
  the simulator's stage model assigns it, and its next token comes from a decode, as in the simulator).

Everything else stays vLLM's: block allocation, the KV-cache manager's accounting, and its own
preemptions when a named decode cannot get a block (newest running first), which the backend
reports as evictions. With no decision handed in, it is vLLM's scheduler unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from live_backend import vllm_adapter as adapter


@dataclass(frozen=True)
class ExecutableDecision:
    """One iteration's decision in the backend's request indices.

    Attributes:
        decode: running requests that compute one token each.
        prefill: requests to prefill (waiting ones are admitted) and the tokens each computes now.
        preempt: running requests to evict by recompute before the iteration.
    """

    decode: frozenset[int]
    prefill: dict[int, int]
    preempt: tuple[int, ...] = ()


@dataclass
class ExecutedIteration:
    """What vLLM's scheduler made of a decision."""

    scheduled_tokens: dict[int, int] = field(default_factory=dict)  # index -> tokens computed this iteration
    admitted: list[int] = field(default_factory=list)  # waiting requests that started running
    deferred: list[int] = field(default_factory=list)  # named admissions vLLM found no blocks for
    preempted: list[int] = field(default_factory=list)  # named preemptions, then vLLM's own
    peak_used_blocks: int = 0  # after allocation, before finished requests free their blocks


class DecisionScheduler(Scheduler):
    """vLLM's V1 ``Scheduler`` driven by one decision per iteration (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.pending_decision: ExecutableDecision | None = None
        self.last_executed: ExecutedIteration | None = None
        self._chunk_caps: dict[str, int] = {}

    def index_of(self, request: Request) -> int:
        """The decision's index of a vLLM request (the in-process backend's ids are the indices themselves)."""
        return adapter.request_index(request)

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        # The one per-request hook both of schedule()'s loops call on the token count: where the chunk cap goes.
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        cap = self._chunk_caps.get(request.request_id)
        return num_new_tokens if cap is None else min(num_new_tokens, cap)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        decision, self.pending_decision = self.pending_decision, None
        if decision is None:
            return super().schedule(throttle_prefills)
        executed = ExecutedIteration()
        by_index = {self.index_of(request): request for request in self.requests.values()}
        now = time.monotonic()
        for index in decision.preempt:
            adapter.preempt(self, by_index[index], now)
            executed.preempted.append(index)

        named = decision.decode | decision.prefill.keys()
        running_before = list(self.running)
        paused = [request for request in running_before if self.index_of(request) not in named]
        self.running = [request for request in running_before if self.index_of(request) in named]
        waiting_before = adapter.waiting_requests(self)
        admitting = [request for request in waiting_before if self.index_of(request) in decision.prefill]
        adapter.replace_waiting(self, admitting)
        self._chunk_caps = {by_index[index].request_id: tokens for index, tokens in decision.prefill.items()}
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self._chunk_caps = {}
            running_after = list(self.running)
            kept = set(map(id, running_after)) | set(map(id, paused))
            before_ids = set(map(id, running_before))
            # Admission order, as the simulator keeps it: the running list, then this iteration's admissions.
            self.running = ([request for request in running_before if id(request) in kept]
                            + [request for request in running_after if id(request) not in before_ids])
            admitting_ids = set(map(id, admitting))
            queue = adapter.waiting_requests(self) + [request for request in waiting_before
                                                      if id(request) not in admitting_ids]
            adapter.replace_waiting(self, sorted(queue, key=self.index_of))  # llmsched's queue order

        executed.scheduled_tokens = {self.index_of(self.requests[request_id]): tokens
                                     for request_id, tokens in output.num_scheduled_tokens.items()}
        for request in running_before:
            if request.status == RequestStatus.PREEMPTED and self.index_of(request) in named:
                executed.preempted.append(self.index_of(request))  # vLLM's own: no block for it
        for request in admitting:
            index = self.index_of(request)
            (executed.admitted if index in executed.scheduled_tokens else executed.deferred).append(index)
        executed.peak_used_blocks = adapter.used_blocks(self)
        self.last_executed = executed
        return output
