"""The language reference cannot drift from the compiler: its examples compile, and it covers the schema, builtins and stdlib.

Code blocks in docs/language.md (and README.md, if there is one) whose info string starts with
`ralign` are compiled:

- ```ralign                 a complete file: it must check (and, if it has a recipe block, lower
                            into a plan). Libraries (no recipe block) are checked as libraries.
- ```ralign fragment        a piece of a recipe, wrapped into a minimal one (below); it must compile.
- ```ralign error           a complete file that must fail, and
- ```ralign fragment error  a fragment that must fail; the first line of either is a comment
                            `# error: [LINE:COL] TEXT`: some diagnostic contains TEXT
                            (case-insensitive) and, when given, sits at LINE:COL of the snippet
                            (line 1 is the comment itself).

Every attribute table (the `| ... |` table after a `<!-- attributes: KIND -->` marker) must list
exactly the attributes schema.py gives KIND, each with its type word, range, choices and default
as schema.py has them; every builtin's signature, every stdlib export, every step's template
variables, every built-in model and dataset and every CLI command must appear too.

Every snippet is written as `example.ralign` in a fresh folder that also holds FIXTURES (a reward
library, a prompts file and a template file that examples may import or read).

How a fragment is wrapped. A fragment whose first word (after comments) is a step kind is a *step
fragment*: it goes at the end of `phase example { ... }`, after the PRELUDE steps its first step
needs (prompts for dedupe/filter/sample, responses for revise/rank/score, a `total` score for
pairs/train, and pairs for train dpo). Anything else is a *declaration fragment*, kept at the top of
the file. Either way the file then gets whatever of WRAPPER the fragment does not declare itself: a
recipe block, `model policy`, `dataset seeds`, `import "std/hhh"`, `import "std/templates" as tpl`
and `import "std/principles"`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ralign import schema as sc
from ralign.cli import build_parser
from ralign.compile import check_file
from ralign.errors import RalignError, RecipeError
from ralign.lower import lower
from ralign.rewards.builtins import BUILTINS, signature
from ralign.source import Source
from ralign.syntax import parse

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "language.md"
README = ROOT / "README.md"
STDLIB = ROOT / "stdlib"

FIXTURES = {
    "lib/house.ralign": (
        "let greeting = /^(hi|hello|hey)\\b/i\n"
        "def rambles(text, limit) = words(text) > limit\n"
        "reward rules {\n"
        "  rule no_greeting = -0.2 when matches(response, greeting)\n"
        "  rule stay_short  = -0.5 when rambles(response, 250)\n"
        "}\n"
    ),
    "data/prompts.jsonl": '{"instruction": "How do I boil an egg?"}\n{"instruction": "Name three rivers."}\n',
    "templates/judge.j2": "Request: {{ prompt }}\n{% for r in responses %}{{ labels[loop.index0] }}: {{ r }}\n{% endfor %}Best:",
}

WRAPPER = (
    (r'^\s*recipe\s+"', 'recipe "example" {}'),
    (r"^\s*model\s+policy\b", 'model policy { path = "ralign:smollm2-135m" }'),
    (r"^\s*dataset\s+seeds\b", 'dataset seeds { path = "ralign:seeds/hhh" }'),
    (r'^\s*import\s+"std/hhh"|\bas\s+hhh\b', 'import "std/hhh"'),
    (r'^\s*import\s+"std/templates"|\bas\s+tpl\b', 'import "std/templates" as tpl'),
    (r'^\s*import\s+"std/principles"|\bas\s+principles\b', 'import "std/principles"'),
)

_GENERATE = "generate { from = seeds, template = tpl.self_instruct }"
_SAMPLE = "sample { per_prompt = 4 }"
_SCORE = "score { total = hhh.rules }"
_PAIRS = "pairs {}"
PRELUDE = {
    "generate": (),
    "dedupe": (_GENERATE,),
    "filter": (_GENERATE,),
    "sample": (_GENERATE,),
    "revise": (_GENERATE, _SAMPLE),
    "rank": (_GENERATE, _SAMPLE),
    "score": (_GENERATE, _SAMPLE),
    "pairs": (_GENERATE, _SAMPLE, _SCORE),
    "train": (_GENERATE, _SAMPLE, _SCORE, _PAIRS),
    "calibrate": (_GENERATE, _SAMPLE, _SCORE, _PAIRS, "train dpo {}"),
}
assert set(PRELUDE) == set(sc.STEP_KINDS), "every step kind needs a prelude"

EXPECT = re.compile(r"^#\s*error:\s*(?:(\d+):(\d+)\s+)?(.+?)\s*$")


# ---- reading the snippets -----------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    doc: str
    line: int  # of the opening fence
    flags: frozenset[str]
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,})\s*(\S.*)?$", lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), (m.group(2) or "").split()
        end = next(
            j
            for j in range(i + 1, len(lines))
            if lines[j].startswith(fence) and not lines[j].strip("`")
        )
        if info and info[0] == "ralign":
            unknown = set(info[1:]) - {"fragment", "error"}
            assert not unknown, f"{path.name}:{i + 1}: unknown snippet flags {unknown}"
            out.append(
                Snippet(path.name, i + 1, frozenset(info[1:]), "\n".join(lines[i + 1 : end]) + "\n")
            )
        i = end + 1
    return out


def all_snippets() -> list[Snippet]:
    return [s for doc in (DOCS, README) if doc.is_file() for s in snippets(doc)]


def wrap(text: str) -> tuple[str, int]:
    """A fragment as a complete recipe, and how many lines come before the fragment's first line."""
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    first = body[0].split()[0] if body else ""
    head: list[str] = []
    if first in PRELUDE:
        head = ["phase example {", *("  " + s for s in PRELUDE[first])]
        text = text + "}\n"
    tail = [decl for pattern, decl in WRAPPER if not re.search(pattern, text, re.M)]
    return "\n".join(head + [text.rstrip("\n")] + tail) + "\n", len(head)


