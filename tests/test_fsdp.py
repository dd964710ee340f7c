"""FSDP and DeepSpeed launches: refused where Accelerate would not apply them (CPUs), checked
against the plan, and, with FSDP applied on CPUs by a test-only shim, two sharded processes train
a recipe to the losses and weights of one.

Accelerate (1.16) applies an FSDP config only when its processes share an accelerator: under
`--device cpu` it quietly trains plain data-parallel replicas instead, and ralign refuses such a
launch. FSDP2 itself runs on CPUs with gloo, so the equivalence test launches the shipped
`recipes/gpu/fsdp.yaml` through a shim that lets Accelerate keep the FSDP plugin on CPUs: the rest
(Accelerate's FSDP2 preparation, ralign's loops, gathering the trained weights) is the code a GPU
run takes, on gloo instead of NCCL.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import accelerate
import pytest
import torch
from conftest import execute_here, metrics
from safetensors.torch import load_file

from ralign.cli import main
from ralign.errors import UsageError
from ralign.plan import Plan
from ralign.runtime.executor import _check_sharding, step_folder

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "recipes" / "gpu" / "fsdp.yaml"
RECIPES = Path(__file__).parent / "recipes"

# Run as `accelerate launch ... SHIM execute ...` in place of `-m ralign`.
SHIM = """
import json, os, sys
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
import ralign.runtime.train as train

init = AcceleratorState.__init__


def on_cpu_too(self, *args, **kwargs):
    # Accelerate keeps the FSDP plugin only for accelerator types (MULTI_GPU, ...), not MULTI_CPU;
    # each AcceleratorState() re-reads the partial state's type, so this runs after every one.
    init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


gather = train.unsharded


def recorded(model, accelerator):
    plain = gather(model, accelerator)
    if accelerator.is_main_process:
        seen = {"trained": type(next(model.parameters())).__name__,
                "saved": type(next(plain.parameters())).__name__, "same": plain is model}
        with open(os.environ["FSDP_SEEN"], "a") as f:
            f.write(json.dumps(seen) + "\\n")
    return plain


AcceleratorState.__init__ = on_cpu_too
train.unsharded = recorded
from ralign.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A model cache of this module's own, which the launched processes inherit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_plan(recipe: Path, out: Path, *sets: str) -> Plan:
    args = [a for s in sets for a in ("--set", s)]
    assert main(["compile", str(recipe), "-o", str(out), *args]) == 0
    return Plan.load(out)


