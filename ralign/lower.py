"""Lower a checked recipe into a plan: unroll rounds, wire inputs, fill programs, hash every step."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ralign.check import Checked, CheckedStep
from ralign.plan import Plan, Step, canonical, digest


def program_closure(
    irs: list[Any], programs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The lets, defs and rewards that expressions `irs` reach, transitively (what a plan must carry)."""
    out: dict[str, dict[str, Any]] = {"lets": {}, "defs": {}, "rewards": {}}
    table = {"let": "lets", "def": "defs", "reward": "rewards"}
    stack = list(irs)
    while stack:
        node = stack.pop()
        if not isinstance(node, list) or not node:
            continue
        head = node[0]
        if isinstance(head, str) and head in table and len(node) >= 2 and isinstance(node[1], str):
            group, qname = table[head], node[1]
            if qname not in out[group]:
                body = programs[group][qname]
                out[group][qname] = body
                stack.append(
                    body
                    if group == "lets"
                    else body.get("body")
                    if group == "defs"
                    else [r[k] for r in body["rules"] for k in ("value", "when")]
                )
            stack.extend(node[2:])
        else:
            stack.extend(node)
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _without_lines(programs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Programs minus the source lines of reward rules: moving a rule is not a change a step's hash should see."""
    rewards = {
        q: {
            **body,
            "rules": [{k: v for k, v in rule.items() if k != "line"} for rule in body["rules"]],
        }
        for q, body in programs["rewards"].items()
    }
    return {**programs, "rewards": rewards}


def _content_hash(content: dict[str, Any], main: str) -> str:
    """A step's hash. The recipe's own declarations are keyed `FILE:name` (templates, rewards),
    so the file's name is blanked out first: renaming or copying a recipe keeps its cached steps."""
    text = canonical(content).replace(json.dumps(main + ":")[:-1], '"<recipe>:')
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def lower(checked: Checked) -> Plan:
    """Build the plan of a checked recipe.

    Args:
        checked: the result of `check`.

    Returns:
        A Plan whose steps run in order; each input names a model, a dataset or an earlier step.
    """
    models = {name: dict(sorted(spec.items())) for name, spec in sorted(checked.models.items())}
    datasets = {name: dict(sorted(spec.items())) for name, spec in sorted(checked.datasets.items())}
    base_hash = {f"model:{m}": digest(spec) for m, spec in models.items()}
    base_hash.update({f"dataset:{d}": digest(spec) for d, spec in datasets.items()})

    all_irs = [ir for s in checked.steps for ir in s.exprs.values()]
    all_irs += [ev["reward"]["expr"] for ev in checked.evaluations if "reward" in ev]
    programs = program_closure(all_irs, checked.programs)
    used_templates = sorted({k for s in checked.steps for k in s.templates.values()})
    templates = {
        k: {"text": checked.templates[k].text, "origin": checked.templates[k].origin.to_json()}
        for k in used_templates
    }

    steps: list[Step] = []
    hashes: dict[str, str] = dict(base_hash)
    main = next(iter(checked.sources))
    policy = f"model:{checked.policy}" if checked.policy else ""
    ids = _ids(checked.steps)

    def add(
        step_id: str,
        rnd: int,
        phase: str,
        kind: str,
        name: str | None,
        params: dict[str, Any],
        inputs: dict[str, str],
        outputs: tuple[str, ...],
        span: dict[str, Any],
        tmpl: dict[str, str],
        exprs: dict[str, Any],
    ) -> None:
        content = {
            "kind": kind,
            "name": name,
            "params": params,
            "templates": {a: digest(templates[k]["text"]) for a, k in tmpl.items()},
            "exprs": exprs,
            "programs": _without_lines(program_closure(list(exprs.values()), checked.programs)),
            "inputs": {slot: hashes[src] for slot, src in sorted(inputs.items())},
            "seed": checked.seed,
            "round": rnd,
            "id": step_id,
        }
        h = _content_hash(content, main)
        hashes[step_id] = h
        steps.append(
            Step(step_id, rnd, phase, kind, name, params, inputs, outputs, span, h, tmpl, exprs)
        )

    def evaluations(rnd: int, final: bool) -> None:
        for ev in checked.evaluations:
            if ev.get("every") == "end" and not (rnd == 0 or final):
                continue
            params = {k: v for k, v in ev.items() if k not in ("name", "line", "reward")}
            exprs = {"reward": ev["reward"]["expr"]} if "reward" in ev else {}
            span = {"file": next(iter(checked.sources)), "line": ev["line"], "column": 1}
            add(
                f"r{rnd}/evaluate/{ev['name']}",
                rnd,
                "evaluate",
                "evaluate",
                ev["name"],
                params,
                {"policy": policy},
                ("metrics",),
                span,
                {},
                exprs,
            )

    evaluations(0, final=False)
    for rnd in range(1, checked.rounds + 1):
        made: dict[str, str] = {}
        round_start = policy
        for s, local in zip(checked.steps, ids, strict=True):
            sid = f"r{rnd}/{local}"
            inputs: dict[str, str] = {}
            for need in s.inputs:
                if need == "dataset":
                    inputs["dataset"] = f"dataset:{s.params['from']}"
                elif need == "policy":
                    inputs["policy"] = policy
                else:
                    inputs[need] = made[need]
            if s.kind in ("generate", "sample", "revise"):
                inputs["policy"] = policy
            if s.kind == "rank":
                judge = s.params.get("judge", checked.policy)
                inputs["judge"] = policy if judge == checked.policy else f"model:{judge}"
            if s.kind == "train dpo":
                inputs["reference"] = (
                    round_start
                    if s.params.get("reference") == "round_start"
                    else f"model:{checked.policy}"
                )
            add(
                sid,
                rnd,
                s.phase,
                s.kind,
                s.name,
                dict(s.params),
                inputs,
                s.outputs,
                s.span.to_json(),
                dict(s.templates),
                dict(s.exprs),
            )
            for out in s.outputs:
                made[out] = sid
            if (
                "responses" in s.outputs and s.kind == "sample"
            ):  # new answers: earlier scores and pairs no longer apply
                for k in [k for k in made if k.startswith("score:") or k == "pairs"]:
                    del made[k]
            if "policy" in s.outputs:
                policy = sid
        evaluations(rnd, final=rnd == checked.rounds)

    plan = Plan(
        recipe=checked.recipe,
        source=next(iter(checked.sources)),
        seed=checked.seed,
        rounds=checked.rounds,
        policy=checked.policy,
        models=models,
        datasets=datasets,
        templates=templates,
        programs=programs,
        evaluations=[{k: v for k, v in e.items()} for e in checked.evaluations],
        steps=tuple(steps),
    )
    return Plan(**{**plan.__dict__, "hash": plan.compute_hash()})
