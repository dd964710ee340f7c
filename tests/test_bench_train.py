"""bench/train_vs_trl.py --quick runs ralign and TRL on the same work and reports consistent figures."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # ten training runs in fresh processes: about a minute and a half

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("ralign", "trl")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_vs_trl.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("train_vs_trl-quick-*.json")
    return json.loads(path.read_text(encoding="utf-8")), proc.stdout


def test_every_configuration_ran_on_both_systems(report):
    data, stdout = report
    assert data["quick"] is True
    seen = {
        (r["config"]["model_key"], r["config"]["kind"], r["config"]["lora"])
        for r in data["results"]
    }
    tiny = {("tiny", kind, lora) for kind in ("dpo", "sft") for lora in (False, True)}
    assert seen == tiny | {("qwen2v", "dpo", False)}
    for key in ("torch", "transformers", "trl", "peft", "ralign_commit"):
        assert data["versions"][key]
    assert data["machine"]["cpu_count"] >= 1
    assert "load average at start" in stdout and "wrote " in stdout


def test_both_systems_did_the_same_work(report):
    data, _ = report
    for res in data["results"]:
        ralign, trl = res["trials"]["ralign"], res["trials"]["trl"]
        assert len(ralign) == len(trl) == data["settings"]["repeats"] == 1
        c = res["config"]
        expected_steps = c["epochs"] * -(-c["rows"] // c["batch_size"])
        for t in ralign + trl:
            assert t["steps"] == expected_steps
            assert t["result"]["steps"] == expected_steps  # what the trainer itself reports
            assert len(t["step_tokens"]) == len(t["step_seconds"]) == t["steps"]
            assert sum(t["step_tokens"]) == t["tokens"] > 0
            assert t["timed_tokens"] == sum(t["step_tokens"][1:])  # the warm-up step is excluded
        assert ralign[0]["tokens"] == trl[0]["tokens"]
        assert ralign[0]["torch_threads"] == trl[0]["torch_threads"] == c["threads"] == 1
        assert res["same_work"] == {"tokens": True, "steps": True}


def test_throughputs_and_ratios_come_from_the_raw_numbers(report):
    data, _ = report
    metrics = (
        "tokens_per_s",
        "tokens_per_cpu_s",
        "end_to_end_tokens_per_s",
        "end_to_end_tokens_per_cpu_s",
        "train_peak_mb",
    )
    for res in data["results"]:
        med = {}
        for system in SYSTEMS:
            trials = res["trials"][system]
            for t in trials:
                assert t["tokens_per_s"] > 0 and t["end_to_end_tokens_per_s"] > 0
                assert t["end_to_end_tokens_per_cpu_s"] == pytest.approx(
                    t["tokens"] / t["end_to_end_cpu_seconds"]
                )
                assert t["tokens_per_s"] == pytest.approx(t["timed_tokens"] / t["timed_seconds"])
                assert t["timed_seconds"] == pytest.approx(sum(t["step_seconds"][1:]))
                assert t["tokens_per_cpu_s"] == pytest.approx(
                    t["timed_tokens"] / sum(t["step_cpu_seconds"][1:])
                )
                assert t["train_peak_mb"] > 0
            med[system] = {m: statistics.median(t[m] for t in trials) for m in metrics}
            for m in metrics:
                assert res["median"][system][m] == pytest.approx(med[system][m])
        for m in metrics:
            assert res["ratio"][m] == pytest.approx(med["ralign"][m] / med["trl"][m])


def name(config: dict) -> str:
    return f"{config['model_key']} {config['kind']} {'lora' if config['lora'] else 'full'}"


def test_verdicts_follow_the_targets(report):
    data, stdout = report
    expected = set()
    for res in data["results"]:
        c = res["config"]
        expected |= {(name(c), "tokens_per_s"), (name(c), "tokens_per_cpu_s")}
        if c["kind"] == "dpo":
            expected.add((name(c), "train_peak_mb"))
    # qwen2v's batch holds every pair: its first-step losses are compared too
    expected.add(("qwen2v dpo full", "first_loss_abs_diff"))
    assert {(v["config"], v["metric"]) for v in data["verdicts"]} == expected
    values = {name(r["config"]): {**r["ratio"], **r} for r in data["results"]}
    for v in data["verdicts"]:
        assert v["value"] == values[v["config"]][v["metric"]]
        goal = data["targets"][v["target"]]
        assert v["pass"] == (
            v["value"] >= goal if v["goal"].startswith(">=") else v["value"] <= goal
        )
        assert ("PASS" if v["pass"] else "MISS") in stdout
    memory = {v["config"]: v["target"] for v in data["verdicts"] if v["metric"] == "train_peak_mb"}
    assert memory["qwen2v dpo full"] == "qwen2v_dpo_peak_memory_ratio"
    assert memory["tiny dpo full"] == "dpo_peak_memory_ratio"


def test_qwen2_vocabulary_dpo_is_lean_and_equal_to_trl(report):
    """On Qwen2's 152k vocabulary the LM head dominates memory: ralign needs at most 0.8x TRL's
    peak (memory, unlike time, hardly moves with the machine's load), at the same first loss."""
    data, _ = report
    (res,) = [r for r in data["results"] if r["config"]["model_key"] == "qwen2v"]
    assert res["config"]["rows"] == res["config"]["batch_size"]  # the first batch is every pair
    ralign, trl = res["trials"]["ralign"][0], res["trials"]["trl"][0]
    assert ralign["first_loss"] == pytest.approx(trl["first_loss"], abs=1e-5)
    assert abs(ralign["first_loss"] - 0.6931471805599453) > 1e-3  # policy != reference
    assert res["first_loss_abs_diff"] == abs(ralign["first_loss"] - trl["first_loss"])
    assert res["ratio"]["train_peak_mb"] <= data["targets"]["qwen2v_dpo_peak_memory_ratio"]
    assert data["settings"]["sizes"]["qwen2v"]["threads"] == 1


def test_whole_call_timing_includes_tokenization(report):
    data, _ = report
    for res in data["results"]:
        for system in SYSTEMS:
            for t in res["trials"][system]:
                # ralign's encode call, TRL's dataset and constructor: before the first step
                # (TRL's DPO constructor also scores the reference: precompute_ref_log_probs)
                assert 0 < t["tokenize_seconds"] < t["setup_seconds"] < t["end_to_end_seconds"]


def test_lora_keeps_one_copy_of_the_weights(report):
    """With LoRA the reference is the adapter-disabled policy: one model in memory, scored by the policy."""
    data, _ = report
    dpo = {
        r["config"]["lora"]: r
        for r in data["results"]
        if r["config"]["kind"] == "dpo" and r["config"]["model_key"] == "tiny"
    }
    full, lora = dpo[False]["trials"]["ralign"][0], dpo[True]["trials"]["ralign"][0]
    assert full["models_in_memory"]["count"] == 2  # the policy and the reference it was given
    assert lora["models_in_memory"]["count"] == 1
    assert lora["models_in_memory"]["parameter_mb"] < 0.6 * full["models_in_memory"]["parameter_mb"]
    c = dpo[False]["config"]
    batches = -(-c["rows"] // c["batch_size"])
    assert full["reference_forwards"] == {"policy": 0, "reference": batches}  # once, up front
    assert lora["reference_forwards"] == {"policy": batches}  # the policy, adapter disabled
    assert dpo[True]["trials"]["trl"][0]["models_in_memory"]["count"] == 1
