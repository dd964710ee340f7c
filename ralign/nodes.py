"""The recipe AST: immutable typed nodes, each with the span it came from."""

from __future__ import annotations

from dataclasses import dataclass

from ralign.source import Span

# ---- expressions -------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    span: Span
    value: float


@dataclass(frozen=True)
class String:
    span: Span
    value: str
    long: bool = False  # written as """...""" (raw, multi-line)


@dataclass(frozen=True)
class Bool:
    span: Span
    value: bool


@dataclass(frozen=True)
class Regex:
    span: Span
    pattern: str
    flags: str


@dataclass(frozen=True)
class Ref:
    """A name, possibly dotted (`alias.name`)."""

    span: Span
    parts: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Call:
    span: Span
    func: Ref
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Unary:
    span: Span
    op: str  # "-" or "not"
    operand: Expr


@dataclass(frozen=True)
class Binary:
    span: Span
    op: str  # + - * / < <= > >= == != and or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class ListExpr:
    span: Span
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class MapExpr:
    span: Span
    entries: tuple[Attr, ...]


Expr = Number | String | Bool | Regex | Ref | Call | Unary | Binary | ListExpr | MapExpr


@dataclass(frozen=True)
class Attr:
    span: Span  # the attribute's name
    name: str
    value: Expr


# ---- declarations --------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    span: Span
    name: str
    attrs: tuple[Attr, ...]


@dataclass(frozen=True)
class Import:
    span: Span
    path: str
    path_span: Span
    alias: str | None


@dataclass(frozen=True)
class Model:
    span: Span
    name: str
    attrs: tuple[Attr, ...]


@dataclass(frozen=True)
class Dataset:
    span: Span
    name: str
    attrs: tuple[Attr, ...]


@dataclass(frozen=True)
class Template:
    span: Span
    name: str
    value: Expr


@dataclass(frozen=True)
class Let:
    span: Span
    name: str
    value: Expr


@dataclass(frozen=True)
class Def:
    span: Span
    name: str
    params: tuple[str, ...]
    body: Expr


@dataclass(frozen=True)
class Rule:
    span: Span
    name: str
    value: Expr
    when: Expr | None


@dataclass(frozen=True)
class Reward:
    span: Span
    name: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Step:
    span: Span
    kind: str
    name: str | None
    attrs: tuple[Attr, ...]
    name_span: Span | None = None


@dataclass(frozen=True)
class Phase:
    span: Span
    name: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Evaluate:
    span: Span
    name: str
    attrs: tuple[Attr, ...]


Decl = Recipe | Import | Model | Dataset | Template | Let | Def | Reward | Phase | Evaluate


@dataclass(frozen=True)
class Module:
    """One parsed file."""

    file: str
    decls: tuple[Decl, ...]


def children(e: Expr) -> tuple[Expr, ...]:
    """The direct sub-expressions of an expression (a call's function name included)."""
    match e:
        case Call(func=f, args=a):
            return (f, *a)
        case Unary(operand=x):
            return (x,)
        case Binary(left=a, right=b):
            return (a, b)
        case ListExpr(items=items):
            return items
        case MapExpr(entries=entries):
            return tuple(a.value for a in entries)
    return ()


def refs(exprs: tuple[Expr, ...] | list[Expr]) -> list[Ref]:
    """Every name the expressions mention, called functions included (iterative: no depth limit)."""
    out: list[Ref] = []
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if isinstance(e, Ref):
            out.append(e)
        stack.extend(children(e))
    return out


def bodies(decl: object) -> list[Expr]:
    """The expressions of a let, def or reward (nothing for other declarations)."""
    if isinstance(decl, Let):
        return [decl.value]
    if isinstance(decl, Def):
        return [decl.body]
    if isinstance(decl, Reward):
        return [e for r in decl.rules for e in (r.value, r.when) if e is not None]
    return []
