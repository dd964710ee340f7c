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
        assert sum(r["n"] for r in result["rates"].values()) == 4
        assert "harmful_compliance_rate" in run.stdout


def test_eval_command_names_a_missing_data_file(tmp_path: Path) -> None:
    run = ralign_eval("--data", str(tmp_path / "nope.jsonl"))
    assert run.returncode == 2
    assert "nope.jsonl" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("flag", ["--batch-size", "--limit"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_eval_command_rejects_a_count_below_one(flag: str, value: str) -> None:
    run = ralign_eval("--data", "ralign:evals/hhh-mini", flag, value)
    assert run.returncode == 2
    assert flag in run.stderr and "Traceback" not in run.stderr
