"""The paper's set-up, knob by knob: WAIT-CP's segments, rotation, chunks and gates; Vidur's vLLM and Sarathi;
and the protocol of ``llmsched paper`` (docs/paper.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from baselines import POLICIES, make_policy
from baselines.fcfs import sarathi_vidur_policy, vllm_v0_policy
from baselines.paper import (
    WORKLOADS,
    PaperSetup,
    PointTask,
    backlog_transition,
    first_requests,
    run_paper,
    run_point,
    scenario_for,
    transition,
)
from baselines.wait_cp import (
    BookingSegment,
    ChunkedBookingPolicy,
    batch_token_estimate,
    booking_segments,
    equal_width_boundaries,
)
from llmsched_env import ConfigError, LinearCostModel, SimulatedEngine, run
from llmsched_env.engine import Engine, IterationOutcome
from tests.invariants import InvariantChecker

COST = LinearCostModel.paper(d0=0.01, d1=1e-7)
SINGLE = WORKLOADS["single"]


def single_type_policy(total_limit: int, **knobs: object) -> ChunkedBookingPolicy:
    """WAIT-CP on the paper's p512/d20 (o = 19 here), 256-token chunks."""
    scenario = scenario_for(SINGLE, 20.0, PaperSetup())
    return ChunkedBookingPolicy.for_mix(scenario.offered_mix(), total_limit, nested=False, **knobs)  # type: ignore[arg-type]


def add(engine: SimulatedEngine, count: int, prompt: int = 512, output: int = 19) -> None:
    engine.add_requests(np.full(count, engine.now), np.full(count, prompt), np.full(count, output))


# -- WAIT-CP's thresholds ---------------------------------------------------------------------------------------

def test_wait_cp_thresholds_for_tl_21_on_p512_d20_take_turns_over_the_stages() -> None:
    policy = single_type_policy(21)
    # One segment: the prefill (stage 0) and the 19 decode stages after the prefill's token (Vidur's d = 20).
    assert policy.segments == (BookingSegment(0, 19, 21, 21 / 20),)
    limits = [policy.segments[0].stage_limit(batch) for batch in range(41)]
    # 21 // 20 = 1 per stage, and the remainder 1 goes to the first iteration of every 20: neither floor nor ceiling.
    assert limits[:21] == [2] + [1] * 19 + [2] and sum(limits[:20]) == 21
    # The token gate: P = 21 / (K + d) = 21 / 22 per stage, K = 2 chunks of 256, so P·K prefilling.
    assert policy.token_budget == batch_token_estimate(np.array([512]), np.array([20]), np.array([1.0]), 21, 256) == 508
    # Read over K + d = 22 stages (the authors' SGLang port): 21 // 22 = 0 and the remainder 21, so one request
    # on 21 iterations of every 22.
    rotation = BookingSegment(0, 21, 21, 21 / 22)
    assert [rotation.stage_limit(b) for b in range(23)] == [1] * 21 + [0, 1]


def test_nested_segments_follow_the_papers_two_type_example() -> None:
    # v4: segments 1-20 and 21-50, n_2 / n_1 = 0.3, 20 n_1 + 30 n_2 = tl; "tl = 30 gives caps approximately 21 and 9".
    segments = booking_segments(np.array([20, 50]), np.array([0.7, 0.3]), 30)
    assert [(s.start, s.end) for s in segments] == [(0, 19), (20, 49)]
    assert [s.total_limit for s in segments] == [21, 9]
    assert segments[1].per_stage / segments[0].per_stage == pytest.approx(0.3, rel=1e-12)
    assert 20 * segments[0].per_stage + 30 * segments[1].per_stage == pytest.approx(30, rel=1e-12)
    margin = booking_segments(np.array([20, 50]), np.array([0.7, 0.3]), 30, seg_margin=0.05)
    assert margin[1].per_stage / margin[0].per_stage == pytest.approx(0.35, rel=1e-12)


def test_many_output_lengths_get_equal_width_segments() -> None:
    assert equal_width_boundaries(500, 50).tolist() == list(range(10, 501, 10))
    with pytest.raises(ConfigError, match="reach the longest output"):
        booking_segments(np.array([20, 50]), np.array([1.0, 1.0]), 30, boundaries=np.array([20, 40]))
    with pytest.raises(ConfigError, match="total_limit"):
        booking_segments(np.array([20]), np.array([1.0]), 0)


# -- WAIT-CP's batches ------------------------------------------------------------------------------------------

