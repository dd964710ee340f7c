"""Recipe templates: variables and their lines, static vetting, the runtime sandbox, limits, rendering."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterable

import pytest

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
