"""The sweeps' executor (llmsched_env.executor): local processes, and Ray with the same results.

The Ray tests run where Ray is installed (the ``ray`` extra; CI has an environment of its own for them, with
``LLMSCHED_REQUIRE_RAY=1`` so that they fail rather than skip) on a local Ray of two CPUs, no cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from baselines.suite import SweepPlan, run_sweeps
from llmsched_env.cli import app
from llmsched_env.errors import ConfigError
from llmsched_env.executor import LocalExecutor, make_executor
from llmsched_env.scenarios import load_scenario

runner = CliRunner()


def _slow_square(value: int, delay: float) -> int:
    import time

    time.sleep(delay)
    return value * value


@pytest.mark.parametrize("jobs", [1, 2])
def test_results_come_back_in_the_tasks_order_whatever_order_they_finish_in(jobs: int) -> None:
    finished: list[int] = []
    tasks = [(value, 0.3 if value == 0 else 0.0) for value in range(5)]  # the first finishes last on two workers
    results = LocalExecutor(jobs).map(_slow_square, tasks, on_done=lambda index, _: finished.append(index))
    assert results == [0, 1, 4, 9, 16] and sorted(finished) == [0, 1, 2, 3, 4]


def test_the_default_executor_is_local_and_a_bad_job_count_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("LLMSCHED_RAY_ADDRESS", raising=False)
    assert isinstance(make_executor(3), LocalExecutor) and make_executor(3).workers == 3
    with pytest.raises(ConfigError, match="jobs must be >= 1, got 0"):
        LocalExecutor(0)


def _ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


needs_ray = pytest.mark.skipif(not _ray_installed() and not os.environ.get("LLMSCHED_REQUIRE_RAY"),
                               reason="Ray is not installed (pip install -e '.[ray]')")


def test_asking_for_ray_without_it_is_one_clear_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if _ray_installed():
        pytest.skip("Ray is installed here")
    result = runner.invoke(app, ["stability", "--scenario", "paper-single", "--policies", "vllm", "--seeds", "0",
                                 "--ray"])
    assert result.exit_code == 2 and "--ray needs Ray, which is not installed: pip install -e '.[ray]'" in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


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
