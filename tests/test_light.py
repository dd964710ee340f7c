"""The compile path stays light: compiling, checking and graphing import no ML framework."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "trl")

PROBE = """
import json, sys
from pathlib import Path
from ralign.compile import check_file, compile_file
from ralign.plan import mermaid
from ralign.rewards.interpreter import Programs, explain
for recipe in sorted(Path("recipes").glob("*.ralign")):
    plan = compile_file(recipe)
    mermaid(plan)
checked = check_file(Path("recipes/lib/house_rules.ralign"))
explain(checked, "rules", prompt="Any source?", response="See https://example.org")
from ralign.cli import build_parser
build_parser()
print(json.dumps(sorted(m for m in HEAVY if m in sys.modules)))
"""


def test_compiling_imports_no_ml_framework() -> None:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the compile path imported {loaded}"


def test_the_check_command_imports_no_ml_framework() -> None:
    code = (
        "import sys\n"
        "from ralign.cli import main\n"
        "status = main(['check', 'recipes/quickstart.ralign'])\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules], status)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[] 0"
