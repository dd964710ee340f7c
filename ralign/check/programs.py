"""Pass `expressions`: type every let, def, reward and template declaration, and lower them to IR."""

from __future__ import annotations

from ralign import ir
from ralign import nodes as n
from ralign.check.context import ERROR, Context, Symbol, Work
from ralign.check.exprs import CONTEXT_WORDS, let_type, typed
from ralign.check.names import lookup
from ralign.check.templates import template_value
from ralign.rewards import builtins as bi
from ralign.source import Span


def expressions(ctx: Context) -> Context:
    """Lets and rewards are typed now; a def's names now and its types at each call, with the
    arguments' types; template declarations are parsed and vetted."""
    w = Work(ctx)
    for unit in ctx.loaded.units.values():
        for sym in ctx.symbols[unit.key].values():
            if sym.qname in ctx.cyclic:
                continue
            CHECKS.get(sym.keyword, _nothing)(w, sym)
    return w.finish()


def _nothing(w: Work, sym: Symbol) -> None:
    """Models and datasets are checked with the recipe's declarations."""


def _let(w: Work, sym: Symbol) -> None:
    let_type(w, sym)


def _def(w: Work, sym: Symbol) -> None:
    params = sym.decl.params
    if len(set(params)) != len(params):
        twice = sorted({p for p in params if params.count(p) > 1})
        w.error(sym.decl.span, f"def '{sym.decl.name}' names the parameter '{twice[0]}' twice")
    scope = dict.fromkeys(params, ERROR)
    for ref in n.refs([sym.decl.body]):
        if len(ref.parts) == 1 and ref.parts[0] in scope:
            continue
        if _is_call_target(sym.decl.body, ref):
            continue
        found = lookup(w.ctx, sym.unit, ref, scope, w.suggest)
        if isinstance(found, str):
            if len(ref.parts) == 1 and ref.parts[0] in ("prompt", "response"):
                found = f"'{ref.parts[0]}' is not available here ({CONTEXT_WORDS['def']}; pass it as an argument)"
            w.error(ref.span, found)


def _reward(w: Work, sym: Symbol) -> None:
    rules = []
    seen: dict[str, Span] = {}
    scope = {"prompt": bi.TEXT, "response": bi.TEXT}
    for rule in sym.decl.rules:
        if rule.name in seen:
            w.error(
                rule.span,
                f"rule '{rule.name}' is already defined in reward '{sym.decl.name}'",
                ((seen[rule.name], "first defined here"),),
            )
        seen[rule.name] = rule.span
        vt, value = typed(w, sym.unit, rule.value, scope, "reward")
        if vt not in (bi.NUMBER, ERROR):
            w.error(
                rule.value.span,
                f"the value of rule '{rule.name}' must be a number, but this is a {vt}",
            )
        when = None
        if rule.when is not None:
            wt, when = typed(w, sym.unit, rule.when, scope, "reward")
            if wt not in (bi.BOOL, ERROR):
                w.error(
                    rule.when.span,
                    f"the `when` condition of rule '{rule.name}' must be a bool, but this is a {wt} "
                    f"(compare it, e.g. `... > 0`)",
                )
        if value is not None and (rule.when is None or when is not None):
            rules.append(ir.Rule(rule.name, value, when, rule.span.line))
    w.rewards[sym.qname] = ir.Reward(tuple(rules))


def _template(w: Work, sym: Symbol) -> None:
    w.in_progress.add(sym.qname)
    template_value(w, w.ctx.loaded.units[sym.unit], sym.decl.value, sym.qname)
    w.in_progress.discard(sym.qname)


CHECKS = {"let": _let, "def": _def, "reward": _reward, "template": _template}


def _is_call_target(body: n.Expr, ref: n.Ref) -> bool:
    """Whether `ref` is the function of a call to a builtin or `agree` in `body`."""
    stack = [body]
    while stack:
        e = stack.pop()
        if isinstance(e, n.Call) and e.func is ref:
            return ref.dotted in bi.BUILTINS or ref.dotted == "agree"
        stack.extend(n.children(e))
    return False
