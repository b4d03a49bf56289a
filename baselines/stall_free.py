"""Stall-free batching: another rule's decision executed the way Sarathi-Serve batches, under a token budget.

WAIT and Nested WAIT decide *whom* to admit and which running requests advance; as written they prefill each
admission whole, in one iteration, so a long prompt stalls every decode in the batch for as long as it takes. Sarathi
(:mod:`baselines.fcfs`) decides *how* an iteration is filled: decodes first, then the continuation of prefills in
progress, then new admissions, all within ``max_num_batched_tokens`` (a decode counts one token), the last prefill
cut to a chunk that fills the budget. :func:`stall_free_batch` composes the two: the rule's admissions, in its order,
executed as Sarathi executes its own. Where every policy serves the load, this is what decides the tail latency (on
the suite's diurnal day at ρ 0.6, p99 13.4 s for Sarathi against 14.8–18.2 s for whole-prompt policies).

In overload the fixed budget costs throughput: every iteration pays the engine's fixed cost (``c0`` and the batch's
KV reads) for at most ``budget`` tokens, and where the queue holds minutes of work its wait, not the decodes' stalls,
makes the tail. With ``drain_iterations`` the budget follows the queue (:func:`backlog_budget`): raised to prefill
the waiting prompts within that many iterations when they outgrow it, the fixed budget otherwise.

With output lengths known, the rule's admissions can be served by their projected latency rather than in queue order
(:func:`latency_order`): where the tail is a heavy-tailed output mix's long decodes, a long request that waits its
turn behind short ones finishes last by its whole decode; served first, it overlaps its decode with their wait.

An admission the budget has no room for this iteration stays in the queue (the engine's deferral: nothing lost; a
rule that follows its queue finds it there again). Requests partway through a prefill never decode, whatever the
rule chose; they continue, oldest first, before anyone new is admitted.
"""

from __future__ import annotations

import math

import numpy as np

from llmsched_env.compiled import compiled, compiled_inlined
from llmsched_env.engine import IDLE, Decision, SchedulerState
from llmsched_env.errors import ConfigError

#: Sarathi-Serve's usual per-iteration token budget, and vLLM's chunked-prefill default (:func:`~baselines.fcfs.
#: sarathi_policy`).
SARATHI_TOKEN_BUDGET = 2048
#: The stall-free presets' drain (:func:`backlog_budget`): the budget grows once the queue's prompts would take
#: more than this many iterations of it. Chosen on the validation seeds 1000–1003 (``benchmarks/drain_trade.py``;
#: docs/agents.md, "Stall-free bases"): smaller drains take the diurnal day at ρ 0.8, whose tail waits, closer to
#: whole prefills' p99, and cost p99 where the tail is long outputs' decodes, which larger iterations stretch
#: (``azure-code-like`` at ρ 0.6); 128 keeps both within the judging table's margins there, and every cell where the
#: fixed budget pays unchanged.
DRAIN_ITERATIONS = 128
#: The stall-free WAIT preset's latency order (:func:`latency_order`): a remaining output token counts as this many
#: of the last iteration's seconds. Chosen on the validation seeds 1000–1009 between 1, 2 and 4 (docs/agents.md,
#: "Stall-free bases"): 1 is the projected latency at today's iteration time, but iterations grow while the queue
#: drains (the raised budget, larger batches), and 2 gives the lower p99 on the code workloads and trace.
LATENCY_ORDER = 2.0


@compiled
def scaled_budget(budget: int, scale: float) -> int:
    """A token budget times a residual agent's threshold ``scale`` (rounded half to even, at least 1): a scale above 1
    asks for larger batches, in tokens as in requests. 0 (whole prefills) stays 0; scale 1 is the budget itself."""
    if budget == 0 or scale == 1.0:
        return budget
    return max(1, int(np.rint(budget * scale)))


def check_batching(token_budget: int, drain_iterations: int, latency_order_weight: float = 0.0) -> None:
    """A clear error for a token budget, a drain or a latency order out of range (the WAIT family's ``reset``)."""
    if token_budget < 0:
        raise ConfigError(f"token_budget must be 0 (whole prefills) or a positive number of tokens per iteration, "
                          f"got {token_budget}")
    if drain_iterations < 0:
        raise ConfigError(f"drain_iterations must be 0 (a fixed token budget) or a positive number of iterations, "
                          f"got {drain_iterations}")
    if not (math.isfinite(latency_order_weight) and latency_order_weight >= 0):
        raise ConfigError(f"latency_order_weight must be 0 (queue order) or a finite positive weight of the remaining "
                          f"output, got {latency_order_weight}")


@compiled
def backlog_budget(budget: int, waiting: int, mean_prompt: float, drain_iterations: int) -> int:
    """The token budget of an iteration with ``waiting`` requests queued: ``budget``, raised to what prefills the
    queue's prompts (``waiting × mean_prompt`` tokens) within ``drain_iterations`` iterations when that is more.

    A small budget keeps decodes from stalling behind long prompts, but every iteration pays the engine's fixed
    cost (``c0`` and the batch's KV reads) for at most ``budget`` tokens: where the queue outgrows what the budget
    drains, chunking costs throughput and the queue's wait, not the decodes' stalls, makes the tail.
    ``drain_iterations`` 0 keeps the budget fixed; 0 (whole prefills) stays 0."""
    if budget == 0 or drain_iterations == 0:
        return budget
    return max(budget, int(math.ceil(waiting * mean_prompt / drain_iterations)))


