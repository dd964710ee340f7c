"""The checker's values: the immutable context passes hand on, the checked recipe, and a pass's workspace."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ralign import ir
from ralign import nodes as n
from ralign.errors import Diagnostic, did_you_mean
from ralign.imports import Loaded
from ralign.source import Source, Span

ERROR = "error"  # the type of an expression that already produced a diagnostic
SUGGESTION_BUDGET = 20_000  # name comparisons per pass for "did you mean" hints


@dataclass(frozen=True)
class Symbol:
    """A declaration that a name resolves to."""

    keyword: str  # let / def / reward / template / model / dataset
    qname: str  # "unit-key:name"
    decl: Any
    unit: str


@dataclass(frozen=True)
class TemplateValue:
    """A resolved template: its plan key, text, and where its first line sits in the source."""

    key: str
    text: str
    origin: Span
    lets: Mapping[str, Any] = field(default_factory=dict)  # text constants it reads, by name


@dataclass(frozen=True)
class CheckedStep:
    """One step of a phase, checked: parameters after defaults, and its place in the round's flow."""

    phase: str
    kind: str  # "train sft" for train steps, else the step keyword
    name: str | None
    span: Span
    params: Mapping[str, Any]  # literal values after defaults; references resolved to names
    templates: Mapping[str, str]  # attribute -> template key
    exprs: Mapping[str, ir.Node]  # attribute -> expression
    inputs: tuple[str, ...] = ()  # plan input slots: "prompts", "score:NAME", "policy", ...
    outputs: tuple[str, ...] = ()  # "prompts", "responses", "score:NAME", "pairs", "policy"
    attr_spans: Mapping[str, Span] = field(default_factory=dict, repr=False, compare=False)
    name_span: Span | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Checked:
    """A recipe (or library) that passed every check: resolved, typed, ready to lower."""

    recipe: str
    rounds: int
    seed: int
    policy: str
    models: Mapping[str, Mapping[str, Any]]
    datasets: Mapping[str, Mapping[str, Any]]
    templates: Mapping[str, TemplateValue]
    programs: ir.Programs
    steps: tuple[CheckedStep, ...]
    evaluations: tuple[Mapping[str, Any], ...]
    sources: Mapping[str, Source] = field(repr=False)
    recipe_dir: Path = field(repr=False)
    log_with: tuple[str, ...] = ()  # experiment trackers the recipe asks for
    main: str = ""  # the checked file's unit key
    aliases: Mapping[str, str] = field(default_factory=dict)  # its imports: alias -> unit key


@dataclass(frozen=True)
class Context:
    """What the passes know so far. Each pass returns a new context; none edits one in place."""

    loaded: Loaded
    library: bool
    diagnostics: tuple[Diagnostic, ...] = ()
    sources: Mapping[str, Source] = field(default_factory=dict)
    symbols: Mapping[str, Mapping[str, Symbol]] = field(default_factory=dict)
    cyclic: frozenset[str] = frozenset()
    programs: ir.Programs = ir.EMPTY
    let_types: Mapping[str, str] = field(default_factory=dict)
    def_types: Mapping[tuple[str, tuple[str, ...]], str] = field(default_factory=dict)
    templates: Mapping[str, TemplateValue] = field(default_factory=dict)
    recipe: Mapping[str, Any] = field(default_factory=dict)
    policy: str = ""
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    evaluations: tuple[Mapping[str, Any], ...] = ()
    steps: tuple[CheckedStep, ...] = ()

    @property
    def main(self) -> n.Module:
        return self.loaded.units[self.loaded.main].module

    def decls(self, cls: type) -> list[Any]:
        """The main file's declarations of one node type, in file order."""
        return [d for d in self.main.decls if isinstance(d, cls)]


class Work:
    """One pass's scratch space: diagnostics and working copies, folded into a new context at the end.

    The context between passes is immutable; within a pass, typing expressions and resolving
    templates fill memo tables as they go, which this object holds.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.problems: dict[Diagnostic, None] = {}  # ordered, and O(1) to skip a repeat
        self.sources = dict(ctx.sources)
        self.lets = dict(ctx.programs.lets)
        self.defs = dict(ctx.programs.defs)
        self.rewards = dict(ctx.programs.rewards)
        self.let_types = dict(ctx.let_types)
        self.def_types = dict(ctx.def_types)
        self.templates = dict(ctx.templates)
        self.in_progress: set[str] = set()
        self.let_lengths: dict[str, int | None] = {}  # constant texts' lengths, by let
        self.suggestions_left = SUGGESTION_BUDGET

    def suggest(self, name: str, *pools: Collection[str]) -> str:
        """`did_you_mean` over the pools of known names, until this pass has compared names
        SUGGESTION_BUDGET times: a file with thousands of unknown names is still checked in linear
        time (only the first hundred errors are shown anyway)."""
        self.suggestions_left -= sum(len(p) for p in pools) + 1
        if self.suggestions_left <= 0:
            return ""
        return did_you_mean(name, [k for p in pools for k in p])

    def can_suggest(self) -> bool:
        return self.suggestions_left > 0

    def error(self, span: Span, message: str, notes: tuple[tuple[Span, str], ...] = ()) -> None:
        self.problems.setdefault(Diagnostic(span, message, notes))

    def finish(self, **changes: Any) -> Context:
        """The new context: this pass's diagnostics and tables, plus `changes`."""
        return replace(
            self.ctx,
            diagnostics=self.ctx.diagnostics + tuple(self.problems),
            sources=self.sources,
            programs=ir.Programs(self.lets, self.defs, self.rewards),
            let_types=self.let_types,
            def_types=self.def_types,
            templates=self.templates,
            **changes,
        )


def qualify(unit: str, name: str) -> str:
    return f"{unit}:{name}"
