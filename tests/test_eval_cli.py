"""`ralign eval`: one model, one data set, the headline numbers printed and written as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def ralign_eval(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m ralign eval ARGS` with the tiny test model."""
    command = [sys.executable, "-m", "ralign", "eval", "--model", "ralign:tiny-llama", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    ("task", "data", "key"),
    [("hhh", "ralign:evals/hhh-mini", "acc"), ("behavior", "ralign:seeds/hhh", "rates")],
)
def test_eval_command_prints_and_writes_results(
    task: str, data: str, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "RALIGN_CACHE": str(tmp_path / "cache")}
    run = ralign_eval(
        "--data", data, "--task", task, "--limit", "4", "--device", "cpu", "-o", str(out), env=env
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert key in result
    if task == "hhh":
        assert result["n"] == 4 and 0.0 <= result["acc"]["value"] <= 1.0
        assert "acc_norm" in run.stdout
    else:
        rates = result["rates"]
        # One rate per kind counts every prompt once; needless hedging re-counts the answerable
        # kinds (everyday, safe but alarming).
        hedging = rates.pop("needless_hedging_rate")
        assert sum(r["n"] for r in rates.values()) == 4
        assert hedging["n"] == rates["everyday_refusal_rate"]["n"] + rates["over_refusal_rate"]["n"]
        assert "harmful_compliance_rate" in run.stdout


def test_eval_command_names_a_missing_data_file(tmp_path: Path) -> None:
    run = ralign_eval("--data", str(tmp_path / "nope.jsonl"))
    assert run.returncode == 2
    assert "nope.jsonl" in run.stderr and "Traceback" not in run.stderr


def test_eval_command_keeps_every_answer_at_the_length_asked(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "RALIGN_CACHE": str(tmp_path / "cache")}
    args = ("--data", "ralign:seeds/hhh", "--task", "behavior", "--limit", "3", "--device", "cpu")
    run = ralign_eval(*args, "--max-new-tokens", "2", "--answers", "-o", str(out), env=env)
    assert run.returncode == 0, run.stderr
    records = json.loads(out.read_text())["records"]
    assert len(records) == 3
    assert {"prompt", "answer", "kind", "refused", "admits"} <= set(records[0])
    # two tokens of the tiny model's vocabulary are never more than two words
    assert all(len(r["answer"].split()) <= 2 for r in records)


def test_eval_command_skips_the_ab_question_when_asked(tmp_path: Path) -> None:
    env = {**os.environ, "RALIGN_CACHE": str(tmp_path / "cache")}
    results = {}
    for flags in ((), ("--no-ab",)):
        out = tmp_path / f"r{len(flags)}.json"
        args = ("--data", "ralign:evals/hhh-mini", "--limit", "4", "--device", "cpu")
        run = ralign_eval(*args, *flags, "-o", str(out), env=env)
        assert run.returncode == 0, run.stderr
        results[flags] = json.loads(out.read_text())
    with_ab, without = results[()], results[("--no-ab",)]
    assert "ab_acc" in with_ab and "ab_acc" not in without
    assert (without["acc"], without["acc_norm"]) == (with_ab["acc"], with_ab["acc_norm"])


@pytest.mark.parametrize(
    ("flags", "task"), [(("--answers",), "behavior"), (("--max-new-tokens", "8"), "behavior")]
)
def test_eval_command_refuses_behavior_flags_for_hhh(flags: tuple[str, ...], task: str) -> None:
    run = ralign_eval("--data", "ralign:evals/hhh-mini", *flags)
    assert run.returncode == 2
    assert f"--task {task}" in run.stderr and "Traceback" not in run.stderr


def test_eval_command_refuses_no_ab_for_behavior() -> None:
    run = ralign_eval("--data", "ralign:seeds/hhh", "--task", "behavior", "--no-ab")
    assert run.returncode == 2
    assert "--task hhh" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("flag", ["--batch-size", "--limit", "--max-new-tokens"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_eval_command_rejects_a_count_below_one(flag: str, value: str) -> None:
    run = ralign_eval("--data", "ralign:evals/hhh-mini", flag, value)
    assert run.returncode == 2
    assert flag in run.stderr and "Traceback" not in run.stderr
