"""One error base for everything ralign reports to a user; each kind knows how to point at its cause."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

from ralign.source import Source, Span, excerpt


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`"; did you mean 'x'?"` when some known name is close to `name`, else `""`."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a recipe: where, what, and optional notes pointing elsewhere."""

    span: Span
    message: str
    notes: tuple[tuple[Span, str], ...] = ()

    def render(self, sources: dict[str, Source] | None = None) -> str:
        out = [f"{self.span}: error: {self.message}"]
        src = (sources or {}).get(self.span.file)
        if src is not None:
            ex = excerpt(src, self.span)
            if ex:
                out.append(ex)
        for span, note in self.notes:
            out.append(f"{span}: note: {note}")
            src = (sources or {}).get(span.file)
            if src is not None:
                ex = excerpt(src, span)
                if ex:
                    out.append(ex)
        return "\n".join(out)


MAX_SHOWN = 100  # diagnostics printed in full; the rest are counted


class RalignError(Exception):
    """Base of every error ralign reports; `str()` is what the user sees."""

    exit_code = 1


@dataclass
class RecipeError(RalignError):
    """One or more diagnostics in recipe files (parse or check); all of a file's problems at once."""

    diagnostics: list[Diagnostic]
    sources: dict[str, Source] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        ordered = sorted(self.diagnostics, key=lambda d: (d.span.file, d.span.line, d.span.column))
        shown = [d.render(self.sources) for d in ordered[:MAX_SHOWN]]
        n = len(ordered)
        if n > MAX_SHOWN:
            shown.append(f"... and {n - MAX_SHOWN:,} more (only the first {MAX_SHOWN} are shown)")
        return "\n".join(shown) + f"\n{n:,} error{'s' if n != 1 else ''}"


class TemplateError(RalignError):
    """A template failed to render (sandbox violation, undefined variable, output too large)."""


class DataError(RalignError):
    """Bad input data: names the file and record."""


class StepError(RalignError):
    """A runtime step failed: names the step and its recipe line."""


class UsageError(RalignError):
    """Wrong command-line usage."""

    exit_code = 2
