"""Policies with a compiled loop (llmsched_env.compiled_run) run exactly as through the Python evaluation loop."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import replace
from typing import Callable, Iterator

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from baselines import POLICIES, ChunkedBookingPolicy, make_policy
from baselines.adaptive import AdaptiveNestedWaitPolicy, AdaptiveWaitPolicy, sizing_rate
from baselines.fcfs import sarathi_policy, sarathi_vidur_policy, vllm_policy, vllm_v0_policy
from llmsched_env import (
    Arrivals,
    InvalidDecisionError,
    LinearCostModel,
    PoissonWorkload,
    RequestType,
    SimulatedEngine,
    TypeMix,
    runner,
)
from llmsched_env.compiled import borrowed
from llmsched_env.compiled_run import INVALID_DECISION
from llmsched_env.engine import Engine, SchedulerState
from llmsched_env.errors import ConfigError
from llmsched_env.policy import CompiledPolicy, Policy
from llmsched_env.runner import TimeSeriesRecorder, run
from llmsched_env.scenario import Scenario, build_scenario
from llmsched_env.scenarios import load_scenario
from tests.invariants import unowned_arrays

#: Adaptive policies that re-solve often within a short run, from a small sample (its ring wraps).
LEARN_FAST = {"window_s": 2.0, "resolve_every_s": 1.0, "memory": 12, "warmup": 4}
PRESETS = {
    "vllm": lambda scenario: vllm_policy(max_num_batched_tokens=64),
    "vllm-seqs": lambda scenario: vllm_policy(max_num_batched_tokens=48, max_num_seqs=3, watermark=0.1),
    "vllm-v0": lambda scenario: vllm_v0_policy(max_num_batched_tokens=64, max_num_seqs=4),
    "sarathi": lambda scenario: sarathi_policy(max_num_batched_tokens=32),
    "sarathi-tight": lambda scenario: sarathi_policy(max_num_batched_tokens=3, max_num_seqs=5),
    "sarathi-512": lambda scenario: sarathi_vidur_policy(max_num_batched_tokens=24, max_num_seqs=6),
    "wait": lambda scenario: make_policy("wait", scenario, 12.0),
    "wait-no-lending": lambda scenario: replace(make_policy("wait", scenario, 12.0), lend_spare_memory=False),
    "wait-thresholds-out-of-reach": lambda scenario: _wait_out_of_reach(scenario),
    "nested-wait": lambda scenario: make_policy("nested-wait", scenario, 12.0),
    "nested-wait-thresholds-out-of-reach": lambda scenario: _nested_wait_out_of_reach(scenario),
    "nested-wait-no-lending": lambda scenario: replace(make_policy("nested-wait", scenario, 12.0),
                                                       lend_spare_memory=False),
    "wait-pausing": lambda scenario: make_policy("wait-pausing", scenario, 12.0),
    "nested-wait-pausing": lambda scenario: make_policy("nested-wait-pausing", scenario, 12.0),
    # The adaptive margin moving every few decisions: its steps, and the projection drawn anew when it steps up.
    "nested-wait-margin": lambda scenario: replace(make_policy("nested-wait-margin", scenario, 12.0),
                                                   calm_decisions=3),
    "wait-adaptive": lambda scenario: AdaptiveWaitPolicy.create(scenario.cost, scenario.capacity_tokens,
                                                                scenario.block_size, **LEARN_FAST),
    "nested-wait-adaptive": lambda scenario: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, **LEARN_FAST),
    # Profiles 3x too fast for the engine: the cost follower scales them, and the thresholds are solved again.
    "wait-adaptive-off-profile": lambda scenario: AdaptiveWaitPolicy.create(
        scenario.cost.scaled(1 / 3), scenario.capacity_tokens, scenario.block_size, cost_window_s=1.0, **LEARN_FAST),
    # A residual agent's threshold scale on each (the compiled loop solves with it; a solve scales the reserve too).
    "wait-adaptive-scaled": lambda scenario: _rescaled(AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, **LEARN_FAST), 1.6),
    "nested-wait-adaptive-scaled": lambda scenario: _rescaled(AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, **LEARN_FAST), 0.6),
    # The adaptive margin re-solved with the thresholds, moving every few decisions (scaled: its lending limits too).
    "nested-wait-adaptive-margin": lambda scenario: replace(AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, adaptive_margin=True,
        **LEARN_FAST), calm_decisions=3),
    "nested-wait-adaptive-margin-stall-free-scaled": lambda scenario: _rescaled(replace(AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, token_budget=11,
        adaptive_margin=True, **LEARN_FAST), calm_decisions=2), 1.4),
    # Sized on the backlog too, from a queue of half a second of arrivals on: the solves follow the queue.
    "wait-adaptive-backlog": lambda scenario: AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, backlog_drain_s=2.0, backlog_after_s=0.5,
        **LEARN_FAST),
    "nested-wait-adaptive-margin-backlog": lambda scenario: replace(AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, adaptive_margin=True,
        backlog_drain_s=1.5, backlog_after_s=0.5, **LEARN_FAST), calm_decisions=3),
    "nested-wait-adaptive-off-profile": lambda scenario: AdaptiveNestedWaitPolicy.create(
        scenario.cost.scaled(1 / 3), scenario.capacity_tokens, scenario.block_size, horizon_s=12.0,
        cost_window_s=1.0, **LEARN_FAST),
    # Stall-free batching of the WAIT family's decisions, within budgets small enough to split most prompts.
    "wait-stall-free": lambda scenario: replace(make_policy("wait", scenario, 12.0), token_budget=20),
    "nested-wait-stall-free": lambda scenario: replace(make_policy("nested-wait", scenario, 12.0), token_budget=14),
    "wait-adaptive-stall-free": lambda scenario: _rescaled(AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, token_budget=24, **LEARN_FAST), 0.7),
    "nested-wait-adaptive-stall-free": lambda scenario: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, token_budget=9, **LEARN_FAST),
    "nested-wait-adaptive-stall-free-scaled": lambda scenario: _rescaled(AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, token_budget=11, **LEARN_FAST),
        1.7),
    # The budget following the queue (drain_iterations), raised above the budget as soon as a few requests wait.
    "wait-stall-free-draining": lambda scenario: replace(make_policy("wait", scenario, 12.0), token_budget=20,
                                                         drain_iterations=2),
    # With lengths known, the admissions served by projected latency (the budget cuts them, the order decides).
    "wait-stall-free-latency-order": lambda scenario: replace(make_policy("wait", scenario, 12.0), token_budget=20,
                                                              latency_order_weight=3.0),
    "wait-adaptive-stall-free-latency-order": lambda scenario: _rescaled(AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, token_budget=24, drain_iterations=3,
        latency_order_weight=2.0, **LEARN_FAST), 0.8),
    "wait-adaptive-stall-free-draining": lambda scenario: _rescaled(AdaptiveWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, token_budget=24, drain_iterations=3,
        **LEARN_FAST), 1.3),
    "nested-wait-adaptive-stall-free-draining": lambda scenario: AdaptiveNestedWaitPolicy.create(
        scenario.cost, scenario.capacity_tokens, scenario.block_size, horizon_s=12.0, token_budget=9,
        drain_iterations=2, **LEARN_FAST),
    "wait-cp": lambda scenario: ChunkedBookingPolicy.for_mix(scenario.offered_mix(), 6, nested=False, chunk=8),
    "nested-wait-cp": lambda scenario: ChunkedBookingPolicy.for_mix(scenario.offered_mix(), 9, nested=True, chunk=5,
                                                                     token_gate=False),
    "nested-wait-cp-open": lambda scenario: ChunkedBookingPolicy.for_mix(scenario.offered_mix(), 12, nested=True,
                                                                          chunk=16, wait_gate=False),
}


def _rescaled(policy: AdaptiveWaitPolicy | AdaptiveNestedWaitPolicy, scale: float) -> Policy:
    """``policy`` with a residual agent's threshold ``scale`` set at each reset (as an agent's first action)."""
    reset = policy.reset

    def reset_and_scale(engine: Engine) -> None:
        reset(engine)
        policy.set_threshold_scale(scale)
    policy.reset = reset_and_scale  # type: ignore[method-assign]
    return policy


def _learnt(policy: Policy) -> tuple:
    """What an adaptive policy has learnt by the end of a run: its solves, thresholds, reserve and compiled rule."""
    learning = getattr(policy, "learning", None)
    if learning is None:
        return ()
    thresholds = policy.solved_thresholds  # type: ignore[attr-defined]
    return (learning.solves, learning.solved_at, learning.solved_rate, learning.solved_factor,
            [np.asarray(getattr(thresholds, name)).tolist() for name in ("n", "memory_tokens", "iteration_time_s")],
            policy.reserved_tokens, [np.asarray(value).tolist() for value in policy.compiled_rule()])  # type: ignore[attr-defined]


def _wait_out_of_reach(scenario: Scenario) -> Policy:
    """WAIT whose thresholds (40 per type) are above what its queues gather and whose reserve leaves spare room for
    about one request: the drain, judged before lending, decides whenever nothing runs."""
    policy = make_policy("wait", scenario, 12.0)
    assert scenario.mix is not None
    largest = -(-int((scenario.mix.prompt_lens + scenario.mix.output_lens).max()) // scenario.block_size)
    reserve = max(scenario.capacity_tokens // scenario.block_size - largest, 0)
    return replace(policy, thresholds=replace(policy.thresholds, n=np.full(len(policy.thresholds.n), 40),
                                              memory_blocks=reserve))


def _nested_wait_out_of_reach(scenario: Scenario) -> Policy:
    """Nested WAIT whose thresholds (40 per segment) are above what its queues gather and whose reserve leaves spare
    room for about one request: with nothing running the drain decides, not lending."""
    policy = make_policy("nested-wait", scenario, 12.0)
    assert scenario.mix is not None
    largest = int((scenario.mix.prompt_lens + scenario.mix.output_lens).max())
    return replace(policy, thresholds=replace(policy.thresholds, n=np.full(len(policy.thresholds.n), 40)),
                   reserve_tokens=float(max(scenario.capacity_tokens - largest, 0)))


class PythonOnly:
    """The same policy without its compiled loop: the evaluation loop calls ``decide`` every iteration."""

    def __init__(self, policy: Policy) -> None:
        self.policy, self.name = policy, policy.name

    def reset(self, engine: Engine) -> None:
        self.policy.reset(engine)

    def decide(self, state: SchedulerState):  # type: ignore[no-untyped-def]
        return self.policy.decide(state)


def _both_ways(make: Callable[[Scenario], Policy], mix: TypeMix, capacity: int, block: int, seed: int,
               horizon: float, stream: bool, stall_after_s: float | None) -> list[tuple]:
    cost = LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=1e-4, c_kv=1e-5, c_pf2=2e-7)
    scenario = Scenario(cost, capacity, block, mix)
    runs = []
    for wrap in (lambda policy: policy, PythonOnly):
        whole = PoissonWorkload(mix).sample(horizon, np.random.default_rng(seed))
        arrivals = _in_chunks(whole, 17) if stream else whole
        engine = SimulatedEngine(cost, capacity_tokens=capacity, block_size=block)
        recorder = TimeSeriesRecorder(max_rows=8)
        policy = make(scenario)
        result = run(engine, wrap(policy), arrivals, horizon, callbacks=[recorder],
                     stall_after_s=stall_after_s, keep_records=True)
        runs.append((result, recorder.arrays(), _learnt(policy)))
    return runs


def _in_chunks(arrivals: Arrivals, size: int) -> Iterator[Arrivals]:
    for start in range(0, len(arrivals), size):
        end = start + size
        yield Arrivals(arrivals.arrival_time[start:end], arrivals.prompt_len[start:end], arrivals.output_len[start:end])


mixes = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(1.0, 12.0)), min_size=1, max_size=3
).map(lambda rows: TypeMix(tuple(RequestType(p, o, r) for p, o, r in rows)))


@settings(max_examples=150, deadline=None)
@example(mix=TypeMix((RequestType(1, 1, 7.0),)), slack=0, block=1, seed=150, preset="wait-adaptive", stream=False,
         watch=False)  # every request retired when the thresholds are re-solved: nothing left to learn from
@example(mix=TypeMix((RequestType(1, 1, 7.0),)), slack=0, block=1, seed=150, preset="nested-wait-adaptive",
         stream=False, watch=False)
@given(mix=mixes, slack=st.integers(0, 150), block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16),
       preset=st.sampled_from(sorted(PRESETS)), stream=st.booleans(), watch=st.booleans())
def test_a_compiled_loop_runs_exactly_as_the_python_loop(mix: TypeMix, slack: int, block: int, seed: int,
                                                         preset: str, stream: bool, watch: bool) -> None:
    """Every result field, every request's record and the time series, bit for bit, and what an adaptive policy
    has learnt by the end; with retirement, a small row buffer, small windows of arrivals and a chunked stream, so
    that the compiled loop hands over to Python often."""
    largest = int((mix.prompt_lens + mix.output_lens).max())
    capacity = (-(-largest // block)) * block + slack
    compiled_runs = []
    run_compiled = runner.Rollout.run_compiled
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "RETIRE_EVERY", 7)
        patch.setattr(runner, "_ROW_BUFFER", 5)
        patch.setattr(runner, "_ARRIVALS_WINDOW", 9)
        patch.setattr(runner.Rollout, "run_compiled",
                      lambda rollout, loop: (compiled_runs.append(loop), run_compiled(rollout, loop))[1])
        (fast, fast_rows, fast_learnt), (python, python_rows, python_learnt) = _both_ways(
            PRESETS[preset], mix, capacity, block, seed, 12.0, stream, 0.5 if watch else None)
    assert len(compiled_runs) == 1  # the first run took the compiled loop, the second the Python one
    for field in ("horizon", "end_time", "iterations", "capacity_blocks", "block_size", "peak_blocks_used",
                  "block_seconds", "evictions", "arrived", "waiting", "running", "finished", "busy_time",
                  "stalled_at"):
        assert getattr(fast, field) == getattr(python, field), field
    for field in fast.records.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(fast.records, field), getattr(python.records, field), err_msg=field)
    for key in fast_rows:
        np.testing.assert_array_equal(fast_rows[key], python_rows[key], err_msg=key)
    assert fast_learnt == python_learnt  # an adaptive policy's solves in the loop reach the policy as decide's do


@pytest.mark.parametrize("rate, seed, stream, final_state", [
    (1.0, 1, False, [1, 1]),  # down to the boldest level, one eviction there: back up one level, for good
    (1.5, 0, True, [4, 4]),  # evictions at every level it reached: the most cautious, for good
])
def test_the_adaptive_policys_margin_moves_alike_in_the_compiled_and_python_loops(
        rate: float, seed: int, stream: bool, final_state: list[int]) -> None:
    """Nested-WAIT-adaptive with the adaptive margin, its levels re-solved with every solve, in a run where it
    steps down while calm and back up on evictions: the same run both ways, bit for bit, and the same margin."""
    from baselines.nested_wait import FLOOR, LEVEL

    made: list[AdaptiveNestedWaitPolicy] = []

    def make(scenario: Scenario) -> Policy:
        made.append(replace(AdaptiveNestedWaitPolicy.create(scenario.cost, scenario.capacity_tokens,
                                                            scenario.block_size, horizon_s=40.0,
                                                            adaptive_margin=True, **LEARN_FAST), calm_decisions=3))
        return made[-1]

    mix = TypeMix((RequestType(20, 5, 8.0), RequestType(20, 120, rate)))
    (fast, fast_rows, fast_learnt), (python, python_rows, python_learnt) = _both_ways(make, mix, 450, 4, seed, 40.0,
                                                                                      stream, None)
    assert fast.evictions > 0 and made[0].learning.solves > 5  # type: ignore[union-attr]
    for field in ("end_time", "iterations", "peak_blocks_used", "evictions", "finished", "busy_time"):
        assert getattr(fast, field) == getattr(python, field), field
    for field in fast.records.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(fast.records, field), getattr(python.records, field), err_msg=field)
    assert fast_learnt == python_learnt
    assert [policy.compiled_margin().state[[LEVEL, FLOOR]].tolist() for policy in made] == [final_state] * 2
    # Without the margin, the same arrivals run otherwise (the margin is what moved them).
    plain = AdaptiveNestedWaitPolicy.create(made[0].learning.cost, 450, 4, horizon_s=40.0,  # type: ignore[union-attr]
                                            **LEARN_FAST)
    ((other, _, _), _) = _both_ways(lambda scenario: plain, mix, 450, 4, seed, 40.0, stream, None)
    assert (other.iterations, other.evictions) != (fast.iterations, fast.evictions)


def test_the_default_workload_runs_compiled_and_identically_at_full_size() -> None:
    """vLLM at ρ = 0.9 on the default mix evicts (the engine's eviction rule inside the compiled loop) and
    retires thousands of requests: the same run both ways."""
    base = build_scenario(types="p=50,o=156,rate=1;p=100,o=171,rate=1", profile="llama2-7b-a100")
    scenario = base.at_rate(base.rate_for_load(0.9))
    results = []
    for wrap in (lambda policy: policy, PythonOnly):
        engine = scenario.engine()
        results.append(run(engine, wrap(vllm_policy()), scenario.chunks(600.0, seed=0), 600.0))
    fast, python = results
    assert fast.evictions > 0 and fast.finished > runner.RETIRE_EVERY
    for field in ("end_time", "iterations", "peak_blocks_used", "block_seconds", "evictions", "arrived", "waiting",
                  "running", "finished", "busy_time", "stalled_at"):
        assert getattr(fast, field) == getattr(python, field), field
    for field in fast.records.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(fast.records, field), getattr(python.records, field), err_msg=field)


def test_every_registered_policy_runs_compiled() -> None:
    scenario = build_scenario(types="p=30,o=40,rate=30", memory_tokens=3000, block_size=16)
    for name in POLICIES:
        policy = make_policy(name, scenario, 10.0)
        policy.reset(scenario.engine())
        assert isinstance(policy, CompiledPolicy) and policy.compiled_loop() is not None, name
        assert policy.name == name  # what a run's rows and a server's stats call it


class _RefusedLoop:
    """A compiled policy whose loop hands back an invalid decision at once."""

    name = "refused"

    def reset(self, engine: Engine) -> None:
        pass

    def decide(self, state: SchedulerState):  # type: ignore[no-untyped-def]
        raise AssertionError("not called")

    def compiled_loop(self):  # type: ignore[no-untyped-def]
        bad = np.array([10**6], dtype=np.int64)
        return lambda run, running, columns, arrivals, engine: (INVALID_DECISION, running, bad, bad[:0], bad[:0])


def test_an_invalid_compiled_decision_is_named_by_the_engine() -> None:
    scenario = build_scenario(types="p=30,o=40,rate=30", memory_tokens=3000, block_size=16)
    with pytest.raises(InvalidDecisionError, match="decode: unknown request id 1000000"):
        run(scenario.engine(), _RefusedLoop(), scenario.sample(5.0, seed=0), 5.0)


@pytest.mark.parametrize("compiled", [True, False])
def test_adaptive_nested_wait_learns_the_true_lengths_of_the_requests_that_finished(compiled: bool) -> None:
    """The completion sample holds exactly the output lengths of the requests that finished, read before their
    rows are retired (here every 7 finishes), on the compiled path and on the Python one."""
    scenario = build_scenario(types="p=20,o=5,rate=6;p=10,o=30,rate=4", memory_tokens=2000, block_size=4,
                              hidden_lengths=True)
    policy = AdaptiveNestedWaitPolicy.create(scenario.cost, scenario.capacity_tokens, scenario.block_size,
                                             horizon_s=30.0, memory=10_000, warmup=5, resolve_every_s=2.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "RETIRE_EVERY", 7)
        result = run(scenario.engine(), policy if compiled else PythonOnly(policy), scenario.sample(30.0, seed=2),
                     30.0, keep_records=True)
    records = result.records
    finished = records.finish_time < np.inf
    assert result.finished > 50 and policy.learning is not None and policy.learning.solves > 0
    seen = np.sort(policy.completions.lengths())
    if not compiled and len(seen) < result.finished:
        # The Python path sees an iteration's finishes at its next decision: none follows a run's last iteration.
        finished &= records.finish_time < result.end_time
    np.testing.assert_array_equal(seen, np.sort(records.decoded[finished]))


#: Enough memory pressure in 20 s for every preset to gate, lend, evict and retire.
SMALL = build_scenario(types="p=20,o=30,rate=40;p=60,o=10,rate=20", memory_tokens=2400, block_size=8)


def _borrowing_loops() -> list[tuple[str, str]]:
    """``(module, name)`` of every compiled function of the policies' modules that hands out borrowed views."""
    found = []
    for module in sorted({type(make(SMALL)).__module__ for make in PRESETS.values()}):
        for name, value in vars(importlib.import_module(module)).items():
            function = getattr(value, "py_func", None)
            if function is not None and function.__module__ == module and "borrowed(" in inspect.getsource(function):
                found.append((module, name))
    return found


NEEDS_JIT = pytest.mark.skipif(numba.config.DISABLE_JIT, reason="borrowed views exist in compiled code only")


@NEEDS_JIT
def test_no_compiled_loop_hands_python_a_view_of_a_borrowed_array() -> None:
    """Each policy's loop runs on borrowed views of the request table and the rollout's state; nothing it returns
    (its decisions, its running batch, the projection it keeps) may be one, or a view of one."""
    loops = _borrowing_loops()
    entries = {"run_fcfs", "run_wait", "run_nested_wait", "run_chunked_booking", "run_adaptive_wait",
               "run_adaptive_nested_wait"}
    assert {name for _, name in loops} >= entries
    # Compile every loop first: a compiled caller resolves its callees (nested_wait_step among the names patched
    # below) when it compiles, and a Python wrapper in their place would not compile.
    for make in PRESETS.values():
        run(SMALL.engine(), make(SMALL), SMALL.sample(2.0, seed=3), 2.0)
    leaks: list[str] = []
    called: set[str] = set()
    with pytest.MonkeyPatch.context() as patch:
        for module, name in loops:
            compiled_loop = getattr(importlib.import_module(module), name)

            def checked(*args, _loop=compiled_loop, _name=name):  # type: ignore[no-untyped-def]
                result = _loop(*args)
                called.add(_name)
                leaks.extend(unowned_arrays(result, _name))
                return result
            patch.setattr(importlib.import_module(module), name, checked)
        for preset, make in sorted(PRESETS.items()):
            result = run(SMALL.engine(), make(SMALL), SMALL.sample(20.0, seed=3), 20.0)
            assert result.finished > 0, preset
    assert called >= entries and leaks == []


@NEEDS_JIT
def test_the_unowned_array_check_finds_a_returned_view_of_a_borrowed_array() -> None:
    values = np.arange(6, dtype=np.int64)
    assert unowned_arrays((1, _view_of_borrowed(values)), "r") == ["r[1]"]
    assert unowned_arrays((values, values[2:], np.empty(0)), "r") == []


@numba.njit
def _leak(values: np.ndarray) -> np.ndarray:
    return values[2:]


@numba.njit
def _view_of_borrowed(values: np.ndarray) -> np.ndarray:
    return _leak(borrowed(values))


def test_the_sizing_rate_adds_the_backlog_beyond_its_allowance_only_when_asked() -> None:
    assert sizing_rate(10.0, 5_000, 0.0, 10.0) == 10.0  # off: the estimate alone, whatever the queue
    assert sizing_rate(10.0, 100, 60.0, 10.0) == 10.0  # ten seconds of arrivals or fewer: the ordinary wait
    assert sizing_rate(10.0, 250, 60.0, 10.0) == 10.0 + 150 / 60.0
    assert sizing_rate(10.0, 250, 60.0, 0.0) == 10.0 + 250 / 60.0
    for name, value in (("backlog_drain_s", -1.0), ("backlog_drain_s", math.nan), ("backlog_after_s", math.inf),
                        ("backlog_drain_s", True)):
        with pytest.raises(ConfigError, match=f"{name} must be finite and >= 0 s, got {value!r}"):
            AdaptiveWaitPolicy.create(LinearCostModel(c0=0.01), 1_000, 16, **{name: value})


@pytest.mark.parametrize("preset", ["wait-adaptive-backlog", "nested-wait-adaptive-backlog", "wait-adaptive"])
def test_a_threshold_scale_other_than_one_sizes_on_the_estimate_alone(preset: str) -> None:
    """A residual agent's departure replaces the backlog's sizing rather than multiplying it; a scale of 1 sizes on
    the backlog again, and either change solves again at the next decision. Without the backlog's sizing a scale
    changes nothing of it."""
    scenario = load_scenario("paper-two-type").scenario
    policy = make_policy(preset, scenario, 60.0)
    policy.reset(scenario.engine())
    learning = policy.learning
    learning.solved_at = 5.0
    estimate, queued = learning.rates.total, 10_000
    sized = learning.sizing_rate(queued)
    assert (sized > estimate) == preset.endswith("-backlog")
    policy.set_threshold_scale(2.0)
    assert learning.sizing_rate(queued) == estimate
    assert learning.solved_at == (-math.inf if preset.endswith("-backlog") else 5.0)
    learning.solved_at = 7.0
    policy.set_threshold_scale(0.5)  # still departed: nothing to solve again
    assert learning.solved_at == 7.0 and learning.sizing_rate(queued) == estimate
    policy.set_threshold_scale(1.0)
    assert learning.sizing_rate(queued) == sized
    assert learning.solved_at == (-math.inf if preset.endswith("-backlog") else 7.0)


@pytest.mark.parametrize("preset", ["wait-adaptive-backlog", "nested-wait-adaptive-margin-backlog"])
def test_backlog_sizing_solves_other_thresholds_alike_in_the_compiled_and_python_loops(preset: str) -> None:
    """An overload (a queue of many seconds of arrivals): sized on the backlog, the policy solves other thresholds
    than without it, and its compiled loop runs exactly as its Python rule."""
    mix = TypeMix((RequestType(8, 12, 40.0), RequestType(20, 6, 30.0)))
    runs = {name: _both_ways(PRESETS[name], mix, 160, 4, 3, 12.0, False, None)
            for name in (preset, preset.removesuffix("-backlog"))}
    (fast, _, fast_learnt), (python, _, python_learnt) = runs[preset]
    for field in fast.records.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(fast.records, field), getattr(python.records, field), err_msg=field)
    assert fast_learnt == python_learnt
    assert fast.waiting > 0 and fast_learnt != runs[preset.removesuffix("-backlog")][0][2]