def test_wait_cp_shares_an_iteration_between_several_requests_chunks() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=136_992, block_size=16)
    policy = single_type_policy(60)  # 60 // 20 = 3 requests through the entry per iteration
    policy.reset(engine)
    add(engine, 5)
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [0, 1, 2] and decision.prefill_tokens.tolist() == [256, 256, 256]
    engine.step(decision)
    decision = policy.decide(engine.state())
    # The three prefills in progress finish their second chunk; two more start (the gate's 1,451 tokens allow it).
    assert decision.prefill.tolist() == [0, 1, 2, 3, 4] and decision.prefill_tokens.tolist() == [256] * 5


def test_wait_cp_on_the_paper_workload_batches_several_chunks_and_never_exceeds_tl() -> None:
    scenario = scenario_for(SINGLE, 22.0, PaperSetup())
    arrivals = first_requests(scenario, 2_000, seed=0)
    policy = ChunkedBookingPolicy.for_mix(scenario.offered_mix(), 40, nested=False)
    shared, in_system = [], []

    def watch(engine: Engine, outcome: IterationOutcome) -> None:
        shared.append(outcome.prefill_tokens > 256)  # more than one request's chunk in the iteration
        in_system.append(engine.num_running)

    result = run(scenario.engine(), policy, arrivals, float(arrivals.arrival_time[-1]) + 120,
                 callbacks=[watch, InvariantChecker()])
    assert result.finished > 1_900 and result.evictions == 0
    assert sum(shared) > 100  # several requests' 256-token chunks share iterations, often
    assert max(in_system) <= 40  # the system-wide cap tl


def test_wait_cp_admits_at_most_the_rotating_stage_limit_per_iteration() -> None:
    scenario = scenario_for(SINGLE, 22.0, PaperSetup())
    arrivals = first_requests(scenario, 1_500, seed=1)
    policy = ChunkedBookingPolicy.for_mix(scenario.offered_mix(), 21, nested=False)
    admitted: list[tuple[int, int]] = []

    class Recording:
        name = "recording"

        def reset(self, engine: Engine) -> None:
            policy.reset(engine)

        def decide(self, state):  # type: ignore[no-untyped-def]
            batch = policy._batch_index  # noqa: SLF001 - the iteration's place in the rotation
            decision = policy.decide(state)
            new = int(np.count_nonzero(state.kv_tokens[decision.prefill] == 0))
            admitted.append((batch, new))
            return decision

    result = run(scenario.engine(), Recording(), arrivals, float(arrivals.arrival_time[-1]) + 120)  # type: ignore[arg-type]
    assert result.finished > 1_000
    limits = [policy.segments[0].stage_limit(batch) for batch, _ in admitted]
    assert all(new <= limit for (_, new), limit in zip(admitted, limits))
    assert sum(new for _, new in admitted) == result.arrived - result.waiting  # every admission was counted


def test_wait_gate_pauses_a_segment_until_its_entry_fills() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=136_992, block_size=16)
    policy = single_type_policy(21)
    policy.reset(engine)
    add(engine, 1)
    for _ in range(2):  # the prefill's two chunks
        engine.step(policy.decide(engine.state()))
    # Nothing waits and the segment holds 1 < 21: the segment pauses (KV kept) until a request arrives.
    assert policy.decide(engine.state()).is_idle
    add(engine, 1)
    decision = policy.decide(engine.state())
    assert decision.decode.tolist() == [0] and decision.prefill.tolist() == [1]
    engine.step(decision)
    ungated = single_type_policy(21, wait_gate=False)
    ungated.reset(engine)
    engine.step(ungated.decide(engine.state()))  # request 1's second chunk
    assert ungated.decide(engine.state()).decode.tolist() == [0, 1]  # nothing waits, yet without the gate both decode


def test_wait_cp_admission_keeps_the_watermark_counting_whole_prompts() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=16 * 300, block_size=16)  # 300 blocks; watermark 3 blocks
    policy = single_type_policy(100)  # up to 5 admissions per iteration
    policy.reset(engine)
    add(engine, 4, prompt=16 * 75, output=1)
    decision = policy.decide(engine.state())
    # Their first chunks (16 blocks each) would fit, but Vidur reserves whole prompts: 4 × 75 = 300 leaves 0 < 3.
    assert decision.prefill.tolist() == [0, 1, 2] and decision.prefill_tokens.tolist() == [256] * 3


# -- Vidur's vLLM and Sarathi ----------------------------------------------------------------------------------

