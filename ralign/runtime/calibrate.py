"""Calibration: how far a round moves the policy, chosen on held-out harmless prompts.

The trained weights are interpolated with the round's starting ones, W0 + s (W1 - W0) (WiSE-FT,
Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"), and the largest weight s whose
refusals of harmless prompts stay within a bound of the start's is kept (and, if asked, whose
hedges on them: "I'm not sure." to a question it can answer). Why: trained policies of
the same recipe with different seeds tell harmful from harmless requests apart about equally well
but draw the line in different places (docs/results.md, "the refusal ROC"); the weight moves the
line without retraining.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ralign.errors import DataError
from ralign.runtime.behavior import RATES, greedy_answers, verdict
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


def verdicts(
    model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int
) -> dict[str, list[str]]:
    """The prompts the model refuses, and those it hedges on (admits not knowing without refusing:
    the behaviour evaluation's needless hedging), from its greedy answers."""
    answers = greedy_answers(
        model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    said = [verdict(a) for a in answers]
    hedges = RATES["needless_hedging_rate"].counts
    return {
        "refused": [p for p, r in zip(prompts, said, strict=True) if r["refused"]],
        "hedged": [p for p, r in zip(prompts, said, strict=True) if hedges(r)],
    }


@torch.no_grad()
def interpolate(model: Any, start: dict[str, Any], end: dict[str, Any], weight: float) -> None:
    """Set `model`'s parameters to lerp(start, end, weight), exact at weights 0 and 1."""
    for name, param in model.named_parameters():
        param.copy_(torch.lerp(start[name], end[name], weight))


def choose(
    tried: Callable[[float], Mapping[str, list[str]]],
    start: Mapping[str, list[str]],
    baseline: Mapping[str, list[str]],
    n: int,
    spacing: float,
    max_rise: Mapping[str, float],
    z: float = 0.0,
    top: float = 1.0,
) -> tuple[float, list[dict[str, Any]]]:
    """The largest weight at which every count (refusals, hedges) is at most its `max_rise` above
    the baseline's; 0 (the start) when none is, even if the start itself is over a bound. A bound
    of 1 or more bounds nothing. With z > 0 each rise must be within its bound even at its upper
    confidence bound (`paired_rise`): on a few hundred prompts a rise of 3 points is within the
    noise, so a measured rise just under the bound does not show that the true one is.

    Args:
        tried: the prompts flagged at a weight, by count name (never asked for 0, the start).
        start, baseline: the prompts the start and the baseline flag, by count name, of `n` prompts.
        max_rise: the rise allowed, by count name; the counts checked.
        z: the normal quantile of the confidence asked for (0: the measured rise itself).
        top: the largest weight tried (the step's `decay` to the power of the round, less one).
    Returns:
        (the weight, one row per weight tried: weight, passed, and per count: k, n, rate, ci95,
        rise, rise_upper, passed, prompts).
    """
    rows: list[dict[str, Any]] = []
    for w in weights(spacing, top):
        flagged = start if w == 0 else tried(w)
        row: dict[str, Any] = {"weight": w}
        for name, bound in max_rise.items():
            got, base = flagged[name], baseline[name]
            both = sum((Counter(got) & Counter(base)).values())
            rise, upper = paired_rise(len(got), len(base), both, n, z)
            low, high = wilson(len(got), n)
            row[name] = {"k": len(got), "n": n, "rate": len(got) / n, "ci95": [low, high]} | {
                "rise": rise,
                "rise_upper": upper,
                "passed": bound >= 1 or upper <= bound + 1e-12,
                "prompts": got,
            }
        row["passed"] = all(row[name]["passed"] for name in max_rise)
        rows.append(row)
        if row["passed"] or w == 0:
            return w, rows
    raise AssertionError("the weights end at 0")  # pragma: no cover
