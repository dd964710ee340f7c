"""Fuzzing the front end: whatever the text, compiling returns a Plan or raises RalignError, nothing else.

Five sources of input, about 1,100 per run (`RALIGN_FUZZ=10000 pytest tests/test_fuzz.py` for the
nightly 10,000): well-typed recipes generated from the grammar's shapes (these must compile, twice
to the same hash, and their programs must evaluate to finite numbers), loosely shaped recipes that
are often wrong, mutations of the shipped recipes and libraries, arbitrary text and bytes, and
attacks: reward programs and templates built to exhaust memory or time, which must end within two
seconds, with a value or a ralign error. Each input gets one second (attacks two).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from functools import cache
from pathlib import Path

import pytest
from conftest import agree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralign.compile import check_file, compile_file
from ralign.errors import RalignError, RecipeError
from ralign.imports import stdlib_dir
from ralign.plan import Plan
from ralign.rewards.interpreter import Programs
from ralign.schema import STEP_KINDS, STEPS

REPO = Path(__file__).resolve().parents[1]
# Examples per run of each property: about 1,100 inputs in all, or RALIGN_FUZZ in the same shares.
TOTAL = int(os.environ.get("RALIGN_FUZZ", "1100"))
N_VALID, N_LOOSE, N_MUTATED, N_ARBITRARY, N_ATTACK = (
    max(1, TOTAL * share // 1100) for share in (200, 250, 250, 250, 150)
)
FUZZ = settings(
    deadline=1000,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/ (data, templates, lib) beside which each input is written."""
    folder = tmp_path_factory.mktemp("fuzz") / "recipes"
    shutil.copytree(REPO / "recipes", folder)
    for recipe in folder.glob(
        "*.ralign"
    ):  # build the parser and warm the caches outside the deadline
        compile_file(recipe)
    return folder