def build(tmp: Path, snippet: Snippet) -> tuple[Path, int]:
    for rel, content in FIXTURES.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(content, encoding="utf-8")
    text, offset = wrap(snippet.text) if "fragment" in snippet.flags else (snippet.text, 0)
    path = tmp / "example.ralign"
    path.write_text(text, encoding="utf-8")
    return path, offset


def compile_snippet(path: Path) -> None:
    checked = check_file(path)
    if checked.recipe:
        lower(checked)


# ---- the examples compile (or fail as they say) ------------------------------------

SNIPPETS = all_snippets()


def test_docs_have_examples() -> None:
    flags = {s.flags for s in SNIPPETS}
    assert {
        frozenset(),
        frozenset({"fragment"}),
        frozenset({"error"}),
        frozenset({"fragment", "error"}),
    } <= flags


@pytest.mark.parametrize(
    "snippet", [s for s in SNIPPETS if "error" not in s.flags], ids=lambda s: s.id
)
def test_example_compiles(snippet: Snippet, tmp_path: Path) -> None:
    path, _ = build(tmp_path, snippet)
    try:
        compile_snippet(path)
    except RalignError as exc:
        pytest.fail(
            f"{snippet.id}: the example does not compile:\n{exc}\n--- compiled text ---\n{path.read_text()}"
        )


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if "error" in s.flags], ids=lambda s: s.id)
def test_error_example_fails_as_documented(snippet: Snippet, tmp_path: Path) -> None:
    m = EXPECT.match(snippet.text.splitlines()[0])
    assert m, f"{snippet.id}: an error example starts with `# error: [LINE:COL] TEXT`"
    line, col, want = m.group(1), m.group(2), m.group(3)
    path, offset = build(tmp_path, snippet)
    with pytest.raises(RecipeError) as info:
        compile_snippet(path)
    found = [
        d
        for d in info.value.diagnostics
        if want.lower() in d.message.lower()
        and (
            line is None
            or (
                d.span.file == path.name
                and (d.span.line, d.span.column) == (int(line) + offset, int(col))
            )
        )
    ]
    assert found, (
        f"{snippet.id}: expected a diagnostic at {line}:{col} containing {want!r}, got:\n{info.value}"
    )


