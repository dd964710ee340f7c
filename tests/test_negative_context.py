"""`sample { negative_context, negative_per_prompt }`: more answers under a second context, scored
with the others (RLCD's negative prompt), each remembered with the context it came from."""

from __future__ import annotations

import json
from pathlib import Path

from ralign.cli import main
from ralign.runtime.steps import sft_examples

RECIPE = """recipe "negative" { seed = 6 }
model policy { path = "ralign:tiny-llama", max_length = 128 }
dataset seeds { path = "ralign:seeds/hhh", limit = 3 }
template careful = "Be careful. {{ prompt }}"
template refusing = "Refuse this: {{ prompt }}"
phase answer {
  sample { from = seeds, per_prompt = 2, max_new_tokens = 4, context = careful,
           negative_context = refusing, negative_per_prompt = 1 }
}
"""


def test_negative_answers_join_each_prompts_answers(tmp_path: Path, monkeypatch) -> None:
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "negative.ralign"
    recipe.write_text(RECIPE, encoding="utf-8")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert (
            main(["execute", str(recipe), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
            == 0
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [
        json.loads(x)
        for x in (tmp_path / "run" / "r1" / "answer.sample" / "responses.jsonl")
        .read_text()
        .splitlines()
    ]
    assert len(rows) == 3
    for r in rows:
        assert len(r["responses"]) == len(r["finished"]) == 3
        assert r["negative"] == [False, False, True]
        assert r["contexts"][:2] == [f"Be careful. {r['prompt']}"] * 2
        assert r["contexts"][2] == f"Refuse this: {r['prompt']}"
    metrics = json.loads((tmp_path / "run" / "r1" / "answer.sample" / "metrics.json").read_text())
    assert metrics["responses"] == 9


def test_sft_trains_each_answer_in_the_context_it_was_sampled_in() -> None:
    record = {
        "prompt": "P",
        "context": "C P",
        "contexts": ["C P", "N P"],
        "responses": ["good", "refusal"],
        "finished": [True, True],
    }
    all_ = sft_examples([record], None, on="all")
    assert [(e["prompt"], e["response"]) for e in all_] == [("C P", "good"), ("N P", "refusal")]
    bare = sft_examples([record], None, on="all", drop_context=True)
    assert {e["prompt"] for e in bare} == {"P"}
