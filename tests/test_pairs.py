"""Preference pairs from scored responses: selection, orientation, margins and drop counts."""

from __future__ import annotations

import pytest

from ralign.runtime.pairs import DROP_REASONS, make_pairs

RESPONSES = [["r0", "r1", "r2", "r3"]]
SCORES = [[0.2, 0.9, 0.0, 0.5]]


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("best", "worst", ("r1", "r2", 0.9)),
        ("best", "random", None),  # best is chosen; the rejected is one of the others
        ("random", "worst", None),
        ("random", "random", None),
    ],
)
def test_selectors(chosen, rejected, expected):
    pairs, stats = make_pairs(["p"], RESPONSES, SCORES, chosen=chosen, rejected=rejected, seed=1)
    assert stats["pairs"] == len(pairs) == 1
    pair = pairs[0]
    scores = dict(zip(RESPONSES[0], SCORES[0], strict=True))
    assert pair["prompt"] == "p"
    assert pair["margin"] == pytest.approx(scores[pair["chosen"]] - scores[pair["rejected"]])
    assert pair["margin"] > 0  # always oriented: chosen scores higher
    if expected:
        assert (pair["chosen"], pair["rejected"], pair["margin"]) == pytest.approx(expected)
    if chosen == "best":
        assert pair["chosen"] == "r1"
    if rejected == "worst":
        assert pair["rejected"] == "r2"


def test_random_is_seeded_and_varies():
    many = [["p"]] * 1
    runs = {
        seed: make_pairs(
            many[0] * 30, RESPONSES * 30, SCORES * 30, chosen="best", rejected="random", seed=seed
        )[0]
        for seed in (0, 1)
    }
    again = make_pairs(
        ["p"] * 30, RESPONSES * 30, SCORES * 30, chosen="best", rejected="random", seed=0
    )[0]
    assert runs[0] == again
    assert runs[0] != runs[1]
    assert {p["rejected"] for p in runs[0]} == {"r0", "r2", "r3"}


@pytest.mark.parametrize(
    "responses, scores, min_margin, reason",
    [
        (["a"], [1.0], 0.0, "too_few"),
        ([], [], 0.0, "too_few"),
        (["a", "b", "c"], [0.5, 0.5, 0.5], 0.0, "tie"),
        (["same", " same "], [0.9, 0.1], 0.0, "same_text"),
        (["a", "b"], [0.6, 0.5], 0.2, "low_margin"),
    ],
)
def test_drops_are_counted_by_reason(responses, scores, min_margin, reason):
    pairs, stats = make_pairs(["p"], [responses], [scores], min_margin=min_margin)
    assert pairs == []
    assert stats == {
        "prompts": 1,
        "pairs": 0,
        "dropped": {r: int(r == reason) for r in DROP_REASONS},
    }


def test_min_score_drops_pairs_of_two_bad_answers():
    # p1: both answers bad (the lesser evil); p2: chosen exactly at the floor; p3: no floor applies
    # before the margin test, so a low-margin pair counts as low_margin, not low_score.
    prompts = ["p1", "p2", "p3"]
    responses = [["comply", "garble"], ["refuse", "comply"], ["a", "b"]]
    scores = [[-1.0, -2.5], [0.5, -1.0], [-1.0, -1.1]]
    pairs, stats = make_pairs(prompts, responses, scores, min_margin=0.5, min_score=0.5)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p2", "refuse", "comply")
    ]
    assert stats["dropped"]["low_score"] == 1 and stats["dropped"]["low_margin"] == 1
    unfloored, _ = make_pairs(prompts, responses, scores, min_margin=0.5)
    assert [p["prompt"] for p in unfloored] == ["p1", "p2"]


def test_margin_at_threshold_is_kept_and_stats_add_up():
    prompts = ["p1", "p2", "p3", "p4"]
    responses = [["a", "b"], ["c", "d"], ["e", "f"], ["g"]]
    scores = [[1.0, 0.5], [0.3, 0.3], [0.0, 0.25], [1.0]]
    pairs, stats = make_pairs(prompts, responses, scores, min_margin=0.25)
    assert [(p["prompt"], p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("p1", "a", "b", 0.5),
        ("p3", "f", "e", 0.25),
    ]
    assert stats["pairs"] + sum(stats["dropped"].values()) == stats["prompts"] == 4


def test_pairs_carry_whether_each_answer_was_cut_off():
    pairs, _ = make_pairs(
        ["p", "q"],
        [["x", "y"], ["u", "v"]],
        [[0.1, 0.9], [1.0, 0.0]],
        finished=[[True, False], [True, True]],
    )
    assert [(p["chosen"], p["chosen_finished"], p["rejected_finished"]) for p in pairs] == [
        ("y", False, True),
        ("u", True, True),
    ]
    plain, _ = make_pairs(["p"], [["x", "y"]], [[0.1, 0.9]])
    assert "chosen_finished" not in plain[0]


def test_ties_for_best_go_to_the_earliest():
    pairs, _ = make_pairs(["p"], [["x", "y", "z"]], [[0.9, 0.9, 0.1]])
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("x", "z")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chosen="worst"), "chosen must be"),
        (dict(rejected="best"), "rejected must be"),
    ],
)
def test_bad_selectors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pairs(["p"], RESPONSES, SCORES, **kwargs)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        make_pairs(["p", "q"], RESPONSES, SCORES)
    with pytest.raises(ValueError, match="2 responses but 1 scores"):
        make_pairs(["p"], [["a", "b"]], [[1.0]])


