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
