"""Compiled inner loops: the agent's interface (:mod:`llmsched_env.admission`) and the simulator's iteration.

An environment step scans the queue per class, sizes what fits, counts running requests per class and
stage bucket, projects their peak memory, and runs an engine iteration. As NumPy these are a few dozen
calls on arrays of a few hundred entries, where each call's fixed cost is most of its time; here each is
one pass, compiled by Numba (:func:`~llmsched_env.compiled.compiled`: cached once per environment, not per
process). ``tests/test_kernels.py`` checks them against plain NumPy references: integers exactly, floats
within a stated tolerance. Every path that must behave identically calls the same kernel for each floating-
point rule (the rate update, the attention sum, the iteration time, the observation), so the simulator's
compiled and NumPy paths (``tests/test_simulator.py``) and the environment's compiled step and Python loop
(``tests/test_episode.py``) give the same runs on any CPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from llmsched_env.compiled import compiled, compiled_inlined
from llmsched_env.engine import FINISHED, RUNNING, WAITING

if TYPE_CHECKING:  # pragma: no cover
    from llmsched_env.admission import ObservationScales
    from llmsched_env.request_table import RequestColumns


@compiled
def log_lengths(lengths: np.ndarray) -> np.ndarray:
    """``ln`` of each length (as :func:`nearest_type` takes a request's, so that equal lengths are at distance 0)."""
    logs = np.empty(len(lengths), dtype=np.float64)
    for k in range(len(lengths)):
        logs[k] = np.log(float(lengths[k]))
    return logs


@compiled
def nearest_type(prompt: int, output: int, log_type_prompt: np.ndarray, log_type_output: np.ndarray) -> int:
    """The index of the type nearest to a request ``(prompt, output)`` in log-length space, the one with
    ``|ln p − ln P_k| + |ln o − ln O_k|`` least (the first such type on a tie), the types given by the logarithms
    of their lengths."""
    log_prompt, log_output = np.log(float(prompt)), np.log(float(output))
    best, nearest = np.inf, 0
    for k in range(len(log_type_prompt)):
        distance = abs(log_prompt - log_type_prompt[k]) + abs(log_output - log_type_output[k])
        if distance < best:
            best, nearest = distance, k
    return nearest


@compiled
def nearest_types(prompt: np.ndarray, output: np.ndarray, log_type_prompt: np.ndarray,
                  log_type_output: np.ndarray) -> np.ndarray:
    """:func:`nearest_type` of each request."""
    nearest = np.empty(len(prompt), dtype=np.int64)
    for i in range(len(prompt)):
        nearest[i] = nearest_type(prompt[i], output[i], log_type_prompt, log_type_output)
    return nearest


@compiled
def waiting_ids(status: np.ndarray, start: int, n: int, num_waiting: int) -> tuple[np.ndarray, int]:
    """The queue of a simulator whose ``num_waiting`` waiting ids are all in ``start … n − 1``: ``(ids, start)``,
    the ids in queue order and where the next scan may start (the first waiting id, or ``n``)."""
    if num_waiting == n - start:
        return np.arange(start, n), start  # the common case: the queue is exactly the newest arrivals
    ids = np.empty(num_waiting, dtype=np.int64)
    count = 0
    for i in range(start, n):
        if status[i] == WAITING:
            ids[count] = i
            count += 1
    return ids[:count], (ids[0] if count else n)


@compiled
def first_waiting_ids(status: np.ndarray, start: int, n: int, limit: int) -> np.ndarray:
    """The first ``limit`` waiting ids from ``start`` on, in queue order: a scan that stops once it has them
    (its cost is ``limit`` plus the running and finished ids it passes, not the whole queue)."""
    ids = np.empty(limit, dtype=np.int64)
    count = 0
    i = start
    while i < n and count < limit:
        if status[i] == WAITING:
            ids[count] = i
            count += 1
        i += 1
    return ids[:count]


@compiled_inlined
def oldest_waiting(status: np.ndarray, start: int, n: int, num_waiting: int, limit: int) -> tuple[np.ndarray, int]:
    """The first ``limit`` (>= 0) ids of a simulator's queue whose ``num_waiting`` waiting ids are all in
    ``start … n − 1``, in queue order, and where the next scan may start (the first of them, when found)."""
    if num_waiting == n - start:  # the queue is exactly the newest arrivals
        return np.arange(start, min(n, start + limit)), start
    ids = first_waiting_ids(status, start, n, min(limit, num_waiting))
    return ids, (ids[0] if len(ids) else start)


@compiled_inlined
def count_arrivals(sums: np.ndarray, since: float, now: float, arrival_times: np.ndarray, classes: np.ndarray,
                   window: float) -> None:
    """:meth:`~llmsched_env.rate_estimate.ArrivalRateEstimator.update` per class, in place: decay ``sums`` from
    ``since`` to ``now``, then add each arrival's ``exp(−(now − a) / W) / W`` to its class (``classes`` empty: every
    arrival in class 0). Inlined: the adaptive policies' compiled loops count at every decision."""
    decay = math.exp(-(now - since) / window)
    for k in range(len(sums)):
        sums[k] *= decay
    if len(arrival_times):
        counted = np.zeros(len(sums))
        for j in range(len(arrival_times)):
            counted[classes[j] if len(classes) else 0] += math.exp(-(now - arrival_times[j]) / window) / window
        for k in range(len(sums)):
            sums[k] += counted[k]


@compiled_inlined
def window_coverage(time: float, window: float) -> float:
    """``1 − exp(−t / W)``: the share of a window of ``W`` seconds the clock has covered at ``t`` (1 before any
    time has passed). A rate estimate's sums (:func:`count_arrivals`) divided by it lose their start-up bias."""
    return -math.expm1(-time / window) if time > 0 else 1.0


@compiled
def pairwise_sum(values: np.ndarray) -> float:
    """The sum of a float64 vector in NumPy's order of additions (pairwise, in blocks of 8 accumulators up to
    128 entries): within a few ulps of ``np.add.reduce`` and far closer than a left-to-right sum, and, being
    the one implementation every path calls, rounded the same way on every path."""
    n = len(values)
    if n < 8:
        total = 0.0
        for i in range(n):
            total += values[i]
        return total
    if n <= 128:
        acc = values[:8].copy()
        i = 8
        while i < n - n % 8:
            for j in range(8):
                acc[j] += values[i + j]
            i += 8
        total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
        while i < n:
            total += values[i]
            i += 1
        return total
    half = n // 2
    half -= half % 8
    return pairwise_sum(values[:half]) + pairwise_sum(values[half:])


@compiled_inlined
def _attention_term(chunk: int, cached: int) -> float:
    """One prefill's attention, ``chunk·cached + chunk·(chunk + 1)/2`` in float64."""
    tokens = float(chunk)
    return tokens * cached + tokens * (tokens + 1) / 2


@compiled_inlined
def prefill_attention_sum(chunk: np.ndarray, cached: np.ndarray) -> float:
    """The batch's prefill attention, ``Σ chunk·cached + chunk·(chunk + 1)/2`` over its prefills
    (:func:`~llmsched_env.cost_model.prefill_attention`), summed by :func:`pairwise_sum`."""
    count = len(chunk)
    if count < 8:  # pairwise_sum's own order below 8 terms, without an array of them (most batches)
        total = 0.0
        for j in range(count):
            total += _attention_term(chunk[j], cached[j])
        return total
    terms = np.empty(count, dtype=np.float64)
    for j in range(count):
        terms[j] = _attention_term(chunk[j], cached[j])
    return pairwise_sum(terms)


@compiled_inlined
def iteration_seconds(cost: np.ndarray, prefill_tokens: int, decode_requests: int, kv_tokens: int,
                      attention: float) -> float:
    """``τ = c0 + c_pf·prefill + c_dec·decodes + c_kv·kv + c_pf2·attention`` with ``cost`` the five
    coefficients in that order (:meth:`~llmsched_env.cost_model.LinearCostModel.coefficients`). Every
    engine path calls this one function, so an iteration's duration rounds alike on all of them."""
    return (cost[0] + cost[1] * prefill_tokens + cost[2] * decode_requests + cost[3] * kv_tokens
            + cost[4] * attention)


@compiled
def not_among(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """``~np.isin(values, among)`` for int64 arrays, without NumPy's overhead per call (a policy's look at the
    batch it saw last, on the Python path, every decision)."""
    ordered = np.sort(among)
    out = np.empty(len(values), dtype=np.bool_)
    for j in range(len(values)):
        at = np.searchsorted(ordered, values[j])
        out[j] = at == len(ordered) or ordered[at] != values[j]
    return out


@compiled_inlined
def batch_cost(cost: np.ndarray, prefill_tokens: int, decode_requests: int, kv_tokens: int, chunk: np.ndarray,
               cached: np.ndarray) -> tuple[float, float]:
    """An iteration's duration, :func:`iteration_seconds` with the prefill attention of its prefills (``chunk``
    tokens each on ``cached`` tokens), or ``0`` for an iteration that runs nothing; and that attention (0 where
    ``cost`` does not price it: it is not computed then). The simulator's paths and the environment's compiled
    step all call it."""
    attention = prefill_attention_sum(chunk, cached) if cost[4] != 0.0 else 0.0
    if decode_requests == 0 and len(chunk) == 0:
        return 0.0, attention
    return iteration_seconds(cost, prefill_tokens, decode_requests, kv_tokens, attention), attention


@compiled
def batch_seconds(cost: np.ndarray, prefill_tokens: int, decode_requests: int, kv_tokens: int, chunk: np.ndarray,
                  cached: np.ndarray) -> float:
    """An iteration's duration (:func:`batch_cost`)."""
    return batch_cost(cost, prefill_tokens, decode_requests, kv_tokens, chunk, cached)[0]


@compiled
def reward_increment(earned: float, before: float, after: float, accounted: float, horizon: float,
                     fluid_rate: float, latency_penalty: float, in_system: int) -> tuple[float, float]:
    """The environment's reward for simulated time ``before → after`` in which ``earned`` completions (or
    output tokens) finished: ``earned − Θ*·Δt − latency_penalty·in_system·(after − before)``, ``Δt`` the time
    not yet charged (``accounted`` is the time charged so far), up to the horizon. Returns
    ``(reward, accounted)``. The environment's Python loop and its compiled step both call it."""
    end = min(after, horizon)
    elapsed = max(0.0, end - accounted)
    reward = earned - fluid_rate * elapsed
    if latency_penalty:
        reward -= latency_penalty * in_system * (after - before)
    return reward, max(accounted, end)


@compiled_inlined
def stall(times: np.ndarray, next_arrival: int, used_blocks: int, now: float) -> tuple[bool, float, float]:
    """The stall rule: nothing runs, so the clock jumps to the next arrival, the KV held meanwhile counted.
    Returns ``(ended, block_seconds, now)``: ``ended`` when no arrival is left (the clock stays)."""
    if next_arrival >= len(times):
        return True, 0.0, now
    wake = times[next_arrival]
    return False, used_blocks * max(0.0, wake - now), max(now, wake)


@compiled
def enqueue(columns: RequestColumns, start: int, arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray) -> None:
    """Write new requests into ids ``start, start + 1, …`` of the request table: waiting, their context the
    prompt, finished when the context reaches prompt + output, no token yet. The simulator's ``add_requests``
    and the environment's compiled step both enqueue through it. (The rows were zero: KV tokens held.)"""
    for j in range(len(arrival)):
        i = start + j
        columns.arrival[i] = arrival[j]
        columns.prompt[i] = prompt[j]
        columns.output[i] = output[j]
        columns.context[i] = prompt[j]
        columns.final_context[i] = prompt[j] + output[j]
        columns.status[i] = WAITING
        columns.first_token[i] = np.nan
        columns.finish[i] = np.nan
        columns.mark[i] = -1


@compiled
def has_choice(fits: np.ndarray) -> bool:
    """The decision-epoch rule: some class has a waiting request that fits (``fits`` per class)."""
    for count in fits:
        if count > 0:
            return True
    return False


@compiled
def blocks_to_grow(running: np.ndarray, kv_tokens: np.ndarray, block_size: int) -> int:
    """Running requests whose next token starts a new KV block (their KV fills whole blocks)."""
    growth = 0
    for i in running:
        if kv_tokens[i] % block_size == 0:
            growth += 1
    return growth


@compiled
def scan_queue(waiting: np.ndarray, classes: np.ndarray, context_len: np.ndarray, block_size: int, room: int,
               num_classes: int, max_admit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the queue (in queue order): ``(oldest, heads, fits, queued)`` per class.

    ``oldest[k, :heads[k]]`` are class ``k``'s oldest waiting ids (at most ``max_admit``); ``fits[k]`` how
    many of them, admitted in that order, fit in ``room`` free blocks; ``queued[k]`` how many wait.
    """
    oldest = np.empty((num_classes, max_admit), dtype=np.int64)
    heads = np.zeros(num_classes, dtype=np.int64)
    fits = np.zeros(num_classes, dtype=np.int64)
    queued = np.zeros(num_classes, dtype=np.int64)
    used = np.zeros(num_classes, dtype=np.int64)
    for i in waiting:
        k = classes[i]
        queued[k] += 1
        h = heads[k]
        if h < max_admit:
            oldest[k, h] = i
            heads[k] = h + 1
            used[k] += -(-context_len[i] // block_size)
            if used[k] <= room and fits[k] == h:  # a queue-order prefix: the first that does not fit ends it
                fits[k] = h + 1
    return oldest, heads, fits, queued


@compiled
def fitting_prefix_count(ids: np.ndarray, context_len: np.ndarray, block_size: int, room: int) -> int:
    """How many of ``ids``, admitted in this order, fit in ``room`` free blocks (a prefix)."""
    used = 0
    for n in range(len(ids)):
        used += -(-context_len[ids[n]] // block_size)
        if used > room:
            return n
    return len(ids)


@compiled
def merge_heads(oldest: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[k]`` ids of each class's ``oldest`` row, merged in id (queue) order."""
    total = 0
    for k in range(len(counts)):
        total += counts[k]
    merged = np.empty(total, dtype=np.int64)
    n = 0
    for k in range(len(counts)):
        for j in range(counts[k]):
            merged[n] = oldest[k, j]
            n += 1
    merged.sort()
    return merged


@compiled
def admissions(action: np.ndarray, oldest: np.ndarray, fits: np.ndarray, classes: np.ndarray,
               context_len: np.ndarray, block_size: int, room: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """What an agent's ``action`` (a count per class) admits: ``(ids, counts, clipped)``.

    Each count is clipped to ``0 … fits[k]``; the first ``counts[k]`` of each class's ``oldest`` are merged in
    queue (id) order and cut at the first that does not fit in ``room`` blocks together with those before it;
    ``counts`` are then recounted per class. ``clipped`` says whether either cut changed the action.
    """
    num_classes = len(fits)
    counts = np.empty(num_classes, dtype=np.int64)
    clipped = False
    for k in range(num_classes):
        counts[k] = min(max(action[k], 0), fits[k])
        if counts[k] != action[k]:
            clipped = True
    admit = merge_heads(oldest, counts)
    keep = fitting_prefix_count(admit, context_len, block_size, room)
    if keep < len(admit):
        clipped = True
        admit = admit[:keep]
        counts[:] = 0
        for i in admit:
            counts[classes[i]] += 1
    return admit, counts, clipped


@compiled
def decodable(running: np.ndarray, kv_tokens: np.ndarray, context_len: np.ndarray) -> np.ndarray:
    """The running requests whose whole context is cached (they can decode)."""
    keep = np.empty(len(running), dtype=np.int64)
    n = 0
    for i in running:
        if kv_tokens[i] == context_len[i]:
            keep[n] = i
            n += 1
    return keep[:n]


@compiled
def _peak_tokens_by_argsort(context: np.ndarray, remaining: np.ndarray) -> int:
    """:func:`peak_tokens` for values that do not pack into an int64 key."""
    order = np.argsort(-remaining, kind="mergesort")
    peak, held = 0, 0
    for n in range(len(order)):
        j = order[n]
        held += context[j]
        total = held + remaining[j] * (n + 1)
        if total > peak:
            peak = total
    return peak


@compiled
def peak_tokens(context: np.ndarray, remaining: np.ndarray) -> int:
    """:func:`llmsched_env.kv_cache.projected_peak_tokens`: the total is piecewise linear between finishes, so its
    maximum is at some ``t = remaining_i``; with the requests longest first, the ``n``-th candidate holds the
    first ``n`` contexts plus ``n·remaining``. Among requests with equal ``remaining`` the last candidate is
    the largest, whatever their order, so the requests need only be grouped by ``remaining``: counted into
    one slot per value when the values are few, else sorted as packed ``(remaining, context)`` keys."""
    count = len(context)
    top = 0
    for n in range(count):
        if not (0 <= remaining[n] < 2**31 and 0 <= context[n] < 2**31):
            return _peak_tokens_by_argsort(context, remaining)
        top = max(top, remaining[n])
    peak, held, alive = 0, 0, 0
    if top <= 4 * count + 256:
        contexts = np.zeros(top + 1, dtype=np.int64)
        members = np.zeros(top + 1, dtype=np.int64)
        for n in range(count):
            contexts[remaining[n]] += context[n]
            members[remaining[n]] += 1
        for r in range(top, -1, -1):
            if members[r]:
                held += contexts[r]
                alive += members[r]
                peak = max(peak, held + r * alive)
        return peak
    keys = np.empty(count, dtype=np.int64)
    for n in range(count):
        keys[n] = (remaining[n] << 31) | context[n]
    keys.sort()
    for n in range(count):
        key = keys[count - 1 - n]
        held += key & 0x7FFFFFFF
        peak = max(peak, held + (key >> 31) * (n + 1))
    return peak


@compiled
def running_profile(running: np.ndarray, classes: np.ndarray, context_len: np.ndarray, prompt_len: np.ndarray,
                    output_len: np.ndarray, residual: np.ndarray, segment_edges: np.ndarray, known: bool,
                    num_classes: int, buckets: int) -> tuple[np.ndarray, int]:
    """Running requests per class and stage bucket, and the peak KV tokens they will hold together.

    Known lengths: bucket ``min(b·decoded // output, b − 1)`` and the true remaining output. Hidden:
    the bucket is the segment of ``decoded`` among ``segment_edges`` and the remaining output is
    ``residual[decoded]`` (its expectation, rounded). The peak is :func:`peak_tokens` of those trajectories.
    """
    cells = np.zeros((num_classes, buckets), dtype=np.int64)
    count = len(running)
    remaining = np.empty(count, dtype=np.int64)
    top = len(residual) - 1
    for n in range(count):
        i = running[n]
        decoded = context_len[i] - prompt_len[i]
        if known:
            output = output_len[i]
            # min(buckets·decoded // output, buckets − 1), by comparisons: an integer division costs more
            bucket = 0
            while bucket < buckets - 1 and buckets * decoded >= (bucket + 1) * output:
                bucket += 1
            remaining[n] = output - decoded
        else:
            bucket = min(np.searchsorted(segment_edges, decoded, side="right"), buckets - 1)
            remaining[n] = residual[min(decoded, top)]
        cells[classes[i], bucket] += 1
    context = np.empty(count, dtype=np.int64)
    for n in range(count):
        context[n] = context_len[running[n]]
    return cells, peak_tokens(context, remaining)


@compiled
def _longest_first(remaining: np.ndarray) -> np.ndarray:
    """Indices of ``remaining`` in decreasing order of value (ties in any order: the caller takes a tie's members
    together): a counting sort when the values are small and non-negative, else a sort."""
    count = len(remaining)
    top = 0
    for n in range(count):
        if remaining[n] < 0:
            return np.argsort(-remaining, kind="mergesort")
        top = max(top, remaining[n])
    if top > 4 * count + 256:
        return np.argsort(-remaining, kind="mergesort")
    starts = np.zeros(top + 1, dtype=np.int64)
    for n in range(count):
        starts[remaining[n]] += 1
    position = 0
    for r in range(top, -1, -1):
        members = starts[r]
        starts[r] = position
        position += members
    order = np.empty(count, dtype=np.int64)
    for n in range(count):
        r = remaining[n]
        order[starts[r]] = n
        starts[r] += 1
    return order


@compiled
def _batch_blocks(context: np.ndarray, finishing: np.ndarray, held: int,
                  block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The KV blocks the batch (requests ``0 … held − 1``: ``context``, ``finishing[:held]`` iterations left) holds
    at each distinct value ``t`` of ``finishing`` (the batch's and, after it, other requests' remaining lengths),
    latest first: ``(points, blocks)``. Requests are taken longest first with the residues ``context_i mod B`` of
    the living kept as a histogram: ``ceil((B q + m + B a + b) / B) = q + a + [m + b > 0] + [m > B − b]``."""
    count = len(finishing)
    order = _longest_first(finishing)
    points = np.empty(count, dtype=np.int64)
    blocks = np.empty(count, dtype=np.int64)
    residues = np.zeros(block_size, dtype=np.int64)
    quotient_sum, alive, num_points, k = 0, 0, 0, 0
    while k < count:
        t = finishing[order[k]]
        while k < count and finishing[order[k]] == t:  # everyone with remaining >= t lives at t
            j = order[k]
            if j < held:
                c = context[j]
                quotient_sum += c // block_size
                residues[c % block_size] += 1
                alive += 1
            k += 1
        a, b = t // block_size, t % block_size
        nonzero = alive if b > 0 else alive - residues[0]
        over = 0
        for m in range(block_size - b + 1, block_size):
            over += residues[m]
        points[num_points] = t
        blocks[num_points] = quotient_sum + alive * a + nonzero + over
        num_points += 1
    return points[:num_points], blocks[:num_points]


@compiled
def peak_blocks(context: np.ndarray, remaining: np.ndarray, block_size: int) -> int:
    """:func:`llmsched_env.kv_cache.projected_peak_blocks`: ``max_t Σ_{i: remaining_i >= t} ceil((context_i + t) / B)``,
    over the candidates ``t = remaining_k`` (:func:`_batch_blocks`: ``O(n log n + n·B)``, or
    ``O(n + max remaining + n·B)`` when the remaining lengths are few enough to be counted into one slot each, as
    per iteration they are)."""
    _, blocks = _batch_blocks(context, remaining, len(context), block_size)
    peak = 0
    for total in blocks:
        peak = max(peak, total)
    return peak


@compiled
def fitting_prefix(context: np.ndarray, remaining: np.ndarray, candidate_context: np.ndarray,
                   candidate_remaining: np.ndarray, block_size: int, limit_blocks: int) -> int:
    """:func:`baselines.lookahead.fitting_prefix`: how many candidates, in order, can join the batch with its
    projected peak (:func:`peak_blocks`) within ``limit_blocks``.

    The projection is a sum over requests, so the batch's part is computed once (:func:`_batch_blocks`), at every
    point where some request (of the batch or a candidate) finishes (the peak of any subset is at one of them);
    candidates then join one at a time, each adding its own blocks at the points it lives through, until the
    first one whose peak does not fit: ``O((n + m)·B + k·(n + m))`` for ``n`` requests, ``m`` candidates of which
    ``k`` fit, where a search over the prefixes recomputed the whole projection at every probe."""
    held, count = len(context), len(candidate_context)
    if count == 0:
        return 0
    finishing = np.empty(held + count, dtype=np.int64)
    finishing[:held] = remaining
    finishing[held:] = candidate_remaining
    points, total = _batch_blocks(context, finishing, held, block_size)
    for j in range(count):
        c, r = candidate_context[j], candidate_remaining[j]
        peak = 0
        for p in range(len(points)):
            t = points[p]
            if t <= r:
                total[p] += -(-(c + t) // block_size)
            peak = max(peak, total[p])
        if peak > limit_blocks:
            return j
    return count


@compiled
def _squash_into(out: np.ndarray, at: int, value: float, scale: float) -> None:
    out[at] = min(max(value / (value + scale), 0.0), 1.0)


@compiled
def assemble_observation(queued: np.ndarray, cells: np.ndarray, memory: np.ndarray, elapsed: float,
                         estimate: np.ndarray, progress: float, scales: ObservationScales) -> np.ndarray:
    """The observation vector, entry by entry as :meth:`~llmsched_env.admission.AdmissionControl.observe`
    lays it out: each ``x / (x + s)`` (``s`` from ``scales``) or a fraction, in float64, clipped to ``[0, 1]``,
    then rounded to float32 (the same operations, in the same order, as the NumPy expression it replaces)."""
    k, b = cells.shape
    out = np.empty(k * (b + 3) + 7, dtype=np.float64)
    at = 0
    for j in range(k):
        _squash_into(out, at, float(queued[j]), scales.queue[j])
        at += 1
    for j in range(k):
        for s in range(b):
            _squash_into(out, at, float(cells[j, s]), scales.running[j, s])
            at += 1
    for v in memory:
        out[at] = min(max(v, 0.0), 1.0)
        at += 1
    _squash_into(out, at, elapsed, scales.time)
    at += 1
    for j in range(k):
        _squash_into(out, at, estimate[j], scales.rate[j])
        at += 1
    for v in scales.fixed:
        out[at] = min(max(v, 0.0), 1.0)
        at += 1
    out[at] = min(max(progress, 0.0), 1.0)
    return out.astype(np.float32)


# -- the simulator's iteration (llmsched_env/simulator.py) ---------------------------------------------------
#: Verdicts of :func:`plan_iteration`: the batch fits; it is invalid (an unknown or repeated id, a request that
#: cannot do what is asked of it); it is valid but needs more blocks than are free (evictions, see
#: :mod:`llmsched_env.iteration`).
PLANNED, INVALID, OVERFLOW = 0, 1, 2


@compiled
def _claim(i: int, n: int, mark: np.ndarray, stamp: int) -> bool:
    """Mark id ``i`` as in this decision; ``False`` if it does not exist or is in it already."""
    if i < 0 or i >= n or mark[i] == stamp:
        return False
    mark[i] = stamp
    return True


@compiled_inlined
def plan_iteration(decode: np.ndarray, prefill: np.ndarray, chunk: np.ndarray, whole_prefills: bool, n: int,
                   columns: RequestColumns, stamp: int, block_size: int, free_blocks: int
                   ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, int, int, int, int]:
    """Check and size an iteration that decodes ``decode`` and prefills ``prefill`` (``chunk`` tokens each, or
    their whole remaining context with ``whole_prefills``), with no preemption: reads only.

    Returns ``(verdict, decode_before, prefill_before, chunk, decode_new_blocks, prefill_new_blocks,
    prefill_tokens, batch_kv_tokens)``; ``verdict`` is ``INVALID`` when an id is invalid or repeated or a
    request cannot do what is asked of it (the other values are then empty: the caller names the error with
    :func:`~llmsched_env.request_table.validated_batch`), ``OVERFLOW`` when the batch is valid but needs more
    than ``free_blocks`` (the values are its sizes, for the eviction plan), else ``PLANNED``. ``mark[id] ==
    stamp`` marks ids seen (``stamp`` negative and new at each call, so no earlier mark can collide; ids
    claimed before the call with the same stamp count as repeated).
    """
    status, context, kv_tokens, mark = columns.status, columns.context, columns.kv_tokens, columns.mark
    empty = decode[:0]  # a view: an empty array without an allocation
    num_decode, num_prefill = len(decode), len(prefill)
    decode_before = np.empty(num_decode, dtype=np.int64)
    prefill_before = np.empty(num_prefill, dtype=np.int64)
    chunks = np.empty(num_prefill, dtype=np.int64)
    if not whole_prefills and len(chunk) != num_prefill:
        return INVALID, empty, empty, empty, 0, 0, 0, 0
    decode_new_blocks, batch_kv = 0, 0
    for j in range(num_decode):
        i = decode[j]
        if not _claim(i, n, mark, stamp):
            return INVALID, empty, empty, empty, 0, 0, 0, 0
        held = kv_tokens[i]
        if held != context[i] or held == 0:  # only a running request with its context cached decodes
            return INVALID, empty, empty, empty, 0, 0, 0, 0
        decode_before[j] = held
        if held % block_size == 0:
            decode_new_blocks += 1
        batch_kv += held + 1
    prefill_new_blocks, prefill_tokens = 0, 0
    for j in range(num_prefill):
        i = prefill[j]
        if not _claim(i, n, mark, stamp):
            return INVALID, empty, empty, empty, 0, 0, 0, 0
        held = kv_tokens[i]
        remaining = context[i] - held
        if status[i] == FINISHED or remaining <= 0:
            return INVALID, empty, empty, empty, 0, 0, 0, 0
        size = remaining if whole_prefills else chunk[j]
        if size < 1 or size > remaining:
            return INVALID, empty, empty, empty, 0, 0, 0, 0
        prefill_before[j] = held
        chunks[j] = size
        prefill_new_blocks += -(-(held + size) // block_size) - (-(-held // block_size))
        prefill_tokens += size
        batch_kv += held + size
    verdict = OVERFLOW if decode_new_blocks + prefill_new_blocks > free_blocks else PLANNED
    return (verdict, decode_before, prefill_before, chunks, decode_new_blocks, prefill_new_blocks, prefill_tokens,
            batch_kv)


@compiled_inlined
def run_iteration(decode: np.ndarray, decode_before: np.ndarray, prefill: np.ndarray, prefill_before: np.ndarray,
                  chunks: np.ndarray, running: np.ndarray, columns: RequestColumns, block_size: int,
                  now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """Apply an iteration :func:`plan_iteration` accepted, ending at ``now``: decodes gain a token, prefills
    their chunk (a new admission starts running; a completed prefill emits the first token), and requests
    that reach their final context finish and free their KV.

    Returns ``(admitted, finished, running, tokens_added, blocks_freed, tokens_freed)``: the KV grows by
    ``tokens_added`` tokens (and by the blocks the plan counted) before the finished free theirs.
    """
    status, context, kv_tokens = columns.status, columns.context, columns.kv_tokens
    final_context, first_token, finish = columns.final_context, columns.first_token, columns.finish
    admitted = np.empty(len(prefill), dtype=np.int64)
    num_admitted = 0
    tokens_added = len(decode)
    for j in range(len(decode)):
        i = decode[j]
        kv_tokens[i] = decode_before[j] + 1
        context[i] = decode_before[j] + 1
    for j in range(len(prefill)):
        i = prefill[j]
        if status[i] == WAITING:  # this prefill admits it
            status[i] = RUNNING
            admitted[num_admitted] = i
            num_admitted += 1
        after = prefill_before[j] + chunks[j]
        kv_tokens[i] = after
        tokens_added += chunks[j]
        if after == context[i] and not first_token[i] <= now:  # fmin: NaN until the first token
            first_token[i] = now
    finished = np.empty(len(decode), dtype=np.int64)
    num_finished, blocks_freed, tokens_freed = 0, 0, 0
    for j in range(len(decode)):
        i = decode[j]
        if context[i] == final_context[i]:
            status[i] = FINISHED
            finish[i] = now
            held = kv_tokens[i]
            blocks_freed += -(-held // block_size)
            tokens_freed += held
            kv_tokens[i] = 0
            finished[num_finished] = i
            num_finished += 1
    kept = np.empty(len(running) + num_admitted, dtype=np.int64)
    count = 0
    for i in running:
        if status[i] == RUNNING:
            kept[count] = i
            count += 1
    for j in range(num_admitted):
        i = admitted[j]
        if status[i] == RUNNING:
            kept[count] = i
            count += 1
    return admitted[:num_admitted], finished[:num_finished], kept[:count], tokens_added, blocks_freed, tokens_freed