def attempt(path: Path, text: str | bytes) -> Plan | None:
    """Write `text`, compile and check it; only RalignError may escape the compiler, and it must render."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    lines = (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).count("\n") + 1
    plan = None
    for step in (compile_file, check_file):
        try:
            result = step(path)
        except RecipeError as exc:
            assert exc.diagnostics
            rendered = str(exc)
            for d in exc.diagnostics:
                assert str(d.span) in rendered
                if d.span.file == path.name:  # diagnostics point into the file
                    assert 1 <= d.span.line <= lines + 1, (d.span, lines)
                    assert d.span.column >= 1
            continue
        except RalignError as exc:
            str(exc)
            continue
        if step is compile_file:
            assert isinstance(result, Plan)
            plan = result
    return plan


# ---- (a) well-typed recipes: they must compile, hash stably, and evaluate --------------------

NAME = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


def number_literal() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(0, 1000).map(str),
        st.floats(0, 100, allow_nan=False, allow_infinity=False).map(lambda x: f"{x:.4f}"),
        st.sampled_from(["5e-6", "1e3", ".5", "2.", "0.0", "1E+2"]),
    )


def string_literal() -> st.SearchStrategy[str]:
    """A "..." literal whose body uses every escape the language has."""

    def encode(chars: list[str]) -> str:
        out = []
        for c in chars:
            out.append(
                {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "/": "\\/"}.get(
                    c, c
                )
            )
        return '"' + "".join(out) + '"'

    plain = st.lists(
        st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(list('"\\\n\t\r/')),
        max_size=12,
    ).map(encode)
    unicode = st.integers(0x20, 0xD7FF).map(lambda c: f'"x\\u{c:04x}y"')
    return plain | unicode


REGEXES = [
    r"\bthe\b",
    r"[A-Z]{3,}",
    r"(yes|no)",
    r"\d+",
    r"^(hi|hello)\b",
    r"[.!?]\s*$",
    r"https?:\/\/\S+",
    r"\p{Greek}+",
    r"[}+]",
    r"a.b",
]


def regex_literal() -> st.SearchStrategy[str]:
    atoms = st.sampled_from(REGEXES) | st.from_regex(r"[a-z]{1,6}", fullmatch=True)
    body = st.lists(atoms, min_size=1, max_size=3).map("".join) | st.lists(
        atoms, min_size=2, max_size=3
    ).map(lambda xs: "(" + "|".join(xs) + ")")
    return st.builds(
        lambda b, f: f"/{b}/{f}", body, st.sampled_from(["", "i", "m", "s", "im", "is", "ims"])
    )


@cache
def text_expr(scope: tuple[str, ...], depth: int) -> st.SearchStrategy[str]:
    leaves = string_literal() | (st.sampled_from(scope) if scope else st.nothing())
    if depth <= 0:
        return leaves
    sub = text_expr(scope, depth - 1)
    return (
        leaves
        | st.builds(lambda f, t: f"{f}({t})", st.sampled_from(["lower", "upper", "trim"]), sub)
        | st.builds(lambda a, b: f"{a} + {b}", sub, sub)
    )


@cache
def num_expr(scope: tuple[str, ...], nums: tuple[str, ...], depth: int) -> st.SearchStrategy[str]:
    text = text_expr(scope, 1)
    leaves = number_literal() | (st.sampled_from(nums) if nums else st.nothing())
    counts = st.builds(
        lambda f, t: f"{f}({t})", st.sampled_from(["words", "chars", "lines", "sentences"]), text
    )
    if depth <= 0:
        return leaves | counts
    sub = num_expr(scope, nums, depth - 1)
    cond = bool_expr(scope, nums, depth - 1)
    return st.one_of(
        leaves,
        counts,
        st.builds(
            lambda a, op, b: f"{a} {op} {b}", sub, st.sampled_from(["+", "-", "*", "/"]), sub
        ),
        st.builds(lambda a: f"-{a}", sub),
        st.builds(lambda a: f"({a})", sub),
        st.builds(lambda f, a: f"{f}({a})", st.sampled_from(["abs", "sqrt", "log", "exp"]), sub),
        st.builds(
            lambda f, xs: f"{f}({', '.join(xs)})",
            st.sampled_from(["min", "max"]),
            st.lists(sub, min_size=1, max_size=3),
        ),
        st.builds(lambda a, b, c: f"clamp({a}, {b}, {c})", sub, sub, sub),
        st.builds(lambda c, a, b: f"if({c}, {a}, {b})", cond, sub, sub),
        st.builds(lambda t, r: f"count({t}, {r})", text, regex_literal()),
        st.builds(lambda a, b: f"overlap({a}, {b})", text, text),
        st.builds(lambda xs: f"len([{', '.join(xs)}])", st.lists(string_literal(), max_size=3)),
    )


@cache
def bool_expr(scope: tuple[str, ...], nums: tuple[str, ...], depth: int) -> st.SearchStrategy[str]:
    text = text_expr(scope, 1)
    num = num_expr(scope, nums, max(depth - 1, 0))
    leaves = st.one_of(
        st.sampled_from(["true", "false"]),
        st.builds(
            lambda a, op, b: f"{a} {op} {b}",
            num,
            st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
            num,
        ),
        st.builds(
            lambda f, t, s: f"{f}({t}, {s})",
            st.sampled_from(["contains", "starts_with", "ends_with"]),
            text,
            string_literal(),
        ),
        st.builds(lambda t, r: f"matches({t}, {r})", text, regex_literal()),
        st.builds(lambda t, n: f"repeats({t}, {n})", text, st.integers(1, 4)),
        st.builds(
            lambda t, xs: f"contains_any({t}, [{', '.join(xs)}])",
            text,
            st.lists(string_literal(), min_size=1, max_size=3),
        ),
        st.builds(lambda a, b: f"{a} == {b}", text, text),
    )
    if depth <= 0:
        return leaves
    sub = bool_expr(scope, nums, depth - 1)
    return st.one_of(
        leaves,
        st.builds(lambda a: f"not {a}", sub),
        st.builds(lambda a, op, b: f"({a}) {op} ({b})", sub, st.sampled_from(["and", "or"]), sub),
    )


LISTWISE = '"{{ prompt }} {% for r in responses %}{{ labels[loop.index0] }}: {{ r }} {% endfor %}"'
POINTWISE = '"""Rate 0-{{ scale }}.\nRequest: {{ prompt }}\nAnswer: {{ response }}\nScore:"""'


@st.composite
def valid_recipe(draw: st.DrawFn) -> str:
    out = [
        f'recipe "{draw(NAME)}" {{ rounds = {draw(st.integers(1, 4))}, seed = {draw(st.integers(0, 2**31))} }}'
    ]
    use_hhh = draw(st.booleans())
    if use_hhh:
        out.append('import "std/hhh"')
    lora = draw(
        st.sampled_from(
            ["", ", lora = { rank = 4, alpha = 8, dropout = 0.0 }", ", lora = { rank = 16 }"]
        )
    )
    out.append(
        f'model policy {{ path = "ralign:smollm2-135m", dtype = "{draw(st.sampled_from(["auto", "float32", "bfloat16"]))}"{lora} }}'
    )
    out.append(
        f'dataset seeds {{ path = "{draw(st.sampled_from(["ralign:seeds/hhh", "data/seed_prompts.jsonl"]))}", limit = {draw(st.integers(1, 50))} }}'
    )
    # constants, detectors and rewards, each reading only what came before it
    nums: list[str] = []
    for i in range(draw(st.integers(0, 2))):
        out.append(f"let n{i} = {draw(num_expr((), tuple(nums), 1))}")
        nums.append(f"n{i}")
    out.append(f"let rx = {draw(regex_literal())}")
    out.append(f"def d0(t) = {draw(bool_expr(('t',), tuple(nums), 1))} or matches(t, rx)")
    out.append(f"def d1(t, k) = if(d0(t), k, {draw(num_expr(('t',), tuple(nums), 1))})")
    rewards = ["hhh.rules"] if use_hhh else []
    for i in range(draw(st.integers(1, 2))):
        rules = []
        for j in range(draw(st.integers(1, 3))):
            value = draw(
                num_expr(("prompt", "response"), tuple(nums + rewards), 2)
                | st.just("d1(response, 1)")
            )
            when = draw(
                st.none()
                | bool_expr(("prompt", "response"), tuple(nums), 1)
                | st.just("d0(prompt)")
            )
            rules.append(f"  rule q{j} = {value}" + (f" when {when}" if when else ""))
        out.append(f"reward w{i} {{\n" + "\n".join(rules) + "\n}")
        rewards.append(f"w{i}")
    # the phases
    generate = draw(st.booleans())
    steps = []
    if generate:
        steps.append(
            f'generate {{ from = seeds, template = "{{% for e in examples %}}- {{{{ e }}}}\\n{{% endfor %}}- ", count = {draw(st.integers(1, 300))}, shots = {draw(st.integers(0, 8))} }}'
        )
        if draw(st.booleans()):
            steps.append(f"dedupe {{ max_similarity = {draw(st.floats(0, 1)):.3f} }}")
        if draw(st.booleans()):
            steps.append(f"filter {{ keep = {draw(bool_expr(('prompt',), tuple(nums), 2))} }}")
    context = draw(st.booleans())
    sample = [] if generate else ["from = seeds"]
    sample.append(
        f"per_prompt = {draw(st.integers(1, 64))}, temperature = {draw(st.floats(0, 10)):.2f}, top_p = {draw(st.floats(0.01, 1)):.2f}"
    )
    if context:
        sample.append('context = "Be helpful. {{ prompt }}"')
    steps.append("sample { " + ", ".join(sample) + " }")
    revised = draw(st.booleans())
    if revised:
        steps.append(
            'revise { template = "{{ prompt }} {{ response }} {{ principle }}", principles = ["be kind", "be brief"], times = 2 }'
        )
    ranks = []
    for i in range(draw(st.integers(0, 2))):
        mode = draw(st.sampled_from(["listwise", "pairwise", "pointwise"]))
        steps.append(
            f'rank k{i} {{ judge = policy, template = {POINTWISE if mode == "pointwise" else LISTWISE}, mode = "{mode}", orders = {draw(st.integers(1, 3))} }}'
        )
        ranks.append(f"k{i}")
    if ranks or draw(st.booleans()):
        total = draw(num_expr(("prompt", "response"), tuple(nums + rewards + ranks), 2))
        steps.append(f"score {{ total = {total} + {' + '.join(rewards)} }}")
    scored = bool(ranks) or any(s.startswith("score") for s in steps)
    trains = []
    if scored and draw(st.booleans()):
        trains.append(
            f'train sft {{ on = "best", drop_context = {str(context).lower()}, lr = 1e-4 }}'
        )
    elif revised and draw(st.booleans()):
        trains.append('train sft { on = "revised" }')
    elif draw(st.booleans()):
        trains.append('train sft { on = "all" }')
    if scored and (not trains or draw(st.booleans())):
        trains.append(
            f'pairs {{ chosen = "best", rejected = "{draw(st.sampled_from(["worst", "random"]))}", min_margin = 0.1 }}'
        )
        trains.append(
            f'train dpo {{ beta = {draw(st.floats(0.01, 1)):.2f}, reference = "{draw(st.sampled_from(["round_start", "base"]))}" }}'
        )
    if not trains:
        trains.append('train sft { on = "all" }')
    split = draw(st.integers(0, len(steps)))  # phases only group steps: the flow runs across them
    if split:
        out.append("phase one {\n  " + "\n  ".join(steps[:split]) + "\n}")
    out.append("phase two {\n  " + "\n  ".join(steps[split:] + trains) + "\n}")
    if draw(st.booleans()):
        out.append(
            f'evaluate hhh {{ data = "ralign:evals/hhh-mini", every = "{draw(st.sampled_from(["round", "end"]))}" }}'
        )
    return "\n".join(line for line in out if line) + "\n"


RECORDS = [
    {"prompt": "", "response": ""},
    {
        "prompt": "How do I bake bread?",
        "response": "Mix flour, water and yeast.\n1. Knead\n2. Bake at 220C.",
    },
    {"prompt": "HELLO!!! αβγ", "response": "no no no no no no no no"},
]


@settings(FUZZ, max_examples=N_VALID)
@given(text=valid_recipe())
def test_valid_recipes_compile_and_evaluate(text: str, workdir: Path) -> None:
    path = workdir / "generated.ralign"
    plan = attempt(path, text)
    assert plan is not None, f"a well-typed recipe failed to compile:\n{text}\n{_error(path)}"
    assert compile_file(path).hash == plan.hash
    programs = Programs(plan.programs)
    for qname in plan.programs.rewards:
        for rec in RECORDS:
            assert math.isfinite(programs.reward_value(qname, dict(rec)))
    for step in plan.steps:
        if step.round != 1:
            continue
        records = [dict(r, **{k: 0.5 * i for k in ("k0", "k1")}) for i, r in enumerate(RECORDS)]
        if step.kind == "score":
            scored = programs.score(step.exprs["total"], records)
            assert all(math.isfinite(v) for v in scored.values)
        if step.kind == "filter":
            assert len(programs.holds(step.exprs["keep"], records)) == len(records)


def _error(path: Path) -> str:
    try:
        compile_file(path)
    except RalignError as exc:
        return str(exc)
    return ""


# ---- (a') loosely shaped recipes: often wrong, never a crash ---------------------------------

KEYWORDS = [
    "recipe",
    "import",
    "as",
    "model",
    "dataset",
    "template",
    "let",
    "def",
    "reward",
    "rule",
    "when",
    "phase",
    "evaluate",
    "and",
    "or",
    "not",
    "true",
    "false",
    "file",
]
# Every word a phase step starts with, the declaration-only kind (`evaluate`), and two typos.
KINDS = [
    *STEP_KINDS,
    *(name for name, kind in STEPS.items() if not kind.in_phase),
    "trian",
    "sampel",
]
ATTRS = [
    "from",
    "template",
    "count",
    "shots",
    "temperature",
    "top_p",
    "per_prompt",
    "context",
    "principles",
    "times",
    "judge",
    "mode",
    "orders",
    "samples",
    "scale",
    "total",
    "keep",
    "chosen",
    "rejected",
    "min_margin",
    "by",
    "on",
    "drop_context",
    "lr",
    "epochs",
    "batch_size",
    "beta",
    "reference",
    "rounds",
    "seed",
    "path",
    "dtype",
    "lora",
    "rank",
    "alpha",
    "field",
    "limit",
    "data",
    "every",
    "task",
    "max_similarity",
    "method",
]
LOOSE_NAME = (
    st.sampled_from(
        [
            "policy",
            "seeds",
            "prompt",
            "response",
            "hhh",
            "tpl",
            "words",
            "matches",
            "agree",
            "if",
            "quality",
            "total",
            "x",
            "rx",
            *KEYWORDS,
        ]
    )
    | NAME
)

loose_expr = st.recursive(
    st.one_of(
        number_literal(),
        string_literal(),
        regex_literal(),
        st.sampled_from(
            [
                "true",
                "false",
                '"""{{ prompt }} {{ responses }}"""',
                'file("templates/principles.j2")',
                'file("../x")',
                "-1",
                "1e999",
                '"\\ud800"',
                "/(a)\\1/",
                "/[/",
            ]
        ),
        LOOSE_NAME,
        st.builds(lambda a, b: f"{a}.{b}", LOOSE_NAME, LOOSE_NAME),
    ),
    lambda sub: st.one_of(
        st.builds(
            lambda a, op, b: f"{a} {op} {b}",
            sub,
            st.sampled_from(["+", "-", "*", "/", "<", ">=", "==", "!=", "and", "or"]),
            sub,
        ),
        st.builds(lambda a: f"not {a}", sub),
        st.builds(lambda a: f"-{a}", sub),
        st.builds(lambda a: f"({a})", sub),
        st.builds(lambda f, xs: f"{f}({', '.join(xs)})", LOOSE_NAME, st.lists(sub, max_size=3)),
        st.lists(sub, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(ATTRS), sub), max_size=2).map(
            lambda kv: "{ " + ", ".join(f"{k} = {v}" for k, v in kv) + " }"
        ),
    ),
    max_leaves=12,
)
attrs = st.lists(st.tuples(st.sampled_from(ATTRS) | NAME, loose_expr), max_size=4).map(
    lambda kv: "{ " + ", ".join(f"{k} = {v}" for k, v in kv) + " }"
)
step = st.builds(
    lambda k, n, a: f"{k} {n} {a}" if n else f"{k} {a}",
    st.sampled_from(KINDS),
    st.none() | st.sampled_from(["sft", "dpo", "quality", "x"]),
    attrs,
)
declaration = st.one_of(
    st.builds(lambda a: f'recipe "r" {a}', attrs),
    st.builds(
        lambda p, a: f'import "{p}"' + (f" as {a}" if a else ""),
        st.sampled_from(
            [
                "std/hhh",
                "std/templates",
                "std/principles",
                "std/hh",
                "./lib/house_rules.ralign",
                "./generated.ralign",
                "../x.ralign",
                "./data/seed_prompts.jsonl",
                "std/../hhh",
            ]
        ),
        st.none() | NAME,
    ),
    st.builds(lambda n, a: f"model {n} {a}", LOOSE_NAME, attrs),
    st.builds(lambda n, a: f"dataset {n} {a}", LOOSE_NAME, attrs),
    st.builds(lambda n, e: f"template {n} = {e}", LOOSE_NAME, loose_expr),
    st.builds(lambda n, e: f"let {n} = {e}", LOOSE_NAME, loose_expr),
    st.builds(
        lambda n, ps, e: f"def {n}({', '.join(ps)}) = {e}",
        LOOSE_NAME,
        st.lists(LOOSE_NAME, max_size=3),
        loose_expr,
    ),
    st.builds(
        lambda n, rs: f"reward {n} {{ {' '.join(rs)} }}",
        LOOSE_NAME,
        st.lists(
            st.builds(
                lambda n, e, w: f"rule {n} = {e}" + (f" when {w}" if w else ""),
                LOOSE_NAME,
                loose_expr,
                st.none() | loose_expr,
            ),
            max_size=3,
        ),
    ),
    st.builds(
        lambda n, ss: f"phase {n} {{\n  " + "\n  ".join(ss) + "\n}",
        LOOSE_NAME,
        st.lists(step, max_size=5),
    ),
    st.builds(lambda n, a: f"evaluate {n} {a}", LOOSE_NAME, attrs),
)
HEADER = 'recipe "loose" { rounds = 2 }\nmodel policy { path = "ralign:smollm2-135m" }\ndataset seeds { path = "ralign:seeds/hhh" }\n'


@settings(FUZZ, max_examples=N_LOOSE)
@given(decls=st.lists(declaration, min_size=1, max_size=6), header=st.booleans())
def test_loose_recipes_never_crash(decls: list[str], header: bool, workdir: Path) -> None:
    attempt(workdir / "generated.ralign", (HEADER if header else "") + "\n".join(decls) + "\n")


# ---- (b) mutations of real recipes and libraries ---------------------------------------------


def _seeds() -> list[tuple[str, str]]:
    files = sorted((REPO / "recipes").glob("*.ralign")) + [
        REPO / "recipes" / "lib" / "house_rules.ralign"
    ]
    cases = Path(__file__).parent / "cases"
    files += sorted(stdlib_dir().glob("*.ralign")) + sorted(
        (cases / "spec_recipes").glob("*.ralign")
    )
    files += sorted((cases / "spec_errors").glob("*.ralign"))
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


SEEDS = _seeds()
TOKENS = [
    *KEYWORDS,
    *KINDS,
    *ATTRS,
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "=",
    ",",
    ".",
    '"',
    '"""',
    "/",
    "#",
    "\\",
    "\n",
    "0",
    "-1",
    "1e999",
    "3.5",
    '"x"',
    "/x/",
    "/(a)\\1/",
    "policy",
    "seeds",
    "hhh",
    "tpl",
    "{{",
    "}}",
    "{%",
    "%}",
    "prompt.__class__",
    "é",
    "\x00",
    "\ufeff",
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    _, text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        op = draw(
            st.sampled_from(
                [
                    "delete-line",
                    "duplicate-line",
                    "swap-lines",
                    "delete-chars",
                    "insert",
                    "replace-token",
                ]
            )
        )
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if op == "delete-line":
            del lines[i]
        elif op == "duplicate-line":
            lines.insert(i, lines[i])
        elif op == "swap-lines":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
        if op == "delete-chars" and text:
            at = draw(st.integers(0, len(text) - 1))
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        elif op == "insert":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(TOKENS) | st.text(max_size=3)) + text[at:]
        elif op == "replace-token":
            spots = list(re.finditer(r"\w+|[^\w\s]", text))
            if spots:
                m = spots[draw(st.integers(0, len(spots) - 1))]
                text = text[: m.start()] + draw(st.sampled_from(TOKENS)) + text[m.end() :]
    return text


