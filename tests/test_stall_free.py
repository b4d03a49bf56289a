"""Stall-free batching of the WAIT family's decisions (baselines.stall_free): what an iteration holds, that a budget
is never exceeded, that a budget nothing reaches changes nothing, and bad settings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from baselines import make_policy
from baselines.adaptive import AdaptiveNestedWaitPolicy, AdaptiveWaitPolicy
from baselines.nested_wait import NestedWaitPolicy
from baselines.stall_free import DRAIN_ITERATIONS, LATENCY_ORDER, backlog_budget, latency_order, stall_free_batch
from baselines.wait import WaitPolicy
from llmsched_env import Arrivals, ConfigError, LinearCostModel, RequestType, TypeMix, run
from llmsched_env.engine import Decision, IterationOutcome, SchedulerState
from llmsched_env.scenario import Scenario
from llmsched_env.simulator import SimulatedEngine
from tests.invariants import InvariantChecker

COST = LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=1e-4, c_kv=1e-5)


def _batch(decode: list[int], admit: list[int], running: list[int], context: dict[int, int], kv: dict[int, int],
           budget: int) -> tuple[list[int], list[int], list[int], bool]:
    size = max([*context, *running, *admit]) + 1
    context_len, kv_tokens = np.zeros(size, np.int64), np.zeros(size, np.int64)
    for i, value in context.items():
        context_len[i] = value
    for i, value in kv.items():
        kv_tokens[i] = value
    out = stall_free_batch(np.array(decode, np.int64), np.array(admit, np.int64), np.array(running, np.int64),
                           context_len, kv_tokens, budget)
    return out[0].tolist(), out[1].tolist(), out[2].tolist(), out[3]


def test_an_iteration_decodes_first_then_continues_prefills_then_admits_in_the_rule_s_order() -> None:
    # Running: 5 and 7 cached (the rule decodes both), 2 partway through its prefill (40 of 100), 9 cached but
    # not chosen by the rule (it pauses). The rule admits 11, 12, 13 (30, 50, 40 tokens) in that order.
    context = {5: 20, 2: 100, 7: 31, 9: 12, 11: 30, 12: 50, 13: 40}
    kv = {5: 20, 2: 40, 7: 31, 9: 12}
    decode, prefill, chunk, as_decided = _batch([7, 5, 2], [11, 12, 13], [5, 2, 7, 9], context, kv, budget=100)
    assert decode == [5, 7]  # the batch's order; 9 was not chosen; 2 cannot decode before its prefill ends
    assert prefill == [2, 11, 12] and chunk == [60, 30, 8] and not as_decided  # 2 + 60 + 30 + 8 = the budget
    # The same choice in another order: the same iteration.
    assert _batch([2, 5, 7], [11, 12, 13], [5, 2, 7, 9], context, kv, budget=100)[:3] == (decode, prefill, chunk)
    # A budget the decodes fill: the oldest decode, nothing else.
    assert _batch([5, 7], [11], [5, 7], context, kv, budget=1) == ([5], [], [], False)
    # Nothing to decode or admit, but a prefill in progress: it goes on (the rule's "wait" does not strand it).
    assert _batch([], [], [2], context, kv, budget=16) == ([], [2], [16], False)
    # Room for everything the rule decided: the decision itself.
    assert _batch([5, 7], [11, 13], [5, 9, 7], context, kv, budget=72) == ([5, 7], [11, 13], [30, 40], True)
    assert _batch([5, 7], [11, 13], [5, 9, 7], context, kv, budget=71) == ([5, 7], [11, 13], [30, 39], False)


def test_the_budget_follows_the_backlog_only_beyond_what_it_drains_in_time() -> None:
    assert backlog_budget(2048, 0, 500.0, 64) == 2048
    assert backlog_budget(2048, 262, 500.0, 64) == 2048  # 131,000 tokens: 63.96 iterations of the budget
    assert backlog_budget(2048, 263, 500.0, 64) == 2055  # ceil(131,500 / 64)
    assert backlog_budget(2048, 1000, 500.0, 64) == 7813
    assert backlog_budget(2048, 10**6, 500.0, 0) == 2048  # no draining: the budget is fixed
    assert backlog_budget(0, 10**6, 500.0, 64) == 0  # whole prefills stay whole


def test_the_latency_order_serves_the_largest_projected_latency_first() -> None:
    # Ids 1-4 waiting: arrivals 0, 1, 2, 3 s; outputs 10, 100, 10, 40; id 4 was evicted after 35 of its 40 tokens
    # (context = prompt + 35), so 5 remain. Key: arrival - w · remaining.
    arrival = np.array([0.0, 0.0, 1.0, 2.0, 3.0])
    prompt = np.array([0, 8, 8, 8, 8])
    output = np.array([0, 10, 100, 10, 40])
    context = np.array([0, 8, 8, 8, 43])
    admit = np.array([1, 2, 3, 4], dtype=np.int64)
    assert latency_order(admit, arrival, prompt, context, output, 0.0).tolist() == [1, 2, 3, 4]  # queue order
    # 0.01 s/token: keys -0.1, 0.0, 1.9, 2.95; 0.1: -1, -9, 1, 2.5 (the long output first)
    assert latency_order(admit, arrival, prompt, context, output, 0.01).tolist() == [1, 2, 3, 4]
    assert latency_order(admit, arrival, prompt, context, output, 0.1).tolist() == [2, 1, 3, 4]
    # 1 s/token: -10, -99, -8, -2 (the evicted request's 5 tokens left count, not its 40)
    assert latency_order(admit, arrival, prompt, context, output, 1.0).tolist() == [2, 1, 3, 4]
    # Equal keys keep the rule's order, whichever it was.
    tie = np.array([0.0, 0.0, 0.0]), np.zeros(3, np.int64), np.zeros(3, np.int64), np.array([5, 5, 5])
    assert latency_order(np.array([2, 0, 1]), *tie, 0.5).tolist() == [2, 0, 1]


@pytest.mark.parametrize("weight", [0.0, LATENCY_ORDER])
def test_a_long_output_admitted_behind_short_ones_is_prefilled_first_in_the_latency_order(weight: float) -> None:
    # A burst of 7 requests: six of 1 output token, then one of 60, prompts of 16 tokens, a budget of 16 tokens (one
    # prompt per iteration), memory for all. In queue order the long one starts last and finishes last by its whole
    # decode; by projected latency it is prefilled first once an iteration has given the seconds per token.
    scenario = _scenario(TypeMix((RequestType(16, 1, 6.0), RequestType(16, 60, 1.0))), 4000, known=True)
    burst = Arrivals(np.zeros(7), np.full(7, 16), np.array([1, 1, 1, 1, 1, 1, 60]))
    policy = replace(make_policy("wait", scenario, 3.0), token_budget=16, latency_order_weight=weight)
    result = run(scenario.engine(), policy, burst, 60.0, keep_records=True)
    first = result.records.first_token_time
    assert result.finished == 7
    if weight == 0:
        assert first[6] > first[:6].max()
    else:
        assert first[6] < first[1:6].min()  # after the first iteration, which set the seconds per token
        latency = result.records.finish_time - result.records.arrival_time
        assert latency.max() < run(scenario.engine(), replace(policy, latency_order_weight=0.0), burst, 60.0,
                                   keep_records=True).records.finish_time.max()


def _scenario(mix: TypeMix, capacity: int, known: bool) -> Scenario:
    return Scenario(COST, capacity, 4, mix=mix, output_lengths_known=known)


class _BudgetChecker:
    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, engine: SimulatedEngine, outcome: IterationOutcome) -> None:
        assert outcome.prefill_tokens + outcome.decode_tokens <= self.budget


@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.integers(1, 120), min_size=1, max_size=3), output=st.integers(1, 30),
       budget=st.integers(1, 64), seed=st.integers(0, 2**16), base=st.sampled_from(
           ["wait", "nested-wait", "wait-adaptive", "nested-wait-adaptive"]), slack=st.integers(0, 50))
def test_no_iteration_exceeds_the_budget_and_every_request_is_accounted_for(
        prompts: list[int], output: int, budget: int, seed: int, base: str, slack: int) -> None:
    mix = TypeMix(tuple(RequestType(p, output, 2.0) for p in prompts))
    largest_blocks = -(-(max(prompts) + output) // 4)
    scenario = _scenario(mix, 4 * (largest_blocks + slack), known=not base.startswith("nested"))
    policy = make_policy(base, scenario, 10.0)
    policy.token_budget = budget  # type: ignore[attr-defined]
    invariants, within = InvariantChecker(), _BudgetChecker(budget)
    arrivals = scenario.sample(10.0, seed)
    result = run(scenario.engine(), policy, arrivals, 10.0, callbacks=[invariants, within])
    assert result.arrived == len(arrivals) == result.finished + result.waiting + result.running


class _WaitingSeen:
    """``policy.decide`` recording the queue's length it decided on (the Python path: callbacks run it)."""

    def __init__(self, policy: WaitPolicy | NestedWaitPolicy) -> None:
        self.seen: list[int] = []  # the queue's length at each decision
        decide = policy.decide

        def seen(state: SchedulerState) -> Decision:
            self.seen.append(state.num_waiting)
            return decide(state)
        policy.decide = seen  # type: ignore[method-assign]


