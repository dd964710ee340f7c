"""Hostile data files: every one is a DataError naming the file and record, never a traceback."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from ralign.errors import DataError
from ralign.runtime import data

ATTACKS = Path(__file__).parent / "cases" / "data_attacks"
EXPECTED = json.loads((ATTACKS / "expected.json").read_text(encoding="utf-8"))
ACCEPTED = json.loads((ATTACKS / "accepted.json").read_text(encoding="utf-8"))
CAP = 1_000_000  # the documented most characters of one record's text (CAP)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_hostile_file_is_a_data_error_naming_it(name: str) -> None:
    with pytest.raises(DataError) as err:
        data.load_records({"path": name}, ATTACKS)
    message = str(err.value)
    assert EXPECTED[name] in message
    assert str(ATTACKS / name) in message
    message.encode("utf-8")  # printable as it stands: no lone surrogate copied from the data


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_bom_and_awkward_csv_are_read(name: str) -> None:
    records = data.load_records({"path": name}, ATTACKS)
    assert [r["prompt"] for r in records] == ACCEPTED[name]


def test_every_attack_file_has_an_expectation() -> None:
    files = {p.name for p in ATTACKS.iterdir()} - {"expected.json", "accepted.json"}
    assert files == set(EXPECTED) | set(ACCEPTED)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json:"),
        ("deep.jsonl", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "deep.jsonl:1:"),
    ],
)
def test_json_nested_100000_deep(tmp_path: Path, name: str, text: str, where: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="nested too deeply") as err:
        data.load_records({"path": name}, tmp_path)
    assert where in str(err.value)


@pytest.mark.parametrize(
    ("size", "error"),
    [
        (CAP, None),  # the cap itself is allowed
        (CAP + 1, "long.jsonl:2: field 'prompt' is 1,000,001 characters long"),
    ],
)
def test_a_prompt_may_be_at_most_a_million_characters(
    tmp_path: Path, size: int, error: str | None
) -> None:
    lines = [{"prompt": "short"}, {"prompt": "x" * size}]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if error is None:
        assert len(data.load_records({"path": "long.jsonl"}, tmp_path)[1]["prompt"]) == size
        return
    with pytest.raises(DataError, match=error):
        data.load_records({"path": "long.jsonl"}, tmp_path)


def test_another_text_field_is_capped_too(tmp_path: Path) -> None:
    row = {"prompt": "short", "notes": "y" * (CAP + 1)}
    (tmp_path / "notes.json").write_text(json.dumps([row]))
    with pytest.raises(DataError, match="notes.json record 0: field 'notes' is 1,000,001"):
        data.load_records({"path": "notes.json"}, tmp_path)


def test_a_csv_field_over_the_cap_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "big.csv").write_text("prompt\nok\n" + "z" * (CAP + 2) + "\n")
    with pytest.raises(DataError, match="big.csv:3: a field is longer than 1,000,000 characters"):
        data.load_records({"path": "big.csv"}, tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_8_gb_file_without_newlines_is_not_read_whole(tmp_path: Path, suffix: str) -> None:
    huge = tmp_path / f"huge{suffix}"
    with huge.open("wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GB of zero bytes that take no disk space
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"huge{suffix}:1: the line is longer than 32 MiB"):
        data.load_records({"path": huge.name}, tmp_path)
    assert time.perf_counter() - start < 10


def test_an_8_gb_file_is_hashed_by_streaming(tmp_path: Path, monkeypatch) -> None:
    import ralign.inputs

    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as f:
        f.truncate(8 << 30)
    chunks: list[int] = []

    class Enough(Exception):
        pass

    class Counting:
        def update(self, chunk: bytes) -> None:
            chunks.append(len(chunk))
            if len(chunks) == 8:
                raise Enough  # far enough to see the file is streamed, not read whole

    monkeypatch.setattr(ralign.inputs.hashlib, "sha256", Counting)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    with pytest.raises(Enough):
        data.load_records({"path": huge.name, "sha256": "0" * 64}, tmp_path)
    assert chunks == [1 << 20] * 8


def test_the_content_check_streams_and_still_catches_a_change(tmp_path: Path, monkeypatch) -> None:
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "a"}\n' * 80_000)  # 1.3 MB: two chunks
    good = hashlib.sha256(file.read_bytes()).hexdigest()
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    assert len(data.load_records({"path": "p.jsonl", "sha256": good}, tmp_path)) == 80_000
    with pytest.raises(DataError, match="p.jsonl: the file changed after the plan was compiled"):
        data.load_records({"path": "p.jsonl", "sha256": "f" * 64}, tmp_path)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("hf:/etc", "'hf:/etc' is an absolute path, not a Hugging Face hub id"),
        ("hf:../secrets", "is a relative path, not a Hugging Face hub id"),
        ("hf:~/x", "is a path in a home folder"),
        ("hf:org/name/extra", "'org/name/extra' has 2 '/'"),
        ("hf:org/name:train[:10%]", "split slices like 'train[:10%]' are not supported"),
    ],
)
def test_a_local_path_written_as_hf_is_refused_before_loading(
    spec: str, error: str, monkeypatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it now would fail the test
    with pytest.raises(DataError, match=error.replace("[", r"\[")):
        data.load_records({"path": spec}, Path("."))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"prompt": "a"}\n{"prompt": "b', "run.jsonl:2: not valid JSON"),
        ('{"a": 1}\n\n[1, 2]\n', "run.jsonl:3: expected a JSON object, got a list"),
        ('{"a": "\xff"}\n', None),  # written as UTF-8 below: fine
    ],
)
def test_read_jsonl_names_a_tampered_line(tmp_path: Path, text: str, error: str | None) -> None:
    file = tmp_path / "run.jsonl"
    file.write_text(text, encoding="utf-8")
    if error is None:
        assert data.read_jsonl(file) == [{"a": "\xff"}]
        return
    with pytest.raises(DataError, match=error):
        data.read_jsonl(file)


def test_read_jsonl_names_bad_bytes(tmp_path: Path) -> None:
    file = tmp_path / "run.jsonl"
    file.write_bytes(b'{"a": 1}\n{"a": "\xc3"}\n')
    with pytest.raises(DataError, match=r"run.jsonl:2: not UTF-8 text \(byte 0xc3 at offset 16"):
        data.read_jsonl(file)


def test_records_keep_scalar_fields_and_strip_the_prompt(tmp_path: Path) -> None:
    row = {"q": "  Why?  ", "id": 3, "ok": True, "nested": {"x": 1}}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    (got,) = data.load_records({"path": "d.jsonl", "field": "q"}, tmp_path)
    assert got == {"q": "  Why?  ", "id": 3, "ok": True, "prompt": "Why?"}


# ------------------------------------------------------------------ a dataset of several files

LIST_RECIPE = """recipe "parts" {}
model policy { path = "ralign:tiny-llama" }
dataset seeds {
  path = ["ralign:seeds/red_team", "more.jsonl"]
  field = "prompt"LIMIT
}
phase answer { sample { from = seeds } }
"""
MORE = '{"prompt": "local one", "id": 1}\n{"prompt": " local two "}\n'


def _train_prompts(name: str) -> list[str]:
    """The prompts of a built-in set a step may read, straight from its file (held-out left out)."""
    from ralign.inputs import resolve_dataset

    rows = [json.loads(line) for line in resolve_dataset(name).read_text().splitlines()]
    return [r["prompt"] for r in rows if r["split"] != "heldout"]


def _compiled_list(tmp_path: Path, limit: int | None, more: str = MORE) -> dict:
    from ralign.compile import compile_file

    (tmp_path / "more.jsonl").write_text(more, encoding="utf-8")
    recipe = tmp_path / "r.ralign"
    written = "" if limit is None else f"\n  limit = {limit}"
    recipe.write_text(LIST_RECIPE.replace("LIMIT", written), encoding="utf-8")
    return dict(compile_file(recipe).datasets["seeds"])


@pytest.mark.parametrize(
    ("limit", "tail"),
    [
        (None, ["local one", "local two"]),
        (74, ["local one", "local two"]),
        (73, ["local one"]),  # red_team keeps 72 of its 96 prompts; the limit counts over both
        (72, []),
    ],
)
def test_a_list_of_paths_is_read_in_order(tmp_path: Path, limit: int | None, tail: list) -> None:
    spec = _compiled_list(tmp_path, limit)
    assert spec["path"] == ["ralign:seeds/red_team", "more.jsonl"]
    local = hashlib.sha256(MORE.encode()).hexdigest()
    assert len(spec["sha256"]) == 2 and spec["sha256"][1] == local
    records = data.load_records(spec, tmp_path)
    red_team = _train_prompts("seeds/red_team")
    assert len(red_team) == 72
    assert [r["prompt"] for r in records] == red_team + tail
    assert all(r.get("split") != "heldout" for r in records)
    if tail:
        assert records[72] == {"prompt": "local one", "id": 1}


def test_a_limit_inside_the_first_file_leaves_the_rest_unread(tmp_path: Path) -> None:
    records = data.load_records(
        {"path": ["ralign:seeds/hhh", "ralign:seeds/hhh"], "limit": 3}, tmp_path
    )
    assert [r["prompt"] for r in records] == _train_prompts("seeds/hhh")[:3]


def test_a_file_may_appear_twice_and_keeps_its_own_rows(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    records = data.load_records({"path": ["a.jsonl", "a.jsonl"]}, tmp_path)
    assert [r["prompt"] for r in records] == ["x", "y", "x", "y"]


@pytest.mark.parametrize(
    ("more", "error"),
    [
        (
            '{"prompt": "fine"}\n{"text": "no prompt"}\n',
            "more.jsonl:2: the record has no text field 'prompt'",
        ),
        ('{"prompt": "fine"}\n{"prompt": "cut', "more.jsonl:2: not valid JSON"),
        ("\n\n", "more.jsonl: the dataset has no records"),
    ],
)
def test_a_bad_record_in_a_later_file_names_that_file(
    tmp_path: Path, more: str, error: str
) -> None:
    spec = _compiled_list(tmp_path, None, more)
    with pytest.raises(DataError, match=error) as err:
        data.load_records(spec, tmp_path)
    assert str(tmp_path / "more.jsonl") in str(err.value)


def test_a_changed_part_fails_before_any_is_read(tmp_path: Path, monkeypatch) -> None:
    spec = _compiled_list(tmp_path, None)
    (tmp_path / "more.jsonl").write_text('{"prompt": "swapped"}\n', encoding="utf-8")
    monkeypatch.setattr(data, "record", lambda *a: pytest.fail("a record was read"))
    with pytest.raises(DataError, match="more.jsonl: the file changed after the plan was compiled"):
        data.load_records(spec, tmp_path)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"path": []}, "needs at least one file"),
        ({"path": ["a.jsonl", "b.jsonl"], "sha256": ["0" * 64]}, "not a list of one hash per file"),
        ({"path": ["a.jsonl"], "sha256": "0" * 64}, "not a list of one hash per file"),
    ],
)
def test_a_malformed_list_spec_is_a_data_error(tmp_path: Path, spec: dict, error: str) -> None:
    with pytest.raises(DataError, match=error):
        data.load_records(spec, tmp_path)


def test_an_evaluation_file_is_never_a_list(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="a list of files, where one file is expected"):
        data.dataset_file({"path": ["ralign:evals/hhh-mini"]}, tmp_path)


@pytest.mark.parametrize(
    ("value", "at", "message"),
    [
        (
            '["ralign:seeds/hhh", "gone.jsonl", "more.jsonl"]',
            '"gone.jsonl"',
            "'gone.jsonl' does not exist",
        ),
        ('["more.jsonl", "../out.jsonl"]', '"../out.jsonl"', "'../out.jsonl' is outside"),
        ('["more.jsonl", "more.jsonl", 7]', "7", "each file in the list must be a string"),
        ("[]", "[]", "`path` needs at least one file"),
    ],
)
def test_a_list_error_points_at_its_element(
    tmp_path: Path, value: str, at: str, message: str
) -> None:
    from ralign.compile import check_file
    from ralign.errors import RecipeError

    (tmp_path / "more.jsonl").write_text(MORE, encoding="utf-8")
    recipe = tmp_path / "r.ralign"
    line = f"dataset d {{ path = {value} }}"
    recipe.write_text(f'recipe "e" {{}}\nmodel policy {{ path = "ralign:tiny-llama" }}\n{line}\n')
    with pytest.raises(RecipeError) as err:
        check_file(recipe)
    (d,) = err.value.diagnostics
    assert d.span.line == 3 and line[d.span.column - 1 :].startswith(at), str(err.value)
    assert message in d.message and f"r.ralign:3:{d.span.column}: error: " in str(err.value)


# ------------------------------------------------------------------ an over-long prompt reaches generation

SHORT = ["What is 2 plus 3?", "Hi", "The cat reads the book at home.", "Why is the sky blue?"]
MEGABYTE = "word " * 200_000  # 1 MB: what a hostile data file can hand the sample step


class CountingTokenizer:
    """The tiny tokenizer, recording how many characters each call was asked to tokenize."""

    def __init__(self, tok) -> None:
        self.tok, self.lengths = tok, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_a_megabyte_prompt_is_dropped_and_the_others_keep_their_answers(
    tiny_models, sort_by_length: bool
) -> None:
    from ralign.runtime.generation import generate

    model, tok = tiny_models("llama")
    kw = dict(n=3, temperature=1.0, max_new_tokens=2, seed=5, batch_size=6)
    kw["sort_by_length"] = sort_by_length
    alone = generate(model, tok, SHORT, **kw)
    counting = CountingTokenizer(tok)
    start = time.perf_counter()
    mixed = generate(model, counting, [*SHORT[:2], MEGABYTE, *SHORT[2:]], **kw)
    assert time.perf_counter() - start < 5  # 9+ minutes before the rule; the rest is 4 prompts
    assert max(counting.lengths) < 100  # the megabyte was never tokenized
    assert mixed[2] == [mixed[2][0]] * 3 and mixed[2][0].prompt_too_long
    assert (mixed[2][0].text, mixed[2][0].tokens, mixed[2][0].finished) == ("", 0, False)
    assert [*mixed[:2], *mixed[3:]] == alone  # same tokens, same draws
    assert not any(c.prompt_too_long for row in alone for c in row)


def test_dropping_alone_takes_no_model_call(tiny_models) -> None:
    from ralign.runtime.generation import generate

    model, tok = tiny_models("llama")
    start = time.perf_counter()
    (row,) = generate(model, tok, [MEGABYTE], n=2, temperature=0.0, max_new_tokens=2, seed=0)
    assert time.perf_counter() - start < 0.5
    assert [c.prompt_too_long for c in row] == [True, True]


@pytest.mark.parametrize(("spare", "dropped"), [(0, False), (-1, True)])
def test_the_rule_is_tokens_over_max_length_minus_max_new_tokens(
    tiny_models, spare: int, dropped: bool
) -> None:
    from ralign.runtime.generation import generate

    model, tok = tiny_models("llama")
    text = "The cat reads the book at home."
    count = len(tok(text, add_special_tokens=False)["input_ids"])
    (row,) = generate(
        model,
        tok,
        [text],
        n=1,
        temperature=0.0,
        max_new_tokens=3,
        seed=0,
        max_length=count + 3 + spare,
    )
    assert row[0].prompt_too_long is dropped


@pytest.mark.parametrize(("arch", "positions"), [("llama", 512), ("gpt2", 512)])
def test_max_length_defaults_to_the_models_context(tiny_models, arch: str, positions: int) -> None:
    from ralign.runtime import generation

    model, tok = tiny_models(arch)
    assert generation._max_positions(model) == positions
    assert generation._max_positions(object()) == 2048
    # 32 characters per token at most: 10 new tokens leave 502 tokens, so 16,064 characters.
    (row,) = generation.generate(
        model, tok, ["a" * 16_065], n=1, temperature=0.0, max_new_tokens=10, seed=0
    )
    assert row[0].prompt_too_long


def test_progress_counts_the_dropped_texts(tiny_models) -> None:
    from ralign.runtime.generation import generate

    model, tok = tiny_models("llama")
    calls: list[tuple[int, int]] = []
    generate(
        model,
        tok,
        [MEGABYTE, "Hi"],
        n=1,
        temperature=0.0,
        max_new_tokens=2,
        seed=0,
        progress=lambda done, tokens: calls.append((done, tokens)),
    )
    assert calls[0] == (1, 0) and sum(d for d, _ in calls) == 2
