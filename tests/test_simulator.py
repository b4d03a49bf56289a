"""The simulated engine: exact iterations, eviction by recompute, invariants, determinism, bad decisions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from baselines import sarathi_policy, vllm_policy
from llmsched_env import (
    Arrivals,
    ConfigError,
    Decision,
    InvalidDecisionError,
    LinearCostModel,
    PoissonWorkload,
    RequestTooLargeError,
    RequestType,
    SimulatedEngine,
    TypeMix,
    run,
)
from llmsched_env.engine import IDLE
from llmsched_env.fluid import solve_fluid
from llmsched_env.runner import TimeSeriesRecorder
from llmsched_env.scenario import build_scenario
from tests.invariants import InvariantChecker, check_engine
from tests.reference_engine import ReferenceEngine

PAPER = LinearCostModel.paper(d0=1.0, d1=0.1)


def one_request_engine(prompt: int = 4, output: int = 2, capacity_tokens: int = 64, block: int = 2) -> SimulatedEngine:
    engine = SimulatedEngine(PAPER, capacity_tokens=capacity_tokens, block_size=block)
    engine.add_requests(np.array([0.0]), np.array([prompt]), np.array([output]))
    return engine


def test_one_request_runs_its_stages_exactly() -> None:
    """p=4, o=2: stage 0 holds 4 tokens, stage 1 holds 5, stage 2 holds 6; τ = d0 + d1·KV."""
    engine = one_request_engine()
    first = engine.step(Decision(prefill=np.array([0])))
    assert first.duration == pytest.approx(1.0 + 0.1 * 4)
    assert (first.prefill_tokens, first.decode_tokens, first.kv_blocks_used) == (4, 0, 2)
    assert first.admitted.tolist() == [0]
    second = engine.step(Decision(decode=np.array([0])))
    assert second.duration == pytest.approx(1.0 + 0.1 * 5)
    assert second.kv_blocks_used == 3 and second.finished.size == 0
    third = engine.step(Decision(decode=np.array([0])))
    assert third.duration == pytest.approx(1.0 + 0.1 * 6)
    assert third.finished.tolist() == [0] and third.peak_blocks_used == 3 and third.kv_blocks_used == 0
    records = engine.records()
    assert records.first_token_time[0] == pytest.approx(1.4)
    assert records.finish_time[0] == pytest.approx(1.4 + 1.5 + 1.6)
    assert records.decoded[0] == 2


def test_memory_utilisation_is_integrated_over_time_including_idle_periods() -> None:
    """p=4, o=2, blocks of 2: 1.4 s holding 2 blocks, 1.5 s and 1.6 s holding 3, 1.5 s idle holding none,
    then the second request the same way."""
    from llmsched_env.fluid import solve_fluid
    from llmsched_env.metrics import summarize

    engine = SimulatedEngine(PAPER, capacity_tokens=20, block_size=2)
    arrivals = Arrivals(np.array([0.0, 6.0]), np.array([4, 4]), np.array([2, 2]))
    result = run(engine, vllm_policy(), arrivals, horizon=20.0)
    assert result.block_seconds == pytest.approx(2 * 1.4 + 3 * 1.5 + 3 * 1.6 + 0 * 1.5 + 2 * 1.4 + 3 * 1.5 + 3 * 1.6)
    assert result.end_time == pytest.approx(10.5)
    summary = summarize(result, solve_fluid(TypeMix((RequestType(4, 2, 0.1),)), PAPER, 20))
    assert summary["mean_memory_frac"] == pytest.approx(result.block_seconds / result.end_time / 10)
    assert summary["peak_memory_frac"] == pytest.approx(3 / 10)


def test_the_slowest_requests_say_whether_the_tail_waited_or_decoded() -> None:
    """One request fits at a time (4 blocks of 2 tokens) and four arrive in the first second: the slowest is the last
    served, which waited for the other three; its first token and decode add up to its latency."""
    from llmsched_env.metrics import slowest_requests

    engine = SimulatedEngine(PAPER, capacity_tokens=8, block_size=2)
    arrivals = Arrivals(np.array([0.0, 0.2, 0.5, 1.0]), np.array([4, 4, 4, 4]), np.array([2, 2, 2, 3]))
    r = run(engine, vllm_policy(), arrivals, horizon=40.0, keep_records=True).records
    latency = r.finish_time - r.arrival_time
    tail = slowest_requests(r, 0.25)
    assert tail["output_len"] == 3 and tail["first_token_s"] + tail["decode_s"] == pytest.approx(latency.max())
    assert tail["first_token_s"] == pytest.approx(r.first_token_time[3] - 1.0)
    assert tail["first_token_s"] > tail["decode_s"]
    assert slowest_requests(r, 1.0)["output_len"] == pytest.approx(9 / 4)  # every completed request
    nothing = run(SimulatedEngine(PAPER, capacity_tokens=8, block_size=2), vllm_policy(), arrivals, horizon=0.1,
                  keep_records=True).records
    assert np.isnan(slowest_requests(nothing)["decode_s"])
    with pytest.raises(ValueError, match="share must be in"):
        slowest_requests(r, 0.0)


@pytest.mark.parametrize("horizon", [4.0, 40.0])
def test_the_censored_latency_counts_every_arrival_and_the_unfinished_at_their_age(horizon: float) -> None:
    """One request fits at a time and four arrive in the first second: at 4 s three are unfinished (their
    censored latency is their age at the end of the run), by 40 s every one has finished (censored = latency)."""
    from llmsched_env.fluid import solve_fluid
    from llmsched_env.metrics import summarize

    engine = SimulatedEngine(PAPER, capacity_tokens=6, block_size=2)
    arrivals = Arrivals(np.array([0.0, 0.2, 0.5, 1.0]), np.array([4, 4, 4, 4]), np.array([2, 2, 2, 2]))
    result = run(engine, vllm_policy(), arrivals, horizon=horizon, keep_records=True)
    summary = summarize(result, solve_fluid(TypeMix((RequestType(4, 2, 4.0),)), PAPER, horizon))
    r = result.records
    finished = ~np.isnan(r.finish_time)
    assert finished.sum() == (1 if horizon == 4.0 else 4) and len(r.status) == summary["arrived"] == 4
    censored = np.where(finished, r.finish_time, result.end_time) - r.arrival_time
    assert summary["mean_censored_latency_s"] == pytest.approx(censored.mean(), rel=1e-12)
    assert summary["p99_censored_latency_s"] == pytest.approx(np.percentile(censored, 99), rel=1e-12)
    latency = r.finish_time[finished] - r.arrival_time[finished]
    assert summary["p99_latency_s"] == pytest.approx(np.percentile(latency, 99), rel=1e-12)
    if horizon == 4.0:  # the first request's 4.5 s only: the three still waiting are left out
        assert summary["p99_latency_s"] == pytest.approx(4.5) and summary["completed"] == 1
        assert summary["p50_censored_latency_s"] < summary["p99_latency_s"]
    else:
        for q in ("mean", "p50", "p90", "p99"):
            assert summary[f"{q}_censored_latency_s"] == summary[f"{q}_latency_s"]


def test_general_cost_model_charges_each_term() -> None:
    cost = LinearCostModel(c0=0.01, c_pf=0.001, c_dec=0.002, c_kv=0.0001)
    engine = SimulatedEngine(cost, capacity_tokens=1000, block_size=4)
    engine.add_requests(np.array([0.0, 0.0]), np.array([10, 20]), np.array([3, 3]))
    engine.step(Decision(prefill=np.array([0])))
    outcome = engine.step(Decision(decode=np.array([0]), prefill=np.array([1]), prefill_tokens=np.array([8])))
    # prefill 8 tokens; 1 decode; KV of the batch: 11 (decode) + 8 (chunk so far)
    assert outcome.duration == pytest.approx(0.01 + 0.001 * 8 + 0.002 * 1 + 0.0001 * 19)
    assert np.isnan(engine.records().first_token_time[1])  # its prefill is not done
    engine.step(Decision(prefill=np.array([1])))  # the remaining 12 tokens
    assert engine.state().kv_tokens[1] == 20
    assert engine.records().first_token_time[1] == pytest.approx(engine.now)


def test_overflow_evicts_newest_and_recompute_prefills_the_whole_context() -> None:
    # Two requests of p=4, o=4 in 5 blocks of 2: both fit after prefill (4 blocks), not both at full length.
    engine = SimulatedEngine(PAPER, capacity_blocks=5, block_size=2)
    engine.add_requests(np.array([0.0, 0.0]), np.array([4, 4]), np.array([4, 4]))
    engine.step(Decision(prefill=np.array([0, 1])))
    engine.step(Decision(decode=np.array([0, 1])))  # 5 tokens each: 3 + 3 blocks > 5 → evict newest (id 1)
    records = engine.records()
    assert records.num_evictions.tolist() == [0, 1]
    assert engine.state().waiting.tolist() == [1]
    assert records.decoded.tolist() == [1, 0]
    check_engine(engine)
    # Request 0 finishes alone, then request 1 re-prefills its prompt (4) and runs to the end.
    while engine.state().running.size:
        engine.step(Decision(decode=engine.state().running))
    outcome = engine.step(Decision(prefill=np.array([1])))
    assert outcome.prefill_tokens == 4 and outcome.admitted.tolist() == [1]
    check_engine(engine)


def test_evicted_request_keeps_its_tokens_and_recomputes_them() -> None:
    engine = one_request_engine(prompt=4, output=3)
    engine.step(Decision(prefill=np.array([0])))
    engine.step(Decision(decode=np.array([0])))
    clock = engine.now
    preempted = engine.step(Decision(preempt=np.array([0])))
    assert preempted.evicted.tolist() == [0] and preempted.duration == 0.0 and engine.now == clock
    assert engine.records().decoded[0] == 1
    again = engine.step(Decision(prefill=np.array([0])))
    assert again.prefill_tokens == 5  # prompt 4 + the 1 token generated before the eviction
    assert engine.records().first_token_time[0] == pytest.approx(1.4)  # TTFT is the first one, kept


def test_deferred_admissions_stay_waiting() -> None:
    engine = SimulatedEngine(PAPER, capacity_blocks=4, block_size=2)
    engine.add_requests(np.zeros(3), np.array([4, 4, 4]), np.array([1, 1, 1]))
    outcome = engine.step(Decision(prefill=np.array([0, 1, 2])))
    assert outcome.admitted.tolist() == [0, 1] and outcome.deferred.tolist() == [2]
    assert outcome.evicted.size == 0
    assert engine.state().waiting.tolist() == [2]
    check_engine(engine)


@pytest.mark.parametrize(
    ("decision", "message"),
    [
        (Decision(decode=np.array([7])), "unknown request id 7"),
        (Decision(decode=np.array([-1])), "unknown request id -1"),
        (Decision(decode=np.array([1])), "request 1 cannot decode: it is waiting"),
        (Decision(decode=np.array([0]), prefill=np.array([0])), "request 0 appears more than once"),
        (Decision(prefill=np.array([0])), "request 0 has nothing to prefill"),
        (Decision(prefill=np.array([1]), prefill_tokens=np.array([0])), "allowed 1..4"),
        (Decision(prefill=np.array([1]), prefill_tokens=np.array([5])), "chunk of 5 tokens; allowed 1..4"),
        (Decision(prefill=np.array([1]), prefill_tokens=np.array([1, 2])), "2 entries for 1 prefills"),
        (Decision(preempt=np.array([1])), "preempt: request 1 is not running"),
    ],
)
def test_invalid_decisions_are_refused_and_lose_nothing(decision: Decision, message: str) -> None:
    engine = SimulatedEngine(PAPER, capacity_tokens=64, block_size=2)
    engine.add_requests(np.zeros(2), np.array([4, 4]), np.array([3, 3]))
    engine.step(Decision(prefill=np.array([0])))
    before = (engine.now, engine.num_waiting, engine.num_running, engine.used_blocks, engine.records().decoded.tolist())
    with pytest.raises(InvalidDecisionError, match=message):
        engine.step(decision)
    after = (engine.now, engine.num_waiting, engine.num_running, engine.used_blocks, engine.records().decoded.tolist())
    assert before == after
    check_engine(engine)


def test_impossible_configurations_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one block"):
        SimulatedEngine(PAPER, capacity_blocks=0)
    with pytest.raises(ConfigError, match="integer >= 1 token"):
        SimulatedEngine(PAPER, capacity_tokens=-5)
    with pytest.raises(ConfigError, match="less than one block"):
        SimulatedEngine(PAPER, capacity_tokens=8, block_size=16)
    with pytest.raises(ConfigError, match="c0"):
        LinearCostModel(c0=0.0)
    engine = SimulatedEngine(PAPER, capacity_tokens=32, block_size=16)
    with pytest.raises(RequestTooLargeError,
                       match=r"needs 40 KV tokens \(prompt 30 \+ output 10\).*capacity is 2 blocks"):
        engine.add_requests(np.zeros(1), np.array([30]), np.array([10]))
    with pytest.raises(ConfigError, match="both must be >= 1"):
        engine.add_requests(np.zeros(1), np.array([0]), np.array([10]))
    assert engine.num_requests == 0


def test_run_refuses_a_workload_with_an_impossible_request_before_running() -> None:
    engine = SimulatedEngine(PAPER, capacity_tokens=64, block_size=16)
    mix = TypeMix((RequestType(10, 10, 5.0), RequestType(60, 10, 0.5)))
    arrivals = PoissonWorkload(mix).sample(50.0, np.random.default_rng(0))
    with pytest.raises(RequestTooLargeError):
        run(engine, vllm_policy(), arrivals, 50.0)
    assert engine.num_requests == 0 and engine.now == 0.0


class StubbornPolicy:
    """Admits request 0 and then keeps asking for request 1, which never fits beside it."""

    name = "stubborn"

    def reset(self, engine: SimulatedEngine) -> None:
        pass

    def decide(self, state):  # type: ignore[no-untyped-def]
        if state.kv_tokens[0] == 0 and state.num_requests and state.context_len[0] == state.prompt_len[0]:
            return Decision(prefill=np.array([0]))
        return Decision(prefill=np.array([1])) if state.num_requests > 1 else IDLE


def test_a_decision_that_cannot_run_does_not_spin_the_loop() -> None:
    engine = SimulatedEngine(PAPER, capacity_blocks=3, block_size=2)
    arrivals = Arrivals(np.array([0.0, 0.0, 5.0]), np.array([4, 4, 4]), np.array([1, 1, 1]))
    result = run(engine, StubbornPolicy(), arrivals, horizon=100.0)
    assert result.iterations == 3  # the admission, then one deferred try at t = 0 and one at t = 5
    assert result.running == 1 and result.waiting == 2 and engine.now == 5.0
    assert result.block_seconds == pytest.approx(2 * 1.4 + 2 * (5.0 - 1.4))  # request 0's KV stays held while idle


class RandomPolicy:
    """Adversarial decisions: random decode subsets, random admissions with random chunks, random preemptions."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def reset(self, engine: SimulatedEngine) -> None:
        self.rng = np.random.default_rng(self.seed)

    def decide(self, state):  # type: ignore[no-untyped-def]
        rng = self.rng
        running = state.running
        ready = running[state.kv_tokens[running] == state.context_len[running]]
        prefilling = running[state.kv_tokens[running] < state.context_len[running]]
        preempt = ready[rng.random(len(ready)) < 0.05]
        decode = np.setdiff1d(ready[rng.random(len(ready)) < 0.8], preempt)
        waiting = state.waiting
        admit = waiting[rng.random(len(waiting)) < 0.5][:8]
        prefill = np.concatenate([prefilling, admit])
        remaining = state.context_len[prefill] - state.kv_tokens[prefill]
        chunk = np.maximum(1, (remaining * rng.random(len(prefill))).astype(np.int64))
        chunk = np.where(rng.random(len(prefill)) < 0.5, remaining, chunk)
        if len(decode) == 0 and len(prefill) == 0:
            return IDLE
        return Decision(decode=decode, prefill=prefill, prefill_tokens=chunk, preempt=preempt)


