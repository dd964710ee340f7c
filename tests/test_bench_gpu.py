"""bench/gpu_bench.py: its parameter and MFU arithmetic by hand, and its CPU smoke run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_module
from transformers import LlamaConfig, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_bench.py"
IDS = type(
    "Ids", (), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
)()  # all a config needs


@pytest.fixture(scope="module")
def gb():
    return bench_module("gpu_bench")


def small(cls, tied):
    return cls(
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        vocab_size=32,
        tie_word_embeddings=tied,
    )


# Llama, hidden 8, head_dim 4, one kv head: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, MLP 3*8*16 = 384,
# two RMSNorms 16 -> 592 a layer, x2 = 1184; final norm 8; embedding 32*8 = 256; an untied lm_head
# another 256. Qwen2 adds q/k/v biases (8 + 4 + 4) -> 608 a layer.
@pytest.mark.parametrize(
    "cls, tied, total, matmul",
    [
        (LlamaConfig, True, 1184 + 8 + 256, 1184 + 8 + 256),
        (LlamaConfig, False, 1184 + 8 + 256 + 256, 1184 + 8 + 256),
        (Qwen2Config, True, 2 * 608 + 8 + 256, 2 * 608 + 8 + 256),
    ],
)
def test_param_counts_by_hand(gb, cls, tied, total, matmul):
    counts = gb.param_counts(small(cls, tied))
    assert counts == {"total": total, "embedding": 256, "matmul": matmul}


def test_real_shapes_have_the_published_sizes(gb):
    # SmolLM2-135M and Qwen2.5-0.5B, both tied: N is every parameter.
    assert gb.param_counts(gb.model_config("smollm2-135m", IDS))["matmul"] == 134_515_008
    assert gb.param_counts(gb.model_config("qwen2-0.5b", IDS))["matmul"] == 494_032_768


def test_mfu_arithmetic(gb):
    # 1,000 tokens in 2 s at N = 1,448: 6 * 1448 * 1000 / 2 = 4.344 MFLOP/s; DPO adds 2N per token.
    assert gb.mfu(1000, 2.0, 1448, "sft", 1e6) == pytest.approx(4.344)
    assert gb.mfu(1000, 2.0, 1448, "dpo", 1e6) == pytest.approx(5.792)
    assert gb.mfu(1000, 2.0, 1448, "sft", None) is None
    config = small(LlamaConfig, True)
    # 12 * layers * hidden * seq over 6N: 12 * 2 * 8 * 64 / (6 * 1448)
    assert gb.attention_share(config, 64, 1448) == pytest.approx(12288 / 8688)


def test_peak_is_looked_up_by_device_name(gb, monkeypatch):
    cuda = torch.device("cuda")
    for name, tflops in [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert gb.peak_flops(cuda, None) == (name, tflops * 1e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some New GPU")
    assert gb.peak_flops(cuda, None) == ("Some New GPU", None)
    assert gb.peak_flops(cuda, 100.0)[1] == 100e12
    assert gb.peak_flops(torch.device("cpu"), None)[1] is None


def test_smoke_run_end_to_end(gb, tmp_path):
    peak = 0.001  # TFLOP/s, so the CPU's MFU is a visible number
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--out",
            str(tmp_path),
            "--peak-tflops",
            str(peak),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("gpu-*.json")
    r = json.loads(path.read_text())
    assert r["smoke"] is True and r["machine"]["peak_flops"] == peak * 1e12
    assert set(r["versions"]) >= {"torch", "transformers", "trl", "peft", "ralign_commit"}
    p = r["params"]
    assert set(r["shapes"]) == {"tiny-qwen2", "tiny-llama"}
    for shape, res in r["shapes"].items():
        assert res["N"] == gb.param_counts(gb.model_config(shape, IDS))["matmul"]
        for mode, per_token in (("sft", 6), ("dpo", 8)):
            runs = res["runs"][mode]
            assert set(runs) == {"ralign", "trl", "trl_gc"}
            tokens = {run["tokens"] for rs in runs.values() for run in rs}
            rows = p["batch"] if mode == "sft" else 2 * p["dpo_batch"]  # DPO: chosen + rejected
            # Every framework fed exactly the same tokens: full, unpadded sequences.
            assert tokens == {rows * p["steps"] * p["seq"]}
            for rs in runs.values():
                assert len(rs) == p["repeats"]
                for run in rs:
                    assert run["steps"] == p["steps"] and run["seconds"] > 0
                    assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
                    flops = per_token * res["N"] * run["tokens"]
                    assert run["mfu"] == pytest.approx(flops / run["seconds"] / (peak * 1e12))
            ratio = res["summary"][f"{mode}.ralign.tokens_per_s"] / max(
                res["summary"][f"{mode}.trl.tokens_per_s"],
                res["summary"][f"{mode}.trl_gc.tokens_per_s"],
            )
            assert res["summary"][f"{mode}.vs_trl"] == pytest.approx(ratio)
        most = p["prompts"] * p["per_prompt"] * p["new_tokens"]
        for rs in res["runs"]["sample"].values():
            assert all(0 < run["tokens"] <= most for run in rs)
    assert len(r["checks"]) == 4  # vs TRL for SFT and DPO per shape; no MFU target at tiny sizes
    for c in r["checks"]:
        assert c["pass"] == (c["value"] >= c["target"])
        assert ("PASS" if c["pass"] else "MISS") + f"  {c['name']}" in proc.stdout
    assert "tokens/s" in proc.stdout and "load average" in proc.stdout
