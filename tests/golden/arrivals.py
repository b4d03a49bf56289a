"""Fingerprints of seeded arrivals (tests/golden/arrivals.json): generating them in chunks, as runs now do,
must leave every seed's requests what they were when they were generated all at once.

Run ``python -m tests.golden.arrivals`` to regenerate (a change that moves them says why in CHANGELOG.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from llmsched_env.scenario import build_scenario
from llmsched_env.workload import Arrivals

HERE = Path(__file__).parent
_ARXIV = HERE.parents[1].parent / "shared" / "data" / "arxiv_summarization_lengths.csv"

#: (name, build_scenario options, horizon in s): every kind of generated arrivals, over several draw chunks.
CASES: tuple[tuple[str, dict[str, object], float], ...] = (
    ("poisson", {}, 200.0),
    ("poisson-three-types", {"types": "p=10,o=10,rate=20;p=30,o=5,rate=3;p=5,o=40,rate=7"}, 300.0),
    ("gamma", {"arrivals": "gamma", "cv": 3.0}, 200.0),
    ("onoff", {"arrivals": "onoff"}, 200.0),
    ("diurnal", {"arrivals": "diurnal"}, 200.0),
    ("length-sample", {"trace": str(_ARXIV), "rate": 30.0}, 200.0),
    ("length-sample-onoff", {"trace": str(_ARXIV), "rate": 30.0, "arrivals": "onoff"}, 200.0),
)
SEEDS = (0, 1, 7)


def fingerprint(arrivals: Arrivals) -> dict[str, object]:
    """Counts and the integer columns exactly (hashes); times at a few positions (floats, compared within a
    tolerance: they pass through libm)."""
    times = arrivals.arrival_time
    picks = sorted({0, len(times) // 3, len(times) // 2, len(times) - 1}) if len(times) else []
    return {"count": len(times),
            "prompt_sha256": hashlib.sha256(np.ascontiguousarray(arrivals.prompt_len, "<i8").tobytes()).hexdigest(),
            "output_sha256": hashlib.sha256(np.ascontiguousarray(arrivals.output_len, "<i8").tobytes()).hexdigest(),
            "times": {str(i): float(times[i]) for i in picks}}


def fingerprints() -> dict[str, object]:
    out: dict[str, object] = {}
    for name, options, horizon in CASES:
        scenario = build_scenario(**options)  # type: ignore[arg-type]
        for seed in SEEDS:
            out[f"{name}/seed={seed}/horizon={horizon:g}"] = fingerprint(scenario.sample(horizon, seed))
    return out


if __name__ == "__main__":
    (HERE / "arrivals.json").write_text(json.dumps(fingerprints(), indent=1) + "\n")
