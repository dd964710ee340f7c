"""The plan: every round's steps in order, with inputs, parameters, spans and content hashes; JSON in and out.

A plan file is untrusted input: `Plan.from_json` checks its shape, parses its expressions into
typed IR, and recomputes every step's hash and the plan's own, so an edited plan is either
consistent (and then checked like any other) or refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ralign import ir
from ralign import schema as sc

FORMAT = "ralign-plan/1"


class PlanError(ValueError):
    """A plan file that is not a valid, consistent ralign plan; `str()` says what is wrong."""


def canonical(value: Any) -> str:
    """The one JSON text of a value that hashes use: sorted keys, no spaces, exact floats."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Step:
    """One step of one round. `inputs` maps a slot to `model:NAME`, `dataset:NAME` or a step id."""

    id: str
    round: int
    phase: str
    kind: str
    name: str | None
    params: Mapping[str, Any]
    inputs: Mapping[str, str]
    outputs: tuple[str, ...]
    span: Mapping[str, Any]
    hash: str
    templates: Mapping[str, str] = field(default_factory=dict)
    exprs: Mapping[str, ir.Node] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "round": self.round,
            "phase": self.phase,
            "kind": self.kind,
            "name": self.name,
            "params": self.params,
            "templates": self.templates,
            "exprs": {a: ir.to_json(e) for a, e in self.exprs.items()},
            "inputs": self.inputs,
            "outputs": list(self.outputs),
            "span": self.span,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> Step:
        d = _object(d, where)
        kind = _field(d, "kind", str, where)
        if kind not in sc.STEPS:
            raise PlanError(f"{where}: unknown step kind {kind!r}")
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise PlanError(f"{where}.name: expected a string or null")
        exprs = _object(d.get("exprs", {}), f"{where}.exprs")
        return cls(
            id=_field(d, "id", str, where),
            round=_field(d, "round", int, where),
            phase=_field(d, "phase", str, where),
            kind=kind,
            name=name,
            params=_object(d.get("params", {}), f"{where}.params"),
            inputs=_strings(d.get("inputs", {}), f"{where}.inputs"),
            outputs=_names(d.get("outputs", []), f"{where}.outputs"),
            span=_object(d.get("span", {}), f"{where}.span"),
            hash=_field(d, "hash", str, where),
            templates=_strings(d.get("templates", {}), f"{where}.templates"),
            exprs={a: ir.from_json(e, f"{where}.exprs.{a}") for a, e in exprs.items()},
        )


