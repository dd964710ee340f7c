"""Error cases as data: every chunk of tests/cases/errors/*.ralign must fail with the diagnostics it marks.

The format (after Starlark's test files):

- A file holds several cases separated by lines that are exactly `---`. A chunk that is
  only comments and blank lines is a header and is skipped.
- `### error: TEXT` at the end of a line expects a diagnostic on that line whose message
  contains TEXT (case-insensitive). A line may carry several markers
  (`... ### error: one ### error: two`).
- `### error FILE:LINE: TEXT` expects the diagnostic in FILE (a helper copied from
  tests/cases/imports/) at LINE, for problems the case causes inside an imported file.
- Markers are cut from the text before it is compiled (from `###` to the end of the
  line), so they may sit inside strings and templates; lines and the columns before a
  marker do not move.
- Each case is written as `case.ralign` in a fresh folder beside copies of
  tests/cases/imports/*, and checked with `check_file`. It must raise RecipeError, every
  marked diagnostic must be there, and there must be exactly as many diagnostics as
  markers: all of a file's errors are reported together, and none twice or as a cascade.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ralign.compile import check_file, compile_file
from ralign.errors import RecipeError

CASES = Path(__file__).parent / "cases"
MARKER = re.compile(
    r"###\s*error(?:\s+(?P<file>[\w./-]+):(?P<line>\d+))?:\s*(?P<text>.*?)\s*(?=###|$)"
)


@dataclass(frozen=True)
class Expected:
    file: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text!r}"


@dataclass(frozen=True)
class Case:
    id: str
    text: str  # markers removed
    expected: tuple[Expected, ...]


def has_code(lines: list[str]) -> bool:
    """Whether a chunk holds more than comments and blank lines (a header chunk holds only those)."""
    return any(ln.strip() and not ln.lstrip().lstrip("\ufeff").startswith("#") for ln in lines)


def split_cases(path: Path) -> list[Case]:
    """The cases of one file, each with its marker-free text and expectations."""
    cases: list[Case] = []
    chunk: list[str] = []
    start = 1

    def flush(first_line: int) -> None:
        lines, expected = [], []
        for i, line in enumerate(chunk, start=1):
            at = line.find("###")
            if at < 0:
                lines.append(line)
                continue
            for m in MARKER.finditer(line, at):
                file = m["file"] or "case.ralign"
                expected.append(Expected(file, int(m["line"]) if m["line"] else i, m["text"]))
            lines.append(line[:at])
        if not expected:
            assert not has_code(lines), (
                f"{path.name}:{first_line}: a case without any `### error:` marker"
            )
            return
        cases.append(Case(f"{path.stem}:{first_line}", "\n".join(lines) + "\n", tuple(expected)))

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.rstrip() == "---":
            flush(start)
            chunk, start = [], number + 1
        else:
            chunk.append(line)
    flush(start)
    return cases


ALL = [case for path in sorted((CASES / "errors").glob("*.ralign")) for case in split_cases(path)]


def compile_case(case: Case, tmp_path: Path) -> RecipeError:
    for helper in (CASES / "imports").iterdir():
        shutil.copy(helper, tmp_path / helper.name)
    path = tmp_path / "case.ralign"
    path.write_text(case.text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        check_file(path)
    return info.value


def describe(err: RecipeError) -> str:
    return "\n".join(
        f"  {d.span.file}:{d.span.line}:{d.span.column}: {d.message}" for d in err.diagnostics
    )


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_error_case(case: Case, tmp_path: Path) -> None:
    err = compile_case(case, tmp_path)
    got = describe(err)
    for want in case.expected:
        hits = [
            d
            for d in err.diagnostics
            if d.span.file == want.file
            and d.span.line == want.line
            and want.text.lower() in d.message.lower()
        ]
        assert hits, f"missing diagnostic {want}; got:\n{got}"
    assert len(err.diagnostics) == len(case.expected), (
        f"expected exactly {len(case.expected)} diagnostic(s) ({', '.join(map(str, case.expected))}); got:\n{got}"
    )
    rendered = str(err)
    assert rendered.endswith(f"{len(case.expected)} error{'s' if len(case.expected) != 1 else ''}")
    for d in err.diagnostics:  # every diagnostic points at a real line and column of its file
        assert d.span.line >= 1 and d.span.column >= 1
        assert f"{d.span.file}:{d.span.line}:{d.span.column}: error: " in rendered


def test_cases_are_plentiful() -> None:
    # The suite is the spec of our diagnostics: keep it broad.
    assert len(ALL) >= 100
    assert sum(len(c.expected) > 1 for c in ALL) >= 5  # cases with several errors reported together


def test_marker_syntax() -> None:
    text = "let a = 1 ### error: one ### error other.ralign:3: two\n"
    found = [(m["file"], m["line"], m["text"]) for m in MARKER.finditer(text, text.find("###"))]
    assert found == [(None, None, "one"), ("other.ralign", "3", "two")]


# ---- the other side: edge cases that must compile -------------------------------------------


def split_valid(path: Path) -> list[tuple[str, str]]:
    chunks, current, start = [], [], 1
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.rstrip() == "---":
            chunks.append((start, current))
            current, start = [], number + 1
        else:
            current.append(line)
    chunks.append((start, current))
    return [(f"{path.stem}:{s}", "\n".join(lines) + "\n") for s, lines in chunks if has_code(lines)]


VALID = [case for path in sorted((CASES / "valid").glob("*.ralign")) for case in split_valid(path)]


@pytest.mark.parametrize(("case_id", "text"), VALID, ids=[c[0] for c in VALID])
def test_valid_case(case_id: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / "case.ralign"
    path.write_text(text, encoding="utf-8")
    checked = check_file(path)
    if checked.recipe:
        assert compile_file(path).steps is not None


# ---- focused regressions --------------------------------------------------------------------


def test_template_variable_column_is_the_whole_word(tmp_path: Path) -> None:
    text = (
        'recipe "t" { }\nmodel policy { path = "ralign:smollm2-135m" }\n'
        'dataset seeds { path = "ralign:seeds/hhh" }\n'
        "phase p {\n  sample { from = seeds }\n"
        '  rank q { template = "{{ responses }} {{ respons }}" }\n}\n'
    )
    err = compile_case(Case("column", text, ()), tmp_path)
    (d,) = err.diagnostics
    line = text.splitlines()[d.span.line - 1]
    assert line[d.span.column - 1 :].startswith("respons }}"), line[d.span.column - 1 :]


@pytest.mark.parametrize("kind", ["let", "def", "reward"])
def test_long_chains_are_errors_not_crashes(kind: str, tmp_path: Path) -> None:
    n = 1500  # each refers to the next, declared later: deeper than Python's recursion limit
    if kind == "let":
        text = "".join(f"let a{i} = a{i + 1} + 1\n" for i in range(n)) + f"let a{n} = 1\n"
    elif kind == "def":
        text = "".join(f"def f{i}(x) = f{i + 1}(x) + 1\n" for i in range(n)) + f"def f{n}(x) = 1\n"
        text += "reward r { rule q = f0(1) }\n"
    else:
        text = (
            "".join(f"reward r{i} {{ rule q = r{i + 1} }}\n" for i in range(n))
            + f"reward r{n} {{ rule q = 1 }}\n"
        )
    path = tmp_path / "chain.ralign"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError, match="too deeply"):
        check_file(path)


def test_a_short_chain_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "chain.ralign"
    path.write_text(
        "".join(f"let a{i} = a{i + 1} + 1\n" for i in range(50)) + "let a50 = 1\n", encoding="utf-8"
    )
    assert "chain.ralign:a0" in check_file(path).programs.lets


def test_symlink_out_of_the_roots_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.ralign").write_text("let secret = 1\n", encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir()
    (home / "link.ralign").symlink_to(outside / "secret.ralign")
    recipe = home / "r.ralign"
    recipe.write_text('import "./link.ralign"\nlet x = link.secret\n', encoding="utf-8")
    with pytest.raises(RecipeError, match="outside the import roots"):
        check_file(recipe)
    assert check_file(recipe, roots=(outside,)).programs.lets


@pytest.mark.parametrize("separator", ["\f", "\u2028"])
def test_excerpt_shows_the_line_the_lexer_counted(separator: str, tmp_path: Path) -> None:
    text = f'recipe "x" {{ }}\nmodel policy {{ path = "ralign:smollm2-135m" }}\nlet s = "a{separator}b"\nlet b = @\n'
    err = compile_case(Case("excerpt", text, ()), tmp_path)
    (d,) = err.diagnostics
    assert (d.span.line, d.span.column) == (4, 9)
    assert "   4 | let b = @" in str(err)


def test_every_check_pass_has_its_own_error_cases() -> None:
    from ralign.check import PASSES

    files = {p.stem for p in (CASES / "errors").glob("*.ralign")}
    for check_pass in PASSES:
        assert check_pass.__name__ in files, f"no tests/cases/errors/{check_pass.__name__}.ralign"
        cases = [c for c in ALL if c.id.startswith(f"{check_pass.__name__}:")]
        assert len(cases) >= 3, f"{check_pass.__name__}.ralign has {len(cases)} cases"


def test_thousands_of_errors_show_the_first_hundred_and_a_count(tmp_path: Path) -> None:
    lines = [f"let v{i} = u{i}" for i in range(3000)]
    path = tmp_path / "many.ralign"
    path.write_text("\n".join(["let ok = 1", *lines]) + "\n", encoding="utf-8")  # a library
    with pytest.raises(RecipeError) as info:
        check_file(path)
    diagnostics = info.value.diagnostics
    assert len(diagnostics) == 3000
    assert [d.message for d in diagnostics[:2]] == ["unknown name 'u0'", "unknown name 'u1'"]
    assert all(d.message.startswith("unknown name 'u") for d in diagnostics)
    shown = str(info.value).splitlines()
    assert sum(": error: " in line for line in shown) == 100
    assert shown[-2:] == ["... and 2,900 more (only the first 100 are shown)", "3,000 errors"]
    # In source order: the first shown is the first line's, with its column.
    assert shown[0].startswith("many.ralign:2:10: error:")


@pytest.mark.parametrize("text", ["let ok = 1\n", "let v = u\n"], ids=["ok", "error"])
def test_checking_pauses_the_garbage_collector_and_restores_it(tmp_path: Path, text: str) -> None:
    import gc

    path = tmp_path / "lib.ralign"
    path.write_text(text, encoding="utf-8")
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            try:
                check_file(path)
            except RecipeError:
                pass
            assert gc.isenabled() is enabled
    finally:
        gc.enable()
