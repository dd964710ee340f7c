"""A run directory: its layout, its lock, and step folders that are written atomically and verified.

What ralign owns in a run dir: `.ralign-run` (the marker that says ralign made the folder),
`.lock`, `.tmp/`, `plan.json`, `run.log`, `metrics.jsonl`, `r<round>/<step>/` and `final/`. It
never deletes anything else, and it refuses to use an existing folder that it did not make.

A finished step folder holds its outputs, `metrics.json`, `manifest.json` (every file's size and
sha256) and, written last, `meta.json` (the step's hash). A step counts as done only when its
meta names the plan's hash for it and every file still matches the manifest: a truncated answer
file or a flipped bit in saved weights makes the step run again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ralign import inputs
from ralign.errors import DataError, RalignError, UsageError
from ralign.plan import Step

RUN_FORMAT = "ralign-run/1"
MARKER = ".ralign-run"
MANIFEST = "manifest.json"
# What ralign writes at the top of a run dir (besides the r<round>/ folders).
OWNED = {
    ".ralign-run",
    ".lock",
    ".tmp",
    "plan.json",
    "run.log",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "final",
    "report.html",
    "compare.html",
}
META = "meta.json"
# Folders a run dir may never be inside: the system's own (a typo in --run-dir must not write there).
SYSTEM = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/etc", "/bin", "/sbin", "/usr", "/boot"))


def step_folder(root: Path, step: Step) -> Path:
    """Where a step's outputs live: `r<round>/<phase>.<kind>[.<name>]`."""
    return root / f"r{step.round}" / step.id.split("/", 1)[1].replace("/", ".")


def open_run_dir(root: Path) -> Path:
    """Create or adopt a run dir; refuse a file, a system folder, or a folder ralign did not make.

    Raises:
        UsageError: the path cannot be a run dir (the message says why).
    """
    if "\0" in str(root):
        raise UsageError("the run dir's name contains a NUL character")
    real = root.resolve()
    if any(real == s or s in real.parents for s in SYSTEM):
        raise UsageError(f"--run-dir {root}: refusing to write under the system folder {real}")
    if root.exists() and not root.is_dir():
        raise UsageError(f"--run-dir {root} is a file, not a folder")
    marker = root / MARKER
    if root.is_dir() and not marker.is_file():
        if not _made_by_ralign(root):
            raise UsageError(
                f"--run-dir {root} already holds files that ralign did not write; "
                "choose a new or empty folder (ralign never deletes files it did not write)"
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text(RUN_FORMAT + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--run-dir {root}: cannot create it ({exc.strerror})") from None
    return root


def _made_by_ralign(root: Path) -> bool:
    """Whether an unmarked folder holds only what ralign writes (a run dir from before the marker
    existed, or one seeded with step folders copied from another run): then ralign adopts it."""
    for entry in root.iterdir():
        if not (entry.name in OWNED or re.fullmatch(r"r\d+", entry.name) and entry.is_dir()):
            return False
    if not (root / "plan.json").exists():
        return True
    try:
        plan = json.loads((root / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(plan, dict) and str(plan.get("format", "")).startswith("ralign-plan/")


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the run dir's lock; another process holding it gets a UsageError naming its pid."""
    path = root / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise UsageError(f"run dir {root} is in use by pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def manifest(folder: Path) -> dict[str, Any]:
    """Every file under `folder` (but the manifest and meta) with its size and sha256."""
    files = {}
    for rel, path in inputs.folder_files(folder):
        if rel in (MANIFEST, META):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": inputs.sha256_file(path)}
    return {"format": RUN_FORMAT, "files": files}


def verify(folder: Path, step_hash: str) -> str | None:
    """None when `folder` holds a finished step of this hash, intact; else why not."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "not finished"
    if not isinstance(meta, dict) or meta.get("hash") != step_hash:
        return "computed for another version of the step"
    try:
        found = manifest(folder)["files"]
    except (DataError, OSError) as exc:
        return f"unreadable ({exc})"
    if found == listed:
        return None
    changed = sorted(set(found) ^ set(listed)) or sorted(k for k in found if found[k] != listed[k])
    return f"its files changed since it finished ({', '.join(changed[:3])})"


def commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Seal a step's temporary folder (manifest, then meta) and move it into place atomically."""
    write_json(tmp / MANIFEST, manifest(tmp))
    failpoint("manifest-written")
    write_json(tmp / META, meta)
    failpoint("meta-written")
    if final.exists():
        shutil.rmtree(final)  # a stale version of this step, inside the run dir ralign made
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def failpoint(name: str) -> None:
    """Die here, as a SIGKILL would, when RALIGN_FAILPOINT names this point: how the tests prove
    that a run killed at any moment resumes to the same result."""
    if os.environ.get("RALIGN_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_json(path: Path, value: Any) -> None:
    """Write JSON, turning a full disk into a clear error (nothing already finished is touched)."""
    try:
        path.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")
    except OSError as exc:
        raise disk_error(exc, path) from None


def disk_error(exc: OSError, path: Path) -> RalignError:
    """The user's error for a failed write: a full disk says so."""
    if exc.errno == errno.ENOSPC:
        return RalignError(
            f"the disk is full (writing {path}); finished steps are kept: free space and run the same command again"
        )
    return RalignError(f"cannot write {path}: {exc.strerror or exc}")
