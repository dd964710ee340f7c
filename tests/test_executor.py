"""The executor end to end on tiny random models: every step kind, determinism, resume after
SIGKILL, two processes, and bad input through the `ralign execute` command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import execute_here, metrics
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.cli import main
from ralign.plan import Plan, Step
from ralign.runtime.data import read_jsonl
from ralign.runtime.executor import step_folder
from ralign.schema import STEPS

RECIPES = Path(__file__).parent / "recipes"
TINY_LLAMA = '"ralign:tiny-llama"'
# Each architecture runs the two-round recipe that uses every step kind.
EVERY_STEP = "every_step.ralign"
ARCHS = ("llama", "gpt2", "qwen2")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A model cache of this module's own, which the subprocesses inherit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


# --- running -------------------------------------------------------------------------------------


def compile_plan(recipe: Path, out: Path) -> Plan:
    assert main(["compile", str(recipe), "-o", str(out)]) == 0
    return Plan.load(out)


def execute_command(target: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ralign",
        "execute",
        str(target),
        "--run-dir",
        str(run_dir),
        "--device",
        "cpu",
    ]


def execute_cli(
    target: Path, run_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        execute_command(target, run_dir), capture_output=True, text=True, env=env, timeout=600
    )


def _default_sigint() -> None:
    # A shell that starts pytest in the background hands it SIGINT ignored, and children inherit
    # that; Ctrl-C must reach `ralign` as it does from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(
    target: Path, run_dir: Path, ready: Callable[[], bool], sig: int, log: Path
) -> int:
    """Start `ralign execute`, send `sig` as soon as `ready()` holds, and return the exit status."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            execute_command(target, run_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,
        )
        deadline = time.monotonic() + 300
        try:
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(
                        f"the run ended (exit {proc.returncode}) before it could be interrupted:\n{log.read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the run never reached the point to interrupt:\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.02)
            proc.send_signal(sig)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def recipe_copy(name: str, arch: str, folder: Path) -> Path:
    """A copy of a test recipe (and its data) in `folder`, its policy switched to `arch`."""
    text = (RECIPES / name).read_text(encoding="utf-8")
    assert text.count(TINY_LLAMA) == 1
    out = folder / name
    out.write_text(text.replace(TINY_LLAMA, f'"ralign:tiny-{arch}"'), encoding="utf-8")
    shutil.copytree(RECIPES / "data", folder / "data")
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Callable[[str], tuple[Plan, Path, Path]]:
    """Per architecture, (plan, plan file, run folder) of a finished run, made once."""
    done: dict[str, tuple[Plan, Path, Path]] = {}

    def get(arch: str) -> tuple[Plan, Path, Path]:
        if arch not in done:
            folder = tmp_path_factory.mktemp(arch)
            plan_file = folder / "plan.json"
            plan = compile_plan(recipe_copy(EVERY_STEP, arch, folder), plan_file)
            started = time.perf_counter()
            execute_here(plan_file, folder / "run")
            print(f"{EVERY_STEP} on tiny-{arch}: {time.perf_counter() - started:.1f}s")
            done[arch] = (plan, plan_file, folder / "run")
        return done[arch]

    return get


# --- reading a run -------------------------------------------------------------------------------


def artifacts(run_dir: Path) -> dict[str, bytes]:
    """Every data file a run leaves (JSONL, metrics, weights), by relative path: not the log, the
    plan copy, meta.json or an evaluation's result.json, which hold times."""
    kept = (".jsonl", ".safetensors", "metrics.json")
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name.endswith(kept) and ".tmp" not in p.parts
    }


def meta(run_dir: Path, step: Step) -> dict:
    return json.loads((step_folder(run_dir, step) / "meta.json").read_text(encoding="utf-8"))


def step_hashes(plan: Plan, run_dir: Path) -> dict[str, str]:
    return {s.id: meta(run_dir, s)["hash"] for s in plan.steps}


def mtimes(run_dir: Path) -> dict[str, int]:
    """Modification times of the step folders, `final/` and everything in them."""
    tops = [p for p in run_dir.iterdir() if re.fullmatch(r"r\d+|final", p.name)]
    paths = [p for top in tops for p in [top, *top.rglob("*")]]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in paths}


def tmp_folder(run_dir: Path, plan: Plan, step_id: str) -> Path:
    return run_dir / ".tmp" / plan.step(step_id).hash[:16]


