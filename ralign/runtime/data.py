"""Datasets in, step artifacts out: prompt files (JSONL, JSON, CSV, Parquet, hf:, ralign:) and JSONL records."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ralign.errors import DataError
from ralign.inputs import parse_hub_dataset, resolve_dataset, sha256_file

# Data files are untrusted: these limits keep a hostile file from exhausting memory or feeding
# gigabyte prompts to the model.
MAX_TEXT_CHARS = 1_000_000  # one record's prompt, or any other text field it carries along
MAX_LINE_BYTES = 32 << 20  # one JSONL line or CSV line, newline included
MAX_JSON_BYTES = 256 << 20  # a .json file is parsed whole; bigger sets belong in .jsonl
Rows = Iterable[tuple[str, Any]]  # (where, record): where is "file:line", "file record N", ...


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded strictly as UTF-8; a BOM at the start is skipped.

    Raises:
        DataError: the file is unreadable, a line is not UTF-8 (naming the line, the byte and its
            offset in the file) or longer than MAX_LINE_BYTES.
    """
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    with f:
        number, offset = 0, 0
        while True:
            try:
                raw = f.readline(
                    MAX_LINE_BYTES + 1
                )  # bounded: a file with no newline is not read whole
            except OSError as exc:
                raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{path}:{number}: the line is longer than {MAX_LINE_BYTES >> 20} MiB"
                )
            start = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                text = raw[start:].decode("utf-8")
            except UnicodeDecodeError as exc:
                at = start + exc.start
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte {raw[at]:#04x} at offset {offset + at} "
                    "of the file)"
                ) from None
            yield number, text
            offset += len(raw)


def _json_value(text: str, where: str) -> Any:
    """`json.loads`, every failure a DataError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise DataError(f"{where}: not valid JSON ({str(exc).split(';')[0]})") from None
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply to read") from None


def rows_jsonl(path: Path) -> Rows:
    """(`file:line`, value) for each non-blank line; a bad line is a DataError naming it."""
    for number, text in _lines(path):
        if text.strip():
            yield f"{path}:{number}", _json_value(text, f"{path}:{number}")


def read_json_file(path: Path) -> Any:
    """A whole .json file (at most MAX_JSON_BYTES), every failure a DataError naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise DataError(
                f"{path}: a .json file is read whole and this one is over {MAX_JSON_BYTES >> 20} MiB;"
                " write the records as .jsonl (one per line) instead"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start} of the file)"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise DataError(f"{path}: not valid JSON ({str(exc).split(';')[0]})") from None
    except RecursionError:
        raise DataError(f"{path}: the JSON is nested too deeply to read") from None


def _rows_json(path: Path, field: str) -> Rows:
    data = read_json_file(path)
    if isinstance(data, dict):  # {"examples": [...]} or {"data": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or an object holding one)")
    for i, row in enumerate(data):
        yield f"{path} record {i}", row


def _rows_jsonl(path: Path, field: str) -> Rows:
    return rows_jsonl(path)


def _open_quote_line(lines: list[tuple[int, str]]) -> int:
    """The line on which the quote still open at the end of a CSV row was opened."""
    quoted, at_field_start, opened = False, True, lines[0][0]
    for number, text in lines:
        i = 0
        while i < len(text):
            ch = text[i]
            if quoted:
                if ch == '"' and text[i + 1 : i + 2] == '"':
                    i += 1  # "" inside quotes is a literal quote
                elif ch == '"':
                    quoted = False
            elif ch == '"' and at_field_start:
                quoted, opened = True, number
            at_field_start = not quoted and ch in ",\r\n"
            i += 1
    return opened


def _rows_csv(path: Path, field: str) -> Rows:
    # Prompts may be as long as MAX_TEXT_CHARS; the csv module refuses fields over 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_TEXT_CHARS + 1))
    row_lines: list[tuple[int, str]] = []  # the lines of the row being read

    def feed() -> Iterator[str]:
        for number, text in _lines(path):
            row_lines.append((number, text))
            yield text

    reader = csv.reader(feed(), strict=True)  # strict: an unclosed quote is an error, not a prompt
    header: list[str] | None = None
    while True:
        row_lines.clear()
        try:
            values = next(reader, None)
        except csv.Error as exc:
            raise _csv_error(path, exc, row_lines) from None
        if values is None:
            return
        if not values:
            continue  # a blank line
        line = row_lines[0][0]
        if header is None:
            header = values
            if field not in header:
                raise DataError(
                    f"{path}:{line}: the CSV header has no column '{field}' (its columns: {_listing(header)})"
                )
            continue
        if len(values) != len(header):
            raise DataError(
                f"{path}:{line}: the row has {len(values)} values for the header's {len(header)} columns"
            )
        yield f"{path}:{line}", dict(zip(header, values, strict=True))


