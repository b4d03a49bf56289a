"""The golden set (tests/golden/): a short sweep's JSON and seeded environment episodes stay what they were.

Integers (counts, iterations, decisions' effects) must match exactly; floats within a relative 1e-9 (they pass
through libm and NumPy's vectorised loops, which round differently across CPUs by a few ulps at most).
A change that moves the set regenerates it (``python tests/golden/regenerate.py``) in the same commit and says
why in CHANGELOG.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.golden.regenerate import EPISODES, HERE, episode, sweep

RELATIVE = 1e-9


def _same(got: object, want: object, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, sorted(set(got) ^ set(want)))
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=RELATIVE, abs_tol=1e-12), \
            (where, got, want)
    else:
        assert got == want, (where, got, want)


def test_the_short_sweep_is_the_golden_one(tmp_path: Path) -> None:
    _same(sweep(tmp_path), json.loads((HERE / "sweep.json").read_text()), "sweep")


def test_the_seeded_episodes_are_the_golden_ones() -> None:
    want = json.loads((HERE / "episodes.json").read_text())
    _same([episode(*e) for e in EPISODES], want, "episodes")
