"""Cost models and profiles: parsing, loading, and the default profile checked from first principles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from llmsched_env import ConfigError, LinearCostModel, load_profile, parse_cost
from llmsched_env.cost_model import builtin_profiles

A100_HBM_BYTES_PER_S = 2.0e12
A100_BF16_FLOPS = 312e12
LLAMA2_7B_PARAMS = 6.7e9
KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # K and V, 32 layers, hidden 4096, fp16: 0.5 MiB


def test_default_profile_matches_design_examples_and_first_principles() -> None:
    profile = load_profile("llama2-7b-a100")
    cost = profile.cost
    assert (profile.kv_capacity_tokens, profile.block_size) == (118_784, 16)
    # DESIGN.md: 64 decodes at 1k context take about 30 ms.
    assert cost.iteration_time(0, 64, 64 * 1024) == pytest.approx(0.030, rel=0.06)
    # A decode iteration is bound by reading the weights (fixed part) plus each KV token (per-token part).
    weight_read_s = 2 * LLAMA2_7B_PARAMS / A100_HBM_BYTES_PER_S
    assert cost.c0 == pytest.approx(weight_read_s, rel=0.35)  # c0 also pays launch and sampling overheads
    assert cost.c_kv == pytest.approx(KV_BYTES_PER_TOKEN / A100_HBM_BYTES_PER_S, rel=0.1)
    # A prefill is bound by FLOPs, 2 × parameters per token: c_pf implies a plausible 40-80 % utilisation.
    utilisation = 2 * LLAMA2_7B_PARAMS / A100_BF16_FLOPS / cost.c_pf
    assert 0.4 < utilisation < 0.8


def _attention_samples(shared_data: Path) -> list[dict[str, str]]:
    with (shared_data / "vidur_llama2_7b_a100_tp1_attention_samples.csv").open() as f:
        return list(csv.DictReader(f))


def test_kv_term_matches_vidur_attention_profile(shared_data: Path) -> None:
    rows = _attention_samples(shared_data)
    decode = [r for r in rows if r["phase"] == "decode"]
    kv_tokens = np.array([int(r["batch_size"]) * int(r["kv_cache_size"]) for r in decode], dtype=float)
    seconds = np.array([float(r["attn_median_ms_per_layer"]) * 32 / 1e3 for r in decode])
    slope, _ = np.polyfit(kv_tokens, seconds, 1)
    assert load_profile("llama2-7b-a100").cost.c_kv == pytest.approx(slope, rel=0.1)


def test_parse_cost_forms_and_errors() -> None:
    assert parse_cost("d0=0.01,d1=1e-4") == LinearCostModel(c0=0.01, c_kv=1e-4)
    assert parse_cost("c0=0.01,c_pf=1e-5") == LinearCostModel(c0=0.01, c_pf=1e-5)
    with pytest.raises(ConfigError, match="unknown field 'd2'"):
        parse_cost("d0=1,d2=3")
    with pytest.raises(ConfigError, match="not both"):
        parse_cost("d0=1,c_kv=3")
    with pytest.raises(ConfigError, match="must be a number"):
        parse_cost("d0=fast")
    with pytest.raises(ConfigError, match=r"c_kv must be in \[0, 3600\] s"):
        parse_cost("c0=0.01,c_kv=-1")


def test_profiles_load_from_json_and_name_their_errors(tmp_path: Path) -> None:
    assert "llama2-7b-a100" in builtin_profiles()
    good = tmp_path / "gpu.json"
    good.write_text(json.dumps({"c0": 0.005, "c_kv": 1e-7, "kv_capacity_tokens": 4096, "block_size": 32}))
    profile = load_profile(good)
    assert profile.cost == LinearCostModel(c0=0.005, c_kv=1e-7) and profile.block_size == 32
    bad = tmp_path / "bad.json"
    bad.write_text('{"c0": 0.005,\n "kv_capacity_tokens": 10,\n "speed": 3}')
    with pytest.raises(ConfigError, match=r"bad.json: unknown field\(s\) speed"):
        load_profile(bad)
    bad.write_text('{"c0": 0.005,\n "kv_capacity_tokens": 10,,}')
    with pytest.raises(ConfigError, match=r"bad.json:2: invalid JSON"):
        load_profile(bad)
    bad.write_text('{"c0": 0.005, "kv_capacity_tokens": 0}')
    with pytest.raises(ConfigError, match=r"'kv_capacity_tokens' must be an integer >= 1"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="no profile 'h100'"):
        load_profile("h100")


def test_the_attention_profile_is_the_fit_to_vidurs_prefill_samples(shared_data: Path) -> None:
    from llmsched_env.cost_model import fit_prefill_attention, prefill_attention

    rows = [r for r in _attention_samples(shared_data) if r["phase"] == "prefill"]
    fit = fit_prefill_attention(np.array([int(r["prefill_chunk_size"]) for r in rows]),
                                np.array([int(r["kv_cache_size"]) for r in rows]),
                                np.array([float(r["attn_median_ms_per_layer"]) / 1e3 for r in rows]), layers=32)
    profile = load_profile("llama2-7b-a100-attention")
    assert profile.cost.c_pf2 == pytest.approx(fit.c_pf2, rel=0.01)
    assert fit.mean_error < 0.15
    base = load_profile("llama2-7b-a100").cost
    # Everything else is the base profile's; the term adds 1.9 % to a 512-token prefill and 15 % to a 4,096-token one.
    assert profile.cost.c_pf == base.c_pf and profile.cost.c0 == base.c0
    for prompt, share in ((512, 0.019), (4096, 0.15)):
        extra = profile.cost.c_pf2 * prefill_attention(prompt)
        assert extra / (base.c_pf * prompt) == pytest.approx(share, abs=0.005)


def test_the_attention_fit_recovers_a_known_quadratic() -> None:
    from llmsched_env.cost_model import fit_prefill_attention, prefill_attention

    chunk = np.array([64, 256, 512, 1024, 2048, 64, 512])
    cached = np.array([0, 0, 512, 0, 1024, 2048, 4096])
    seconds = 1e-4 + 2e-6 * chunk + 3e-9 * prefill_attention(chunk, cached)
    fit = fit_prefill_attention(chunk, cached, seconds)
    assert fit.c_pf2 == pytest.approx(3e-9, rel=1e-6) and fit.max_error < 1e-6
