"""Compile the plan's expression IR into Python closures and score (prompt, response) records.

No eval/exec: each IR node becomes a small closure over its children, and every
call goes through the fixed builtin table. Lets are constants folded once; def
calls and reward values are memoised per record, since detectors repeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ralign.rewards.builtins import BUILTINS
from ralign.rewards.regex import compile_regex

Record = dict[str, Any]  # prompt, response, score values; "_memo" is the evaluator's
Fn = Callable[[Record, tuple[Any, ...]], Any]

_MISSING = object()  # a memo miss (None may be a memoised value)


def _div(a: Fn, b: Fn) -> Fn:
    def div(rec: Record, args: tuple[Any, ...]) -> Any:
        x, y = a(rec, args), b(rec, args)
        return x / y if y != 0 else 0.0  # total: x / 0 is 0

    return div


# Each binary operator builds the closure for its two operand closures (one call per node, not two).
_BINARY: dict[str, Callable[[Fn, Fn], Fn]] = {
    "+": lambda a, b: lambda rec, args: a(rec, args) + b(rec, args),
    "++": lambda a, b: lambda rec, args: a(rec, args) + b(rec, args),  # text concatenation
    "-": lambda a, b: lambda rec, args: a(rec, args) - b(rec, args),
    "*": lambda a, b: lambda rec, args: a(rec, args) * b(rec, args),
    "/": _div,
    "<": lambda a, b: lambda rec, args: a(rec, args) < b(rec, args),
    "<=": lambda a, b: lambda rec, args: a(rec, args) <= b(rec, args),
    ">": lambda a, b: lambda rec, args: a(rec, args) > b(rec, args),
    ">=": lambda a, b: lambda rec, args: a(rec, args) >= b(rec, args),
    "==": lambda a, b: lambda rec, args: a(rec, args) == b(rec, args),
    "!=": lambda a, b: lambda rec, args: a(rec, args) != b(rec, args),
    "and": lambda a, b: lambda rec, args: bool(a(rec, args)) and bool(b(rec, args)),
    "or": lambda a, b: lambda rec, args: bool(a(rec, args)) or bool(b(rec, args)),
}


def _memo_of(rec: Record) -> dict[Any, Any]:
    memo = rec.get("_memo")
    if memo is None:
        memo = rec["_memo"] = {}
    return memo


def _key_part(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


class Programs:
    """The lets, defs and rewards of a plan, compiled on demand and cached."""

    def __init__(self, programs: Mapping[str, Mapping[str, Any]]) -> None:
        self.source = programs
        self._lets: dict[str, Any] = {}
        self._defs: dict[str, tuple[dict[str, int], Fn]] = {}
        self._rewards: dict[str, list[tuple[str, Fn, Fn | None]]] = {}
        self._totals: dict[str, Callable[[Record], float]] = {}
        self.agree_values: dict[int, list[float]] = {}
        self.agree_weights: list[list[float]] = []  # of the last `score` call

    # ---- compiling
    def compile(self, ir: Any, params: dict[str, int] | None = None) -> Fn:
        """A closure `fn(record, args)` for an IR node; `params` maps a def's parameter names to arg slots.

        Defs and rewards that `ir` reaches are compiled now (the checker guarantees they are acyclic).
        """
        head = ir[0]
        const = self._constant(ir)
        if const is not _MISSING:
            return lambda rec, args: const
        if head == "list":
            items = [self.compile(i, params) for i in ir[1]]
            return lambda rec, args: [f(rec, args) for f in items]
        if head == "var":
            name = ir[1]
            if params is not None and name in params:
                slot = params[name]
                return lambda rec, args: args[slot]
            return lambda rec, args: rec[name]
        if head == "reward":
            return self._reward_ref(ir[1])
        if head == "neg":
            x = self.compile(ir[1], params)
            return lambda rec, args: -x(rec, args)
        if head == "not":
            x = self.compile(ir[1], params)
            return lambda rec, args: not x(rec, args)
        if head == "bin":
            return _BINARY[ir[1]](self.compile(ir[2], params), self.compile(ir[3], params))
        if head == "if":
            c, a, b = (self.compile(x, params) for x in ir[1:4])
            return lambda rec, args: a(rec, args) if c(rec, args) else b(rec, args)
        if head == "call":
            return self._call(BUILTINS[ir[1]].fn, ir[2], params)
        if head == "def":
            return self._def_call(ir[1], [self.compile(a, params) for a in ir[2]])
        if head == "agree":
            node_id = id(ir)
            return lambda rec, args: self.agree_values[node_id][rec["_index"]]
        raise ValueError(f"unknown expression node {head!r}")

    def _constant(self, ir: Any) -> Any:
        """The value of a node that reads nothing from the record (literals, regexes, lets), else _MISSING."""
        head = ir[0]
        if head == "num":
            return float(ir[1])
        if head in ("str", "bool"):
            return ir[1]
        if head == "re":
            return compile_regex(ir[1], ir[2])
        if head == "let":
            return self.let(ir[1])
        return _MISSING

    def _call(
        self, fn: Callable[..., Any], arg_irs: list[Any], params: dict[str, int] | None
    ) -> Fn:
        """A builtin call; constant arguments (a regex, a let, a literal) are passed as captured values."""
        argf = [self.compile(a, params) for a in arg_irs]
        if len(argf) == 1:
            (f0,) = argf
            return lambda rec, args: fn(f0(rec, args))
        if len(argf) == 2:
            f0, f1 = argf
            c1 = self._constant(
                arg_irs[1]
            )  # matches(text, /re/), repeats(text, 3), contains(text, "x")
            if c1 is not _MISSING:
                return lambda rec, args: fn(f0(rec, args), c1)
            return lambda rec, args: fn(f0(rec, args), f1(rec, args))
        return lambda rec, args: fn(*[f(rec, args) for f in argf])

    def _def_call(self, qname: str, argf: list[Fn]) -> Fn:
        """A call of a def, memoised per record on (def, argument values): detectors repeat across rules."""
        body = self.def_fn(qname)
        if len(argf) == 1:
            (f0,) = argf

            def call1(rec: Record, args: tuple[Any, ...]) -> Any:
                v0 = f0(rec, args)
                key = ("def", qname, tuple(v0) if isinstance(v0, list) else v0)
                memo = rec.get("_memo")
                if memo is None:
                    memo = rec["_memo"] = {}
                value = memo.get(key, _MISSING)
                if value is _MISSING:
                    value = memo[key] = body(rec, (v0,))
                return value

            return call1

        def call(rec: Record, args: tuple[Any, ...]) -> Any:
            values = tuple([f(rec, args) for f in argf])
            key = ("def", qname, *[_key_part(v) for v in values])
            memo = _memo_of(rec)
            value = memo.get(key, _MISSING)
            if value is _MISSING:
                value = memo[key] = body(rec, values)
            return value

        return call

    def _reward_ref(self, qname: str) -> Fn:
        """Another reward's value, memoised per record."""
        total = self._total(qname)
        key = ("reward", qname)

        def reward(rec: Record, args: tuple[Any, ...]) -> Any:
            memo = rec.get("_memo")
            if memo is None:
                memo = rec["_memo"] = {}
            value = memo.get(key, _MISSING)
            if value is _MISSING:
                value = memo[key] = total(rec)
            return value

        return reward

    def let(self, qname: str) -> Any:
        if qname not in self._lets:
            self._lets[qname] = self.compile(self.source["lets"][qname])({}, ())
        return self._lets[qname]

    def def_fn(self, qname: str) -> Fn:
        if qname not in self._defs:
            spec = self.source["defs"][qname]
            slots = {p: i for i, p in enumerate(spec["params"])}
            self._defs[qname] = (slots, self.compile(spec["body"], slots))
        return self._defs[qname][1]

    def rules(self, qname: str) -> list[tuple[str, Fn, Fn | None]]:
        if qname not in self._rewards:
            compiled = []
            for rule in self.source["rewards"][qname]["rules"]:
                when = self.compile(rule["when"]) if rule["when"] is not None else None
                compiled.append((rule["name"], self.compile(rule["value"]), when))
            self._rewards[qname] = compiled
        return self._rewards[qname]

    def _total(self, qname: str) -> Callable[[Record], float]:
        """`record -> reward value`: the sum of the rules, in order (a rule whose `when` fails adds 0)."""
        if qname not in self._totals:
            pairs = [(value, when) for _, value, when in self.rules(qname)]
            empty: tuple[Any, ...] = ()

            def total(rec: Record) -> float:
                t = 0.0
                for value, when in pairs:
                    if when is None or when(rec, empty):
                        t += float(value(rec, empty))
                return t if math.isfinite(t) else 0.0

            self._totals[qname] = total
        return self._totals[qname]

    # ---- evaluating
    def reward_value(self, qname: str, rec: Record) -> float:
        """A reward's value for one record: the sum of its rules (a rule whose `when` fails adds 0)."""
        return self._total(qname)(rec)

    def score(self, ir: Any, records: Sequence[Record]) -> list[float]:
        """Evaluate a number expression over a batch (batch-level `agree` nodes first).

        The weights each `agree(...)` learned on this batch are left in `agree_weights` (one list per
        `agree` node, in a fixed order); nothing of an earlier batch carries over.
        """
        recs = [dict(r, _index=i) for i, r in enumerate(records)]
        self.agree_values = {}
        self.agree_weights = []
        self._prepare_agree(ir, recs)
        fn = self.compile(ir)
        return [_finite(float(fn(r, ()))) for r in recs]

    def holds(self, ir: Any, records: Sequence[Record]) -> list[bool]:
        """Evaluate a bool expression over a batch."""
        fn = self.compile(ir)
        return [bool(fn(dict(r), ())) for r in records]

    def _prepare_agree(self, ir: Any, recs: list[Record]) -> None:
        from ralign.runtime.agree import agree  # numpy, runtime only

        for node in _agree_nodes(ir):
            sources = [[_finite(float(self.compile(a)(r, ()))) for r in recs] for a in node[1]]
            combined, weights = agree(sources)
            self.agree_values[id(node)] = list(combined)
            self.agree_weights.append(list(weights))