def launch(target: list[str], plan: Path, run_dir: Path, env: dict | None = None):
    """`accelerate launch` of the shipped FSDP config on two CPU processes, in fp32."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(FSDP_CONFIG), "--num_processes", "2", "--mixed_precision", "no"]
    command += ["--main_process_port", str(free_port()), *target, "execute", str(plan)]
    command += ["--run-dir", str(run_dir), "--device", "cpu"]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=400, env={**os.environ, **(env or {})}
    )


def train_log(run_dir: Path, plan: Plan, step: str) -> list[dict]:
    text = (step_folder(run_dir, plan.step(step)) / "train_log.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


# --- refused ---------------------------------------------------------------------------------------


def test_fsdp_config_on_cpus_is_refused(tmp_path):
    """Accelerate drops the FSDP plugin on CPUs; ralign stops before any step instead of training
    unsharded replicas under an FSDP config."""
    shutil.copytree(RECIPES / "data", tmp_path / "data")
    shutil.copy(RECIPES / "sharded.ralign", tmp_path)
    compile_plan(tmp_path / "sharded.ralign", tmp_path / "plan.json")
    done = launch(["-m", "ralign"], tmp_path / "plan.json", tmp_path / "run")
    assert done.returncode != 0
    said = (
        f"the accelerate config asks for FSDP, but Accelerate {accelerate.__version__} applies it "
        "only on GPUs: on cpu this launch would train 2 unsharded data-parallel replicas. Run FSDP "
        "and DeepSpeed configs on GPUs; for data parallelism on CPUs launch with --multi_gpu and "
        "`--device cpu`"
    )
    assert said in done.stderr, done.stderr[-3000:]
    assert f'File "{ROOT / "ralign"}' not in done.stderr  # the launcher's traceback, not ralign's
    assert not (tmp_path / "run" / "r1").exists()


def step_with(grad_accum: int) -> SimpleNamespace:
    span = {"file": "r.ralign", "line": 9}
    return SimpleNamespace(id="r1/learn/train.sft", params={"grad_accum": grad_accum}, span=span)


@pytest.mark.parametrize(
    ("env", "kind", "processes", "grad_accum", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP", 2, 4, None),
        ({"ACCELERATE_USE_FSDP": "true"}, "MULTI_CPU", 2, 1, "train 2 unsharded data-parallel"),
        ({"ACCELERATE_USE_FSDP": "true"}, "NO", 1, 1, "would train each process alone"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "MULTI_CPU", 2, 1, "asks for DEEPSPEED"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED", 2, 1, None),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            "DEEPSPEED",
            2,
            2,
            "step r1/learn/train.sft (r.ralign:9): grad_accum > 1 is not supported under DeepSpeed",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED", 1, 2, None),  # one process: no engine
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED-3", 2, 1, "ZeRO stage 3 partitions"),
        ({}, "MULTI_CPU", 2, 2, None),
        ({}, "NO", 1, 2, None),
    ],
)
def test_sharded_launch_checks(monkeypatch, env, kind, processes, grad_accum, message):
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    kind, _, stage = kind.partition("-")
    accelerator = SimpleNamespace(
        distributed_type=kind,
        num_processes=processes,
        device=torch.device("cpu"),
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=int(stage or 2))),
    )
    plan = SimpleNamespace(steps=[step_with(1), step_with(grad_accum)])
    if message is None:
        _check_sharding(accelerator, plan)
    else:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _check_sharding(accelerator, plan)


# --- FSDP on two CPU processes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        ["prefs/train.dpo.grad_accum=2"],  # full fine-tuning; DPO accumulates 2 micro-batches
        pytest.param(  # the same path with an adapter: 40 s more, so not in every CI run
            ["policy.lora={ rank = 4, alpha = 8, dropout = 0 }"], marks=pytest.mark.long
        ),
    ],
    ids=["full", "lora"],
)
def test_fsdp_trains_like_one_process(tmp_path, sets):
    """The shipped FSDP2 config on two CPU processes (gloo, FSDP kept by the shim): every metric,
    every optimizer step's loss and the final weights equal one process's to 1e-4.

    The recipe is tests/recipes/sharded.ralign: SFT, then ranking by the trained policy with each
    process judging its share (a sharded model would deadlock there: each forward is a collective),
    then DPO (accumulating 2 micro-batches a step in the full case). Its temperature-1 answers
    depend on how prompts are split, so the two-process run resumes from the one-process run's;
    LoRA's dropout is off for the same reason (each process draws its own masks)."""
    shutil.copytree(RECIPES / "data", tmp_path / "data")
    shutil.copy(RECIPES / "sharded.ralign", tmp_path)
    plan = compile_plan(tmp_path / "sharded.ralign", tmp_path / "plan.json", *sets)
    one, two = tmp_path / "one", tmp_path / "two"
    started = time.perf_counter()
    execute_here(tmp_path / "plan.json", one)
    print(f"one process: {time.perf_counter() - started:.1f}s")
    sampled = step_folder(one, plan.step("r1/prefs/sample"))
    shutil.copytree(sampled, two / sampled.relative_to(one))

    shim = tmp_path / "fsdp_on_cpu.py"
    shim.write_text(SHIM, encoding="utf-8")
    seen = tmp_path / "seen.jsonl"
    started = time.perf_counter()
    done = launch([str(shim)], tmp_path / "plan.json", two, {"FSDP_SEEN": str(seen)})
    print(f"two FSDP processes: {time.perf_counter() - started:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "r1/prefs/sample: done" not in done.stderr  # the copied answers were used

    # Both train steps trained a sharded model (DTensor weights) and saved a gathered plain one.
    records = [json.loads(line) for line in seen.read_text().splitlines()]
    assert records == [{"trained": "DTensor", "saved": "Parameter", "same": False}] * 2

    for step in ("r1/warmup/train.sft", "r1/prefs/train.dpo"):
        a, b = train_log(one, plan, step), train_log(two, plan, step)
        assert [r["step"] for r in b] == [r["step"] for r in a] and len(a) >= 2
        for ra, rb in zip(a, b, strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4), f"{step} {ra['step']}"
            assert rb["tokens"] == ra["tokens"]
    a, b = metrics(one), metrics(two)
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    for step, values in a.items():
        for key, value in values.items():
            assert b[step][key] == pytest.approx(value, abs=1e-4), f"{step} {key}"
    w1, w2 = (load_file(d / "final" / "model.safetensors") for d in (one, two))
    assert sorted(w1) == sorted(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=0)
