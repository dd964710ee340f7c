"""Attribute values against the schema: types, ranges, choices, names, templates and expressions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ralign import nodes as n
from ralign import schema as sc
from ralign.check.context import ERROR, Work
from ralign.check.exprs import typed
from ralign.check.names import lookup
from ralign.check.templates import template_value
from ralign.imports import Unit
from ralign.ir import ROUND
from ralign.rewards import builtins as bi
from ralign.source import Span

BAD = object()  # an attribute value that already produced a diagnostic


def check_attrs(
    w: Work,
    unit: Unit,
    attrs: tuple[n.Attr, ...],
    spec: Mapping[str, sc.Attr],
    what: str,
    where: Span,
    *,
    scores: tuple[str, ...] | None = None,
    open_type: str | None = None,
) -> dict[str, Any]:
    """Check attributes against `spec`; returns name -> checked value, defaults filled.

    Args:
        scores: the round's scores so far (names a `score` expression may read), or None outside
            a round (an `evaluate` block: its expressions read neither scores nor `round`).
        open_type: the type of attributes `spec` does not list (None: they are errors).
    """
    out: dict[str, Any] = {}
    seen: dict[str, Span] = {}
    for attr in attrs:
        if attr.name in seen:
            w.error(
                attr.span,
                f"'{attr.name}' is set twice in this {what}",
                ((seen[attr.name], "first set here"),),
            )
            continue
        seen[attr.name] = attr.span
        rule = spec.get(attr.name) or (sc.Attr(open_type, "") if open_type else None)
        if rule is None:
            known = ", ".join(spec) or "none"
            w.error(
                attr.span,
                f"unknown attribute '{attr.name}' for {what}{w.suggest(attr.name, spec)} (it takes: {known})",
            )
            continue
        value = attr_value(w, unit, attr, rule, f"`{attr.name}` of {what}", scores)
        if value is not BAD:
            out[attr.name] = value
    for name, rule in spec.items():
        if name in seen:
            continue
        exempt = (
            bool(rule.required_unless)
            and out.get(rule.required_unless[0]) == rule.required_unless[1]
        )
        if rule.required and not exempt:
            w.error(where, f"{what} needs `{name}` ({rule.doc})")
        elif rule.default is not None:
            out[name] = rule.default
    return out


def attr_value(
    w: Work, unit: Unit, attr: n.Attr, rule: sc.Attr, label: str, scores: tuple[str, ...] | None
) -> Any:
    """One attribute's checked value, or BAD after reporting why not."""
    return VALUE_CHECKS[rule.type](w, unit, attr.value, rule, label, scores)


ValueCheck = Callable[[Work, Unit, n.Expr, sc.Attr, str, tuple[str, ...] | None], Any]
VALUE_CHECKS: dict[str, ValueCheck] = {}


def value_check(*types: str) -> Callable[[ValueCheck], ValueCheck]:
    """Register the check of attribute values of `types`."""

    def register(fn: ValueCheck) -> ValueCheck:
        for t in types:
            VALUE_CHECKS[t] = fn
        return fn

    return register


