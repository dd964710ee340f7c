"""The `ralign` command: help, default output paths, graphs, and exit statuses (0 ok, 1 recipe error, 2 usage)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ralign.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
COMMANDS = ("compile", "check", "graph", "rules", "execute", "eval")
BROKEN = 'recipe "broken" { rounds = 0 }\nmodel policy { path = "ralign:smollm2-135m" }\n'


def ralign(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as a user would."""
    exe = shutil.which("ralign") or str(Path(sys.executable).with_name("ralign"))
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command() -> None:
    run = ralign("--help")
    assert run.returncode == 0
    for command in COMMANDS:
        assert command in run.stdout
    assert "examples:" in run.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"ralign {command}" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("ralign ")


def test_compile_writes_build_plan_by_default(tmp_path: Path) -> None:
    shutil.copytree(RECIPES, tmp_path / "recipes")
    run = ralign("compile", "recipes/quickstart.ralign", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    plan = tmp_path / "build" / "quickstart.plan.json"
    assert plan.is_file()
    assert f"-> {Path('build') / 'quickstart.plan.json'}" in run.stdout
    data = json.loads(plan.read_text(encoding="utf-8"))
    assert data["recipe"] == "quickstart" and data["format"] == "ralign-plan/1"
    assert data["recipe_dir"] == "../recipes"  # data paths resolve relative to the plan file
    assert f"plan hash {data['hash'][:16]}" in run.stdout


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`ralign compile r.ralign | head -1`: the reader leaves early; no traceback, SIGPIPE's status."""
    exe = shutil.which("ralign") or str(Path(sys.executable).with_name("ralign"))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        run = subprocess.run(
            [exe, "compile", str(RECIPES / "quickstart.ralign"), "-o", str(tmp_path / "p.json")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert run.returncode == 141
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert (tmp_path / "p.json").is_file()  # the plan was written before the report was printed


def test_compile_output_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deep" / "er" / "plan.json"
    assert main(["compile", str(RECIPES / "self_rewarding.ralign"), "-o", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["recipe"] == "self-rewarding"
    assert "compiled" in capsys.readouterr().out


def test_graph_prints_mermaid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", str(RECIPES / "recursive_hhh.ralign")]) == 0  # has a rank step
    out = capsys.readouterr().out
    assert out.startswith("flowchart TD\n")
    assert 'subgraph r0["before round 1"]' in out and 'subgraph r1["round 1"]' in out
    assert "model_policy" in out and "dataset_seeds" in out
    assert "-->|policy|" in out and "-->|judge|" in out


def test_check_several_files(capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(p) for p in sorted(RECIPES.glob("*.ralign"))] + [
        str(RECIPES / "lib" / "house_rules.ralign")
    ]
    assert main(["check", *files]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (recipe") == len(files) - 1
    assert "house_rules.ralign: ok (library)" in out


def test_check_stdlib_libraries(capsys: pytest.CaptureFixture[str]) -> None:
    from ralign.imports import stdlib_dir

    files = sorted(str(p) for p in stdlib_dir().glob("*.ralign"))
    assert len(files) >= 3
    assert main(["check", *files]) == 0
    assert capsys.readouterr().out.count("ok (library)") == len(files)


def test_check_reports_bad_files_and_keeps_going(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.ralign"
    bad.write_text(BROKEN, encoding="utf-8")
    assert main(["check", str(bad), str(RECIPES / "quickstart.ralign")]) == 1
    out, err = capsys.readouterr()
    assert "broken.ralign:1:28: error: `rounds` of the recipe block must be >= 1" in err
    assert "   1 | recipe" in err and "^" in err  # the caret excerpt
    assert "quickstart.ralign: ok" in out


# ---- exit statuses, through the real process -------------------------------------------------


def test_recipe_error_exits_1_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "broken.ralign"
    bad.write_text(BROKEN, encoding="utf-8")
    for command in ("compile", "check", "graph"):
        run = ralign(command, str(bad), cwd=tmp_path)
        assert run.returncode == 1, (command, run.stderr)
        assert "Traceback" not in run.stdout + run.stderr
        assert "broken.ralign:1:28: error:" in run.stderr
        assert run.stderr.rstrip().endswith("1 error")
    assert not (tmp_path / "build").exists()  # nothing written for a failed compile


def test_parse_error_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "parse.ralign"
    bad.write_text('recipe "p" {\n', encoding="utf-8")
    run = ralign("compile", str(bad), cwd=tmp_path)
    assert run.returncode == 1
    assert "parse.ralign:1:12: error: this '{' is never closed" in run.stderr
    assert "Traceback" not in run.stderr


def test_non_utf8_file_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.ralign"
    bad.write_bytes('recipe "caf\xe9" { }\n'.encode("latin-1"))
    run = ralign("check", str(bad), cwd=tmp_path)
    assert run.returncode == 1
    assert "latin1.ralign:1:12: error: this file is not UTF-8 text" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("compile", "no/such/recipe.ralign"), "no such file: no/such/recipe.ralign"),
        (("check", "missing.ralign"), "no such file: missing.ralign"),
        (("graph", "."), "no such file: ."),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("compile",), "the following arguments are required: file"),
        (("rules", "recipes/lib/house_rules.ralign"), "the following arguments are required"),
        (("compile", "recipes/quickstart.ralign", "--bogus"), "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    run = ralign(*args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_usage_errors_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "nowhere.ralign"]) == 2
    assert "no such file: nowhere.ralign" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert "see `ralign --help`" in capsys.readouterr().err


def test_root_option_lets_imports_reach_another_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "extra.ralign").write_text("reward bonus { rule one = 1 }\n", encoding="utf-8")
    recipe = tmp_path / "recipes" / "r.ralign"
    recipe.parent.mkdir()
    recipe.write_text(
        'recipe "r" { }\nimport "../shared/extra.ralign"\nmodel policy { path = "ralign:smollm2-135m" }\n',
        encoding="utf-8",
    )
    assert main(["check", str(recipe)]) == 1
    assert "outside the import roots" in capsys.readouterr().err
    assert main(["check", "--root", str(shared), str(recipe)]) == 0
    assert "r.ralign: ok (recipe 'r')" in capsys.readouterr().out