def is_done(run_dir: Path, plan: Plan, step_id: str) -> bool:
    return (step_folder(run_dir, plan.step(step_id)) / "meta.json").is_file()


# --- end to end ----------------------------------------------------------------------------------


# Qwen2 runs end to end at length only: its scoring and training are checked in every run by
# test_batches, test_train and test_dpo_trl, and the executor's path is the same for every model.
@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.long) if a == "qwen2" else a for a in ARCHS]
)
def test_a_two_round_recipe_runs_end_to_end(arch, finished):
    plan, _, run_dir = finished(arch)
    # the recipe really uses every step kind, over two rounds
    assert {s.kind for s in plan.steps} == set(STEPS)
    assert plan.rounds == 2 and {s.round for s in plan.steps} >= {1, 2}
    for s in plan.steps:
        m = meta(run_dir, s)
        assert (m["id"], m["kind"], m["hash"]) == (s.id, s.kind, s.hash)
    assert set(metrics(run_dir)) == {s.id for s in plan.steps}
    assert not any((run_dir / ".tmp").iterdir())
    # Sampled and revised answers record whether each ended on its own; the count of those cut
    # off by the length limit is the sample step's `cut_off`.
    for s in plan.steps:
        if s.kind in ("sample", "revise"):
            rows = read_jsonl(step_folder(run_dir, s) / "responses.jsonl")
            assert all(
                len(r["finished"]) == len(r["responses"])
                and all(isinstance(f, bool) for f in r["finished"])
                for r in rows
            )
            if s.kind == "sample":
                cut = sum(not f for r in rows for f in r["finished"])
                assert metrics(run_dir)[s.id]["cut_off"] == cut

    final = run_dir / "final"
    last_trained = [s for s in plan.steps if s.kind.startswith("train")][-1]
    assert (final / "model.safetensors").read_bytes() == (
        step_folder(run_dir, last_trained) / "model" / "model.safetensors"
    ).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == arch
    batch = tok(["Tell me about the sea."], return_tensors="pt")
    out = model.generate(
        **batch, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape == (1, batch["input_ids"].shape[1] + 5)


def test_the_implicit_judge_scores_nothing_until_the_policy_has_learnt(tmp_path):
    """`rank { mode = "implicit" }`: in round 1 the judge is the declared model, its own reference,
    so every answer scores 0.5 with no model read; in round 2 the judge is round 1's policy, read
    against the declared model, answer by answer, and its scores differ."""
    shutil.copy(RECIPES / "implicit.ralign", tmp_path / "implicit.ralign")
    plan = compile_plan(tmp_path / "implicit.ralign", tmp_path / "plan.json")
    run_dir = tmp_path / "run"
    execute_here(tmp_path / "plan.json", run_dir)
    first, second = plan.step("r1/judge/rank.learnt"), plan.step("r2/judge/rank.learnt")
    assert first.inputs["judge"] == first.inputs["reference"] == "model:policy"
    assert (second.inputs["judge"], second.inputs["reference"]) == (
        "r1/learn/train.dpo",
        "model:policy",
    )
    scores = {
        r: read_jsonl(step_folder(run_dir, s) / "score.learnt.jsonl")
        for r, s in ((1, first), (2, second))
    }
    assert all(v == 0.5 for row in scores[1] for v in row["scores"])
    assert metrics(run_dir)[first.id]["forward_passes"] == 0
    answers = read_jsonl(step_folder(run_dir, plan.step("r2/answer/sample")) / "responses.jsonl")
    read = metrics(run_dir)[second.id]["forward_passes"]
    assert read == 2 * sum(len(r["responses"]) for r in answers) > 0
    assert all(sorted(row["scores"])[::2] == [0.0, 1.0] for row in scores[2])
    # a score expression reads the round's number
    for r in (1, 2):
        step = plan.step(f"r{r}/judge/score")
        rows = read_jsonl(step_folder(run_dir, step) / "score.round_seen.jsonl")
        assert rows and all(v == r for row in rows for v in row["scores"])


def test_behavior_reports_the_mean_reward_of_its_answers(finished):
    """`reward = hhh.rules` on a behavior evaluation: the mean of the rules over the very answers
    the evaluator wrote (with 8 prompts and 2 examples per kind, result.json lists them all)."""
    from ralign.rewards.interpreter import Programs

    plan, _, run_dir = finished("llama")
    step = plan.step(f"r{plan.rounds}/evaluate/behavior")
    folder = step_folder(run_dir, step)
    result = json.loads((folder / "result.json").read_text())
    answers = [r for rows in result["examples"].values() for r in rows]
    assert len(answers) == result["n"] == 8
    values = (
        Programs(plan.programs)
        .score(
            step.exprs["reward"],
            [{"prompt": r["prompt"], "response": r["answer"]} for r in answers],
        )
        .values
    )
    got = json.loads((folder / "metrics.json").read_text())["mean_reward"]
    assert got == pytest.approx(sum(values) / len(values), abs=1e-9)
    assert "reward" not in step.params and "records" not in result


@pytest.mark.parametrize("ab", [True, False])
def test_an_hhh_evaluation_asks_the_ab_question_unless_told_not_to(ab, tmp_path):
    recipe = tmp_path / "eval.ralign"
    recipe.write_text(
        'recipe "eval-only" { rounds = 1, seed = 7 }\n'
        'model policy { path = "ralign:tiny-llama" }\n'
        'evaluate hhh { data = "ralign:evals/hhh-mini", limit = 4, every = "end", '
        f"ab = {str(ab).lower()} }}\n",
        encoding="utf-8",
    )
    plan_file = tmp_path / "plan.json"
    plan = compile_plan(recipe, plan_file)
    execute_here(plan_file, tmp_path / "run")
    for step in plan.steps:
        result = json.loads((step_folder(tmp_path / "run", step) / "result.json").read_text())
        assert result["n"] == 4 and "acc_norm" in result
        assert ("ab_acc" in result) is ab


def test_a_behavior_evaluation_scored_by_older_detectors_is_rescored_not_rerun(
    finished, tmp_path, capsys
):
    """After an upgrade that changes the refusal or admits detectors, resuming a run re-scores
    each finished behaviour evaluation from its stored answers; nothing is generated again."""
    from ralign.runtime import rundir
    from ralign.runtime.behavior import DETECTORS, is_refusal, rates

    plan, plan_file, first = finished("llama")
    run_dir = tmp_path / "run"
    shutil.copytree(first, run_dir)
    evals = [s for s in plan.steps if s.kind == "evaluate" and s.params["task"] == "behavior"]
    assert evals
    for s in evals:  # what an older ralign left: other verdicts and rates, other detectors
        folder = step_folder(run_dir, s)
        meta = json.loads((folder / rundir.META).read_text())
        assert meta["detectors"] == DETECTORS
        rows = read_jsonl(folder / "answers.jsonl")
        (folder / "answers.jsonl").write_text(
            "".join(json.dumps({**r, "refused": not r["refused"]}) + "\n" for r in rows)
        )
        (folder / "metrics.json").write_text(json.dumps({"rates.over_refusal_rate": 0.5}))
        rundir.write_json(folder / rundir.MANIFEST, rundir.manifest(folder))
        rundir.write_json(folder / rundir.META, {**meta, "detectors": "older"})
    untouched = {
        s.id: (step_folder(run_dir, s) / rundir.META).read_bytes()
        for s in plan.steps
        if s not in evals
    }
    capsys.readouterr()
    execute_here(plan_file, run_dir)
    log = capsys.readouterr().err
    assert "running it again" not in log and "nothing to do" in log
    for s in evals:
        folder = step_folder(run_dir, s)
        assert f"{s.id}: re-scored its stored answers" in log
        assert rundir.verify(folder, s.hash) is None
        assert json.loads((folder / rundir.META).read_text())["detectors"] == DETECTORS
        rows = read_jsonl(folder / "answers.jsonl")
        assert [r["refused"] for r in rows] == [is_refusal(r["answer"]) for r in rows]
        got = json.loads((folder / "metrics.json").read_text())
        want = rates(rows)
        assert {k: got[f"rates.{k}"] for k in want if want[k]["n"]} == {
            k: v["value"] for k, v in want.items() if v["n"]
        }
        assert "mean_reward" in got
    assert untouched == {
        s.id: (step_folder(run_dir, s) / rundir.META).read_bytes()
        for s in plan.steps
        if s not in evals
    }


def test_the_same_plan_and_seed_give_identical_runs(finished, tmp_path):
    """A second run in another process, with another hash seed for Python's sets and dicts."""
    plan, plan_file, first = finished("llama")
    env = {**os.environ, "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"}
    started = time.perf_counter()
    done = execute_cli(plan_file, tmp_path / "run", env=env)
    print(f"second every-step run: {time.perf_counter() - started:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        step_hashes(plan, tmp_path / "run")
        == step_hashes(plan, first)
        == {s.id: s.hash for s in plan.steps}
    )
    ours, theirs = artifacts(first), artifacts(tmp_path / "run")
    assert sorted(ours) == sorted(theirs)
    assert any(name.endswith("model.safetensors") for name in ours)
    assert [name for name in ours if ours[name] != theirs[name]] == []
    results = sorted(first.rglob("result.json"))
    assert results
    for one in results:  # the same evaluation results, apart from how long they took
        two = tmp_path / "run" / one.relative_to(first)
        untimed = [{**json.loads(f.read_text(encoding="utf-8")), "seconds": 0} for f in (one, two)]
        assert untimed[0] == untimed[1]


# --- resuming ------------------------------------------------------------------------------------


def test_a_run_killed_three_times_resumes_to_the_same_weights(finished, tmp_path, capsys):
    plan, plan_file, reference = finished("gpt2")
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    rank, dpo = "r1/judge/rank.listed", "r1/learn/train.dpo"

    # 1. in the middle of a step: its temporary folder exists, the step before it is done
    status = interrupt_when(
        plan_file, run_dir, tmp_folder(run_dir, plan, rank).is_dir, signal.SIGKILL, log
    )
    assert status == -signal.SIGKILL
    assert is_done(run_dir, plan, "r1/answer/sample") and not is_done(run_dir, plan, rank)
    assert tmp_folder(run_dir, plan, rank).is_dir()

    # 2. inside the first training step
    status = interrupt_when(
        plan_file, run_dir, tmp_folder(run_dir, plan, dpo).is_dir, signal.SIGKILL, log
    )
    assert status == -signal.SIGKILL
    assert is_done(run_dir, plan, "r1/learn/pairs") and not is_done(run_dir, plan, dpo)

    # 3. just as a step of round 2 is put in place
    sample2 = step_folder(run_dir, plan.step("r2/answer/sample")) / "meta.json"
    assert (
        interrupt_when(plan_file, run_dir, sample2.is_file, signal.SIGKILL, log) == -signal.SIGKILL
    )
    assert not (run_dir / "final").exists()

    resumed = execute_cli(plan_file, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "r2/answer/sample: done" not in resumed.stderr  # finished steps are not redone
    assert "r2/learn/train.dpo: done" in resumed.stderr
    ours, theirs = artifacts(reference), artifacts(run_dir)
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (
        reference / "final" / "model.safetensors"
    ).read_bytes()
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []

    # Running a finished run again does nothing, and touches no step folder.
    before = mtimes(run_dir)
    capsys.readouterr()
    execute_here(plan_file, run_dir)
    assert "nothing to do" in capsys.readouterr().err
    assert mtimes(run_dir) == before
    assert not any((run_dir / ".tmp").iterdir())


# --- two processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """`accelerate launch` with two CPU processes gives the single-process losses and metrics.

    accelerate's `--cpu` flag starts ONE process whatever `--num_processes` says, so the launch
    asks for its torchrun-based launcher (`--multi_gpu`) and `ralign --device cpu` picks gloo.
    The plan keeps every global batch the same under sharding: greedy answers one prompt at a
    time, ranking one item at a time, 8 examples and pairs in batches of 4. Answers sampled at
    temperature > 0 depend on how prompts are split, so the two-process run resumes from the
    single-process run's sampled answers (a step done is a step done, whoever did it)."""
    plan = compile_plan(RECIPES / "sharded.ralign", tmp_path / "plan.json")
    one, two = tmp_path / "one", tmp_path / "two"
    started = time.perf_counter()
    execute_here(tmp_path / "plan.json", one)
    print(f"one process: {time.perf_counter() - started:.1f}s")
    sampled = step_folder(one, plan.step("r1/prefs/sample"))
    shutil.copytree(sampled, two / sampled.relative_to(one))

    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1"
    launch += f" --mixed_precision no --dynamo_backend no --main_process_port {free_port()}"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *launch.split(), *execute_command(tmp_path / "plan.json", two)[1:]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"two processes: {time.perf_counter() - started:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r" on cpu\S* x2\n", (two / "run.log").read_text(encoding="utf-8"))
    assert "r1/prefs/sample: done" not in done.stderr  # the copied answers were used

    a, b = metrics(one), metrics(two)
    assert b["r1/prefs/pairs"]["pairs"] % 4 == 0  # whole global batches only
    for step in ("r1/warmup/train.sft", "r1/prefs/train.dpo"):
        for key in ("loss", "mean_loss"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-4), f"{step} {key}"
    # Every other metric too: each covers all the items, whichever process handled them.
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    for step, values in a.items():
        for key, value in values.items():
            assert b[step][key] == pytest.approx(value, abs=1e-4), f"{step} {key}"
    greedy = step_folder(one, plan.step("r1/warmup/sample")).relative_to(one) / "responses.jsonl"
    assert (two / greedy).read_bytes() == (one / greedy).read_bytes()
    pairs = [step_folder(d, plan.step("r1/prefs/pairs")) / "pairs.jsonl" for d in (one, two)]
    chosen = [
        [(p["chosen"], p["rejected"]) for p in map(json.loads, f.read_text().splitlines())]
        for f in pairs
    ]
    assert chosen[0] == chosen[1]
    w1, w2 = (load_file(d / "final" / "model.safetensors") for d in (one, two))
    assert sorted(w1) == sorted(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=0)


# --- bad input and interruptions through the command ---------------------------------------------

RECIPE = """recipe "small" {{
  seed = 1
}}

model policy {{
  path = "ralign:tiny-llama"
  dtype = "float32"
  max_length = 64
}}

dataset questions {{
  path = "{data}"
  limit = 4
}}

phase learn {{
  sample {{ from = questions, per_prompt = 1, temperature = 0, max_new_tokens = 6 }}
  train sft {{ on = "all", lr = {lr}, batch_size = 1 }}
}}
"""
QUESTIONS = "".join(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(4))


def small_recipe(folder: Path, data: str, lr: str = "1e-3") -> Path:
    (folder / "questions.jsonl").write_text(data, encoding="utf-8")
    recipe = folder / "small.ralign"
    recipe.write_text(RECIPE.format(data="questions.jsonl", lr=lr), encoding="utf-8")
    return recipe


def line_of(recipe: Path, text: str) -> int:
    """The recipe line that holds `text` (where a step's error must point)."""
    lines = recipe.read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


@pytest.mark.parametrize(
    "data, lr, step, expected",
    [
        pytest.param(
            "".join(QUESTIONS.splitlines(keepends=True)[:2]) + '{"question": "No prompt here"}\n',
            "1e-3",
            "r1/learn/sample",
            "{data}:3: the record has no text field 'prompt' (its fields: question)",
            id="a record lacks the field",
        ),
        pytest.param(
            "", "1e-3", "r1/learn/sample", "{data}: the dataset has no records", id="empty dataset"
        ),
        pytest.param(
            QUESTIONS,
            "1e30",
            "r1/learn/train.sft",
            "training loss became NaN at step",
            id="NaN loss",
        ),
    ],
)
def test_bad_input_stops_with_a_message_that_points_at_it(data, lr, step, expected, tmp_path):
    recipe = small_recipe(tmp_path, data, lr)
    done = execute_cli(recipe, tmp_path / "run")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = line_of(
        recipe, {"r1/learn/sample": "sample {", "r1/learn/train.sft": "train sft {"}[step]
    )
    assert f"step {step} (small.ralign:{line}): " in done.stderr
    assert expected.format(data=(tmp_path / "questions.jsonl").resolve()) in done.stderr


def test_ctrl_c_stops_a_run_that_can_then_be_resumed(tmp_path):
    recipe = small_recipe(tmp_path, QUESTIONS)
    plan = compile_plan(recipe, tmp_path / "plan.json")
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    sampling = tmp_folder(run_dir, plan, "r1/learn/sample")
    assert (
        interrupt_when(tmp_path / "plan.json", run_dir, sampling.is_dir, signal.SIGINT, log) == 130
    )
    said = log.read_text(encoding="utf-8")
    assert "Traceback" not in said
    assert "run the same command again to resume" in said
    assert not is_done(run_dir, plan, "r1/learn/sample")

    again = execute_cli(tmp_path / "plan.json", run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "r1/learn/train.sft: done" in again.stderr
    assert (run_dir / "final" / "model.safetensors").is_file()
