"""Arrivals drawn in chunks (what runs consume) are the arrivals drawn at once, and every seed's are what they
were (tests/golden/arrivals.json, written when arrivals were still drawn whole)."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsched_env.workload import ArrivalProcess, Arrivals, GammaWorkload, OnOffWorkload, TypeMix, parse_types
from tests.golden.arrivals import CASES, HERE, SEEDS, fingerprints


def test_every_seeds_arrivals_are_the_golden_ones() -> None:
    want = json.loads((HERE / "arrivals.json").read_text())
    got = fingerprints()
    assert got.keys() == want.keys()
    for key in want:
        g, w = got[key], want[key]
        # Counts and lengths exactly; times within a relative 1e-12 (they pass through libm's exp and log).
        assert (g["count"], g["prompt_sha256"], g["output_sha256"]) == (w["count"], w["prompt_sha256"],
                                                                         w["output_sha256"]), key
        assert g["times"].keys() == w["times"].keys(), key
        for i in w["times"]:
            assert math.isclose(g["times"][i], w["times"][i], rel_tol=1e-12), (key, i)
    assert len(want) == len(CASES) * len(SEEDS)


def _workloads(mix: TypeMix) -> list[object]:
    return [GammaWorkload(mix, cv=1.0), GammaWorkload(mix, cv=2.5), OnOffWorkload(mix, 2.0, 3.0, 0.1),
            ArrivalProcess("diurnal", period_s=40.0).workload(mix)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), horizon=st.floats(0.5, 400.0),
       rates=st.lists(st.floats(0.01, 60.0), min_size=1, max_size=4))
def test_chunks_put_together_are_the_sample(seed: int, horizon: float, rates: list[float]) -> None:
    mix = parse_types(";".join(f"p={3 + j},o={1 + 2 * j},rate={r!r}" for j, r in enumerate(rates)))
    for workload in _workloads(mix):
        whole = workload.sample(horizon, np.random.default_rng(seed))  # type: ignore[attr-defined]
        chunks = list(workload.chunks(horizon, np.random.default_rng(seed)))  # type: ignore[attr-defined]
        joined = Arrivals.concatenate(chunks)
        # The same code draws both: identical, not merely close.
        assert np.array_equal(joined.arrival_time, whole.arrival_time), workload
        assert np.array_equal(joined.prompt_len, whole.prompt_len) and np.array_equal(joined.output_len,
                                                                                       whole.output_len)
        assert all(np.all(np.diff(c.arrival_time) >= 0) for c in chunks)
        assert all(a.arrival_time[-1] <= b.arrival_time[0] for a, b in zip(chunks, chunks[1:]))
        assert not len(whole) or whole.arrival_time[-1] <= horizon


def test_chunks_are_drawn_as_they_are_read() -> None:
    """A stream over a horizon of ten thousand runs' worth draws nothing until read, and its first chunk is
    small (what makes a run's memory independent of the horizon)."""
    mix = parse_types("p=10,o=10,rate=1000")
    stream = GammaWorkload(mix, cv=1.0).chunks(1e9, np.random.default_rng(0))
    first = next(stream)
    assert 0 < len(first) <= 1024 and first.arrival_time[-1] < 2.0
