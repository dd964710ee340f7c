"""The compile pipeline as one short chain: load -> override -> check -> lower."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

from ralign import nodes as n
from ralign import overrides as ov
from ralign.check import Checked, check
from ralign.imports import Loaded, load
from ralign.lower import lower
from ralign.plan import Plan, with_hashes

P = ParamSpec("P")
R = TypeVar("R")


def _no_cycle_collection(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with Python's cyclic garbage collector paused.

    Parsing and checking allocate many objects that stay alive (tokens, nodes, spans, diagnostics)
    and make few cycles; the collector would rescan them all again and again as they pile up, a
    third of `ralign check` on a recipe of 20,000 lines (bench/compile.py). The collection waits
    until the end instead.
    """

    @wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


def _loaded(
    path: Path,
    roots: tuple[Path, ...],
    sets: tuple[str, ...],
    smoke: bool,
    parser_kind: str = "lalr",
) -> tuple[Loaded, tuple[str, ...]]:
    """The recipe and its imports, with `--smoke` and `--set` overrides applied (in that order)."""
    loaded = load(path, roots, parser_kind)
    flags = (*(ov.smoke_flags(loaded) if smoke else ()), *sets)
    return ov.apply(loaded, flags), flags


@_no_cycle_collection
def check_file(
    path: Path, roots: tuple[Path, ...] = (), sets: tuple[str, ...] = (), smoke: bool = False
) -> Checked:
    """Parse and check a recipe or library file (and its imports); raises RecipeError."""
    loaded, _ = _loaded(path, roots, sets, smoke)
    main = loaded.units[loaded.main].module
    is_library = not any(
        isinstance(d, (n.Recipe, n.Model, n.Dataset, n.Phase, n.Evaluate)) for d in main.decls
    )
    return check(loaded, library=is_library)


@_no_cycle_collection
def compile_file(
    path: str | os.PathLike[str],
    roots: tuple[str | os.PathLike[str], ...] = (),
    plan_path: str | os.PathLike[str] | None = None,
    parser_kind: str = "lalr",
    sets: tuple[str, ...] = (),
    smoke: bool = False,
) -> Plan:
    """Compile a recipe into a plan.

    Args:
        path: the recipe file.
        roots: further folders its imports and data may come from.
        plan_path: where the plan will be written; sets the (unhashed) `recipe_dir` relative to it.
        parser_kind: the Lark parser: "lalr" ("earley" exists only for bench/compile.py).
        sets: `--set TARGET.ATTR=VALUE` overrides, recorded in the plan.
        smoke: shrink every count, answer and epoch for a quick trial run (`--smoke`).
    """
    recipe = Path(path)
    loaded, flags = _loaded(recipe, tuple(Path(r) for r in roots), sets, smoke, parser_kind)
    plan = lower(check(loaded))
    if flags:
        plan = with_hashes(replace(plan, overrides=flags))
    if plan_path is not None:
        rel = os.path.relpath(recipe.resolve().parent, Path(plan_path).resolve().parent)
        plan = replace(plan, recipe_dir=Path(rel).as_posix())
    return plan
