"""The sweeps' executor (llmsched_env.executor): local processes, and Ray with the same results.

The Ray tests run where Ray is installed (the ``ray`` extra; CI has an environment of its own for them, with
``LLMSCHED_REQUIRE_RAY=1`` so that they fail rather than skip) on a local Ray of two CPUs, no cluster.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from baselines.suite import SweepPlan, run_sweeps
from llmsched_env.cli import app
from llmsched_env.errors import ConfigError, EngineFailure
from llmsched_env.executor import LocalExecutor, TaskFailure, make_executor
from llmsched_env.scenario import Scenario
from llmsched_env.scenarios import load_scenario
from llmsched_env.simulator import SimulatedEngine
from tests.ray_support import needs_ray, ray_installed

runner = CliRunner()


def _slow_square(value: int, delay: float) -> int:
    import time

    time.sleep(delay)
    return value * value


def _simulate_and_say_where(seed: int) -> tuple[int, bool]:
    """A task: a short simulation under vLLM's policy, and its worker's process id and whether that policy's
    compiled loop was loaded in that process before the task ran."""
    from baselines import make_policy
    from baselines.fcfs import run_fcfs
    from llmsched_env import run

    warm = len(run_fcfs.signatures) > 0
    scenario = load_scenario("paper-single").scenario
    scenario = scenario.at_rate(scenario.rate_for_load(0.8))
    run(scenario.engine(), make_policy("vllm", scenario, 5.0), scenario.sample(5.0, seed), 5.0)
    return os.getpid(), warm


@pytest.mark.parametrize("jobs", [1, 2])
def test_results_come_back_in_the_tasks_order_whatever_order_they_finish_in(jobs: int) -> None:
    finished: list[int] = []
    tasks = [(value, 0.3 if value == 0 else 0.0) for value in range(5)]  # the first finishes last on two workers
    results = LocalExecutor(jobs).map(_slow_square, tasks, on_done=lambda index, _: finished.append(index))
    assert results == [0, 1, 4, 9, 16] and sorted(finished) == [0, 1, 2, 3, 4]


def _dies_at_two(value: int) -> int:
    if value == 2:
        raise EngineFailure("task 2 died")
    return value


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_task_stops_the_map_or_leaves_its_failure_in_its_slot(jobs: int) -> None:
    tasks = [(value,) for value in range(4)]
    with pytest.raises(EngineFailure, match="task 2 died"):
        LocalExecutor(jobs).map(_dies_at_two, tasks)
    done: list[int] = []
    results = LocalExecutor(jobs).map(_dies_at_two, tasks, on_done=lambda index, _: done.append(index),
                                      keep_going=True)
    assert results == [0, 1, TaskFailure("EngineFailure: task 2 died"), 3] and sorted(done) == [0, 1, 2, 3]


def test_the_default_executor_is_local_and_a_bad_job_count_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("LLMSCHED_RAY_ADDRESS", raising=False)
    assert isinstance(make_executor(3), LocalExecutor) and make_executor(3).workers == 3
    with pytest.raises(ConfigError, match="jobs must be >= 1, got 0"):
        LocalExecutor(0)


def test_asking_for_ray_without_it_is_one_clear_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if ray_installed():
        pytest.skip("Ray is installed here")
    result = runner.invoke(app, ["stability", "--scenario", "paper-single", "--policies", "vllm", "--seeds", "0",
                                 "--ray"])
    assert result.exit_code == 2 and "--ray needs Ray, which is not installed: pip install -e '.[ray]'" in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    # One logical GPU (no device behind it): what live-engine tasks ask for is scheduled as on a GPU node.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@needs_ray
def test_rays_workers_load_the_compiled_kernels_once_not_per_task(local_ray: None) -> None:
    # Two sweeps of eight tasks on a Ray of two CPUs: Ray keeps its worker processes, so the compiled kernels are
    # loaded (from Numba's cache, or compiled) by a worker's first task only, in this command's sweeps alike.
    from llmsched_env.executor import RayExecutor

    executor = RayExecutor()
    results = [where for _ in range(2) for where in executor.map(_simulate_and_say_where, [(s,) for s in range(8)])]
    workers = {pid for pid, _ in results}
    assert len(workers) < len(results) // 2  # the tasks shared a few workers
    for pid in workers:
        assert sum(not warm for worker, warm in results if worker == pid) <= 1, results


@needs_ray
def test_a_sweep_through_ray_is_the_local_sweep(local_ray: None) -> None:
    from llmsched_env.executor import RayExecutor

    plans = [SweepPlan.of(load_scenario(name), policies=["wait", "vllm"], loads=[0.6], horizon=20.0, seeds=[0, 1])
             for name in ("paper-single", "bursty-low")]
    through_ray = run_sweeps(plans, executor=RayExecutor())
    local = run_sweeps(plans, executor=LocalExecutor(2))
    assert [[r.row for r in c.runs] for c in through_ray] == [[r.row for r in c.runs] for c in local]


@needs_ray
def test_compare_suite_and_stability_give_the_same_json_through_ray_and_locally(local_ray: None, tmp_path: Path,
                                                                                monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import llmsched_env.scenarios as scenarios

    monkeypatch.setattr(scenarios, "scenario_names", lambda suite_only=False: ["paper-single", "bursty-low"])
    written = {}
    for way, options in (("ray", ["--ray"]), ("local", ["--jobs", "2"])):
        out = tmp_path / way
        result = runner.invoke(app, ["compare", "--suite", "--policies", "wait,vllm", "--loads", "0.6", "--horizon",
                                     "15", "--seeds", "0,1", "--no-plots", "--out", str(out), *options])
        assert result.exit_code == 0, result.output
        written[way] = {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*.json"))}
        result = runner.invoke(app, ["stability", "--scenario", "paper-single", "--policies", "vllm,wait",
                                     "--seeds", "0,1", "--horizon", "30", "--tolerance", "0.05", "--json", *options])
        assert result.exit_code == 0, result.output
        written[way]["stability"] = result.stdout.encode()
    assert set(written["ray"]) >= {"suite.json", "paper-single/comparison.json", "bursty-low/comparison.json"}
    assert written["ray"] == written["local"]
    assert json.loads(written["ray"]["stability"])["rows"][0]["policy"] == "vllm"


_TYPES_SWEEP = ["compare", "--types", "p=50,o=156,rate=1;p=100,o=171,rate=1", "--policies", "wait,vllm,wait-paper",
                "--loads", "0.6,0.8", "--horizon", "15", "--seeds", "0,1", "--no-plots", "--json"]


def _types_sweep(tmp_path: Path, options: list[str], exit_code: int = 0) -> dict[str, bytes]:
    """``compare --types`` (a workload of the command line, not a named scenario): what it printed and wrote."""
    out = tmp_path / ("types" + "-".join(options))
    result = runner.invoke(app, [*_TYPES_SWEEP, "--out", str(out), *options])
    assert result.exit_code == exit_code, result.output
    return {"stdout": result.stdout.encode(),
            **{path.name: path.read_bytes() for path in sorted(out.glob("comparison.*"))}}


@pytest.mark.filterwarnings("ignore:policy 'wait-paper' is now called:FutureWarning")
def test_compare_of_a_command_line_workload_on_workers_is_the_one_process_comparison(tmp_path: Path) -> None:
    """``compare --types`` with ``--jobs``: a job per (rate, seed), the report byte for byte the one-process run's
    (a deprecated policy name included: the jobs and their merge both know it by its new name)."""
    one_process = _types_sweep(tmp_path, [])
    assert set(one_process) == {"stdout", "comparison.json", "comparison.csv", "comparison.md"}
    assert [row["policy"] for row in json.loads(one_process["comparison.json"])["rows"]][:3] == [
        "wait", "vllm", "wait-pausing"]
    assert _types_sweep(tmp_path, ["--jobs", "2"]) == one_process


@pytest.mark.parametrize("workload", [["--scenario", "paper-single"], ["--types", "p=50,o=156,rate=1"]])
def test_an_unknown_policy_is_refused_before_any_task(workload: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", *workload, "--policies", "vllm,bogus", "--loads", "0.6", "--horizon",
                                 "10", "--seeds", "0", "--no-plots", "--out", str(tmp_path), "--jobs", "2"])
    assert result.exit_code == 2, result.output
    assert "unknown policy 'bogus'" in result.output and "failed" not in result.output


@needs_ray
@pytest.mark.filterwarnings("ignore:policy 'wait-paper' is now called:FutureWarning")
def test_compare_of_a_command_line_workload_through_ray_is_the_one_process_comparison(local_ray: None,
                                                                                       tmp_path: Path) -> None:
    assert _types_sweep(tmp_path, ["--ray"]) == _types_sweep(tmp_path, [])


# -- a task that fails at run time loses only its own results ----------------------------------------------------
class _DyingEngine:
    """A simulated engine that dies at its 20th iteration, as a live engine can (``EngineFailure``). Not a
    ``SimulatedEngine``: the run goes through the Python loop, one ``step`` per iteration."""

    def __init__(self, engine: SimulatedEngine) -> None:
        self._engine, self._steps = engine, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def step(self, decision: object) -> object:
        self._steps += 1
        if self._steps == 20:
            raise EngineFailure("the engine died at its 20th iteration (injected)")
        return self._engine.step(decision)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _FaultyScenario(Scenario):
    """A scenario whose engine dies for the policies that see output lengths, at rates above ``dies_above_rps``."""

    dies_above_rps: float = 0.0

    def engine(self):  # type: ignore[no-untyped-def]
        engine = super().engine()
        return _DyingEngine(engine) if self.output_lengths_known and self.base_rate > self.dies_above_rps else engine


def _with_a_fault(monkeypatch, faulty: str, load: float) -> None:  # type: ignore[no-untyped-def]
    """Two scenarios in the suite; ``faulty``'s engine dies above ``load`` for the policies that see lengths."""
    import llmsched_env.scenarios as scenarios

    real = scenarios.load_scenario

    def faulty_load(name: str):  # type: ignore[no-untyped-def]
        spec = real(name)
        if spec.name != faulty:
            return spec
        scenario = _FaultyScenario(**{f.name: getattr(spec.scenario, f.name) for f in fields(Scenario)},
                                   dies_above_rps=spec.scenario.rate_for_load(load))
        return replace(spec, scenario=scenario)

    monkeypatch.setattr(scenarios, "scenario_names", lambda suite_only=False: ["paper-single", "bursty-low"])
    monkeypatch.setattr(scenarios, "load_scenario", faulty_load)


