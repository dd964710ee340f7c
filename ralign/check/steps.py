"""Pass `steps`: each phase step is a known kind, named as its kind requires, with valid attributes."""

from __future__ import annotations

from typing import Any

from ralign import nodes as n
from ralign import schema as sc
from ralign.check.attrs import check_attrs
from ralign.check.context import CheckedStep, Context, Work
from ralign.check.declarations import resolve_data
from ralign.check.flow import advance


def steps(ctx: Context) -> Context:
    """Check every step of every phase, in order; the round's scores so far are in scope for `score`."""
    w = Work(ctx)
    main = ctx.loaded.units[ctx.loaded.main]
    state, out = sc.Flow(), []
    for phase in ctx.decls(n.Phase):
        for step in phase.steps:
            kind = _kind(w, step)
            if kind is None:
                continue
            checked = _step(w, main, phase, step, kind, tuple(s for s, _ in state.scores))
            out.append(checked)
            state = advance(state, checked)
    return w.finish(steps=tuple(out))


def _kind(w: Work, step: n.Step) -> sc.StepKind | None:
    """The step's kind, or None after reporting an unknown kind or a wrongly named step."""
    name = step.kind
    if step.kind == "train":
        methods = sc.TRAIN_METHODS
        if step.name is None:
            w.error(
                step.span, f"`train` needs a method: {' or '.join('train ' + m for m in methods)}"
            )
            return None
        if step.name not in methods:
            w.error(
                step.name_span or step.span,
                f"unknown training method '{step.name}'{w.suggest(step.name, methods)} (known: {', '.join(methods)})",
            )
            return None
        name = f"train {step.name}"
    elif step.kind not in sc.STEP_KINDS:
        w.error(
            step.span,
            f"unknown step kind '{step.kind}'{w.suggest(step.kind, sc.STEP_KINDS)} (known: {', '.join(sc.STEP_KINDS)})",
        )
        return None
    kind = sc.STEPS[name]
    if kind.named == "required" and step.name is None:
        w.error(
            step.span,
            f"a {step.kind} step needs a name for the score it makes: `{step.kind} NAME {{ ... }}`",
        )
        return None
    if kind.named == "no" and step.kind != "train" and step.name is not None:
        w.error(
            step.name_span or step.span,
            f"a {step.kind} step takes no name (write `{step.kind} {{ ... }}`)",
        )
        return None
    return kind


def _step(
    w: Work, main: Any, phase: n.Phase, step: n.Step, kind: sc.StepKind, scores: tuple[str, ...]
) -> CheckedStep:
    what = f"the {kind.name} step"
    params = check_attrs(
        w, main, step.attrs, kind.attrs, what, step.span, scores=scores, open_type=kind.open_attrs
    )
    if kind.settle is not None:
        kind.settle(params)
    if "judge" in kind.attrs and "judge" not in params and w.ctx.policy:
        params["judge"] = w.ctx.policy  # the default judge is the policy, whatever its name
    if kind.open_attrs and not step.attrs:
        w.error(step.span, f"{what} defines no score; write e.g. `score {{ total = ... }}`")
    source = w.ctx.datasets.get(params.get("from", ""), {}).get("path", "")
    if isinstance(source, str) and source.startswith(sc.EVAL_SETS):
        at = next(a.value.span for a in step.attrs if a.name == "from")
        w.error(
            at,
            f"'{source}' is an evaluation set: steps never read evaluation prompts (sample from a seed set such as ralign:seeds/hhh)",
        )
    for attr in step.attrs:
        rule = kind.attrs.get(attr.name)
        if rule is not None and rule.type == sc.DATA and attr.name in params:
            params[attr.name] = _step_data(w, main, params[attr.name], attr.value.span)
    templates = {a: params[a] for a in kind.template_vars if isinstance(params.get(a), str)}
    exprs = {a: params.pop(a)["expr"] for a in list(params) if _is_expr(params[a])}
    return CheckedStep(
        phase=phase.name,
        kind=kind.name,
        name=step.name,
        span=step.span,
        params=params,
        templates=templates,
        exprs=exprs,
        attr_spans={a.name: a.span for a in step.attrs},
        name_span=step.name_span,
    )


def _step_data(w: Work, main: Any, data: Any, span: Any) -> Any:
    """A step's `data`: resolved as an evaluation's is (of a dataset, only its files: its `limit`
    and `field` are its sampling's), and never an evaluation set."""
    data = resolve_data(w, main, data, span, w.ctx.datasets)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k in ("dataset", "path", "sha256")}
    paths = data.get("path", []) if isinstance(data, dict) else []
    for path in [paths] if isinstance(paths, str) else paths:
        if isinstance(path, str) and path.startswith(sc.EVAL_SETS):
            w.error(
                span,
                f"'{path}' is an evaluation set: steps never read evaluation prompts (use the held-out rows of a seed set, such as ralign:seeds/safe)",
            )
            break
    return data


def _is_expr(value: Any) -> bool:
    return isinstance(value, dict) and "expr" in value
