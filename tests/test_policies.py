"""The policies: WAIT's two rules, Nested WAIT's blindness to output lengths and its overflow guard,
the engine invariants under every policy, and the paper's qualitative result."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from baselines import POLICIES, make_policy
from baselines.compare import SEES_OUTPUT_LENGTHS
from baselines.nested_wait import NestedWaitPolicy
from baselines.thresholds import OutputLengthDistribution, WaitThresholds, nested_wait_thresholds
from baselines.wait import WaitPolicy
from llmsched_env import ConfigError, Decision, LinearCostModel, RequestType, SimulatedEngine, TypeMix, run
from llmsched_env.fluid import solve_fluid
from llmsched_env.metrics import summarize
from llmsched_env.scenario import Scenario, build_scenario
from tests.invariants import InvariantChecker

COST = LinearCostModel.paper(d0=1.0, d1=0.01)


def wait_policy(variant: str, n: int = 2, drain: bool = False, lend: bool = False,
                memory_blocks: int = 0) -> WaitPolicy:
    mix = TypeMix((RequestType(4, 3, 1.0),))
    thresholds = WaitThresholds(n=np.array([n]), iteration_time_s=1.0, memory_tokens=0.0, memory_blocks=memory_blocks,
                                scale=1.0, fluid_memory_tokens=0.0, capacity_blocks=100)
    return WaitPolicy(mix, thresholds, variant, drain_when_idle=drain,  # type: ignore[arg-type]
                      memory_safe=variant == "measured", lend_spare_memory=lend)


def arrive(engine: SimulatedEngine, count: int) -> None:
    engine.add_requests(np.full(count, engine.now), np.full(count, 4), np.full(count, 3))


def test_wait_paper_rule_gates_on_thresholds_and_pauses_cohorts_with_their_kv() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=1000, block_size=1)
    policy = wait_policy("paper")
    policy.reset(engine)
    arrive(engine, 1)
    assert policy.decide(engine.state()).is_idle  # 1 < n = 2 waiting: not ready
    arrive(engine, 1)
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [0, 1] and decision.decode.size == 0
    engine.step(decision)
    # No new arrivals: the type is not ready, so its running cohort pauses, KV kept.
    assert policy.decide(engine.state()).is_idle
    assert engine.state().kv_tokens[[0, 1]].tolist() == [4, 4]
    arrive(engine, 3)
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [2, 3]  # a cohort of n = 2, oldest first; request 4 waits
    assert decision.decode.tolist() == [0, 1]  # and up to n from every stage of the type


def test_wait_paper_rule_takes_at_most_n_per_stage() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=1000, block_size=1)
    policy = wait_policy("paper", n=1)
    policy.reset(engine)
    arrive(engine, 2)
    engine.step(Decision(prefill=np.array([0, 1])))  # two requests in stage 1 (hand-made, above threshold)
    arrive(engine, 1)
    decision = policy.decide(engine.state())
    assert decision.decode.tolist() == [0] and decision.prefill.tolist() == [2]


def test_wait_measured_variant_advances_every_decode() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=1000, block_size=1)
    policy = wait_policy("measured")
    policy.reset(engine)
    arrive(engine, 2)
    engine.step(policy.decide(engine.state()))
    arrive(engine, 1)  # not ready: no admission, but the running cohort decodes
    decision = policy.decide(engine.state())
    assert decision.decode.tolist() == [0, 1] and decision.prefill.size == 0


def test_wait_drains_an_idle_engine_instead_of_stranding_requests_below_threshold() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=1000, block_size=1)
    policy = wait_policy("measured", n=3, drain=True)
    policy.reset(engine)
    arrive(engine, 2)  # below the threshold, and nothing else to do
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [0, 1]
    engine.step(decision)
    arrive(engine, 1)  # below the threshold while cohorts run: the gate stays shut
    decision = policy.decide(engine.state())
    assert decision.prefill.size == 0 and decision.decode.tolist() == [0, 1]


def test_wait_drains_rather_than_lending_one_request_at_a_time() -> None:
    # No type ready (n = 40, above the queue) and WAIT's reserve leaving spare room for one request (7 of 100
    # blocks): lending alone would admit one request whenever the batch empties, so the batch would never be idle
    # for the drain and a backlog below the thresholds would run one request at a time.
    engine = SimulatedEngine(COST, capacity_tokens=100, block_size=1)
    policy = wait_policy("measured", n=40, drain=True, lend=True, memory_blocks=93)
    policy.reset(engine)
    arrive(engine, 10)  # 10 x 7 tokens at their peak: all fit the cache, one fits the spare room
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == list(range(10))  # nothing runs: the drain decides, on the whole cache
    engine.step(decision)
    arrive(engine, 1)  # while they run, lending keeps to the spare room, which the running batch fills
    decision = policy.decide(engine.state())
    assert decision.prefill.size == 0 and decision.decode.tolist() == list(range(10))


def test_wait_needs_known_output_lengths() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=1000, output_lengths_known=False)
    with pytest.raises(ConfigError, match="needs output lengths known.*nested-wait"):
        wait_policy("measured").reset(engine)


def nested_policy(variant: str = "measured", capacity: int = 118_784) -> NestedWaitPolicy:
    distribution = OutputLengthDistribution.from_samples(np.array([8, 16, 32]), np.array([0.5, 0.3, 0.2]))
    thresholds = nested_wait_thresholds(distribution, 20, 20.0, LinearCostModel(c0=0.01, c_kv=1e-6), capacity,
                                        horizon_s=100)
    return NestedWaitPolicy(thresholds, variant, "nested-wait", drain_when_idle=variant == "measured")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["measured", "paper"])
def test_nested_wait_never_uses_output_lengths(variant: str) -> None:
    """Two workloads that differ only in output lengths get identical decisions until a finish tells them apart.

    A policy that read output lengths (through the state or otherwise) would diverge earlier.
    """
    rng = np.random.default_rng(0)
    count = 400
    times = np.sort(rng.uniform(0, 20, count))
    prompts = np.full(count, 20)
    # Every length differs between the worlds; all outlive the boundaries 8 and 16, so the comparison
    # covers admissions and both boundary crossings before the first finish (stage 32) reveals a length.
    outputs_a = rng.choice([32, 40], size=count)
    outputs_b = outputs_a + 30
    engines = [SimulatedEngine(LinearCostModel(c0=0.01, c_kv=1e-6), capacity_tokens=118_784,
                               output_lengths_known=False) for _ in range(2)]
    policies = [nested_policy(variant), nested_policy(variant)]
    for engine, policy in zip(engines, policies):
        policy.reset(engine)
    assert engines[0].state().output_len is None  # hidden: the state does not carry them at all
    added, compared = 0, 0
    while True:
        now = engines[0].now
        end = int(np.searchsorted(times, now, side="right"))
        for engine, outputs in zip(engines, (outputs_a, outputs_b)):
            engine.add_requests(times[added:end], prompts[added:end], outputs[added:end])
        added = end
        decisions = [policy.decide(engine.state()) for policy, engine in zip(policies, engines)]
        assert decisions[0].decode.tolist() == decisions[1].decode.tolist()
        assert decisions[0].prefill.tolist() == decisions[1].prefill.tolist()
        compared += 1
        if decisions[0].is_idle:
            if added == count:
                break
            for engine in engines:
                engine.advance_to(times[added])
            continue
        finished = [engine.step(d).finished.tolist() for engine, d in zip(engines, decisions)]
        if finished[0] != finished[1]:
            break  # a length is now revealed, differently in the two worlds
    assert compared > 40


def test_nested_wait_drains_rather_than_lending_one_request_at_a_time() -> None:
    # Nothing running, segment 1 shut (n_1 = 40 above the queue) and a reserve leaving spare room for one request
    # at its lookahead peak (20 prompt tokens and 32 at the residual's 90th percentile, of 60 spare tokens):
    # lending alone would admit one request whenever the batch empties, the batch never idle for the drain.
    from baselines.lookahead import residual_quantiles

    distribution = OutputLengthDistribution.from_samples(np.array([8, 16, 32]), np.array([0.5, 0.3, 0.2]))
    policy = NestedWaitPolicy(replace(nested_policy().thresholds, n=np.array([40, 40, 40])), "measured",
                              drain_when_idle=True, lend_spare_memory=True, reserve_tokens=540.0,
                              lookahead=residual_quantiles(distribution.values, distribution.probabilities, 0.9))
    engine = SimulatedEngine(LinearCostModel(c0=0.01, c_kv=1e-6), capacity_tokens=600, block_size=1,
                             output_lengths_known=False)
    policy.reset(engine)
    engine.add_requests(np.zeros(10), np.full(10, 20), np.full(10, 32))
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == list(range(10))  # the drain decides, on the whole cache (10 x 52 <= 600)


@pytest.mark.parametrize(("capacity", "entering"), [(10_000, 5), (200, 2)])
def test_a_ready_gate_lets_its_whole_queue_through_while_the_lookahead_fits(capacity: int, entering: int) -> None:
    """Five requests wait at boundary 8 behind a gate of n_2 = 2. With memory to spare the whole queue enters
    (they hold their KV either way); when the lookahead projection (each at 28 tokens, 24 more at the
    residual's 90th percentile: 5 × 52 = 260) exceeds a capacity of 200, only n_2 do, as the paper's rule says."""
    from baselines.lookahead import residual_quantiles

    base = nested_policy()
    distribution = OutputLengthDistribution.from_samples(np.array([8, 16, 32]), np.array([0.5, 0.3, 0.2]))
    policy = NestedWaitPolicy(replace(base.thresholds, n=np.array([1, 2, 2])), "measured", drain_when_idle=True,
                              lookahead=residual_quantiles(distribution.values, distribution.probabilities, 0.9))
    engine = SimulatedEngine(LinearCostModel(c0=0.01, c_kv=1e-6), capacity_tokens=capacity, block_size=1,
                             output_lengths_known=False)
    policy.reset(engine)
    engine.add_requests(np.zeros(5), np.full(5, 20), np.full(5, 32))
    engine.step(Decision(prefill=np.arange(5)))
    for _ in range(8):
        engine.step(Decision(decode=np.arange(5)))
    engine.add_requests(np.full(1, engine.now), np.full(1, 20), np.full(1, 32))  # segment 1 ready (n_1 = 1)
    state = engine.state()
    assert (state.context_len[:5] - 20).tolist() == [8] * 5 and policy._projected_peak(state) == 260
    decision = policy.decide(state)
    assert decision.decode.tolist() == list(range(entering))
    assert decision.prefill.tolist() == ([5] if capacity == 10_000 else [])


def test_nested_wait_guard_keeps_memory_and_never_deadlocks() -> None:
    """A capacity far below the safety buffer: the guard pauses segments, falls back to the engine's
    evictions when it must, every invariant holds, and once arrivals stop everything finishes."""
    policy = nested_policy(capacity=600)
    assert not policy.thresholds.buffer_met
    engine = SimulatedEngine(LinearCostModel(c0=0.01, c_kv=1e-6), capacity_tokens=600, block_size=4,
                             output_lengths_known=False)
    rng = np.random.default_rng(1)
    count = 300
    times = np.sort(rng.uniform(0, 1, count))  # a burst far above the 20 req/s the thresholds expect
    engine_arrivals = (times, np.full(count, 20), rng.choice([8, 16, 32], size=count, p=[0.5, 0.3, 0.2]))
    from llmsched_env.workload import Arrivals

    checker = InvariantChecker()
    result = run(engine, policy, Arrivals(*engine_arrivals), horizon=1_000.0, callbacks=[checker])
    assert policy.guard_activations > 0
    assert result.finished == count and result.waiting == result.running == 0


def scenario_for(mix: TypeMix, capacity: int, block: int) -> Scenario:
    return Scenario(LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=1e-4, c_kv=1e-5), capacity, block, mix=mix)


mixes = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(0.5, 10.0)), min_size=1,
                 max_size=3).map(lambda rows: TypeMix(tuple(RequestType(p, o, r) for p, o, r in rows)))


@given(mix=mixes, slack=st.integers(0, 300), block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16),
       policy=st.sampled_from(sorted(POLICIES)))
def test_every_policy_keeps_the_engine_invariants(mix: TypeMix, slack: int, block: int, seed: int, policy: str) -> None:
    largest = int((mix.prompt_lens + mix.output_lens).max())
    scenario = replace(scenario_for(mix, (-(-largest // block)) * block + slack, block),
                       output_lengths_known=policy in SEES_OUTPUT_LENGTHS)
    checker = InvariantChecker()
    arrivals = scenario.sample(15.0, seed)
    result = run(scenario.engine(), make_policy(policy, scenario, 15.0), arrivals, 15.0, callbacks=[checker])
    assert result.arrived == len(arrivals) == result.finished + result.waiting + result.running


def test_paper_result_wait_is_stable_where_vllm_evicts() -> None:
    """ρ = 0.8 with C = 1.5·M*: vLLM-style admission evicts and queues; WAIT does not, and serves more, faster."""
    base = build_scenario()
    scenario = base.at_rate(base.rate_for_load(0.8))
    assert scenario.mix is not None
    memory = solve_fluid(scenario.mix, scenario.cost, 10**9).memory_tokens
    scenario = replace(scenario, capacity_tokens=int(1.5 * memory))
    horizon = 900.0
    arrivals = scenario.sample(horizon, seed=0)
    fluid = scenario.fluid(arrivals, horizon)
    rows = {}
    for name in ("wait", "nested-wait", "vllm", "sarathi"):
        setting = replace(scenario, output_lengths_known=name in SEES_OUTPUT_LENGTHS)
        result = run(setting.engine(), make_policy(name, setting, horizon), arrivals, horizon)
        rows[name] = summarize(result, fluid)
    assert rows["vllm"]["evictions"] > 1000 and rows["sarathi"]["evictions"] > 1000
    assert rows["wait"]["evictions"] == 0
    assert rows["wait"]["throughput_rps"] > rows["vllm"]["throughput_rps"]
    assert rows["wait"]["waiting"] < rows["vllm"]["waiting"]
    for fluid_guided in ("wait", "nested-wait"):
        for engine_policy in ("vllm", "sarathi"):
            assert rows[fluid_guided]["mean_latency_s"] < rows[engine_policy]["mean_latency_s"]
            assert rows[fluid_guided]["p99_latency_s"] < rows[engine_policy]["p99_latency_s"]


@pytest.mark.slow
def test_wait_regret_grows_sublinearly_when_memory_suffices() -> None:
    """ρ = 0.8, C ample: regret at T, 4T and 16T grows far slower than T (linear would multiply by 16)."""
    base = build_scenario()
    scenario = base.at_rate(base.rate_for_load(0.8))
    regrets = []
    for horizon in (150.0, 600.0, 2400.0):
        arrivals = scenario.sample(horizon, seed=0)
        result = run(scenario.engine(), make_policy("wait", scenario, horizon), arrivals, horizon)
        regrets.append(summarize(result, scenario.fluid(arrivals, horizon))["regret_requests"])
    assert regrets[2] < 3 * regrets[0]
    assert regrets[2] / 2400.0 < regrets[0] / 150.0 / 5


traces = st.lists(st.tuples(st.floats(0.0, 0.5), st.integers(1, 120), st.integers(1, 200)), min_size=1, max_size=120)


@given(trace=traces, slack=st.integers(0, 400), block=st.sampled_from([1, 4, 16]), mix=mixes,
       policy=st.sampled_from(["wait", "wait-adaptive"]))
def test_wait_with_known_lengths_never_evicts_on_any_trace(trace: list[tuple[float, int, int]], slack: int, block: int,
                                                           mix: TypeMix, policy: str) -> None:
    """Bursts (zero gaps), long outputs and a cache barely larger than the longest request: the projected
    peak keeps WAIT from ever overflowing, whatever mix its thresholds were sized on."""
    arrival = np.cumsum([gap for gap, _, _ in trace])
    prompt = np.array([p for _, p, _ in trace])
    output = np.array([o for _, _, o in trace])
    # The scenario's types must fit too (a type that never fits is refused): the cache barely holds the longest.
    largest = max(int((prompt + output).max()), int((mix.prompt_lens + mix.output_lens).max()))
    scenario = scenario_for(mix, (-(-largest // block)) * block + slack, block)
    checker = InvariantChecker()
    from llmsched_env.workload import Arrivals

    horizon = float(arrival[-1]) + 60.0
    result = run(scenario.engine(), make_policy(policy, scenario, horizon), Arrivals(arrival, prompt, output),
                 horizon, callbacks=[checker])
    assert result.evictions == 0
    assert result.arrived == result.finished + result.waiting + result.running


def test_wait_lends_spare_memory_below_threshold_but_not_the_reserve() -> None:
    # A request of 4 + 3 tokens peaks at 7 blocks of 1 token. Capacity 1000.
    engine = SimulatedEngine(COST, capacity_tokens=1000, block_size=1)
    policy = wait_policy("measured", n=3, lend=True, memory_blocks=0)
    policy.reset(engine)
    arrive(engine, 1)
    engine.step(policy.decide(engine.state()))  # drain: nothing runs yet, so the first goes in
    arrive(engine, 1)  # below the threshold of 3, but memory is plentiful: admitted at once
    assert policy.decide(engine.state()).prefill.tolist() == [1]

    engine = SimulatedEngine(COST, capacity_tokens=1000, block_size=1)
    policy = wait_policy("measured", n=3, lend=True, memory_blocks=995)  # the pipelines need all but 5 blocks
    policy.reset(engine)
    arrive(engine, 1)
    engine.step(policy.decide(engine.state()))
    arrive(engine, 1)  # lending it would reach 7 + 7 blocks > 1000 − 995: it waits for its cohort
    assert policy.decide(engine.state()).prefill.size == 0


def test_wait_admits_a_cohort_only_as_far_as_its_projected_peak_fits() -> None:
    # 10 blocks of 1 token; each request peaks at 7 tokens: one at a time, although two fit now (4 + 4).
    engine = SimulatedEngine(COST, capacity_tokens=10, block_size=1)
    policy = wait_policy("measured", n=2)
    policy.reset(engine)
    arrive(engine, 2)
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [0]


def test_a_stability_point_separates_a_stable_rate_from_an_unstable_one() -> None:
    from baselines.stability import is_stable, stability_point

    scenario = build_scenario(types="p=64,o=16,rate=1", memory_tokens=20_000)
    point = stability_point(scenario, "vllm", horizon=60.0, tolerance=0.05)
    assert point.rate_rps < point.unstable_rate_rps <= point.rate_rps * 1.05 + 1e-9
    assert is_stable(scenario, "vllm", point.rate_rps, 60.0, 0)
    assert not is_stable(scenario, "vllm", point.unstable_rate_rps, 60.0, 0)
    assert 0.8 < point.load < 1.1  # the fluid model's capacity, give or take the discrete engine


def test_residual_quantiles_are_exact_for_one_length_and_conditional_otherwise() -> None:
    from baselines.lookahead import residual_quantiles

    assert residual_quantiles(np.array([4]), np.array([1.0]), 0.9).tolist() == [4, 3, 2, 1, 1]
    # Half end at 2, half at 10: at d = 0 the 90 % quantile of what is left is 10; past 2 only the 10s remain.
    r = residual_quantiles(np.array([2, 10]), np.array([0.5, 0.5]), 0.9)
    assert r[0] == 10 and r[1] == 9 and r[2] == 8 and r[9] == 1
    assert residual_quantiles(np.array([2, 10]), np.array([0.5, 0.5]), 0.5)[0] == 2


def test_nested_wait_lookahead_keeps_it_from_evicting_where_memory_binds() -> None:
    """paper-two-type at ρ = 0.9 (tight memory, lengths hidden): without the lookahead Nested WAIT evicted
    about 1,300 times in 300 s; with it, none, and it serves more than vLLM."""
    from llmsched_env.scenarios import load_scenario

    scenario = load_scenario("paper-two-type-hidden").scenario
    scenario = scenario.at_rate(scenario.rate_for_load(0.9))
    arrivals = scenario.sample(120.0, 0)
    rows = {}
    for name in ("nested-wait", "vllm"):
        result = run(scenario.engine(), make_policy(name, scenario, 120.0), arrivals, 120.0)
        rows[name] = result
    assert rows["nested-wait"].evictions == 0 and rows["vllm"].evictions > 0
    assert rows["nested-wait"].finished > rows["vllm"].finished


def test_the_rate_estimate_is_unbiased_from_the_start() -> None:
    from llmsched_env.rate_estimate import ArrivalRateEstimator

    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / 20.0, 20_000))
    for now in (5.0, 60.0, 600.0):
        estimator = ArrivalRateEstimator(60.0)
        estimator.update(now, arrivals[arrivals <= now])
        assert estimator.total == pytest.approx(20.0, rel=0.3 if now == 5.0 else 0.1)


def test_adaptive_wait_learns_the_oracles_thresholds_on_a_stationary_load() -> None:
    from llmsched_env.scenarios import load_scenario

    scenario = load_scenario("paper-two-type").scenario
    scenario = scenario.at_rate(scenario.rate_for_load(0.9))
    oracle = make_policy("wait", scenario, 300.0)
    adaptive = make_policy("wait-adaptive", scenario, 300.0)
    result = run(scenario.engine(), adaptive, scenario.sample(300.0, 0), 300.0)
    assert adaptive.learning.solves > 5 and result.evictions == 0
    assert adaptive.learning.rates.total == pytest.approx(scenario.base_rate, rel=0.1)
    # Two types 50 and 100 prompt tokens apart: the learnt grid finds them, with the oracle's thresholds.
    assert sorted(adaptive.mix.prompt_lens.tolist()) == [50, 100]
    assert sorted(adaptive.thresholds.n.tolist()) == sorted(oracle.thresholds.n.tolist())


def test_adaptive_nested_wait_learns_from_completions_without_seeing_a_length() -> None:
    from llmsched_env.scenarios import load_scenario

    scenario = load_scenario("paper-two-type-hidden").scenario
    scenario = scenario.at_rate(scenario.rate_for_load(0.9))
    engine = scenario.engine()
    assert engine.state().output_len is None  # the policy could not read a length if it tried
    policy = make_policy("nested-wait-adaptive", scenario, 200.0)
    result = run(engine, policy, scenario.sample(200.0, 0), 200.0)
    assert policy.learning.solves > 3 and result.evictions == 0
    assert policy.thresholds.boundaries[-1] == 171  # the longest output it has seen finish


def test_nested_wait_projects_an_evicted_request_from_where_it_resumes() -> None:
    """A waiting request that was evicted after decoding d tokens resumes with its context: the lookahead takes
    its remaining output at the residual quantile for d, not for a fresh request."""
    from llmsched_env.scenarios import load_scenario

    scenario = load_scenario("paper-two-type-hidden").scenario
    policy = make_policy("nested-wait", scenario, 60.0)
    engine = scenario.engine()
    policy.reset(engine)
    engine.add_requests(np.zeros(1), np.array([50]), np.array([156]))
    engine.step(Decision(prefill=np.array([0])))
    for _ in range(100):
        engine.step(Decision(decode=np.array([0])))
    engine.step(Decision(preempt=np.array([0])))
    state = engine.state()
    assert state.waiting.tolist() == [0] and state.context_len[0] == 150
    context, remaining = policy._trajectories(state, np.array([0]))
    assert context.tolist() == [149] and remaining.tolist() == [policy.lookahead[100] + 1]
    assert policy.lookahead[100] < policy.lookahead[0]  # a fresh request's residual would over-size it


@given(prompt=st.lists(st.integers(1, 5000), min_size=1, max_size=300), output=st.data(), grid=st.integers(1, 4))
def test_adaptive_wait_classes_are_the_quantile_grid_numpy_draws(prompt: list[int], output: st.DataObject,
                                                                  grid: int) -> None:
    """The compiled class learning does NumPy's arithmetic (quantiles, cells, means): exactly NumPy's classes."""
    from baselines.adaptive import quantile_classes

    prompts = np.array(prompt, dtype=np.int64)
    outputs = np.array(output.draw(st.lists(st.integers(1, 5000), min_size=len(prompt), max_size=len(prompt))),
                       dtype=np.int64)
    p_edges = np.unique(np.quantile(prompts, np.arange(1, grid) / grid))
    o_edges = np.unique(np.quantile(outputs, np.arange(1, grid) / grid))
    cell = np.searchsorted(p_edges, prompts, side="right") * (len(o_edges) + 1) + \
        np.searchsorted(o_edges, outputs, side="right")
    expected = [(prompts[cell == c].mean(), outputs[cell == c].mean(), (cell == c).mean()) for c in np.unique(cell)]
    mean_prompt, mean_output, share = quantile_classes(prompts, outputs, grid)
    assert list(zip(mean_prompt.tolist(), mean_output.tolist(), share.tolist())) == expected


@given(types=st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), min_size=1, max_size=9),
       requests=st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), max_size=50))
def test_a_request_is_typed_by_the_nearest_type_in_log_length(types: list[tuple[int, int]],
                                                               requests: list[tuple[int, int]]) -> None:
    mix = TypeMix(tuple(RequestType(p, o, 1.0) for p, o in types))
    prompt = np.array([p for p, _ in requests], dtype=np.int64)
    output = np.array([o for _, o in requests], dtype=np.int64)
    nearest = mix.nearest(prompt, output)
    assert nearest.dtype == np.int64 and len(nearest) == len(requests)
    for (p, o), k in zip(requests, nearest.tolist()):
        distance = [abs(np.log(p) - np.log(tp)) + abs(np.log(o) - np.log(to)) for tp, to in types]
        assert distance[k] <= min(distance) * (1 + 1e-12) + 1e-12  # the least (ties within rounding)
        if (p, o) in types:
            assert distance[k] == 0.0  # a request of a type's lengths is typed by (one of) its type(s)


def test_the_adaptive_margin_steps_down_while_calm_and_up_for_good_on_an_eviction() -> None:
    from baselines.nested_wait import CALM, FLOOR, LEVEL, Margin, NestedWaitRule, adapt_lookahead

    levels = np.array([[3, 2, 1], [5, 4, 3], [9, 8, 7]], dtype=np.int64)  # boldest first
    rule = NestedWaitRule(np.array([3]), np.zeros(1, np.int64), np.array([1]), levels[-1].copy(),
                          np.array([100]), True, False, 0, 0, 0.0)
    margin = Margin(levels, np.array([10, 50, 100]), 2, np.array([2, 0, 0, 0]))
    state = margin.state
    assert not adapt_lookahead(rule, margin, 0, 0) and not adapt_lookahead(rule, margin, 0, 0)
    assert state[LEVEL] == 2 and state[CALM] == 0  # an empty queue is no evidence: caution costs nothing
    assert not adapt_lookahead(rule, margin, 0, 3) and not adapt_lookahead(rule, margin, 0, 3)
    assert state[LEVEL] == 1 and rule.residual.tolist() == [5, 4, 3] and rule.spare[0] == 50
    for _ in range(2):
        adapt_lookahead(rule, margin, 0, 1)
    assert state[LEVEL] == 0 and rule.residual.tolist() == [3, 2, 1] and rule.spare[0] == 10
    assert adapt_lookahead(rule, margin, 1, 1)  # an eviction: one level up (longer trajectories), level 0 barred
    assert state[LEVEL] == 1 and state[FLOOR] == 1 and rule.residual.tolist() == [5, 4, 3]
    for _ in range(10):
        adapt_lookahead(rule, margin, 1, 1)
    assert state[LEVEL] == 1  # never back to a level that evicted
    assert adapt_lookahead(rule, margin, 4, 1) and state[LEVEL] == 2 and state[FLOOR] == 2
    assert not adapt_lookahead(rule, margin, 9, 1) and state[LEVEL] == 2  # the most cautious stays


def test_an_adaptive_margin_of_one_level_is_nested_wait() -> None:
    """Levels that all hold one lookahead and reserve: the margin's steps, up on evictions too, change nothing."""
    from baselines.lookahead import residual_quantiles

    scenario = build_scenario(types="p=40,o=60,rate=1;p=80,o=200,rate=1", memory_tokens=6_000, block_size=16,
                              hidden_lengths=True)
    scenario = scenario.at_rate(scenario.rate_for_load(1.1))
    arrivals = scenario.sample(120.0, 3)
    # A bold lookahead (the median: a request of 200 tokens is projected to stop at 60), so that it evicts.
    table = residual_quantiles(np.array([60, 200]), np.array([0.5, 0.5]), 0.5)
    plain = replace(make_policy("nested-wait", scenario, 120.0), lookahead=table)
    margin = replace(make_policy("nested-wait-margin", scenario, 120.0), lookahead_levels=np.stack([table] * 3),
                     reserve_levels=(1.0, 1.0, 1.0), calm_decisions=1)
    first, second = (run(scenario.engine(), policy, arrivals, 120.0) for policy in (plain, margin))
    assert first.iterations == second.iterations and first.evictions == second.evictions
    assert first.finished == second.finished and first.end_time == second.end_time and first.evictions > 0


def test_the_policies_that_see_output_lengths_are_exactly_those_that_refuse_to_run_without_them() -> None:
    """The evaluation loop hides the lengths from every policy not in SEES_OUTPUT_LENGTHS: a preset that needs them
    and is missing there fails on every run; one listed that does not need them is handed what it should not see."""
    scenario = build_scenario(types="p=30,o=40,rate=30", memory_tokens=3000, block_size=16)
    hidden = replace(scenario, output_lengths_known=False)
    refused = set()
    for name in POLICIES:
        try:
            make_policy(name, hidden, 10.0).reset(hidden.engine())
        except ConfigError:
            refused.add(name)
    assert refused == set(SEES_OUTPUT_LENGTHS)