mixes = st.lists(
    st.tuples(st.integers(1, 48), st.integers(1, 48), st.floats(0.5, 8.0)), min_size=1, max_size=3
).map(lambda rows: TypeMix(tuple(RequestType(p, o, r) for p, o, r in rows)))


@given(mix=mixes, slack=st.integers(0, 200), block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16),
       policy=st.sampled_from(["vllm", "sarathi", "random"]))
def test_invariants_hold_under_every_policy_on_random_workloads(mix: TypeMix, slack: int, block: int, seed: int,
                                                                policy: str) -> None:
    largest = int((mix.prompt_lens + mix.output_lens).max())
    capacity = (-(-largest // block)) * block + slack
    engine = SimulatedEngine(LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=1e-4, c_kv=1e-5),
                             capacity_tokens=capacity, block_size=block)
    chosen = {"vllm": lambda: vllm_policy(max_num_batched_tokens=64),
              "sarathi": lambda: sarathi_policy(max_num_batched_tokens=32),
              "random": lambda: RandomPolicy(seed)}[policy]()
    arrivals = PoissonWorkload(mix).sample(20.0, np.random.default_rng(seed))
    checker = InvariantChecker()
    result = run(engine, chosen, arrivals, 20.0, callbacks=[checker])
    assert result.arrived == len(arrivals) == result.finished + result.waiting + result.running
    # Every decode token processed went to a request that needed it: no token is generated twice.
    assert checker.decode_tokens == int(engine.records().decoded.sum())


@given(mix=mixes, slack=st.integers(0, 200), block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16),
       policy=st.sampled_from(["vllm", "sarathi", "random"]), attention=st.booleans())
