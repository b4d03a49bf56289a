"""Serving inside ``vllm serve`` without vLLM: the settings, the request view, the launcher's command, the bench's
parsing. (The scheduler inside a real server: tests/test_live_serve.py, in the live backend's environment.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_backend import serve_bench, serve_report
from live_backend.launcher import OWN_OPTIONS, SCHEDULER_CLASS, vllm_serve_arguments
from live_backend.serve_settings import (
    ServeSettings,
    build_serve_policy,
    parse_serve_settings,
    serve_scenario,
    warm_up,
)
from live_backend.served_requests import ServedRequests
from llmsched_env.engine import FINISHED, RUNNING, WAITING, Decision
from llmsched_env.errors import ConfigError, EngineFailure, InvalidDecisionError, RequestTooLargeError
from llmsched_env.request_table import validated_batch
from llmsched_env.scenario import build_scenario

ROOT = Path(__file__).resolve().parents[1]
GENERALIST = ROOT / "agents" / "pretrained" / "suite-residual"
DIRECT_AGENT = ROOT / "agents" / "pretrained" / "tight-memory-wait"


# -- settings -------------------------------------------------------------------------------------------------------
def test_the_default_settings_serve_nested_wait_adaptive_with_lengths_hidden() -> None:
    settings = parse_serve_settings(None)
    assert settings == ServeSettings() and settings.policy == "nested-wait-adaptive" and not settings.lengths_known
    assert parse_serve_settings('{"llmsched": {"policy": "vllm"}}').native


@pytest.mark.parametrize(("config", "message"), [
    ('{"llmsched": {"policy": "wait"', "is not JSON (line 1"),
    ("[1, 2]", "must be a JSON object"),
    ({"llmsched": "wait"}, "must be a JSON object of settings"),
    ({"llmsched": {"polcy": "wait"}}, "unknown setting 'polcy'; the settings are policy, lengths"),
    ({"llmsched": {"policy": "fastest"}}, "unknown policy 'fastest'; available: vllm, sarathi"),
    ({"llmsched": {"policy": "./no/such/agent"}}, "neither a directory nor a registered policy"),
    ({"llmsched": {"policy": 3}}, "'policy' must be a string, got 3"),
    ({"llmsched": {"lengths": "exact"}}, "'lengths' must be hidden or max_tokens, got 'exact'"),
    ({"llmsched": {"rate": -1}}, "'rate' must be a number > 0, got -1"),
    ({"llmsched": {"buffer_horizon_s": True}}, "'buffer_horizon_s' must be a number > 0"),
    ({"llmsched": {"policy": "wait-adaptive"}}, "needs each request's output length: set 'lengths' to max_tokens"),
    ({"llmsched": {"policy": "nested-wait"}}, "sizes its thresholds on known arrival rates and lengths: give 'types'"),
    ({"llmsched": {"types": "p=1,o=1,rate=1", "trace": "x.csv"}}, "either 'types' or 'trace'"),
])
def test_bad_settings_are_refused_naming_what_is_wrong(config, message) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        parse_serve_settings(config)
    assert message in str(error.value)


def test_an_agent_whose_interface_depends_on_one_workload_is_refused() -> None:
    with pytest.raises(ConfigError, match="actions are per request type of one workload"):
        parse_serve_settings({"llmsched": {"policy": str(DIRECT_AGENT)}})
    assert parse_serve_settings({"llmsched": {"policy": str(GENERALIST)}}).is_agent


def test_the_settings_travel_as_additional_config_with_absolute_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = ServeSettings(policy="wait", lengths="max_tokens", types="p=8,o=8,rate=1", stats_file="stats.json")
    sent = json.loads(settings.to_additional_config())
    assert sent == {"llmsched": {"policy": "wait", "lengths": "max_tokens", "types": "p=8,o=8,rate=1",
                                 "stats_file": str(tmp_path / "stats.json")}}
    assert parse_serve_settings(sent) == ServeSettings(**{**sent["llmsched"]})


def test_every_kind_of_policy_a_server_takes_is_built_for_its_cache() -> None:
    for name, extra, built in [("nested-wait-adaptive", {}, "nested-wait-adaptive"),
                               ("wait-adaptive", {"lengths": "max_tokens"}, "wait-adaptive"), ("vllm", {}, "vllm"),
                               ("sarathi", {}, "sarathi"),
                               ("nested-wait", {"types": "p=32,o=32,rate=4"}, "nested-wait"),
                               (str(GENERALIST), {}, "agent:suite-residual")]:
        settings = parse_serve_settings({"llmsched": {"policy": name, **extra}})
        scenario = serve_scenario(settings, capacity_tokens=64 * 16, block_size=16, device="cpu")
        assert scenario.output_lengths_known == settings.lengths_known
        assert (scenario.capacity_tokens, scenario.block_size) == (64 * 16, 16)
        assert build_serve_policy(settings, scenario).name == built


def test_the_warm_up_runs_the_policys_python_decisions(monkeypatch) -> None:
    # The server's path is decide(); a warm-up through the compiled loop would leave it cold.
    from baselines.adaptive import AdaptiveNestedWaitPolicy

    calls = []
    original = AdaptiveNestedWaitPolicy.decide
    monkeypatch.setattr(AdaptiveNestedWaitPolicy, "decide",
                        lambda self, state: calls.append(1) or original(self, state))
    assert warm_up(ServeSettings(), 64 * 16, 16, "cpu") > 0
    assert len(calls) > 100


# -- the launcher ---------------------------------------------------------------------------------------------------
def test_the_launcher_serves_every_policy_on_equal_terms() -> None:
    settings = ServeSettings(policy="wait-adaptive", lengths="max_tokens")
    args = vllm_serve_arguments("/models/tiny", settings, ["--port", "8001"])
    assert args[:4] == ["serve", "/models/tiny", "--no-enable-prefix-caching", "--no-async-scheduling"]
    assert args[args.index("--scheduler-cls") + 1] == SCHEDULER_CLASS
    assert json.loads(args[args.index("--additional-config") + 1])["llmsched"]["policy"] == "wait-adaptive"
    assert args[-2:] == ["--port", "8001"]
    native = vllm_serve_arguments("/models/tiny", ServeSettings(policy="vllm"))
    assert native[:4] == args[:4]
    for option in OWN_OPTIONS:
        with pytest.raises(ValueError, match="is set by llmsched serve"):
            vllm_serve_arguments("/models/tiny", settings, [f"{option}=x"])


def test_the_launcher_module_does_not_load_numba() -> None:
    # vLLM forks its workers from the launcher's process; llvmlite loaded there breaks their kernel scan.
    import subprocess
    import sys

    code = "import sys, live_backend.launcher; sys.exit('numba' in sys.modules or 'llvmlite' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# -- the request view -----------------------------------------------------------------------------------------------
def _view(capacity_blocks: int = 16, known: bool = True) -> ServedRequests:
    return ServedRequests(capacity_blocks, 4, lengths_known=known, max_model_len=64)


def test_the_view_follows_a_request_from_arrival_to_finish() -> None:
    view = _view()
    a = view.arrive("cmpl-a-0", prompt_len=6, max_tokens=5, now=0.5)
    b = view.arrive("cmpl-b-0", prompt_len=3, max_tokens=2, now=0.7)
    assert (a, b) == (0, 1) and view.index_of("cmpl-b-0") == 1
    state = view.state(used_blocks=0)
    assert state.waiting.tolist() == [0, 1] and state.output_len[:2].tolist() == [4, 1]
    assert state.arrival_time[:2].tolist() == [0.5, 0.7]
    view.admitted([a])
    view.progressed(a, kv_tokens=6, output_tokens=1, now=0.8)  # prefilled: its first token
    state = view.state(used_blocks=2)
    assert state.running.tolist() == [0] and state.num_waiting == 1 and state.kv_tokens[0] == state.context_len[0] == 6
    view.progressed(a, kv_tokens=7, output_tokens=2, now=0.9)
    assert view.state(2).decoded(np.array([0])).tolist() == [1]
    view.preempted([a])
    state = view.state(0)
    assert state.waiting.tolist() == [0, 1] and state.kv_tokens[0] == 0 and state.num_evictions[0] == 1
    assert state.context_len[0] == 7  # kept across the eviction, as in the simulator
    view.admitted([a, b])
    view.finished("cmpl-a-0", output_tokens=5, now=1.5)
    assert view.status_of(b) == RUNNING and view.num_finished == 1 and view.retired == 1  # a's row is released
    assert "cmpl-a-0" not in view
    view.finished("cmpl-b-0", output_tokens=2, now=1.6)
    assert view.retired == 2 and view.num_running == view.num_waiting == 0


def test_the_view_shows_the_last_served_iteration_to_a_policy_that_follows_the_engine() -> None:
    """What the scheduler measured of the last iteration reaches an adaptive policy's cost follower: its thresholds
    are then solved for the engine's real speed (here 3x its profile's)."""
    from baselines.adaptive import AdaptiveWaitPolicy
    from llmsched_env.cost_model import LinearCostModel

    view = _view()
    assert not view.state(0).last_iteration.any()
    profile = LinearCostModel(c0=0.01, c_pf=1e-4, c_dec=1e-3, c_kv=1e-6)
    policy = AdaptiveWaitPolicy.create(profile, view.capacity_tokens, view.block_size)
    policy.reset(view)  # type: ignore[arg-type]
    for k in range(1, 31):
        view.set_now(k * 0.1)
        view.iteration_ran(k * 0.1, 3 * profile.iteration_time(8, 2, 40), 8, 2, 40, 0.0)
        view.iteration_ran(k * 0.1 + 0.01, 0.0, 0, 0, 0, 0.0)  # nothing ran: the last iteration stays
        policy.learning.observe(view.state(0))  # type: ignore[union-attr]
    assert view.state(0).last_iteration.tolist() == [3.0, 3 * profile.iteration_time(8, 2, 40), 8, 2, 40, 0.0]
    assert abs(policy.learning.follower.factor - 3.0) < 1e-9  # type: ignore[union-attr]


def test_an_aborted_request_leaves_the_view_from_the_queue_or_the_batch() -> None:
    view = _view(known=False)
    for k in range(3):
        view.arrive(f"r{k}", prompt_len=4, max_tokens=4, now=0.0)
    view.admitted([0])
    view.progressed(0, kv_tokens=4, output_tokens=1, now=0.1)
    view.finished("r0", output_tokens=1, now=0.2, aborted=True)  # a disconnect while running
    view.finished("r2", output_tokens=0, now=0.2, aborted=True)  # and while waiting
    state = view.state(0)
    assert state.running.tolist() == [] and state.waiting.tolist() == [1] and state.num_waiting == 1
    assert state.output_len is None  # lengths hidden
    assert view.num_finished == 2 and view.retired == 1
    view.finished("r2", output_tokens=0, now=0.3, aborted=True)  # twice (vLLM's free path and an abort): once
    assert view.num_finished == 2


def test_a_request_that_can_never_fit_is_refused_naming_it() -> None:
    view = _view(capacity_blocks=4)  # 16 tokens
    with pytest.raises(RequestTooLargeError, match="request big needs 17 tokens .* 4 KV blocks of 4 tokens"):
        view.arrive("big", prompt_len=9, max_tokens=8, now=0.0)
    assert view.num_requests == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["arrive", "admit", "progress", "preempt", "finish", "abort"]),
                          st.integers(0, 30)), max_size=80))
def test_every_request_is_accounted_for_whatever_happens(events) -> None:
    # arrived = finished + waiting + running after any sequence of what vLLM can report, and the view's decisions
    # surface (the state) agrees with a plain model of each request's status.
    view = _view(capacity_blocks=64)
    status: dict[int, int] = {}
    for kind, k in events:
        live = [i for i, s in status.items() if s != FINISHED]
        if kind == "arrive":
            status[view.arrive(f"id-{len(status)}", 4, 4, now=float(len(status)))] = WAITING
        elif not live:
            continue
        else:
            i = live[k % len(live)]
            if kind == "admit":
                view.admitted([i])
                status[i] = RUNNING if status[i] == WAITING else status[i]
            elif kind == "progress" and status[i] == RUNNING:
                view.progressed(i, kv_tokens=5, output_tokens=2, now=1.0)
            elif kind == "preempt":
                view.preempted([i])
                status[i] = WAITING
            elif kind in ("finish", "abort"):
                view.finished(f"id-{i}", output_tokens=3, now=2.0, aborted=kind == "abort")
                status[i] = FINISHED
        state = view.state(0)
        assert state.num_requests == len(status)
        assert view.num_finished + state.num_waiting + len(state.running) == len(status)
        assert sorted(state.waiting.tolist()) == sorted(i for i, s in status.items() if s == WAITING)
        assert sorted(state.running.tolist()) == sorted(i for i, s in status.items() if s == RUNNING)
        unfinished = [i for i, s in status.items() if s != FINISHED]
        assert view.retired == (min(unfinished) if unfinished else len(status))


def test_a_policy_on_the_view_decides_as_on_the_engine_it_mirrors() -> None:
    # The view fed only with what vLLM reports (arrivals, admissions, preemptions, progress, finishes) gives a
    # policy the state the simulator gives it: the same decisions, iteration after iteration.
    from baselines import make_policy
    from llmsched_env.runner import Rollout

    scenario = build_scenario(types="p=20,o=12,rate=1;p=6,o=40,rate=1", profile="tiny-llama-cpu", memory_tokens=40 * 16,
                              block_size=16, hidden_lengths=True)
    scenario = scenario.at_rate(scenario.rate_for_load(0.95))
    arrivals = scenario.sample(20.0, seed=3)
    for name in ("nested-wait-adaptive", "vllm", "sarathi"):
        engine = scenario.engine()
        rollout = Rollout(engine, arrivals, 20.0)
        on_engine, on_view = make_policy(name, scenario, 3600.0), make_policy(name, scenario, 3600.0)
        on_engine.reset(engine)
        view = ServedRequests(engine.capacity_blocks, engine.block_size, lengths_known=False, max_model_len=10**6)
        on_view.reset(view)
        seen = 0
        decisions = 0
        while rollout.needs_decision():
            state = engine.state()
            for i in range(seen, state.num_requests):
                view.arrive(f"cmpl-{i}", int(state.prompt_len[i]), int(arrivals.output_len[i]) + 1,
                            float(state.arrival_time[i]))
            seen = state.num_requests
            view.set_now(state.now)
            decision = on_engine.decide(state)
            mirrored = on_view.decide(view.state(state.used_blocks))
            for part in ("decode", "prefill", "preempt"):
                assert np.array_equal(getattr(decision, part), getattr(mirrored, part)), (name, decisions, part)
            assert (decision.prefill_tokens is None) == (mirrored.prefill_tokens is None)
            decisions += 1
            outcome = rollout.apply(decision)
            if outcome is None:
                continue
            view.preempted(outcome.evicted.tolist())
            view.admitted(outcome.admitted.tolist())
            after = engine.state()
            for i in {*decision.decode.tolist(), *decision.prefill.tolist()} - set(outcome.evicted.tolist()):
                if i in outcome.finished:
                    continue
                kv = int(after.kv_tokens[i])
                produced = int(after.context_len[i] - after.prompt_len[i]) + 1 if kv >= after.prompt_len[i] else 0
                view.progressed(i, kv, produced, after.now)
            for i in outcome.finished.tolist():
                view.finished(f"cmpl-{i}", int(arrivals.output_len[i]) + 1, after.now)
        assert decisions > 100 and view.num_finished == engine.num_finished


# -- the bench's reading of vLLM's outputs ---------------------------------------------------------------------------
def test_the_timed_trace_replays_each_request_with_its_own_prompt() -> None:
    arrivals = build_scenario(types="p=40,o=9,rate=1").at_rate(5.0).sample(4.0, seed=1)
    lines = [json.loads(line) for line in serve_bench.timed_trace_lines(arrivals, seed=1)]
    assert [row["input_length"] for row in lines] == arrivals.prompt_len.tolist()
    assert [row["output_length"] for row in lines] == (arrivals.output_len + 1).tolist()
    assert [row["timestamp"] for row in lines] == pytest.approx(arrivals.arrival_time.tolist(), abs=1e-6)
    hashes = [h for row in lines for h in row["hash_ids"]]
    assert len(hashes) == len(set(hashes)) and all(len(row["hash_ids"]) == 3 for row in lines)  # ⌈40/16⌉


def test_the_bench_reads_prometheus_metrics() -> None:
    text = "\n".join([
        "# HELP vllm:num_preemptions_total x",
        'vllm:num_preemptions_total{engine="0",model_name="m"} 13.0',
        'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0',
        'vllm:cache_config_info{block_size="32",cache_dtype="auto",num_gpu_blocks="24",prefix="x"} 1.0'])
    assert serve_bench.metric_value(text, "vllm:num_preemptions_total") == 15.0
    assert serve_bench.metric_value(text, "vllm:absent") == 0.0
    assert serve_bench.cache_blocks(text) == (24, 32)


def test_the_clients_figures_check_completions_and_output_lengths() -> None:
    result = {"completed": 3, "failed": 0, "duration": 2.0, "request_throughput": 1.5, "output_throughput": 10.0,
              "request_goodput": 1.0, "output_lens": [5, 6, 7], "p99_ttft_ms": 80.0, "mean_tpot_ms": 9.0}
    figures = serve_report.client_figures(result, np.array([5, 6, 7]))
    assert figures["outputs_as_requested"] and figures["slo_attainment"] == pytest.approx(2 / 3)
    assert figures["run_throughput_rps"] == 1.5 and figures["run_completed"] == 3
    assert figures["p99_ttft_ms"] == 80.0 and figures["p50_e2el_ms"] is None
    assert not serve_report.client_figures(result, np.array([5, 6, 8]))["outputs_as_requested"]


def test_the_decision_check_is_the_engines() -> None:
    view = _view()
    view.arrive("a", 4, 4, 0.0)
    status, prompt, context, kv, mark = view.columns()
    with pytest.raises(InvalidDecisionError, match="decode"):  # a waiting request cannot decode
        validated_batch(Decision(decode=np.array([0])), view.num_requests, status, prompt, context, kv, mark)


def test_your_own_policy_is_served_from_an_import_path() -> None:
    settings = parse_serve_settings({"llmsched": {"policy": "tests.faulty_policy:faulty"}})
    scenario = serve_scenario(settings, capacity_tokens=64 * 16, block_size=16, device="cpu")
    assert build_serve_policy(settings, scenario).name == "faulty"
    for bad, message in [("tests.faulty_policy:absent", "cannot be imported (AttributeError"),
                         ("no_such_module:factory", "cannot be imported (ModuleNotFoundError"),
                         ("tests.faulty_policy:np", "is not callable")]:
        with pytest.raises(ConfigError, match=None) as error:
            parse_serve_settings({"llmsched": {"policy": bad}})
        assert message in str(error.value)


# -- calibration from a served engine's iteration log ---------------------------------------------------------------
def test_a_served_engines_iteration_log_calibrates_the_cost_model(tmp_path) -> None:
    from live_backend.calibrate import calibrate_from_log, read_iteration_log
    from llmsched_env.cost_model import LinearCostModel

    truth = LinearCostModel(c0=4e-3, c_pf=20e-6, c_dec=150e-6, c_kv=30e-9)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"capacity_blocks": 400, "block_size": 32, "model": "tiny"})]
    for _ in range(300):
        prefill, decodes = int(rng.choice([0, 0, 64, 200])), int(rng.integers(1, 60))
        kv = decodes * int(rng.integers(60, 300)) + prefill
        duration = truth.iteration_time(prefill, decodes, kv) * float(rng.normal(1.0, 0.02))
        lines.append(json.dumps({"prefill_tokens": prefill, "decode_requests": decodes, "kv_tokens": kv,
                                 "prefill_attention": prefill * (prefill + 1) / 2, "duration_s": duration}))
    log = tmp_path / "iterations.jsonl"
    log.write_text("\n".join(lines) + "\n")
    header, samples = read_iteration_log(log)
    assert header["capacity_blocks"] == 400 and len(samples) == 300
    result = calibrate_from_log(samples)
    assert result.samples == 200 and result.held_out_samples == 100  # every 3rd iteration held out
    assert result.chosen.held_out_error < 0.03
    assert result.linear.cost.c_dec == pytest.approx(truth.c_dec, rel=0.1)


@pytest.mark.parametrize(("text", "message"), [
    ('{"prefill_tokens": 1}', ":1: an iteration before any header line"),
    ("", "no header line"),
    ('{"capacity_blocks": 4, "block_size": 2}\n{"prefill_tokens": 1', ":2: not JSON"),
    ('{"capacity_blocks": 4, "block_size": 2}\n{"prefill_tokens": -1, "decode_requests": 1, "kv_tokens": 1, '
     '"prefill_attention": 0, "duration_s": 0.1}', ":2: field 'prefill_tokens' must be a number >= 0, got -1"),
    ('{"capacity_blocks": 4, "block_size": 2}\n{"prefill_tokens": 1, "decode_requests": 1, "kv_tokens": 1, '
     '"prefill_attention": 0, "duration_s": 0}', ":2: field 'duration_s' must be > 0"),
])
def test_a_bad_iteration_log_is_refused_naming_the_line(tmp_path, text, message) -> None:
    from live_backend.calibrate import read_iteration_log

    log = tmp_path / "iterations.jsonl"
    log.write_text(text + "\n")
    with pytest.raises(ConfigError, match=None) as error:
        read_iteration_log(log)
    assert message in str(error.value) and str(log) in str(error.value)


def _client_result(arrivals, ttft: np.ndarray, latency: np.ndarray, failed: int = -1) -> dict:
    """What `vllm bench serve --save-detailed` writes for a replay of ``arrivals`` (its send times 0.5 s late)."""
    n = len(arrivals)
    errors = ["" if i != failed else "connection reset" for i in range(n)]
    done = n - (failed >= 0)
    return {"completed": done, "failed": n - done, "duration": float((arrivals.arrival_time + latency).max()),
            "request_throughput": 2.0, "output_throughput": 50.0, "request_goodput": 1.0,
            "output_lens": (arrivals.output_len + 1).tolist(), "start_times": (arrivals.arrival_time + 100.5).tolist(),
            "ttfts": ttft.tolist(), "latencies": latency.tolist(), "errors": errors, "p99_ttft_ms": 80.0,
            "p50_ttft_ms": 40.0, "p50_tpot_ms": 5.0, "p99_e2el_ms": 900.0}


def test_a_served_replay_is_read_at_the_horizon_as_compare_reads_a_run() -> None:
    from llmsched_env.engine import RequestRecords

    # Four requests: done before the horizon; started before it, done after; not started by it; failed.
    records = serve_report.records_at(RequestRecords(
        np.array([0.0, 1.0, 2.0, 3.0]), np.array([4, 4, 4, 4]), np.array([3, 3, 3, 3]),
        np.array([0.5, 1.5, 5.0, np.nan]), np.array([1.0, 6.0, 7.0, np.nan]), np.zeros(4, np.int64),
        np.array([3, 3, 3, 0]), np.array([FINISHED, FINISHED, FINISHED, WAITING], np.int8)), horizon=4.0)
    assert records.status.tolist() == [FINISHED, RUNNING, WAITING, WAITING]
    assert np.isnan(records.finish_time[1:]).all() and np.isnan(records.first_token_time[2:]).all()
    assert records.decoded.tolist() == [3, 0, 0, 0]
    arrivals = build_scenario(types="p=40,o=9,rate=1").at_rate(4.0).sample(10.0, seed=3)
    n = len(arrivals)
    latency = np.full(n, 2.0)
    client = _client_result(arrivals, np.full(n, 0.25), latency, failed=1)
    served = serve_report.client_records(client, arrivals)
    assert served.arrival_time == pytest.approx(arrivals.arrival_time)  # the send times, from the first arrival
    assert served.finish_time[0] == pytest.approx(arrivals.arrival_time[0] + 2.0) and np.isnan(served.finish_time[1])
    result = serve_report.result_at(served, 10.0, capacity_blocks=23, block_size=32, evictions=7, iterations=900)
    finished_by_horizon = int(np.count_nonzero(arrivals.arrival_time + 2.0 <= 10.0)) - 1  # the failed one is not
    assert result.finished == finished_by_horizon and result.arrived == n
    assert result.waiting + result.running == n - finished_by_horizon
    with pytest.raises(EngineFailure, match="--save-detailed"):
        serve_report.client_records({**client, "ttfts": []}, arrivals)


def test_a_bench_is_a_comparison_with_the_serving_figures_beside(tmp_path) -> None:
    from baselines import make_policy
    from baselines.compare import realised_fluid
    from llmsched_env import report
    from llmsched_env.report import SIM_SUFFIX, Comparison

    scenario = build_scenario(types="p=40,o=30,rate=1", profile="tiny-llama-cpu", memory_tokens=23 * 32,
                              block_size=32).at_rate(4.0)
    horizon, runs, fluid = 6.0, [], None
    for seed in (0, 1):
        arrivals = scenario.sample(horizon, seed)
        fluid = scenario.fluid(arrivals, horizon)
        realised = realised_fluid(scenario, arrivals, horizon, fluid)
        n = len(arrivals)
        for label, slow in (("vllm", 1.0), ("wait-adaptive", 1.5 if seed else 1.0)):
            client = _client_result(arrivals, np.full(n, 0.1 * slow), np.full(n, 1.0 * slow))
            client["request_throughput"] = 2.0 / slow
            # vLLM's server sampled every second (on the client's clock: the replay starts 100.5 s into it) until
            # 8 s, past the horizon; the other's not at all.
            at = np.arange(1.0, 9.0) + 100.5
            samples = serve_report.ServerSamples(at, np.linspace(0.1, 0.8, 8), np.full(8, 5.0), np.arange(8.0))
            runs.append(serve_report.served_run(
                label, client, arrivals, horizon, fluid=fluid, realised=realised, rate=4.0, seed=seed, kv_blocks=24,
                block_size=32, preemptions=3,
                server_figures={"scheduler_iterations": 520, "batches": 500, "busy_s": 5.0, "scheduler_fallbacks": 0,
                                "policy_us_per_iteration": 90.0}, samples=samples if label == "vllm" else None))
            runs.append(serve_report.simulated_run(
                label + SIM_SUFFIX, make_policy("vllm", scenario, horizon), scenario, arrivals, horizon, fluid=fluid,
                realised=realised, rate=4.0, seed=seed, slo_ms=(1000.0, 100.0)))
    serving = {"model": "m", "slo_ttft_ms": 1000.0, "slo_tpot_ms": 100.0,
               "calibration": {"vllm": {"iterations": 500, "profile_error": 0.4, "fitted_held_out_error": 0.08}}}
    comparison = Comparison(runs, {4.0: fluid}, horizon, ("vllm", "vllm (sim)", "wait-adaptive", "wait-adaptive (sim)"),
                            (4.0,), (0, 1), extra={"serving": serving})
    served = [row for row in comparison.rows if row["backend"] == "serve"]
    for row in served:  # compare's row at the horizon: every request done 1 s (or 1.5 s) after it arrived
        served_run = next(run for run in runs if run.policy == row["policy"] and run.seed == row["seed"])
        assert row["completed"] == served_run.regret.completions[-1] and row["evictions"] == 3
        assert row["throughput_rps"] == pytest.approx(row["completed"] / horizon)
        assert row["mean_latency_s"] == pytest.approx(1.0 if row["policy"] == "vllm" or row["seed"] == 0 else 1.5)
        assert row["iterations"] == 500 and row["mean_iteration_s"] == 0.01
        assert row["peak_memory_frac"] == (0.8 if row["policy"] == "vllm" else None)  # the replay's highest sample
    sampled = next(run for run in runs if run.policy == "vllm")
    assert sampled.series["time"] == pytest.approx([1, 2, 3, 4, 5, 6])  # on the replay's clock, to the horizon
    assert sampled.series["kv_blocks_used"] == pytest.approx(np.linspace(0.1, 0.8, 8)[:6] * 23)
    assert sampled.series["waiting"].tolist() == [0, 1, 2, 3, 4, 5]
    simulated = [row for row in comparison.rows if row["backend"] == "sim"]
    assert all(row["run_completed"] == row["requests"] > 0 for row in simulated)  # the prediction drained
    # llmsched compare's own report reads it: Markdown, JSON with the serving section, plots.
    text = report.to_markdown(comparison)
    assert "| 4.00 | vllm |" in text and "| 4.00 | vllm (sim) |" in text and "Simulator vs live engine" in text
    document = report.to_json(comparison)
    assert document["serving"]["model"] == "m" and len(document["rows"]) == 8
    assert [path.name for path in report.plot(comparison, tmp_path)] == ["throughput.png", "regret.png",
                                                                          "memory.png", "queue.png"]
    # The serving table: seeds' means, throughput paired with the first scheduler's per seed, the simulator beside.
    table = serve_report.summary_rows(comparison)
    assert [row["policy"] for row in table] == ["vllm", "wait-adaptive"]
    assert table[1]["throughput_vs_vllm"] == pytest.approx((1.0 + 1 / 1.5) / 2)
    assert table[1]["evictions"] == 6 and table[0]["sim_run_throughput_rps"] > 0
    serving_text = serve_report.markdown(comparison)
    assert "| wait-adaptive | 1.67 | 0.833 |" in serving_text and "| vllm | 500 | 40% | 8% |" in serving_text
    assert serve_report.plot(comparison, tmp_path / "bench-serve.png").stat().st_size > 10_000


def test_a_served_engine_keeps_idle_connections_longer_than_the_benchmark_client() -> None:
    # vllm bench serve pools connections for 60 s; a server closing them after its default 5 s raced a request sent
    # on one after a quiet spell ("Server disconnected"). The environment's own setting is kept.
    env = serve_bench.server_environment({"PATH": "/bin"})
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > serve_bench.CLIENT_KEEP_ALIVE_S
    assert env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"
    assert serve_bench.server_environment({"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "7"})["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "7"
