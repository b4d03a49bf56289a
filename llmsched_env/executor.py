"""Where the project's parallel work runs: processes on this machine (the default), or a Ray cluster.

A sweep is a list of independent tasks, each a picklable call ``function(*arguments)`` (one scenario's rate and
seed compared across policies, one policy's stability search on one seed). An :class:`Executor` runs them and
hands the results back **in the tasks' order**, whatever order they finished in, so a report is the same on one
process, on many, and on a cluster: every task is deterministic given its arguments (the simulator is).

* :class:`LocalExecutor`: ``jobs`` worker processes (``ProcessPoolExecutor``, forked from a clean server process:
  :func:`_worker_context`), or this process for one job. It needs nothing beyond the project.
* :class:`RayExecutor`: each task a Ray task (one CPU), on a local Ray started here (``num_cpus``) or on the
  cluster at ``address`` (``ray://host:10001`` or ``auto``; the project's packages are shipped to its workers
  through the job's ``runtime_env``). Ray keeps its worker processes between tasks, so Numba's loading of the
  compiled code is paid once per worker, not once per task. Needs the ``ray`` extra (``pip install -e '.[ray]'``).

:func:`make_executor` picks one from the command line's options (``--jobs``, ``--ray``, ``--ray-address``) and
the ``LLMSCHED_RAY_ADDRESS`` environment variable.

A task that raises at run time (an engine fault) need not lose the others: with ``keep_going`` its slot holds a
:class:`TaskFailure` naming the error, the same on every executor, and the caller reports the completed results
beside a list of the failed tasks. Bad input is refused before any task starts, as everywhere.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from llmsched_env.errors import ConfigError

#: The environment variable that points every command at a Ray cluster (as ``--ray-address`` does).
RAY_ADDRESS_VARIABLE = "LLMSCHED_RAY_ADDRESS"

TaskDone = Callable[[int, Any], None]


@dataclass(frozen=True)
class TaskFailure:
    """A task that raised at run time, in its slot of :meth:`Executor.map`'s results (with ``keep_going``)."""

    error: str  # "Type: message" of the exception the task raised (a Ray task's own, not Ray's wrapper)

    @classmethod
    def of(cls, error: BaseException) -> "TaskFailure":
        # Ray wraps a task's exception (RayTaskError); its cause is the task's own, as run locally. A worker that
        # died (WorkerCrashedError) has no cause: Ray's error is the task's.
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error
        return cls(f"{type(error).__name__}: {error}")


def _settled(result: Callable[[], Any], keep_going: bool) -> Any:
    """A task's result, or with ``keep_going`` the :class:`TaskFailure` of the error that getting it raised."""
    try:
        return result()
    except Exception as error:  # the task's own, pickled back; or the pool's, or Ray's, when a worker died
        if not keep_going:
            raise
        return TaskFailure.of(error)


def failed_task(task: dict[str, Any], failure: TaskFailure) -> dict[str, Any]:
    """One entry of a report's ``failed`` list: what the task was (its caller's words) and its error."""
    return {**task, "error": failure.error}


class Executor(Protocol):
    """Runs independent tasks and returns their results in the tasks' order."""

    #: How many tasks may run at once (the report says so; it does not change any result).
    workers: int

    def map(self, function: Callable[..., Any], tasks: Sequence[tuple], on_done: TaskDone | None = None,
            keep_going: bool = False, gpus: float = 0.0) -> list[Any]:
        """``[function(*task) for task in tasks]``, run in parallel; ``on_done(index, result)`` is called in this
        process as each task finishes (in the order they finish). A task that raises stops the map with its
        error, or with ``keep_going`` leaves a :class:`TaskFailure` in its slot while the others run on. Tasks that
        each need ``gpus`` GPUs (a live engine) run where one is free: on Ray, as many at once as the cluster has
        GPUs; on this machine, one at a time in this process."""
        ...


