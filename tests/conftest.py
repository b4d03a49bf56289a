"""Shared fixtures: the real traces in ../shared/data when present (tests using them skip otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The folder of real traces; skips the test when it is not beside the checkout."""
    if not (SHARED_DATA / "azure_conv_trace.csv").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
