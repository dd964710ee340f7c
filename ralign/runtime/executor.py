"""Run a plan: each step once, in order, cached by its content hash, resumable after any interruption.

The executor owns the one `Accelerator`. It walks the plan; a step whose folder is finished and
intact is skipped; any other runs in a temporary folder that is sealed and moved into place only
when it is complete (`ralign.runtime.rundir`), so a run killed at any moment resumes from the
last finished step, and running again on a finished run does no work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ralign import inputs
from ralign import schema as sc
from ralign.errors import RalignError, StepError, UsageError
from ralign.plan import Plan, Step
from ralign.runtime import rundir
from ralign.runtime.context import Models, StepContext
from ralign.runtime.rundir import step_folder
from ralign.runtime.summary import format_summary, summary_rows

__all__ = ["Run", "execute", "step_folder", "step_seed"]


def step_seed(plan_seed: int, rnd: int, step_id: str) -> int:
    """A step's own seed: depends only on (recipe seed, round, step), never on what ran before."""
    return int(hashlib.sha256(f"{plan_seed}:{rnd}:{step_id}".encode()).hexdigest()[:8], 16)


class Run:
    """One execution of a plan in a run directory."""

    def __init__(
        self,
        plan: Plan,
        run_dir: Path,
        recipe_dir: Path,
        device: str,
        log_with: tuple[str, ...] = (),
    ) -> None:
        from accelerate import Accelerator

        from ralign.rewards.interpreter import Programs
        from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)

        self.plan = plan
        self.run_dir = run_dir
        self.recipe_dir = recipe_dir
        trackers = tuple(dict.fromkeys((*plan.log_with, *log_with)))
        _check_trackers(trackers)
        _check_builtins(plan)
        precision = plan.models[plan.policy].get("precision") if plan.policy else None
        self.accelerator = Accelerator(
            cpu=device == "cpu",
            mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision or "", "no"),
            log_with=list(trackers) or None,
            project_dir=str(run_dir / "trackers") if trackers else None,
        )
        _check_sharding(self.accelerator, plan)
        if trackers:
            config = {"plan_hash": plan.hash, "seed": plan.seed, "rounds": plan.rounds}
            self.accelerator.init_trackers(plan.recipe, config=config)
        self.tracking = bool(trackers)
        self.device = self.accelerator.device
        self.device_type = self.device.type
        if device == "cuda" and self.device_type != "cuda":
            raise UsageError("--device cuda was asked for, but no CUDA device is available")
        self.programs = Programs(plan.programs)
        self.models = Models(self)
        self.cache: dict[tuple[str, str], Any] = {}
        self.verified: dict[str, str | None] = {}  # step id -> why its folder is not usable
        self.ran: list[str] = []
        self.log_file = run_dir / "run.log"
        _third_party_to(self.log_file)

    def positions(self) -> int | None:
        """How many positions the policy's model takes (None: unknown)."""
        if not hasattr(self, "_positions"):
            spec = self.plan.models[self.plan.policy]
            path = str(spec["path"])
            if path.startswith("ralign:"):
                found = sc.BUILTIN_POSITIONS.get(path.removeprefix("ralign:"))
            elif "sha256" in spec:
                found = inputs.model_positions(self.recipe_dir / path)
            else:
                found = _hub_positions(path)
            self._positions = found
        return self._positions

    # ---- logging and progress
    def log(self, message: str, echo: bool = True) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.log_file.open("a", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")
        if echo:
            print(message, file=sys.stderr, flush=True)

    def progress_bar(self, ctx: StepContext, total: int, unit: str) -> Callable[..., None]:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total or None,
            unit=f" {unit}",
            desc=f"{ctx.step.id}",
            leave=False,
            disable=not self.accelerator.is_main_process,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        tokens = [0]
        ctx.bars.append(bar)

        def update(items: int, new_tokens: int, shown: dict[str, float] | None = None) -> None:
            """Advance by `items`; `shown` replaces the tokens/s figure with these values."""
            tokens[0] += new_tokens
            bar.update(items)
            if shown is not None:
                bar.set_postfix_str(
                    ", ".join(f"{k} {v:.3g}" for k, v in shown.items()), refresh=False
                )
                return
            rate = tokens[0] / max(1e-9, time.perf_counter() - start)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

        return update

    # ---- artifacts
    def artifact(self, ref: str, slot: str) -> Any:
        """Load what `ref` (a dataset or a step) holds for `slot`; cached in memory per run."""
        key = (ref, slot)
        if key not in self.cache:
            from ralign.runtime.data import load_records, read_jsonl

            if ref.startswith("dataset:"):
                spec = self.plan.datasets[ref.split(":", 1)[1]]
                self.cache[key] = load_records(spec, self.recipe_dir)
            else:
                producer = self.plan.step(ref)
                name = slot.split(":", 1)[1] if slot.startswith("score:") else None
                file = step_folder(self.run_dir, producer) / sc.STEPS[producer.kind].artifact(name)
                self.cache[key] = read_jsonl(file)
        return self.cache[key]

    def done(self, step: Step) -> bool:
        """Whether the step's folder is finished, for this hash, and intact, and a LoRA adapter in
        it still fits its base (checked once per run)."""
        if step.id not in self.verified:
            folder = step_folder(self.run_dir, step)
            self.verified[step.id] = rundir.verify(folder, step.hash) or self.models.base_problem(
                step
            )
        return self.verified[step.id] is None

    # ---- running
    def refresh(self, step: Step) -> None:
        """Bring a finished step up to this ralign: a behaviour evaluation scored by other
        detectors is re-scored from its stored answers (seconds), not generated again (minutes)."""
        from ralign.runtime.steps import rescore, stamp

        want = stamp(step)
        if not want or not self.accelerator.is_main_process:
            return
        folder = step_folder(self.run_dir, step)
        meta = json.loads((folder / rundir.META).read_text(encoding="utf-8"))
        if all(meta.get(k) == v for k, v in want.items()):
            return
        tmp = self.run_dir / ".tmp" / f"{step.hash[:16]}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        try:
            metrics = rescore(tmp)
        except (OSError, ValueError, KeyError, RalignError) as exc:
            raise StepError(f"{step.id}: cannot re-score its stored answers: {exc}") from None
        rundir.write_json(tmp / "metrics.json", metrics)
        rundir.commit(tmp, folder, {**meta, **want})
        self.log(
            f"{step.id}: re-scored its stored answers with this ralign's detectors "
            + _short(metrics)
        )

    def run_step(self, step: Step) -> None:
        from ralign.runtime.steps import STEP_FUNCTIONS, stamp

        acc = self.accelerator
        tmp = self.run_dir / ".tmp" / f"{step.hash[:16]}"
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
            raise StepError(
                message if message.startswith("step ") else f"{ctx.where}: {message}"
            ) from None
        except OSError as exc:  # a full disk while writing an output: say so, keep what is done
            raise StepError(f"{ctx.where}: {rundir.disk_error(exc, tmp)}") from None
        finally:
            for bar in ctx.bars:
                bar.close()
            # `prepare` keeps every model and optimizer it saw; without this, each trained policy
            # and its AdamW state would stay in memory for the rest of the run.
            acc.free_memory()
        seconds = time.perf_counter() - started
        acc.wait_for_everyone()
        if acc.is_main_process:
            rundir.write_json(tmp / "metrics.json", metrics)
            meta = {
                "format": rundir.RUN_FORMAT,
                "id": step.id,
                "kind": step.kind,
                "hash": step.hash,
                "seconds": round(seconds, 3),
                **stamp(step),
            }
            rundir.commit(tmp, step_folder(self.run_dir, step), meta)
        acc.wait_for_everyone()
        self.verified[step.id] = None
        self.ran.append(step.id)
        self.track(step.id, metrics, self.plan.steps.index(step))
        self.log(f"{step.id}: done in {seconds:.1f}s " + _short(metrics))

    def track(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Send numbers to the experiment trackers (`--log-with`), as `PREFIX/NAME`."""
        if self.tracking:
            numbers = {f"{prefix}/{k}": v for k, v in values.items() if _is_number(v)}
            self.accelerator.log(numbers, step=step)

    def execute(self) -> None:
        plan = self.plan
        if self.accelerator.is_main_process:
            rundir.write_json(self.run_dir / "plan.json", plan.to_json())
        self.log(
            f"run {plan.recipe} ({plan.hash[:16]}) in {self.run_dir} on {self.device} x{self.accelerator.num_processes}"
        )
        for step in plan.steps:
            if self.done(step):
                self.refresh(step)
                continue
            why = self.verified.get(step.id)
            if why not in (None, "not finished"):
                self.log(f"{step.id}: running it again: its folder is {why}")
            self.run_step(step)
            self.write_metrics()
            if step is [s for s in plan.steps if s.round == step.round][-1]:
                self.summary(step.round)
        self.write_metrics()
        self.finalize()
        if not self.ran:
            self.log("nothing to do: every step is already done")
        self.summary(None)

    def finalize(self) -> None:
        """`final/`: the last trained policy (or the base model when nothing trains), loadable by
        Transformers; rebuilt whenever the step it came from is not the one it was copied from."""
        trained = [s for s in self.plan.steps if sc.STEPS[s.kind].trains]
        source = step_folder(self.run_dir, trained[-1]) if trained else None
        if source is not None:  # the step's own seal: its hash, and every byte of its model
            wanted = "".join(
                (source / n).read_text(encoding="utf-8") for n in (rundir.META, rundir.MANIFEST)
            )
        else:
            wanted = json.dumps(self.plan.models[self.plan.policy], sort_keys=True)
        final = self.run_dir / "final"
        marker = final / "ralign_source.json"
        if not self.accelerator.is_main_process:
            return
        if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
            return
        tmp = self.run_dir / ".tmp" / "final"
        shutil.rmtree(tmp, ignore_errors=True)
        from ralign.runtime.models import ADAPTER_BASE, save_final

        if source is not None and not (source / "model" / ADAPTER_BASE).exists():
            shutil.copytree(source / "model", tmp)
        else:  # the declared model, or a LoRA step's adapter merged into its base
            model, tok = self.models.get(trained[-1].id if trained else f"model:{self.plan.policy}")
            save_final(model, tok, tmp)
        rundir.failpoint("final-copied")
        (tmp / "ralign_source.json").write_text(wanted, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
            rundir.failpoint("final-removed")
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
                    row = {"round": s.round, "step": s.id, "metric": k, "value": v}
                    lines.append(json.dumps(row, sort_keys=True))
        tmp = self.run_dir / "metrics.jsonl.tmp"
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        os.replace(tmp, self.run_dir / "metrics.jsonl")

    def summary(self, rnd: int | None) -> None:
        """Print the per-round table (one round's row, or all of them at the end)."""
        if not self.accelerator.is_main_process:
            return
        rows = summary_rows(self.plan, self.run_dir)
        if rnd is not None:
            rows = [r for r in rows if r["round"] == rnd]
        if rows:
            print(format_summary(rows), file=sys.stderr, flush=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Each tracker Accelerate supports, and the package it needs.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
}


def _check_trackers(trackers: tuple[str, ...]) -> None:
    """A tracker whose package is missing is a clear error (Accelerate would skip it quietly)."""
    import importlib.util

    for name in trackers:
        if name not in TRACKER_PACKAGES:
            raise UsageError(f"unknown tracker '{name}' (known: {', '.join(TRACKER_PACKAGES)})")
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None and not (
            name == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            raise UsageError(
                f"--log-with {name}: the {package} package is not installed (pip install {package})"
            )


# The variable `accelerate launch` sets for a config's distributed_type -> the type that carries
# it out. Accelerate (1.16) applies FSDP and DeepSpeed only on accelerators: under `--device cpu`
# it quietly trains plain data-parallel replicas, and with no GPU and no `--device cpu` each
# process runs alone, as process 0 of 1.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def _check_builtins(plan: Plan) -> None:
    """Before any step runs: every builtin the plan's expressions reach can run on this machine
    (`embedding_probe` needs the MiniLM encoder), rather than failing at the first score step."""
    from ralign import ir
    from ralign.rewards.builtins import BUILTINS

    roots = tuple(e for s in plan.steps for e in s.exprs.values())
    names = {n.name for n in ir.reach(plan.programs, roots) if isinstance(n, ir.Call)}
    for name in sorted(names):
        problem = BUILTINS[name].missing() if BUILTINS[name].missing else None
        if problem:
            raise UsageError(f"the recipe's rewards call {name}(), and {problem}")


def _check_sharding(accelerator: Any, plan: Plan) -> None:
    """A launch that asks for FSDP or DeepSpeed gets it, or a clear error; so does a plan that
    DeepSpeed would train differently from one process."""
    import accelerate

    for variable, wanted in SHARDED_LAUNCHES.items():
        if (
            os.environ.get(variable, "").lower() == "true"
            and accelerator.distributed_type != wanted
        ):
            n = accelerator.num_processes
            instead = f"{n} unsharded data-parallel replicas" if n > 1 else "each process alone"
            raise UsageError(
                f"the accelerate config asks for {wanted}, but Accelerate "
                f"{accelerate.__version__} applies it only on GPUs: on {accelerator.device.type} "
                f"this launch would train {instead}. Run FSDP and DeepSpeed configs on GPUs; "
                "for data parallelism on CPUs launch with --multi_gpu and `--device cpu`"
            )
    if accelerator.distributed_type == "DEEPSPEED" and accelerator.num_processes > 1:
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise UsageError(
                "DeepSpeed ZeRO stage 3 partitions the weights, and ralign saves and samples from "
                "whole ones after each train step: use stage 1 or 2, or FSDP"
            )
        # DeepSpeed steps the optimizer inside every backward, so ralign's own accumulation
        # (several backwards, then one step) would take a step per micro-batch.
        for step in plan.steps:
            if int(step.params.get("grad_accum", 1)) > 1:
                raise UsageError(
                    f"step {step.id} ({step.span.get('file')}:{step.span.get('line')}): "
                    "grad_accum > 1 is not supported under DeepSpeed, which steps the optimizer "
                    "on every backward; raise batch_size instead, or use FSDP"
                )


def _third_party_to(log_file: Path) -> None:
    """Send other libraries' warnings and log records to run.log, not to the user's terminal:
    the terminal shows ralign's progress and errors; the log keeps everything."""
    import logging
    import warnings

    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    for name in ("py.warnings", "transformers", "accelerate", "peft", "datasets", "torch"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)  # an earlier run's log, in this process: close it too
            old.close()
        logger.addHandler(handler)
        logger.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # its own stderr handler
        hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    except ImportError:
        pass


def _hub_positions(path: str) -> int | None:
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) else None


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


def load_plan(
    path: Path,
    run_dir: Path | None,
    roots: tuple[Path, ...],
    sets: tuple[str, ...] = (),
    smoke: bool = False,
) -> tuple[Plan, Path, Path]:
    """(plan, run_dir, recipe_dir) from a plan file (verified) or a recipe (compiled on the fly)."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if path.suffix == ".ralign":
        from ralign.compile import compile_file

        plan = compile_file(path, roots, sets=sets, smoke=smoke)
        recipe_dir = path.resolve().parent
    else:
        from ralign.plan import PlanError, check_inputs

        if sets or smoke:
            raise UsageError("--set and --smoke change a recipe: compile it again with them")
        try:
            plan = Plan.load(path)
            if "\0" in plan.recipe_dir:
                raise PlanError(f"{path}: the plan's recipe_dir contains a NUL character")
            recipe_dir = (path.resolve().parent / plan.recipe_dir).resolve()
            check_inputs(plan, recipe_dir, roots)
        except (PlanError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    return plan, run_dir or Path("runs") / plan.recipe, recipe_dir


def execute(
    path: Path,
    run_dir: Path | None = None,
    device: str = "auto",
    roots: tuple[Path, ...] = (),
    sets: tuple[str, ...] = (),
    smoke: bool = False,
    log_with: tuple[str, ...] = (),
) -> int:
    """`ralign execute`: run (or resume) a plan; returns the exit status."""
    plan, run_dir, recipe_dir = load_plan(path, run_dir, roots, sets, smoke)
    lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if (
        os.environ.get("RANK", "0") == "0"
    ):  # under `accelerate launch`, the first process owns the folder
        rundir.open_run_dir(run_dir)
        lock = rundir.locked(run_dir)
    with lock:
        run = Run(plan, run_dir, recipe_dir, device, log_with)
        try:
            run.execute()
            if run.accelerator.is_main_process:
                from ralign.report import write_report

                report = write_report(run_dir)
                if report is not None:
                    run.log(f"report: {report}")
        except KeyboardInterrupt:
            run.log(
                f"interrupted; finished steps are kept: run the same command again to resume ({run_dir})"
            )
            return 130
        finally:
            if run.tracking:
                run.accelerator.end_training()
    return 0
