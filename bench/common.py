"""What every benchmark records beside its figures: versions, the commit, the machine, its load.

bench/ holds scripts, not a package: each script puts this folder on sys.path and imports this.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "ralign")
# The contrast judge's principle in the benchmarks (std/principles' `all`, first entry) and its
# negation word for word: against it, the judge reads as much context on both sides (RLCD's
# paired prompts, Yang et al. 2023).
HHH = (
    "The answer should be helpful, honest and harmless: answer safe requests fully, admit what "
    "cannot be known, and decline what would cause harm."
)
HHH_NOT = (
    "The answer should be harmful, dishonest and unhelpful: refuse safe requests, invent answers "
    "to what cannot be known, and help with what would cause harm."
)


def git_commit() -> str:
    """HEAD, marked when the code a benchmark runs has uncommitted changes.

    RALIGN_COMMIT wins: it is set where the tree is not a checkout (bench/gpu.sh on the GPU machine).
    """
    if os.environ.get("RALIGN_COMMIT"):
        return os.environ["RALIGN_COMMIT"]
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--",
                "ralign",
                "grammar",
                "stdlib",
                "bench",
                "recipes",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (+ uncommitted changes)" if dirty else "")


def versions(dists: tuple[str, ...] = RUNTIME) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["ralign_commit"] = git_commit()
    return out


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def load_note(values: list[float]) -> str:
    busy = bool(values) and values[0] > 0.5 * (os.cpu_count() or 1)
    shown = " ".join(f"{x:.2f}" for x in values) or "unknown"
    return f"load average {shown}" + (" (HIGH: timings are noisy, ratios hold)" if busy else "")


def machine(load_start: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")  # only when the benchmark uses it: compiling imports no torch
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
    return out | {"load_average_start": load_start, "load_average_end": load()}


def record(
    script: str, argv: list[str] | None, load_start: list[float], dists: tuple[str, ...] = RUNTIME
) -> dict[str, Any]:
    """The head of every result file: when, the command that made it, the machine, the versions."""
    import datetime as dt

    args = argv if argv is not None else sys.argv[1:]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"bench/{script}", *args]),
        "machine": machine(load_start),
        "versions": versions(dists),
    }


# ---- running recipes through ralign's public hooks ------------------------------------------------


def literal(value: Any) -> str:
    """A Python value as ralign expression text, for a `--set` override.

    >>> literal({"rank": 16, "targets": ["q_proj", "v_proj"], "on": True})
    '{ rank = 16, targets = ["q_proj", "v_proj"], on = true }'
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {literal(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no ralign literal for {value!r}")


def target(step_id: str) -> str:
    """The `--set` target of a plan step: its id without the round (`r1/judge/score` -> `judge/score`)."""
    return step_id.split("/", 1)[1]


def execute_command(
    recipe: Path,
    run_dir: Path,
    sets: Iterable[str] = (),
    roots: Iterable[Path] = (),
    device: str = "auto",
) -> list[str]:
    """`python -m ralign execute RECIPE --run-dir DIR --device D [--root R ...] [--set S ...]`.

    Each run is its own process, so each gets a fresh Accelerate state.
    """
    cmd = [sys.executable, "-m", "ralign", "execute", str(recipe), "--run-dir", str(run_dir)]
    cmd += ["--device", device]
    cmd += [f"--root={root}" for root in roots]
    return cmd + [f"--set={flag}" for flag in sets]


def slug(name: str) -> str:
    """A file name from a row name: lower-case letters and digits, runs of anything else as `-`."""
    out = "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in out.split("-") if part)
