"""The command line: JSON interfaces and error reporting."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmsched_env.cli import app

runner = CliRunner()

SIMULATE_FIELDS = {"arrived", "completed", "waiting", "running", "evictions", "throughput_rps",
                   "fluid_throughput_rps", "regret_requests", "mean_latency_s", "p99_latency_s", "mean_ttft_s",
                   "peak_memory_frac"}


def invoke(*args: str) -> tuple[int, str]:
    """The exit code and the output: stdout alone with --json (progress lines go to stderr), else both."""
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout if "--json" in args and result.exit_code == 0 else result.output


def test_fluid_json_paper_model() -> None:
    code, out = invoke("fluid", "--types", "p=10,o=10,rate=20;p=10,o=20,rate=10", "--cost", "d0=0.01,d1=0.0001",
                       "--memory-tokens", "299", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert set(data) == {"schema_version", "rho", "tau_star_s", "memory_tokens", "throughput_rps", "throughput_tps",
                         "stable", "memory_bound"}
    assert data["rho"] == 0.75 and abs(data["tau_star_s"] - 0.04) < 1e-12 and abs(data["memory_tokens"] - 300) < 1e-9
    assert data["stable"] is False and data["memory_bound"] is True and data["throughput_rps"] < 30


def test_simulate_json_fields_and_accounting() -> None:
    code, out = invoke("simulate", "--policy", "vllm", "--types", "p=20,o=30,rate=20", "--horizon", "20",
                       "--seed", "3", "--memory-tokens", "4000", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert SIMULATE_FIELDS <= set(data)
    assert data["arrived"] == data["completed"] + data["waiting"] + data["running"]
    assert 0 < data["peak_memory_frac"] <= 1


def test_simulate_replays_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" +
                     "".join(f"{i * 0.1},{20 + i % 7},{5 + i % 11}\n" for i in range(200)))
    code, out = invoke("simulate", "--trace", str(trace), "--horizon", "10", "--json")
    assert code == 0, out
    assert json.loads(out)["arrived"] == 101  # arrivals at 0.0 .. 10.0


def test_compare_sweeps_a_length_only_trace_at_its_loads(tmp_path: Path) -> None:
    trace = tmp_path / "lengths.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{20 + i % 7},{5 + i % 11}\n"
                                                                        for i in range(50)))
    code, out = invoke("compare", "--trace", str(trace), "--loads", "0.5,0.8", "--policies", "vllm", "--horizon",
                       "10", "--no-plots", "--out", str(tmp_path / "out"), "--json")
    assert code == 0, out
    rows = json.loads(out)["rows"]
    assert [round(row["rho"], 1) for row in rows] == [0.5, 0.8]


def test_bad_input_exits_2_with_the_reason(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,10,zero\n")
    code, out = invoke("simulate", "--trace", str(trace), "--json")
    assert code == 2 and "bad.csv:3" in out and "num_decode_tokens" in out
    code, out = invoke("simulate", "--types", "p=100,o=100,rate=1", "--memory-tokens", "64", "--block-size", "16")
    assert code == 2 and "needs 200 KV tokens" in out
    code, out = invoke("fluid", "--types", "p=1,o=1,rate=1", "--memory-tokens", "0")
    assert code == 2 and "memory-tokens must be >= 1" in out
    code, out = invoke("simulate", "--policy", "magic")
    assert code == 2 and "unknown policy 'magic'" in out


def test_compare_json_rows_csv_and_plots(tmp_path: Path) -> None:
    code, out = invoke("compare", "--policies", "wait,vllm", "--rates", "20,30", "--horizon", "30",
                       "--out", str(tmp_path), "--json")
    assert code == 0, out
    data = json.loads(out)
    rows = data["rows"]
    assert [(r["policy"], r["rate_rps"]) for r in rows] == [("wait", 20.0), ("vllm", 20.0), ("wait", 30.0),
                                                           ("vllm", 30.0)]
    required = ["policy", "rate_rps", "arrived", "completed", "throughput_rps", "fluid_throughput_rps",
                "regret_requests", "mean_latency_s", "p99_latency_s", "mean_ttft_s", "evictions", "peak_memory_frac"]
    assert all(list(r)[: len(required)] == required for r in rows)
    # Every policy at a rate replays the same requests.
    assert rows[0]["arrived"] == rows[1]["arrived"] and rows[2]["arrived"] == rows[3]["arrived"]
    for name in ("comparison.csv", "comparison.json", "comparison.md", "throughput.png", "regret.png", "memory.png",
                 "queue.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "comparison.csv").read_text().count("\n") == 5
    markdown = (tmp_path / "comparison.md").read_text().splitlines()
    assert len(markdown) == 6 and markdown[2].startswith("| 20.00 | wait |")


def test_compare_table_and_errors(tmp_path: Path) -> None:
    code, out = invoke("compare", "--policies", "nested-wait,sarathi", "--loads", "0.5", "--horizon", "20",
                       "--out", str(tmp_path), "--no-plots")
    assert code == 0, out
    assert "nested-wait" in out and "sarathi" in out and "fluid optimum" in out
    code, out = invoke("compare", "--policies", "wait,fifo", "--rates", "10", "--out", str(tmp_path))
    assert code == 2 and "unknown policy 'fifo'" in out and "done" not in out  # refused before any progress
    code, out = invoke("compare", "--rates", "10,-1", "--out", str(tmp_path))
    assert code == 2 and "expected finite numbers > 0" in out


def test_every_command_gives_a_one_line_error_on_bad_input(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (("compare", "--out", str(a_file), "--rates", "10"), "exists and is not a folder"),
        (("simulate", "--seed", "-1"), "'--seed': Input should be greater than or equal to 0"),
        (("compare", "--seeds", "3..x", "--rates", "10", "--out", str(tmp_path)), "--seeds"),
        (("train", "--out", str(a_file)), "exists and is not a folder"),
        (("train", "--out", str(tmp_path / "a"), "--config", "nope"), "no training config 'nope'"),
        (("train", "--out", str(tmp_path / "a"), "--algo", "dqn"), "expected one of ppo, maskable-ppo"),
        (("train", "--out", str(tmp_path / "a"), "--env-id", "CartPole-v1"), "unknown environment id"),
        (("train", "--out", str(tmp_path / "a"), "--timesteps", "0"), "--timesteps"),
        (("train", "--out", str(tmp_path / "b"), "--resume"), "holds no training run"),
        (("evaluate", "--agent", str(tmp_path)), "is not an agent directory"),
        (("evaluate", "--agent", str(tmp_path), "--seeds", "-2..3"), "--seeds"),
    ]
    for args, message in cases:
        result = runner.invoke(app, list(args), env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        code, out = result.exit_code, " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
        assert code == 2, (args, out)
        assert message in out, (args, out)
        assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit)


def test_compare_over_several_seeds_reports_intervals(tmp_path: Path) -> None:
    code, out = invoke("compare", "--policies", "wait,vllm", "--rates", "30", "--horizon", "20", "--seeds", "0..2",
                       "--out", str(tmp_path), "--json", "--no-plots")
    assert code == 0, out
    data = json.loads(out)
    assert data["seeds"] == [0, 1, 2] and len(data["rows"]) == 6
    summary = {row["policy"]: row for row in data["summary"]}
    assert summary["wait"]["seeds"] == 3 and summary["wait"]["throughput_rps_ci95"] > 0
    markdown = (tmp_path / "comparison.md").read_text()
    assert "Per seed" in markdown
    # The summary's censored p99 (requests unfinished at the horizon counted at their age), as its JSON has it.
    header, _, *rows = markdown.splitlines()[:4]
    column = header.split(" | ").index("censored p99 s")
    wait_row = next(row for row in rows if row.split(" | ")[1] == "wait")
    cell = wait_row.split(" | ")[column]
    assert cell == (f"{summary['wait']['p99_censored_latency_s']:,.1f} ± "
                    f"{summary['wait']['p99_censored_latency_s_ci95']:,.1f}")


def test_evaluate_runs_the_pretrained_agent_beside_the_baselines(tmp_path: Path) -> None:
    agent = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "tight-memory-wait"
    code, out = invoke("evaluate", "--agent", str(agent), "--policies", "vllm", "--seeds", "0,1", "--horizon", "40",
                       "--out", str(tmp_path), "--json")
    assert code == 0, out
    data = json.loads(out)
    assert {row["policy"] for row in data["rows"]} == {"agent", "vllm", "wait"}
    agent_row = next(row for row in data["summary"] if row["policy"] == "agent")
    assert agent_row["regret_ratio_to_wait"] is not None
    assert (agent_row["regret_ratio_ci95_low"] <= agent_row["regret_ratio_to_wait"]
            <= agent_row["regret_ratio_ci95_high"])
    for name in ("comparison.csv", "comparison.json", "comparison.md", "throughput.png", "regret.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_compare_runs_a_named_scenario_with_its_own_memory(tmp_path: Path) -> None:
    code, out = invoke("compare", "--scenario", "paper-single", "--policies", "wait,vllm", "--loads", "0.5",
                       "--horizon", "20", "--seeds", "0,1", "--jobs", "1", "--no-plots", "--json",
                       "--out", str(tmp_path))
    assert code == 0, out
    payload = json.loads(out)
    assert payload["seeds"] == [0, 1] and {r["policy"] for r in payload["rows"]} == {"wait", "vllm"}
    assert all("regret_realised_requests" in r for r in payload["summary"])
    from llmsched_env.scenarios import load_scenario

    assert payload["rates_rps"] == load_scenario("paper-single").rates((0.5,))  # the scenario's load, not the default
    # Its verdict (a suite of one) beside the report, as `compare --suite` writes it for every scenario.
    verdict = json.loads((tmp_path / "suite.json").read_text())["rows"]
    assert [(row["scenario"], row["seeds"], row["fluid_guided"], row["engine"]) for row in verdict] == [
        ("paper-single", 2, "wait", "vllm")]


def test_compare_suite_writes_a_summary_and_a_report_per_scenario(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import llmsched_env.scenarios as scenarios

    monkeypatch.setattr(scenarios, "scenario_names",
                        lambda suite_only=False: ["paper-single", "bursty-low"])  # two, to keep it fast
    code, out = invoke("compare", "--suite", "--policies", "wait,nested-wait,vllm", "--loads", "0.6", "--horizon", "15",
                       "--seeds", "0,1", "--jobs", "2", "--no-plots", "--out", str(tmp_path))
    assert code == 0, out
    summary = json.loads((tmp_path / "suite.json").read_text())["rows"]
    assert [row["scenario"] for row in summary] == ["paper-single", "bursty-low"]
    assert {"level_on_throughput", "better_throughput", "better_p99_latency"} <= set(summary[0])
    assert (tmp_path / "bursty-low" / "comparison.json").exists() and "verdict" in (tmp_path / "suite.md").read_text()


def test_configs_lists_the_training_configs_and_prints_one_as_train_runs_it(tmp_path: Path) -> None:
    pytest.importorskip("sb3_contrib")
    from agents.config import load_config

    code, out = invoke("configs", "--json")
    assert code == 0, out
    listed = {config["name"]: config for config in json.loads(out)["configs"]}
    assert listed["ppo-residual-suite-v4"]["extends"] == "ppo-residual-suite-v2" and listed["ppo"]["extends"] is None
    code, out = invoke("configs", "ppo-residual-suite-v4")
    assert code == 0, out
    resolved = tmp_path / "resolved.toml"  # whole: it reads back to the recipe, without what it extended
    resolved.write_text(out)
    assert "extends" not in out and load_config(resolved) == load_config("ppo-residual-suite-v4")
    code, out = invoke("configs", "ppo", "--json")
    data, ppo = json.loads(out), load_config("ppo").to_dict()
    assert code == 0 and {k: data[k] for k in ("name", "env", "hyperparameters")} == \
        {k: ppo[k] for k in ("name", "env", "hyperparameters")}
    assert data["evaluation"]["throughput_margin"] is None  # infinite (no test), which JSON cannot hold
    code, out = invoke("configs", "nope")
    assert code == 2 and "no training config 'nope'" in out


def test_scenario_and_stability_commands() -> None:
    code, out = invoke("scenarios", "--json")
    assert code == 0 and "azure-code-like-hidden" in {s["name"] for s in json.loads(out)["scenarios"]}
    code, out = invoke("compare", "--scenario", "nope")
    assert code == 2 and "no scenario 'nope'" in out
    code, out = invoke("stability", "--scenario", "paper-single", "--policies", "vllm", "--seeds", "0",
                       "--horizon", "30", "--tolerance", "0.05", "--jobs", "1", "--json")
    assert code == 0, out
    (row,) = json.loads(out)["rows"]
    assert 0.5 < row["load"] < 1.2 and row["runs"] >= 3


def test_each_command_writes_its_own_default_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    code, out = invoke("compare", "--policies", "vllm", "--rates", "20", "--horizon", "10", "--no-plots")
    assert code == 0, out
    agent = Path(__file__).resolve().parents[1] / "agents" / "pretrained" / "tight-memory-wait"
    code, out = invoke("evaluate", "--agent", str(agent), "--policies", "vllm", "--seeds", "0", "--horizon", "10",
                       "--no-plots")
    assert code == 0, out
    compared = json.loads((tmp_path / "llmsched-out" / "compare" / "comparison.json").read_text())
    evaluated = json.loads((tmp_path / "llmsched-out" / "evaluate" / "comparison.json").read_text())
    assert compared["policies"] == ["vllm"] and "agent" in evaluated["policies"]
    assert compared["schema_version"] == evaluated["schema_version"] == 1


def test_output_to_a_pipe_keeps_whole_values_and_logs_progress_lines(tmp_path: Path) -> None:
    code, out = invoke("compare", "--policies", "wait,vllm", "--rates", "30,35", "--horizon", "15", "--seeds", "0..2",
                       "--out", str(tmp_path), "--no-plots")
    assert code == 0, out
    assert "…" not in out and re.search(r"\d+ ± \d+", out)  # the summary's intervals, not cut short
    assert re.search(r"^\d+/12 done: ", out, re.MULTILINE)  # progress as lines when stderr is not a terminal
