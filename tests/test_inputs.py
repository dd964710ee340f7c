"""What a recipe may name as input: hub ids, built-in sets, and the content hashes of files and folders."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from ralign import inputs
from ralign.errors import DataError
from ralign.inputs import (
    HubDataset,
    hub_dataset_problem,
    hub_model_problem,
    parse_hub_dataset,
    sha256_file,
    sha256_folder,
)

LOCAL = "a local file or folder must be written as a plain path inside the recipe's folder"


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("hf:org/name", HubDataset("org/name", None, "train", None)),
        ("hf:name", HubDataset("name", None, "train", None)),
        ("hf:tatsu-lab/alpaca:train", HubDataset("tatsu-lab/alpaca", None, "train", None)),
        ("hf:org/name:test", HubDataset("org/name", None, "test", None)),
        ("hf:org/name:en.v2:validation", HubDataset("org/name", "en.v2", "validation", None)),
        ("hf:org/name@main", HubDataset("org/name", None, "train", "main")),
        ("hf:org/name@refs/pr/3:cfg:test", HubDataset("org/name", "cfg", "test", "refs/pr/3")),
        ("hf:Org_1/a.b-c@" + "a" * 40, HubDataset("Org_1/a.b-c", None, "train", "a" * 40)),
        ("hf:" + "a" * 96, HubDataset("a" * 96, None, "train", None)),
    ],
)
def test_a_hub_dataset_spec_parses(spec: str, parsed: HubDataset) -> None:
    assert hub_dataset_problem(spec) is None
    assert parse_hub_dataset(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            "hf:/abs/folder",
            f"'hf:/abs/folder' is an absolute path, not a Hugging Face hub id; {LOCAL}",
        ),
        ("hf:../x", "'hf:../x' is a relative path"),
        ("hf:./x", "'hf:./x' is a relative path"),
        ("hf:.x", "'hf:.x' is a relative path"),
        ("hf:~/x", "'hf:~/x' is a path in a home folder"),
        ("hf:C:\\x", "'hf:C:\\x' is a Windows path"),
        ("hf:C:/x", "'hf:C:/x' is a Windows path"),
        ("hf:org\\name", "is a Windows path"),
        ("hf:org/name/extra", "'org/name/extra' has 2 '/': a hub id is 'org/name' or 'name'"),
        ("hf:org/", "'org/' has an empty part"),
        ("hf:a\0b", "'hf:a\\x00b' contains a NUL character"),
        ("hf:org/na me", "contains whitespace"),
        ("hf:org/name\n", "contains whitespace"),
        ("hf:org/\x1bname", "'hf:org/\\x1bname' contains a control character"),
        ("hf:", "'hf:' names no dataset"),
        ("hf:-org/x", "'-org' may hold only letters, digits"),
        ("hf:org/x-", "'x-' may hold only letters, digits"),
        ("hf:org/x.", "'x.' may hold only letters, digits"),
        ("hf:org/a..b", "'a..b' contains '..' or '--'"),
        ("hf:org/a--b", "'a--b' contains '..' or '--'"),
        ("hf:org/name.git", "'org/name.git' ends in '.git'"),
        ("hf:org/nämé", "'nämé' may hold only letters, digits"),
        ("hf:" + "a" * 97, "is longer than 96 characters"),
        ("hf:org/x@", "an empty revision after '@'"),
        ("hf:org/x@../../etc", "revision '../../etc' must be a branch, tag or commit"),
        ("hf:org/x@a//b", "revision 'a//b' must be"),
        ("hf:org/x:a:b:c", "more than two ':' parts"),
        ("hf:org/x:train[:10%]", "split slices like 'train[:10%]' are not supported"),
        ("hf:org/x:tra-in", "split 'tra-in' must be a name like 'train'"),
        ("hf:org/x:c/d:train", "config 'c/d' may hold only"),
        ("org/name", "'org/name' is not a hub dataset (those begin with 'hf:')"),
    ],
)
def test_anything_but_a_hub_dataset_id_is_refused(spec: str, problem: str) -> None:
    message = hub_dataset_problem(spec)
    assert message is not None and problem in message
    with pytest.raises(DataError) as err:
        parse_hub_dataset(spec)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("gpt2", None),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", None),
        ("org/name@main", None),
        ("org/name@0123abcd", None),
        (
            "/models/mine",
            "'/models/mine' is an absolute path, not a folder inside the recipe's folder",
        ),
        ("../models/mine", "is a relative path"),
        ("~/models", "is a path in a home folder"),
        ("C:\\models", "is a Windows path"),
        ("models/x/y", "is neither a folder inside the recipe's folder nor a hub model id"),
        ("org/name@", "an empty revision after '@'"),
        ("org/name@..", "revision '..' must be"),
        ("org/name:train", "'name:train' may hold only letters"),
        ("", "'' names no model"),
        ("a\0b", "contains a NUL character"),
    ],
)
def test_hub_model_ids(path: str, problem: str | None) -> None:
    message = hub_model_problem(path)
    assert message == problem if problem is None else (message and problem in message)


# ------------------------------------------------------------------ file hashes


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5 << 19])
def test_the_streaming_hash_is_sha256(tmp_path: Path, size: int) -> None:
    file = tmp_path / "f.bin"
    file.write_bytes(bytes(i % 251 for i in range(size)))
    assert sha256_file(file) == hashlib.sha256(file.read_bytes()).hexdigest()


def test_a_file_is_read_in_1_mib_chunks(tmp_path: Path, monkeypatch) -> None:
    file = tmp_path / "f.bin"
    file.write_bytes(b"x" * ((5 << 19) + 3))
    sizes: list[int] = []
    real = hashlib.sha256

    class Spy:
        def __init__(self) -> None:
            self.h = real()

        def update(self, chunk: bytes) -> None:
            sizes.append(len(chunk))
            self.h.update(chunk)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(inputs.hashlib, "sha256", Spy)
    sha256_file(file)
    assert sizes == [1 << 20, 1 << 20, (1 << 19) + 3]


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo"])
def test_only_a_regular_file_is_hashed(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block forever
    with pytest.raises(DataError, match="x: (not a regular file|cannot read the file)"):
        sha256_file(path)


def test_a_file_swapped_for_a_fifo_after_the_check_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p")  # as if it replaced a regular file between stat and open
    with pytest.raises(DataError, match="p: not a regular file"):
        inputs._stream_sha256(tmp_path / "p")


# ------------------------------------------------------------------ folder hashes


def _model(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub" / "tokenizer.json").write_text('{"v": []}')
    return folder


def test_the_folder_hash_does_not_depend_on_where_the_folder_is(tmp_path: Path) -> None:
    assert sha256_folder(_model(tmp_path / "a")) == sha256_folder(_model(tmp_path / "b" / "c"))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "sub/tokenizer.json"])
@pytest.mark.parametrize("where", [0, -1])
def test_any_byte_of_any_file_changes_the_folder_hash(
    tmp_path: Path, name: str, where: int
) -> None:
    folder = _model(tmp_path / "m")
    before = sha256_folder(folder)
    data = bytearray((folder / name).read_bytes())
    data[where] ^= 1
    (folder / name).write_bytes(bytes(data))
    assert sha256_folder(folder) != before


@pytest.mark.parametrize(
    "change",
    [
        lambda f: (f / "extra.txt").write_text(""),  # an empty file added
        lambda f: (f / "sub" / "more").mkdir() or (f / "sub" / "more" / "x").write_text("1"),
        lambda f: (f / "config.json").rename(f / "config2.json"),
        lambda f: (f / "config.json").rename(f / "sub" / "config.json"),
        lambda f: (f / "sub" / "tokenizer.json").unlink(),
        lambda f: (f / "config.json").write_text('{"a": 1} '),
    ],
    ids=["added", "added-deeper", "renamed", "moved", "removed", "grown"],
)
def test_adding_removing_or_renaming_a_file_changes_the_folder_hash(tmp_path: Path, change) -> None:
    folder = _model(tmp_path / "m")
    before = sha256_folder(folder)
    change(folder)
    assert sha256_folder(folder) != before


def test_a_cache_folder_is_not_content(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    before = sha256_folder(folder)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.lock").write_text("pid 1")
    (folder / "sub" / ".cache").mkdir()
    (folder / "sub" / ".cache" / "y").write_text("z")
    assert sha256_folder(folder) == before


@pytest.mark.parametrize(
    "target",
    ["../outside.bin", "/etc/hostname", "../elsewhere", ".cache/blob", "../m2/config.json"],
)
def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path, target: str) -> None:
    folder = _model(tmp_path / "m")
    _model(tmp_path / "m2")
    (tmp_path / "outside.bin").write_bytes(b"secret")
    (tmp_path / "elsewhere").mkdir()
    (folder / ".cache").mkdir()
    (folder / ".cache" / "blob").write_bytes(b"hidden")
    (folder / "link").symlink_to(target)
    with pytest.raises(DataError, match="'link' is a symlink to .*, outside the model folder"):
        sha256_folder(folder)


def test_a_symlink_inside_the_folder_is_hashed_as_its_target(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    copy = _model(tmp_path / "copy")
    (folder / "weights.bin").symlink_to("model.safetensors")
    (folder / "alias").symlink_to("sub")  # a folder link: its files are hashed where they are
    (copy / "weights.bin").write_bytes((copy / "model.safetensors").read_bytes())
    assert sha256_folder(folder) == sha256_folder(copy)


def test_a_symlink_loop_or_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    os.mkfifo(folder / "pipe")
    with pytest.raises(DataError, match="pipe: not a regular file"):
        sha256_folder(folder)
    (folder / "pipe").unlink()
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    with pytest.raises(DataError):
        sha256_folder(folder)


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match="f: not a folder"):
        sha256_folder(tmp_path / "f")


# ------------------------------------------------------------------ the memo


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh cache root; files count as settled at once (no 2 s racy window to wait out)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RALIGN_CACHE", str(root))
    monkeypatch.setattr(inputs, "RACY_NS", 0)
    return root


def test_a_file_changed_just_now_is_not_memoised(tmp_path: Path, cache: Path, monkeypatch) -> None:
    folder = _model(tmp_path / "m")
    monkeypatch.setattr(inputs, "RACY_NS", 2_000_000_000)
    old = time.time_ns() - 10_000_000_000
    os.utime(folder / "config.json", ns=(old, old))  # its ctime is still now: not settled
    sha256_folder(folder, memo=True)
    assert not (cache / inputs.MEMO_FILE).exists()


def test_the_memo_reuses_hashes_of_unchanged_files(
    tmp_path: Path, cache: Path, monkeypatch
) -> None:
    folder = _model(tmp_path / "m")
    plain = sha256_folder(folder)
    assert sha256_folder(folder, memo=True) == plain
    assert len(json.loads((cache / inputs.MEMO_FILE).read_text())["files"]) == 3
    monkeypatch.setattr(inputs, "_stream_sha256", lambda path: pytest.fail(f"read {path}"))
    assert sha256_folder(folder, memo=True) == plain
    assert not [p for p in cache.iterdir() if p.name != inputs.MEMO_FILE]  # no temp files left


def test_the_memo_notices_an_edit_that_keeps_size_and_mtime(tmp_path: Path, cache: Path) -> None:
    folder = _model(tmp_path / "m")
    before = sha256_folder(folder, memo=True)
    target = folder / "model.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[7] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    after = sha256_folder(folder, memo=True)
    assert after != before and after == sha256_folder(folder)


def test_a_file_hash_can_use_the_memo(tmp_path: Path, cache: Path, monkeypatch) -> None:
    file = tmp_path / "d.jsonl"
    file.write_text('{"prompt": "x"}\n')
    want = hashlib.sha256(file.read_bytes()).hexdigest()
    assert sha256_file(file, memo=True) == want
    monkeypatch.setattr(inputs, "_stream_sha256", lambda path: pytest.fail(f"read {path}"))
    assert sha256_file(file, memo=True) == want


@pytest.mark.parametrize(
    "memo",
    [
        b"\xff\xfe not json",
        b"",
        b"[1, 2]",
        b'{"files": [1]}',
        b'{"files": {"k": 3}}',
        b"[" * 100_000,
    ],
    ids=["garbage", "empty", "list", "files-list", "bad-value", "deep"],
)
def test_a_corrupt_memo_is_ignored_and_replaced(tmp_path: Path, cache: Path, memo: bytes) -> None:
    folder = _model(tmp_path / "m")
    cache.mkdir()
    (cache / inputs.MEMO_FILE).write_bytes(memo)
    assert sha256_folder(folder, memo=True) == sha256_folder(folder)
    assert len(json.loads((cache / inputs.MEMO_FILE).read_text())["files"]) == 3


def test_a_poisoned_memo_entry_of_another_shape_is_not_trusted(tmp_path: Path, cache: Path) -> None:
    folder = _model(tmp_path / "m")
    sha256_folder(folder, memo=True)
    table = json.loads((cache / inputs.MEMO_FILE).read_text())
    table["files"] = {k: "not-a-sha" for k in table["files"]}
    (cache / inputs.MEMO_FILE).write_text(json.dumps(table))
    assert sha256_folder(folder, memo=True) == sha256_folder(folder)


def test_an_unwritable_cache_is_not_an_error(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RALIGN_CACHE", str(blocker / "cache"))
    folder = _model(tmp_path / "m")
    assert sha256_folder(folder, memo=True) == sha256_folder(folder)


def test_the_builtin_table_moved_but_old_imports_still_work() -> None:
    from ralign.runtime import builtin_data

    assert builtin_data.resolve_dataset is inputs.resolve_dataset
    assert builtin_data.DATASETS is inputs.DATASETS
    assert inputs.resolve_dataset("seeds/hhh").is_file()