@compiled
def latency_order(admit: np.ndarray, arrival: np.ndarray, prompt: np.ndarray, context: np.ndarray,
                  output: np.ndarray, seconds_per_token: float) -> np.ndarray:
    """``admit`` (ids, lengths known) by projected latency, largest first: ascending in the arrival time less the
    remaining decode, ``seconds_per_token`` per output token still to generate (``output - (context - prompt)``: an
    evicted request keeps what it generated). Ties keep ``admit``'s order.

    Stall-free batching serves the admissions in order while the budget lasts, so the order decides who waits: in
    queue order a long output admitted behind short ones finishes its decode last and makes the tail, where the
    short ones' latency, their wait and a few tokens, is far from it. ``seconds_per_token`` 0 is queue order."""
    if seconds_per_token == 0.0 or len(admit) < 2:
        return admit
    key = np.empty(len(admit), dtype=np.float64)
    for j in range(len(admit)):
        i = admit[j]
        key[j] = arrival[i] - seconds_per_token * (output[i] - (context[i] - prompt[i]))
    return admit[np.argsort(key, kind="mergesort")]


@compiled_inlined
def stall_free_batch(decode: np.ndarray, admit: np.ndarray, running: np.ndarray, context: np.ndarray,
                     kv_tokens: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """A rule's ``decode`` and ``admit`` (whole prefills) as one stall-free iteration within ``budget`` tokens:
    ``(decode, prefill, prefill_tokens, as_decided)``.

    * decode: the running requests of ``decode`` whose context is cached, in the batch's order (``running``), the
      oldest ``budget`` of them;
    * then every running request partway through a prefill, oldest first, granted what remains of its context
      while the budget lasts (the last grant a partial chunk);
    * then ``admit``, in the rule's order, likewise.

    ``as_decided``: the iteration is the rule's decision unchanged (every decode it chose, no prefill in progress,
    every admission whole), so that what the rule assumed of it holds (a compiled loop keeps its projection then).
    ``context`` and ``kv_tokens`` are every request's context length and cached tokens, by id. The Python rule and
    the compiled loop both call this function, so they batch alike by construction."""
    ready = np.empty(len(running), dtype=np.int64)
    partial = np.empty(len(running), dtype=np.int64)
    num_ready = num_partial = matched = 0
    as_decided = True
    # The rules give their decodes in the batch's order: one pass matches them (any other order is searched below).
    for i in running:
        pick = matched < len(decode) and decode[matched] == i
        matched += pick
        if kv_tokens[i] == context[i]:
            if pick:
                if num_ready < budget:
                    ready[num_ready] = i
                    num_ready += 1
                else:
                    as_decided = False  # a decode the budget has no room for pauses
        else:
            partial[num_partial] = i
            num_partial += 1
    if matched < len(decode):
        chosen = np.sort(decode)
        num_ready = 0
        as_decided = True
        for i in running:
            at = np.searchsorted(chosen, i)
            if at < len(chosen) and chosen[at] == i and kv_tokens[i] == context[i]:
                if num_ready < budget:
                    ready[num_ready] = i
                    num_ready += 1
                else:
                    as_decided = False
    as_decided = as_decided and num_partial == 0
    left = budget - num_ready
    prefill = np.empty(num_partial + len(admit), dtype=np.int64)
    chunk = np.empty(num_partial + len(admit), dtype=np.int64)
    count = 0
    for j in range(num_partial + len(admit)):
        if left <= 0:
            break
        i = partial[j] if j < num_partial else admit[j - num_partial]
        grant = min(context[i] - kv_tokens[i], left)
        prefill[count], chunk[count] = i, grant
        count += 1
        left -= grant
    if count < num_partial + len(admit) or (count and chunk[count - 1] < context[prefill[count - 1]] -
                                              kv_tokens[prefill[count - 1]]):
        as_decided = False  # an admission waits, or a prefill is cut to a chunk
    return ready[:num_ready], prefill[:count], chunk[:count], as_decided


def stall_free(decision: Decision, state: SchedulerState, budget: int) -> Decision:
    """``decision`` (whole prefills) batched stall-free within ``budget`` tokens (:func:`stall_free_batch`), or as
    it is with ``budget`` 0. It runs even when the rule would wait: prefills in progress continue."""
    if budget == 0:
        return decision
    decode, prefill, chunk, _ = stall_free_batch(np.asarray(decision.decode, dtype=np.int64),
                                                 np.asarray(decision.prefill, dtype=np.int64),
                                                 np.asarray(state.running, dtype=np.int64), state.context_len,
                                                 state.kv_tokens, budget)
    if len(decode) == 0 and len(prefill) == 0 and len(decision.preempt) == 0:
        return IDLE
    return Decision(decode=decode, prefill=prefill, prefill_tokens=chunk, preempt=decision.preempt)
