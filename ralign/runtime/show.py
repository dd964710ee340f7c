"""`ralign show`: the exact texts a step would send to its model, for its first records.

Only tokenizers are loaded (for the chat templates), never weights. A step whose input comes
from an earlier step (answers to rank, pairs to train on) reads it from a run dir where that
step has finished (`--run-dir`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralign import schema as sc
from ralign.errors import UsageError
from ralign.plan import Plan, Step
from ralign.runtime.rundir import step_folder
from ralign.templates import render

ShowFn = Callable[["Shown", int], list[str]]
SHOWN: dict[str, ShowFn] = {}


def shows(*kinds: str) -> Callable[[ShowFn], ShowFn]:
    """Register what steps of `kinds` send to their model."""

    def register(fn: ShowFn) -> ShowFn:
        for kind in kinds:
            SHOWN[kind] = fn
        return fn

    return register


@dataclass(frozen=True)
class Shown:
    """One step of a plan, with what it reads: datasets directly, earlier steps from a run dir."""

    plan: Plan
    step: Step
    recipe_dir: Path
    run_dir: Path | None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.step.params)

    def input(self, slot: str) -> list[dict[str, Any]]:
        from ralign.runtime.data import load_records, read_jsonl

        ref = self.step.inputs[slot]
        if ref.startswith("dataset:"):
            return load_records(self.plan.datasets[ref.split(":", 1)[1]], self.recipe_dir)
        producer = self.plan.step(ref)
        name = slot.split(":", 1)[1] if slot.startswith("score:") else None
        file = None if self.run_dir is None else step_folder(self.run_dir, producer)
        file = file / sc.STEPS[producer.kind].artifact(name) if file is not None else None
        if file is None or not file.is_file():
            raise UsageError(
                f"step {self.step.id} reads its {slot} from step {ref}: give --run-dir of a run where that step has finished"
            )
        return read_jsonl(file)

    def render(self, attr: str, variables: dict[str, Any]) -> str:
        template = self.plan.templates[self.step.templates[attr]]
        return render(template["text"], {**template.get("lets", {}), **variables})

    def tokenizer(self, slot: str = "policy") -> Any:
        """The tokenizer (with the recipe's chat settings) of the model in `slot`."""
        from ralign.runtime.context import declared_model_path, model_spec
        from ralign.runtime.models import load_tokenizer

        ref = self.step.inputs.get(slot, f"model:{self.plan.policy}")
        name = ref.split(":", 1)[1] if ref.startswith("model:") else self.plan.policy
        path = declared_model_path(self.plan.models[name], self.recipe_dir)
        return load_tokenizer(model_spec(self.plan, name, path, self.recipe_dir, "cpu", lora=False))


def show(plan: Plan, step_id: str, recipe_dir: Path, run_dir: Path | None, n: int) -> list[str]:
    """The first `n` texts step `step_id` (its id in round 1, or a full id) sends to its model."""
    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)

    wanted = (
        step_id
        if "/" in step_id and step_id.startswith("r") and step_id[1:2].isdigit()
        else f"r1/{step_id}"
    )
    found = next((s for s in plan.steps if s.id == wanted), None)
    if found is None:
        known = ", ".join(s.id.split("/", 1)[1] for s in plan.steps if s.round == 1)
        raise UsageError(f"no step '{step_id}' (round 1 has: {known})")
    fn = SHOWN.get(found.kind)
    if fn is None:
        raise UsageError(f"a {found.kind} step sends nothing to a model")
    return fn(Shown(plan, found, recipe_dir, run_dir), n)


@shows("generate")
def _generate(s: Shown, n: int) -> list[str]:
    seeds = [r["prompt"] for r in s.input("dataset")]
    rng = random.Random(0)
    k = min(s.params["shots"], len(seeds))
    return [s.render("template", {"examples": rng.sample(seeds, k)}) for _ in range(n)]


@shows("sample")
def _sample(s: Shown, n: int) -> list[str]:
    from ralign.runtime.models import format_prompt

    records = s.input("dataset" if "from" in s.params else "prompts")[:n]
    tok = s.tokenizer()
    texts = [
        s.render("context", {"prompt": r["prompt"]}) if "context" in s.params else r["prompt"]
        for r in records
    ]
    return [format_prompt(tok, t) for t in texts]


@shows("revise")
def _revise(s: Shown, n: int) -> list[str]:
    from ralign.runtime.models import format_prompt

    tok, out = s.tokenizer(), []
    for r in s.input("responses"):
        for response in r["responses"]:
            variables = {
                "prompt": r["prompt"],
                "response": response,
                "principle": s.params["principles"][0],
            }
            out.append(
                format_prompt(
                    tok, s.render("template", {**variables, "critique": "", "stage": "revision"})
                )
            )
            if len(out) == n:
                return out
    return out


@shows("rank")
def _rank(s: Shown, n: int) -> list[str]:
    from ralign.runtime.models import format_prompt

    tok, out = s.tokenizer("judge"), []
    for r in s.input("responses")[:n]:
        answers = list(r["responses"])
        if s.params["mode"] == "pointwise":
            view = {"prompt": r["prompt"], "response": answers[0], "scale": s.params["scale"]}
        else:
            shown = answers[:2] if s.params["mode"] == "pairwise" else answers
            labels = [chr(ord("A") + i) for i in range(len(shown))]
            view = {"prompt": r["prompt"], "responses": shown, "labels": labels}
        out.append(format_prompt(tok, s.render("template", view)))
    return out


@shows("train sft", "train dpo")
def _train(s: Shown, n: int) -> list[str]:
    """The sequences trained on: the formatted prompt, then the answer (and the end token when
    the answer ended on its own); for DPO the chosen answer (the rejected one gets the same prompt)."""
    from ralign.runtime.models import format_prompt
    from ralign.runtime.steps import sft_examples

    tok, p = s.tokenizer(), s.params
    if s.step.kind == "train dpo":
        rows = [
            (x["prompt"], x["chosen"], x.get("chosen_finished", True)) for x in s.input("pairs")
        ]
    else:
        scored = any(slot.startswith("score:") for slot in s.step.inputs)
        examples = sft_examples(
            s.input("responses"),
            s.input(f"score:{p['by']}") if scored else None,
            on=p["on"],
            min_score=p.get("min_score"),
            drop_context=p["drop_context"],
            min_grade=p.get("min_grade"),
        )
        rows = [(e["prompt"], e["response"], e["finished"]) for e in examples]
    end = tok.eos_token or ""
    return [format_prompt(tok, q) + a + (end if done else "") for q, a, done in rows[:n]]


@shows("calibrate")
def _calibrate(s: Shown, n: int) -> list[str]:
    """The harmless prompts each weight answers (the policy's own chat format)."""
    from ralign.runtime.calibrate import harmless_prompts
    from ralign.runtime.models import format_prompt

    tok = s.tokenizer()
    return [format_prompt(tok, p) for p in harmless_prompts(s.params["data"], s.recipe_dir)[:n]]


@shows("evaluate")
def _evaluate(s: Shown, n: int) -> list[str]:
    from ralign.runtime.data import dataset_file
    from ralign.runtime.evaluators import eval_items
    from ralign.runtime.models import format_prompt

    file = dataset_file({"path": s.params["data"]["path"]}, s.recipe_dir)
    items = eval_items(s.params["task"], file, n) if file is not None else []
    if s.params["task"] == "behavior":
        tok = s.tokenizer()
        return [format_prompt(tok, item["prompt"]) for item in items]
    return [f"{item.input} {choice}" for item in items for choice in item.choices][:n]
