"""The plan: every round's steps in order, with inputs, parameters, spans and content hashes; JSON in and out."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "ralign-plan/1"


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
    params: dict[str, Any]
    inputs: dict[str, str]
    outputs: tuple[str, ...]
    span: dict[str, Any]
    hash: str
    templates: dict[str, str] = field(default_factory=dict)
    exprs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "round": self.round,
            "phase": self.phase,
            "kind": self.kind,
            "name": self.name,
            "params": self.params,
            "templates": self.templates,
            "exprs": self.exprs,
            "inputs": self.inputs,
            "outputs": list(self.outputs),
            "span": self.span,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Step:
        return cls(
            id=d["id"],
            round=d["round"],
            phase=d["phase"],
            kind=d["kind"],
            name=d.get("name"),
            params=d.get("params", {}),
            inputs=d.get("inputs", {}),
            outputs=tuple(d.get("outputs", ())),
            span=d.get("span", {}),
            hash=d["hash"],
            templates=d.get("templates", {}),
            exprs=d.get("exprs", {}),
        )


@dataclass(frozen=True)
class Plan:
    """A compiled recipe. Everything but `recipe_dir` is content; `hash` covers it all."""

    recipe: str
    source: str
    seed: int
    rounds: int
    policy: str
    models: dict[str, Any]
    datasets: dict[str, Any]
    templates: dict[str, Any]
    programs: dict[str, Any]
    evaluations: list[dict[str, Any]]
    steps: tuple[Step, ...]
    hash: str = ""
    recipe_dir: str = (
        "."  # where relative data paths resolve, relative to the plan file (not hashed)
    )

    def content(self) -> dict[str, Any]:
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
            "programs": self.programs,
            "evaluations": self.evaluations,
            "steps": [s.to_json() for s in self.steps],
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
    def from_json(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a ralign plan (format {d.get('format')!r}, expected {FORMAT!r})")
        return cls(
            recipe=d["recipe"],
            source=d["source"],
            seed=d["seed"],
            rounds=d["rounds"],
            policy=d["policy"],
            models=d["models"],
            datasets=d["datasets"],
            templates=d["templates"],
            programs=d["programs"],
            evaluations=d["evaluations"],
            steps=tuple(Step.from_json(s) for s in d["steps"]),
            hash=d.get("hash", ""),
            recipe_dir=d.get("recipe_dir", "."),
        )

    @classmethod
    def load(cls, path: Path) -> Plan:
        plan = cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        if plan.hash != plan.compute_hash():
            raise ValueError(
                f"{path}: the plan's hash does not match its content (was it edited by hand?)"
            )
        return plan


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
