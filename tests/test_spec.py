"""The product spec's examples: its recipes compile unchanged; its error files fail where and how they say.

The spec lives beside the repository (`../shared/spec`); the project keeps copies of its
error files in tests/cases/spec_errors/ (always run) and of its recipes in recipes/.
Each error file's first line is `# expect: LINES TEXT`: some diagnostic names one of
LINES (`|`-separated) as `file:LINE:COL` and its message contains TEXT (any case).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ralign.cli import main
from ralign.compile import compile_file

REPO = Path(__file__).resolve().parents[1]
SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec"
OWN_ERRORS = sorted((Path(__file__).parent / "cases" / "spec_errors").glob("*.ralign"))
OWN_RECIPES = sorted((REPO / "recipes").glob("*.ralign"))
NO_SPEC = "the spec folder ../shared/spec is not here (e.g. testing an installed wheel)"


def spec_files(sub: str) -> list[Path]:
    folder = SPEC / sub
    return sorted(folder.glob("*.ralign")) if folder.is_dir() else []


def params(files: list[Path], fallback: str) -> list:
    if files:
        return [pytest.param(f, id=f.name) for f in files]
    return [pytest.param(None, id=fallback, marks=pytest.mark.skip(reason=NO_SPEC))]


def expectation(path: Path) -> tuple[set[int], str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = re.fullmatch(r"#\s*expect:\s*(\d+(?:\|\d+)*)\s+(.+?)\s*", first)
    assert m, f"{path.name}: the first line must be `# expect: LINES TEXT`, not {first!r}"
    return {int(x) for x in m[1].split("|")}, m[2]


def diagnostics(output: str, name: str) -> list[tuple[int, str]]:
    """(line, message) of each `name:LINE:COL: error: MESSAGE` in CLI output."""
    pattern = re.compile(rf"^{re.escape(name)}:(\d+):\d+: error: (.*)$", re.M)
    return [(int(line), message) for line, message in pattern.findall(output)]


def assert_expected(path: Path, output: str) -> None:
    lines, text = expectation(path)
    found = diagnostics(output, path.name)
    assert found, f"{path.name}: no `{path.name}:LINE:COL: error:` diagnostic in:\n{output}"
    assert any(line in lines and text.lower() in message.lower() for line, message in found), (
        f"{path.name}: expected a diagnostic at line {'|'.join(map(str, sorted(lines)))} containing {text!r}; got:\n{output}"
    )


def check_via_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    status = main(["check", str(path)])
    out, err = capsys.readouterr()
    assert status == 1, f"`ralign check {path.name}` exited {status}, expected 1\n{out}{err}"
    assert "Traceback" not in out + err
    return out + err


# ---- recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", params(spec_files("recipes"), "spec-recipes"))
def test_spec_recipe_compiles(recipe: Path) -> None:
    plan = compile_file(recipe)
    assert plan.steps and plan.hash


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in OWN_RECIPES])
def test_project_recipe_compiles(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = compile_file(recipe)
    assert plan.steps and plan.hash
    assert main(["check", str(recipe)]) == 0
    assert "ok (recipe" in capsys.readouterr().out


def test_project_has_the_spec_recipes() -> None:
    names = {r.name for r in OWN_RECIPES}
    assert {
        "quickstart.ralign",
        "constitutional_sl.ralign",
        "recursive_hhh.ralign",
        "self_rewarding.ralign",
    } <= names


# ---- error files ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", params(spec_files("errors"), "spec-errors"))
def test_spec_error(case: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_expected(case, check_via_cli(case, capsys))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in OWN_ERRORS])
def test_own_copy_of_spec_error(case: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_expected(case, check_via_cli(case, capsys))


def test_copies_match_the_spec() -> None:
    spec = spec_files("errors")
    if not spec:
        pytest.skip(NO_SPEC)
    assert [p.name for p in OWN_ERRORS] == [p.name for p in spec], (
        "copy the spec's error files into tests/cases/spec_errors/"
    )
    for own, original in zip(OWN_ERRORS, spec, strict=True):
        assert own.read_bytes() == original.read_bytes(), (
            f"tests/cases/spec_errors/{own.name} differs from the spec"
        )


def test_error_files_through_the_command() -> None:
    """One real `ralign check` process over every error file: status 1, no traceback, each file's diagnostic."""
    files = OWN_ERRORS + spec_files("errors")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "ralign", "check", *map(str, files)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "Traceback" not in output
    for path in files:
        assert_expected(path, output)