def _csv_error(path: Path, exc: csv.Error, row_lines: list[tuple[int, str]]) -> DataError:
    """The csv module's error as a DataError naming the line."""
    line = row_lines[0][0] if row_lines else 1
    if "unexpected end of data" in str(exc) and row_lines:
        line = _open_quote_line(row_lines)
        return DataError(f"{path}:{line}: a quote opened on this line is never closed")
    if "field larger than field limit" in str(exc):
        return DataError(f"{path}:{line}: a field is longer than {MAX_TEXT_CHARS:,} characters")
    return DataError(f"{path}:{line}: not valid CSV ({exc})")


def _rows_parquet(path: Path, field: str) -> Rows:
    import pyarrow.parquet as pq  # runtime only (a dependency of datasets)

    row = 0
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if field not in names:
            raise DataError(
                f"{path}: the Parquet file has no column '{field}' (its columns: {_listing(names)})"
            )
        for batch in table.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    except DataError:
        raise
    except Exception as exc:  # pyarrow's errors for a corrupt file have no common base
        at = f" row {row}" if row else ""
        raise DataError(
            f"{path}{at}: not a readable Parquet file ({type(exc).__name__}: {exc})"
        ) from None


READERS: dict[str, Callable[[Path, str], Rows]] = {
    ".jsonl": _rows_jsonl,
    ".json": _rows_json,
    ".csv": _rows_csv,
    ".parquet": _rows_parquet,
}


def dataset_file(spec: dict[str, Any], recipe_dir: Path) -> Path | None:
    """The local file behind a one-file dataset spec (None for `hf:` datasets).

    Raises:
        DataError: the spec lists several files (an evaluation reads one).
    """
    path = spec["path"]
    if not isinstance(path, str):
        raise DataError(f"{path!r}: a list of files, where one file is expected")
    if path.startswith("ralign:"):
        return resolve_dataset(path[len("ralign:") :])
    if path.startswith("hf:"):
        return None
    return (recipe_dir / path).resolve()