@settings(FUZZ, max_examples=N_MUTATED)
@given(text=mutated())
def test_mutated_recipes_never_crash(text: str, workdir: Path) -> None:
    attempt(workdir / "mutant.ralign", text)


@settings(FUZZ, max_examples=N_MUTATED)
@given(
    text=mutated()
    | st.lists(declaration, min_size=1, max_size=6).map(lambda ds: HEADER + "\n".join(ds))
)
def test_the_fast_parser_agrees_with_lark(text: str) -> None:
    # ralign.syntax drives Lark's tables itself; whatever it accepts, Lark builds the same nodes.
    agree(text)


# ---- (c) arbitrary text and bytes -----------------------------------------------------------

SYNTAX = st.sampled_from(
    list('{}[]()="/\\#,.<>=!+-*\n\t ')
    + ["recipe", "rule", "when", "phase", "let", '"""', "/a/i", "1e5"]
)


@settings(FUZZ, max_examples=N_ARBITRARY)
@given(
    data=st.one_of(
        st.text(max_size=200),
        st.lists(SYNTAX | st.text(max_size=2), max_size=60).map("".join),
        st.binary(max_size=100),
    )
)
def test_arbitrary_input_never_crashes(data: str | bytes, workdir: Path) -> None:
    attempt(workdir / "arbitrary.ralign", data)


