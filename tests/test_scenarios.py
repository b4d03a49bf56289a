"""The scenario suite: arrival processes, fitted length distributions, scenario files, and the suite's job."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.suite import SweepPlan, merge, run_sweeps, verdicts
from llmsched_env import ConfigError
from llmsched_env.scenarios import HIDDEN_SUFFIX, load_scenario, scenario_names
from llmsched_env.workload import ArrivalProcess, QuantileLengths, parse_types


def test_every_builtin_scenario_loads_and_the_suite_covers_the_issue_list() -> None:
    names = scenario_names()
    suite = scenario_names(suite_only=True)
    for required in ("paper-two-type", "paper-single", "paper-two-type-512", "paper-long-decode", "bursty-low",
                     "bursty-high", "diurnal", "azure-conv-like", "azure-code-like"):
        assert required in suite
    assert "paper-two-type-hidden" in names and "paper-single-hidden" not in names  # one length: nothing to hide
    for name in names:
        spec = load_scenario(name)
        assert spec.scenario.output_lengths_known == (not name.endswith(HIDDEN_SUFFIX))
        assert all(rate > 0 for rate in spec.rates())
    single = load_scenario("paper-single")
    assert single.scenario.capacity_tokens == 137_000
    assert single.scenario.offered_mix().prompt_lens.tolist() == [512]


def test_a_scenario_is_the_same_every_time_it_is_loaded() -> None:
    first, second = load_scenario("azure-conv-like"), load_scenario("azure-conv-like")
    a = first.scenario.at_rate(3.0).sample(60.0, 4)
    b = second.scenario.at_rate(3.0).sample(60.0, 4)
    assert np.array_equal(a.arrival_time, b.arrival_time) and np.array_equal(a.output_len, b.output_len)


@pytest.mark.parametrize(("text", "message"), [
    ('[workload]\ntypes = "p=10,o=5,rate=1"\n[sweep]\nloads = [0.5, -1]\n', r"sweep\.loads must be positive"),
    ('[workload]\ntypes = "p=10,o=5,rate=1"\n[engine]\nmemory_tokens = 0\n',
     r"engine\.memory_tokens must be an integer >= 1"),
    ('[workload]\ntypes = "p=10,o=5,rate=1"\n[arrivals]\nprocess = "weibull"\n',
     r"\[arrivals\].*poisson, gamma, onoff or diurnal"),
    ('speed = 3\n[workload]\ntypes = "p=10,o=5,rate=1"\n', r"unknown field 'speed'"),
    ('[workload]\ntypes = "p=10,o=5,rate=1"\nspeed = 3\n', r"unknown field workload\.speed; allowed: lengths, types"),
    ('[workload]\n', r"exactly one of 'types'"),
    ('[workload]\ntypes = "p=200000,o=5,rate=1"\n', r"needs 200,005 KV tokens"),
    ('[workload.lengths]\nprobabilities = [0, 1]\nprompt = [5, 2]\noutput = [1, 2]\n', r"non-decreasing"),
    ('[workload\n', r"invalid TOML"),
])
def test_a_malformed_scenario_file_names_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_scenario(path)
    assert str(path) in str(error.value)


def test_an_unknown_scenario_lists_the_builtins() -> None:
    with pytest.raises(ConfigError, match=r"no scenario 'nope'.*paper-single"):
        load_scenario("nope")
    with pytest.raises(ConfigError, match="no hidden-length variant"):
        load_scenario("paper-single-hidden")


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["poisson", "gamma", "onoff", "diurnal"]), rate=st.floats(2.0, 50.0))
def test_every_arrival_process_keeps_its_mean_rate(kind: str, rate: float) -> None:
    process = ArrivalProcess(kind, cv=2.0, mean_on_s=5.0, mean_off_s=15.0, off_factor=0.1, period_s=200.0,
                             amplitude=0.8)  # type: ignore[arg-type]
    # A hundred diurnal periods; for on-off, five thousand cycles: the share of time spent on varies from run to
    # run (the measured rate's relative spread is 3.1 % over 1,000 cycles, 1.5 % over 4,000), so that the 10 %
    # bound is more than six standard deviations away rather than three.
    horizon = 100_000.0 if kind == "onoff" else 20_000.0
    times = process.times(rate, horizon, np.random.default_rng(3))
    assert np.all(np.diff(times) >= 0) and times[-1] <= horizon
    assert len(times) / horizon == pytest.approx(rate, rel=0.1)


def test_diurnal_arrivals_peak_at_half_a_period_and_onoff_bursts_shift_the_rate() -> None:
    process = ArrivalProcess("diurnal", period_s=100.0, amplitude=0.6)
    times = process.times(20.0, 10_000.0, np.random.default_rng(0))
    phase = (times % 100.0) / 100.0
    trough = np.mean((phase < 0.1) | (phase > 0.9)) / 0.2
    peak = np.mean(np.abs(phase - 0.5) < 0.1) / 0.2
    assert peak / trough == pytest.approx(1.6 / 0.4, rel=0.15)
    bursty = ArrivalProcess("onoff", mean_on_s=10.0, mean_off_s=30.0, off_factor=0.05)
    counts = np.bincount((bursty.times(20.0, 20_000.0, np.random.default_rng(1)) // 5).astype(int))
    assert counts.std() / counts.mean() > 1.0  # far burstier than Poisson's 1 / sqrt(100) = 0.1


def test_a_modulated_mix_keeps_its_type_shares() -> None:
    mix = parse_types("p=10,o=5,rate=3;p=20,o=9,rate=1")
    arrivals = ArrivalProcess("diurnal", period_s=50.0).workload(mix).sample(2000.0, np.random.default_rng(2))
    assert np.mean(arrivals.prompt_len == 10) == pytest.approx(0.75, abs=0.02)


def test_quantile_lengths_reproduce_their_knots() -> None:
    knots = QuantileLengths((0, 0.5, 0.9, 1), (10, 100, 1000, 5000))
    sample = knots.sample(200_000, np.random.default_rng(0))
    assert sample.min() >= 10 and sample.max() <= 5000
    assert np.quantile(sample, [0.5, 0.9]) == pytest.approx([100, 1000], rel=0.03)


@pytest.mark.parametrize(("scenario", "trace"), [("azure-conv-like", "azure_conv_trace.csv"),
                                                  ("azure-code-like", "azure_code_trace.csv")])
def test_the_azure_like_generators_match_their_traces(shared_data: Path, scenario: str, trace: str) -> None:
    """The scenarios ship quantile knots, not the traces: their samples match the traces' marginals."""
    with (shared_data / trace).open() as handle:
        rows = list(csv.DictReader(handle))
    prompt = np.array([int(r["num_prefill_tokens"]) for r in rows])
    output = np.array([int(r["num_decode_tokens"]) for r in rows])
    sample = load_scenario(scenario).scenario.trace
    assert sample is not None
    for real, generated in ((prompt, sample.prompt_len), (output, sample.output_len)):
        assert generated.mean() == pytest.approx(real.mean(), rel=0.08)
        quartiles = [0.25, 0.5, 0.75, 0.9]
        assert np.quantile(generated, quartiles) == pytest.approx(np.quantile(real, quartiles), rel=0.1)


