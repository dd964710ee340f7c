"""The reward-expression IR: typed, frozen nodes that the checker builds, plans carry and the runtime interprets.

A plan stores each node as a JSON list (`["bin", "+", a, b]`); `to_json` and `from_json` are exact
inverses, and `from_json` verifies what it reads, because a plan file is untrusted input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Binary operators; `++` is text concatenation (the checker turns `+` of two texts into it).
ARITHMETIC = ("+", "-", "*", "/")
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")
LOGICAL = ("and", "or")
OPERATORS = (*ARITHMETIC, "++", *COMPARISONS, *LOGICAL)


class IRError(ValueError):
    """A plan's expression is malformed; `str()` says where in the JSON and what."""


@dataclass(frozen=True, slots=True)
class Num:
    value: float


@dataclass(frozen=True, slots=True)
class Str:
    value: str


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool


@dataclass(frozen=True, slots=True)
class Re:
    pattern: str
    flags: str


@dataclass(frozen=True, slots=True)
class ListOf:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Var:
    """`prompt`, `response`, a score of the round, or a def's parameter."""

    name: str


@dataclass(frozen=True, slots=True)
class LetRef:
    qname: str


@dataclass(frozen=True, slots=True)
class RewardRef:
    qname: str


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Node


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Bin:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class If:
    cond: Node
    then: Node
    other: Node


@dataclass(frozen=True, slots=True)
class Call:
    """A call of a builtin by name."""

    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class DefCall:
    qname: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Agree:
    """`agree(a, b, ...)`: the sources weighed by how much they agree over a batch."""

    sources: tuple[Node, ...]


Node = (
    Num
    | Str
    | Bool
    | Re
    | ListOf
    | Var
    | LetRef
    | RewardRef
    | Neg
    | Not
    | Bin
    | If
    | Call
    | DefCall
    | Agree
)


@dataclass(frozen=True)
class Def:
    params: tuple[str, ...]
    body: Node | None  # None: declared, never called with known types (never in a plan)


@dataclass(frozen=True)
class Rule:
    name: str
    value: Node
    when: Node | None
    line: int


@dataclass(frozen=True)
class Reward:
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Programs:
    """The lets, defs and rewards of a recipe (or a plan), by qualified name `FILE:name`."""

    lets: Mapping[str, Node]
    defs: Mapping[str, Def]
    rewards: Mapping[str, Reward]


EMPTY = Programs({}, {}, {})


# ---- walking --------------------------------------------------------------------------------


def children(node: Node) -> tuple[Node, ...]:
    """The direct sub-expressions of a node, in source order."""
    match node:
        case ListOf(items=xs) | Call(args=xs) | DefCall(args=xs) | Agree(sources=xs):
            return xs
        case Neg(operand=x) | Not(operand=x):
            return (x,)
        case Bin(left=a, right=b):
            return (a, b)
        case If(cond=c, then=a, other=b):
            return (c, a, b)
    return ()


