"""Type expressions and lower them to IR: what `let`, `def`, `rule`, `filter` and `score` hold.

`typed(w, unit, e, scope, context)` returns `(type, node)`; on a problem it reports a diagnostic
and returns the type ERROR (and no node), so one mistake is reported once and not as a cascade.
"""

from __future__ import annotations

from typing import Any

from ralign import ir
from ralign import nodes as n
from ralign.check.context import ERROR, Symbol, Work
from ralign.check.names import lookup
from ralign.rewards import builtins as bi
from ralign.rewards.regex import RegexError
from ralign.rewards.regex import check as check_regex

Typed = tuple[str, Any]  # (type, ir node or None)

CONTEXT_WORDS = {
    "let": "a `let` is a constant: it cannot read `prompt`, `response` or rewards",
    "def": "a def sees only its parameters",
    "filter": "a filter sees only `prompt`",
    "reward": "rules see `prompt` and `response`",
    "score": "score sees `prompt`, `response`, `round`, the round's scores and rewards",
}
FAILED: Typed = (ERROR, None)


def typed(w: Work, unit: str, e: n.Expr, scope: dict[str, str], context: str) -> Typed:
    """The type and IR of an expression, with `scope` the local names and their types."""
    match e:
        case n.Number(value=v):
            return bi.NUMBER, ir.Num(v)
        case n.String(value=v):
            return bi.TEXT, ir.Str(v)
        case n.Bool(value=v):
            return bi.BOOL, ir.Bool(v)
        case n.Regex():
            return _regex(w, e)
        case n.ListExpr():
            return _list(w, unit, e, scope, context)
        case n.MapExpr():
            w.error(e.span, "a map `{ k = v }` is not a value an expression can use")
            return FAILED
        case n.Ref():
            return _ref(w, unit, e, scope, context)
        case n.Call():
            return _call(w, unit, e, scope, context)
        case n.Unary():
            return _unary(w, unit, e, scope, context)
        case n.Binary():
            return _binary(w, unit, e, scope, context)
    w.error(e.span, "this is not an expression")  # pragma: no cover
    return FAILED


def _regex(w: Work, e: n.Regex) -> Typed:
    try:
        check_regex(e.pattern, e.flags)
    except RegexError as exc:
        w.error(e.span, str(exc))
        return FAILED
    return bi.REGEX, ir.Re(e.pattern, "".join(sorted(set(e.flags))))


def _list(w: Work, unit: str, e: n.ListExpr, scope: dict[str, str], context: str) -> Typed:
    items = [typed(w, unit, i, scope, context) for i in e.items]
    types = {t for t, _ in items if t != ERROR}
    if len(types) > 1:
        w.error(
            e.span, f"a list holds one type of item, but this one mixes {', '.join(sorted(types))}"
        )
        return FAILED
    return bi.LIST, ir.ListOf(tuple(node for _, node in items))


def _unary(w: Work, unit: str, e: n.Unary, scope: dict[str, str], context: str) -> Typed:
    t, x = typed(w, unit, e.operand, scope, context)
    want, word, make = (
        (bi.NUMBER, "unary '-' needs a number", ir.Neg)
        if e.op == "-"
        else (bi.BOOL, "`not` needs a bool", ir.Not)
    )
    if t == ERROR:
        return FAILED
    if t != want:
        w.error(e.span, f"{word}, got a {t}")
        return FAILED
    return t, make(x)


def _binary(w: Work, unit: str, e: n.Binary, scope: dict[str, str], context: str) -> Typed:
    ta, a = typed(w, unit, e.left, scope, context)
    tb, b = typed(w, unit, e.right, scope, context)
    if ERROR in (ta, tb):
        return FAILED
    op = e.op
    if op in ("==", "!="):
        if ta != tb or ta not in (bi.NUMBER, bi.TEXT, bi.BOOL):
            w.error(
                e.span,
                f"`{op}` compares two numbers, texts or bools of the same type, not a {ta} and a {tb}",
            )
            return FAILED
        return bi.BOOL, ir.Bin(op, a, b)
    if op == "+" and ta == tb == bi.TEXT:
        return _concat(w, e, a, b)
    if op in ("and", "or"):
        want, result, need = bi.BOOL, bi.BOOL, "a bool"
    else:
        want, need = bi.NUMBER, "a number"
        result = bi.BOOL if op in ir.COMPARISONS else bi.NUMBER
    for t, side in ((ta, e.left), (tb, e.right)):
        if t != want:
            w.error(side.span, f"`{op}` needs {need} on each side, but this is a {t}")
            return FAILED
    return result, ir.Bin(op, a, b)


