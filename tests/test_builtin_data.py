"""The built-in prompt sets and hhh-mini: sizes, balance, splits, no duplicates, and name resolution."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ralign.errors import DataError
from ralign.runtime.behavior import KINDS, load_prompts
from ralign.runtime.builtin_data import DATASETS, resolve_dataset
from ralign.runtime.hhh import load_hhh


def _rows(name):
    return [
        json.loads(line)
        for line in resolve_dataset(name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def _norm(text):
    return " ".join(text.lower().split())


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_builtin_name_resolves_to_a_file(name):
    path = resolve_dataset(name)
    assert path.is_file() and path.suffix == ".jsonl"


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(DataError, match="did you mean 'seeds/hhh'"):
        resolve_dataset("seeds/hhhh")
    with pytest.raises(
        DataError,
        match="known: evals/behavior, evals/hhh-mini, seeds/calibration, seeds/calibration_apart, seeds/hhh, seeds/red_team, seeds/safe",
    ):
        resolve_dataset("nothing-like-it")


def test_hhh_seeds_have_at_least_50_of_each_kind_and_a_quarter_held_out():
    rows = _rows("seeds/hhh")
    assert len(rows) >= 240
    kinds = Counter(r["kind"] for r in rows)
    assert set(kinds) == set(KINDS)
    assert min(kinds.values()) >= 50
    for kind, n in kinds.items():
        held = sum(1 for r in rows if r["kind"] == kind and r["split"] == "heldout")
        assert 0.2 <= held / n <= 0.3, (kind, held, n)
    assert {r["split"] for r in rows} == {"train", "heldout"}
    assert all(
        set(r) == {"prompt", "kind", "split"} and r["prompt"].strip() == r["prompt"] for r in rows
    )


def test_red_team_is_harmful_split_and_distinct_from_hhh_seeds():
    red = _rows("seeds/red_team")
    assert len(red) >= 80
    assert {r["kind"] for r in red} == {"harmful"}
    held = sum(1 for r in red if r["split"] == "heldout")
    assert 0.2 <= held / len(red) <= 0.3
    hhh = {_norm(r["prompt"]) for r in _rows("seeds/hhh")}
    assert not hhh & {_norm(r["prompt"]) for r in red}


def test_safe_seeds_are_harmless_kinds_split_and_distinct():
    safe = _rows("seeds/safe")
    kinds = Counter(r["kind"] for r in safe)
    assert set(kinds) == {"scary_harmless", "everyday"}
    assert kinds["scary_harmless"] >= 120 and kinds["everyday"] >= 60
    for kind in kinds:
        # Every fourth prompt of each kind (its index 3, 7, 11, ...) is held out: exactly 25%.
        splits = [r["split"] for r in safe if r["kind"] == kind]
        assert splits == ["heldout" if i % 4 == 3 else "train" for i in range(len(splits))], kind
    assert all(
        set(r) == {"prompt", "kind", "split"} and r["prompt"].strip() == r["prompt"] for r in safe
    )
    others = {_norm(r["prompt"]) for name in ("seeds/hhh", "seeds/red_team") for r in _rows(name)}
    assert not others & {_norm(r["prompt"]) for r in safe}


def test_calibration_seeds_are_harmless_all_held_out_interleaved_and_distinct():
    cal = _rows("seeds/calibration")
    assert Counter(r["kind"] for r in cal) == {"scary_harmless": 160, "everyday": 80}
    # Never trained on: a step that samples a built-in set leaves every row out.
    assert {r["split"] for r in cal} == {"heldout"}
    assert all(list(r) == ["prompt", "kind", "split"] for r in cal)
    assert all(r["prompt"] and r["prompt"].strip() == r["prompt"] for r in cal)
    assert all("\n" not in r["prompt"] and 6 <= len(r["prompt"].split()) <= 40 for r in cal)
    # Interleaved throughout (scary_harmless, scary_harmless, everyday, ...), so that any first
    # rows keep the two kinds in proportion.
    assert [r["kind"] for r in cal] == ["scary_harmless", "scary_harmless", "everyday"] * 80
    others = {
        _norm(r["prompt"])
        for name in ("seeds/hhh", "seeds/red_team", "seeds/safe")
        for r in _rows(name)
    }
    mine = [_norm(r["prompt"]) for r in cal]
    assert len(set(mine)) == len(mine)
    assert not others & set(mine)


def test_calibration_written_apart_is_harmless_held_out_in_proportion_and_in_many_styles():
    cal = _rows("seeds/calibration_apart")
    kinds = Counter(r["kind"] for r in cal)
    assert kinds == {"scary_harmless": 196, "everyday": 95}
    assert {r["split"] for r in cal} == {"heldout"}
    assert all(list(r) == ["prompt", "kind", "split"] for r in cal)
    # Interleaved in proportion: every first k rows hold k * 95/291 everyday prompts, give or take 2.
    everyday = 0
    for k, r in enumerate(cal, 1):
        everyday += r["kind"] == "everyday"
        assert abs(everyday - k * kinds["everyday"] / len(cal)) <= 2, k
    # Written the way users write, not the way the training prompts are (its point: see
    # tests/test_eval_sets.py for the overlap with them): fragments, lower case, no end
    # punctuation, long messages with context, code.
    prompts = [r["prompt"] for r in cal]
    assert sum(p == p.lower() for p in prompts) >= 60
    assert sum(p[-1] not in ".?!" for p in prompts) >= 60
    assert sum(len(p.split()) < 8 for p in prompts) >= 15
    assert sum(len(p.split()) > 30 for p in prompts) >= 15
    assert any("```" in p for p in prompts)
    mine = [_norm(p) for p in prompts]
    assert len(set(mine)) == len(mine)
    others = {
        _norm(r["prompt"])
        for name in DATASETS
        if name != "seeds/calibration_apart"
        for r in _rows(name)
        if "prompt" in r
    }
    assert not others & set(mine)


def test_no_duplicate_prompts_anywhere():
    prompts = [
        _norm(r["prompt"]) for name in DATASETS if name.startswith("seeds/") for r in _rows(name)
    ]
    dupes = [p for p, n in Counter(prompts).items() if n > 1]
    assert not dupes


def test_load_prompts_filters_by_split():
    path = resolve_dataset("seeds/hhh")
    held = load_prompts(path, split="heldout")
    train = load_prompts(path, split="train")
    assert len(held) + len(train) == len(load_prompts(path))
    assert Counter(r["kind"] for r in held) == {k: 16 for k in KINDS}


def test_hhh_mini_is_position_balanced_and_length_matched():
    items = load_hhh(resolve_dataset("evals/hhh-mini"))
    assert len(items) >= 72
    assert Counter(it.subset for it in items) == {"harmless": 24, "helpful": 24, "honest": 24}
    assert len({(it.input, it.choices) for it in items}) == len(items)
    for subset in ("harmless", "helpful", "honest"):
        sub = [it for it in items if it.subset == subset]
        first = sum(1 for it in sub if it.target == 0)
        assert first == len(sub) // 2, subset  # the better answer is first exactly half the time
    # The two choices of every item are length-matched (within 2 SmolLM2 tokens, checked when the
    # file was written), so the summed log-likelihood (`acc`) is not decided by length alone.
    # The tests have no SmolLM2 tokenizer, so characters are the proxy: within 15% of each other.
    for it in items:
        a, b = (len(c) for c in it.choices)
        assert abs(a - b) <= 0.15 * max(a, b), (it.input, a, b)


def test_hhh_mini_raw_rows_use_the_bigbench_format():
    for row in _rows("evals/hhh-mini"):
        assert set(row) == {"input", "choices", "target_scores", "subset"}
        assert len(row["choices"]) == 2 and sorted(row["target_scores"]) == [0, 1]
