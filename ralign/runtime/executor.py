"""Run a plan: each step once, in order, cached by its content hash, resumable after any interruption.

The executor owns the one `Accelerator`. A step writes into a temporary folder that is
renamed into place only when it is complete, so a run killed at any moment resumes
from the last finished step; running again on a finished run does no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralign.errors import RalignError, StepError, UsageError
from ralign.plan import Plan, Step

RUN_FORMAT = "ralign-run/1"


def step_seed(plan_seed: int, rnd: int, step_id: str) -> int:
    """A step's own seed: depends only on (recipe seed, round, step), never on what ran before."""
    return int(hashlib.sha256(f"{plan_seed}:{rnd}:{step_id}".encode()).hexdigest()[:8], 16)


def step_folder(run_dir: Path, step: Step) -> Path:
    return run_dir / f"r{step.round}" / step.id.split("/", 1)[1].replace("/", ".")


@dataclass
class Models:
    """At most one model in memory, keyed by its plan reference (`model:NAME` or a step id)."""

    run: Run
    key: str | None = None
    pair: tuple[Any, Any] | None = None

    def spec(self, ref: str, *, lora: bool) -> Any:
        from ralign.runtime.models import ModelSpec

        name = ref.split(":", 1)[1] if ref.startswith("model:") else self.run.plan.policy
        spec = self.run.plan.models[name]
        path = (
            spec["path"]
            if ref.startswith("model:")
            else str(step_folder(self.run.run_dir, self.run.plan.step(ref)) / "model")
        )
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
            dtype = "float32" if self.run.device_type == "cpu" else "bfloat16"
        return ModelSpec(path=path, dtype=dtype, lora=lora_spec)

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
    _progress: list[Any] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return self.step.params

    @property
    def where(self) -> str:
        span = self.step.span
        return f"step {self.step.id} ({span.get('file')}:{span.get('line')})"

    @property
    def programs(self) -> Any:
        return self.run.programs

    @property
    def accelerator(self) -> Any:
        return self.run.accelerator if self.run.accelerator.num_processes > 1 else None

    @property
    def max_length(self) -> int:
        return int(self.run.plan.models[self.run.plan.policy].get("max_length", 1024))

    def log(self, message: str) -> None:
        self.run.log(f"{self.step.id}: {message}")

    def input(self, slot: str) -> Any:
        return self.run.artifact(self.step.inputs[slot], slot, self.step)

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

    def eval_data(self) -> Any:
        from ralign.runtime.data import dataset_file

        data = self.params["data"]
        path = data.get("path", "")
        file = dataset_file({"path": path}, self.run.recipe_dir) if path else None
        if file is None:
            raise StepError(
                f"{self.where}: evaluation data '{path}' must be a local file or a built-in ralign: set"
            )
        return eval_items(self.params["task"], file, self.params.get("limit"))

    def progress(self, total: int, unit: str) -> Callable[[int, int], None]:
        return self.run.progress_bar(self, total, unit)

    def on_train_step(self) -> Callable[[int, dict[str, Any]], None]:
        def report(n: int, values: dict[str, Any]) -> None:
            if self.run.accelerator.is_main_process and n % 5 == 0:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
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


