"""`sample { from = D, per_round = N }`: each round answers its own slice of the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ralign.cli import main
from ralign.runtime.steps import round_slice

RECIPE = """recipe "slices" { rounds = 3, seed = 5 }
model policy { path = "ralign:tiny-llama", max_length = 128 }
dataset seeds { path = "ralign:seeds/hhh", limit = 6 }
phase answer {
  sample { from = seeds, per_prompt = 1, max_new_tokens = 2, per_round = 2 }
}
"""


def test_slices_partition_one_seeded_order() -> None:
    items = list(range(10))
    rounds = [round_slice(items, 5, r, seed=3) for r in (1, 2)]
    assert sorted(rounds[0] + rounds[1]) == items  # two rounds of 5 use up all 10
    assert rounds[0] != items[:5]  # shuffled, not in file order
    assert round_slice(items, 5, 1, seed=3) == rounds[0]  # deterministic
    assert round_slice(items, 5, 1, seed=4) != rounds[0]
    # Past the end it wraps around: round 3 is round 1 again.
    assert round_slice(items, 5, 3, seed=3) == rounds[0]
    # 4 a round over 10: round 3 takes the last 2 of the order and the first 2 again.
    order = round_slice(items, 10, 1, seed=3)
    assert round_slice(items, 4, 3, seed=3) == order[8:] + order[:2]
    # Asking for more than there is answers every item once.
    assert sorted(round_slice(items, 50, 2, seed=3)) == items


def test_each_round_answers_its_own_prompts(tmp_path: Path, monkeypatch) -> None:
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "slices.ralign"
    recipe.write_text(RECIPE, encoding="utf-8")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        args = ["execute", str(recipe), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
        assert main(args) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    seen = []
    for r in (1, 2, 3):
        path = tmp_path / "run" / f"r{r}" / "answer.sample" / "responses.jsonl"
        seen.append([json.loads(x)["prompt"] for x in path.read_text().splitlines()])
    assert [len(x) for x in seen] == [2, 2, 2]
    assert len({p for x in seen for p in x}) == 6  # three rounds of 2 use up the 6 prompts


@pytest.mark.parametrize("value", ["0", "2.5"])
def test_per_round_must_be_a_positive_int(tmp_path: Path, capsys, value: str) -> None:
    recipe = tmp_path / "bad.ralign"
    recipe.write_text(RECIPE.replace("per_round = 2", f"per_round = {value}"), encoding="utf-8")
    assert main(["check", str(recipe)]) != 0
    assert "bad.ralign:5:" in capsys.readouterr().err


def test_per_round_needs_a_dataset(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "bad.ralign"
    recipe.write_text(
        RECIPE.replace(
            "phase answer {",
            'template t = "{{ examples }}"\nphase answer {\n  generate { from = seeds, template = t, count = 4 }',
        ).replace("sample { from = seeds, ", "sample { "),
        encoding="utf-8",
    )
    assert main(["check", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "`per_round` slices a dataset: it needs `from`" in err
    assert "bad.ralign:7:3: error" in err and err.count("error:") == 1
