"""The compile pipeline as one short chain: load -> check -> lower."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ralign import nodes as n
from ralign.check import Checked, check
from ralign.imports import load
from ralign.lower import lower
from ralign.plan import Plan


def check_file(path: Path, roots: tuple[Path, ...] = ()) -> Checked:
    """Parse and check a recipe or library file (and its imports); raises RecipeError."""
    loaded = load(path, roots)
    main = loaded.units[loaded.main].module
    is_library = not any(
        isinstance(d, (n.Recipe, n.Model, n.Dataset, n.Phase, n.Evaluate)) for d in main.decls
    )
    return check(loaded, library=is_library)


def compile_file(
    path: Path,
    roots: tuple[Path, ...] = (),
    plan_path: Path | None = None,
    parser_kind: str = "lalr",
) -> Plan:
    """Compile a recipe into a plan.

    Args:
        path: the recipe file.
        roots: further folders its imports and data may come from.
        plan_path: where the plan will be written; sets the (unhashed) `recipe_dir` relative to it.
        parser_kind: the Lark parser: "lalr" ("earley" exists only for bench/compile.py).
    """
    plan = lower(check(load(path, roots, parser_kind)))
    if plan_path is not None:
        rel = os.path.relpath(path.resolve().parent, plan_path.resolve().parent)
        plan = replace(plan, recipe_dir=Path(rel).as_posix())
    return plan