class Run:
    """One execution of a plan in a run directory."""

    def __init__(self, plan: Plan, run_dir: Path, recipe_dir: Path, device: str) -> None:
        from accelerate import Accelerator

        from ralign.rewards.evaluate import Programs
        from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)

        self.plan = plan
        self.run_dir = run_dir
        self.recipe_dir = recipe_dir
        self.accelerator = Accelerator(cpu=device == "cpu")
        self.device = self.accelerator.device
        self.device_type = self.device.type
        if device == "cuda" and self.device_type != "cuda":
            raise UsageError("--device cuda was asked for, but no CUDA device is available")
        self.programs = Programs(plan.programs)
        self.models = Models(self)
        self.cache: dict[tuple[str, str], Any] = {}
        self.ran: list[str] = []
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = run_dir / "run.log"

    # ---- logging and progress
    def log(self, message: str, echo: bool = True) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.log_file.open("a", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")
        if echo:
            print(message, file=sys.stderr, flush=True)

    def progress_bar(self, ctx: StepContext, total: int, unit: str) -> Callable[[int, int], None]:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            unit=f" {unit}",
            desc=f"{ctx.step.id}",
            leave=False,
            disable=not self.accelerator.is_main_process,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        tokens = [0]
        ctx._progress.append(bar)

        def update(items: int, new_tokens: int) -> None:
            tokens[0] += new_tokens
            bar.update(items)
            rate = tokens[0] / max(1e-9, time.perf_counter() - start)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

        return update

    # ---- artifacts
    def artifact(self, ref: str, slot: str, consumer: Step) -> Any:
        """Load what `ref` (a dataset or a step) holds for `slot`; cached in memory per run."""
        key = (ref, slot)
        if key in self.cache:
            return self.cache[key]
        from ralign.runtime.data import load_records, read_jsonl

        if ref.startswith("dataset:"):
            value: Any = load_records(self.plan.datasets[ref.split(":", 1)[1]], self.recipe_dir)
        else:
            folder = step_folder(self.run_dir, self.plan.step(ref))
            name = {
                "prompts": "prompts.jsonl",
                "responses": "responses.jsonl",
                "pairs": "pairs.jsonl",
            }.get(slot)
            if name is None and slot.startswith("score:"):
                name = f"score.{slot.split(':', 1)[1]}.jsonl"
            if name is None:
                raise StepError(f"step {consumer.id}: cannot read input '{slot}' from {ref}")
            value = read_jsonl(folder / name)
        self.cache[key] = value
        return value

    def done(self, step: Step) -> bool:
        meta = step_folder(self.run_dir, step) / "meta.json"
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("hash") == step.hash
        except (OSError, ValueError):
            return False

    # ---- running
    def run_step(self, step: Step) -> None:
        from ralign.runtime.steps import STEP_FUNCTIONS

        final = step_folder(self.run_dir, step)
        tmp = self.run_dir / ".tmp" / f"{step.hash[:16]}"
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        seed = step_seed(self.plan.seed, step.round, step.id)
        _seed_everything(seed)
        ctx = StepContext(self, step, tmp, seed)
        started = time.perf_counter()
        try:
            metrics = STEP_FUNCTIONS[step.kind](ctx)
        except RalignError as exc:
            message = str(exc)
            if not message.startswith("step "):
                message = f"{ctx.where}: {message}"
            raise StepError(message) from None
        finally:
            for bar in ctx._progress:
                bar.close()
            # `prepare` keeps every model and optimizer it saw; without this, each trained policy
            # and its AdamW state would stay in memory for the rest of the run.
            acc.free_memory()
        seconds = time.perf_counter() - started
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "metrics.json").write_text(
                json.dumps(metrics, indent=2, sort_keys=True), encoding="utf-8"
            )
            meta = {
                "format": RUN_FORMAT,
                "id": step.id,
                "kind": step.kind,
                "hash": step.hash,
                "seconds": round(seconds, 3),
            }
            (tmp / "meta.json").write_text(
                json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8"
            )
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        self.ran.append(step.id)
        self.log(f"{step.id}: done in {seconds:.1f}s " + _short(metrics))

    def execute(self) -> None:
        plan = self.plan
        if self.accelerator.is_main_process:
            (self.run_dir / "plan.json").write_text(plan.dumps(), encoding="utf-8")
        self.log(
            f"run {plan.recipe} ({plan.hash[:16]}) in {self.run_dir} on {self.device} x{self.accelerator.num_processes}"
        )
        for step in plan.steps:
            if self.done(step):
                continue
            self.run_step(step)
            self.write_metrics()
            if self.is_round_end(step):
                self.summary(step.round)
        self.write_metrics()
        self.finalize()
        if not self.ran:
            self.log("nothing to do: every step is already done")
        self.summary(None)

    def is_round_end(self, step: Step) -> bool:
        later = [s for s in self.plan.steps if s.round == step.round]
        return later[-1].id == step.id

    def finalize(self) -> None:
        """`final/`: the last trained policy (or the base model when nothing trains), loadable by Transformers."""
        final = self.run_dir / "final"
        trained = [s for s in self.plan.steps if s.kind.startswith("train")]
        source = step_folder(self.run_dir, trained[-1]) / "model" if trained else None
        marker = final / "ralign_source.txt"
        wanted = trained[-1].hash if trained else self.plan.models[self.plan.policy]["path"]
        if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
            return
        if not self.accelerator.is_main_process:
            return
        tmp = self.run_dir / ".tmp" / "final"
        shutil.rmtree(tmp, ignore_errors=True)
        if source is not None:
            shutil.copytree(source, tmp)
        else:
            from ralign.runtime.models import save_final

            model, tok = self.models.get(f"model:{self.plan.policy}")
            save_final(model, tok, tmp)
        (tmp / "ralign_source.txt").write_text(wanted, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.log(f"final policy in {final}")

    def write_metrics(self) -> None:
        """metrics.jsonl, rebuilt from the finished steps' own metrics (so a resumed run has them all)."""
        if not self.accelerator.is_main_process:
            return
        lines = []
        for s in self.plan.steps:
            f = step_folder(self.run_dir, s) / "metrics.json"
            if not self.done(s) or not f.is_file():
                continue
            for k, v in json.loads(f.read_text(encoding="utf-8")).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    lines.append(
                        json.dumps(
                            {"round": s.round, "step": s.id, "metric": k, "value": v},
                            sort_keys=True,
                        )
                    )
        tmp = self.run_dir / "metrics.jsonl.tmp"
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        os.replace(tmp, self.run_dir / "metrics.jsonl")

    def summary(self, rnd: int | None) -> None:
        """Print a per-round table of what matters: prompts, responses, agreement, pairs, reward, loss, evals."""
        if not self.accelerator.is_main_process:
            return
        rows = summary_rows(self.plan, self.run_dir)
        if rnd is not None:
            rows = [r for r in rows if r["round"] == rnd]
        if not rows:
            return
        print(format_summary(rows), file=sys.stderr, flush=True)


SUMMARY_COLUMNS = (
    ("prompts", "prompts"),
    ("responses", "answers"),
    ("order_agreement", "rank agree"),
    ("agree_weights", "agree weights"),
    ("pairs", "pairs"),
    ("mean_total", "mean reward"),
    ("loss", "train loss"),
)


def summary_rows(plan: Plan, run_dir: Path) -> list[dict[str, Any]]:
    """One row per round (0 = before training) of headline metrics, from the finished steps."""
    rows: dict[int, dict[str, Any]] = {}
    for s in plan.steps:
        f = step_folder(run_dir, s) / "metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text(encoding="utf-8"))
        row = rows.setdefault(s.round, {"round": s.round})
        for key in ("prompts", "responses", "order_agreement", "pairs", "mean_total", "loss"):
            if key in m:
                row[key if key != "loss" else "loss"] = m[key]
        weights = [v for k, v in sorted(m.items()) if k.startswith("agree_weight_")]
        if weights:
            row["agree_weights"] = "/".join(f"{w:.2f}" for w in weights)
        if s.kind == "evaluate":
            for k, v in m.items():
                if k.startswith("subsets."):
                    continue  # per-subset figures stay in the step's result.json
                short = k.removeprefix("rates.").removesuffix("_rate")
                if short in _QUIET_EVAL_KEYS:
                    continue
                row[f"{s.name}:{short}"] = v
    return [rows[k] for k in sorted(rows)]


# Diagnostics of an evaluation that the per-round table leaves to result.json.
_QUIET_EVAL_KEYS = {"ab_first", "ab_consistency", "everyday_refusal"}


def format_summary(rows: list[dict[str, Any]]) -> str:
    eval_cols = sorted({k for r in rows for k in r if ":" in k})
    cols = [(k, t) for k, t in SUMMARY_COLUMNS if any(k in r for r in rows)] + [
        (k, k) for k in eval_cols
    ]
    header = ["round"] + [t for _, t in cols]
    table = [header]
    for r in rows:
        cells = [str(r["round"]) if r["round"] else "base"]
        for k, _ in cols:
            v = r.get(k, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _short(metrics: dict[str, Any]) -> str:
    shown = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:6]
    ]
    return "(" + ", ".join(shown) + ")" if shown else ""


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def eval_items(task: str, file: Path, limit: int | None) -> list[Any]:
    """The items an evaluation scores: HHH rows, or behavior prompts (only the held-out ones of
    a set that marks splits, as the built-in seed sets do), the first `limit` of them."""
    if task == "hhh":
        from ralign.runtime.evaluate import load_hhh

        items: list[Any] = load_hhh(file)
    else:
        from ralign.runtime.behavior import load_prompts

        items = load_prompts(file)
        if any("split" in r for r in items):
            items = [r for r in items if r.get("split") == "heldout"]
    return items[:limit] if limit else items


