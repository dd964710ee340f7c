"""Pass `names`: each file's symbol table, what a library may declare, and name lookup for the later passes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ralign import nodes as n
from ralign.check.context import Context, Symbol, Work, qualify
from ralign.errors import did_you_mean
from ralign.imports import Unit
from ralign.source import Span

Suggest = Callable[..., str]  # (name, *pools of known names) -> " did you mean ..." or ""


def _suggest(name: str, *pools: Iterable[str]) -> str:
    return did_you_mean(name, [k for p in pools for k in p])


RECIPE_ONLY = (n.Recipe, n.Model, n.Dataset, n.Phase, n.Evaluate)
KEYWORDS = {
    n.Let: "let",
    n.Def: "def",
    n.Reward: "reward",
    n.Template: "template",
    n.Model: "model",
    n.Dataset: "dataset",
}


def names(ctx: Context) -> Context:
    """Build every file's symbol table; a library holds no recipe parts, a recipe has one recipe block."""
    w = Work(ctx)
    tables = {}
    for unit in ctx.loaded.units.values():
        _recipe_parts(w, unit, is_main=unit.key == ctx.loaded.main)
        tables[unit.key] = _table(w, unit)
    return w.finish(symbols=tables)


def _recipe_parts(w: Work, unit: Unit, is_main: bool) -> None:
    recipes = [d for d in unit.module.decls if isinstance(d, n.Recipe)]
    if not is_main or w.ctx.library:
        for decl in unit.module.decls:
            if isinstance(decl, RECIPE_ONLY):
                what = type(decl).__name__.lower()
                w.error(
                    decl.span,
                    f"a library may not declare a {what}: libraries hold only import, let, def, reward and template",
                )
    elif not recipes:
        w.error(
            Span(unit.key, 1, 1),
            'this file has no `recipe "name" { ... }` block; a recipe file needs exactly one '
            "(a library holds only import, let, def, reward and template)",
        )
    for extra in recipes[1:]:
        w.error(
            extra.span,
            "a recipe file has exactly one recipe block; this is a second one",
            ((recipes[0].span, "the first one"),),
        )


def _table(w: Work, unit: Unit) -> dict[str, Symbol]:
    table: dict[str, Symbol] = {}
    aliases = unit.alias_map()
    for decl in unit.module.decls:
        keyword = KEYWORDS.get(type(decl))
        if keyword is None:
            continue
        name = decl.name  # type: ignore[union-attr]  # every keyword's node has a name
        if name in table:
            w.error(
                decl.span,
                f"'{name}' is already declared in this file",
                ((table[name].decl.span, "first declared here"),),
            )
        elif name in aliases:
            w.error(decl.span, f"'{name}' is already the name of an imported namespace")
        else:
            table[name] = Symbol(keyword, qualify(unit.key, name), decl, unit.key)
    return table


def lookup(
    ctx: Context,
    unit: str,
    ref: n.Ref,
    scope: dict[str, str] | None = None,
    suggest: Suggest | None = None,
) -> Symbol | str:
    """The symbol `ref` names from `unit`, or an error message (a local of `scope` is the caller's).

    `suggest(name, *pools)` makes the "did you mean" hint (a pass's budgeted `Work.suggest`)."""
    suggest = suggest or _suggest
    table = ctx.symbols[unit]
    aliases = ctx.loaded.units[unit].alias_map()
    if len(ref.parts) == 1:
        name = ref.parts[0]
        if name in table:
            return table[name]
        if name in aliases:
            inside = next(iter(ctx.symbols[aliases[name]]), "x")
            return f"'{name}' is an imported namespace; name something inside it, like '{name}.{inside}'"
        return f"unknown name '{name}'{suggest(name, table, scope or {})}"
    if len(ref.parts) > 2:
        return f"'{ref.dotted}': only one level of namespace (`alias.name`) exists; there is no attribute access"
    alias, name = ref.parts
    if alias not in aliases:
        return f"unknown namespace '{alias}'{suggest(alias, aliases, scope or {})}"
    other = ctx.symbols[aliases[alias]]
    if name not in other:
        return f"'{alias}' has no '{name}'{suggest(name, other)}"
    return other[name]