@dataclass(frozen=True)
class Plan:
    """A compiled recipe. Everything but `recipe_dir` is content; `hash` covers it all."""

    recipe: str
    source: str
    seed: int
    rounds: int
    policy: str
    models: Mapping[str, Any]
    datasets: Mapping[str, Any]
    templates: Mapping[str, Any]
    programs: ir.Programs
    evaluations: list[dict[str, Any]]
    steps: tuple[Step, ...]
    hash: str = ""
    recipe_dir: str = "."  # where relative data paths resolve, relative to the plan file (unhashed)
    overrides: tuple[str, ...] = ()  # the `--set` (and `--smoke`) flags it was compiled with
    log_with: tuple[str, ...] = ()  # experiment trackers (`recipe { log_with = ... }`)

    def content(self) -> dict[str, Any]:
        overrides = {"overrides": list(self.overrides)} if self.overrides else {}
        if self.log_with:
            overrides["log_with"] = list(self.log_with)
        return {
            "format": FORMAT,
            "recipe": self.recipe,
            "source": self.source,
            "seed": self.seed,
            "rounds": self.rounds,
            "policy": self.policy,
            "models": self.models,
            "datasets": self.datasets,
            "templates": self.templates,
            "programs": ir.programs_to_json(self.programs),
            "evaluations": self.evaluations,
            "steps": [s.to_json() for s in self.steps],
            **overrides,
        }

    def compute_hash(self) -> str:
        return digest(self.content())

    def to_json(self) -> dict[str, Any]:
        return {**self.content(), "hash": self.hash, "recipe_dir": self.recipe_dir}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    @classmethod
    def from_json(cls, d: Any) -> Plan:
        """A plan from its JSON, verified: shapes, expressions, step hashes and the plan hash."""
        d = _object(d, "the plan")
        if d.get("format") != FORMAT:
            raise PlanError(f"not a ralign plan (format {d.get('format')!r}, expected {FORMAT!r})")
        steps = d.get("steps")
        if not isinstance(steps, list):
            raise PlanError("the plan's `steps` must be a list")
        try:
            programs = ir.programs_from_json(d.get("programs"))
        except ir.IRError as exc:
            raise PlanError(str(exc)) from None
        try:
            plan = cls(
                recipe=_field(d, "recipe", str, "the plan"),
                source=_field(d, "source", str, "the plan"),
                seed=_field(d, "seed", int, "the plan"),
                rounds=_field(d, "rounds", int, "the plan"),
                policy=_field(d, "policy", str, "the plan"),
                models=_object(d.get("models"), "models"),
                datasets=_object(d.get("datasets"), "datasets"),
                templates=_templates(d.get("templates")),
                programs=programs,
                evaluations=[_object(e, "evaluations") for e in _list(d.get("evaluations"))],
                steps=tuple(Step.from_json(s, f"steps[{i}]") for i, s in enumerate(steps)),
                hash=_field(d, "hash", str, "the plan"),
                overrides=_names(d.get("overrides", []), "overrides"),
                log_with=_names(d.get("log_with", []), "log_with"),
                recipe_dir=_field(d, "recipe_dir", str, "the plan") if "recipe_dir" in d else ".",
            )
        except ir.IRError as exc:
            raise PlanError(str(exc)) from None
        plan.verify()
        return plan

    def verify(self) -> None:
        """Raise PlanError unless every reference resolves and every hash matches its content."""
        ids = {s.id for s in self.steps}
        if len(ids) != len(self.steps):
            raise PlanError("two steps share an id")
        roots = tuple(e for s in self.steps for e in s.exprs.values())
        try:
            ir.verify_references(self.programs, roots)
        except ir.IRError as exc:
            raise PlanError(str(exc)) from None
        _verify_calls(self.programs, roots)
        hashes = base_hashes(self.models, self.datasets)
        for s in self.steps:
            for attr, key in s.templates.items():
                if key not in self.templates:
                    raise PlanError(f"step {s.id}: template {key!r} of `{attr}` is not in the plan")
            for slot, src in s.inputs.items():
                if src and src not in hashes:
                    raise PlanError(
                        f"step {s.id}: input {slot} comes from {src!r}, which is not before it"
                    )
            if step_hash(self, s, hashes) != s.hash:
                raise PlanError(
                    f"step {s.id}: its hash does not match its content (was it edited?)"
                )
            hashes[s.id] = s.hash
        if self.hash != self.compute_hash():
            raise PlanError("the plan's hash does not match its content (was it edited by hand?)")

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read and verify a plan file; PlanError names the file."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_json(data)
        except (PlanError, ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: {exc}") from None


def _verify_calls(programs: ir.Programs, roots: tuple[ir.Node, ...]) -> None:
    """Every call names a builtin with a fitting number of arguments; every regex runs on RE2."""
    from ralign.rewards.builtins import BUILTINS
    from ralign.rewards.regex import RegexError
    from ralign.rewards.regex import check as check_regex

    for node in ir.reach(programs, roots):
        if isinstance(node, ir.Call):
            b = BUILTINS.get(node.name)
            if b is None:
                raise PlanError(f"the plan calls an unknown builtin {node.name!r}")
            count = len(node.args)
            if count < len(b.params) or (count > len(b.params) and not b.variadic):
                raise PlanError(f"the plan calls {node.name}() with {count} argument(s)")
        elif isinstance(node, ir.Re):
            try:
                check_regex(node.pattern, node.flags)
            except RegexError as exc:
                raise PlanError(f"the plan's regex /{node.pattern}/: {exc}") from None


def base_hashes(models: Mapping[str, Any], datasets: Mapping[str, Any]) -> dict[str, str]:
    """The content hash of each model and dataset a step can take as input."""
    out = {f"model:{m}": digest(spec) for m, spec in models.items()}
    out.update({f"dataset:{d}": digest(spec) for d, spec in datasets.items()})
    return out


def step_hash(plan: Plan, step: Step, hashes: Mapping[str, str]) -> str:
    """A step's hash: its kind, parameters, templates, expressions and the programs they reach, its
    inputs' hashes, the seed, round and id. The recipe's own declarations are keyed `FILE:name`, so
    the file's name is blanked out first: renaming or copying a recipe keeps its cached steps."""
    reached = ir.closure(plan.programs, tuple(step.exprs.values()))
    content = {
        "kind": step.kind,
        "name": step.name,
        "params": step.params,
        "templates": {a: _template_digest(plan.templates[k]) for a, k in step.templates.items()},
        "exprs": {a: ir.to_json(e) for a, e in step.exprs.items()},
        "programs": ir.programs_to_json(reached, lines=False),
        "inputs": {slot: hashes[src] for slot, src in sorted(step.inputs.items()) if src},
        "seed": plan.seed,
        "round": step.round,
        "id": step.id,
    }
    text = canonical(content).replace(json.dumps(plan.source + ":")[:-1], '"<recipe>:')
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _template_digest(template: Mapping[str, Any]) -> str:
    """A template's content: its text, and the text constants it reads (when it reads any)."""
    if template.get("lets"):
        return digest([template["text"], template["lets"]])
    return digest(template["text"])


def with_hashes(plan: Plan) -> Plan:
    """`plan` with every step hash and the plan hash computed (steps in order)."""
    hashes = base_hashes(plan.models, plan.datasets)
    steps = []
    for s in plan.steps:
        s = replace(s, hash=step_hash(plan, s, hashes))
        hashes[s.id] = s.hash
        steps.append(s)
    plan = replace(plan, steps=tuple(steps))
    return replace(plan, hash=plan.compute_hash())


def check_inputs(plan: Plan, recipe_dir: Path, roots: tuple[Path, ...] = ()) -> None:
    """A plan's inputs stay in their box, as a compiled recipe's do: local data files and model
    folders lie inside the roots and carry their content hash; hub names are hub ids; built-in
    names are known; the recipe's name is a name. Raises PlanError."""
    from ralign.check.declarations import name_problem
    from ralign.imports import confined

    box = (recipe_dir.resolve(), *(r.resolve() for r in roots))
    problem = name_problem(plan.recipe)
    if problem:
        raise PlanError(f"recipe {plan.recipe!r}: {problem}")
    for name, spec in plan.datasets.items():
        _check_dataset(f"dataset '{name}'", spec, recipe_dir, box)
    for s in plan.steps:
        if s.kind == "evaluate":
            _check_data(f"step {s.id}", s.params.get("data"), recipe_dir, box)
        elif "data" in s.params:  # a step's own data (calibrate): one file or a dataset's list
            _check_dataset(f"step {s.id}", s.params["data"], recipe_dir, box)
            paths = _object(s.params["data"], f"step {s.id}").get("path")
            if any(str(p).startswith(sc.EVAL_SETS) for p in _as_list(paths)):
                raise PlanError(f"step {s.id}: steps never read evaluation prompts ({paths!r})")
    for name, spec in plan.models.items():
        _check_model(f"model '{name}'", spec, recipe_dir, box, confined)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _check_dataset(what: str, spec: Any, recipe_dir: Path, box: tuple[Path, ...]) -> None:
    """A declared dataset: one file as `_check_data` checks it, or a list of them with `sha256` a
    list of the same length (null for hub parts), each part checked as a file of its own."""
    paths = _object(spec, what).get("path")
    if not isinstance(paths, list):
        _check_data(what, spec, recipe_dir, box)
        return
    hashes = spec.get("sha256")
    if not paths:
        raise PlanError(f"{what}: its path is an empty list (a dataset needs at least one file)")
    if not isinstance(hashes, list) or len(hashes) != len(paths):
        raise PlanError(
            f"{what}: its path lists {len(paths)} files, so its sha256 must be a list of {len(paths)} hashes (null for hf: parts)"
        )
    for i, (path, digest_) in enumerate(zip(paths, hashes, strict=True)):
        if digest_ is not None and not isinstance(digest_, str):
            raise PlanError(f"{what}, file {i + 1}: its sha256 must be a string or null")
        part = {"path": path} if digest_ is None else {"path": path, "sha256": digest_}
        _check_data(f"{what}, file {i + 1}", part, recipe_dir, box)


def _check_data(what: str, spec: Any, recipe_dir: Path, box: tuple[Path, ...]) -> None:
    """One data file (a dataset's, or an evaluation's): a known built-in set, a hub id, or a local
    file inside the roots with its content hash."""
    from ralign import inputs
    from ralign.imports import confined

    path = _object(spec, what).get("path")
    if "dataset" in spec and isinstance(path, list):
        raise PlanError(f"{what}: an evaluation reads one file, not a list of them")
    if "dataset" in spec and path is None:
        return  # an evaluation of a declared dataset: checked with the datasets
    if not isinstance(path, str) or "\0" in path:
        raise PlanError(f"{what}: its path must be a string without NUL characters")
    if path.startswith("ralign:"):
        if path[len("ralign:") :] not in sc.BUILTIN_DATASETS:
            raise PlanError(f"{what}: unknown built-in dataset {path!r}")
    elif path.startswith("hf:"):
        problem = inputs.hub_dataset_problem(path)
        if problem:
            raise PlanError(f"{what}: {problem}")
    elif not confined(recipe_dir / path, box):
        raise PlanError(
            f"{what}: data file {path!r} is outside the recipe's folder and the --root folders"
        )
    elif not isinstance(spec.get("sha256"), str):
        raise PlanError(f"{what}: data file {path!r} has no content hash in the plan")


def _check_model(
    what: str, spec: Any, recipe_dir: Path, box: tuple[Path, ...], confined: Any
) -> None:
    from ralign import inputs

    path = _object(spec, what).get("path")
    if not isinstance(path, str) or "\0" in path:
        raise PlanError(f"{what}: its path must be a string without NUL characters")
    if path.startswith("ralign:"):
        if path[len("ralign:") :] not in sc.BUILTIN_MODELS:
            raise PlanError(f"{what}: unknown built-in model {path!r}")
    elif "sha256" in spec:
        if not confined(recipe_dir / path, box):
            raise PlanError(
                f"{what}: model folder {path!r} is outside the recipe's folder and the --root folders"
            )
    elif (problem := inputs.hub_model_problem(path)) is not None:
        raise PlanError(f"{what}: {problem}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise PlanError(f"expected a list, got {type(value).__name__}")
    return value


def _field(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    value = d.get(key)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise PlanError(f"{where}: `{key}` must be a {typ.__name__}, got {type(value).__name__}")
    return value


def _strings(value: Any, where: str) -> dict[str, str]:
    value = _object(value, where)
    for k, v in value.items():
        if not isinstance(v, str):
            raise PlanError(f"{where}.{k}: expected a string")
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{where}: expected a list of strings")
    return tuple(value)


def _templates(value: Any) -> dict[str, Any]:
    value = _object(value, "templates")
    for key, t in value.items():
        if not isinstance(t, dict) or not isinstance(t.get("text"), str):
            raise PlanError(f"templates.{key}: expected {{text, origin}}")
    return value


def mermaid(plan: Plan) -> str:
    """The plan as a Mermaid flowchart: one subgraph per round, edges from inputs to steps."""
    ids = {s.id: f"s{i}" for i, s in enumerate(plan.steps)}
    lines = ["flowchart TD"]
    for name in plan.models:
        lines.append(f'  model_{name}[("model {name}")]')
    for name in plan.datasets:
        lines.append(f'  dataset_{name}[/"dataset {name}"/]')
    by_round: dict[int, list[Step]] = {}
    for s in plan.steps:
        by_round.setdefault(s.round, []).append(s)
    for rnd, steps in by_round.items():
        title = "before round 1" if rnd == 0 else f"round {rnd}"
        lines.append(f'  subgraph r{rnd}["{title}"]')
        for s in steps:
            label = s.kind + (f" {s.name}" if s.name and not s.kind.startswith("train") else "")
            lines.append(
                f'    {ids[s.id]}["{label}<br/><small>{s.phase} · line {s.span.get("line")}</small>"]'
            )
        lines.append("  end")
    for s in plan.steps:
        for slot, src in sorted(s.inputs.items()):
            if src.startswith(("model:", "dataset:")):
                kind, name = src.split(":", 1)
                origin = f"{kind}_{name}"
            elif src in ids:
                origin = ids[src]
            else:
                continue
            lines.append(f"  {origin} -->|{slot}| {ids[s.id]}")
    return "\n".join(lines) + "\n"
