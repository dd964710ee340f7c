"""What a recipe may name as input (hub ids, built-in data sets, local files and folders) and how each is fingerprinted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ralign.cache import read_json, write_json
from ralign.errors import DataError, did_you_mean
from ralign.imports import confined
from ralign.schema import BUILTIN_DATASETS

CHUNK = 1 << 20  # bytes read at a time when hashing: a file is never read whole
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MEMO_FILE = "hash-memo.json"  # under the cache root
MEMO_LIMIT = 10_000  # entries kept in the memo; the oldest go first
# A file changed less than this long ago is hashed but not memoised: on a file system with coarse
# timestamps, a second edit within the same tick would keep size, mtime and ctime (git's "racy
# clean" problem).
RACY_NS = 2_000_000_000
SKIPPED_FOLDERS = frozenset({".cache"})  # huggingface_hub's download bookkeeping, not model content

# ------------------------------------------------------------------ built-in data sets

DATASETS = BUILTIN_DATASETS  # the names the compiler knows are the files there are


def resolve_dataset(name: str) -> Path:
    """The file behind a built-in dataset name.

    Args:
        name: the name after `ralign:`, e.g. `seeds/hhh`.
    Returns:
        The packaged file.
    Raises:
        DataError: for an unknown name (with a did-you-mean hint) or a missing file (a broken install).
    """
    if name not in DATASETS:
        raise DataError(
            f"unknown built-in dataset '{name}'{did_you_mean(name, DATASETS)}; known: {', '.join(sorted(DATASETS))}"
        )
    # ralign is installed as plain files (setuptools package data), so the resource is a real path.
    path = Path(str(files("ralign").joinpath("data", *DATASETS[name].split("/"))))
    if not path.is_file():
        raise DataError(f"built-in dataset '{name}' is missing its file {path}; reinstall ralign")
    return path


# ------------------------------------------------------------------ hub ids

# Hugging Face's repo-id rules (huggingface_hub.utils.validate_repo_id), ASCII only: letters,
# digits, "-", "_", "."; no "--" or ".."; no "-" or "." at either end; at most 96 characters.
_HUB_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
# A git branch, tag or commit: "main", "v1.0", "refs/pr/3", a 40-hex sha.
_REVISION = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._/-]{0,253}[A-Za-z0-9_])?")
_CONFIG = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_SPLIT = re.compile(r"\w+(?:\.\w+)*", re.ASCII)  # datasets' own split-name rule
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
LOCAL_HINT = "a local file or folder must be written as a plain path inside the recipe's folder"


@dataclass(frozen=True)
class HubDataset:
    """A parsed `hf:` dataset: what `datasets.load_dataset` gets."""

    repo: str
    config: str | None
    split: str
    revision: str | None


def _path_like(body: str) -> str | None:
    """Why `body` reads as a file system path rather than a hub id, or None."""
    if body.startswith(("/", "\\")):
        return "an absolute path"
    if body.startswith("~"):
        return "a path in a home folder"
    if body.startswith("."):
        return "a relative path"
    if _DRIVE.match(body) or "\\" in body:
        return "a Windows path"
    return None


def _characters_problem(text: str) -> str | None:
    if "\0" in text:
        return "contains a NUL character"
    if any(c.isspace() for c in text):
        return "contains whitespace"
    if not text.isprintable():
        return "contains a control character"
    return None


def _repo_problem(repo: str) -> str | None:
    """Why `repo` is not a hub repo id (`org/name` or `name`), or None."""
    parts = repo.split("/")
    if len(parts) > 2:
        return f"'{repo}' has {len(parts) - 1} '/': a hub id is 'org/name' or 'name'"
    for part in parts:
        if not part:
            return f"'{repo}' has an empty part: a hub id is 'org/name' or 'name'"
        if len(part) > 96:
            return f"'{part[:20]}...' is longer than 96 characters"
        if ".." in part or "--" in part:
            return f"'{part}' contains '..' or '--'"
        if not _HUB_PART.fullmatch(part):
            return (
                f"'{part}' may hold only letters, digits, '-', '_' and '.', "
                "and may not begin or end with '-' or '.'"
            )
    if repo.endswith(".git"):
        return f"'{repo}' ends in '.git'"
    return None


def _revision_problem(revision: str) -> str | None:
    if ".." in revision or "//" in revision or not _REVISION.fullmatch(revision):
        return (
            f"revision '{revision}' must be a branch, tag or commit: letters, digits, '-', '_', '.' "
            "and '/' (no '..' or '//', nothing but a letter, digit or '_' at either end)"
        )
    return None


def parse_hub_dataset(spec: str) -> HubDataset:
    """Split an `hf:` dataset spec into its parts, refusing anything but a hub id.

    The syntax is `hf:REPO[@REVISION][:SPLIT]` or `hf:REPO[@REVISION]:CONFIG:SPLIT`: REPO is
    `org/name` or `name` (Hugging Face's repo-id rules), REVISION a branch, tag or commit, CONFIG
    a dataset configuration (letters, digits, `-`, `_`, `.`), SPLIT a split name (`\\w+(\\.\\w+)*`;
    no slices like `train[:10%]`: use the dataset's `limit`). The split defaults to `train`.

    Args:
        spec: the whole string, `hf:` included.
    Returns:
        The parts.
    Raises:
        DataError: saying why `spec` is not a hub dataset (a local path, a bad character, ...).
    """
    problem = hub_dataset_problem(spec)
    if problem is not None:
        raise DataError(problem)
    head, *rest = spec[len("hf:") :].split(":")
    repo, _, revision = head.partition("@")
    config = rest[0] if len(rest) == 2 else None
    split = rest[-1] if rest else "train"
    return HubDataset(repo, config, split, revision or None)


def _shown(text: str) -> str:
    """`text` with unprintable characters escaped, for quoting in a message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _surface_problem(body: str, what: str, local: str) -> str | None:
    """Problems any hub id has before its syntax is looked at: characters, emptiness, path shape."""
    problem = _characters_problem(body)
    if problem is None and not body:
        problem = f"names no {what}"
    kind = _path_like(body) if problem is None else None
    return f"is {kind}, {local}; {LOCAL_HINT}" if kind is not None else problem


def hub_dataset_problem(spec: str) -> str | None:
    """Why an `hf:` dataset spec is not acceptable, or None when it is (see `parse_hub_dataset`).

    Args:
        spec: the whole string, `hf:` included.
    Returns:
        A message that quotes `spec` and says what is wrong, or None.
    """
    if not spec.startswith("hf:"):
        return f"'{_shown(spec)}' is not a hub dataset (those begin with 'hf:')"
    body = spec[len("hf:") :]
    problem = _surface_problem(body, "dataset", "not a Hugging Face hub id")
    if problem is None:
        head, *rest = body.split(":")
        repo, at, revision = head.partition("@")
        syntax = None
        if "[" in body:
            syntax = "split slices like 'train[:10%]' are not supported (use the dataset's limit)"
        elif len(rest) > 2:
            syntax = "more than two ':' parts (write hf:REPO[@REVISION][[:CONFIG]:SPLIT])"
        elif at and not revision:
            syntax = "an empty revision after '@'"
        else:
            syntax = _repo_problem(repo) or (_revision_problem(revision) if at else None)
        if syntax is None and len(rest) == 2 and not _CONFIG.fullmatch(rest[0]):
            syntax = f"config '{rest[0]}' may hold only letters, digits, '-', '_' and '.'"
        if syntax is None and rest and not _SPLIT.fullmatch(rest[-1]):
            syntax = f"split '{rest[-1]}' must be a name like 'train' (no slices: use `limit`)"
        problem = None if syntax is None else f"is not a hub dataset: {syntax}"
    return None if problem is None else f"'{_shown(spec)}' {problem}"


def hub_model_problem(path: str) -> str | None:
    """Why a model path is not a Hugging Face hub id `REPO[@REVISION]`, or None when it is.

    Call it for a model path that is not `ralign:NAME` and not a folder inside the recipe's roots:
    such a path is only acceptable as a hub id.

    Args:
        path: the model's `path` attribute.
    Returns:
        A message that quotes `path` and says what is wrong, or None.
    """
    problem = _surface_problem(path, "model", "not a folder inside the recipe's folder")
    if problem is None:
        repo, at, revision = path.partition("@")
        if at and not revision:
            syntax: str | None = "an empty revision after '@'"
        else:
            syntax = _repo_problem(repo) or (_revision_problem(revision) if at else None)
        if syntax is not None:
            problem = f"is neither a folder inside the recipe's folder nor a hub model id: {syntax}"
    return None if problem is None else f"'{_shown(path)}' {problem}"


# ------------------------------------------------------------------ content hashes


def _regular(path: Path) -> os.stat_result:
    """`stat` of a regular file (symlinks followed); anything else is a DataError.

    A FIFO or device would block or never end when read, so it is refused before it is opened.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file")
    return st


def _memo_key(path: Path, st: os.stat_result) -> str:
    # ctime too: `touch -d` can put an edited file's mtime back, but not its ctime.
    return json.dumps([str(path.absolute()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])


def _load_memo() -> dict[str, str]:
    """The memo (key -> sha256); empty when missing, unreadable or corrupt."""
    data = read_json(MEMO_FILE)
    entries = data.get("files") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {
        k: v
        for k, v in entries.items()
        if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    }


def _save_memo(memo: dict[str, str]) -> None:
    """Write the memo; failing to only costs the next compile its hashing time."""
    write_json(MEMO_FILE, {"version": 1, "files": dict(list(memo.items())[-MEMO_LIMIT:])})


def _stream_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        # Non-blocking open, then a check of what was opened: a file swapped for a FIFO after
        # `_regular` looked at it cannot hang the read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DataError(f"{path}: not a regular file")
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    return digest.hexdigest()


def _hash_with(path: Path, st: os.stat_result, memo: dict[str, str] | None) -> str:
    if memo is None:
        return _stream_sha256(path)
    key = _memo_key(path, st)
    if key in memo:
        return memo[key]
    digest = _stream_sha256(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
        memo[key] = digest
    return digest


def sha256_file(path: Path, *, memo: bool = False) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time.

    Args:
        path: a regular file (symlinks are followed).
        memo: reuse the hash recorded for the same (path, size, mtime, ctime, inode) in the memo
            file under the cache root, and record new ones there.
    Returns:
        The hex digest.
    Raises:
        DataError: the path is missing, unreadable, or not a regular file (a FIFO, a folder...).
    """
    st = _regular(path)
    if not memo:
        return _stream_sha256(path)
    table = _load_memo()
    before = len(table)
    digest = _hash_with(path, st, table)
    if len(table) != before:
        _save_memo(table)
    return digest


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every file a model folder holds, sorted by relative path.

    Folders named `.cache` are skipped. A symlink is followed only when it stays inside the folder
    (and out of a skipped one); a symlinked folder is not walked again (its real place is).

    Raises:
        DataError: a symlink points outside the folder, or an entry is not a regular file.
    """
    root = folder.resolve()
    out: list[tuple[str, Path]] = []
    for here, dirs, names in os.walk(root, onerror=_walk_error):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS)
        for name in [*names, *(d for d in dirs if os.path.islink(os.path.join(here, d)))]:
            path = Path(here, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = _inside(path, root, folder, rel)
                if target.is_dir():
                    continue  # its files are hashed where they really are
            out.append((rel, path))
    return sorted(out)


def _inside(link: Path, root: Path, folder: Path, rel: str) -> Path:
    """Where a symlink in the folder leads, refused unless inside it and out of skipped folders."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise DataError(f"{folder}: cannot follow the symlink '{rel}' ({exc})") from None
    if not confined(target, (root,)) or SKIPPED_FOLDERS & set(target.relative_to(root).parts):
        raise DataError(
            f"{folder}: '{rel}' is a symlink to {target}, outside the model folder; "
            "refusing to follow it"
        )
    return target


def _walk_error(exc: OSError) -> None:
    raise DataError(f"{exc.filename}: cannot list the folder ({exc.strerror})")


def sha256_folder(folder: Path, *, memo: bool = False) -> str:
    """A content hash of a local model folder: every file's relative path, size and sha256.

    Args:
        folder: the model folder.
        memo: reuse per-file hashes recorded in the memo file under the cache root, keyed by
            (absolute path, size, mtime_ns, ctime_ns, inode), and record new ones there.
    Returns:
        The hex sha256 over one line `json(relative path) size sha256` per file, in sorted order,
        so it changes when any byte of any file changes and when a file is added, removed or
        renamed.
    Raises:
        DataError: `folder` is not a folder, a symlink leaves it, or a file is unreadable or not
            a regular file.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    table = _load_memo() if memo else None
    before = len(table or {})
    digest = hashlib.sha256()
    for rel, path in folder_files(folder):
        st = _regular(path)
        line = f"{json.dumps(rel)} {st.st_size} {_hash_with(path, st, table)}\n"
        digest.update(line.encode("utf-8"))
    if table is not None and len(table) != before:
        _save_memo(table)
    return digest.hexdigest()


def model_positions(folder: Path) -> int | None:
    """How many positions a local model folder's config says the model takes, if it says."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