def _concat(w: Work, e: n.Binary, a: ir.Node, b: ir.Node) -> Typed:
    """`text + text`; a constant text (lets included) longer than MAX_TEXT is refused here."""
    node = ir.Bin("++", a, b)
    size = constant_length(w, node)
    if size is not None and size > bi.MAX_TEXT:
        w.error(
            e.span,
            f"this text would be {size:,} characters long; texts are limited to {bi.MAX_TEXT:,}",
        )
        return FAILED
    return bi.TEXT, node


def constant_length(w: Work, node: ir.Node) -> int | None:
    """The length of a text that reads nothing from a record (literals, lets, `+`), else None."""
    match node:
        case ir.Str(value=v):
            return len(v)
        case ir.LetRef(qname=q) if q in w.lets:
            if q not in w.let_lengths:  # memoised: `let b = a + a` reads `a` twice
                w.let_lengths[q] = constant_length(w, w.lets[q])
            return w.let_lengths[q]
        case ir.Bin(op="++", left=a, right=b):
            left, right = constant_length(w, a), constant_length(w, b)
            return None if left is None or right is None else left + right
    return None


def _ref(w: Work, unit: str, e: n.Ref, scope: dict[str, str], context: str) -> Typed:
    if len(e.parts) == 1 and e.parts[0] in scope:
        return scope[e.parts[0]], ir.Var(e.parts[0])
    found = lookup(w.ctx, unit, e, scope, w.suggest)
    if isinstance(found, str):
        name = e.parts[0]
        if len(e.parts) == 1 and name in bi.BUILTINS:
            found = f"'{name}' is a builtin function; call it: {bi.signature(bi.BUILTINS[name])}"
        elif len(e.parts) == 1 and name in ("prompt", "response"):
            found = f"'{name}' is not available here ({CONTEXT_WORDS[context]})"
        elif len(e.parts) == 1 and name == ir.ROUND:
            found = f"'{name}' is not available here: only a `score` step's expressions read the round number"
        w.error(e.span, found)
        return FAILED
    if found.keyword == "let":
        t = let_type(w, found)
        return (t, ir.LetRef(found.qname)) if t != ERROR else FAILED
    if found.keyword == "reward":
        if context in ("let", "filter"):
            w.error(
                e.span,
                f"reward '{e.dotted}' scores an answer, so it cannot be used here ({CONTEXT_WORDS[context]})",
            )
            return FAILED
        return bi.NUMBER, ir.RewardRef(found.qname)
    if found.keyword == "def":
        params = ", ".join(found.decl.params)
        w.error(e.span, f"'{e.dotted}' is a def; call it with its arguments: {e.dotted}({params})")
        return FAILED
    w.error(e.span, f"'{e.dotted}' is a {found.keyword}, not a value an expression can use")
    return FAILED


def constant_value(w: Work, node: Any) -> Any:
    """The value of a number or list of numbers that reads nothing from a record (lets included),
    as the interpreter would compute it, else None."""
    match node:
        case ir.Num(value=v):
            return float(v)
        case ir.Str(value=v) | ir.Bool(value=v):
            return v
        case ir.Neg(operand=x):
            v = constant_value(w, x)
            return -v if isinstance(v, float) else None
        case ir.ListOf(items=xs):
            values = [constant_value(w, x) for x in xs]
            return None if any(v is None for v in values) else values
        case ir.LetRef(qname=q) if q in w.lets:
            return constant_value(w, w.lets[q])
    return None


