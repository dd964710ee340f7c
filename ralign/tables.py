"""Plain-text tables for the terminal: the run summary, `ralign eval` and the benchmarks print with this."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cell(value: Any, digits: int = 3) -> str:
    """A value as a table cell: floats to `digits` places, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def text_table(
    head: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1, rule: bool = True
) -> str:
    """Columns padded to their widest cell: the first `left` columns left-aligned, the rest right.

    Args:
        head: column titles.
        rows: one sequence of values per row (formatted with `cell`).
        left: how many leading columns are text (left-aligned).
        rule: draw a line of dashes under the titles.
    """
    cells = [list(head), *([cell(v) for v in r] for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]

    def line(row: list[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if rule:
        out.append("  ".join("-" * w for w in widths))
    return "\n".join(out + [line(r) for r in cells[1:]])
