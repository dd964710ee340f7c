"""Interpret reward expressions: each IR node becomes a small closure, and records are scored through them.

No eval/exec: a node compiles to a closure over its children's closures, chosen by the node's type
from one table, and every call goes through the fixed builtin table. Lets are constants folded
once; def calls and reward values are memoised per record, since detectors repeat. Text values are
bounded (`MAX_TEXT`), so a reward cannot exhaust memory by doubling a text.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ralign import ir
from ralign.errors import RalignError
from ralign.rewards.builtins import BUILTINS, MAX_TEXT
from ralign.rewards.regex import compile_regex

Record = dict[str, Any]  # prompt, response, score values; "_memo" is the interpreter's
Fn = Callable[[Record, tuple[Any, ...]], Any]
Params = dict[str, int]  # a def's parameter names -> argument slots

_MISSING = object()  # a memo miss (None may be a memoised value)


class EvalError(RalignError):
    """A reward expression could not be evaluated (a text grew past MAX_TEXT, or a malformed plan)."""


@dataclass(frozen=True)
class Scored:
    """The values of a number expression over a batch, and the weights each `agree(...)` chose.

    `agree_weights` has one list per `agree` node of the expression, in source order.
    """

    values: list[float]
    agree_weights: list[list[float]]
    agree_means: list[list[float]] = field(default_factory=list)  # each source's own mean


def _concat(a: Any, b: Any) -> str:
    if len(a) + len(b) > MAX_TEXT:
        raise EvalError(
            f"a text would grow to {len(a) + len(b):,} characters (reward texts are limited to {MAX_TEXT:,})"
        )
    return a + b


def _divide(x: float, y: float) -> float:
    return x / y if y != 0 else 0.0  # total: x / 0 is 0


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "++": _concat,
    "-": operator.sub,
    "*": operator.mul,
    "/": _divide,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def _memo_of(rec: Record) -> dict[Any, Any]:
    memo = rec.get("_memo")
    if memo is None:
        memo = rec["_memo"] = {}
    return memo


def _key_part(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


# ---- one compiler per node type -------------------------------------------------------------

Compiler = Callable[["Programs", Any, Params | None], Fn]
COMPILERS: dict[type, Compiler] = {}


def compiles(*types: type) -> Callable[[Compiler], Compiler]:
    """Register the function that turns nodes of `types` into closures."""

    def register(fn: Compiler) -> Compiler:
        for t in types:
            COMPILERS[t] = fn
        return fn

    return register


@compiles(ir.Num, ir.Str, ir.Bool, ir.Re, ir.LetRef)
def _constant_node(progs: Programs, node: Any, params: Params | None) -> Fn:
    value = progs.constant(node)
    return lambda rec, args: value


@compiles(ir.ListOf)
def _list_node(progs: Programs, node: ir.ListOf, params: Params | None) -> Fn:
    items = [progs.compile(i, params) for i in node.items]
    return lambda rec, args: [f(rec, args) for f in items]


@compiles(ir.Var)
def _var_node(progs: Programs, node: ir.Var, params: Params | None) -> Fn:
    if params is not None and node.name in params:
        slot = params[node.name]
        return lambda rec, args: args[slot]
    name = node.name
    return lambda rec, args: rec[name]


@compiles(ir.RewardRef)
def _reward_node(progs: Programs, node: ir.RewardRef, params: Params | None) -> Fn:
    total, key = progs.total(node.qname), ("reward", node.qname)

    def reward(rec: Record, args: tuple[Any, ...]) -> Any:
        memo = _memo_of(rec)
        value = memo.get(key, _MISSING)
        if value is _MISSING:
            value = memo[key] = total(rec)
        return value

    return reward


@compiles(ir.Neg)
def _neg_node(progs: Programs, node: ir.Neg, params: Params | None) -> Fn:
    x = progs.compile(node.operand, params)
    return lambda rec, args: -x(rec, args)


@compiles(ir.Not)
def _not_node(progs: Programs, node: ir.Not, params: Params | None) -> Fn:
    x = progs.compile(node.operand, params)
    return lambda rec, args: not x(rec, args)


@compiles(ir.Bin)
def _binary_node(progs: Programs, node: ir.Bin, params: Params | None) -> Fn:
    a, b = progs.compile(node.left, params), progs.compile(node.right, params)
    if node.op == "and":
        return lambda rec, args: bool(a(rec, args)) and bool(b(rec, args))
    if node.op == "or":
        return lambda rec, args: bool(a(rec, args)) or bool(b(rec, args))
    op = _OPERATORS[node.op]
    return lambda rec, args: op(a(rec, args), b(rec, args))


@compiles(ir.If)
def _if_node(progs: Programs, node: ir.If, params: Params | None) -> Fn:
    c, a, b = (progs.compile(x, params) for x in (node.cond, node.then, node.other))
    return lambda rec, args: a(rec, args) if c(rec, args) else b(rec, args)


@compiles(ir.Call)
def _call_node(progs: Programs, node: ir.Call, params: Params | None) -> Fn:
    """A builtin call; a constant second argument (a regex, a let, a literal) is captured once."""
    builtin = BUILTINS.get(node.name)
    if builtin is None:
        raise EvalError(f"the plan calls an unknown builtin '{node.name}'")
    fn = builtin.fn
    if builtin.returns == "text":
        fn = _bounded(fn)
    argf = [progs.compile(a, params) for a in node.args]
    if builtin.check_args or builtin.missing:  # before any record is scored: nothing is lost
        known = tuple(None if v is _MISSING else v for v in map(progs.constant, node.args))
        problem = builtin.check_args(known) if builtin.check_args else None
        problem = problem or (builtin.missing() if builtin.missing else None)
        if problem:
            raise EvalError(f"{node.name}(): {problem}")
    if len(argf) == 1:
        (f0,) = argf
        return lambda rec, args: fn(f0(rec, args))
    if len(argf) == 2:
        f0, f1 = argf
        c1 = progs.constant(node.args[1])
        if c1 is not _MISSING:  # matches(text, /re/), repeats(text, 3), contains(text, "x")
            return lambda rec, args: fn(f0(rec, args), c1)
        return lambda rec, args: fn(f0(rec, args), f1(rec, args))
    return lambda rec, args: fn(*[f(rec, args) for f in argf])


def _bounded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A text builtin whose result is checked against MAX_TEXT."""

    def call(*args: Any) -> Any:
        out = fn(*args)
        if len(out) > MAX_TEXT:
            raise EvalError(f"a text would grow to {len(out):,} characters (limit {MAX_TEXT:,})")
        return out

    return call


