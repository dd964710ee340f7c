"""Which answers `train sft` trains on: the best, all, or those above a score floor."""

from __future__ import annotations

import pytest

from ralign.runtime.steps import sft_examples

RECORDS = [
    {"prompt": "p1", "context": "C: p1", "responses": ["a", "b", "c"]},
    {"prompt": "p2", "context": "C: p2", "responses": ["d", "e", "  "]},
]
SCORES = [{"scores": [0.1, 0.9, 0.9]}, {"scores": [-1.0, -0.5, 2.0]}]


@pytest.mark.parametrize(
    ("on", "floor", "drop", "expected"),
    [
        # best: ties go to the earlier answer; a blank best answer is skipped
        ("best", None, False, [("C: p1", "b")]),
        ("best", None, True, [("p1", "b")]),
        # a floor drops a prompt whose best answer is still bad (p2's best is blank anyway)
        ("best", 1.0, True, []),
        ("best", 0.5, True, [("p1", "b")]),
        # all, with and without a floor
        ("all", None, True, [("p1", "a"), ("p1", "b"), ("p1", "c"), ("p2", "d"), ("p2", "e")]),
        ("all", 0.0, True, [("p1", "a"), ("p1", "b"), ("p1", "c")]),
        ("all", -0.5, False, [("C: p1", "a"), ("C: p1", "b"), ("C: p1", "c"), ("C: p2", "e")]),
    ],
)
def test_sft_examples(on, floor, drop, expected):
    scores = SCORES if on == "best" or floor is not None else None
    got = sft_examples(RECORDS, scores, on=on, min_score=floor, drop_context=drop)
    assert [(x["prompt"], x["response"]) for x in got] == expected


def test_revised_and_unscored_all_take_every_nonblank_answer():
    got = sft_examples(RECORDS, None, on="revised", drop_context=False)
    assert [x["response"] for x in got] == ["a", "b", "c", "d", "e"]


def test_examples_carry_whether_the_answer_was_cut_off():
    records = [{**RECORDS[0], "finished": [True, False, True]}, RECORDS[1]]  # p2: an older run
    got = sft_examples(records, None, on="all", drop_context=True)
    assert [(x["response"], x["finished"]) for x in got] == [
        ("a", True),
        ("b", False),
        ("c", True),
        ("d", True),
        ("e", True),
    ]
