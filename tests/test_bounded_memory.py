"""A run's memory is bounded by the requests in the system: arrivals are read as a stream, finished requests are
retired from the engine into a fixed-size log, and what policies keep per request is released with them. None of
it may change a run's outcome (benchmarks/scaling.py measures the memory itself)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from baselines import make_policy
from llmsched_env import completions, runner
from llmsched_env.completions import RELATIVE_ACCURACY, CompletionLog, QuantileSketch
from llmsched_env.engine import FINISHED, WAITING, RequestRecords
from llmsched_env.metrics import regret_curve, summarize
from llmsched_env.request_table import allocate_column, release_ids
from llmsched_env.runner import TimeSeriesRecorder, run
from llmsched_env.scenario import build_scenario
from tests.invariants import InvariantChecker


def _outcome(policy: str, horizon: float, seed: int, stream: bool):
    scenario = build_scenario(hidden_lengths=policy not in ("wait",))
    scenario = scenario.at_rate(scenario.rate_for_load(0.9))
    arrivals = scenario.chunks(horizon, seed) if stream else scenario.sample(horizon, seed)
    engine = scenario.engine()
    checker = InvariantChecker()  # every request accounted for, memory within capacity, after every iteration
    result = run(engine, make_policy(policy, scenario, horizon), arrivals, horizon, callbacks=[checker])
    assert checker.iterations == result.iterations
    return engine, result, summarize(result, scenario.fluid(scenario.sample(horizon, seed), horizon))


@pytest.mark.parametrize("policy", ["wait", "nested-wait", "vllm", "sarathi"])
def test_streamed_arrivals_and_retirement_leave_every_run_as_it_was(policy: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests, decisions and records, whether the run reads its arrivals whole or as a stream and
    whether finished requests stay in the engine or are retired every 64 finishes (WAIT then releases the types
    it kept for them: reading a released one would change its decisions)."""
    _, whole, whole_summary = _outcome(policy, 60.0, 3, stream=False)
    monkeypatch.setattr(runner, "RETIRE_EVERY", 64)
    engine, streamed, streamed_summary = _outcome(policy, 60.0, 3, stream=True)
    assert engine.retired > 1000  # retirement happened, many times
    assert streamed_summary == whole_summary
    for name in RequestRecords.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(streamed.records, name), getattr(whole.records, name), err_msg=name)


def test_retired_rows_go_back_to_the_os_and_read_as_zeros() -> None:
    column = allocate_column(1 << 20, np.int64)  # 8 MiB: memory-mapped
    column[:] = 7
    release_ids(column, 0, 1000)
    assert not column[:512].any() and (column[512:] == 7).all()  # whole pages only: 512 ids of 8 bytes
    release_ids(column, 1000, 600_000)  # from the page the last release kept
    assert not column[:599_552].any()
    assert (column[599_552:] == 7).all()
    small = allocate_column(100, np.int64)
    small[:] = 7
    release_ids(small, 0, 100)  # too small to be mapped: keeps its memory and values
    assert (small == 7).all()


def _records(rng: np.random.Generator, count: int, horizon: float) -> RequestRecords:
    arrival = np.sort(rng.uniform(0, horizon, count))
    first = arrival + rng.lognormal(-2.0, 1.0, count)
    finish = first + rng.lognormal(0.0, 1.5, count)
    status = np.where(finish <= horizon * 1.1, FINISHED, 1).astype(np.int8)
    finish = np.where(status == FINISHED, finish, np.nan)
    output = rng.integers(1, 500, count)
    return RequestRecords(arrival_time=arrival, prompt_len=rng.integers(1, 500, count), output_len=output,
                          first_token_time=first, finish_time=finish, num_evictions=np.zeros(count, np.int64),
                          decoded=output, status=status)


def test_beyond_the_exact_limit_counts_stay_exact_and_quantiles_within_the_stated_accuracy() -> None:
    rng = np.random.default_rng(5)
    horizon = 1000.0
    exact = CompletionLog(horizon, keep_records=True, exact_limit=10)
    folded = CompletionLog(horizon, exact_limit=10_000)
    for _ in range(8):
        chunk = _records(rng, 5000, horizon)
        exact.add(chunk, now=horizon * 1.1)
        folded.add(chunk, now=horizon * 1.1)
    assert exact.exact and not folded.exact
    with pytest.raises(ValueError, match=r"unfinished requests need the time they were taken \(now=\)"):
        CompletionLog(horizon).add(replace(chunk, status=np.full_like(chunk.status, WAITING)))
    assert folded.completed() == exact.completed()
    with pytest.raises(Exception, match="keep_records=True"):
        folded.records()
    for name, want in exact.distributions().items():
        got = folded.distributions()[name]
        assert math.isclose(got.mean, want.mean, rel_tol=1e-12), name  # type: ignore[arg-type]
        for q in ("p50", "p90", "p99"):
            # Each order statistic within RELATIVE_ACCURACY; interpolating between two keeps it.
            assert abs(getattr(got, q) - getattr(want, q)) <= RELATIVE_ACCURACY * getattr(want, q), (name, q)
    grid = np.linspace(horizon / 200, horizon, 200)  # 200 divides the curve's 4,000 bins: exact
    assert [a.tolist() for a in folded.completions_by(grid)] == [a.tolist() for a in exact.completions_by(grid)]


def test_a_run_past_the_exact_limit_reports_the_same_counts_and_close_quantiles(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, exact, want = _outcome("vllm", 60.0, 1, stream=True)
    monkeypatch.setattr(completions, "EXACT_REQUESTS", 300)
    monkeypatch.setattr(runner, "RETIRE_EVERY", 100)
    _, result, got = _outcome("vllm", 60.0, 1, stream=True)
    assert not result.completions.exact
    for key, value in want.items():
        if key.startswith(("p50", "p90", "p99")):
            assert abs(got[key] - value) <= RELATIVE_ACCURACY * value, key
        elif isinstance(value, float):
            assert math.isclose(got[key], value, rel_tol=1e-12), key
        else:
            assert got[key] == value, key
    scenario = build_scenario(hidden_lengths=True)
    fluid = scenario.fluid(scenario.sample(60.0, 1), 60.0)
    assert regret_curve(result, fluid).completions.tolist() == regret_curve(exact, fluid).completions.tolist()


def test_the_time_series_keeps_at_most_its_rows_evenly_spaced() -> None:
    recorder = TimeSeriesRecorder(max_rows=10)
    scenario = build_scenario()
    result = run(scenario.engine(), make_policy("vllm", scenario, 30.0), scenario.chunks(30.0, 0), 30.0,
                 callbacks=[recorder])
    times = recorder.arrays()["time"]
    assert result.iterations > 100 and 5 <= len(times) <= 10
    assert np.all(np.diff(times) > 0)


def test_the_sketch_of_an_empty_sample_has_no_figures() -> None:
    assert QuantileSketch().distribution().p99 is None