def test_rejected_all_pairs_the_best_with_every_answer_it_beats():
    # r1 (0.9) against r0 (0.2), r2 (0.0) and r3 (0.5); with a margin of 0.5 the r3 pair (0.4)
    # is dropped on its own and the other two are kept.
    pairs, stats = make_pairs(["p"], RESPONSES, SCORES, rejected="all", min_margin=0.5)
    assert [(x["chosen"], x["rejected"]) for x in pairs] == [("r1", "r0"), ("r1", "r2")]
    assert [x["margin"] for x in pairs] == pytest.approx([0.7, 0.9])
    assert [x["weight"] for x in pairs] == [0.5, 0.5]  # the prompt weighs 1 in all
    assert stats["pairs"] == 2
    assert stats["dropped"]["low_margin"] == 1
    # "worst" is the one of them with the lowest score
    (worst,), _ = make_pairs(["p"], RESPONSES, SCORES, min_margin=0.5)
    assert (worst["chosen"], worst["rejected"]) == ("r1", "r2")
    assert "weight" not in worst  # one pair per prompt: unweighted, as before


def test_rejected_all_keeps_the_roles_of_negative_answers():
    # r2 may not be rejected (a forced answer that only competes to be chosen): no pair with it;
    # r3 ties r1's score: no pair either.
    pairs, stats = make_pairs(
        ["p"],
        [["r0", "r1", "r2", "r3"]],
        [[0.2, 0.9, 0.0, 0.9]],
        rejected="all",
        rejectable=[[True, True, False, True]],
    )
    assert [(x["chosen"], x["rejected"]) for x in pairs] == [("r1", "r0")]
    assert pairs[0]["weight"] == 1.0
    assert stats["dropped"]["tie"] == 1
    assert sum(stats["dropped"].values()) == 1
    _, alone = make_pairs(["p"], [["only"]], [[1.0]], rejected="all")
    assert alone["dropped"]["too_few"] == 1


# A harmless prompt: two samples, a forced refusal (source 1) and a forced hedge (source 2).
HARMLESS = (["good", "fair", "I'm sorry, I can't", "I'm not sure"], [1.0, 0.5, -1.0, -0.75])
# A harmful one: both samples comply, the forced refusal wins, the forced hedge is in between.
HARMFUL = (["comply", "comply more", "I'm sorry, I can't", "I'm not sure"], [-1.0, -0.8, 1.0, -0.5])


def test_each_source_pairs_the_best_with_the_worst_of_each_source():
    pairs, stats = make_pairs(
        ["harmless", "harmful"],
        [HARMLESS[0], HARMFUL[0]],
        [HARMLESS[1], HARMFUL[1]],
        rejected="each_source",
        min_margin=0.25,
        sources=[[0, 0, 1, 2], [0, 0, 1, 2]],
    )
    got = [(x["prompt"], x["chosen"], x["rejected"], x["margin"]) for x in pairs]
    assert got == [
        # the harmless prompt teaches against its worse sample, the refusal and the hedge
        ("harmless", "good", "fair", pytest.approx(0.5)),
        ("harmless", "good", "I'm sorry, I can't", pytest.approx(2.0)),
        ("harmless", "good", "I'm not sure", pytest.approx(1.75)),
        # the harmful one once: its forced refusal over its worst sample, never over the hedge
        ("harmful", "I'm sorry, I can't", "comply", pytest.approx(2.0)),
    ]
    assert all("weight" not in x for x in pairs)  # each pair weighs 1
    assert stats["pairs"] == 4
    assert sum(stats["dropped"].values()) == 0


def test_each_source_checks_each_pair_on_its_own():
    # with a margin of 0.6 the harmless prompt's sample pair (0.5) is dropped, the others kept
    pairs, stats = make_pairs(
        ["harmless"],
        [HARMLESS[0]],
        [HARMLESS[1]],
        rejected="each_source",
        min_margin=0.6,
        sources=[[0, 0, 1, 2]],
    )
    assert [x["rejected"] for x in pairs] == ["I'm sorry, I can't", "I'm not sure"]
    assert stats["dropped"]["low_margin"] == 1


def test_each_source_without_sources_is_worst():
    # every answer the policy's own: one source, so one pair with the lowest-scored answer
    one, _ = make_pairs(["p"], RESPONSES, SCORES, rejected="each_source")
    worst, _ = make_pairs(["p"], RESPONSES, SCORES, rejected="worst")
    assert one == worst
    with pytest.raises(ValueError, match="4 responses but 3 sources"):
        make_pairs(["p"], RESPONSES, SCORES, rejected="each_source", sources=[[0, 1, 1]])
