"""Workloads: type parsing, arrival processes, trace CSVs and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsched_env import (
    ConfigError,
    GammaWorkload,
    LengthSampleWorkload,
    OnOffWorkload,
    PoissonWorkload,
    TraceFormatError,
    TraceWorkload,
    parse_types,
)
from llmsched_env.workload import read_trace_csv


def test_parse_types_reads_the_compact_form_and_round_trips() -> None:
    mix = parse_types("p=10,o=10,rate=20; prompt=10,output=20,lambda=10")
    assert mix.prompt_lens.tolist() == [10, 10]
    assert mix.output_lens.tolist() == [10, 20]
    assert mix.rates.tolist() == [20.0, 10.0]
    assert parse_types(mix.to_text()) == mix


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p=10,o=10,rate=20;p=5,q=3,rate=1", r"type 2 .*unknown field 'q'"),
        ("p=10,o=10", r"missing field\(s\) rate"),
        ("p=0,o=10,rate=1", r"prompt length must be an integer in \[1, 2147483647\], got 0"),
        ("p=10,o=-3,rate=1", r"output length must be an integer in \[1, 2147483647\], got -3"),
        ("p=10,o=10,rate=-1", r"arrival rate must be in \[0, 1e\+09\] req/s"),
        ("p=1.5,o=10,rate=1", r"p and o must be integers"),
        ("p=10,o=10,rate=fast", r"rate must be a number"),
        ("p=10,p=11,o=1,rate=1", r"given twice"),
        ("p10,o=1,rate=1", r"expected key=value"),
        ("", r"no request type"),
    ],
)
def test_parse_types_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_types(text)


def test_poisson_rates_and_seeding() -> None:
    mix = parse_types("p=10,o=10,rate=40;p=20,o=5,rate=10")
    a = PoissonWorkload(mix).sample(500.0, np.random.default_rng(3))
    b = PoissonWorkload(mix).sample(500.0, np.random.default_rng(3))
    np.testing.assert_array_equal(a.arrival_time, b.arrival_time)
    assert np.all(np.diff(a.arrival_time) >= 0) and a.arrival_time.max() <= 500.0
    for prompt, rate in ((10, 40.0), (20, 10.0)):
        count = int(np.sum(a.prompt_len == prompt))
        expected = rate * 500.0
        assert abs(count - expected) < 5 * np.sqrt(expected)


def test_a_longer_horizon_extends_a_shorter_one() -> None:
    mix = parse_types("p=10,o=10,rate=40;p=20,o=5,rate=10")
    for workload in (PoissonWorkload(mix), GammaWorkload(mix, cv=3.0)):
        short = workload.sample(100.0, np.random.default_rng(5))
        long = workload.sample(1000.0, np.random.default_rng(5)).until(100.0)
        np.testing.assert_array_equal(short.arrival_time, long.arrival_time)
        np.testing.assert_array_equal(short.prompt_len, long.prompt_len)


@given(cv=st.floats(0.3, 4.0))
def test_gamma_arrivals_have_the_requested_rate_and_burstiness(cv: float) -> None:
    mix = parse_types("p=10,o=10,rate=50")
    arrivals = GammaWorkload(mix, cv=cv).sample(400.0, np.random.default_rng(1))
    gaps = np.diff(arrivals.arrival_time)
    assert len(arrivals) / 400.0 == pytest.approx(50.0, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.2)


def test_on_off_arrivals_keep_the_mean_rate_and_are_bursty() -> None:
    mix = parse_types("p=10,o=10,rate=20")
    arrivals = OnOffWorkload(mix, mean_on_s=5.0, mean_off_s=5.0, off_factor=0.1).sample(2000.0,
                                                                                      np.random.default_rng(2))
    assert len(arrivals) / 2000.0 == pytest.approx(20.0, rel=0.1)
    per_second = np.bincount(arrivals.arrival_time.astype(int))
    assert per_second.var() > 2 * per_second.mean()  # over-dispersed: a Poisson process has var = mean


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_trace_replay_and_rate_scaling(tmp_path: Path) -> None:
    path = write(tmp_path, "arrived_at,num_prefill_tokens,num_decode_tokens\n1.0,10,5\n2.0,20,6\n\n5.0,30,7\n")
    trace = TraceWorkload.from_csv(path)
    arrivals = trace.sample(100.0, np.random.default_rng(0))
    assert arrivals.arrival_time.tolist() == [0.0, 1.0, 4.0]
    assert arrivals.prompt_len.tolist() == [10, 20, 30] and arrivals.output_len.tolist() == [5, 6, 7]
    doubled = trace.with_rate(2 * trace.mean_rate)
    assert doubled.sample(100.0, np.random.default_rng(0)).arrival_time.tolist() == [0.0, 0.5, 2.0]
    assert len(trace.sample(3.0, np.random.default_rng(0))) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"trace.csv:1: empty file"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens,user\n", r":1: unknown column\(s\) 'user'"),
        ("arrived_at,num_prefill_tokens\n0,1\n", r":1: missing column\(s\) num_decode_tokens"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,ten,5\n", r":3: field 'num_prefill_tokens'"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,0\n",
         r":2: field 'num_decode_tokens' must be an integer in \[1, 2147483647\], got '0'"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,-4,3\n", r":2: field 'num_prefill_tokens'"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,4.5,3\n", r":2: field 'num_prefill_tokens'"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n-1,4,3\n",
         r":2: field 'arrived_at' must be finite and >= 0"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\nnan,4,3\n", r":2: field 'arrived_at'"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n2,4,3\n1,4,3\n", r":3: field 'arrived_at' decreases"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,4\n", r":2: expected 3 fields"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n", r"no requests after the header"),
    ],
)
def test_malformed_traces_name_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceFormatError, match=message):
        TraceWorkload.from_csv(write(tmp_path, text))


def test_missing_trace_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="cannot open trace"):
        read_trace_csv(tmp_path / "nope.csv", require_arrivals=True)


def test_a_length_only_file_needs_an_arrival_process(tmp_path: Path) -> None:
    path = write(tmp_path,
                 "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n100,10,110,10\n50,5,55,10\n")
    with pytest.raises(TraceFormatError, match="missing column"):
        TraceWorkload.from_csv(path)
    workload = LengthSampleWorkload.from_csv(path, rate=10.0)
    arrivals = workload.sample(100.0, np.random.default_rng(0))
    assert set(arrivals.prompt_len.tolist()) <= {100, 50}
    assert len(arrivals) == pytest.approx(1000, rel=0.15)


def test_real_traces_load(shared_data: Path) -> None:
    conv = TraceWorkload.from_csv(shared_data / "azure_conv_trace.csv")
    assert len(conv.arrival_time) == 19366
    assert conv.prompt_len.mean() == pytest.approx(1155, rel=0.01)
    code = TraceWorkload.from_csv(shared_data / "azure_code_trace.csv")
    assert len(code.arrival_time) == 8819
    arxiv = LengthSampleWorkload.from_csv(shared_data / "arxiv_summarization_lengths.csv", rate=2.0)
    assert len(arxiv.prompt_len) == 28257
