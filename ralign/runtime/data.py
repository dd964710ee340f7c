"""Datasets in, step artifacts out: prompt files (JSONL, JSON, CSV, Parquet, hf:, ralign:) and JSONL records."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ralign.errors import DataError


def rows_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    """(`file:line`, record) for each non-blank line; a bad line is a DataError naming it."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None


def _rows_json(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):  # {"examples": [...]} or {"data": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for i, row in enumerate(data):
        yield f"{path} record {i}", row


def _rows_csv(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), 2):
            yield f"{path}:{i}", row


def _rows_parquet(path: Path) -> Iterable[tuple[str, Any]]:
    import datasets  # runtime only

    ds = datasets.Dataset.from_parquet(str(path))
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


READERS = {".jsonl": rows_jsonl, ".json": _rows_json, ".csv": _rows_csv, ".parquet": _rows_parquet}


def dataset_file(spec: dict[str, Any], recipe_dir: Path) -> Path | None:
    """The local file behind a dataset spec (None for `hf:` datasets)."""
    path = spec["path"]
    if path.startswith("ralign:"):
        from ralign.runtime.builtin_data import resolve_dataset

        return resolve_dataset(path[len("ralign:") :])
    if path.startswith("hf:"):
        return None
    return (recipe_dir / path).resolve()


def load_records(spec: dict[str, Any], recipe_dir: Path) -> list[dict[str, Any]]:
    """Records of a dataset spec, each with its prompt under "prompt" (from `field`) plus its other fields.

    Raises:
        DataError: naming the file and record when a record lacks the field or is not an object.
    """
    field = spec.get("field", "prompt")
    limit = spec.get("limit")
    file = dataset_file(spec, recipe_dir)
    if file is None:
        rows = _rows_hf(spec["path"])
    else:
        if not file.is_file():
            raise DataError(f"{spec['path']}: the dataset file does not exist (looked at {file})")
        want = spec.get("sha256")
        if want and hashlib.sha256(file.read_bytes()).hexdigest() != want:
            raise DataError(
                f"{file}: the file changed after the plan was compiled; compile the recipe again (or run the recipe itself)"
            )
        reader = READERS.get(file.suffix)
        if reader is None:
            raise DataError(f"{file}: unsupported file type (use .jsonl, .json, .csv or .parquet)")
        rows = reader(file)
    out: list[dict[str, Any]] = []
    builtin = spec["path"].startswith("ralign:")
    for where, row in rows:
        if limit is not None and len(out) >= limit:
            break
        if builtin and isinstance(row, dict) and row.get("split") == "heldout":
            continue  # built-in sets keep their held-out prompts for evaluation only
        if not isinstance(row, dict):
            raise DataError(f"{where}: a record must be an object with a '{field}' field")
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            have = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(f"{where}: the record has no text field '{field}' (its fields: {have})")
        out.append(
            {
                **{k: v for k, v in row.items() if isinstance(v, (str, int, float, bool))},
                "prompt": text.strip(),
            }
        )
    return out


def _rows_hf(path: str) -> Iterable[tuple[str, Any]]:
    import datasets  # runtime only

    name, _, split = path[len("hf:") :].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, ...: say which dataset and why
        raise DataError(
            f"{path}: could not load the Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
