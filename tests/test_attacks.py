"""What a hostile recipe, plan or run dir tries, and what ralign does instead (issue 14's table).

Recipe attacks are data: tests/cases/attacks/*.ralign, each naming the command and the error it
must give (see the README there). Plan attacks compile a real plan, edit it as an attacker would
(recomputing every hash, so only ralign's own checks can catch it) and run it. Run-dir attacks
work on a tiny finished run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ralign.cli import main
from ralign.compile import compile_file
from ralign.plan import Plan, with_hashes
from ralign.runtime import rundir

CASES = Path(__file__).parent / "cases" / "attacks"


def _header(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        out[key] = value
    return out


@pytest.mark.parametrize("case", sorted(CASES.glob("*.ralign")), ids=lambda p: p.stem)
def test_attack_case(case: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = _header(case)
    copy = tmp_path / case.name
    shutil.copy(case, copy)
    argv = [str(copy) if a == "FILE" else a for a in shlex.split(head.get("command", "check FILE"))]
    started = time.perf_counter()
    status = main(argv)
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert elapsed < float(head.get("within", "10")), f"{case.name} took {elapsed:.1f}s"
    if "expect-ok" in head:
        assert status == 0, err
        assert head["expect-ok"] in out
    else:
        assert status == 1, f"exit {status}; stdout: {out}"
        assert head["expect"] in err, err
        assert case.name in err or "reward 'r'" in err  # it points at the recipe


def test_every_attack_case_says_what_it_expects() -> None:
    for case in CASES.glob("*.ralign"):
        head = _header(case)
        assert ("expect" in head) != ("expect-ok" in head), case.name


# ---- plans ------------------------------------------------------------------------------------

RECIPE = """recipe "plan-attack" { seed = 3 }
model policy { path = "ralign:tiny-llama", max_length = 128 }
dataset seeds { path = "data/prompts.jsonl" }
phase answer {
  sample { from = seeds, per_prompt = 2, max_new_tokens = 4 }
  score { total = words(response) }
}
"""


@pytest.fixture()
def plan_case(tmp_path: Path) -> tuple[Path, Plan]:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n', encoding="utf-8")
    recipe = tmp_path / "r.ralign"
    recipe.write_text(RECIPE, encoding="utf-8")
    return tmp_path, compile_file(recipe, plan_path=tmp_path / "p.plan.json")


def _edited(plan: Plan, **datasets: dict) -> Plan:
    return with_hashes(replace(plan, datasets={**plan.datasets, **datasets}))


def _run_plan(tmp_path: Path, data: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "p.plan.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    status = main(["execute", str(path), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


OUTSIDE = {"path": "/etc/passwd", "field": "prompt"}
PLAN_ATTACKS = {
    "data outside the roots, hash dropped": (
        lambda p: _edited(p, seeds=OUTSIDE).to_json(),
        "is outside the recipe's folder and the --root folders",
    ),
    "data relative out of the roots": (
        lambda p: _edited(
            p, seeds={"path": "../../../../etc/passwd", "sha256": "0" * 64}
        ).to_json(),
        "is outside the recipe's folder",
    ),
    "local data without its hash": (
        lambda p: _edited(p, seeds={"path": "data/prompts.jsonl", "field": "prompt"}).to_json(),
        "has no content hash in the plan",
    ),
    "hf: pointing at a folder": (
        lambda p: _edited(p, seeds={"path": "hf:/etc", "field": "prompt"}).to_json(),
        "not a Hugging Face hub id",
    ),
    "model folder outside the roots": (
        lambda p: with_hashes(
            replace(p, models={"policy": {"path": "/usr/lib", "sha256": "0" * 64}})
        ).to_json(),
        "model folder '/usr/lib' is outside",
    ),
    "recipe name that is a path": (
        lambda p: with_hashes(replace(p, recipe="../../escape")).to_json(),
        "a recipe name is a name, not a path",
    ),
    "NUL in recipe_dir": (
        lambda p: {**p.to_json(), "recipe_dir": "a\0b"},
        "NUL",
    ),
    "a step edited, its hash kept": (
        lambda p: _edit_step(p.to_json(), "per_prompt", 64),
        "its hash does not match its content",
    ),
    "a plan that is a list": (lambda p: [p.to_json()], "expected an object"),
    "steps that are a string": (lambda p: {**p.to_json(), "steps": "x"}, "must be a list"),
    "an expression that is not one": (
        lambda p: _edit_expr(p.to_json(), ["call", "__import__", [["str", "os"]]]),
        "unknown builtin",
    ),
    "a backtracking regex": (
        lambda p: _edit_expr(
            p.to_json(), ["call", "count", [["var", "response"], ["re", "(a)\\1", ""]]]
        ),
        "backreference",
    ),
}


def _edit_step(data: dict, key: str, value: object) -> dict:
    step = next(s for s in data["steps"] if s["kind"] == "sample")
    step["params"][key] = value
    return data


def _edit_expr(data: dict, expr: list) -> dict:
    """Swap the score's expression and recompute every hash, as an attacker would."""
    step = next(s for s in data["steps"] if s["kind"] == "score")
    step["exprs"]["total"] = expr
    return _rehash(data)


