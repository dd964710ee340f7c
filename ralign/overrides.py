"""`--set TARGET.ATTR=VALUE`: change a recipe's attribute from the command line, and `--smoke`.

An override is parsed like recipe text (its value is an expression) and put into the recipe's
syntax tree in place of the attribute (or beside the others), so the checker checks it as it
checks the recipe, and its errors point at the flag. The plan records every override.

TARGET is `recipe`, a model, dataset or evaluate name, or a step as `ralign compile` lists it:
`PHASE/KIND` with `.NAME` for a named step (`judge/rank.quality`, `distill/train.dpo`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ralign import nodes as n
from ralign.errors import Diagnostic, RecipeError, did_you_mean
from ralign.imports import Loaded
from ralign.source import Source, Span
from ralign.syntax import parse_value


@dataclass(frozen=True)
class Override:
    """One `--set`: where it came from (for messages), its target, attribute and parsed value."""

    flag: str
    target: str
    attr: str
    value: n.Expr


def parse(flag: str) -> tuple[Override, Source]:
    """Parse `TARGET.ATTR=VALUE`; RecipeError (pointing at the flag) when it is malformed."""
    head, eq, text = flag.partition("=")
    target, dot, attr = head.strip().rpartition(".")
    source = Source(f"--set {head.strip()}", text)
    if not eq or not dot or not target or not attr.isidentifier():
        span = Span(source.name, 1, 1)
        message = f"--set {flag!r}: write TARGET.ATTR=VALUE, e.g. --set policy.path='\"ralign:tiny-llama\"'"
        raise RecipeError([Diagnostic(span, message)], {source.name: Source(source.name, flag)})
    return Override(flag, target, attr, parse_value(source)), source


def apply(loaded: Loaded, flags: tuple[str, ...]) -> Loaded:
    """`loaded` with each override put into the main file's declarations (all errors at once)."""
    if not flags:
        return loaded
    problems: list[Diagnostic] = []
    sources = dict(loaded.sources)
    unit = loaded.units[loaded.main]
    decls = list(unit.module.decls)
    for flag in flags:
        try:
            override, source = parse(flag)
        except RecipeError as exc:
            problems += exc.diagnostics
            sources.update(exc.sources)
            continue
        sources[source.name] = source
        at = _find(decls, override.target)
        if isinstance(at, str):
            problems.append(Diagnostic(Span(source.name, 1, 1), at))
            continue
        decls[at[0]] = _with_attr(decls[at[0]], at[1], override)
    if problems:
        raise RecipeError(problems, sources)
    module = replace(unit.module, decls=tuple(decls))
    units = {**loaded.units, loaded.main: replace(unit, module=module)}
    return replace(loaded, units=units, sources=sources)


def _targets(decls: list[Any]) -> dict[str, tuple[int, int | None]]:
    """Every name an override may target -> (declaration index, step index within a phase)."""
    out: dict[str, tuple[int, int | None]] = {}
    for i, d in enumerate(decls):
        if isinstance(d, n.Recipe):
            out["recipe"] = (i, None)
        elif isinstance(d, (n.Model, n.Dataset, n.Evaluate)):
            out[d.name] = (i, None)
        elif isinstance(d, n.Phase):
            seen: list[str] = []
            for j, step in enumerate(d.steps):
                label = f"{d.name}/{step.kind}" + (f".{step.name}" if step.name else "")
                ident, k = label, 2
                while ident in seen:  # numbered as the plan numbers a repeated step
                    ident, k = f"{label}#{k}", k + 1
                seen.append(ident)
                out[ident] = (i, j)
    return out


def _find(decls: list[Any], target: str) -> tuple[int, int | None] | str:
    known = _targets(decls)
    if target in known:
        return known[target]
    return f"--set: the recipe has no '{target}'{did_you_mean(target, known)} (it has: {', '.join(known)})"


def _with_attr(decl: Any, step: int | None, override: Override) -> Any:
    """`decl` (or its step number `step`) with the attribute replaced or added."""
    holder = decl.steps[step] if step is not None else decl
    attr = n.Attr(override.value.span, override.attr, override.value)
    attrs = [a for a in holder.attrs if a.name != override.attr] + [attr]
    holder = replace(holder, attrs=tuple(attrs))
    if step is None:
        return holder
    steps = list(decl.steps)
    steps[step] = holder
    return replace(decl, steps=tuple(steps))


# ---- --smoke ------------------------------------------------------------------------------------

# What `--smoke` sets, per declaration or step kind: a run small enough to go through in about a
# minute, which still runs every step (a smaller value in the recipe is kept).
SMOKE: dict[str, dict[str, int]] = {
    "dataset": {"limit": 4},
    "evaluate": {"limit": 4, "max_new_tokens": 8},
    "generate": {"count": 4, "max_new_tokens": 16},
    "sample": {"per_prompt": 2, "max_new_tokens": 8},
    "revise": {"times": 1, "max_new_tokens": 8},
    "rank": {"orders": 1, "samples": 1},
    "train sft": {"epochs": 1},
    "train dpo": {"epochs": 1},
    "calibrate": {"max_new_tokens": 8},
}
# Floors a recipe sets are lifted (only where it sets them): a few answers of a tiny model must
# not leave a step with nothing to train on.
RELAX: dict[str, dict[str, float]] = {
    "train sft": {"min_score": -1e9},
    "pairs": {"min_margin": 0, "min_score": -1e9},
}


def smoke_flags(loaded: Loaded) -> tuple[str, ...]:
    """The overrides `--smoke` stands for, for this recipe."""
    flags = []
    decls: list[Any] = list(
        loaded.units[loaded.main].module.decls
    )  # phases and their steps, by index
    for target, (i, j) in _targets(decls).items():
        decl = decls[i]
        holder = decl.steps[j] if j is not None else decl
        if j is None:
            kind = type(decl).__name__.lower()
        else:
            kind = f"train {holder.name}" if holder.kind == "train" else holder.kind
        given = {a.name: a.value for a in holder.attrs}
        for attr, small in SMOKE.get(kind, {}).items():
            value = given.get(attr)
            if not (isinstance(value, n.Number) and value.value <= small):
                flags.append(f"{target}.{attr}={small}")
        for attr, low in RELAX.get(kind, {}).items():
            if attr in given:
                flags.append(f"{target}.{attr}={low:g}")
    return tuple(flags)
