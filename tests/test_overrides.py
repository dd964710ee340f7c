"""`--set TARGET.ATTR=VALUE` and `--smoke`: checked like recipe text, recorded in the plan, runnable."""

from __future__ import annotations

from pathlib import Path

import pytest

from ralign.cli import main
from ralign.compile import compile_file
from ralign.errors import RecipeError
from ralign.plan import Plan

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.ralign"
RECIPES = sorted((REPO / "recipes").glob("*.ralign"))
TINY = 'policy.path="ralign:tiny-llama"'


def test_an_override_replaces_an_attribute_and_is_recorded() -> None:
    base = compile_file(QUICKSTART)
    plan = compile_file(QUICKSTART, sets=("distill/train.dpo.beta=0.25", TINY))
    dpo = next(s for s in plan.steps if s.kind == "train dpo")
    assert dpo.params["beta"] == 0.25
    assert plan.models["policy"]["path"] == "ralign:tiny-llama"
    assert plan.overrides == ("distill/train.dpo.beta=0.25", TINY)
    assert plan.hash != base.hash and not base.overrides
    assert "overrides" not in base.to_json()  # plans without overrides are as before
    assert Plan.from_json(plan.to_json()).overrides == plan.overrides  # and it survives a reload


def test_an_override_adds_an_attribute_the_recipe_left_out() -> None:
    plan = compile_file(QUICKSTART, sets=("seeds.limit=5",))
    assert plan.datasets["seeds"]["limit"] == 5
    assert "limit" not in compile_file(QUICKSTART).datasets["seeds"]


@pytest.mark.parametrize(
    ("flag", "file", "message"),
    [
        ("distill/train.dpo.beta=-1", "--set distill/train.dpo.beta", "must be > 0, got -1"),
        ("distill/train.dpo.bta=1", "--set distill/train.dpo.bta", "did you mean 'beta'"),
        ("sample/sample.per_prompt=", "--set sample/sample.per_prompt", "expected an expression"),
        ("polcy.path=1", "--set polcy.path", "no 'polcy'; did you mean 'policy'"),
        ("no-attribute", "--set no-attribute", "write TARGET.ATTR=VALUE"),
    ],
)
def test_override_errors_point_at_the_flag(flag: str, file: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        compile_file(QUICKSTART, sets=(flag,))
    (d,) = err.value.diagnostics
    assert d.span.file == file and message in d.message, str(err.value)


def test_a_plan_file_takes_no_overrides(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "q.plan.json"
    assert main(["compile", str(QUICKSTART), "-o", str(plan)]) == 0
    assert main(["execute", str(plan), "--set", TINY, "--run-dir", str(tmp_path / "r")]) == 2
    assert "compile it again" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_smoke_shrinks_every_recipe(recipe: Path) -> None:
    plan = compile_file(recipe, smoke=True)
    assert plan.overrides and all(f.split("=")[0].count(".") >= 1 for f in plan.overrides)
    for spec in plan.datasets.values():
        assert spec.get("limit", 0) <= 4
    for s in plan.steps:
        p = s.params
        assert p.get("per_prompt", 0) <= 2 and p.get("max_new_tokens", 0) <= 16
        assert p.get("epochs", 1) == 1 and p.get("count", 0) <= 4
        if s.kind == "evaluate":
            assert p.get("limit", 0) <= 4


def test_smoke_keeps_what_is_already_small() -> None:
    plan = compile_file(QUICKSTART, smoke=True, sets=("sample/sample.per_prompt=1",))
    sample = next(s for s in plan.steps if s.kind == "sample")
    assert sample.params["per_prompt"] == 1  # --set comes after --smoke


@pytest.mark.slow
def test_a_smoke_run_of_the_quickstart_goes_through(tmp_path: Path, monkeypatch, capsys) -> None:
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    argv = [
        "execute",
        str(QUICKSTART),
        "--smoke",
        "--set",
        TINY,
        "--run-dir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    ]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "overrides" in (tmp_path / "run" / "plan.json").read_text(encoding="utf-8")