def test_vllm_v0_runs_admissible_prefills_alone() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=100_000, block_size=16)
    policy = vllm_v0_policy()
    policy.reset(engine)
    add(engine, 2, prompt=64, output=5)
    engine.step(policy.decide(engine.state()))
    add(engine, 1, prompt=64, output=5)
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [2] and decision.decode.size == 0  # the prompt runs alone
    engine.step(decision)
    assert policy.decide(engine.state()).decode.tolist() == [0, 1, 2]  # nothing to admit: everyone decodes


def test_vllm_v0_pads_the_prefill_batch_to_its_longest_prompt_within_4096_tokens() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=100_000, block_size=16)
    policy = vllm_v0_policy()
    policy.reset(engine)
    engine.add_requests(np.zeros(6), np.array([100, 1000, 100, 100, 100, 100]), np.full(6, 5))
    # 4 × 1,000 = 4,000 <= 4,096 < 5 × 1,000: four prompts, although their 1,300 tokens leave room for all six.
    assert policy.decide(engine.state()).prefill.tolist() == [0, 1, 2, 3]
    summed = vllm_v0_policy(padded_prefill=False)
    summed.reset(engine)
    assert summed.decide(engine.state()).prefill.tolist() == [0, 1, 2, 3, 4, 5]


def test_vllm_v0_and_sarathi_512_hold_at_most_128_requests() -> None:
    for policy in (vllm_v0_policy(), sarathi_vidur_policy()):
        engine = SimulatedEngine(COST, capacity_tokens=1_000_000, block_size=16)
        policy.reset(engine)
        add(engine, 300, prompt=2, output=50)
        for _ in range(5):
            engine.step(policy.decide(engine.state()))
        assert engine.num_running == 128, policy.name


def test_vllm_v0_keeps_the_watermark() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=16 * 200, block_size=16)  # 200 blocks; watermark 2 blocks
    policy = vllm_v0_policy()
    policy.reset(engine)
    engine.add_requests(np.zeros(2), np.array([16 * 99, 16 * 99]), np.full(2, 1))
    # 99 + 99 blocks leave 2, the watermark's 2: both come in.
    assert policy.decide(engine.state()).prefill.tolist() == [0, 1]
    engine = SimulatedEngine(COST, capacity_tokens=16 * 200, block_size=16)
    policy.reset(engine)
    engine.add_requests(np.zeros(2), np.array([16 * 99, 16 * 100]), np.full(2, 1))
    assert policy.decide(engine.state()).prefill.tolist() == [0]  # 200 - 199 = 1 block left < the watermark's 2


def test_sarathi_512_counts_decodes_against_its_512_token_chunks() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=1_000_000, block_size=16)
    policy = sarathi_vidur_policy()
    policy.reset(engine)
    add(engine, 100, prompt=2, output=50)
    engine.step(policy.decide(engine.state()))  # 100 prompts of 2 tokens: 200 <= 512
    add(engine, 1, prompt=2000, output=5)
    decision = policy.decide(engine.state())
    assert decision.decode.size == 100 and decision.prefill_tokens.tolist() == [412]  # 512 - 100 decodes
    engine.step(decision)
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [100] and decision.prefill_tokens.tolist() == [412]


def test_sarathi_512_reserves_a_whole_prompt_against_the_watermark() -> None:
    engine = SimulatedEngine(COST, capacity_tokens=16 * 200, block_size=16)  # watermark 2 blocks
    policy = sarathi_vidur_policy()
    policy.reset(engine)
    engine.add_requests(np.zeros(2), np.array([16 * 150, 16 * 60]), np.full(2, 1))
    decision = policy.decide(engine.state())
    assert decision.prefill.tolist() == [0]  # 150 + 60 blocks > 198, although the first chunks (32 + 0) fit
    engine.step(decision)
    # The first prompt's unfilled 118 blocks stay reserved: the second still cannot come in.
    assert policy.decide(engine.state()).prefill.tolist() == [0]


def test_the_paper_presets_are_registered_and_the_old_names_are_not_the_papers() -> None:
    for name in ("wait-cp", "nested-wait-cp", "vllm-v0", "sarathi-512", "wait-pausing", "nested-wait-pausing"):
        assert name in POLICIES
    assert "wait-chunked" not in POLICIES and "wait-paper" not in POLICIES
    scenario = scenario_for(WORKLOADS["two-type"], 20.0, PaperSetup())
    with pytest.warns(FutureWarning, match="wait-pausing"):
        assert make_policy("wait-paper", scenario.at_rate(20.0), 60.0).name == "wait-pausing"
    with pytest.raises(ConfigError, match="use wait-cp"):
        make_policy("wait-chunked", scenario, 60.0)
    nested = make_policy("nested-wait-cp", scenario, 60.0)
    assert [(s.start, s.end) for s in nested.segments] == [(0, 19), (20, 49)]  # type: ignore[attr-defined]


