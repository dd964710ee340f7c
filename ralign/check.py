"""Check a loaded recipe: names, schemas, expression types, recursion, templates and data flow.

Every problem in every file is collected and reported together. What survives is a
`Checked` value: resolved, typed and ready to lower into a plan.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralign import nodes as n
from ralign import schema as sc
from ralign import templates as tp
from ralign.errors import Diagnostic, RecipeError, TemplateError, did_you_mean
from ralign.imports import Loaded, Unit, confined
from ralign.rewards import builtins as bi
from ralign.rewards.regex import RegexError
from ralign.rewards.regex import check as check_regex
from ralign.source import Source, Span

ERROR = "error"  # the type of an expression that already produced a diagnostic
RECIPE_ONLY = (n.Recipe, n.Model, n.Dataset, n.Phase, n.Evaluate)
KIND_WORD = {
    n.Let: "let",
    n.Def: "def",
    n.Reward: "reward",
    n.Template: "template",
    n.Model: "model",
    n.Dataset: "dataset",
}

# ---- the checked program -------------------------------------------------------------


@dataclass(frozen=True)
class TemplateValue:
    """A resolved template: its plan key, text, and where its first line sits in the source."""

    key: str
    text: str
    origin: Span


@dataclass(frozen=True)
class CheckedStep:
    phase: str
    kind: str  # "train sft" for train steps, else the step keyword
    name: str | None
    span: Span
    params: dict[str, Any]  # literal values after defaults; references resolved to names
    templates: dict[str, str]  # attribute -> template key
    exprs: dict[str, Any]  # attribute -> expression IR
    inputs: tuple[str, ...]  # data it consumes: "prompts", "responses", "score:NAME", "pairs"
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Checked:
    recipe: str
    rounds: int
    seed: int
    policy: str
    models: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    templates: dict[str, TemplateValue]
    programs: dict[str, dict[str, Any]]  # "lets" / "defs" / "rewards": qualified name -> IR
    steps: tuple[CheckedStep, ...]
    evaluations: tuple[dict[str, Any], ...]
    sources: dict[str, Source] = field(repr=False)
    recipe_dir: Path = field(repr=False)


# ---- symbols --------------------------------------------------------------------------


@dataclass(frozen=True)
class Symbol:
    kind: str  # let / def / reward / template / model / dataset
    qname: str  # "unit-key:name"
    decl: Any
    unit: str


def qualify(unit: str, name: str) -> str:
    return f"{unit}:{name}"


class Checker:
    """Holds the diagnostics and symbol tables while the checks run; `run()` returns the result."""

    def __init__(self, loaded: Loaded, *, library: bool = False) -> None:
        self.loaded = loaded
        self.library = library
        self.units = loaded.units
        self.sources = dict(loaded.sources)
        self.problems: list[Diagnostic] = []
        self.symbols: dict[str, dict[str, Symbol]] = {}
        self.templates: dict[str, TemplateValue] = {}
        self.programs: dict[str, dict[str, Any]] = {"lets": {}, "defs": {}, "rewards": {}}
        self.let_types: dict[str, str] = {}
        self.def_types: dict[tuple[str, tuple[str, ...]], str] = {}
        self.cyclic: set[str] = set()
        self._in_progress: set[str] = set()
        self.policy = ""

    # ---- reporting
    def error(self, span: Span, message: str, notes: tuple[tuple[Span, str], ...] = ()) -> None:
        d = Diagnostic(span, message, notes)
        if d not in self.problems:
            self.problems.append(d)

    # ---- the whole check
    def run(self) -> Checked:
        main = self.units[self.loaded.main]
        for unit in self.units.values():
            self.collect(unit, is_main=unit.key == self.loaded.main)
        self.find_cycles()
        for unit in self.units.values():
            self.check_programs(unit)
        recipe = self.recipe_block(main)
        models = self.models(main)
        policy = self.pick_policy(main, models)
        self.policy = policy
        datasets = self.datasets(main)
        steps = self.steps(main, models, datasets)
        evaluations = self.evaluations(main, datasets)
        if self.problems:
            raise RecipeError(self.problems, self.sources)
        return Checked(
            recipe=recipe.get("name", ""),
            rounds=int(recipe.get("rounds", 1)),
            seed=int(recipe.get("seed", 0)),
            policy=policy,
            models=models,
            datasets=datasets,
            templates=self.templates,
            programs=self.programs,
            steps=tuple(steps),
            evaluations=tuple(evaluations),
            sources=self.sources,
            recipe_dir=self.loaded.recipe_dir,
        )

    # ---- symbol tables
    def collect(self, unit: Unit, is_main: bool) -> None:
        table: dict[str, Symbol] = {}
        aliases = unit.alias_map()
        recipes = [d for d in unit.module.decls if isinstance(d, n.Recipe)]
        if not is_main or self.library:
            for decl in unit.module.decls:
                if isinstance(decl, RECIPE_ONLY):
                    what = type(decl).__name__.lower()
                    self.error(
                        decl.span,
                        f"a library may not declare a {what}: libraries hold only import, let, def, reward and template",
                    )
        elif not recipes:
            self.error(
                Span(unit.key, 1, 1),
                'this file has no `recipe "name" { ... }` block; a recipe file needs exactly one '
                "(a library holds only import, let, def, reward and template)",
            )
        for extra in recipes[1:]:
            self.error(
                extra.span,
                "a recipe file has exactly one recipe block; this is a second one",
                ((recipes[0].span, "the first one"),),
            )
        for decl in unit.module.decls:
            for cls, word in KIND_WORD.items():
                if isinstance(decl, cls):
                    name = decl.name  # type: ignore[union-attr]
                    if name in table:
                        self.error(
                            decl.span,
                            f"'{name}' is already declared in this file",
                            ((table[name].decl.span, "first declared here"),),
                        )
                    elif name in aliases:
                        self.error(
                            decl.span, f"'{name}' is already the name of an imported namespace"
                        )
                    else:
                        table[name] = Symbol(word, qualify(unit.key, name), decl, unit.key)
        self.symbols[unit.key] = table

    def lookup(self, unit: str, ref: n.Ref, scope: dict[str, str] | None = None) -> Symbol | str:
        """The symbol `ref` names from `unit` (a local of `scope` is reported by the caller), or an error message."""
        parts = ref.parts
        table = self.symbols[unit]
        if len(parts) == 1:
            name = parts[0]
            if name in table:
                return table[name]
            known = list(table) + list(scope or {})
            aliases = self.units[unit].alias_map()
            if name in aliases:
                return f"'{name}' is an imported namespace; name something inside it, like '{name}.{next(iter(self.symbols[aliases[name]]), 'x')}'"
            return f"unknown name '{name}'{did_you_mean(name, known)}"
        if len(parts) > 2:
            return f"'{ref.dotted}': only one level of namespace (`alias.name`) exists; there is no attribute access"
        alias, name = parts
        aliases = self.units[unit].alias_map()
        if alias not in aliases:
            return f"unknown namespace '{alias}'{did_you_mean(alias, list(aliases) + list(scope or {}))}"
        other = self.symbols[aliases[alias]]
        if name not in other:
            return f"'{alias}' has no '{name}'{did_you_mean(name, other)}"
        return other[name]

    # ---- recursion
    def find_cycles(self) -> None:
        """Lets, defs and rewards may not refer to themselves, directly or through others."""
        graph: dict[str, list[str]] = {}
        decls: dict[str, Symbol] = {}
        for unit, table in self.symbols.items():
            for sym in table.values():
                if sym.kind not in ("let", "def", "reward"):
                    continue
                decls[sym.qname] = sym
                locals_ = set(sym.decl.params) if sym.kind == "def" else set()
                refs: list[str] = []
                for ref in _refs(_bodies(sym.decl)):
                    if len(ref.parts) == 1 and (
                        ref.parts[0] in locals_ or ref.parts[0] in ("prompt", "response")
                    ):
                        continue
                    if len(ref.parts) == 1 and ref.parts[0] not in table:
                        continue  # a builtin or an unknown name: no edge (unknown names are reported later)
                    found = self.lookup(unit, ref)
                    if isinstance(found, Symbol) and found.kind in ("let", "def", "reward"):
                        refs.append(found.qname)
                graph[sym.qname] = refs
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(q: str) -> None:
            state[q] = 1
            stack.append(q)
            for nxt in graph.get(q, []):
                if state.get(nxt) == 1:
                    cycle = stack[stack.index(nxt) :]
                    self.cyclic.update(cycle)
                    sym = decls[nxt]
                    names = " -> ".join(decls[c].decl.name for c in (*cycle, nxt))
                    what = "calls itself" if len(cycle) == 1 else "is part of a cycle"
                    self.error(
                        sym.decl.span,
                        f"'{sym.decl.name}' is recursive: it {what} ({names}); a {sym.kind} may not recur, directly or through others",
                    )
                elif nxt not in state:
                    visit(nxt)
            stack.pop()
            state[q] = 2

        for q in graph:
            if q not in state:
                visit(q)

    # ---- lets, defs, rewards
    def check_programs(self, unit: Unit) -> None:
        for sym in self.symbols[unit.key].values():
            if sym.qname in self.cyclic:
                continue
            if sym.kind == "let":
                self.let_type(sym)
            elif sym.kind == "def":
                # Names are checked now; types at each call, with the arguments' types.
                scope = {p: ERROR for p in sym.decl.params}
                if len(scope) != len(sym.decl.params):
                    twice = sorted({p for p in sym.decl.params if sym.decl.params.count(p) > 1})
                    self.error(
                        sym.decl.span,
                        f"def '{sym.decl.name}' names the parameter '{twice[0]}' twice",
                    )
                for ref in _refs([sym.decl.body]):
                    if len(ref.parts) == 1 and ref.parts[0] in scope:
                        continue
                    if not _is_call_target(sym.decl.body, ref):
                        found = self.lookup(unit.key, ref, scope)
                        if isinstance(found, str):
                            if len(ref.parts) == 1 and ref.parts[0] in ("prompt", "response"):
                                found = f"'{ref.parts[0]}' is not available here ({_CONTEXT_WORDS['def']}; pass it as an argument)"
                            self.error(ref.span, found)
                self.programs["defs"][sym.qname] = {"params": list(sym.decl.params), "body": None}
            elif sym.kind == "reward":
                self.check_reward(sym)
            elif sym.kind == "template":
                self._in_progress.add(sym.qname)
                self.template_value(unit, sym.decl.value, sym.qname)
                self._in_progress.discard(sym.qname)

    def let_type(self, sym: Symbol) -> str:
        if sym.qname in self.let_types:
            return self.let_types[sym.qname]
        if sym.qname in self.cyclic or sym.qname in self._in_progress:
            return ERROR
        self._in_progress.add(sym.qname)
        typ, ir = self.expr(sym.unit, sym.decl.value, {}, "let")
        self._in_progress.discard(sym.qname)
        self.let_types[sym.qname] = typ
        self.programs["lets"][sym.qname] = ir
        return typ

    def check_reward(self, sym: Symbol) -> None:
        rules = []
        seen: dict[str, Span] = {}
        for rule in sym.decl.rules:
            if rule.name in seen:
                self.error(
                    rule.span,
                    f"rule '{rule.name}' is already defined in reward '{sym.decl.name}'",
                    ((seen[rule.name], "first defined here"),),
                )
            seen[rule.name] = rule.span
            scope = {"prompt": bi.TEXT, "response": bi.TEXT}
            vt, vir = self.expr(sym.unit, rule.value, scope, "reward")
            if vt not in (bi.NUMBER, ERROR):
                self.error(
                    rule.value.span,
                    f"the value of rule '{rule.name}' must be a number, but this is a {vt}",
                )
            wir = None
            if rule.when is not None:
                wt, wir = self.expr(sym.unit, rule.when, scope, "reward")
                if wt not in (bi.BOOL, ERROR):
                    self.error(
                        rule.when.span,
                        f"the `when` condition of rule '{rule.name}' must be a bool, but this is a {wt} "
                        f"(compare it, e.g. `... > 0`)",
                    )
            rules.append({"name": rule.name, "value": vir, "when": wir, "line": rule.span.line})
        self.programs["rewards"][sym.qname] = {"rules": rules}

    # ---- expressions: (type, IR)
    def expr(self, unit: str, e: n.Expr, scope: dict[str, str], context: str) -> tuple[str, Any]:
        match e:
            case n.Number(value=v):
                return bi.NUMBER, ["num", v]
            case n.String(value=v):
                return bi.TEXT, ["str", v]
            case n.Bool(value=v):
                return bi.BOOL, ["bool", v]
            case n.Regex(pattern=p, flags=f):
                try:
                    check_regex(p, f)
                except RegexError as exc:
                    self.error(e.span, str(exc))
                    return ERROR, None
                return bi.REGEX, ["re", p, "".join(sorted(set(f)))]
            case n.ListExpr(items=items):
                typed = [self.expr(unit, i, scope, context) for i in items]
                kinds = {t for t, _ in typed if t != ERROR}
                if len(kinds) > 1:
                    self.error(
                        e.span,
                        f"a list holds one type of item, but this one mixes {', '.join(sorted(kinds))}",
                    )
                    return ERROR, None
                return bi.LIST, ["list", [ir for _, ir in typed]]
            case n.MapExpr():
                self.error(e.span, "a map `{ k = v }` is not a value an expression can use")
                return ERROR, None
            case n.Ref():
                return self.ref(unit, e, scope, context)
            case n.Call():
                return self.call(unit, e, scope, context)
            case n.Unary(op="-", operand=x):
                t, ir = self.expr(unit, x, scope, context)
                if t not in (bi.NUMBER, ERROR):
                    self.error(e.span, f"unary '-' needs a number, got a {t}")
                    return ERROR, None
                return (t, ["neg", ir]) if t != ERROR else (ERROR, None)
            case n.Unary(op="not", operand=x):
                t, ir = self.expr(unit, x, scope, context)
                if t not in (bi.BOOL, ERROR):
                    self.error(e.span, f"`not` needs a bool, got a {t}")
                    return ERROR, None
                return (t, ["not", ir]) if t != ERROR else (ERROR, None)
            case n.Binary(op=op, left=a, right=b):
                return self.binary(unit, e, op, a, b, scope, context)
        self.error(e.span, "this is not an expression")  # pragma: no cover
        return ERROR, None

    def binary(
        self,
        unit: str,
        e: n.Binary,
        op: str,
        a: n.Expr,
        b: n.Expr,
        scope: dict[str, str],
        context: str,
    ) -> tuple[str, Any]:
        ta, ia = self.expr(unit, a, scope, context)
        tb, ib = self.expr(unit, b, scope, context)
        if ERROR in (ta, tb):
            return ERROR, None
        if op in ("and", "or"):
            want, result = {bi.BOOL}, bi.BOOL
        elif op in ("<", "<=", ">", ">="):
            want, result = {bi.NUMBER}, bi.BOOL
        elif op in ("==", "!="):
            if ta != tb or ta not in (bi.NUMBER, bi.TEXT, bi.BOOL):
                self.error(
                    e.span,
                    f"`{op}` compares two numbers, texts or bools of the same type, not a {ta} and a {tb}",
                )
                return ERROR, None
            return bi.BOOL, ["bin", op, ia, ib]
        elif op == "+" and ta == tb == bi.TEXT:
            return bi.TEXT, ["bin", "++", ia, ib]
        else:
            want, result = {bi.NUMBER}, bi.NUMBER
        for t, side in ((ta, a), (tb, b)):
            if t not in want:
                need = "a bool" if bi.BOOL in want else "a number"
                self.error(side.span, f"`{op}` needs {need} on each side, but this is a {t}")
                return ERROR, None
        return result, ["bin", op, ia, ib]

    def ref(self, unit: str, e: n.Ref, scope: dict[str, str], context: str) -> tuple[str, Any]:
        if len(e.parts) == 1 and e.parts[0] in scope:
            name = e.parts[0]
            return scope[name], ["var", name]
        found = self.lookup(unit, e, scope)
        if isinstance(found, str):
            if len(e.parts) == 1 and e.parts[0] in bi.BUILTINS:
                found = f"'{e.parts[0]}' is a builtin function; call it: {bi.signature(bi.BUILTINS[e.parts[0]])}"
            elif len(e.parts) == 1 and e.parts[0] in ("prompt", "response"):
                found = f"'{e.parts[0]}' is not available here ({_CONTEXT_WORDS[context]})"
            self.error(e.span, found)
            return ERROR, None
        if found.kind == "let":
            t = self.let_type(found)
            return t, (["let", found.qname] if t != ERROR else None)
        if found.kind == "reward":
            if context in ("let", "filter"):
                self.error(
                    e.span,
                    f"reward '{e.dotted}' scores an answer, so it cannot be used here ({_CONTEXT_WORDS[context]})",
                )
                return ERROR, None
            return bi.NUMBER, ["reward", found.qname]
        if found.kind == "def":
            self.error(
                e.span,
                f"'{e.dotted}' is a def; call it with its arguments: {e.dotted}({', '.join(found.decl.params)})",
            )
            return ERROR, None
        self.error(e.span, f"'{e.dotted}' is a {found.kind}, not a value an expression can use")
        return ERROR, None

    def call(self, unit: str, e: n.Call, scope: dict[str, str], context: str) -> tuple[str, Any]:
        typed = [self.expr(unit, a, scope, context) for a in e.args]
        types = [t for t, _ in typed]
        irs = [ir for _, ir in typed]
        fname = e.func.dotted
        if fname == "agree":
            if context != "score":
                self.error(
                    e.func.span, "agree(...) combines scores, so it belongs in a `score` step"
                )
                return ERROR, None
            if len(types) < 2:
                self.error(
                    e.span,
                    f"agree() needs at least two sources to weigh against each other, got {len(types)}",
                )
                return ERROR, None
            for t, a in zip(types, e.args, strict=True):
                if t not in (bi.NUMBER, ERROR):
                    self.error(a.span, f"each source of agree() must be a number, got a {t}")
                    return ERROR, None
            return (ERROR, None) if ERROR in types else (bi.NUMBER, ["agree", irs])
        if fname == "file":
            self.error(e.span, 'file("...") names a template file; it is not an expression value')
            return ERROR, None
        if len(e.func.parts) == 1 and fname in bi.BUILTINS and fname not in self.symbols[unit]:
            b = bi.BUILTINS[fname]
            if ERROR in types:
                return ERROR, None
            result, message = bi.check_call(b, types)
            if message:
                self.error(e.span, message)
                return ERROR, None
            assert result is not None
            if fname == "if":
                return result, ["if", *irs]
            return result, ["call", fname, irs]
        found = self.lookup(unit, e.func, scope)
        if isinstance(found, str):
            if len(e.func.parts) == 1:
                found = f"unknown function '{fname}'{did_you_mean(fname, list(bi.BUILTINS) + [s for s, v in self.symbols[unit].items() if v.kind == 'def'] + ['agree'])}"
            self.error(e.func.span, found)
            return ERROR, None
        if found.kind != "def":
            self.error(e.func.span, f"'{fname}' is a {found.kind}, not a function")
            return ERROR, None
        params = found.decl.params
        if len(params) != len(types):
            self.error(
                e.span,
                f"{fname}() takes {len(params)} argument{'s' if len(params) != 1 else ''} ({', '.join(params)}), got {len(types)}",
            )
            return ERROR, None
        if ERROR in types or found.qname in self.cyclic:
            return ERROR, None
        result = self.def_type(found, tuple(types))
        if context in ("let", "filter") and result != ERROR and self.reads_reward(found.qname):
            self.error(
                e.span,
                f"{fname}() reads a reward, which scores an answer, so it cannot be used here ({_CONTEXT_WORDS[context]})",
            )
            return ERROR, None
        return result, ["def", found.qname, irs]

    def reads_reward(self, qname: str) -> bool:
        """Whether a def's body reaches a reward, directly or through other defs."""
        seen: set[str] = set()
        stack = [self.programs["defs"].get(qname, {}).get("body")]
        while stack:
            node = stack.pop()
            if not isinstance(node, list) or not node:
                continue
            if node[0] == "reward":
                return True
            if node[0] == "def" and isinstance(node[1], str) and node[1] not in seen:
                seen.add(node[1])
                stack.append(self.programs["defs"].get(node[1], {}).get("body"))
            stack.extend(x for x in node if isinstance(x, list))
        return False

    def def_type(self, sym: Symbol, types: tuple[str, ...]) -> str:
        key = (sym.qname, types)
        if key not in self.def_types:
            self.def_types[key] = ERROR  # guards against cycles the graph check already reported
            scope = dict(zip(sym.decl.params, types, strict=True))
            t, ir = self.expr(sym.unit, sym.decl.body, scope, "def")
            self.def_types[key] = t
            if t != ERROR:
                self.programs["defs"][sym.qname] = {"params": list(sym.decl.params), "body": ir}
        return self.def_types[key]

    # ---- templates
    def template_value(
        self, unit: Unit, value: n.Expr, key: str | None = None
    ) -> TemplateValue | None:
        """Resolve a template declaration's or attribute's value to its text and origin."""
        if isinstance(value, n.String):
            col = value.span.column + (3 if value.long else 1)
            origin = Span(value.span.file, value.span.line, col)
            tv = TemplateValue(key or _inline_key(value.value), value.value, origin)
        elif (
            isinstance(value, n.Call)
            and value.func.dotted == "file"
            and len(value.args) == 1
            and isinstance(value.args[0], n.String)
        ):
            rel = value.args[0].value
            if "\0" in rel:
                self.error(
                    value.args[0].span, "a template file name may not contain a NUL character"
                )
                return None
            path = unit.folder / rel
            if not confined(path, self.loaded.roots):
                self.error(
                    value.args[0].span,
                    f"template file '{rel}' is outside the import roots; refusing to read it",
                )
                return None
            if not path.is_file():
                self.error(value.args[0].span, f"template file '{rel}' does not exist")
                return None
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                self.error(
                    value.args[0].span,
                    f"template file '{rel}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
                )
                return None
            name = _display(path, unit, self.loaded)
            self.sources.setdefault(name, Source(name, text, path))
            tv = TemplateValue(key or _inline_key(text), text, Span(name, 1, 1))
        elif isinstance(value, n.Ref):
            found = self.lookup(unit.key, value)
            if isinstance(found, str):
                self.error(value.span, found)
                return None
            if found.kind != "template":
                self.error(value.span, f"'{value.dotted}' is a {found.kind}, not a template")
                return None
            existing = self.templates.get(found.qname)
            if existing is not None:
                return existing
            if found.qname in self._in_progress:
                self.error(
                    value.span,
                    f"template '{value.dotted}' refers to itself, directly or through other templates",
                )
                return None
            self._in_progress.add(found.qname)
            try:
                return self.template_value(self.units[found.unit], found.decl.value, found.qname)
            finally:
                self._in_progress.discard(found.qname)
        else:
            self.error(
                value.span,
                'a template is a string, """text""", file("x.j2"), or the name of a template',
            )
            return None
        try:
            tp.parse_template(tv.text)
        except TemplateError as exc:
            self.error(
                self.template_span(tv, getattr(exc, "line", 1), None), _template_message(exc)
            )
            return None
        self.templates[tv.key] = tv
        return tv

    def template_span(self, tv: TemplateValue, line: int, word: str | None) -> Span:
        """The recipe position of line `line` (1-based) of a template, at `word` when it is found there."""
        src_line = tv.origin.line + line - 1
        column = tv.origin.column if line == 1 else 1
        source = self.sources.get(tv.origin.file)
        if source is not None and word:
            text = source.line(src_line)
            found = re.compile(rf"(?<![\w.]){re.escape(word)}(?!\w)").search(
                text, column - 1 if line == 1 else 0
            )
            if found is not None:
                column = found.start() + 1
        return Span(tv.origin.file, src_line, column, src_line, column + len(word or " "))

    def check_template_use(
        self, tv: TemplateValue, provided: tuple[str, ...], where: str, use: Span
    ) -> None:
        info = tp.parse_template(tv.text)
        for name, line, message in tp.check_variables(info, provided, where=where):
            self.error(
                self.template_span(tv, line, name), message, ((use, f"used by {where} here"),)
            )

    # ---- the recipe's declarations
    def attrs(
        self,
        unit: Unit,
        attrs: tuple[n.Attr, ...],
        kind: sc.Kind,
        what: str,
        where: Span,
        ctx: dict[str, Any],
    ) -> dict[str, Any]:
        """Check attributes against `kind`'s schema; returns name -> checked value (defaults filled)."""
        out: dict[str, Any] = {}
        seen: dict[str, Span] = {}
        for attr in attrs:
            if attr.name in seen:
                self.error(
                    attr.span,
                    f"'{attr.name}' is set twice in this {what}",
                    ((seen[attr.name], "first set here"),),
                )
                continue
            seen[attr.name] = attr.span
            spec = kind.attrs.get(attr.name)
            if spec is None and kind.open_attrs:
                spec = sc.Attr(kind.open_attrs, "")
            if spec is None:
                known = ", ".join(kind.attrs) or "none"
                self.error(
                    attr.span,
                    f"unknown attribute '{attr.name}' for {what}{did_you_mean(attr.name, kind.attrs)} (it takes: {known})",
                )
                continue
            value = self.attr_value(unit, attr, spec, what, ctx)
            if value is not _BAD:
                out[attr.name] = value
        for name, spec in kind.attrs.items():
            if name in seen:
                continue
            if spec.required:
                self.error(where, f"{what} needs `{name}` ({spec.doc})")
            elif spec.default is not None:
                out[name] = spec.default
        return out

    def attr_value(
        self, unit: Unit, attr: n.Attr, spec: sc.Attr, what: str, ctx: dict[str, Any]
    ) -> Any:
        v = attr.value
        label = f"`{attr.name}` of {what}"
        if spec.kind in (sc.INT, sc.NUMBER):
            num = _number(v)
            if num is None or (spec.kind == sc.INT and not float(num).is_integer()):
                self.error(
                    v.span,
                    f"{label} must be {'a whole number' if spec.kind == sc.INT else 'a number'}",
                )
                return _BAD
            low_bad = spec.min is not None and (
                num <= spec.min if spec.min_open else num < spec.min
            )
            high_bad = spec.max is not None and num > spec.max
            if low_bad or high_bad:
                bound = []
                if spec.min is not None:
                    bound.append(f"{'>' if spec.min_open else '>='} {_fmt(spec.min)}")
                if spec.max is not None:
                    bound.append(f"<= {_fmt(spec.max)}")
                self.error(v.span, f"{label} must be {' and '.join(bound)}, got {_fmt(num)}")
                return _BAD
            return int(num) if spec.kind == sc.INT else float(num)
        if spec.kind == sc.STRING:
            if not isinstance(v, n.String):
                self.error(
                    v.span,
                    f"{label} must be a string"
                    + (f" (one of: {', '.join(spec.choices)})" if spec.choices else ""),
                )
                return _BAD
            if spec.choices and v.value not in spec.choices:
                self.error(
                    v.span,
                    f"{label} must be one of {', '.join(repr(c) for c in spec.choices)}, got {v.value!r}{did_you_mean(v.value, spec.choices)}",
                )
                return _BAD
            return v.value
        if spec.kind == sc.BOOL:
            if not isinstance(v, n.Bool):
                self.error(v.span, f"{label} must be true or false")
                return _BAD
            return v.value
        if spec.kind in (sc.MODEL, sc.DATASET):
            return self.named(unit, v, spec.kind, label)
        if spec.kind == sc.DATA:
            if isinstance(v, n.String):
                return {"path": v.value}
            name = self.named(unit, v, sc.DATASET, label)
            return _BAD if name is _BAD else {"dataset": name}
        if spec.kind == sc.TEMPLATE:
            tv = self.template_value(unit, v)
            return _BAD if tv is None else tv.key
        if spec.kind == sc.TEXTS:
            texts = self.texts(unit, v, label)
            return _BAD if texts is None else texts
        if spec.kind == sc.LORA:
            if not isinstance(v, n.MapExpr):
                self.error(v.span, f"{label} must be a map like {{ rank = 16, alpha = 32 }}")
                return _BAD
            lora = self.attrs(
                unit, v.entries, sc.Kind("LoRA settings", sc.LORA_ATTRS), "lora", v.span, ctx
            )
            targets = lora.get("targets")
            if isinstance(targets, list) and "all-linear" in targets and len(targets) > 1:
                at = next(e.value.span for e in v.entries if e.name == "targets")
                self.error(at, '"all-linear" already names every linear layer: give it alone')
            return lora
        if spec.kind in (sc.EXPR_BOOL, sc.EXPR_NUMBER):
            context = "filter" if spec.kind == sc.EXPR_BOOL else "score"
            scope = (
                {"prompt": bi.TEXT}
                if context == "filter"
                else {
                    "prompt": bi.TEXT,
                    "response": bi.TEXT,
                    **{s: bi.NUMBER for s in ctx.get("scores", ())},
                }
            )
            t, ir = self.expr(unit.key, v, scope, context)
            want = bi.BOOL if context == "filter" else bi.NUMBER
            if t not in (want, ERROR):
                self.error(v.span, f"{label} must be a {want} expression, but this is a {t}")
                return _BAD
            return _BAD if t == ERROR else {"expr": ir}
        raise AssertionError(spec.kind)  # pragma: no cover

    def named(self, unit: Unit, v: n.Expr, kind: str, label: str) -> Any:
        if not isinstance(v, n.Ref) or len(v.parts) != 1:
            self.error(v.span, f"{label} must name a {kind} declared in the recipe")
            return _BAD
        found = self.symbols[unit.key].get(v.parts[0])
        if found is None or found.kind != kind:
            known = [s for s, sym in self.symbols[unit.key].items() if sym.kind == kind]
            what = (
                f"'{v.parts[0]}' is a {found.kind}, not a {kind}"
                if found
                else f"unknown {kind} '{v.parts[0]}'"
            )
            self.error(v.span, f"{what}{did_you_mean(v.parts[0], known)}")
            return _BAD
        return v.parts[0]

    def texts(self, unit: Unit, v: n.Expr, label: str) -> list[str] | None:
        if isinstance(v, n.Ref):
            found = self.lookup(unit.key, v)
            if isinstance(found, str):
                self.error(v.span, found)
                return None
            if found.kind != "let":
                self.error(
                    v.span, f"{label} must be a list of texts; '{v.dotted}' is a {found.kind}"
                )
                return None
            if found.qname in self.cyclic or found.qname in self._in_progress:
                return None  # the cycle is reported at the let
            self._in_progress.add(found.qname)
            try:
                return self.texts(self.units[found.unit], found.decl.value, label)
            finally:
                self._in_progress.discard(found.qname)
        if isinstance(v, n.ListExpr) and v.items and all(isinstance(i, n.String) for i in v.items):
            return [str(i.value) for i in v.items]  # type: ignore[union-attr]
        self.error(v.span, f"{label} must be a non-empty list of strings")
        return None

    def recipe_block(self, main: Unit) -> dict[str, Any]:
        for decl in main.module.decls:
            if isinstance(decl, n.Recipe):
                out = self.attrs(
                    main, decl.attrs, sc.DECLS["recipe"], "the recipe block", decl.span, {}
                )
                out["name"] = decl.name
                if not decl.name.strip():
                    self.error(decl.span, "the recipe needs a non-empty name")
                return out
        return {}

    def models(self, main: Unit) -> dict[str, dict[str, Any]]:
        out = {}
        for decl in main.module.decls:
            if isinstance(decl, n.Model):
                attrs = self.attrs(
                    main, decl.attrs, sc.DECLS["model"], f"model '{decl.name}'", decl.span, {}
                )
                path = attrs.get("path", "")
                if isinstance(path, str) and path.startswith("ralign:"):
                    name = path[len("ralign:") :]
                    if name not in sc.BUILTIN_MODELS:
                        span = next(a.value.span for a in decl.attrs if a.name == "path")
                        self.error(
                            span,
                            f"unknown built-in model '{path}' (built in: {', '.join('ralign:' + m for m in sc.BUILTIN_MODELS)}){did_you_mean(name, sc.BUILTIN_MODELS)}",
                        )
                out[decl.name] = attrs
        return out

    def pick_policy(self, main: Unit, models: dict[str, dict[str, Any]]) -> str:
        if self.library or not any(isinstance(d, n.Recipe) for d in main.module.decls):
            return ""
        if "policy" in models:
            return "policy"
        if len(models) == 1:
            return next(iter(models))
        recipe = next(d for d in main.module.decls if isinstance(d, n.Recipe))
        if not models:
            self.error(
                recipe.span,
                'the recipe declares no model; add one, e.g. `model policy { path = "ralign:smollm2-135m" }`',
            )
        else:
            self.error(
                recipe.span,
                f"the recipe declares several models ({', '.join(models)}); name the one to train `policy`",
            )
        return ""

    def datasets(self, main: Unit) -> dict[str, dict[str, Any]]:
        out = {}
        for decl in main.module.decls:
            if isinstance(decl, n.Dataset):
                attrs = self.attrs(
                    main, decl.attrs, sc.DECLS["dataset"], f"dataset '{decl.name}'", decl.span, {}
                )
                path_attr = next((a for a in decl.attrs if a.name == "path"), None)
                if path_attr is not None and "path" in attrs:
                    resolved = self.data_path(main, attrs["path"], path_attr.value.span)
                    if resolved is not None:
                        attrs.update(resolved)
                out[decl.name] = attrs
        return out

    def data_path(self, unit: Unit, path: str, span: Span) -> dict[str, Any] | None:
        """Hub names pass through; a built-in set is hashed; a local file must exist inside the roots, and is hashed."""
        if path.startswith("ralign:"):
            name = path[len("ralign:") :]
            if name not in sc.BUILTIN_DATASETS:
                self.error(
                    span,
                    f"unknown built-in dataset '{path}' (built in: {', '.join('ralign:' + d for d in sc.BUILTIN_DATASETS)}){did_you_mean(name, sc.BUILTIN_DATASETS)}",
                )
                return None
            from ralign.runtime.builtin_data import resolve_dataset

            # Built-in sets change with ralign's releases; hashing them keeps a cached step from
            # outliving the data it was computed from.
            file = resolve_dataset(name)
            return {"sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
        if path.startswith("hf:"):
            return {}
        if "\0" in path:
            self.error(span, "a data file name may not contain a NUL character")
            return None
        file = unit.folder / path
        if not confined(file, self.loaded.roots):
            self.error(
                span,
                f"data file '{path}' is outside the recipe's folder and the --root folders; refusing to read it",
            )
            return None
        if not file.is_file():
            self.error(
                span, f"data file '{path}' does not exist (paths are relative to the recipe)"
            )
            return None
        if file.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
            self.error(span, f"data file '{path}' must be .jsonl, .json, .csv or .parquet")
            return None
        rel = Path(_relpath(file.resolve(), self.loaded.recipe_dir)).as_posix()
        return {"path": rel, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}

    def evaluations(self, main: Unit, datasets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for decl in main.module.decls:
            if not isinstance(decl, n.Evaluate):
                continue
            attrs = self.attrs(
                main, decl.attrs, sc.DECLS["evaluate"], f"evaluate '{decl.name}'", decl.span, {}
            )
            choices = sc.DECLS["evaluate"].attrs["task"].choices
            if "task" not in attrs:
                if decl.name in choices:
                    attrs["task"] = decl.name
                else:
                    self.error(
                        decl.span,
                        f"evaluate '{decl.name}' needs `task` (one of: {', '.join(choices)}){did_you_mean(decl.name, choices)}",
                    )
            if "reward" in attrs and attrs.get("task") != "behavior":
                span = next(a.value.span for a in decl.attrs if a.name == "reward")
                self.error(span, "`reward` applies to behavior evaluations only")
            data = attrs.get("data")
            if isinstance(data, dict) and "path" in data:
                span = next(a.value.span for a in decl.attrs if a.name == "data")
                path = data["path"]
                resolved = self.data_path(main, path, span)
                if resolved is not None:
                    attrs["data"] = {"path": path, **resolved}
            elif isinstance(data, dict) and "dataset" in data:
                attrs["data"] = {
                    "dataset": data["dataset"],
                    **{k: v for k, v in datasets.get(data["dataset"], {}).items()},
                }
            attrs["name"] = decl.name
            attrs["line"] = decl.span.line
            out.append(attrs)
        return out

    # ---- steps and data flow
    def steps(
        self, main: Unit, models: dict[str, Any], datasets: dict[str, Any]
    ) -> list[CheckedStep]:
        out: list[CheckedStep] = []
        have: dict[str, Any] = {
            "prompts": None,
            "responses": None,
            "revised": None,
            "pairs": None,
            "context": None,
        }
        scores: dict[str, Span] = {}
        latest: list[str] = []
        for phase in (d for d in main.module.decls if isinstance(d, n.Phase)):
            for step in phase.steps:
                checked = self.step(main, phase, step, have, scores, latest)
                if checked is not None:
                    out.append(checked)
        return out

    def step(
        self,
        main: Unit,
        phase: n.Phase,
        step: n.Step,
        have: dict[str, Any],
        scores: dict[str, Span],
        latest: list[str],
    ) -> CheckedStep | None:
        kind_name = step.kind
        if step.kind == "train":
            if step.name is None:
                self.error(
                    step.span,
                    f"`train` needs a method: {' or '.join('train ' + m for m in sc.TRAIN_METHODS)}",
                )
                return None
            if step.name not in sc.TRAIN_METHODS:
                self.error(
                    step.name_span or step.span,
                    f"unknown training method '{step.name}'{did_you_mean(step.name, sc.TRAIN_METHODS)} (known: {', '.join(sc.TRAIN_METHODS)})",
                )
                return None
            kind_name = f"train {step.name}"
        elif step.kind not in sc.STEPS:
            self.error(
                step.span,
                f"unknown step kind '{step.kind}'{did_you_mean(step.kind, sc.STEP_KINDS)} (known: {', '.join(sc.STEP_KINDS)})",
            )
            return None
        kind = sc.STEPS[kind_name]
        if kind.named == "required" and step.name is None:
            self.error(
                step.span,
                f"a {step.kind} step needs a name for the score it makes: `{step.kind} NAME {{ ... }}`",
            )
            return None
        if kind.named == "no" and step.kind != "train" and step.name is not None:
            self.error(
                step.name_span or step.span,
                f"a {step.kind} step takes no name (write `{step.kind} {{ ... }}`)",
            )
            return None
        what = f"the {kind_name} step"
        params = self.attrs(main, step.attrs, kind, what, step.span, {"scores": tuple(scores)})
        if step.kind == "rank" and not any(a.name == "judge" for a in step.attrs) and self.policy:
            params["judge"] = self.policy  # the default judge is the policy, whatever its name
        if kind.open_attrs and not step.attrs:
            self.error(step.span, f"{what} defines no score; write e.g. `score {{ total = ... }}`")
        templates = {a: params[a] for a in kind.template_vars if isinstance(params.get(a), str)}
        exprs = {
            a: params.pop(a)["expr"]
            for a in list(params)
            if isinstance(params[a], dict) and "expr" in params[a]
        }
        for attr, key in templates.items():
            provided = kind.template_vars[attr]
            if step.kind == "rank" and params.get("mode") == "pointwise":
                provided = sc.POINTWISE_VARS
            use = next(a.span for a in step.attrs if a.name == attr)
            self.check_template_use(self.templates[key], provided, f"the {kind_name} step", use)

        inputs, outputs = self.flow(step, kind_name, params, exprs, have, scores, latest)
        return CheckedStep(
            phase.name, kind_name, step.name, step.span, params, templates, exprs, inputs, outputs
        )

    def flow(
        self,
        step: n.Step,
        kind: str,
        params: dict[str, Any],
        exprs: dict[str, Any],
        have: dict[str, Any],
        scores: dict[str, Span],
        latest: list[str],
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Check what `step` needs against what earlier steps in the round made; update the state."""

        def need(what: str, hint: str) -> None:
            if have.get(what) is None:
                self.error(
                    step.span,
                    f"`{kind}` needs {what}, but no step before it in the round produces {what}; {hint}",
                )

        def pick_score(label: str) -> str | None:
            by = params.get("by")
            if by is not None:
                if by not in scores:
                    self.error(
                        step.span,
                        f"`{kind}` uses the score '{by}', which no earlier step makes{did_you_mean(by, scores)}",
                    )
                    return None
                return str(by)
            if not latest:
                self.error(
                    step.span,
                    f"`{kind}` needs a score to {label}, but no step before it in the round makes one; add a `rank NAME {{ ... }}` or `score {{ total = ... }}` step before it",
                )
                return None
            return "total" if "total" in scores else latest[-1]

        if kind == "generate":
            have.update(prompts=step.span)
            return ("dataset",), ("prompts",)
        if kind in ("dedupe", "filter"):
            need(
                "prompts", "add a `generate` step before it, or filter the dataset you sample from"
            )
            return ("prompts",), ("prompts",)
        if kind == "sample":
            if not any(a.name == "from" for a in step.attrs):
                need(
                    "prompts",
                    "add a `generate` step before it, or give it a dataset: `sample { from = NAME }`",
                )
            have.update(responses=step.span, revised=None, pairs=None, context="context" in params)
            scores.clear()
            latest.clear()
            return (("dataset",) if "from" in params else ("prompts",)), ("responses",)
        if kind == "revise":
            need("responses", "add a `sample` step before it")
            have.update(revised=step.span)
            return ("responses",), ("responses",)
        if kind in ("rank", "score"):
            need("responses", "add a `sample` step before it")
            names = [str(step.name)] if kind == "rank" else list(exprs)
            used = sorted({v for ir in exprs.values() for v in score_vars(ir)} & set(scores))
            for name in names:
                if name in scores:
                    self.error(
                        step.name_span or step.span,
                        f"the score '{name}' is already made earlier in the round",
                        ((scores[name], "made here"),),
                    )
                scores[name] = step.span
                latest.append(name)
            made = ("responses",) + tuple(f"score:{s}" for s in used)
            return made, tuple(f"score:{n_}" for n_ in names)
        if kind == "pairs":
            need("responses", "add a `sample` step before it")
            by = pick_score("build pairs by")
            if by:
                params["by"] = by
            have.update(pairs=step.span)
            return ("responses", f"score:{by}"), ("pairs",)
        if kind == "train sft":
            need("responses", "add a `sample` step before it")
            on = params.get("on")
            if on == "revised" and have.get("revised") is None:
                self.error(
                    step.span,
                    '`train sft` with on = "revised" needs revised answers, but no `revise` step comes before it in the round',
                )
            ins: tuple[str, ...] = ("responses", "policy")
            if "min_score" in params and on == "revised":
                self.error(
                    step.span,
                    '`min_score` needs scored answers: use it with on = "best" or "all", not "revised"',
                )
            if on == "best" or (on == "all" and "min_score" in params):
                by = pick_score("pick the best answer by")
                if by:
                    params["by"] = by
                    ins += (f"score:{by}",)
            if params.get("drop_context") and not have.get("context"):
                self.error(
                    step.span,
                    "`drop_context = true` needs a `sample` step with a `context` template before it",
                )
            return ins, ("policy",)
        if kind == "train dpo":
            need("pairs", 'add a `pairs { chosen = "best", rejected = "worst" }` step before it')
            return ("pairs", "policy"), ("policy",)
        raise AssertionError(kind)  # pragma: no cover


_BAD = object()

_CONTEXT_WORDS = {
    "let": "a `let` is a constant: it cannot read `prompt`, `response` or rewards",
    "def": "a def sees only its parameters",
    "filter": "a filter sees only `prompt`",
    "reward": "rules see `prompt` and `response`",
    "score": "score sees `prompt`, `response`, the round's scores and rewards",
}


def _template_message(exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith("template") else f"template: {text}"


def score_vars(ir: Any) -> set[str]:
    """Names an expression IR reads as variables (other than prompt and response)."""
    out: set[str] = set()
    stack = [ir]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            if len(node) == 2 and node[0] == "var" and node[1] not in ("prompt", "response"):
                out.add(node[1])
            else:
                stack.extend(node)
    return out


def _number(v: n.Expr) -> float | None:
    if isinstance(v, n.Number):
        return v.value
    if isinstance(v, n.Unary) and v.op == "-" and isinstance(v.operand, n.Number):
        return -v.operand.value
    return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _inline_key(text: str) -> str:
    return "inline:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def _display(path: Path, unit: Unit, loaded: Loaded) -> str:
    """How a template file is named in messages and plans: relative to the recipe, or std/..."""
    if unit.key.startswith("std/"):
        return "std/" + path.name
    return Path(_relpath(path.resolve(), loaded.recipe_dir)).as_posix()


def _bodies(decl: Any) -> list[n.Expr]:
    if isinstance(decl, n.Let):
        return [decl.value]
    if isinstance(decl, n.Def):
        return [decl.body]
    if isinstance(decl, n.Reward):
        return [e for r in decl.rules for e in (r.value, r.when) if e is not None]
    return []


def _children(e: n.Expr) -> list[n.Expr]:
    match e:
        case n.Call(func=f, args=a):
            return [f, *a]
        case n.Unary(operand=x):
            return [x]
        case n.Binary(left=a, right=b):
            return [a, b]
        case n.ListExpr(items=items):
            return list(items)
        case n.MapExpr(entries=entries):
            return [a.value for a in entries]
    return []


def _refs(exprs: list[n.Expr]) -> list[n.Ref]:
    """Every name an expression mentions, including called functions."""
    out: list[n.Ref] = []
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if isinstance(e, n.Ref):
            out.append(e)
        stack.extend(_children(e))
    return out


def _is_call_target(body: n.Expr, ref: n.Ref) -> bool:
    """Whether `ref` is the function of a call to a builtin or `agree` in `body`."""
    stack = [body]
    while stack:
        e = stack.pop()
        if isinstance(e, n.Call) and e.func is ref:
            return ref.dotted in bi.BUILTINS or ref.dotted == "agree"
        stack.extend(_children(e))
    return False


def check(loaded: Loaded, *, library: bool = False) -> Checked:
    """Run every check over a loaded recipe (or library); raise RecipeError with all diagnostics."""
    try:
        return Checker(loaded, library=library).run()
    except RecursionError:  # declarations chained deeper than the checker can follow
        span = Span(loaded.main, 1, 1)
        message = "the declarations refer to one another too deeply to check (a chain of hundreds of lets, defs or rewards)"
        raise RecipeError([Diagnostic(span, message)], dict(loaded.sources)) from None
