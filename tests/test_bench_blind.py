"""bench/blind_choices.py: blinded pairs of two runs' chosen answers, and the reader's tally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import bench_module

blind = bench_module("blind_choices")


def _run(tmp_path: Path, name: str, chosen: dict[str, str]) -> Path:
    folder = tmp_path / name / "r1" / "distill.pairs"
    folder.mkdir(parents=True)
    rows = [{"prompt": p, "chosen": c, "rejected": "no"} for p, c in chosen.items()]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / name


def test_only_differing_choices_are_shown_and_the_tally_unblinds_them(tmp_path, capsys):
    a = _run(tmp_path, "a", {f"p{i}": f"a{i}" for i in range(6)} | {"same": "s"})
    b = _run(tmp_path, "b", {f"p{i}": f"b{i}" for i in range(6)} | {"same": "s", "extra": "e"})
    items = blind.items(blind.chosen(a, 1), blind.chosen(b, 1), n=6, skip=0, seed=3)
    assert sorted(i["prompt"] for i in items) == [f"p{i}" for i in range(6)]
    for item in items:  # X and Y are the two runs' answers, and a_is says which is A's
        a_side = item[item["a_is"]]
        assert a_side.startswith("a") and item["Y" if item["a_is"] == "X" else "X"].startswith("b")
    # a reader who always prefers run A's answer, then one who prefers neither
    always_a = "".join(i["a_is"] for i in items)
    assert blind.tally(items, always_a) == {"a": 6, "b": 0, "same": 0}
    assert blind.tally(items, "======") == {"a": 0, "b": 0, "same": 6}
    # the same seed blinds the same way; the command line prints no run's name per answer
    assert blind.items(blind.chosen(a, 1), blind.chosen(b, 1), 6, 0, 3) == items
    assert blind.main([str(a), str(b), "--n", "6", "--seed", "3"]) == 0
    shown = capsys.readouterr().out
    assert "a0" in shown and "b0" in shown and str(a) not in shown


def test_labels_of_the_wrong_length_or_letters_are_refused(tmp_path):
    a = _run(tmp_path, "a", {"p": "x"})
    b = _run(tmp_path, "b", {"p": "y"})
    items = blind.items(blind.chosen(a, 1), blind.chosen(b, 1), 5, 0, 0)
    with pytest.raises(SystemExit, match="1 letters"):
        blind.tally(items, "XY")
    with pytest.raises(SystemExit, match="X, Y and ="):
        blind.tally(items, "Q")