# -- the protocol ------------------------------------------------------------------------------------------------

def test_transition_rules() -> None:
    rates = [12.0, 14.0, 16.0, 18.0]
    assert transition(rates, [1.0, 1.2, 1.4, 1.9], rates) == 16.0  # latency grows 1.9 × over the window at 18
    assert transition(rates, [1.0, 1.0, 1.0, 1.0], [12.0, 14.0, 15.6, 18.0]) == 14.0  # 15.6 < 0.98 × 16 at 16
    assert transition(rates, [1.0, 2.0, 1.0, 1.0], rates) == 12.0  # the first failure ends it
    assert transition(rates, [2.0, 1.0, 1.0, 1.0], rates) is None
    assert backlog_transition(rates, [10.0, 100.0, 150.0, 400.0]) == 16.0  # 150 <= 10 s × 16; 400 > 10 s × 18
    # Plus what a request takes when the system keeps up: 12 s at the lowest rate allows 22 s of arrivals.
    assert backlog_transition(rates, [100.0, 300.0, 350.0, 390.0], base_latency_s=12.0) == 18.0
    assert backlog_transition(rates, [100.0, 300.0, 360.0, 400.0], base_latency_s=12.0) == 14.0


def test_a_point_measures_the_central_window() -> None:
    setup = PaperSetup(requests=1_000, drain_requests=100)
    point = run_point(PointTask("single", "vllm-v0", 12.0, 0, None, setup))
    assert point["censored"] == 0 and point["evictions"] == 0
    assert 0.1 < point["mean_latency_s"] < 5  # type: ignore[operator]
    assert point["effective_completion_rps"] == pytest.approx(12.0, rel=0.15)
    again = run_point(PointTask("single", "vllm-v0", 12.0, 0, None, setup))
    assert again == point  # the same seed, the same run


def test_llmsched_paper_writes_its_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmsched_env.cli import app

    result = CliRunner().invoke(app, ["paper", "--workload", "single", "--replications", "2", "--repeats", "2",
                                      "--requests", "1000", "--rates", "12,24", "--jobs", "1", "--out", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Transition λ*" in result.output and "wait-cp" in result.output
    document = json.loads((tmp_path / "paper.json").read_text())
    assert {t["policy"] for t in document["transitions"]} == {"vllm-v0", "sarathi-512", "wait-cp"}
    assert set(document["tuned_total_limit"]) == {"12", "24"}
    assert len(document["tuning"]) == 2 * 19 and all(p["seed"] >= 10_000 for p in document["tuning"])
    assert {p["seed"] for p in document["points"]} == {0, 1}
    assert all(r["runs"] == 2 for r in document["repeats"])
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    report = (tmp_path / "paper.md").read_text()
    assert "## Transition λ*" in report
    # The report again from the saved runs, without running anything: the same document.
    (tmp_path / "paper.md").unlink()
    again = CliRunner().invoke(app, ["paper", "--report-only", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert (tmp_path / "paper.md").read_text() == report
    assert json.loads((tmp_path / "paper.json").read_text()) == document


def test_run_paper_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="the paper's are single, two-type, long-decode"):
        run_paper("nope")
    with pytest.raises(ConfigError, match="replications"):
        run_paper("single", replications=0)


def test_the_registered_presets_run_on_the_suites_paper_scenarios_with_lengths_hidden() -> None:
    from dataclasses import replace

    from llmsched_env.scenarios import load_scenario

    for name, preset in (("paper-single", "wait-cp"), ("paper-two-type-512", "nested-wait-cp")):
        spec = load_scenario(name).scenario
        scenario = replace(spec.at_rate(spec.rate_for_load(0.9)), output_lengths_known=False)
        arrivals = scenario.sample(60.0, seed=0)
        engine = scenario.engine()
        assert engine.state().output_len is None  # the policy cannot read a length
        chunks = []
        result = run(engine, make_policy(preset, scenario, 60.0), arrivals, 60.0,
                     callbacks=[InvariantChecker(), lambda e, o: chunks.append(len(o.admitted))])
        assert result.finished > 0.8 * len(arrivals) and result.evictions == 0, name
        assert max(chunks) >= 2, name  # several requests admitted (their first chunks) in one iteration