@compiles(ir.DefCall)
def _def_node(progs: Programs, node: ir.DefCall, params: Params | None) -> Fn:
    """A call of a def, memoised per record on (def, argument values): detectors repeat across rules."""
    body, qname = progs.def_fn(node.qname), node.qname
    argf = [progs.compile(a, params) for a in node.args]

    def call(rec: Record, args: tuple[Any, ...]) -> Any:
        values = tuple([f(rec, args) for f in argf])
        key = ("def", qname, *[_key_part(v) for v in values])
        memo = _memo_of(rec)
        value = memo.get(key, _MISSING)
        if value is _MISSING:
            value = memo[key] = body(rec, values)
        return value

    return call


@compiles(ir.Agree)
def _agree_node(progs: Programs, node: ir.Agree, params: Params | None) -> Fn:
    # `score` computes every agree over the whole batch first; the closure reads its row.
    return lambda rec, args: rec["_agree"][node][rec["_index"]]


# ---- programs ---------------------------------------------------------------------------------


class Programs:
    """The lets, defs and rewards of a plan, compiled on demand and cached."""

    def __init__(self, programs: ir.Programs) -> None:
        self.source = programs
        self._lets: dict[str, Any] = {}
        self._defs: dict[str, Fn] = {}
        self._rules: dict[str, list[tuple[ir.Rule, Fn, Fn | None]]] = {}
        self._totals: dict[str, Callable[[Record], float]] = {}

    def compile(self, node: ir.Node, params: Params | None = None) -> Fn:
        """A closure `fn(record, args)` for a node; `params` maps a def's parameter names to arg slots."""
        return COMPILERS[type(node)](self, node, params)

    def constant(self, node: ir.Node) -> Any:
        """The value of a node that reads nothing from the record (literals, regexes, lets), else _MISSING."""
        match node:
            case ir.Num(value=v):
                return float(v)
            case ir.Str(value=v) | ir.Bool(value=v):
                return v
            case ir.Re(pattern=p, flags=f):
                return compile_regex(p, f)
            case ir.LetRef(qname=q):
                return self.let(q)
        return _MISSING

    def let(self, qname: str) -> Any:
        if qname not in self._lets:
            self._lets[qname] = self.compile(self.source.lets[qname])({}, ())
        return self._lets[qname]

    def def_fn(self, qname: str) -> Fn:
        if qname not in self._defs:
            spec = self.source.defs[qname]
            if spec.body is None:
                raise EvalError(f"def '{qname}' has no body in this plan")
            self._defs[qname] = self.compile(spec.body, {p: i for i, p in enumerate(spec.params)})
        return self._defs[qname]

    def rules(self, qname: str) -> list[tuple[ir.Rule, Fn, Fn | None]]:
        """Each rule of a reward with its compiled value and condition."""
        if qname not in self._rules:
            self._rules[qname] = [
                (r, self.compile(r.value), None if r.when is None else self.compile(r.when))
                for r in self.source.rewards[qname].rules
            ]
        return self._rules[qname]

    def total(self, qname: str) -> Callable[[Record], float]:
        """`record -> reward value`: the sum of the rules, in order (a rule whose `when` fails adds 0)."""
        if qname not in self._totals:
            rules = self.rules(qname)
            empty: tuple[Any, ...] = ()

            def total(rec: Record) -> float:
                t = 0.0
                for rule, value, when in rules:
                    try:
                        if when is None or when(rec, empty):
                            t += float(value(rec, empty))
                    except EvalError as exc:
                        raise EvalError(f"{_where(qname, rule)}: {exc}") from None
                return t if math.isfinite(t) else 0.0

            self._totals[qname] = total
        return self._totals[qname]

    def reward_value(self, qname: str, rec: Record) -> float:
        """A reward's value for one record: the sum of its rules (a rule whose `when` fails adds 0)."""
        return self.total(qname)(rec)

    def score(self, node: ir.Node, records: Sequence[Record]) -> Scored:
        """A number expression over a batch; batch-level `agree` nodes are computed first."""
        from ralign.runtime.agree import agree  # numpy, runtime only

        combined: dict[ir.Agree, list[float]] = {}
        weights: list[list[float]] = []
        means: list[list[float]] = []
        for found in _agree_nodes(node):
            fns = [self.compile(s) for s in found.sources]
            sources = [[_finite(float(f(dict(r), ()))) for r in records] for f in fns]
            combined[found], w = agree(sources)
            weights.append(list(w))
            means.append([sum(s) / max(1, len(s)) for s in sources])
        fn = self.compile(node)
        rows = [dict(r, _index=i, _agree=combined) for i, r in enumerate(records)]
        return Scored([_finite(float(fn(r, ()))) for r in rows], weights, means)

    def holds(self, node: ir.Node, records: Sequence[Record]) -> list[bool]:
        """A bool expression over a batch."""
        fn = self.compile(node)
        return [bool(fn(dict(r), ())) for r in records]


