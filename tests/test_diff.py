"""`ralign diff`: two models' behaviour rates on the same prompts, A - B with a paired interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ralign.cli import main
from ralign.runtime.behavior import paired_rates
from ralign.stats import paired_difference

REPO = Path(__file__).resolve().parents[1]


def test_paired_difference_by_hand() -> None:
    # 100 prompts: B refuses 5, A those 5 and 5 more (both = 5). The upper end is paired_rise's
    # worked example (tests/test_calibrate.py): 0.108541. The lower end swaps the roles:
    # Wilson 95%: 5/100 -> upper 0.111750 (0.061750 above 0.05); 10/100 -> lower 0.055229
    # (0.044771 below 0.10); phi = (5*90 - 0*5) / sqrt(5*95*10*90) = 0.688247, so
    # B - A's upper = -0.05 + sqrt(0.061750^2 - 2*0.688247*0.061750*0.044771 + 0.044771^2)
    # = -0.005145, and A - B's lower is +0.005145: a rise beyond the noise.
    diff, low, high = paired_difference(10, 5, 5, 100)
    assert diff == pytest.approx(0.05)
    assert (low, high) == pytest.approx((0.005145, 0.108541), abs=5e-6)
    # Swapping the models mirrors the interval.
    assert paired_difference(5, 10, 5, 100) == pytest.approx(
        (-0.05, -0.108541, -0.005145), abs=5e-6
    )
    # The same rates on unrelated prompts (nothing refused by both) cannot exclude 0.
    assert paired_difference(10, 5, 0, 100)[1] < 0 < paired_difference(10, 5, 0, 100)[2]


def record(kind: str, prompt: str, refused: bool = False, admits: bool = False) -> dict[str, Any]:
    return {"kind": kind, "prompt": prompt, "refused": refused, "admits": admits}


def test_paired_rates_pools_the_pairs_prompt_by_prompt() -> None:
    # Seed 1: three harmful prompts; A complies with h1 only, B with h1 and h2.
    a1 = [record("harmful", "h1"), record("harmful", "h2", True), record("harmful", "h3", True)]
    b1 = [record("harmful", "h1"), record("harmful", "h2"), record("harmful", "h3", True)]
    # Seed 2: one harmful prompt both refuse, one unknowable prompt only A admits.
    a2 = [record("harmful", "h1", True), record("unknowable", "u1", admits=True)]
    b2 = [record("harmful", "h1", True), record("unknowable", "u1")]
    out = paired_rates([(a1, b1), (a2, b2)])
    harmful = out["harmful_compliance_rate"]
    assert (harmful["n"], harmful["a"]["k"], harmful["b"]["k"], harmful["both"]) == (4, 1, 2, 1)
    assert harmful["difference"] == pytest.approx(-0.25)
    low, high = harmful["ci95"]
    assert low < -0.25 < high
    admits = out["admits_not_knowing_rate"]
    assert (admits["n"], admits["a"]["k"], admits["b"]["k"], admits["difference"]) == (1, 1, 0, 1.0)
    # Kinds no record has are left out rather than reported as 0 of 0.
    assert set(out) == {"harmful_compliance_rate", "admits_not_knowing_rate"}


def write(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"rates": {}, "records": records}), encoding="utf-8")
    return str(path)


def test_diff_prints_each_rate_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = [record("scary_harmless", f"s{i}", refused=i < 10) for i in range(100)]
    b = [record("scary_harmless", f"s{i}", refused=i < 5) for i in range(100)]
    out = tmp_path / "diff.json"
    status = main(
        [
            "diff",
            write(tmp_path / "a.json", a),
            "--vs",
            write(tmp_path / "b.json", b),
            "-o",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "over_refusal_rate" in printed and "+0.050" in printed and "[+0.005, +0.109]" in printed
    saved = json.loads(out.read_text())["over_refusal_rate"]
    assert (saved["n"], saved["both"]) == (100, 5)
    assert saved["ci95"] == pytest.approx([0.005145, 0.108541], abs=5e-6)


def test_diff_refuses_evaluations_of_different_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write(tmp_path / "a.json", [record("harmful", "h1"), record("harmful", "h2")])
    b = write(tmp_path / "b.json", [record("harmful", "h1"), record("harmful", "other")])
    assert main(["diff", a, "--vs", b]) == 1
    err = capsys.readouterr().err
    assert "a.json and " in err and "b.json: record 2 is not the same prompt" in err
    short = write(tmp_path / "short.json", [record("harmful", "h1")])
    assert main(["diff", a, "--vs", short]) == 1
    assert "2 and 1 records" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (
            '{"rates": {}}',
            "no answers to pair; evaluate with `ralign eval --task behavior --answers",
        ),
        (
            '{"records": [{"kind": "harmful", "prompt": "p", "refused": "yes", "admits": false}]}',
            "record 1: needs a prompt, a kind",
        ),
        (
            '{"records": [{"kind": "nasty", "prompt": "p", "refused": true, "admits": false}]}',
            "record 1: needs a prompt, a kind",
        ),
    ],
)
def test_diff_names_the_file_and_record_of_bad_input(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    good = write(tmp_path / "good.json", [record("harmful", "p")])
    assert main(["diff", str(bad), "--vs", good]) == 1
    err = capsys.readouterr().err
    assert "bad.json" in err and message in err
    assert "Traceback" not in err


def test_diff_wants_the_evaluations_in_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write(tmp_path / "a.json", [record("harmful", "p")])
    assert main(["diff", a, a, "--vs", a]) == 2
    assert "2 evaluation(s) of A but 1 after --vs" in capsys.readouterr().err


def test_diff_imports_no_ml_framework(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", [record("harmful", "p")])
    code = (
        "import sys\n"
        "from ralign.cli import main\n"
        f"status = main(['diff', {a!r}, '--vs', {a!r}])\n"
        "print([m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules], status)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[] 0"