def _call(w: Work, unit: str, e: n.Call, scope: dict[str, str], context: str) -> Typed:
    args = [typed(w, unit, a, scope, context) for a in e.args]
    types = [t for t, _ in args]
    nodes = tuple(node for _, node in args)
    fname = e.func.dotted
    if fname == "agree":
        return _agree(w, e, types, nodes, context)
    if fname == "file":
        w.error(e.span, 'file("...") names a template file; it is not an expression value')
        return FAILED
    if len(e.func.parts) == 1 and fname in bi.BUILTINS and fname not in w.ctx.symbols[unit]:
        if ERROR in types:
            return FAILED
        builtin = bi.BUILTINS[fname]
        result, message = bi.check_call(builtin, types)
        if not message and builtin.check_args:  # e.g. a probe's weights, when they are constant
            problem = builtin.check_args(tuple(constant_value(w, node) for node in nodes))
            message = f"{fname}(): {problem}" if problem else None
        if message or result is None:
            w.error(e.span, message or fname)
            return FAILED
        return result, ir.If(*nodes) if fname == "if" else ir.Call(fname, nodes)
    found = lookup(w.ctx, unit, e.func, scope, w.suggest)
    if isinstance(found, str):
        if len(e.func.parts) == 1:
            table = w.ctx.symbols[unit]
            defs = [s for s, v in table.items() if v.keyword == "def"] if w.can_suggest() else []
            found = f"unknown function '{fname}'{w.suggest(fname, bi.BUILTINS, defs, ['agree'])}"
        w.error(e.func.span, found)
        return FAILED
    return _def_call(w, e, found, types, nodes, context)


def _agree(w: Work, e: n.Call, types: list[str], nodes: tuple[Any, ...], context: str) -> Typed:
    if context != "score":
        w.error(e.func.span, "agree(...) combines scores, so it belongs in a `score` step")
        return FAILED
    if len(types) < 2:
        w.error(
            e.span,
            f"agree() needs at least two sources to weigh against each other, got {len(types)}",
        )
        return FAILED
    for t, a in zip(types, e.args, strict=True):
        if t not in (bi.NUMBER, ERROR):
            w.error(a.span, f"each source of agree() must be a number, got a {t}")
            return FAILED
    return FAILED if ERROR in types else (bi.NUMBER, ir.Agree(nodes))


def _def_call(
    w: Work, e: n.Call, found: Symbol, types: list[str], nodes: tuple[Any, ...], context: str
) -> Typed:
    fname = e.func.dotted
    if found.keyword != "def":
        w.error(e.func.span, f"'{fname}' is a {found.keyword}, not a function")
        return FAILED
    params = found.decl.params
    if len(params) != len(types):
        w.error(
            e.span,
            f"{fname}() takes {len(params)} argument{'s' if len(params) != 1 else ''} ({', '.join(params)}), got {len(types)}",
        )
        return FAILED
    if ERROR in types or found.qname in w.ctx.cyclic:
        return FAILED
    result = def_type(w, found, tuple(types))
    if context in ("let", "filter") and result != ERROR and reads_reward(w, found.qname):
        w.error(
            e.span,
            f"{fname}() reads a reward, which scores an answer, so it cannot be used here ({CONTEXT_WORDS[context]})",
        )
        return FAILED
    return result, ir.DefCall(found.qname, nodes)


def let_type(w: Work, sym: Symbol) -> str:
    """A let's type (typing it, and lowering it into `w.lets`, on first use)."""
    if sym.qname in w.let_types:
        return w.let_types[sym.qname]
    if sym.qname in w.ctx.cyclic or sym.qname in w.in_progress:
        return ERROR
    w.in_progress.add(sym.qname)
    t, node = typed(w, sym.unit, sym.decl.value, {}, "let")
    w.in_progress.discard(sym.qname)
    w.let_types[sym.qname] = t
    if node is not None:
        w.lets[sym.qname] = node
    return t


def def_type(w: Work, sym: Symbol, types: tuple[str, ...]) -> str:
    """A def's result type for these argument types (its body is typed once per signature)."""
    key = (sym.qname, types)
    if key not in w.def_types:
        w.def_types[key] = ERROR  # guards against cycles the recursion pass already reported
        scope = dict(zip(sym.decl.params, types, strict=True))
        t, body = typed(w, sym.unit, sym.decl.body, scope, "def")
        w.def_types[key] = t
        if t != ERROR:
            w.defs[sym.qname] = ir.Def(tuple(sym.decl.params), body)
    return w.def_types[key]


def reads_reward(w: Work, qname: str) -> bool:
    """Whether a def's body reaches a reward, directly or through other defs."""
    body = w.defs[qname].body if qname in w.defs else None
    programs = ir.Programs(w.lets, w.defs, w.rewards)
    return body is not None and any(
        isinstance(node, ir.RewardRef) for node in ir.reach(programs, (body,))
    )