def _kind(value: Any) -> str:
    """How a message names a JSON-ish value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "text"
    return f"a {type(value).__name__}"


def _shown(text: str) -> str:
    """`text` safe to print: surrogates and other unencodable characters escaped, cut at 80."""
    text = text if len(text) <= 80 else text[:77] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _listing(names: Iterable[Any]) -> str:
    """Field or column names for a message: sorted, printable, the first 20."""
    shown = sorted(_shown(str(k)) for k in names)
    more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
    return (", ".join(shown[:20]) + more) or "none"


def _checked_text(where: str, name: str, text: str) -> None:
    """Refuse text that could not be written back as UTF-8 or is beyond MAX_TEXT_CHARS."""
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(
            f"{where}: field '{_shown(name)}' is {len(text):,} characters long; a record's text may be at "
            f"most {MAX_TEXT_CHARS:,}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800", which JSON allows
        raise DataError(
            f"{where}: field '{_shown(name)}' holds an unpaired surrogate ({text[exc.start]!r} at character "
            f"{exc.start}), which is not text; fix or remove the record"
        ) from None


def record(where: str, row: Any, field: str) -> dict[str, Any]:
    """One data record as ralign keeps it: its scalar fields plus the stripped prompt under "prompt".

    Args:
        where: how messages name the record (`file:line`, `file record N`, ...).
        row: the record as read.
        field: the field that holds the prompt.
    Raises:
        DataError: naming `where`, when the record is not an object, lacks the field, the field is
            not text or is blank, or a kept text is too long or not valid Unicode.
    """
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: a record must be an object with a '{field}' field, not {_kind(row)}"
        )
    if field not in row:
        raise DataError(
            f"{where}: the record has no text field '{field}' (its fields: {_listing(row)})"
        )
    text = row[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' is {_kind(text)}, not text")
    if not text.strip():
        raise DataError(f"{where}: field '{field}' is blank")
    kept = {
        k: v
        for k, v in row.items()
        if isinstance(k, str) and isinstance(v, (str, int, float, bool))
    }
    for name, value in kept.items():
        _checked_text(where, name, name)  # names are written back too
        if isinstance(value, str):
            _checked_text(where, name, value)
    return {**kept, "prompt": text.strip()}


def _file_rows(spec: dict[str, Any], file: Path, field: str) -> Rows:
    """The rows of a local data file, after checking it exists, is unchanged and has a known type."""
    if not file.is_file():
        raise DataError(f"{spec['path']}: the dataset file does not exist (looked at {file})")
    want = spec.get("sha256")
    if want and sha256_file(file) != want:  # streamed: an 8 GB file is never read whole to hash it
        raise DataError(
            f"{file}: the file changed after the plan was compiled; compile the recipe again (or run the recipe itself)"
        )
    reader = READERS.get(file.suffix)
    if reader is None:
        raise DataError(f"{file}: unsupported file type (use .jsonl, .json, .csv or .parquet)")
    return reader(file, field)


def dataset_parts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The files of a dataset spec, in order, each as a one-file spec `{path, sha256}`.

    Args:
        spec: the plan's dataset entry; its `path` is one path or a list of them, and its `sha256`
            (where there is one) a hash or a list of the same length (null for `hf:` parts).
    Raises:
        DataError: `path` is an empty list, or `sha256` does not match it.
    """
    path, digest = spec["path"], spec.get("sha256")
    if isinstance(path, str):
        return [{"path": path, "sha256": digest}]
    if not path:
        raise DataError("a dataset's path is an empty list: it needs at least one file")
    if digest is None:
        digest = [None] * len(path)
    if not isinstance(digest, list) or len(digest) != len(path):
        raise DataError(f"{path!r}: the plan's sha256 is not a list of one hash per file")
    return [{"path": p, "sha256": d} for p, d in zip(path, digest, strict=True)]


def load_records(spec: dict[str, Any], recipe_dir: Path) -> list[dict[str, Any]]:
    """Records of a dataset spec, each with its prompt under "prompt" (from `field`) plus its other fields.

    Args:
        spec: the plan's dataset entry: path (one or a list, read in order), field, limit, sha256.
        recipe_dir: what a relative path is relative to.
    Returns:
        The records of the files one after another, at most `limit` of them in all (built-in
        sets leave out their held-out split).
    Raises:
        DataError: naming the file (and the record where there is one) for anything wrong with it:
            unreadable, changed since compile, not UTF-8, bad JSON/CSV/Parquet, no records, a
            record that is not an object or whose field is missing, not text, blank, longer than
            MAX_TEXT_CHARS or not valid Unicode.
    """
    field = spec.get("field", "prompt")
    limit = spec.get("limit")
    # Every file is found and its hash checked before any is read: a changed third file fails
    # the step at once, not after the first two were parsed.
    parts = [(part, dataset_file(part, recipe_dir)) for part in dataset_parts(spec)]
    sources = [
        (part, file, _rows_hf(part["path"]) if file is None else _file_rows(part, file, field))
        for part, file in parts
    ]
    out: list[dict[str, Any]] = []
    for part, file, rows in sources:
        if limit is not None and len(out) >= limit:
            break
        builtin = part["path"].startswith("ralign:")
        seen = 0
        for where, row in rows:
            seen += 1
            if limit is not None and len(out) >= limit:
                break
            if builtin and isinstance(row, dict) and row.get("split") == "heldout":
                continue  # built-in sets keep their held-out prompts for evaluation only
            out.append(record(where, row, field))
        if not seen:
            raise DataError(
                f"{file if file is not None else part['path']}: the dataset has no records"
            )
    return out


def _rows_hf(path: str) -> Rows:
    hub = parse_hub_dataset(path)  # a local path written as hf:... is refused here too
    import datasets  # runtime only

    try:
        ds = datasets.load_dataset(hub.repo, hub.config, split=hub.split, revision=hub.revision)
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
    """The records of a JSONL artifact (written by ralign's steps, but a run folder can be edited).

    Raises:
        DataError: naming `file:line` for a line that is not UTF-8, not JSON, or not an object.
    """
    out = []
    for where, row in rows_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(row)}")
        out.append(row)
    return out