def test_compiled_iterations_match_the_numpy_path_exactly(mix: TypeMix, slack: int, block: int, seed: int,
                                                          policy: str, attention: bool) -> None:
    """The compiled iteration and the NumPy reference (tests/reference_engine.py) give the same outcome at every
    iteration and the same records, bit for bit, under random policies that mix chunks, preemptions and
    overflows."""
    largest = int((mix.prompt_lens + mix.output_lens).max())
    capacity = (-(-largest // block)) * block + slack
    cost = LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=1e-4, c_kv=1e-5, c_pf2=3e-7 if attention else 0.0)
    arrivals = PoissonWorkload(mix).sample(15.0, np.random.default_rng(seed))
    runs = []
    for engine_class in (SimulatedEngine, ReferenceEngine):
        engine = engine_class(cost, capacity_tokens=capacity, block_size=block)
        chosen = {"vllm": lambda: vllm_policy(max_num_batched_tokens=64),
                  "sarathi": lambda: sarathi_policy(max_num_batched_tokens=32),
                  "random": lambda: RandomPolicy(seed)}[policy]()
        outcomes: list[tuple] = []
        run(engine, chosen, arrivals, 15.0,
            callbacks=[lambda _, o: outcomes.append(tuple(x.tolist() if isinstance(x, np.ndarray) else x for x in o))])
        runs.append((outcomes, engine.records()))
    assert runs[0][0] == runs[1][0]
    for field in runs[0][1].__dataclass_fields__:
        np.testing.assert_array_equal(getattr(runs[0][1], field), getattr(runs[1][1], field), err_msg=field)


@pytest.mark.parametrize("policy", [vllm_policy, sarathi_policy])
def test_same_seed_reproduces_the_run_bit_for_bit(policy) -> None:  # type: ignore[no-untyped-def]
    scenario = build_scenario(types="p=30,o=40,rate=30;p=60,o=20,rate=20", memory_tokens=3000, block_size=16)
    runs = []
    for _ in range(2):
        arrivals = scenario.sample(30.0, seed=7)
        result = run(scenario.engine(), policy(), arrivals, 30.0)
        runs.append(result.records)
    for field in runs[0].__dataclass_fields__:
        np.testing.assert_array_equal(getattr(runs[0], field), getattr(runs[1], field), err_msg=field)
    other = run(scenario.engine(), policy(), scenario.sample(30.0, seed=8), 30.0).records
    assert not np.array_equal(other.arrival_time[:10], runs[0].arrival_time[:10])


def test_vllm_policy_is_unstable_with_tight_memory_and_stable_with_ample_memory() -> None:
    """ρ = 0.8 < 1: with C = 1.1·M* greedy admission evicts and the queue grows; with C = 3·M* it is stable."""
    base = build_scenario()
    scenario = base.at_rate(base.rate_for_load(0.8))
    assert scenario.mix is not None
    memory = solve_fluid(scenario.mix, scenario.cost, 10**9).memory_tokens
    outcomes = {}
    for factor in (1.1, 3.0):
        tight = replace(scenario, capacity_tokens=int(factor * memory))
        recorder = TimeSeriesRecorder()
        result = run(tight.engine(), vllm_policy(), tight.sample(400.0, seed=0), 400.0, callbacks=[recorder])
        series = recorder.arrays()
        middle = series["waiting"][np.searchsorted(series["time"], 200.0)]
        outcomes[factor] = (result.evictions, middle, result.waiting)
    evictions, middle, end = outcomes[1.1]
    assert evictions > 1000 and end > middle > 100  # the queue keeps growing
    evictions, middle, end = outcomes[3.0]
    assert evictions == 0 and end < 20
