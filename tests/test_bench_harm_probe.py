"""bench/harm_probe.py: its logistic regression, cross-validation and counts, on hand-made data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    return bench_module("harm_probe")


def test_the_fit_separates_what_a_line_separates(probe) -> None:
    x = torch.tensor([[2.0, 0.0], [1.5, 0.3], [-2.0, 0.1], [-1.0, -0.4]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    w, b = probe.fit(x, y, 1e-3)
    assert ((x @ w + b) > 0).tolist() == [True, True, False, False]
    assert w[0] > 0 and abs(w[1]) < w[0]


def test_a_large_penalty_shrinks_the_weights(probe) -> None:
    x = torch.tensor([[1.0], [2.0], [-1.0], [-2.0]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    small, _ = probe.fit(x, y, 1e-3)
    large, _ = probe.fit(x, y, 10.0)
    assert 0 < large.item() < small.item()


def test_cross_validation_scores_each_weight_on_rows_it_did_not_fit(probe) -> None:
    # Labels are noise: no weight can predict held-out rows much better than chance.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 50, generator=g)
    y = (torch.rand(200, generator=g) > 0.5).float()
    cv = probe.cross_validate(x, y, lambdas=(0.0, 1.0), folds=5)
    assert set(cv) == {0.0, 1.0}
    assert all(0.3 < acc < 0.7 for acc in cv.values()), cv


def test_precision_and_recall_from_counts(probe) -> None:
    said = [True, True, False, True, False]
    truth = [True, False, True, True, False]
    pr = probe.precision_recall(said, truth)
    assert (pr["tp"], pr["fp"], pr["fn"]) == (2, 1, 1)
    assert pr["precision"] == pytest.approx(2 / 3) and pr["recall"] == pytest.approx(2 / 3)
    assert pr["precision_ci95"][0] < 2 / 3 < pr["precision_ci95"][1]
    assert math.isnan(probe.precision_recall([False], [False])["precision"])


def test_the_written_stdlib_holds_the_rounded_weights_and_compiles(probe, tmp_path: Path) -> None:
    from ralign.compile import check_file
    from ralign.rewards.interpreter import Programs

    w = torch.linspace(-1.0, 1.0, 384) / 3.0
    text = probe.stdlib_text(w, torch.tensor([0.123456]), 1e-4, seed_negatives=True)
    assert "--seed-negatives --write-stdlib" in text and "seed sets' train splits" in text
    (tmp_path / "harm_probe.ralign").write_text(text, encoding="utf-8")
    checked = check_file(tmp_path / "harm_probe.ralign")
    (qname,) = [q for q in checked.programs.lets if q.endswith(":weights")]
    weights = Programs(checked.programs).let(qname)
    assert len(weights) == 385 and weights[-1] == 0.1235  # 4 significant digits
    assert weights[:3] == [float(f"{x:.4g}") for x in w[:3].tolist()]


def test_the_shipped_weights_are_what_std_harm_reads() -> None:
    """stdlib/harm_probe.ralign, as bench/harm_probe.py wrote it: 385 numbers and its provenance."""
    text = (ROOT / "stdlib" / "harm_probe.ralign").read_text(encoding="utf-8")
    assert "bench/harm_probe.py --seed-negatives --write-stdlib" in text
    body = text.split("let weights = [", 1)[1].split("]", 1)[0]
    assert len([x for x in body.replace("\n", " ").split(",") if x.strip()]) == 385


def test_the_overlap_tests_guard_every_set_the_probe_is_fitted_on(probe) -> None:
    """tests/test_eval_sets.py keeps the evaluation apart from what trains std/harm's probe: it must
    list exactly the sets bench/harm_probe.py fits on."""
    from test_eval_sets import PROBE_FIT

    assert set(PROBE_FIT) == {probe.DEV, probe.DEV2, probe.EVERYDAY}
    assert all(path.is_file() for path in PROBE_FIT)