@value_check(sc.INT, sc.NUMBER)
def _number(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    num = literal_number(v)
    if num is None or (rule.type == sc.INT and not float(num).is_integer()):
        w.error(
            v.span, f"{label} must be {'a whole number' if rule.type == sc.INT else 'a number'}"
        )
        return BAD
    low_bad = rule.min is not None and (num <= rule.min if rule.min_open else num < rule.min)
    high_bad = rule.max is not None and num > rule.max
    if low_bad or high_bad:
        bound = []
        if rule.min is not None:
            bound.append(f"{'>' if rule.min_open else '>='} {_fmt(rule.min)}")
        if rule.max is not None:
            bound.append(f"<= {_fmt(rule.max)}")
        w.error(v.span, f"{label} must be {' and '.join(bound)}, got {_fmt(num)}")
        return BAD
    return int(num) if rule.type == sc.INT else float(num)


@value_check(sc.STRING)
def _string(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    if not isinstance(v, n.String):
        listed = f" (one of: {', '.join(rule.choices)})" if rule.choices else ""
        w.error(v.span, f"{label} must be a string{listed}")
        return BAD
    if rule.choices and v.value not in rule.choices:
        w.error(
            v.span,
            f"{label} must be one of {', '.join(repr(c) for c in rule.choices)}, got {v.value!r}{w.suggest(v.value, rule.choices)}",
        )
        return BAD
    return v.value


@value_check(sc.BOOL)
def _bool(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    if not isinstance(v, n.Bool):
        w.error(v.span, f"{label} must be true or false")
        return BAD
    return v.value


@value_check(sc.MODEL, sc.DATASET)
def _declared(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    return declared(w, unit, v, rule.type, label)


@value_check(sc.DATA)
def _data(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    if isinstance(v, n.String):
        return {"path": v.value}
    name = declared(w, unit, v, sc.DATASET, label)
    return BAD if name is BAD else {"dataset": name}


@value_check(sc.TEMPLATE)
def _template(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    tv = template_value(w, unit, v)
    return BAD if tv is None else tv.key


@value_check(sc.STRINGS)
def _strings(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    # One string stays one string, so the plans of recipes that give one keep their hash.
    if isinstance(v, n.String):
        return v.value
    if isinstance(v, n.ListExpr) and v.items and all(isinstance(i, n.String) for i in v.items):
        return [str(i.value) for i in v.items]  # type: ignore[union-attr]
    w.error(v.span, f"{label} must be a string or a non-empty list of strings")
    return BAD


@value_check(sc.TEXTS)
def _texts(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    texts = literal_texts(w, unit, v, label)
    return BAD if texts is None else texts


@value_check(sc.LORA)
def _lora(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    if not isinstance(v, n.MapExpr):
        w.error(v.span, f"{label} must be a map like {{ rank = 16, alpha = 32 }}")
        return BAD
    lora = check_attrs(w, unit, v.entries, sc.LORA_ATTRS, "lora", v.span)
    targets = lora.get("targets")
    if isinstance(targets, list) and "all-linear" in targets and len(targets) > 1:
        at = next(e.value.span for e in v.entries if e.name == "targets")
        w.error(at, '"all-linear" already names every linear layer: give it alone')
    return lora


@value_check(sc.EXPR_BOOL, sc.EXPR_NUMBER)
def _expression(
    w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: tuple[str, ...] | None
) -> Any:
    if rule.type == sc.EXPR_BOOL:
        context, want, scope = "filter", bi.BOOL, {"prompt": bi.TEXT}
    else:
        context, want = "score", bi.NUMBER
        scope = {"prompt": bi.TEXT, "response": bi.TEXT}
        if scores is not None:  # in a round: its number and the scores made so far
            scope.update({ROUND: bi.NUMBER, **dict.fromkeys(scores, bi.NUMBER)})
    t, node = typed(w, unit.key, v, scope, context)
    if t not in (want, ERROR):
        w.error(v.span, f"{label} must be a {want} expression, but this is a {t}")
        return BAD
    return BAD if t == ERROR else {"expr": node}


def declared(w: Work, unit: Unit, v: n.Expr, keyword: str, label: str) -> Any:
    """The name of a model or dataset the recipe declares, or BAD."""
    if not isinstance(v, n.Ref) or len(v.parts) != 1:
        w.error(v.span, f"{label} must name a {keyword} declared in the recipe")
        return BAD
    found = w.ctx.symbols[unit.key].get(v.parts[0])
    if found is None or found.keyword != keyword:
        table = w.ctx.symbols[unit.key]
        known = [s for s, sym in table.items() if sym.keyword == keyword] if w.can_suggest() else []
        what = (
            f"'{v.parts[0]}' is a {found.keyword}, not a {keyword}"
            if found
            else f"unknown {keyword} '{v.parts[0]}'"
        )
        w.error(v.span, f"{what}{w.suggest(v.parts[0], known)}")
        return BAD
    return v.parts[0]


def literal_texts(w: Work, unit: Unit, v: n.Expr, label: str) -> list[str] | None:
    """A non-empty list of string literals, written out or through a let."""
    if isinstance(v, n.Ref):
        found = lookup(w.ctx, unit.key, v, None, w.suggest)
        if isinstance(found, str):
            w.error(v.span, found)
            return None
        if found.keyword != "let":
            w.error(v.span, f"{label} must be a list of texts; '{v.dotted}' is a {found.keyword}")
            return None
        if found.qname in w.ctx.cyclic or found.qname in w.in_progress:
            return None  # the cycle is reported at the let
        w.in_progress.add(found.qname)
        try:
            return literal_texts(w, w.ctx.loaded.units[found.unit], found.decl.value, label)
        finally:
            w.in_progress.discard(found.qname)
    if isinstance(v, n.ListExpr) and v.items and all(isinstance(i, n.String) for i in v.items):
        return [str(i.value) for i in v.items]  # type: ignore[union-attr]
    w.error(v.span, f"{label} must be a non-empty list of strings")
    return None


def literal_number(v: n.Expr) -> float | None:
    if isinstance(v, n.Number):
        return v.value
    if isinstance(v, n.Unary) and v.op == "-" and isinstance(v.operand, n.Number):
        return -v.operand.value
    return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)
