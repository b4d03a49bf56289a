"""The engines' own schedulers: vLLM's FCFS with recompute preemption, and Sarathi-Serve's chunked prefill.

Both are first-come-first-served with greedy admission; they differ in how prefills share an
iteration with decodes. One implementation, :class:`FCFSPolicy`, with two presets:

``vllm`` — vLLM with chunked prefill disabled (``enable_chunked_prefill=False``):
    * every running request decodes each iteration (oldest first);
    * if their next tokens do not fit in the KV cache, the newest-admitted running requests are
      preempted by recompute until they do (vLLM's ``preemption_mode="recompute"``; the engine
      applies that rule), and no new request is admitted in that iteration;
    * otherwise waiting requests are admitted in FCFS order, whole prompts only, while the running
      set stays within ``max_num_seqs``, the prefill tokens within ``max_num_batched_tokens``, and at
      least ``watermark`` of the KV blocks stay free (vLLM's block-manager watermark, default 0.01).
      Admission stops at the first request that does not fit (no skipping: FCFS). Without chunking vLLM
      requires ``max_num_batched_tokens >= max_model_len``, so any prompt fits the budget; here a prompt
      longer than the budget is admitted as the iteration's only prefill.

``vllm-v0`` — vLLM as Vidur simulates it for the paper's experiments (``vidur/scheduler/replica_scheduler/
    vllm_replica_scheduler.py`` and ``vidur/config/config.py``): an iteration in which waiting prompts can be
    admitted runs those prefills only (running requests' decodes wait, ``prefill_first``); a prefill batch
    counts as its requests times its longest prompt against ``max_tokens_in_batch = 4096``
    (``padded_prefill``); at most ``batch_size_cap = 128`` requests hold memory (``max_num_seqs=128``);
    admission keeps 1 % of the blocks free.

``sarathi-512`` — Sarathi as Vidur simulates it (``sarathi_replica_scheduler.py``): decodes and chunks share a
    512-token budget (a decode counts one token), at most 128 requests hold memory, and a new request's whole
    prompt is reserved on admission against the 1 % watermark, as Vidur allocates it (``reserve_prompt``).

``sarathi`` — Sarathi-Serve's stall-free batching (vLLM with ``enable_chunked_prefill=True``):
    * decodes first, then the continuation of partially prefilled requests, then new admissions,
      all under a per-iteration token budget (``max_num_batched_tokens``; Sarathi-Serve's and vLLM's
      chunked default 2048), the last prefill cut to a chunk that fills the budget.

Knob mapping (vLLM engine arguments): ``max_num_seqs`` → ``max_num_seqs``;
``max_num_batched_tokens`` → ``max_num_batched_tokens``; ``chunked_prefill`` →
``enable_chunked_prefill``; ``watermark`` → the block manager's ``watermark``. Both presets batch
prefills with decodes, as vLLM's V1 scheduler does. Defaults, against vLLM's own
(``EngineArgs.get_batch_defaults``): ``max_num_seqs = 1024``, vLLM's default on GPUs of 70 GiB or more
other than the A100 — on an A100 vLLM defaults to 256, which would cap the ≈ 500-request batches the
default workload runs at ρ = 0.9 and make the comparison about a cap rather than about admission
under memory (pass ``max_num_seqs=256`` for the A100 default). Without chunking
``max_num_batched_tokens = 4096``, vLLM's ``max_model_len`` for Llama-2; with chunking (Sarathi) 2048,
vLLM's OpenAI-server default on an A100 and Sarathi-Serve's usual budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from baselines.cohorts import fill_in_order
from llmsched_env import compiled_run
from llmsched_env.compiled import borrowed, compiled, compiled_inlined
from llmsched_env.compiled_run import GO_ON, ChunkArrays, RunState, oldest_waiting
from llmsched_env.engine import IDLE, Decision, Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.iteration import NUM_WAITING, USED_BLOCKS, EngineParams
from llmsched_env.policy import CompiledLoop
from llmsched_env.request_table import RequestColumns

_NONE = np.empty(0, dtype=np.int64)
_UNLIMITED = np.iinfo(np.int64).max
_sum, _cumsum, _all = np.add.reduce, np.add.accumulate, np.logical_and.reduce


@dataclass
class FCFSPolicy:
    """FCFS admission with recompute preemption; see the module docstring for the two presets."""

    name: str = "vllm"
    max_num_seqs: int = 1024
    max_num_batched_tokens: int | None = 4096
    chunked_prefill: bool = False
    watermark: float = 0.01
    prefill_first: bool = False
    padded_prefill: bool = False  # Vidur's vLLM: a prefill batch costs (requests × longest prompt) budget tokens
    reserve_prompt: bool = False  # Vidur: a request's whole prompt is allocated when it is admitted

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1 or None, got {self.max_num_batched_tokens}")
        if not 0 <= self.watermark < 1:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.prefill_first and self.chunked_prefill:
            raise ConfigError("prefill_first is vLLM V0's rule without chunking; "
                              "it cannot be combined with chunked_prefill")
        if self.padded_prefill and self.chunked_prefill:
            raise ConfigError("padded_prefill counts whole prompts (Vidur's vLLM); "
                              "it cannot be combined with chunked_prefill")
        self._watermark_blocks = 0  # sized to the engine's capacity by reset()

    def reset(self, engine: Engine) -> None:
        self._watermark_blocks = int(self.watermark * engine.capacity_blocks)

    def compiled_loop(self) -> CompiledLoop:
        """This policy's rule compiled (:func:`run_fcfs`): the same decisions as :meth:`decide`, bit for bit."""
        rule = FCFSRule(self.max_num_seqs,
                        _UNLIMITED if self.max_num_batched_tokens is None else self.max_num_batched_tokens,
                        self.chunked_prefill, self._watermark_blocks, self.prefill_first, self.padded_prefill,
                        self.reserve_prompt)
        return lambda run, running, columns, arrivals, engine: run_fcfs(run, running, columns, arrivals, engine, rule)

    def decide(self, state: SchedulerState) -> Decision:
        if self.prefill_first:
            admitted = self._prefill_only(state)
            if admitted is not None:
                return admitted
        running = state.running
        kv = state.kv_tokens[running]
        ready = state.context_len[running] == kv
        budget = self.max_num_batched_tokens if self.max_num_batched_tokens is not None else _UNLIMITED
        all_ready = bool(_all(ready))
        decode, decode_kv = (running, kv) if all_ready else (running[ready], kv[ready])
        if self.chunked_prefill:
            if len(decode) > budget:
                decode, decode_kv = decode[:budget], decode_kv[:budget]  # the oldest decode; the rest pause
            left = budget - len(decode)
        else:
            left = budget  # without chunking the budget bounds prefill tokens (vLLM: >= max_model_len)
        growth = int(np.count_nonzero(decode_kv % state.block_size == 0))

        partial, partial_chunk = _NONE, _NONE
        if not all_ready:
            # Requests partway through a chunked prefill continue, oldest first.
            partial, partial_kv = running[~ready], kv[~ready]
            partial_chunk = fill_in_order(state.context_len[partial] - partial_kv, left, allow_partial=True)
            granted = partial_chunk > 0
            partial, partial_kv, partial_chunk = partial[granted], partial_kv[granted], partial_chunk[granted]
            left -= int(_sum(partial_chunk))
            # With reserve_prompt the rest of every partial prompt is already taken (Vidur allocated it on admission).
            end = state.context_len[running[~ready]] if self.reserve_prompt else partial_kv + partial_chunk
            kv_now = kv[~ready] if self.reserve_prompt else partial_kv
            growth += int(_sum(state.blocks_for(end)) - _sum(state.blocks_for(kv_now)))

        free = state.free_blocks - growth
        slots = self.max_num_seqs - len(running)
        if free < 0 or slots <= 0 or left <= 0:
            # free < 0: the engine preempts the newest running requests; vLLM admits nothing then.
            return self._decision(decode, partial, partial_chunk)
        waiting, chunk = self._admissions(state, state.oldest_waiting(slots), left, free)
        if len(waiting) == 0:
            return self._decision(decode, partial, partial_chunk)
        return self._decision(decode, np.concatenate([partial, waiting]), np.concatenate([partial_chunk, chunk]))

    def _admissions(self, state: SchedulerState, waiting: np.ndarray, budget: int,
                    free: int) -> tuple[np.ndarray, np.ndarray]:
        """The FCFS prefix of ``waiting`` admitted within ``budget`` prefill tokens and ``free`` blocks (less the
        watermark), and its chunks."""
        if len(waiting) == 0:
            return waiting, _NONE
        context = state.context_len[waiting]
        if self.padded_prefill:
            # Vidur's vLLM: k prompts cost k × the longest of them; the cost only grows along the queue.
            padded = np.arange(1, len(context) + 1) * np.maximum.accumulate(context)
            chunk = np.where(np.arange(len(context)) < np.searchsorted(padded, budget, side="right"), context, 0)
        else:
            chunk = fill_in_order(context, budget, allow_partial=self.chunked_prefill)
        if chunk[0] == 0 and not self.chunked_prefill:
            chunk[0] = context[0]  # longer than the budget: vLLM's budget is >= any prompt, so it goes alone
        count = int(np.count_nonzero(chunk))
        blocks = _cumsum(state.blocks_for(context[:count] if self.reserve_prompt else chunk[:count]))
        count = int(np.searchsorted(blocks, free - self._watermark_blocks, side="right"))
        if count == 0 and len(state.running) == 0 and state.used_blocks == 0:
            count = 1  # an empty engine always takes the head of the queue (it is known to fit)
        return waiting[:count], chunk[:count]

    def _prefill_only(self, state: SchedulerState) -> Decision | None:
        """vLLM V0: an iteration that can admit waiting prompts runs those prefills alone (decodes wait).
        ``None`` when nothing can be admitted."""
        slots = self.max_num_seqs - len(state.running)
        budget = self.max_num_batched_tokens if self.max_num_batched_tokens is not None else _UNLIMITED
        waiting, chunk = self._admissions(state, state.oldest_waiting(slots), budget, state.free_blocks)
        return Decision(prefill=waiting, prefill_tokens=chunk) if len(waiting) else None

    @staticmethod
    def _decision(decode: np.ndarray, prefill: np.ndarray, chunk: np.ndarray) -> Decision:
        if len(decode) == 0 and len(prefill) == 0:
            return IDLE
        return Decision(decode=decode, prefill=prefill, prefill_tokens=chunk)