class LocalExecutor:
    """Tasks on ``jobs`` processes of this machine (default: every core; 1 runs them in this process)."""

    def __init__(self, jobs: int | None = None) -> None:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"jobs must be >= 1, got {jobs}")
        self.workers = jobs or os.cpu_count() or 1

    def map(self, function: Callable[..., Any], tasks: Sequence[tuple], on_done: TaskDone | None = None,
            keep_going: bool = False, gpus: float = 0.0) -> list[Any]:
        results: list[Any] = [None] * len(tasks)
        if self.workers == 1 or len(tasks) <= 1 or gpus > 0:
            for index, task in enumerate(tasks):
                results[index] = _settled(lambda: function(*task), keep_going)
                if on_done is not None:
                    on_done(index, results[index])
            return results
        with ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=_worker_context()) as pool:
            futures = {pool.submit(function, *task): index for index, task in enumerate(tasks)}
            for future in as_completed(futures):
                index = futures[future]
                results[index] = _settled(future.result, keep_going)
                if on_done is not None:
                    on_done(index, results[index])
        return results


def _worker_context() -> multiprocessing.context.BaseContext:
    """Where local workers come from: forked from a server process that started clean and imported the simulator
    and the sweeps once, not from this process. A fork of a process whose threads hold locks (torch's thread pool
    once an agent is loaded, Ray's) can deadlock in the child; a fresh interpreter per worker would import
    everything again (seconds, each time)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["baselines.suite", "baselines.stability"])  # read when the server starts
    return context


def _packages() -> list[Any]:
    """The project's packages, as a Ray ``runtime_env`` ships them to a cluster's workers."""
    import agents
    import baselines
    import live_backend
    import llmsched_env

    return [llmsched_env, baselines, agents, live_backend]


class RayExecutor:
    """Tasks as Ray tasks: on the cluster at ``address``, or on a Ray started here with ``num_cpus`` CPUs (default:
    every core) when ``address`` is ``None``. A Ray already initialised in this process is used as it is."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self._ray = init_ray(address, num_cpus)
        self.workers = max(int(self._ray.cluster_resources().get("CPU", 1)), 1)

    def map(self, function: Callable[..., Any], tasks: Sequence[tuple], on_done: TaskDone | None = None,
            keep_going: bool = False, gpus: float = 0.0) -> list[Any]:
        ray = self._ray
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(_call)  # a GPU each: one live engine per GPU
        pending = {remote.remote(function, *task): index for index, task in enumerate(tasks)}
        results: list[Any] = [None] * len(tasks)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            results[index] = _settled(lambda: ray.get(done[0]), keep_going)
            if on_done is not None:
                on_done(index, results[index])
        return results


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Ray, connected: to the cluster at ``address`` (the project's packages shipped to its workers), or to a Ray
    started here with ``num_cpus`` CPUs (default: every core) when ``address`` is ``None``; a Ray already
    initialised in this process is used as it is. Without Ray installed, one line saying what to install."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError("--ray needs Ray, which is not installed: pip install -e '.[ray]'") from error
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:  # a cluster's workers may not have the project: ship it with the job
            ray.init(address=address, runtime_env={"py_modules": _packages()}, log_to_driver=False,
                     configure_logging=False)
    return ray


def _call(function: Callable[..., Any], *arguments: Any) -> Any:
    return function(*arguments)


def make_executor(jobs: int | None = None, ray: bool = False, ray_address: str | None = None) -> Executor:
    """The executor the command line asks for: Ray when ``ray`` or an address is given (``ray_address``, else
    ``LLMSCHED_RAY_ADDRESS``; ``ray`` alone starts a local Ray with ``jobs`` CPUs), else local processes."""
    address = ray_address or os.environ.get(RAY_ADDRESS_VARIABLE) or None
    if ray or address is not None:
        return RayExecutor(address, num_cpus=jobs if address is None else None)
    return LocalExecutor(jobs)