# ---- (d) attacks on memory and time ---------------------------------------------------------

GROW = st.sampled_from(
    ["{x} + {x}", "lower({x}) + upper({x})", "trim({x} + {x})", 'if(words({x}) > 1, {x} + {x}, "")']
)


@st.composite
def exhausting_reward(draw: st.DrawFn) -> str:
    """A library whose reward doubles a text through lets or nested defs, or feeds builtins
    numbers that overflow, many times over."""
    depth = draw(st.integers(1, 60))
    shape = draw(st.sampled_from(["lets", "defs", "numbers", "calls"]))
    if shape == "lets":
        grow = draw(GROW)
        body = 'let t0 = "ab"\n' + "".join(
            f"let t{i} = {grow.format(x=f't{i - 1}')}\n" for i in range(1, depth + 1)
        )
        value = f"words(t{depth})"
    elif shape == "defs":
        body = f"def d(x) = {draw(GROW).format(x='x')}\n"
        value = "words(" + "d(" * depth + "response" + ")" * depth + ")"
    elif shape == "numbers":
        big = "exp(700)" + " * exp(700)" * draw(st.integers(0, 3))
        body = ""
        value = draw(
            st.sampled_from(
                [
                    "1 when repeats(response, {b})",
                    "{b} - {b}",
                    "log({b}) * {b}",
                    "sqrt({b}) / ({b} - {b})",
                    "clamp({b}, -{b}, {b})",
                ]
            )
        ).format(b=big)
    else:
        body = ""
        value = "words(" + "lower(upper(" * depth + "response" + "))" * depth + ")"
    return f"{body}reward r {{\n  rule attack = {value}\n}}\n"