def _faulty_runs(tmp_path: Path, options: list[str]) -> dict[str, bytes]:
    """``compare --suite`` and ``stability --json`` with an engine that dies: what each wrote (exit 1 both)."""
    out = tmp_path / "-".join(options)
    result = runner.invoke(app, ["compare", "--suite", "--policies", "wait,vllm", "--loads", "0.6,0.8", "--horizon",
                                 "15", "--seeds", "0,1", "--no-plots", "--out", str(out), *options])
    assert result.exit_code == 1, result.output
    assert "failed: scenario bursty-low, load 0.8," in result.output
    assert "EngineFailure: the engine died" in result.output
    written = {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*.json"))}
    written["suite.md"] = (out / "suite.md").read_bytes()
    result = runner.invoke(app, ["stability", "--scenario", "bursty-low", "--policies", "vllm,wait", "--seeds", "0,1",
                                 "--horizon", "30", "--tolerance", "0.1", "--json", *options])
    assert result.exit_code == 1, result.output
    written["stability"] = result.stdout.encode()
    return written


def _check_faulty_runs(written: dict[str, bytes]) -> None:
    suite = json.loads(written["suite.json"])
    assert [(row["scenario"], row["load"]) for row in suite["rows"]] == [("paper-single", 0.6), ("paper-single", 0.8),
                                                                         ("bursty-low", 0.6)]
    assert [(f["scenario"], f["load"], f["seed"]) for f in suite["failed"]] == [("bursty-low", 0.8, 0),
                                                                              ("bursty-low", 0.8, 1)]
    assert {f["error"] for f in suite["failed"]} == {"EngineFailure: the engine died at its 20th iteration (injected)"}
    bursty = json.loads(written["bursty-low/comparison.json"])
    assert len(bursty["rates_rps"]) == 1 and len(bursty["rows"]) == 2 * 2 and len(bursty["failed"]) == 2
    assert "failed" not in json.loads(written["paper-single/comparison.json"])
    assert b"Failed at run time (2 tasks" in written["suite.md"]
    stability = json.loads(written["stability"])
    assert [row["policy"] for row in stability["rows"]] == ["vllm"] and stability["rows"][0]["per_seed_rps"]
    assert [(f["policy"], f["seed"]) for f in stability["failed"]] == [("wait", 0), ("wait", 1)]


def test_a_task_that_fails_at_run_time_loses_only_its_own_rows_in_process_and_in_worker_processes(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _with_a_fault(monkeypatch, "bursty-low", 0.7)
    in_process, workers = _faulty_runs(tmp_path, ["--jobs", "1"]), _faulty_runs(tmp_path, ["--jobs", "2"])
    _check_faulty_runs(workers)
    assert in_process == workers


@pytest.mark.filterwarnings("ignore:policy 'wait-paper' is now called:FutureWarning")
def test_a_failing_job_of_a_command_line_workload_loses_only_its_own_rows(tmp_path: Path,
                                                                         monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import llmsched_env.cli as cli

    real = cli.build_scenario

    def faulty(**options):  # type: ignore[no-untyped-def]
        scenario = real(**options)
        return _FaultyScenario(**{f.name: getattr(scenario, f.name) for f in fields(Scenario)},
                               dies_above_rps=scenario.rate_for_load(0.7))

    monkeypatch.setattr(cli, "build_scenario", faulty)
    in_process, workers = _types_sweep(tmp_path, ["--jobs", "1"], 1), _types_sweep(tmp_path, ["--jobs", "2"], 1)
    assert in_process == workers
    comparison = json.loads(workers["comparison.json"])
    assert len(comparison["rates_rps"]) == 1 and {row["seed"] for row in comparison["rows"]} == {0, 1}
    assert [(f["load"], f["seed"]) for f in comparison["failed"]] == [(0.8, 0), (0.8, 1)]
    assert {f["error"] for f in comparison["failed"]} == {
        "EngineFailure: the engine died at its 20th iteration (injected)"}


@needs_ray
def test_a_task_that_fails_through_ray_gives_what_it_gives_locally(local_ray: None, tmp_path: Path,
                                                                   monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers need not import the tests
    from llmsched_env.executor import RayExecutor

    assert RayExecutor().map(_dies_at_two, [(value,) for value in range(4)], keep_going=True) == [
        0, 1, TaskFailure("EngineFailure: task 2 died"), 3]  # the task's own error, not Ray's wrapper
    _with_a_fault(monkeypatch, "bursty-low", 0.7)
    through_ray = _faulty_runs(tmp_path, ["--ray"])
    _check_faulty_runs(through_ray)
    assert through_ray == _faulty_runs(tmp_path, ["--jobs", "2"])


# -- an agent's evaluation, one task per seed ----------------------------------------------------------------------
PRETRAINED = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "tight-memory-wait"


def _evaluation(tmp_path: Path, options: list[str]) -> tuple[int, bytes]:
    out = tmp_path / ("evaluate" + "-".join(options))
    result = runner.invoke(app, ["evaluate", "--agent", str(PRETRAINED), "--policies", "wait,vllm", "--seeds", "0..3",
                                 "--horizon", "20", "--no-plots", "--out", str(out), *options])
    return result.exit_code, (out / "comparison.json").read_bytes() if (out / "comparison.json").exists() else b""


def test_an_agents_seeds_as_tasks_give_the_evaluation_of_one_process(tmp_path: Path) -> None:
    (code, alone), (spread_code, spread) = _evaluation(tmp_path, []), _evaluation(tmp_path, ["--jobs", "2"])
    assert code == spread_code == 0 and alone == spread
    document = json.loads(spread)
    assert document["seeds"] == [0, 1, 2, 3] and len(document["rows"]) == 3 * 4 and "failed" not in document


def test_a_seed_that_fails_loses_only_its_own_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import agents.evaluate as evaluation

    real = evaluation._evaluate_seed

    def dies_on_seed_one(*task):  # type: ignore[no-untyped-def]
        if task[5] == 1:
            raise EngineFailure("the engine died (injected)")
        return real(*task)

    monkeypatch.setattr(evaluation, "_evaluate_seed", dies_on_seed_one)
    code, written = _evaluation(tmp_path, ["--jobs", "1"])
    document = json.loads(written)
    assert code == 1 and document["failed"] == [{"seed": 1, "error": "EngineFailure: the engine died (injected)"}]
    assert sorted({row["seed"] for row in document["rows"]}) == [0, 2, 3] and document["seeds"] == [0, 1, 2, 3]


def test_a_live_evaluation_is_not_spread_over_local_workers(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--backend", "vllm", "--jobs", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "runs one engine on this machine: drop --jobs" in " ".join(result.output.split())


def _where(value: int) -> tuple[int, int]:
    return value, os.getpid()


def test_tasks_that_need_a_gpu_run_one_at_a_time_in_this_process() -> None:
    results = LocalExecutor(2).map(_where, [(value,) for value in range(3)], gpus=1)
    assert results == [(value, os.getpid()) for value in range(3)]


def test_a_live_task_that_cannot_start_its_engine_is_a_failed_seed() -> None:
    from live_backend.config import load_live_config
    from live_backend.evaluation import LiveEvaluation, evaluate_live_on

    request = LiveEvaluation(load_live_config("cpu-tiny", model="/nowhere"), ("vllm",), horizon=2.0,
                             types="p=60,o=40,rate=1")
    comparison = evaluate_live_on(LocalExecutor(1), request, [0, 1])
    assert comparison.runs == [] and [f["seed"] for f in comparison.failed] == [0, 1]
    assert all(f["error"].startswith("ConfigError: ") for f in comparison.failed)


@needs_ray
def test_an_agents_evaluation_through_ray_is_the_local_one(local_ray: None, tmp_path: Path) -> None:
    (code, through_ray), (local_code, local) = _evaluation(tmp_path, ["--ray"]), _evaluation(tmp_path, ["--jobs", "2"])
    assert code == local_code == 0 and through_ray == local


def _on_a_gpu(hold: float) -> tuple[int, float, float]:
    import time

    import ray

    start = time.monotonic()
    time.sleep(hold)
    return len(ray.get_gpu_ids()), start, time.monotonic()


@needs_ray
def test_tasks_that_need_a_gpu_run_one_per_gpu_on_ray(local_ray: None) -> None:
    from llmsched_env.executor import RayExecutor

    results = RayExecutor().map(_on_a_gpu, [(0.5,) for _ in range(3)], gpus=1)
    assert [gpus for gpus, _, _ in results] == [1, 1, 1]  # each holds the GPU
    spans = sorted((start, end) for _, start, end in results)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # one at a time: one GPU


@needs_ray
def test_a_live_evaluation_through_ray_is_a_task_per_seed_on_a_gpu(local_ray: None, tmp_path: Path) -> None:
    # Ray's environment has no vLLM: each seed's task, scheduled on the GPU, fails to start its engine, and says so.
    result = runner.invoke(app, ["evaluate", "--backend", "vllm", "--model", str(tmp_path), "--device", "cuda",
                                 "--policies", "vllm", "--seeds", "0,1", "--horizon", "2", "--out",
                                 str(tmp_path / "out"), "--ray"])
    assert result.exit_code == 1, result.output
    assert "failed: seed 0: ConfigError: the live backend needs vLLM" in " ".join(result.output.split())
