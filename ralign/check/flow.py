"""Pass `flow`: within a round, each step finds what it needs made by a step before it.

`advance` is how a step changes the round's state; the `steps` pass folds it too, to know which
scores a `score` expression may read.
"""

from __future__ import annotations

from dataclasses import replace

from ralign import ir
from ralign import schema as sc
from ralign.check.context import CheckedStep, Context, Work

ROUND_DATA = ("prompts", "responses", "pairs")


def made_scores(step: CheckedStep) -> list[str]:
    """The names of the scores a step makes (a rank names its one; `score` one per attribute)."""
    kind = sc.STEPS[step.kind]
    if kind.makes != "score":
        return []
    return [str(step.name)] if kind.named == "required" else list(step.exprs)


def advance(flow: sc.Flow, step: CheckedStep) -> sc.Flow:
    """The round's state after `step`."""
    kind = sc.STEPS[step.kind]
    if kind.after is not None:
        flow = kind.after(flow, step.params, step.span)
    if kind.makes == "score":
        made = made_scores(step)
        graded = flow.graded | set(made) if step.params.get("mode") == "pointwise" else flow.graded
        return replace(flow, scores=(*flow.scores, *((s, step.span) for s in made)), graded=graded)
    if kind.makes in ROUND_DATA or kind.makes == "policy":  # "policy": the round has trained
        return flow.made(kind.makes, step.span)
    return flow


def flow(ctx: Context) -> Context:
    """Check every step's needs against what earlier steps of the round make; record its slots."""
    w = Work(ctx)
    state, steps = sc.Flow(), []
    for step in ctx.steps:
        steps.append(_wired(w, step, state))
        state = advance(state, step)
    return w.finish(steps=tuple(steps))


def _wired(w: Work, step: CheckedStep, state: sc.Flow) -> CheckedStep:
    kind = sc.STEPS[step.kind]
    params = dict(step.params)
    inputs: list[str] = []
    # An attribute written but refused (reported already) still shapes the flow, as if it were right.
    written = {**dict.fromkeys(step.attr_spans), **params}
    for slot in kind.inputs(written):
        if slot in ROUND_DATA and slot not in state.have:
            w.error(
                step.span,
                f"`{step.kind}` needs {slot}, but no step before it in the round produces {slot}; {kind.hint}",
            )
        if slot != "score":
            inputs.append(slot)
        elif kind.open_attrs:  # `score`: every score its expressions read
            read = {v for node in step.exprs.values() for v in ir.variables(node)}
            inputs += [f"score:{s}" for s in sorted(read & {s for s, _ in state.scores})]
        else:
            by = _pick_score(w, step, params, state)
            if by:
                params["by"] = by
                inputs.append(f"score:{by}")
    for message in kind.rules(params, state) if kind.rules else ():
        w.error(step.span, message)
    seen = dict(state.scores)
    for name in made_scores(step):
        if name in ir.RECORD_FIELDS:
            w.error(
                step.name_span or step.span,
                f"a score cannot be named '{name}': score expressions read '{name}' as the record's own",
            )
        elif name in seen:
            w.error(
                step.name_span or step.span,
                f"the score '{name}' is already made earlier in the round",
                ((seen[name], "made here"),),
            )
    outputs = [f"score:{s}" for s in made_scores(step)] or [kind.makes]
    return replace(step, params=params, inputs=tuple(inputs), outputs=tuple(outputs))


def _pick_score(w: Work, step: CheckedStep, params: dict, state: sc.Flow) -> str | None:
    """The score a `pairs` or `train sft` step uses: its `by`, else `total`, else the latest."""
    scores = [s for s, _ in state.scores]
    use = sc.STEPS[step.kind].score_use
    by = params.get("by")
    if by is not None:
        if by not in scores:
            w.error(
                step.span,
                f"`{step.kind}` uses the score '{by}', which no earlier step makes{w.suggest(by, scores)}",
            )
            return None
        return str(by)
    if not scores:
        w.error(
            step.span,
            f"`{step.kind}` needs a score to {use}, but no step before it in the round makes one; add a `rank NAME {{ ... }}` or `score {{ total = ... }}` step before it",
        )
        return None
    return "total" if "total" in scores else scores[-1]