def load_plan(path: Path, run_dir: Path | None, roots: tuple[Path, ...]) -> tuple[Plan, Path, Path]:
    """(plan, run_dir, recipe_dir) from a plan file or a recipe (compiled on the fly)."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if path.suffix == ".ralign":
        from ralign.compile import compile_file

        plan = compile_file(path, roots)
        recipe_dir = path.resolve().parent
    else:
        try:
            plan = Plan.load(path)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{path}: {exc}") from None
        recipe_dir = (path.resolve().parent / plan.recipe_dir).resolve()
    run_dir = run_dir or Path("runs") / plan.recipe
    return plan, run_dir, recipe_dir


def execute(
    path: Path, run_dir: Path | None = None, device: str = "auto", roots: tuple[Path, ...] = ()
) -> int:
    """`ralign execute`: run (or resume) a plan; returns the exit status."""
    plan, run_dir, recipe_dir = load_plan(path, run_dir, roots)
    run = Run(plan, run_dir, recipe_dir, device)
    try:
        run.execute()
    except KeyboardInterrupt:
        run.log(
            f"interrupted; finished steps are kept: run the same command again to resume ({run_dir})"
        )
        return 130
    return 0


def evaluate_command(
    *, model: str, data: str, task: str, limit: int | None, device: str, output: str | None
) -> int:
    """`ralign eval`: evaluate one model on one data set and print the headline numbers."""
    from accelerate import Accelerator

    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.data import dataset_file
    from ralign.runtime.evaluate import run_eval
    from ralign.runtime.models import ModelSpec, load_model
    from ralign.runtime.steps import flatten_eval

    acc = Accelerator(cpu=device == "cpu")
    file = dataset_file({"path": data}, Path.cwd())
    if file is None or not file.exists():
        raise UsageError(f"--data {data}: no such file or built-in set")
    m, tok = load_model(
        ModelSpec(path=model, dtype="float32" if acc.device.type == "cpu" else "bfloat16"),
        acc.device,
    )
    m.eval()
    result = run_eval(task, m, tok, eval_items(task, file, limit))
    for k, v in flatten_eval(result).items():
        print(f"{k:<40} {v:.4f}")
    if output:
        Path(output).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0