def walk(node: Node) -> Iterator[Node]:
    """Every node of an expression, parents before children (iterative: no depth limit)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(children(current)))


def bodies(programs: Programs, ref: Node) -> tuple[Node, ...]:
    """The expressions a let, def or reward reference leads to (nothing for other nodes)."""
    match ref:
        case LetRef(qname=q) if q in programs.lets:
            return (programs.lets[q],)
        case DefCall(qname=q) if q in programs.defs:
            body = programs.defs[q].body
            return (body,) if body is not None else ()
        case RewardRef(qname=q) if q in programs.rewards:
            return tuple(e for r in programs.rewards[q].rules for e in (r.value, r.when) if e)
    return ()  # not a reference, or one to a program not (yet) known


def reach(programs: Programs, roots: tuple[Node, ...]) -> Iterator[Node]:
    """Every node reachable from `roots`, through lets, defs and rewards too, each program once."""
    seen: set[tuple[type, str]] = set()
    stack = list(roots)
    while stack:
        for node in walk(stack.pop()):
            yield node
            if isinstance(node, (LetRef, DefCall, RewardRef)):
                key = (type(node), node.qname)
                if key not in seen:
                    seen.add(key)
                    stack.extend(bodies(programs, node))


def closure(programs: Programs, roots: tuple[Node, ...]) -> Programs:
    """The lets, defs and rewards that `roots` reach, transitively (what a plan step carries)."""
    lets, defs, rewards = set(), set(), set()
    for node in reach(programs, roots):
        match node:
            case LetRef(qname=q):
                lets.add(q)
            case DefCall(qname=q):
                defs.add(q)
            case RewardRef(qname=q):
                rewards.add(q)
    return Programs(
        {q: programs.lets[q] for q in sorted(lets)},
        {q: programs.defs[q] for q in sorted(defs)},
        {q: programs.rewards[q] for q in sorted(rewards)},
    )


def labels(nodes: tuple[Node, ...]) -> list[str]:
    """Short, unique names for expressions (agree's sources in metrics and logs): a score or
    reward's own name where there is one, else its position."""
    out: list[str] = []
    for i, node in enumerate(nodes):
        match node:
            case Var(name=x):
                label = x
            case RewardRef(qname=q) | LetRef(qname=q):
                label = q.rsplit(":", 1)[-1]
            case DefCall(qname=q):
                label = q.rsplit(":", 1)[-1] + "()"
            case _:
                label = str(i)
        out.append(label if label not in out else f"{label}#{i}")
    return out


# What a record gives an expression besides the round's scores: `round` (1-based) only in a
# `score` step, so that a recipe can score differently from one round to the next.
ROUND = "round"
RECORD_FIELDS = frozenset({"prompt", "response", ROUND})


def variables(node: Node) -> set[str]:
    """The names an expression reads as variables (scores), other than a record's own fields."""
    return {n.name for n in walk(node) if isinstance(n, Var)} - RECORD_FIELDS


# ---- JSON -----------------------------------------------------------------------------------


def to_json(node: Node) -> list[Any]:
    """The plan's JSON form of a node."""
    match node:
        case Num(value=v) | Str(value=v) | Bool(value=v):
            return [_TAGS[type(node)], v]
        case Re(pattern=p, flags=f):
            return ["re", p, f]
        case Var(name=x):
            return ["var", x]
        case LetRef(qname=q) | RewardRef(qname=q):
            return [_TAGS[type(node)], q]
        case ListOf(items=xs) | Agree(sources=xs):
            return [_TAGS[type(node)], [to_json(x) for x in xs]]
        case Neg(operand=x) | Not(operand=x):
            return [_TAGS[type(node)], to_json(x)]
        case Bin(op=op, left=a, right=b):
            return ["bin", op, to_json(a), to_json(b)]
        case If(cond=c, then=a, other=b):
            return ["if", to_json(c), to_json(a), to_json(b)]
        case Call(name=f, args=xs) | DefCall(qname=f, args=xs):
            return [_TAGS[type(node)], f, [to_json(x) for x in xs]]
    raise TypeError(f"not an IR node: {node!r}")  # pragma: no cover


_TAGS: dict[type, str] = {
    Num: "num",
    Str: "str",
    Bool: "bool",
    Re: "re",
    ListOf: "list",
    Var: "var",
    LetRef: "let",
    RewardRef: "reward",
    Neg: "neg",
    Not: "not",
    Bin: "bin",
    If: "if",
    Call: "call",
    DefCall: "def",
    Agree: "agree",
}


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise IRError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise IRError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _many(value: Any, where: str) -> tuple[Node, ...]:
    return tuple(from_json(x, f"{where}[{i}]") for i, x in enumerate(_list(value, where)))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IRError(f"{where}: expected a finite number")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise IRError(f"{where}: expected true or false")
    return value


def _binary(x: list[Any], w: str) -> Node:
    if x[1] not in OPERATORS:
        raise IRError(f"{w}: unknown operator {x[1]!r}")
    return Bin(x[1], from_json(x[2], f"{w}.left"), from_json(x[3], f"{w}.right"))


# tag -> (arity of the JSON list, builder from the list)
_READERS: dict[str, tuple[int, Callable[[list[Any], str], Node]]] = {
    "num": (2, lambda x, w: Num(_number(x[1], w))),
    "str": (2, lambda x, w: Str(_text(x[1], w))),
    "bool": (2, lambda x, w: Bool(_flag(x[1], w))),
    "re": (3, lambda x, w: Re(_text(x[1], w), _text(x[2], w))),
    "list": (2, lambda x, w: ListOf(_many(x[1], w))),
    "var": (2, lambda x, w: Var(_text(x[1], w))),
    "let": (2, lambda x, w: LetRef(_text(x[1], w))),
    "reward": (2, lambda x, w: RewardRef(_text(x[1], w))),
    "neg": (2, lambda x, w: Neg(from_json(x[1], w))),
    "not": (2, lambda x, w: Not(from_json(x[1], w))),
    "bin": (4, _binary),
    "if": (4, lambda x, w: If(*(from_json(x[i], f"{w}[{i}]") for i in (1, 2, 3)))),
    "call": (3, lambda x, w: Call(_text(x[1], w), _many(x[2], w))),
    "def": (3, lambda x, w: DefCall(_text(x[1], w), _many(x[2], w))),
    "agree": (2, lambda x, w: Agree(_many(x[1], w))),
}


def from_json(data: Any, where: str = "expression") -> Node:
    """A node from its JSON form; IRError names the place (`where`) of anything malformed.

    Recursion goes as deep as the expression: the checker bounds that depth for recipes, and a
    hand-made plan nested deeper than Python's recursion limit is reported, not crashed on.
    """
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise IRError(f'{where}: expected an expression like ["num", 1]')
    reader = _READERS.get(data[0])
    if reader is None:
        raise IRError(f"{where}: unknown expression {data[0]!r}")
    arity, build = reader
    if len(data) != arity:
        raise IRError(f"{where}: {data[0]!r} takes {arity - 1} part(s), got {len(data) - 1}")
    try:
        return build(data, where)
    except RecursionError:
        raise IRError(f"{where}: nested too deeply") from None


# ---- programs as JSON -------------------------------------------------------------------------


def programs_to_json(programs: Programs, *, lines: bool = True) -> dict[str, Any]:
    """The plan's `programs` object; `lines=False` drops rules' source lines (step hashes ignore them)."""
    return {
        "lets": {q: to_json(v) for q, v in programs.lets.items()},
        "defs": {
            q: {"params": list(d.params), "body": None if d.body is None else to_json(d.body)}
            for q, d in programs.defs.items()
        },
        "rewards": {
            q: {"rules": [_rule_json(r, lines) for r in reward.rules]}
            for q, reward in programs.rewards.items()
        },
    }


def _rule_json(rule: Rule, lines: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": rule.name,
        "value": to_json(rule.value),
        "when": None if rule.when is None else to_json(rule.when),
    }
    if lines:
        out["line"] = rule.line
    return out


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise IRError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def programs_from_json(data: Any) -> Programs:
    """Programs from a plan's JSON, verified: shapes, operators, and that every reference resolves."""
    data = _object(data, "programs")
    lets = {
        q: from_json(v, f"programs.lets[{q!r}]")
        for q, v in _object(data.get("lets", {}), "programs.lets").items()
    }
    defs = {}
    for q, d in _object(data.get("defs", {}), "programs.defs").items():
        where = f"programs.defs[{q!r}]"
        d = _object(d, where)
        params = tuple(_text(p, f"{where}.params") for p in _list(d.get("params"), where))
        body = d.get("body")
        defs[q] = Def(params, None if body is None else from_json(body, f"{where}.body"))
    rewards = {}
    for q, r in _object(data.get("rewards", {}), "programs.rewards").items():
        where = f"programs.rewards[{q!r}]"
        rules = []
        for i, rule in enumerate(_list(_object(r, where).get("rules"), f"{where}.rules")):
            at = f"{where}.rules[{i}]"
            rule = _object(rule, at)
            when = rule.get("when")
            line = rule.get("line", 0)
            rules.append(
                Rule(
                    _text(rule.get("name"), f"{at}.name"),
                    from_json(rule.get("value"), f"{at}.value"),
                    None if when is None else from_json(when, f"{at}.when"),
                    line if isinstance(line, int) and not isinstance(line, bool) else 0,
                )
            )
        rewards[q] = Reward(tuple(rules))
    programs = Programs(lets, defs, rewards)
    verify_references(programs, tuple(_all_roots(programs)))
    return programs


def _all_roots(programs: Programs) -> Iterator[Node]:
    yield from programs.lets.values()
    yield from (d.body for d in programs.defs.values() if d.body is not None)
    yield from (
        e for r in programs.rewards.values() for x in r.rules for e in (x.value, x.when) if e
    )


def verify_references(programs: Programs, roots: tuple[Node, ...]) -> None:
    """Raise IRError when an expression names a let, def or reward that `programs` lacks, or calls
    a def with the wrong number of arguments; and when lets, defs and rewards form a cycle."""
    tables: dict[type, Mapping[str, Any]] = {
        LetRef: programs.lets,
        DefCall: programs.defs,
        RewardRef: programs.rewards,
    }
    for root in roots:
        for node in walk(root):
            if isinstance(node, (LetRef, DefCall, RewardRef)):
                found = tables[type(node)].get(node.qname)
                if found is None or (isinstance(found, Def) and found.body is None):
                    raise IRError(f"{_TAGS[type(node)]} {node.qname!r} is not defined in the plan")
                if isinstance(node, DefCall) and len(node.args) != len(found.params):
                    raise IRError(f"def {node.qname!r} takes {len(found.params)} argument(s)")
    _acyclic(programs)


def _acyclic(programs: Programs) -> None:
    """Lets, defs and rewards may not reach themselves (the interpreter would recurse forever)."""
    refs: list[Node] = [LetRef(q) for q in programs.lets]
    refs += [DefCall(q, ()) for q in programs.defs]
    refs += [RewardRef(q) for q in programs.rewards]
    edges = {
        _key(r): [_key(n) for b in bodies(programs, r) for n in walk(b) if _is_ref(n)] for r in refs
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in edges:
        if start in state:
            continue
        stack = [(start, iter(edges[start]))]
        state[start] = 1
        while stack:
            key, todo = stack[-1]
            nxt = next(todo, None)
            if nxt is None:
                state[key] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise IRError(f"{nxt} refers to itself")
            elif nxt not in state and nxt in edges:
                state[nxt] = 1
                stack.append((nxt, iter(edges[nxt])))


def _is_ref(node: Node) -> bool:
    return isinstance(node, (LetRef, DefCall, RewardRef))


def _key(node: Node) -> str:
    return f"{_TAGS[type(node)]} {node.qname!r}"  # type: ignore[union-attr]