def _rehash(data: dict) -> dict:
    from ralign import ir
    from ralign.plan import Step

    steps = [
        Step(
            **{
                **s,
                "outputs": tuple(s["outputs"]),
                "exprs": {k: ir.from_json(e) for k, e in s["exprs"].items()},
            }
        )
        for s in data["steps"]
    ]
    plan = Plan(
        **{
            k: data[k]
            for k in (
                "recipe",
                "source",
                "seed",
                "rounds",
                "policy",
                "models",
                "datasets",
                "templates",
                "evaluations",
            )
        },
        programs=ir.programs_from_json(data["programs"]),
        steps=tuple(steps),
        recipe_dir=data.get("recipe_dir", "."),
    )
    return with_hashes(plan).to_json()


@pytest.mark.parametrize("attack", sorted(PLAN_ATTACKS))
def test_plan_attack(attack: str, plan_case, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, plan = plan_case
    edit, expected = PLAN_ATTACKS[attack]
    status, err = _run_plan(tmp_path, edit(plan), capsys)
    assert status in (1, 2) and expected in err, err
    assert not (tmp_path / "run" / "r1").exists()  # refused before any step ran


# ---- run dirs ---------------------------------------------------------------------------------


def test_a_run_dir_that_is_a_file(plan_case, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, _ = plan_case
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    status = main(["execute", str(tmp_path / "r.ralign"), "--run-dir", str(tmp_path / "file")])
    assert status == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text(encoding="utf-8") == "mine"


def test_a_run_dir_under_a_system_folder(plan_case, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, _ = plan_case
    status = main(["execute", str(tmp_path / "r.ralign"), "--run-dir", "/proc/ralign"])
    assert status == 2 and "system folder" in capsys.readouterr().err


def test_a_folder_ralign_did_not_make_is_left_alone(plan_case, capsys) -> None:
    tmp_path, _ = plan_case
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "plan.json").write_text("my own notes", encoding="utf-8")
    (theirs / "r1").mkdir()
    status = main(["execute", str(tmp_path / "r.ralign"), "--run-dir", str(theirs)])
    assert status == 2 and "ralign did not write" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["plan.json", "r1"]
    assert (theirs / "plan.json").read_text(encoding="utf-8") == "my own notes"


def test_a_busy_run_dir_is_refused_at_once(plan_case, capsys) -> None:
    tmp_path, _ = plan_case
    run = rundir.open_run_dir(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from ralign.runtime.rundir import locked\n"
            "with locked(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        status = main(["execute", str(tmp_path / "r.ralign"), "--run-dir", str(run)])
        assert status == 2
        assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_the_default_run_dir_is_always_under_runs(plan_case, monkeypatch) -> None:
    tmp_path, _ = plan_case
    from ralign.runtime.executor import load_plan

    monkeypatch.chdir(tmp_path)
    _, run_dir, _ = load_plan(tmp_path / "r.ralign", None, ())
    assert run_dir == Path("runs") / "plan-attack"


def test_compile_output_that_cannot_be_written(plan_case, capsys) -> None:
    tmp_path, _ = plan_case
    assert main(["compile", str(tmp_path / "r.ralign"), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    if os.path.exists("/dev/full"):
        assert main(["compile", str(tmp_path / "r.ralign"), "-o", "/dev/full"]) == 2
        assert "cannot write the plan" in capsys.readouterr().err


# ---- a finished run's integrity ----------------------------------------------------------------

SMALL = """recipe "integrity" { seed = 5 }
model policy { path = "ralign:tiny-llama", max_length = 128 }
dataset seeds { path = "ralign:seeds/hhh", limit = 6 }
phase answer {
  sample { from = seeds, per_prompt = 2, max_new_tokens = 6 }
  score { total = words(response) }
}
phase learn {
  train sft { lr = 1e-3, batch_size = 4 }
}
"""


def _execute(target: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        status = main(["execute", str(target), "--run-dir", str(run_dir), "--device", "cpu"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    err = capsys.readouterr().err
    assert status == 0, err
    return err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, Path, Plan]:
    """(plan file, finished run dir, plan) of a tiny three-step run, made once."""
    folder = tmp_path_factory.mktemp("integrity")
    os.environ.setdefault("RALIGN_CACHE", str(folder / "cache"))
    recipe = folder / "small.ralign"
    recipe.write_text(SMALL, encoding="utf-8")
    plan_file = folder / "small.plan.json"
    assert main(["compile", str(recipe), "-o", str(plan_file)]) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert (
        main(["execute", str(plan_file), "--run-dir", str(folder / "run"), "--device", "cpu"]) == 0
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    return plan_file, folder / "run", Plan.load(plan_file)


def _copy(small_run, tmp_path: Path) -> Path:
    _, run, _ = small_run
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / ".lock").unlink(missing_ok=True)
    return tmp_path / "run"


def _folder(run: Path, plan: Plan, kind: str) -> Path:
    return rundir.step_folder(run, next(s for s in plan.steps if s.kind == kind))


def test_a_truncated_output_is_computed_again(small_run, tmp_path, capsys) -> None:
    plan_file, original, plan = small_run
    run = _copy(small_run, tmp_path)
    answers = _folder(run, plan, "sample") / "responses.jsonl"
    answers.write_bytes(answers.read_bytes()[:20])
    log = _execute(plan_file, run, capsys)
    assert "r1/answer/sample: running it again: its folder is its files changed" in log
    assert (
        answers.read_bytes() == (_folder(original, plan, "sample") / "responses.jsonl").read_bytes()
    )


def test_flipped_bits_in_saved_weights_are_computed_again(small_run, tmp_path, capsys) -> None:
    plan_file, original, plan = small_run
    run = _copy(small_run, tmp_path)
    weights = _folder(run, plan, "train sft") / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    log = _execute(plan_file, run, capsys)
    assert "r1/learn/train.sft: running it again" in log
    good = (_folder(original, plan, "train sft") / "model" / "model.safetensors").read_bytes()
    assert weights.read_bytes() == good == (run / "final" / "model.safetensors").read_bytes()


def test_final_follows_the_last_policy(small_run, tmp_path, capsys) -> None:
    """Whatever the last train step now holds (say, recomputed on another machine), `final/` is it."""
    plan_file, _, plan = small_run
    run = _copy(small_run, tmp_path)
    from safetensors.torch import load_file, save_file

    folder = _folder(run, plan, "train sft")
    weights = folder / "model" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    rundir.write_json(folder / rundir.MANIFEST, rundir.manifest(folder))  # sealed as its own
    log = _execute(plan_file, run, capsys)
    assert "nothing to do" in log and "final policy in" in log
    assert (run / "final" / "model.safetensors").read_bytes() == weights.read_bytes()


@pytest.mark.parametrize(
    "point", ["manifest-written", "meta-written", "final-copied", "final-removed"]
)
def test_a_kill_at_any_point_of_sealing_resumes_to_the_same_run(small_run, tmp_path, point) -> None:
    plan_file, original, plan = small_run
    run = tmp_path / "run"
    env = {**os.environ, "RALIGN_FAILPOINT": point}
    command = [
        sys.executable,
        "-m",
        "ralign",
        "execute",
        str(plan_file),
        "--run-dir",
        str(run),
        "--device",
        "cpu",
    ]
    if point == "final-removed":  # only an existing final/ is removed: finish once, then change it
        shutil.copytree(original, run)
        (run / "final" / "ralign_source.json").write_text("stale", encoding="utf-8")
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for step in plan.steps:
        folder = rundir.step_folder(run, step)
        assert rundir.verify(folder, step.hash) is None
        assert (folder / "metrics.json").read_bytes() == (
            rundir.step_folder(original, step) / "metrics.json"
        ).read_bytes()
    assert (run / "final" / "model.safetensors").read_bytes() == (
        original / "final" / "model.safetensors"
    ).read_bytes()


def test_a_full_disk_is_a_clear_error_and_keeps_what_is_done(
    small_run, tmp_path, capsys, monkeypatch
) -> None:
    import errno

    from ralign.runtime import steps

    plan_file, _, plan = small_run

    def full(ctx):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(steps.STEP_FUNCTIONS, "score", full)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    status = main(
        ["execute", str(plan_file), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    err = capsys.readouterr().err
    assert status == 1 and "the disk is full" in err and "Traceback" not in err
    sample = next(s for s in plan.steps if s.kind == "sample")
    assert rundir.verify(rundir.step_folder(tmp_path / "run", sample), sample.hash) is None


def test_a_local_model_folder_is_hashed_by_content(tmp_path, capsys) -> None:
    from ralign.runtime.tiny import build_tiny_model

    model = build_tiny_model("llama", tmp_path / "model")
    recipe = tmp_path / "local.ralign"
    recipe.write_text(SMALL.replace('"ralign:tiny-llama"', '"./model"'), encoding="utf-8")
    first = compile_file(recipe)
    assert first.models["policy"]["path"] == "model" and len(first.models["policy"]["sha256"]) == 64
    _execute(recipe, tmp_path / "run", capsys)
    config = model / "config.json"
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            '"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'
        ),
        encoding="utf-8",
    )
    assert compile_file(recipe).models["policy"]["sha256"] != first.models["policy"]["sha256"]
    log = _execute(recipe, tmp_path / "run", capsys)
    assert "nothing to do" not in log and "r1/answer/sample: done" in log


# ---- model folders ----------------------------------------------------------------------------


def _eval(model: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    argv = [
        "eval",
        "--model",
        str(model),
        "--data",
        "ralign:evals/hhh-mini",
        "--limit",
        "1",
        "--device",
        "cpu",
    ]
    status = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_pickled_weights_are_refused_unread(tmp_path, capsys) -> None:
    import torch
    from safetensors.torch import load_file

    from ralign.runtime.tiny import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "model")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    status, err = _eval(folder, capsys)
    assert status == 1 and "has no .safetensors weights (it has pytorch_model.bin)" in err


def test_a_missing_model_folder_is_one_clear_line(tmp_path, capsys) -> None:
    status, err = _eval(tmp_path / "nowhere", capsys)
    assert status == 1 and err.strip() == f"no model folder at {tmp_path / 'nowhere'}"
