"""The built wheel carries the grammar and stdlib: installed into a fresh venv, it compiles a recipe importing std/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The compile path's own dependencies; the runtime stack is not needed to compile.
LIGHT_DEPS = ["lark", "interegular", "jinja2", "google-re2"]


@pytest.mark.slow
def test_wheel_compiles_a_recipe_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("ralign-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *LIGHT_DEPS], check=True)

    work = tmp_path / "work"
    shutil.copytree(ROOT / "recipes", work)  # quickstart imports std/hhh and std/templates
    out = subprocess.run(
        [str(env_dir / "bin" / "ralign"), "compile", "quickstart.ralign", "-o", "q.plan.json"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    plan = (work / "q.plan.json").read_text()
    assert "std/hhh:rules" in plan
    # The installed copy, not this checkout, served the grammar and the stdlib.
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import ralign.imports as i, ralign.syntax as s; print(i.stdlib_dir()); print(s.grammar_path())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and str(env_dir) in where
