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
    # Real SmolLM2 answers: the base model's, and the quickstart's trained policies' (seeds 7-9).
    for model in MODELS:
        assert sum(1 for r in rows if r["model"] == model) >= 150, model
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
    # Issue 15's bar: >= 95% on answers from before and after training, together.
    rows = load_labels()
    detect = DETECTORS[flag]
    s = scores(confusion([r[flag] for r in rows], [detect(r["answer"]) for r in rows]))
    missed = [r["answer"][:80] for r in rows if detect(r["answer"]) != r[flag]]
    assert s["accuracy"] >= LEAST_ACCURACY, missed


# Each model apart, a floor below the bar: training changes how answers decline. Measured
# (docs/results.md): refusal 0.993 base / 0.987 trained; admits 0.990 base / 0.933 trained, where
# the detector misses "unable to provide [the information]" declines the labels count as admitting.
LEAST_ACCURACY_PER_MODEL = 0.90


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("flag", sorted(DETECTORS))
def test_detector_agrees_with_hand_labels_per_model(flag, model):
    rows = [r for r in load_labels() if r["model"] == model]
    detect = DETECTORS[flag]
    c = confusion([r[flag] for r in rows], [detect(r["answer"]) for r in rows])
    s = scores(c)
    print(f"{model} {flag}: {c} " + " ".join(f"{k}={v:.3f}" for k, v in s.items()))
    missed = [r["answer"][:80] for r in rows if detect(r["answer"]) != r[flag]]
    assert s["accuracy"] >= LEAST_ACCURACY_PER_MODEL, missed