class FCFSRule(NamedTuple):
    """:class:`FCFSPolicy`'s settings as its compiled rule takes them (the budget ``int64`` max when unlimited)."""

    max_num_seqs: int
    budget: int
    chunked_prefill: bool
    watermark_blocks: int
    prefill_first: bool
    padded_prefill: bool
    reserve_prompt: bool


@compiled_inlined
def _fill_in_order(sizes: np.ndarray, budget: int, allow_partial: bool) -> np.ndarray:
    """:func:`baselines.cohorts.fill_in_order`, compiled."""
    grant = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) == 0 or budget <= 0:
        return grant
    total = 0
    for j in range(len(sizes)):
        if total + sizes[j] > budget:
            if allow_partial:
                grant[j] = budget - total
            break
        total += sizes[j]
        grant[j] = sizes[j]
    return grant


@compiled_inlined
def _admissions(rule: FCFSRule, waiting: np.ndarray, budget: int, free: int, context_len: np.ndarray,
                empty_engine: bool, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`FCFSPolicy._admissions`: the FCFS prefix of ``waiting`` admitted within ``budget`` prefill tokens
    and ``free`` blocks (less the watermark), and its chunks."""
    if len(waiting) == 0:
        return waiting, waiting[:0]
    context = context_len[waiting]
    if rule.padded_prefill:
        chunk = np.zeros(len(context), dtype=np.int64)
        longest = 0
        for j in range(len(context)):
            longest = max(longest, context[j])
            if (j + 1) * longest > budget:
                break
            chunk[j] = context[j]
    else:
        chunk = _fill_in_order(context, budget, rule.chunked_prefill)
    if chunk[0] == 0 and not rule.chunked_prefill:
        chunk[0] = context[0]  # longer than the budget: vLLM's budget is >= any prompt, so it goes alone
    count = 0
    while count < len(chunk) and chunk[count] != 0:
        count += 1
    limit = free - rule.watermark_blocks
    blocks, fitting = 0, 0
    while fitting < count:
        size = context[fitting] if rule.reserve_prompt else chunk[fitting]
        blocks += -(-size // block_size)
        if blocks > limit:
            break
        fitting += 1
    if fitting == 0 and empty_engine:
        fitting = 1  # an empty engine always takes the head of the queue (it is known to fit)
    return waiting[:fitting], chunk[:fitting]


@compiled
def fcfs_decision(rule: FCFSRule, running: np.ndarray, columns: RequestColumns, counters: np.ndarray,
                  engine: EngineParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`FCFSPolicy.decide`, compiled: ``(decode, prefill, prefill_tokens)``, all empty to wait."""
    block_size = engine.block_size
    free_blocks = engine.capacity_blocks - counters[USED_BLOCKS]
    empty_engine = len(running) == 0 and counters[USED_BLOCKS] == 0
    slots = rule.max_num_seqs - len(running)
    nothing = running[:0]  # a view: an empty array without an allocation
    if rule.prefill_first:
        waiting, chunk = _admissions(rule, oldest_waiting(counters, columns.status, slots), rule.budget,
                                     free_blocks, columns.context, empty_engine, block_size)
        if len(waiting):
            return nothing, waiting, chunk
    kv_tokens, context = columns.kv_tokens, columns.context
    num_ready = 0
    for i in running:
        if kv_tokens[i] == context[i]:
            num_ready += 1
    decode = np.empty(num_ready, dtype=np.int64)
    partial = np.empty(len(running) - num_ready, dtype=np.int64)
    d = p = 0
    for i in running:
        if kv_tokens[i] == context[i]:
            decode[d] = i
            d += 1
        else:
            partial[p] = i
            p += 1
    budget = rule.budget
    if rule.chunked_prefill:
        if len(decode) > budget:
            decode = decode[:budget]  # the oldest decode; the rest pause
        left = budget - len(decode)
    else:
        left = budget  # without chunking the budget bounds prefill tokens (vLLM: >= max_model_len)
    growth = 0
    for i in decode:
        if kv_tokens[i] % block_size == 0:
            growth += 1
    partial_chunk = nothing
    if len(partial):
        # Requests partway through a chunked prefill continue, oldest first.
        grants = _fill_in_order(context[partial] - kv_tokens[partial], left, True)
        granted = grants > 0
        if rule.reserve_prompt:  # the rest of every partial prompt is already taken (Vidur)
            for i in partial:
                growth += -(-context[i] // block_size) - (-(-kv_tokens[i] // block_size))
        partial, partial_chunk = partial[granted], grants[granted]
        for j in range(len(partial)):
            left -= partial_chunk[j]
            if not rule.reserve_prompt:
                held = kv_tokens[partial[j]]
                growth += -(-(held + partial_chunk[j]) // block_size) - (-(-held // block_size))
    free = free_blocks - growth
    if free < 0 or slots <= 0 or left <= 0:
        # free < 0: the engine preempts the newest running requests; vLLM admits nothing then.
        return decode, partial, partial_chunk
    if counters[NUM_WAITING] == 0:
        return decode, partial, partial_chunk
    waiting, chunk = _admissions(rule, oldest_waiting(counters, columns.status, slots), left, free,
                                 columns.context, empty_engine, block_size)
    if len(waiting) == 0:
        return decode, partial, partial_chunk
    return decode, np.concatenate((partial, waiting)), np.concatenate((partial_chunk, chunk))


@compiled
def run_fcfs(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
             engine: EngineParams, rule: FCFSRule) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:class:`FCFSPolicy`'s compiled loop (see :data:`~llmsched_env.policy.CompiledLoop`), on borrowed views of
    what the caller owns (:func:`~llmsched_env.compiled.borrowed`)."""
    return _fcfs_iterations(borrowed(run), running, borrowed(columns), borrowed(arrivals), borrowed(engine),
                            borrowed(rule))


@compiled
def _fcfs_iterations(run: RunState, running: np.ndarray, columns: RequestColumns, arrivals: ChunkArrays,
                     engine: EngineParams, rule: FCFSRule
                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    nothing = np.empty(0, dtype=np.int64)
    while True:
        stop = compiled_run.begin(run, columns, arrivals)
        if stop != GO_ON:
            return stop, running, nothing, nothing, nothing
        decode, prefill, chunk = fcfs_decision(rule, running, columns, run.counters, engine)
        stop, running, _, _, _ = compiled_run.apply(decode, prefill, chunk, running, run, columns, arrivals, engine)
        if stop != GO_ON:
            return stop, running, decode, prefill, chunk


def vllm_policy(**overrides: object) -> FCFSPolicy:
    """vLLM's default scheduler without chunked prefill (see module docstring)."""
    return FCFSPolicy(**{"name": "vllm", **overrides})  # type: ignore[arg-type]


def vllm_v0_policy(**overrides: object) -> FCFSPolicy:
    """vLLM as Vidur simulates it (the paper's baseline): prefill-only iterations whenever prompts can be
    admitted, prefill batches padded to their longest prompt within 4,096 tokens, at most 128 requests."""
    settings: dict[str, object] = {"name": "vllm-v0", "prefill_first": True, "max_num_seqs": 128,
                                   "max_num_batched_tokens": 4096, "padded_prefill": True}
    return FCFSPolicy(**{**settings, **overrides})  # type: ignore[arg-type]


def sarathi_vidur_policy(**overrides: object) -> FCFSPolicy:
    """Sarathi as Vidur simulates it (the paper's baseline): 512-token budget shared by decodes and chunks,
    at most 128 requests, whole prompts reserved on admission."""
    settings: dict[str, object] = {"name": "sarathi-512", "chunked_prefill": True, "max_num_batched_tokens": 512,
                                   "max_num_seqs": 128, "reserve_prompt": True}
    return FCFSPolicy(**{**settings, **overrides})  # type: ignore[arg-type]


def sarathi_policy(**overrides: object) -> FCFSPolicy:
    """Sarathi-Serve chunked prefill: decodes first, 2048-token budget per iteration."""
    settings: dict[str, object] = {"name": "sarathi", "chunked_prefill": True, "max_num_batched_tokens": 2048}
    return FCFSPolicy(**{**settings, **overrides})  # type: ignore[arg-type]
