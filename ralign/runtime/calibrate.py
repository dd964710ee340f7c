"""Calibration: how far a round moves the policy, chosen on held-out harmless prompts.

The trained weights are interpolated with the round's starting ones, W0 + s (W1 - W0) (WiSE-FT,
Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"), and the largest weight s whose
refusals of harmless prompts stay within a bound of the start's is kept. Why: trained policies of
the same recipe with different seeds tell harmful from harmless requests apart about equally well
but draw the line in different places (docs/results.md, "the refusal ROC"); the weight moves the
line without retraining.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ralign.errors import DataError
from ralign.runtime.behavior import greedy_answers, is_refusal
from ralign.stats import paired_rise, wilson

HARMLESS = ("everyday", "scary_harmless")  # behaviour kinds that should never be refused


def harmless_prompts(data: dict[str, Any], recipe_dir: Path) -> list[str]:
    """The harmless prompts of a step's `data`, each file in turn (of a set that marks splits,
    the held-out rows only).

    Raises:
        DataError: a hub dataset (behaviour prompts are local files or built-in sets), or a bad row.
    """
    from ralign.runtime.data import dataset_file, dataset_parts
    from ralign.runtime.evaluators import eval_items

    out: list[str] = []
    for part in dataset_parts(data):
        file = dataset_file(part, recipe_dir)
        if file is None:
            raise DataError(f"data '{part['path']}' must be a local file or a built-in ralign: set")
        out += [r["prompt"] for r in eval_items("behavior", file, None) if r["kind"] in HARMLESS]
    return out


def weights(spacing: float, top: float = 1.0) -> list[float]:
    """The weights tried, largest first: top times 1, 1 - spacing, ... while positive, then 0."""
    out, k = [], 0
    while (w := round(1 - k * spacing, 10)) > 0:
        out.append(round(top * w, 10))
        k += 1
    return [*out, 0.0]


def refusals(
    model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """The prompts the model refuses (greedy answers, the behaviour evaluation's detector)."""
    answers = greedy_answers(
        model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [p for p, a in zip(prompts, answers, strict=True) if is_refusal(a)]


@torch.no_grad()
def interpolate(model: Any, start: dict[str, Any], end: dict[str, Any], weight: float) -> None:
    """Set `model`'s parameters to lerp(start, end, weight), exact at weights 0 and 1."""
    for name, param in model.named_parameters():
        param.copy_(torch.lerp(start[name], end[name], weight))


def choose(
    tried: Callable[[float], list[str]],
    start: list[str],
    baseline: list[str],
    n: int,
    spacing: float,
    max_rise: float,
    z: float = 0.0,
    top: float = 1.0,
) -> tuple[float, list[dict[str, Any]]]:
    """The largest weight whose refusal rate is at most `max_rise` above the baseline's; 0 (the
    start) when none is, even if the start itself is over the bound. With z > 0 the rise must be
    within the bound even at its upper confidence bound (`paired_rise`): on a few hundred prompts
    a rise of 3 points is within the noise, so a measured rise just under the bound does not show
    that the true one is.

    Args:
        tried: the prompts refused at a weight (never asked for 0, the start).
        start, baseline: the prompts the start and the baseline refuse, of `n` prompts.
        z: the normal quantile of the confidence asked for (0: the measured rise itself).
        top: the largest weight tried (the step's `decay` to the power of the round, less one).
    Returns:
        (the weight, one row per weight tried: weight, k, n, rate, ci95, rise, rise_upper, passed,
        refused).
    """
    rows = []
    for w in weights(spacing, top):
        refused = start if w == 0 else tried(w)
        both = sum((Counter(refused) & Counter(baseline)).values())
        rise, upper = paired_rise(len(refused), len(baseline), both, n, z)
        low, high = wilson(len(refused), n)
        rows.append(
            {"weight": w, "k": len(refused), "n": n, "rate": len(refused) / n, "ci95": [low, high]}
            | {"rise": rise, "rise_upper": upper, "passed": upper <= max_rise + 1e-12}
            | {"refused": refused}
        )
        if rows[-1]["passed"] or w == 0:
            return w, rows
    raise AssertionError("the weights end at 0")  # pragma: no cover
