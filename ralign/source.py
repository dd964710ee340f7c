"""Source files and spans: where every node, diagnostic and plan step points back to."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """A recipe or library file: its display name (relative, for messages and plans), path and text."""

    name: str
    text: str
    path: Path | None = None

    @classmethod
    def read(cls, path: Path, name: str | None = None) -> Source:
        text = path.read_text(encoding="utf-8")
        return cls(name=name or path.name, text=text, path=path)

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")  # as the parser counts lines (not at form feeds or U+2028)

    def line(self, n: int) -> str:
        return self.lines[n - 1] if 1 <= n <= len(self.lines) else ""


@dataclass(frozen=True)
class Span:
    """A 1-based position in a source file; `end_*` are inclusive-exclusive like Lark's."""

    file: str
    line: int
    column: int
    end_line: int = 0
    end_column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "column": self.column}


def excerpt(source: Source, span: Span) -> str:
    """The source line of `span` with a caret under its column (and tildes to its end on one line)."""
    text = source.line(span.line)
    if not text:
        return ""
    width = 1
    if span.end_line == span.line and span.end_column > span.column:
        width = span.end_column - span.column
    width = max(1, min(width, len(text) - span.column + 1))
    gutter = f"{span.line:>4} | "
    return f"{gutter}{text}\n{' ' * (len(gutter) + span.column - 1)}^{'~' * (width - 1)}"