@settings(max_examples=30, deadline=None)
@given(prompt=st.integers(20, 120), budget=st.integers(8, 64), drain=st.integers(1, 8), seed=st.integers(0, 2**16),
       base=st.sampled_from(["wait", "nested-wait"]), rate=st.floats(4.0, 40.0))
# The policy's mean prompt is the type's within rounding (61.00000000000001 here): one prompt of 61 tokens asks for
# a 62-token budget at a drain of one iteration, so the queue's tokens are counted as the policy counts them.
@example(prompt=61, budget=61, drain=1, seed=0, base="wait", rate=8.409141900883752)
def test_a_draining_budget_stays_within_what_the_queue_asks_and_grows_only_with_it(
        prompt: int, budget: int, drain: int, seed: int, base: str, rate: float) -> None:
    mix = TypeMix((RequestType(prompt, 6, rate),))
    scenario = _scenario(mix, 4 * 40 * (-(-(prompt + 6) // 4)), known=base == "wait")
    policy = replace(make_policy(base, scenario, 5.0), token_budget=budget, drain_iterations=drain)
    seen, invariants = _WaitingSeen(policy), InvariantChecker()
    mean_prompt = policy.mean_prompt if base == "wait" else float(policy.thresholds.prompt_len)
    assert mean_prompt == pytest.approx(prompt, rel=1e-12)  # one type: its prompt
    raised = []

    def within(engine: SimulatedEngine, outcome: IterationOutcome) -> None:
        # The iteration the last decision made, within the budget of the queue it saw.
        allowed = backlog_budget(budget, seen.seen[-1], mean_prompt, drain)
        assert outcome.prefill_tokens + outcome.decode_tokens <= allowed
        raised.append(allowed > budget)
    arrivals = scenario.sample(5.0, seed)
    result = run(scenario.engine(), policy, arrivals, 5.0, callbacks=[invariants, within])
    assert result.arrived == len(arrivals) == result.finished + result.waiting + result.running
    assert len(raised) == result.iterations
    if not any(waiting * mean_prompt > drain * budget for waiting in seen.seen):
        assert not any(raised)  # a queue the budget drains in time never raises it


def test_a_long_queue_raises_the_budget_and_a_short_one_leaves_it() -> None:
    # 30 prompts of 50 tokens at once, budget 16: drained over 2 iterations, the first iteration takes
    # ceil(30 × 50 / 2) = 750 tokens (as many whole prompts as memory lets in); with the budget fixed, 16.
    scenario = _scenario(TypeMix((RequestType(50, 3, 1.0),)), 4 * 30 * 14, known=True)
    burst = Arrivals(np.zeros(30), np.full(30, 50), np.full(30, 3))
    for drain, first in [(0, 16), (2, 750), (10**6, 16)]:
        tokens: list[int] = []
        policy = replace(make_policy("wait", scenario, 3.0), token_budget=16, drain_iterations=drain)
        result = run(scenario.engine(), policy, burst, 60.0,
                     callbacks=[lambda engine, outcome: tokens.append(outcome.prefill_tokens + outcome.decode_tokens)])
        assert result.finished == 30 and tokens[0] == first, (drain, tokens[:3])


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks() -> None:
    scenario = _scenario(TypeMix((RequestType(50, 3, 1.0),)), 200, known=True)
    one = Arrivals(np.array([0.0]), np.array([50]), np.array([3]))
    whole = run(scenario.engine(), make_policy("wait", scenario, 3.0), one, 60.0)
    chunked = run(scenario.engine(), replace(make_policy("wait", scenario, 3.0), token_budget=16), one, 60.0)
    assert whole.finished == chunked.finished == 1
    assert chunked.iterations == whole.iterations + 3  # ceil(50 / 16) = 4 prefill iterations instead of 1


@pytest.mark.parametrize("known", [True, False])
def test_a_budget_no_iteration_reaches_changes_nothing(known: bool) -> None:
    mix = TypeMix((RequestType(60, 40, 6.0), RequestType(200, 10, 2.0)))
    scenario = _scenario(mix, 3000, known)
    arrivals = scenario.sample(60.0, 7)
    create = AdaptiveWaitPolicy.create if known else AdaptiveNestedWaitPolicy.create
    runs = [run(scenario.engine(), create(COST, 3000, 4, token_budget=budget), arrivals, 60.0)  # type: ignore[operator]
            for budget in (0, 10**9)]
    assert runs[0].iterations > 100 and runs[0].finished > 100
    for field in ("iterations", "end_time", "finished", "evictions", "peak_blocks_used"):
        assert getattr(runs[0], field) == getattr(runs[1], field), field
    for field in runs[0].records.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(runs[0].records, field), getattr(runs[1].records, field))


@pytest.mark.parametrize("name", ["wait-adaptive-stall-free", "nested-wait-adaptive-stall-free"])
def test_a_residual_agent_s_scale_scales_the_budget_too(name: str) -> None:
    scenario = _scenario(TypeMix((RequestType(10, 5, 1.0),)), 100, known=True)
    policy = make_policy(name, scenario, 10.0)
    policy.reset(scenario.engine())
    assert policy.iteration_budget == 2048  # type: ignore[attr-defined]
    for scale, budget in [(2.0, 4096), (0.25, 512), (1.5, 3072), (1.0, 2048)]:
        policy.set_threshold_scale(scale)  # type: ignore[attr-defined]
        assert policy.iteration_budget == budget and policy.compiled_rule().token_budget == budget  # type: ignore
    whole = make_policy(name.replace("-stall-free", ""), scenario, 10.0)
    whole.reset(scenario.engine())
    whole.set_threshold_scale(2.0)  # type: ignore[attr-defined]
    assert whole.iteration_budget == 0  # type: ignore[attr-defined]  # whole prefills stay whole


def test_the_stall_free_presets_and_a_negative_budget() -> None:
    scenario = _scenario(TypeMix((RequestType(10, 5, 1.0),)), 100, known=True)
    for name in ("wait-adaptive-stall-free", "nested-wait-adaptive-stall-free"):
        preset = make_policy(name, scenario, 10.0)
        assert (preset.token_budget, preset.drain_iterations) == (2048, DRAIN_ITERATIONS)  # type: ignore[attr-defined]
    assert make_policy("wait-adaptive-stall-free", scenario, 10.0).latency_order_weight == LATENCY_ORDER  # type: ignore
    assert make_policy("nested-wait-adaptive-stall-free", scenario, 10.0).name == "nested-wait-adaptive-stall-free"
    policy = replace(make_policy("nested-wait", scenario, 10.0), token_budget=-1)
    with pytest.raises(ConfigError, match="token_budget must be 0 .* got -1"):
        run(scenario.engine(), policy, scenario.sample(1.0, 0), 1.0)
    for name in ("wait", "nested-wait"):
        policy = replace(make_policy(name, scenario, 10.0), token_budget=64, drain_iterations=-3)
        with pytest.raises(ConfigError, match="drain_iterations must be 0 .* got -3"):
            run(scenario.engine(), policy, scenario.sample(1.0, 0), 1.0)
    for weight in (-1.0, float("nan"), float("inf")):
        policy = replace(make_policy("wait", scenario, 10.0), token_budget=64, latency_order_weight=weight)
        with pytest.raises(ConfigError, match="latency_order_weight must be 0 .* got"):
            run(scenario.engine(), policy, scenario.sample(1.0, 0), 1.0)