def _agree_nodes(ir: Any) -> list[Any]:
    out, stack = [], [ir]
    while stack:
        node = stack.pop()
        if isinstance(node, list) and node:
            if node[0] == "agree":
                out.append(node)
            else:
                stack.extend(x for x in node if isinstance(x, list))
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def explain(checked: Any, reward: str, *, prompt: str, response: str) -> dict[str, Any]:
    """Each rule's value (and whether its condition held) and the total, for one (prompt, response).

    Args:
        checked: a `Checked` recipe or library.
        reward: the reward's name in the checked file (`alias.name` for an imported one).
    """
    from ralign.errors import UsageError, did_you_mean

    rewards = checked.programs["rewards"]
    main = next(iter(checked.sources))
    wanted = {f"{main}:{reward}"} if "." not in reward else set()
    if "." in reward:
        alias, name = reward.split(".", 1)
        wanted = {
            q
            for q in rewards
            if q.endswith(f":{name}")
            and (
                q.split(":")[0].endswith("/" + alias)
                or q.split(":")[0].rsplit("/", 1)[-1].removesuffix(".ralign") == alias
            )
        }
    found = [q for q in rewards if q in wanted]
    if not found:
        known = sorted(
            q.split(":", 1)[1] if q.startswith(main + ":") else _display(q) for q in rewards
        )
        raise UsageError(
            f"no reward '{reward}' in {main} (rewards: {', '.join(known) or 'none'}){did_you_mean(reward, known)}"
        )
    qname = found[0]
    progs = Programs(checked.programs)
    rec: Record = {"prompt": prompt, "response": response}
    rows: list[dict[str, Any]] = []
    total = 0.0
    for name, value, when in progs.rules(qname):
        held = None if when is None else bool(when(rec, ()))
        v = _finite(float(value(rec, ()))) if held in (None, True) else 0.0
        total += v
        rows.append({"rule": name, "value": v, "when": held})
    return {"reward": reward, "rules": rows, "total": _finite(total)}


def _display(qname: str) -> str:
    unit, name = qname.split(":", 1)
    stem = unit.rsplit("/", 1)[-1].removesuffix(".ralign")
    return f"{stem}.{name}"
