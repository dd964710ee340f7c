"""Lower a checked recipe into a plan: unroll rounds, wire each step's input slots, hash every step."""

from __future__ import annotations

from typing import Any

from ralign import ir
from ralign.check import Checked, CheckedStep
from ralign.plan import Plan, Step, with_hashes

ROUND_DATA = ("prompts", "responses", "pairs")


def _ids(steps: tuple[CheckedStep, ...]) -> list[str]:
    """Readable, unique step ids within a round: `phase/kind[.name]`, numbered when repeated."""
    ids: list[str] = []
    for s in steps:
        label = (
            s.kind.replace(" ", ".")
            if s.kind.startswith("train")
            else s.kind + (f".{s.name}" if s.name else "")
        )
        base = f"{s.phase}/{label}"
        ident, k = base, 2
        while ident in ids:
            ident, k = f"{base}#{k}", k + 1
        ids.append(ident)
    return ids


def _plain(value: Any) -> Any:
    """A checked attribute value as plan JSON (an expression becomes its IR's JSON form)."""
    if isinstance(value, dict) and "expr" in value:
        return {"expr": ir.to_json(value["expr"])}
    return value


class _Round:
    """Where each slot of a round comes from, as its steps are added."""

    def __init__(self, checked: Checked, policy: str) -> None:
        self.checked = checked
        self.base = f"model:{checked.policy}"
        self.policy = policy  # the policy this round starts from: a model or a train step
        self.start = policy
        self.made: dict[str, str] = {}

    def source(self, slot: str, params: dict[str, Any]) -> str:
        """The model, dataset or earlier step that fills one input slot of a step whose
        parameters in this round are `params`."""
        if slot == "dataset":
            return f"dataset:{params['from']}"
        if slot == "policy":
            return self.policy
        if slot == "start":
            return self.start
        if slot == "baseline":  # the base where a bound is measured from it
            refs = (params.get("relative_to"), params.get("hedging_relative_to"))
            return self.base if "base" in refs else self.start
        if slot == "judge":
            judge = params.get("judge", self.checked.policy)
            return self.policy if judge == self.checked.policy else f"model:{judge}"
        if slot == "reference":
            which = params.get("reference")
            if which == "previous":  # as the train step before this one in the round left it
                return self.policy
            return self.start if which == "round_start" else self.base
        return self.made[slot]

    def add(self, step: CheckedStep, step_id: str) -> None:
        for out in step.outputs:
            self.made[out] = step_id
        if step.kind == "sample":  # new answers: earlier scores and pairs no longer apply
            for key in [k for k in self.made if k.startswith("score:") or k == "pairs"]:
                del self.made[key]
        if "policy" in step.outputs:
            self.policy = step_id


# A calibrate bound and the attribute naming what it is measured from.
_BOUNDS = (("max_refusal_rise", "relative_to"), ("max_hedging_rise", "hedging_relative_to"))


def _in_round(step: CheckedStep, rnd: int) -> dict[str, Any]:
    """A step's parameters in round `rnd`. A calibrate bound measured from "last_round" is off in
    round 1 (there is no last round: the bound becomes 1) and from the round's start after it."""
    params = dict(step.params)
    if step.kind != "calibrate":
        return params
    params.setdefault("hedging_relative_to", params["relative_to"])  # absent: as relative_to
    for bound, ref in _BOUNDS:
        if params[ref] == "last_round":
            params[ref] = "round_start"
            if rnd == 1:
                params[bound] = 1.0
    if params["hedging_relative_to"] == params["relative_to"] or params["max_hedging_rise"] >= 1:
        del params["hedging_relative_to"]  # it says nothing more: such plans hash as before
    return params


def _evaluations(checked: Checked, rnd: int, final: bool, policy: str) -> list[Step]:
    out = []
    for ev in checked.evaluations:
        if ev.get("every") == "end" and not (rnd == 0 or final):
            continue
        params = {k: v for k, v in ev.items() if k not in ("name", "line", "reward")}
        exprs = {"reward": ev["reward"]["expr"]} if "reward" in ev else {}
        span = {"file": checked.main, "line": ev["line"], "column": 1}
        step_id = f"r{rnd}/evaluate/{ev['name']}"
        out.append(
            Step(
                step_id,
                rnd,
                "evaluate",
                "evaluate",
                ev["name"],
                params,
                {"policy": policy},
                ("metrics",),
                span,
                "",
                {},
                exprs,
            )
        )
    return out


def _template(tv: Any) -> dict[str, Any]:
    out = {"text": tv.text, "origin": tv.origin.to_json()}
    return {**out, "lets": dict(sorted(tv.lets.items()))} if tv.lets else out


def lower(checked: Checked) -> Plan:
    """Build the plan of a checked recipe.

    Args:
        checked: the result of `check`.

    Returns:
        A Plan whose steps run in order; each input names a model, a dataset or an earlier step.
    """
    policy = f"model:{checked.policy}" if checked.policy else ""
    ids = _ids(checked.steps)
    steps = _evaluations(checked, 0, False, policy)
    for rnd in range(1, checked.rounds + 1):
        wiring = _Round(checked, policy)
        for s, local in zip(checked.steps, ids, strict=True):
            step_id = f"r{rnd}/{local}"
            params = _in_round(s, rnd)
            inputs = {slot: wiring.source(slot, params) for slot in s.inputs}
            steps.append(
                Step(
                    step_id,
                    rnd,
                    s.phase,
                    s.kind,
                    s.name,
                    params,
                    inputs,
                    s.outputs,
                    s.span.to_json(),
                    "",
                    dict(s.templates),
                    dict(s.exprs),
                )
            )
            wiring.add(s, step_id)
        policy = wiring.policy
        steps += _evaluations(checked, rnd, rnd == checked.rounds, policy)
    roots = tuple(e for s in steps for e in s.exprs.values())
    used = sorted({k for s in checked.steps for k in s.templates.values()})
    plan = Plan(
        recipe=checked.recipe,
        source=checked.main,
        seed=checked.seed,
        rounds=checked.rounds,
        policy=checked.policy,
        models={name: dict(sorted(spec.items())) for name, spec in sorted(checked.models.items())},
        datasets={
            name: dict(sorted(spec.items())) for name, spec in sorted(checked.datasets.items())
        },
        templates={k: _template(checked.templates[k]) for k in used},
        programs=ir.closure(checked.programs, roots),
        evaluations=[{k: _plain(v) for k, v in e.items()} for e in checked.evaluations],
        steps=tuple(steps),
        log_with=checked.log_with,
    )
    return with_hashes(plan)