# ---- the reference covers the compiler -----------------------------------------------

TEXT = DOCS.read_text(encoding="utf-8")


def section(title_pattern: str, level: int) -> str:
    """The text under the first heading of `level` matching `title_pattern`, up to the next heading of that level or higher."""
    hashes = "#" * level
    m = re.search(rf"^{hashes} {title_pattern}.*$", TEXT, re.M)
    assert m, f"docs/language.md has no heading {hashes} {title_pattern}"
    nxt = re.compile(rf"^#{{1,{level}}} ", re.M).search(TEXT, m.end())
    return TEXT[m.end() : nxt.start() if nxt else len(TEXT)]


def attribute_table(kind: str) -> dict[str, list[str]]:
    """The rows of the table after `<!-- attributes: KIND -->`: attribute name -> its cells."""
    m = re.search(rf"^<!-- attributes: {re.escape(kind)} -->\n((?:\|.*\n)+)", TEXT, re.M)
    assert m, (
        f"docs/language.md has no attribute table for {kind!r} (marker `<!-- attributes: {kind} -->`)"
    )
    rows = [ln for ln in m.group(1).splitlines()[2:]]  # skip the header and the |---| line
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        assert name not in out, f"{kind}: attribute {name} listed twice"
        out[name] = cells
    return out


