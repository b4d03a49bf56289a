"""Engine invariants, checked after every iteration by the property tests of every policy."""

from __future__ import annotations

import numpy as np

from llmsched_env.engine import FINISHED, RUNNING, WAITING, IterationOutcome
from llmsched_env.simulator import SimulatedEngine


class InvariantChecker:
    """An iteration callback that asserts the engine's invariants; counts the iterations it checked."""

    def __init__(self) -> None:
        self.iterations = 0
        self.decode_tokens = 0

    def __call__(self, engine: SimulatedEngine, outcome: IterationOutcome) -> None:
        self.iterations += 1
        self.decode_tokens += outcome.decode_tokens
        check_engine(engine)
        assert outcome.peak_blocks_used <= outcome.capacity_blocks
        ran = outcome.decode_tokens + outcome.prefill_tokens
        assert (outcome.duration > 0) if ran else (outcome.duration == 0)


def check_engine(engine: SimulatedEngine) -> None:
    records = engine.records()  # of the requests not retired (finished and handed over) yet
    status = records.status
    retired = engine.retired
    # Every request is accounted for: arrived = finished + waiting + running.
    assert engine.num_requests == engine.num_finished + engine.num_waiting + engine.num_running
    assert engine.num_requests == retired + len(status)
    assert engine.num_waiting == int(np.sum(status == WAITING))
    assert engine.num_running == int(np.sum(status == RUNNING))
    assert engine.num_finished == retired + int(np.sum(status == FINISHED))
    state = engine.state()
    assert state.retired == retired
    assert sorted(state.running.tolist()) == (retired + np.flatnonzero(status == RUNNING)).tolist()
    assert state.waiting.tolist() == (retired + np.flatnonzero(status == WAITING)).tolist()
    # Memory: the accountant agrees with a recount, and never exceeds capacity.
    tokens = state.kv_tokens[retired: engine.num_requests]
    blocks = -(-tokens // engine.block_size)
    assert engine.used_blocks == int(blocks.sum()) <= engine.capacity_blocks
    assert engine.used_tokens == int(tokens.sum())
    assert np.all(tokens[status != RUNNING] == 0)
    context = records.prompt_len + records.decoded
    assert np.all(tokens <= context)
    # Output: never more than the output length; exactly it once finished.
    assert np.all(records.decoded <= records.output_len)
    finished = status == FINISHED
    assert np.array_equal(records.decoded[finished], records.output_len[finished])
    assert np.all(records.finish_time[finished] >= records.first_token_time[finished])
    assert np.all(records.first_token_time[finished] >= records.arrival_time[finished])


def unowned_arrays(value: object, where: str) -> list[str]:
    """The arrays in ``value`` (nested tuples and lists) that own no memory and hold no reference to an owner: what
    compiled code hands back when it returns a view of a borrowed array (:func:`llmsched_env.compiled.borrowed`)."""
    if isinstance(value, np.ndarray):
        return [where] if value.base is None and not value.flags.owndata else []
    if isinstance(value, (tuple, list)):
        return [found for k, item in enumerate(value) for found in unowned_arrays(item, f"{where}[{k}]")]
    return []
