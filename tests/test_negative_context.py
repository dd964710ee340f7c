"""`sample { negative_context, negative_per_prompt }`: more answers under a second context, scored
with the others (RLCD's negative prompt), each remembered with the context it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "only, prefix",
    [("", ""), ("rejected", ""), ("chosen", ""), ("", "No, I")],
)
def test_negative_answers_join_each_prompts_answers(
    tmp_path: Path, monkeypatch, only: str, prefix: str
) -> None:
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "negative.ralign"
    extra = f", negative_only_{only} = true" if only else ""
    extra += f', negative_prefix = "{prefix}"' if prefix else ""
    recipe.write_text(
        RECIPE.replace("negative_per_prompt = 1", f"negative_per_prompt = 1{extra}"),
        encoding="utf-8",
    )
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
        if only == "rejected":
            assert r["may_choose"] == [True, True, False]
        else:
            assert "may_choose" not in r  # they compete with the others
        if only == "chosen":
            assert r["may_reject"] == [True, True, False]
        else:
            assert "may_reject" not in r
        # A forced opening starts the negative answers only (the tiny model never writes it).
        assert [a.startswith("No, I") for a in r["responses"]] == [False, False, bool(prefix)]
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


def test_only_rejected_answers_are_never_chosen_nor_trained_on() -> None:
    """RLCD's rule: a negative-context answer may be the rejected side of a pair, never the
    chosen one, whatever the scores say."""
    from ralign.runtime.pairs import make_pairs

    texts = [["answer", "other answer", "refusal"], ["bad", "worse", "refusal"]]
    scores = [[0.8, 0.2, -1.0], [0.1, 0.0, 1.5]]  # the refusal scores lowest, then highest
    may = [[True, True, False], [True, True, False]]
    made, stats = make_pairs(["safe", "harmful"], texts, scores, choosable=may)
    # Safe prompt: the best answer over the refusal. Harmful: the refusal outscores both
    # answers but may not be chosen, so the pair is the two answers.
    assert [(p["chosen"], p["rejected"]) for p in made] == [("answer", "refusal"), ("bad", "worse")]
    assert stats["dropped"]["unchoosable"] == 0
    # When the answer left to reject outscores the chosen one, the pair is dropped, never flipped.
    made, stats = make_pairs(["p"], [["a", "refusal"]], [[0.0, 1.0]], choosable=[[True, False]])
    assert made == [] and stats["dropped"]["unchoosable"] == 1
    # A random chosen is drawn from the answers that may be chosen only.
    for seed in range(5):
        made, _ = make_pairs(
            ["p"], texts[:1], scores[:1], chosen="random", seed=seed, choosable=may[:1]
        )
        assert made[0]["chosen"] in ("answer", "other answer")
    # Without flags, the same scores let the refusal win.
    made, _ = make_pairs(["harmful"], texts[1:], scores[1:])
    assert made[0]["chosen"] == "refusal"

    record = {
        "prompt": "P",
        "context": "C P",
        "contexts": ["C P", "C P", "N P"],
        "responses": ["good", "fine", "refusal"],
        "finished": [True, True, True],
        "negative": [False, False, True],
        "may_choose": [True, True, False],
    }
    best = sft_examples([record], [{"scores": [0.1, 0.2, 3.0]}], on="best")
    assert [e["response"] for e in best] == ["fine"]
    assert [e["response"] for e in sft_examples([record], None, on="all")] == ["good", "fine"]


def test_only_chosen_answers_are_never_rejected() -> None:
    """The mirror: a forced refusal may win a pair (a harmful request) but is never the side a
    harmless prompt's pair pushes away; the pair is then the two other answers, or none."""
    from ralign.runtime.pairs import make_pairs

    texts = [["answer", "weak answer", "refusal"], ["help", "more help", "refusal"]]
    scores = [[0.9, 0.0, -1.0], [-0.5, -0.2, 1.0]]  # safe: refusal worst; harmful: refusal best
    may_lose = [[True, True, False], [True, True, False]]
    made, stats = make_pairs(["safe", "harmful"], texts, scores, rejectable=may_lose)
    assert [(p["chosen"], p["rejected"]) for p in made] == [
        ("answer", "weak answer"),
        ("refusal", "help"),
    ]
    assert stats["dropped"]["unrejectable"] == 0
    # Without the flags the safe prompt's pair pushes the refusal away.
    made, _ = make_pairs(["safe"], texts[:1], scores[:1])
    assert (made[0]["chosen"], made[0]["rejected"]) == ("answer", "refusal")
    # A random chosen answer (the refusal) that scores below the answer it is paired with: the
    # pair is dropped, never flipped into one that rejects the refusal.
    made, stats = make_pairs(
        ["p"], [["a", "refusal"]], [[1.0, 0.0]], chosen="random", rejectable=[[True, False]]
    )
    assert made == [] and stats["dropped"]["unrejectable"] == 1
    # The best answer is the only one that may be rejected: nothing is left to pair it with.
    made, stats = make_pairs(["p"], [["refusal", "a"]], [[0.0, 1.0]], rejectable=[[False, True]])
    assert made == [] and stats["dropped"]["too_few"] == 1
    # A random rejected one is drawn from the answers that may be rejected only.
    for seed in range(5):
        made, _ = make_pairs(
            ["p"], texts[:1], scores[:1], rejected="random", seed=seed, rejectable=may_lose[:1]
        )
        assert made[0]["rejected"] != "refusal"


