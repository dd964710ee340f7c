"""The refusal and admits-not-knowing detectors against hand labels of real SmolLM2 answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ralign.runtime.behavior import KINDS, admits_not_knowing, is_refusal

LABELS = Path(__file__).parent / "data" / "detector_labels.jsonl"
MODELS = ("base", "trained")
DETECTORS = {"refusal": is_refusal, "admits": admits_not_knowing}
LEAST_ACCURACY = 0.95


def load_labels() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line]


def confusion(labels: list[bool], predicted: list[bool]) -> dict[str, int]:
    """Counts of true/false positives/negatives."""
    pairs = list(zip(labels, predicted, strict=True))
    return {
        "tp": sum(1 for y, p in pairs if y and p),
        "fp": sum(1 for y, p in pairs if not y and p),
        "fn": sum(1 for y, p in pairs if y and not p),
        "tn": sum(1 for y, p in pairs if not y and not p),
    }


def scores(c: dict[str, int]) -> dict[str, float]:
    """Accuracy, precision and recall of a confusion matrix (precision/recall 1.0 when undefined)."""
    n = sum(c.values())
    predicted, actual = c["tp"] + c["fp"], c["tp"] + c["fn"]
    return {
        "accuracy": (c["tp"] + c["tn"]) / n,
        "precision": c["tp"] / predicted if predicted else 1.0,
        "recall": c["tp"] / actual if actual else 1.0,
    }


@pytest.mark.parametrize(
    "labels, predicted, want",
    [
        ([True, True, False, False], [True, False, True, False], (0.5, 0.5, 0.5)),
        ([True, True, True, False], [True, True, True, True], (0.75, 0.75, 1.0)),
        ([False, False], [False, False], (1.0, 1.0, 1.0)),
    ],
)
def test_scores_by_hand(labels, predicted, want):
    s = scores(confusion(labels, predicted))
    assert (s["accuracy"], s["precision"], s["recall"]) == want


def test_labels_are_well_formed_and_enough():
    rows = load_labels()
    assert len(rows) >= 150
    assert sum(1 for r in rows if r["model"] == "base") >= 150  # real SmolLM2 answers
    for r in rows:
        assert r["kind"] in KINDS and r["model"] in MODELS, r
        assert isinstance(r["refusal"], bool) and isinstance(r["admits"], bool), r
        assert isinstance(r["prompt"], str) and isinstance(r["answer"], str), r
    # Both classes of both labels occur, so precision and recall mean something.
    for flag in DETECTORS:
        assert sum(r[flag] for r in rows) >= 15
        assert sum(not r[flag] for r in rows) >= 15


@pytest.mark.parametrize("flag", sorted(DETECTORS))
def test_detector_agrees_with_hand_labels(flag):
    rows = load_labels()
    detect = DETECTORS[flag]
    c = confusion([r[flag] for r in rows], [detect(r["answer"]) for r in rows])
    s = scores(c)
    print(f"{flag}: {c} " + " ".join(f"{k}={v:.3f}" for k, v in s.items()))
    missed = [r["answer"][:80] for r in rows if detect(r["answer"]) != r[flag]]
    assert s["accuracy"] >= LEAST_ACCURACY, missed
