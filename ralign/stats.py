"""Proportions with intervals: light (no torch), shared by the evaluations, benches and reports."""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (k may be fractional when ties count half)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(k: float, n: int) -> dict[str, Any]:
    """k/n as a reported figure: value, 95% Wilson interval, and the counts it came from."""
    return {"value": k / n if n else float("nan"), "ci95": list(wilson(k, n)), "k": k, "n": n}


def paired_rise(refused: int, baseline: int, both: int, n: int, z: float) -> tuple[float, float]:
    """How much more often one model refuses than another on the same n prompts: the difference
    of the two rates and its upper confidence bound at normal quantile z (Newcombe 1998, "Improved
    confidence intervals for the difference between binomial proportions based on paired data",
    method 10: Wilson intervals of each rate, combined with the pairs' correlation). Pairing
    matters: two models that refuse mostly the same prompts differ by much less noise than two
    independent samples. z = 0 gives the difference itself.

    Args:
        refused, baseline: the prompts each model refuses; both: those refused by both.
    """
    a, b, c = both, refused - both, baseline - both
    d = n - a - b - c
    p1, p2 = refused / n, baseline / n
    _, u1 = wilson(refused, n, z)
    l2, _ = wilson(baseline, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    up, down = u1 - p1, p2 - l2
    return p1 - p2, p1 - p2 + math.sqrt(max(0.0, up * up - 2 * phi * up * down + down * down))


def paired_difference(
    a: int, b: int, both: int, n: int, z: float = Z95
) -> tuple[float, float, float]:
    """The difference of two rates counted on the same n items (a/n - b/n) and its two-sided
    interval at normal quantile z: each side is `paired_rise` with the roles swapped.

    Args:
        a, b: the items each side counts; both: those counted by both.
    Returns:
        (difference, low, high).
    """
    diff, high = paired_rise(a, b, both, n, z)
    _, reverse_high = paired_rise(b, a, both, n, z)
    return diff, -reverse_high, high