KINDS = {
    **{k: v.attrs for k, v in sc.DECLS.items()},
    **{k: v.attrs for k, v in sc.STEPS.items() if v.attrs},
    "lora": sc.LORA_ATTRS,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_attribute_table_matches_schema(kind: str) -> None:
    table, attrs = attribute_table(kind), KINDS[kind]
    assert set(table) == set(attrs), (
        f"{kind}: the docs list {sorted(table)}, schema.py has {sorted(attrs)}"
    )
    for name, spec in attrs.items():
        _, typ, default, *_ = table[name]
        documented = parse_default(default)
        if spec.required:
            assert documented == "required", f"{kind}.{name} is required; the docs say {default!r}"
        elif spec.default is None:
            assert documented is None, f"{kind}.{name} has no default; the docs say {default!r}"
        else:
            assert same_value(documented, spec.default), (
                f"{kind}.{name}: the default is {spec.default!r}; the docs say {default!r}"
            )
        assert typ.startswith(TYPE_WORDS[spec.type]), (
            f"{kind}.{name}: the type column should start with {TYPE_WORDS[spec.type]!r}, not {typ!r}"
        )
        bounds = range_text(spec)
        assert bounds is None or bounds in typ, (
            f"{kind}.{name}: the type column should give the range {bounds!r}, not {typ!r}"
        )
        listed = set(re.findall(r'"([^"]*)"', typ))
        assert listed == set(spec.choices), (
            f"{kind}.{name}: the choices are {sorted(spec.choices)}; the type column lists {sorted(listed)}"
        )


# How the type column of an attribute table starts, per schema kind.
TYPE_WORDS = {
    sc.INT: "int",
    sc.NUMBER: "number",
    sc.STRING: "string",
    sc.BOOL: "bool",
    sc.MODEL: "model name",
    sc.DATASET: "dataset name",
    sc.TEMPLATE: "template",
    sc.TEXTS: "list of strings",
    sc.PATHS: "string or list of strings",
    sc.STRINGS: "string or list of strings",
    sc.DATA: "dataset name or string",
    sc.EXPR_BOOL: "bool expression",
    sc.EXPR_NUMBER: "number expression",
    sc.LORA: "map",
}


def range_text(spec: sc.Attr) -> str | None:
    """How the docs write an attribute's bounds: `1 to 64`, `≥ 1`, `> 0`, `> 0 and ≤ 1`."""
    lo, hi = (
        None if x is None else (str(int(x)) if float(x).is_integer() else repr(x))
        for x in (spec.min, spec.max)
    )
    if lo is None:
        return None if hi is None else f"≤ {hi}"
    if hi is None:
        return f"> {lo}" if spec.min_open else f"≥ {lo}"
    return f"> {lo} and ≤ {hi}" if spec.min_open else f"{lo} to {hi}"


def parse_default(cell: str) -> object:
    """A default cell: `required`, `—` (none), or one value: `"text"`, `true`/`false`, a number or a bare name."""
    text = cell.strip().strip("`").strip()
    if text == "required":
        return "required"
    if text in ("—", "-", ""):
        return None
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("["):
        return json.loads(text)
    try:
        return float(text)
    except ValueError:
        return text


def same_value(documented: object, default: object) -> bool:
    if isinstance(default, bool) or isinstance(documented, bool):
        return documented is default
    if isinstance(default, int | float):
        return isinstance(documented, float) and documented == float(default)
    return documented == default


def test_parse_default_and_range_text() -> None:
    assert parse_default("`1e-5`") == 1e-5 and same_value(parse_default("`1e-5`"), 1e-05)
    assert parse_default('`"auto"`') == "auto" and parse_default("`policy`") == "policy"
    assert parse_default('`["all-linear"]`') == ["all-linear"]
    assert parse_default("`false`") is False and not same_value(parse_default("`0`"), False)
    assert parse_default("required") == "required" and parse_default("—") is None
    assert range_text(sc.Attr(sc.NUMBER, "", min=0, max=1, min_open=True)) == "> 0 and ≤ 1"
    assert (
        range_text(sc.Attr(sc.INT, "", min=1)) == "≥ 1"
        and range_text(sc.Attr(sc.STRING, "")) is None
    )


@pytest.mark.parametrize("kind", sorted(sc.STEPS))
def test_every_step_kind_has_a_section(kind: str) -> None:
    text = section(rf"`{re.escape(kind)}`", 3)
    spec = sc.STEPS[kind]
    provided = {v for vs in spec.template_vars.values() for v in vs} | (
        set(sc.POINTWISE_VARS) if kind == "rank" else set()
    )
    for var in provided:
        assert f"`{var}`" in text, f"the {kind} section does not name the template variable `{var}`"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_is_documented_with_its_signature(name: str) -> None:
    builtins = section("Builtins", 2)
    assert f"`{signature(BUILTINS[name])}`" in builtins, (
        f"the Builtins section lacks `{signature(BUILTINS[name])}`"
    )


def stdlib_exports() -> list[tuple[str, str]]:
    out = []
    for file in sorted(STDLIB.glob("*.ralign")):
        module = parse(Source.read(file, "std/" + file.stem))
        out += [
            (f"std/{file.stem}", d.name)
            for d in module.decls
            if hasattr(d, "name") and type(d).__name__ != "Recipe"
        ]
    return out


@pytest.mark.parametrize(("module", "name"), stdlib_exports(), ids=lambda x: x)
def test_every_stdlib_export_is_documented(module: str, name: str) -> None:
    text = section(rf"`{re.escape(module)}`", 3)
    assert f"`{name}`" in text or f"`{name}(" in text, (
        f"the {module} section does not list `{name}`"
    )


def test_builtin_models_datasets_and_cli_commands_are_documented() -> None:
    for name in (*sc.BUILTIN_MODELS, *sc.BUILTIN_DATASETS):
        assert f"ralign:{name}" in TEXT, f"ralign:{name} is not mentioned"
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    cli = section("The command line", 2)
    for command in sub.choices:
        assert f"ralign {command}" in cli, f"`ralign {command}` is not documented"


def test_fragment_wrapping() -> None:
    text, offset = wrap("# a comment\nrank quality { template = tpl.rank_listwise }\n")
    assert (
        offset == 3
        and text.startswith("phase example {\n  generate")
        and 'import "std/templates" as tpl' in text
    )
    text, offset = wrap('import "std/templates" as t\nmodel policy { path = "x" }\n')
    assert offset == 0 and "as tpl" not in text and text.count("model policy") == 1