def _agree_nodes(node: ir.Node) -> list[ir.Agree]:
    return [n for n in ir.walk(node) if isinstance(n, ir.Agree)]


def _where(qname: str, rule: ir.Rule) -> str:
    file, name = qname.rsplit(":", 1)
    return f"{file}:{rule.line}: reward '{name}', rule '{rule.name}'"


# ---- `ralign rules` -----------------------------------------------------------------------------


def explain(checked: Any, reward: str, *, prompt: str, response: str) -> dict[str, Any]:
    """Each rule's value (and whether its condition held) and the total, for one (prompt, response).

    Args:
        checked: a `Checked` recipe or library.
        reward: the reward's name in the checked file, `alias.name` for an imported one (the
            alias its import gives it).
    """
    from ralign.errors import UsageError, did_you_mean

    rewards = checked.programs.rewards
    main = checked.main
    known = {f"{main}:{name}": name for name in _local_names(rewards, main)}
    for alias, unit in checked.aliases.items():
        known.update({f"{unit}:{name}": f"{alias}.{name}" for name in _local_names(rewards, unit)})
    found = [q for q, shown in known.items() if shown == reward]
    if not found:
        names = sorted(known.values())
        raise UsageError(
            f"no reward '{reward}' in {main} (rewards: {', '.join(names) or 'none'}){did_you_mean(reward, names)}"
        )
    progs = Programs(checked.programs)
    rec: Record = {"prompt": prompt, "response": response}
    rows: list[dict[str, Any]] = []
    total = 0.0
    for rule, value, when in progs.rules(found[0]):
        try:
            held = None if when is None else bool(when(rec, ()))
            v = _finite(float(value(rec, ()))) if held in (None, True) else 0.0
        except EvalError as exc:
            raise EvalError(f"{_where(found[0], rule)}: {exc}") from None
        total += v
        rows.append({"rule": rule.name, "value": v, "when": held})
    return {"reward": reward, "rules": rows, "total": _finite(total)}


def _local_names(rewards: Any, unit: str) -> list[str]:
    return [q.rsplit(":", 1)[1] for q in rewards if q.rsplit(":", 1)[0] == unit]