TEMPLATE_ATTACKS = st.sampled_from(
    [
        "{% for i in range(N) %}{{ prompt }}{% endfor %}",
        "{{ prompt * N }}",
        "{{ (prompt ~ prompt) * N }}",
        "{% set s = namespace(t=prompt) %}{% for i in range(N) %}{% set s.t = s.t ~ s.t %}{% endfor %}{{ s.t }}",
        "{{ prompt.center(N) }}",
        "{{ (prompt|length) ** N }}",
        "{{ ((prompt|length) * N)|round(-N) }}",
        "{% for a in range(N) %}{% for b in range(N) %}x{% endfor %}{% endfor %}",
        "{{ range(N)|list|join(prompt) }}",
        "{{ prompt|replace('', prompt * 100) }}",
        "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
        "{{ prompt.encode().ljust(N)|length }}",
    ]
)


@settings(FUZZ, max_examples=N_ATTACK, deadline=None)
@given(text=exhausting_reward(), size=st.integers(0, 3000), response=st.text(max_size=40))
def test_exhausting_rewards_end_fast_with_a_value_or_an_error(
    text: str, size: int, response: str, workdir: Path
) -> None:
    from ralign.rewards.interpreter import explain

    path = workdir / "attack.ralign"
    path.write_text(text, encoding="utf-8")
    started = time.perf_counter()
    try:
        report = explain(check_file(path), "r", prompt="p", response=response + " w" * size)
        assert math.isfinite(report["total"])
    except RalignError as exc:
        assert str(exc)
    assert time.perf_counter() - started < 2.0, text[:300]


@settings(FUZZ, max_examples=N_ATTACK, deadline=None)
@given(
    template=TEMPLATE_ATTACKS,
    n=st.sampled_from([10, 10**3, 10**6, 10**9, 10**18]),
    prompt=st.text(max_size=30),
)
def test_exhausting_templates_end_fast_with_text_or_an_error(
    template: str, n: int, prompt: str
) -> None:
    from ralign.templates import render

    started = time.perf_counter()
    try:
        render(template.replace("N", str(n)), {"prompt": prompt})
    except RalignError as exc:
        assert str(exc)
    assert time.perf_counter() - started < 2.0, (template, n)


def test_fuzz_budget_is_at_least_a_thousand() -> None:
    assert N_VALID + N_LOOSE + N_MUTATED + N_ARBITRARY + 2 * N_ATTACK >= 1000