def test_the_two_only_flags_exclude_each_other(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "both.ralign"
    recipe.write_text(
        RECIPE.replace(
            "negative_per_prompt = 1",
            "negative_per_prompt = 1, negative_only_rejected = true, negative_only_chosen = true",
        ),
        encoding="utf-8",
    )
    assert main(["check", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "exclude each other" in err and "both.ralign:7:3: error" in err


def test_each_forced_opening_gets_its_own_answers(tmp_path: Path, monkeypatch) -> None:
    """`negative_prefix = [A, B]` with `negative_per_prompt = 1`: two forced answers per prompt,
    A's then B's, both negative; A's are the answers a single `negative_prefix = A` draws."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    answers = {}
    for name, prefix in (("one", '"No, I"'), ("two", '["No, I", "Maybe so"]')):
        recipe = tmp_path / f"{name}.ralign"
        recipe.write_text(
            RECIPE.replace(
                "negative_per_prompt = 1", f"negative_per_prompt = 1, negative_prefix = {prefix}"
            ),
            encoding="utf-8",
        )
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            run = tmp_path / name
            assert main(["execute", str(recipe), "--run-dir", str(run), "--device", "cpu"]) == 0
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        lines = (run / "r1" / "answer.sample" / "responses.jsonl").read_text().splitlines()
        answers[name] = [json.loads(x) for x in lines]
    for one, two in zip(answers["one"], answers["two"], strict=True):
        assert two["negative"] == [False, False, True, True]
        assert two["sources"] == [0, 0, 1, 2]  # the policy's own, then each opening's
        assert one["sources"] == [0, 0, 1]
        assert two["contexts"][2:] == [f"Refuse this: {two['prompt']}"] * 2
        assert two["responses"][2].startswith("No, I")
        assert two["responses"][3].startswith("Maybe so")
        assert two["responses"][:3] == one["responses"]  # a second opening changes no other answer


@pytest.mark.parametrize(
    "attr, value",
    [
        ("negative_only_rejected", "true"),
        ("negative_only_chosen", "true"),
        ("negative_prefix", '"I\'m sorry"'),
        ("negative_prefix", '""'),
        ("negative_prefix", '["I\'m sorry", "I\'m not sure"]'),
    ],
)
def test_negative_attributes_need_a_negative_context(
    tmp_path: Path, capsys, attr: str, value: str
) -> None:
    recipe = tmp_path / "bad.ralign"
    recipe.write_text(
        RECIPE.replace("negative_context = refusing, negative_per_prompt = 1", "").replace(
            "context = careful,", f"context = careful, {attr} = {value}"
        ),
        encoding="utf-8",
    )
    assert main(["check", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert f"`{attr}` needs `negative_context`" in err
    assert "bad.ralign:7:3: error" in err


def test_only_rejected_false_needs_nothing(tmp_path: Path) -> None:
    recipe = tmp_path / "ok.ralign"
    recipe.write_text(
        RECIPE.replace("negative_context = refusing, negative_per_prompt = 1", "").replace(
            "context = careful,", "context = careful, negative_only_rejected = false"
        ),
        encoding="utf-8",
    )
    assert main(["check", str(recipe)]) == 0


@pytest.mark.parametrize("value", ["3", "[]", '["No", 4]'])
def test_negative_prefix_is_a_string_or_a_list_of_them(tmp_path: Path, capsys, value: str) -> None:
    recipe = tmp_path / "bad.ralign"
    recipe.write_text(
        RECIPE.replace(
            "negative_per_prompt = 1", f"negative_per_prompt = 1, negative_prefix = {value}"
        ),
        encoding="utf-8",
    )
    assert main(["check", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "bad.ralign:8:" in err
    assert (
        "`negative_prefix` of the sample step must be a string or a non-empty list of strings"
        in err
    )


def test_answer_sources_of_records_from_before_the_field() -> None:
    from ralign.runtime.steps import answer_sources

    written = {"responses": ["a", "b", "c", "d"], "negative": [False, False, True, True]}
    assert answer_sources(written) == [0, 0, 1, 1]  # one negative context, one source
    assert answer_sources({**written, "sources": [0, 0, 1, 2]}) == [0, 0, 1, 2]
    assert answer_sources({"responses": ["a", "b"]}) == [0, 0]  # no negative context at all
