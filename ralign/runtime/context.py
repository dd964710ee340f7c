"""What a step function sees: its parameters, inputs, models, seed, output folder and the processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ralign import inputs
from ralign import schema as sc
from ralign.errors import DataError, RalignError, StepError
from ralign.plan import Plan, Step
from ralign.runtime.rundir import step_folder

if TYPE_CHECKING:
    from ralign.runtime.executor import Run


def model_spec(
    plan: Plan, name: str, path: str, recipe_dir: Path, device_type: str, *, lora: bool
) -> Any:
    """How to load model `name` of the plan from `path` (its own, or a step's trained folder)."""
    from ralign.runtime.models import ModelSpec

    spec = plan.models[name]
    lora_spec = None
    if lora and spec.get("lora"):
        lo = spec["lora"]
        lora_spec = {
            "rank": lo["rank"],
            "alpha": lo["alpha"],
            "dropout": lo.get("dropout", 0.0),
            "target_modules": lo.get("targets"),
        }
    dtype = spec.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float32" if device_type == "cpu" else "bfloat16"
    return ModelSpec(path=path, dtype=dtype, lora=lora_spec)


def declared_model_path(spec: dict[str, Any], recipe_dir: Path) -> str:
    """A declared model's path to load: a local folder (relative to the recipe, and still holding
    the content the plan hashed), else its hub id or built-in name."""
    if "sha256" not in spec:
        return str(spec["path"])
    folder = (recipe_dir / spec["path"]).resolve()
    try:
        found = inputs.sha256_folder(folder, memo=True)
    except DataError as exc:
        raise RalignError(f"model folder {spec['path']}: {exc}") from None
    if found != spec["sha256"]:
        raise RalignError(
            f"model folder {folder} changed after the plan was compiled; compile the recipe again (or run the recipe itself)"
        )
    return str(folder)


@dataclass
class Models:
    """At most one model in memory, keyed by its plan reference (`model:NAME` or a step id)."""

    run: Run
    key: str | None = None
    pair: tuple[Any, Any] | None = None

    def spec(self, ref: str, *, lora: bool) -> Any:
        plan = self.run.plan
        if ref.startswith("model:"):
            name = ref.split(":", 1)[1]
            path = declared_model_path(plan.models[name], self.run.recipe_dir)
        else:
            name = plan.policy
            path = str(step_folder(self.run.run_dir, plan.step(ref)) / "model")
        return model_spec(plan, name, path, self.run.recipe_dir, self.run.device_type, lora=lora)

    def get(self, ref: str) -> tuple[Any, Any]:
        if self.key != ref or self.pair is None:
            from ralign.runtime.models import load_model

            self.drop()
            model, tok = load_model(self.spec(ref, lora=False), self.run.device)
            model.eval()
            self.key, self.pair = ref, (model, tok)
        return self.pair

    def trainable(self, ref: str) -> tuple[Any, Any]:
        """A fresh copy to train (with a new LoRA adapter when the model declares one)."""
        from ralign.runtime.models import load_model

        self.drop()
        return load_model(self.spec(ref, lora=True), self.run.device)

    def adopt(self, ref: str, model: Any, tok: Any) -> None:
        model.eval()
        self.key, self.pair = ref, (model, tok)

    def drop(self) -> None:
        self.key, self.pair = None, None


@dataclass
class StepContext:
    """What a step function sees: its parameters, inputs, models, seed and output folder."""

    run: Run
    step: Step
    out: Path
    seed: int
    bars: list[Any] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.step.params)

    @property
    def kind(self) -> sc.StepKind:
        return sc.STEPS[self.step.kind]

    @property
    def where(self) -> str:
        span = self.step.span
        return f"step {self.step.id} ({span.get('file')}:{span.get('line')})"

    @property
    def programs(self) -> Any:
        return self.run.programs

    @property
    def accelerator(self) -> Any:
        """The Accelerator when several processes share the work, else None (plain loops)."""
        return self.run.accelerator if self.run.accelerator.num_processes > 1 else None

    @property
    def max_length(self) -> int:
        return int(self.run.plan.models[self.run.plan.policy].get("max_length", 1024))

    def log(self, message: str) -> None:
        self.run.log(f"{self.step.id}: {message}")

    def input(self, slot: str) -> Any:
        return self.run.artifact(self.step.inputs[slot], slot)

    def template(self, attr: str) -> str:
        return str(self.run.plan.templates[self.step.templates[attr]]["text"])

    def model(self, slot: str) -> tuple[Any, Any]:
        return self.run.models.get(self.step.inputs[slot])

    def trainable(self) -> tuple[Any, Any]:
        return self.run.models.trainable(self.step.inputs["policy"])

    def reference(self, model: Any) -> Any:
        """The DPO reference: the adapter-disabled policy (LoRA), the policy itself when its
        reference log-probs are taken before any update (same weights), else a loaded copy."""
        from ralign.runtime.models import is_peft, load_model

        ref = self.step.inputs["reference"]
        if ref == self.step.inputs["policy"]:
            return None if is_peft(model) else model
        copy, _ = load_model(self.run.models.spec(ref, lora=False), self.run.device)
        return copy.eval()

    def per_process(self, batch_size: int) -> int:
        """Per-process batch so the global batch is the recipe's, whatever the process count."""
        return max(1, batch_size // self.run.accelerator.num_processes)

    def save_policy(self, model: Any, tok: Any) -> None:
        """Save the trained policy (LoRA merged) as this step's `model/`, and keep it in memory."""
        from ralign.runtime.models import is_peft

        acc = self.run.accelerator
        model = acc.unwrap_model(model) if acc.num_processes > 1 else model
        if is_peft(model):
            model = model.merge_and_unload()
        tok.padding_side = "left"
        if acc.is_main_process:
            model.save_pretrained(self.out / "model")
            tok.save_pretrained(self.out / "model")
        self.run.models.adopt(self.step.id, model, tok)

    def progress(self, total: int, unit: str) -> Callable[[int, int], None]:
        return self.run.progress_bar(self, total, unit)

    def on_train_step(self) -> Callable[[int, dict[str, Any]], None]:
        """Per optimizer step: a line in the step's `train_log.jsonl`, and one in run.log every 5."""
        log = self.out / "train_log.jsonl"

        def report(n: int, values: dict[str, Any]) -> None:
            if not self.run.accelerator.is_main_process:
                return
            row = {"step": n, **{k: v for k, v in values.items() if isinstance(v, (int, float))}}
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            if n % 5 == 0:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
                self.run.log(f"{self.step.id}: step {n}: {shown}", echo=False)

        return report

    def everywhere(self, value: Any) -> list[Any]:
        """`value` from every process, in process order ([value] with one process)."""
        acc = self.run.accelerator
        if acc.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def sharded(self, n: int, work: Callable[[list[int]], list[Any]]) -> list[Any]:
        """Run `work` on this process's share of n items; every process gets all results, in order."""
        acc = self.run.accelerator
        if acc.num_processes == 1:
            return work(list(range(n)))
        from accelerate.utils import gather_object

        mine = list(range(acc.process_index, n, acc.num_processes))
        done = list(zip(mine, work(mine), strict=True)) if mine else []
        merged = gather_object(done)
        return [r for _, r in sorted(merged, key=lambda x: x[0])]

    def fail(self, message: str) -> StepError:
        """A StepError that names this step and its recipe line."""
        return StepError(f"{self.where}: {message}")
