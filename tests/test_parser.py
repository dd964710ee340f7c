"""The parser: Lark's grammar and tables, a faster driver over them, and tables cached as JSON.

`syntax._fast` drives Lark's own LALR tables and node callbacks with a one-regex lexer, and
hands anything it cannot take to Lark's parser, so every diagnostic stays Lark's. These tests
hold the fast path to Lark on every recipe in the repository and the spec (the fuzz suite does
the same on mutated and generated recipes), and check the cached tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import agree

from ralign import syntax
from ralign.cache import cache_root

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "spec"


def recipe_files() -> list[Path]:
    found = sorted(REPO.glob("**/*.ralign"))
    found = [p for p in found if ".venv" not in p.parts]
    if SPEC.is_dir():
        found += sorted(SPEC.glob("**/*.ralign"))
    return found


def test_there_are_recipes_to_compare() -> None:
    assert len(recipe_files()) >= 60


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: str(p.relative_to(REPO.parent)))
def test_the_fast_path_builds_what_lark_builds(path: Path) -> None:
    agree(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n# only a comment",
        "let a = 1 / 2 / 3",  # division, not a /regex/
        "let a = /x/ \nlet b = words(prompt) / 2",
        "let a = x.y.z\nlet b = f(x, y,)\nlet c = [1, 2,]\nlet d = {a = 1, b = 2}",
        'model m { template = "x", reward = "y", rule = 1 }',  # keywords as attribute names
        "let a = 1\nlet b = a orange",  # `or` glued to a name: an error, as Lark says
        "let a = not not true and false or -1 <= 2",
        'template t = """two\nlines"""\nlet after = 1',
        'let a = "\\u00e9\\n"',
        'let a = "\\q"',  # a bad escape: the node builder's error on both paths
        "let a = 1"
        + " " * 40
        + "\u20ac",  # a blank run then a bad character: no backtracking blow-up
        "let a = 1e999",
        "let a = (((1)))",
        "phase p { generate { count = 3 } dedupe { } }",
    ],
)
def test_the_fast_path_on_edge_cases(text: str) -> None:
    agree(text)


def test_the_grammar_is_strict_lalr() -> None:
    # Strict mode refuses shift/reduce conflicts and colliding terminals; the runtime parser
    # skips this proof (it is a property of the grammar file), so the suite makes it once.
    strict = syntax.parser("lalr", strict=True)
    assert strict.options.strict


def test_tables_are_cached_as_json_and_reloaded(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path))
    built = syntax.parser.__wrapped__("lalr")  # type: ignore[attr-defined]
    files = list(cache_root().glob("grammar-*.json"))
    assert len(files) == 1
    json.loads(files[0].read_text(encoding="utf-8"))  # plain JSON, no pickle
    loaded = syntax.parser.__wrapped__("lalr")  # type: ignore[attr-defined]
    text = (REPO / "recipes" / "quickstart.ralign").read_text(encoding="utf-8")
    syntax._INLINE.file = "q"
    assert syntax._fast(loaded, text, "start") == syntax._fast(built, text, "start")
    assert loaded.parse(text, start="start") == built.parse(text, start="start")


@pytest.mark.parametrize("damage", ["{not json", '{"data": {}, "memo": {}}', "[]"])
def test_a_damaged_cache_entry_is_rebuilt(damage: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path))
    syntax.parser.__wrapped__("lalr")  # type: ignore[attr-defined]
    (entry,) = cache_root().glob("grammar-*.json")
    entry.write_text(damage, encoding="utf-8")
    rebuilt = syntax.parser.__wrapped__("lalr")  # type: ignore[attr-defined]
    syntax._INLINE.file = "q"
    assert rebuilt.parse("let a = 1", start="start")[0].name == "a"
    json.loads(entry.read_text(encoding="utf-8"))["memo"]  # rewritten whole


def test_an_unwritable_cache_costs_time_not_an_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("RALIGN_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    lark = syntax.parser.__wrapped__("lalr")  # type: ignore[attr-defined]
    syntax._INLINE.file = "q"
    assert lark.parse("let a = 1", start="start")[0].name == "a"
