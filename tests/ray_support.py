"""Whether Ray is installed, and the mark of the tests that need it: they run where it is (the ``ray`` extra; CI
has an environment of its own for them, with ``LLMSCHED_REQUIRE_RAY=1`` so that they fail rather than skip)."""

from __future__ import annotations

import os

import pytest


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


needs_ray = pytest.mark.skipif(not ray_installed() and not os.environ.get("LLMSCHED_REQUIRE_RAY"),
                               reason="Ray is not installed (pip install -e '.[ray]')")
