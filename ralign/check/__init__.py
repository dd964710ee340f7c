"""Check a loaded recipe: a tuple of passes over an immutable context, every problem reported together.

Each pass is a plain function `Context -> Context` with its own error cases in
`tests/cases/errors/<pass>.ralign`. What survives them all is a `Checked` value: resolved, typed
and ready to lower into a plan.
"""

from __future__ import annotations

from collections.abc import Callable

from ralign.check.context import Checked, CheckedStep, Context, TemplateValue
from ralign.check.declarations import declarations
from ralign.check.flow import flow
from ralign.check.names import names
from ralign.check.programs import expressions
from ralign.check.recursion import recursion
from ralign.check.steps import steps
from ralign.check.templates import templates
from ralign.errors import Diagnostic, RecipeError
from ralign.imports import Loaded
from ralign.source import Span

__all__ = ["PASSES", "Checked", "CheckedStep", "TemplateValue", "check"]

PASSES: tuple[Callable[[Context], Context], ...] = (
    names,
    recursion,
    expressions,
    declarations,
    steps,
    templates,
    flow,
)


def check(loaded: Loaded, *, library: bool = False) -> Checked:
    """Run every pass over a loaded recipe (or library); raise RecipeError with all diagnostics."""
    ctx = Context(loaded, library, sources=dict(loaded.sources))
    try:
        for check_pass in PASSES:
            ctx = check_pass(ctx)
    except RecursionError:  # declarations chained deeper than the checker can follow
        span = Span(loaded.main, 1, 1)
        message = "the declarations refer to one another too deeply to check (a chain of hundreds of lets, defs or rewards)"
        raise RecipeError([Diagnostic(span, message)], dict(loaded.sources)) from None
    if ctx.diagnostics:
        raise RecipeError(list(dict.fromkeys(ctx.diagnostics)), dict(ctx.sources))
    return _checked(ctx)


def _checked(ctx: Context) -> Checked:
    main = ctx.loaded.units[ctx.loaded.main]
    return Checked(
        recipe=ctx.recipe.get("name", ""),
        log_with=tuple(filter(None, [ctx.recipe.get("log_with")])),
        rounds=int(ctx.recipe.get("rounds", 1)),
        seed=int(ctx.recipe.get("seed", 0)),
        policy=ctx.policy,
        models=ctx.models,
        datasets=ctx.datasets,
        templates=ctx.templates,
        programs=ctx.programs,
        steps=ctx.steps,
        evaluations=ctx.evaluations,
        sources=ctx.sources,
        recipe_dir=ctx.loaded.recipe_dir,
        main=ctx.loaded.main,
        aliases=main.alias_map(),
    )