def test_the_suite_job_merges_to_what_compare_gives_and_judges_it() -> None:
    spec = load_scenario("paper-two-type")
    plan = SweepPlan.of(spec, policies=["wait", "vllm"], loads=[0.6], horizon=40.0, seeds=[0, 1])
    parallel = run_sweeps([plan], jobs=2)[0]
    serial = run_sweeps([plan], jobs=1)[0]
    assert [r.row for r in parallel.runs] == [r.row for r in serial.runs]  # the same seeds, the same runs
    assert [(r.seed, r.policy) for r in parallel.runs] == [(0, "wait"), (0, "vllm"), (1, "wait"), (1, "vllm")]
    from baselines.compare import compare

    alone = compare(spec.scenario, ["wait", "vllm"], plan.rates, 40.0, seeds=[0, 1])
    assert [r.row for r in alone.runs] == [r.row for r in parallel.runs]
    (verdict,) = verdicts(plan, parallel)
    assert verdict["fluid_guided"] == "wait" and verdict["engine"] == "vllm" and verdict["load"] == 0.6
    assert merge(plan, []).runs == []


def test_a_hidden_scenario_drops_the_policies_that_need_lengths() -> None:
    plan = SweepPlan.of(load_scenario("paper-two-type-hidden"))
    assert "wait" not in plan.policies and "nested-wait" in plan.policies
    with pytest.raises(ConfigError, match="hides output lengths"):
        SweepPlan.of(load_scenario("paper-two-type-hidden"), policies=["wait"])


def test_realised_regret_removes_the_arrival_noise() -> None:
    """Below capacity, the realised fluid server completes what arrived: the realised regret is the backlog."""
    from baselines.compare import compare

    spec = load_scenario("paper-single")
    comparison = compare(spec.scenario, ["vllm"], spec.rates((0.5,)), 60.0, seeds=[0, 1, 2])
    for run in comparison.runs:
        row = run.row
        backlog = int(row["arrived"]) - int(row["completed"])
        assert row["regret_realised_requests"] == pytest.approx(backlog, abs=1e-6)


def test_the_environment_takes_a_scenario_by_name() -> None:
    import gymnasium as gym

    import llmsched_env  # noqa: F401  (registers the environments)

    env = gym.make("LLMSched-v0", scenario="bursty-high-hidden", horizon=30.0).unwrapped
    spec = load_scenario("bursty-high")
    assert not env.scenario.output_lengths_known
    assert env.rate_range == (min(spec.rates()), max(spec.rates()))
    assert env.scenario.capacity_tokens == spec.scenario.capacity_tokens  # its memory, not the tight default
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(env.action_space.sample())
    assert not terminated and "clipped" in info
    pinned = gym.make("LLMSched-v0", scenario="paper-single", rate=20.0, memory_tokens=60_000).unwrapped
    assert pinned.rate_range == (20.0, 20.0) and pinned.scenario.capacity_tokens == 60_000


@pytest.mark.parametrize("name", scenario_names(suite_only=True))
def test_wait_never_evicts_on_any_suite_scenario_at_its_highest_load(name: str) -> None:
    """The suite's promise, at the load where memory binds most (a short run; `compare --suite` runs the sweep)."""
    from dataclasses import replace

    from baselines import make_policy
    from llmsched_env.runner import run

    spec = load_scenario(name)
    scenario = replace(spec.scenario.at_rate(spec.rates((max(spec.loads),))[0]), output_lengths_known=True)
    horizon = 90.0
    for policy in ("wait", "wait-adaptive"):
        result = run(scenario.engine(), make_policy(policy, scenario, horizon), scenario.sample(horizon, 0), horizon)
        assert result.evictions == 0, policy
