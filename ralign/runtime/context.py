"""What a step function sees: its parameters, inputs, models, seed, output folder and the processes."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ralign import inputs
from ralign import schema as sc
from ralign.errors import DataError, RalignError, StepError
from ralign.plan import Plan, Step
from ralign.runtime.rundir import MANIFEST, step_folder

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
    chat = spec.get("chat_template")
    template = (
        None if chat in (None, "auto") else "" if chat == "none" else spec["chat_template_text"]
    )
    return ModelSpec(
        path=path, dtype=dtype, lora=lora_spec, system=spec.get("system"), chat_template=template
    )


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
    """At most one model in memory, keyed by its plan reference (`model:NAME` or a step id).

    A LoRA training step saves its adapter alone, on top of the policy it was trained on (its
    `policy` input: the declared model or an earlier training step). Loading that step loads its
    base the same way, recursively, and merges the adapter into it: the weights a folder of merged
    weights would hold, bit for bit, at the price of one merge per earlier LoRA step.
    """

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
            self.drop()
            model, tok = self.load(ref, lora=False)
            model.eval()
            self.key, self.pair = ref, (model, tok)
        return self.pair

    def trainable(self, ref: str) -> tuple[Any, Any]:
        """A fresh copy to train (with a new LoRA adapter when the model declares one)."""
        self.drop()
        return self.load(ref, lora=True)

    def load(self, ref: str, *, lora: bool) -> tuple[Any, Any]:
        """Load `ref` from disk: a declared model, a step's full weights, or a step's adapter
        merged into its base; with a fresh LoRA adapter when `lora` and the model declares one."""
        from ralign.runtime.models import load_model, merge_adapter, read_adapter_base

        spec = self.spec(ref, lora=lora)
        if ref.startswith("model:") or read_adapter_base(spec.path) is None:
            return load_model(spec, self.run.device)
        step = self.run.plan.step(ref)
        problem = self.base_problem(step)
        if problem:
            raise RalignError(
                f"step {ref}: {problem}; delete {Path(spec.path).parent} to train it again"
            )
        adapter = self.spec(ref, lora=True).lora
        if adapter is None:
            raise RalignError(f"step {ref} saved a LoRA adapter, but the policy declares no lora")
        base, _ = self.load(step.inputs["policy"], lora=False)
        return merge_adapter(base, spec, adapter, self.run.device)

    def base_record(self, ref: str) -> dict[str, Any]:
        """What a LoRA step trained on `ref` records of its base (`ralign_base.json`): the plan
        reference, the folder the run loaded it from, and a digest of its files when it is a step."""
        path = self.spec(ref, lora=False).path
        if ref.startswith("model:"):
            from ralign.runtime.models import resolve_path

            return {"base": ref, "base_path": resolve_path(path), "base_sha256": None}
        relative = str(Path(path).relative_to(self.run.run_dir))
        return {"base": ref, "base_path": relative, "base_sha256": self.seal(ref)}

    def seal(self, ref: str) -> str | None:
        """A digest of step `ref`'s `model/` files as its manifest lists them (sizes and sha256);
        None when the manifest is unreadable."""
        folder = step_folder(self.run.run_dir, self.run.plan.step(ref))
        try:
            files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
            model = {k: v for k, v in files.items() if k.startswith("model/")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()

    def base_problem(self, step: Step) -> str | None:
        """Why a finished step's LoRA adapter no longer fits its base (another base, or the base
        step ran again with other results); None when it fits or the step saved full weights."""
        from ralign.runtime.models import read_adapter_base

        if not sc.STEPS[step.kind].trains:
            return None
        try:
            record = read_adapter_base(step_folder(self.run.run_dir, step) / "model")
        except RalignError as exc:
            return str(exc)
        if record is None:
            return None
        base = step.inputs["policy"]
        if record["base"] != base:
            return f"its adapter was trained on {record['base']}, not on {base}"
        if base.startswith("model:"):
            return None  # the step's hash covers the declared model
        if not self.run.done(self.run.plan.step(base)):
            return f"its base {base} is not finished"
        if record["base_sha256"] != self.seal(base):
            return f"its base {base} changed since the adapter was trained on it"
        return None

    def adopt(self, ref: str, model: Any, tok: Any) -> None:
        model.eval()
        self.key, self.pair = ref, (model, tok)

    def drop(self) -> None:
        self.key, self.pair = None, None


# What a training step's progress bar shows besides its step count.
TRAIN_SHOWN = ("loss", "lr", "reward_accuracy", "reward_margin")


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
        """The policy's `max_length`, cut to the positions the model takes (the default of 1024
        would otherwise pass a small model's)."""
        declared = int(self.run.plan.models[self.run.plan.policy].get("max_length", 1024))
        positions = self.run.positions()
        return min(declared, positions) if positions else declared

    def log(self, message: str) -> None:
        self.run.log(f"{self.step.id}: {message}")

    def input(self, slot: str) -> Any:
        return self.run.artifact(self.step.inputs[slot], slot)

    def template(self, attr: str) -> str:
        return str(self.run.plan.templates[self.step.templates[attr]]["text"])

    def render(self, attr: str, variables: dict[str, Any]) -> str:
        """Render the step's template `attr` with `variables` and the text constants it reads."""
        from ralign.templates import render

        template = self.run.plan.templates[self.step.templates[attr]]
        return render(template["text"], {**template.get("lets", {}), **variables})

    def model(self, slot: str) -> tuple[Any, Any]:
        return self.run.models.get(self.step.inputs[slot])

    def trainable(self) -> tuple[Any, Any]:
        return self.run.models.trainable(self.step.inputs["policy"])

    def reference(self, model: Any) -> Any:
        """The DPO reference: the adapter-disabled policy (LoRA), the policy itself when its
        reference log-probs are taken before any update (same weights), else a loaded copy."""
        from ralign.runtime.models import is_peft

        ref = self.step.inputs["reference"]
        if ref == self.step.inputs["policy"]:
            return None if is_peft(model) else model
        copy, _ = self.run.models.load(ref, lora=False)
        return copy.eval()

    def per_process(self, batch_size: int) -> int:
        """Per-process batch so the global batch is the recipe's, whatever the process count."""
        return max(1, batch_size // self.run.accelerator.num_processes)

    def save_policy(self, model: Any, tok: Any) -> None:
        """Save the trained policy as this step's `model/`: a LoRA model's adapter alone (with a
        record of its base), else the full weights; and keep it in memory (LoRA merged)."""
        from ralign.runtime.models import is_peft, save_adapter, save_tokenizer

        acc = self.run.accelerator
        model = acc.unwrap_model(model) if acc.num_processes > 1 else model
        tok.padding_side = "left"
        folder = self.out / "model"
        if is_peft(model):
            if acc.is_main_process:
                save_adapter(
                    model, tok, folder, self.run.models.base_record(self.step.inputs["policy"])
                )
            model = model.merge_and_unload()
        elif acc.is_main_process:
            model.save_pretrained(folder)
            save_tokenizer(tok, folder)
        self.run.models.adopt(self.step.id, model, tok)

    def progress(self, total: int, unit: str) -> Callable[[int, int], None]:
        return self.run.progress_bar(self, total, unit)

    def on_train_step(self) -> Callable[[int, dict[str, Any]], None]:
        """Per optimizer step: a line in the step's `train_log.jsonl`, the trackers, a progress bar
        (step of total, loss, lr, tokens/s; DPO's reward accuracy and margin), run.log every 5."""
        log = self.out / "train_log.jsonl"
        bar: list[Any] = []
        started = time.perf_counter()

        def report(n: int, values: dict[str, Any]) -> None:
            if not self.run.accelerator.is_main_process:
                return
            row = {"step": n, **{k: v for k, v in values.items() if isinstance(v, (int, float))}}
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            self.run.track(f"{self.step.id}/train", row, n)
            if not bar:
                bar.append(
                    self.run.progress_bar(self, int(values.get("total_steps") or 0), "steps")
                )
            rate = values.get("tokens", 0) / max(1e-9, time.perf_counter() - started)
            shown = {k: values[k] for k in TRAIN_SHOWN if isinstance(values.get(k), float)}
            bar[0](1, 0, {**shown, "tok/s": rate})
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
