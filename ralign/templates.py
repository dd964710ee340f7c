"""Recipe templates: parse, vet and render untrusted Jinja2 source in a sandbox with resource limits."""

# Limits, in short. Static checks refuse private and denied attributes, the `attr`, `format`
# and `pprint` filters, and includes. At render time Jinja's immutable sandbox guards every
# attribute and call; on top of it, every value a template makes (by an operator, `~`, a
# literal, a filter, a string method or a macro body) must print within `max_chars`, checked
# before the value is built wherever it could be large; the streamed output is capped; and
# loop iterations, calls and filter work draw on one step budget, so no render runs for long.

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

from jinja2 import StrictUndefined, Template, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import Context, LoopContext, Macro, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from ralign.errors import TemplateError, did_you_mean

DEFAULT_MAX_CHARS = 1_000_000
# Work per render, in steps of about one loop iteration each: far above any prompt template's
# needs (a few thousand), low enough that a runaway template stops within a few seconds.
MAX_STEPS = 3_000_000
MAX_MACRO_DEPTH = 100
# Python itself refuses to print integers longer than this (sys.get_int_max_str_digits).
MAX_INT_DIGITS = 4300
# Step costs, measured: a call takes about as long as 30 loop iterations, a macro call 40;
# C-level string work runs about a hundred characters a step, sizing a value one item a step.
_CALL_STEPS = 30
_MACRO_STEPS = 40
_CHARS_PER_STEP = 100
_ITEM_STEPS = 10  # an item of a lazy filter result: a filter or test call made per item

# Attributes no template may read: str.format/format_map reach attributes through format
# fields, `translate`/`expandtabs` multiply a string's size, the rest are interpreter internals.
DENIED_ATTRIBUTES = frozenset(
    {
        "format",
        "format_map",
        "mro",
        "translate",
        "maketrans",
        "expandtabs",
        "func_globals",
        "func_code",
        "func_closure",
        "gi_frame",
        "gi_code",
        "gi_yieldfrom",
        "cr_frame",
        "cr_code",
        "cr_await",
        "ag_frame",
        "ag_code",
        "f_globals",
        "f_locals",
        "f_builtins",
        "f_back",
        "f_code",
        "tb_frame",
        "tb_next",
        "co_code",
        "im_func",
        "im_self",
        "im_class",
    }
)
# `attr` reads any attribute by name, `format` is %-formatting with caller-chosen widths and
# `pprint` indents by nesting depth without bound; `map('attr', ...)` must not find them either.
DENIED_FILTERS = frozenset({"attr", "format", "pprint"})

# Filters that take attribute names (dotted paths): the positional index of that argument.
# Every filter's `attribute=` keyword is checked too.
_ATTRIBUTE_ARGUMENT = {
    "selectattr": 0,
    "rejectattr": 0,
    "groupby": 0,
    "sum": 0,
    "sort": 2,
    "unique": 1,
    "min": 1,
    "max": 1,
    "join": 1,
}
# Filters that name another filter (`map`) or a test: the positional index of that name.
_NAMED_ARGUMENT = {"map": 0, "select": 0, "reject": 0, "selectattr": 1, "rejectattr": 1}
# Filters and str methods whose number arguments set the size of what they build.
_COUNT_FILTERS = frozenset({"center", "batch", "slice"})
_COUNT_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


class _LocatedTemplateError(TemplateError):
    """A template problem with the 1-based line within the template text, when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class TemplateSyntax(_LocatedTemplateError):
    """The template is not valid Jinja (or names an unknown filter or test)."""


class TemplateUnsafe(_LocatedTemplateError):
    """The template uses something templates may not use (private attributes, `attr`, includes)."""


class TemplateTooLarge(_LocatedTemplateError):
    """The template's output, one of its values, or its amount of work passes a limit."""


class TemplateRenderError(_LocatedTemplateError):
    """Rendering failed: an undefined variable, a sandbox refusal, or an error in an expression."""


@dataclass(frozen=True)
class TemplateInfo:
    """A vetted template: its text and the context variables it reads, with first-use lines."""

    text: str
    variables: tuple[tuple[str, int], ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.variables)


# ---------------------------------------------------------------------------------------------
# Sizes.


_CONTAINERS = (list, tuple, dict, set, frozenset)
_SCALARS = (str, int, float, type(None))


def _scalar_size(value: object) -> int:
    if isinstance(value, str):
        return len(value) + 2  # quotes, inside a container
    if isinstance(value, int) and not isinstance(value, bool):
        return _int_digits(value) + 1
    return 5 if isinstance(value, bool) or value is None else 32


def _printed_size(value: object, limit: int) -> tuple[int, int]:
    """Estimate `len(str(value))`, stopping past `limit`; also count the items looked at.

    Each shared container is sized once per call, so a list nested into itself by doubling is
    quick to size however long it prints. Only objects that live inside `value` are memoised
    by id (never the temporary tuples of `dict.items()`, whose ids are reused).
    """
    memo: dict[int, int] = {}
    visited = 0

    def size(value: object) -> int:
        nonlocal visited
        if isinstance(value, Namespace):
            value = object.__getattribute__(value, "_Namespace__attrs")
        if not isinstance(value, _CONTAINERS):
            return _scalar_size(value)
        key = id(value)
        known = memo.get(key)
        if known is not None:
            return known
        visited += len(value)
        total = 2
        items = itertools.chain.from_iterable(value.items()) if isinstance(value, dict) else value
        for item in items:
            kind = type(item)
            # The common items inline: this loop is the hot path of every size check.
            if kind is str:
                total += len(item) + 4
            elif kind is int:
                total += _int_digits(item) + 3
            elif isinstance(item, Undefined):
                str(item)  # a strict undefined raises here, naming what is missing
            else:
                total += size(item) + 2
            if total > limit:
                break
        memo[key] = total
        return total

    return size(value), visited


def _int_digits(n: int) -> int:
    return int(abs(n).bit_length() * 0.30103) + 1


def _work(value: object) -> int:
    """Steps a builtin takes to go over `value` once."""
    if isinstance(value, str):
        return len(value) // _CHARS_PER_STEP
    return len(value) if isinstance(value, _CONTAINERS) else 0


def _replaced_size(text: str, old: str, new: str, count: int) -> int:
    occurrences = text.count(old) if old else len(text) + 1
    if 0 <= count < occurrences:
        occurrences = count
    return len(text) + occurrences * (len(new) - len(old))


# ---------------------------------------------------------------------------------------------
# Per-render limits. The sandbox's hooks find the current render's budget through a context
# variable, so one module-level environment serves every render (and every thread).


class _Budget:
    """Limits and counters of one render; mutable by design, never shared between renders."""

    __slots__ = ("max_chars", "max_steps", "steps_left", "depth")

    def __init__(self, max_chars: int, max_steps: int) -> None:
        self.max_chars = max_chars
        self.max_steps = max_steps
        self.steps_left = max_steps
        self.depth = 0

    def tick(self, steps: int = 1) -> None:
        self.steps_left -= steps
        if self.steps_left < 0:
            raise TemplateTooLarge(
                f"template does too much work (over its budget of {self.max_steps:,} steps; "
                "loop iterations, calls and filters all count)"
            )

    def too_large(self, what: str) -> TemplateTooLarge:
        return TemplateTooLarge(f"{what}, over the {self.max_chars:,}-character limit")

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise self.too_large(what)

    def build(self, size: int, what: str) -> None:
        """Check, and charge for, a string (or list) of `size` characters about to be built."""
        self.check_size(size, what)
        self.tick(size // _CHARS_PER_STEP)

    def size(self, value: object) -> int:
        """About `len(str(value))` inside a container; looking at each item costs a step."""
        size, visited = _printed_size(value, self.max_chars)
        self.tick(visited)
        return size

    def text_size(self, value: object) -> int:
        """About `len(str(value))` on its own, as when joined into text."""
        return len(value) if isinstance(value, str) else self.size(value)

    def check_value(self, value: object, what: str) -> None:
        """Refuse a value whose printed form would pass the limit."""
        if not isinstance(value, _SCALARS) and self.size(value) > self.max_chars:
            raise self.too_large(what)

    def check_count(self, number: object, what: str) -> None:
        """Refuse a number that sets the size of something to build."""
        if isinstance(number, int) and not isinstance(number, bool) and number > self.max_chars:
            raise self.too_large(f"{what} {number:,}")

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """A loop's items, one step each."""
        for item in iterable:
            self.tick()
            yield item

    def metered(self, items: Iterator[Any], what: str) -> Iterator[Any]:
        """A lazily made sequence (`map`, `select`) whose items together must fit the limit."""
        size = 0
        for item in items:
            self.tick(_ITEM_STEPS)
            size += self.text_size(item)
            self.check_size(size, what)
            yield item

    def listed(self, items: Iterable[Any], separator: int, what: str) -> list[Any]:
        """Items about to be joined, listed while their joined size stays within the limit."""
        listed, size = [], 0
        for item in items:
            self.tick()
            size += self.text_size(item) + separator
            self.check_size(size, what)
            listed.append(item)
        return listed


_BUDGET: ContextVar[_Budget | None] = ContextVar("ralign_template_budget", default=None)


def _budget() -> _Budget:
    # Outside a render (Jinja folds constants at compile time) the default limits apply.
    budget = _BUDGET.get()
    return budget if budget is not None else _Budget(DEFAULT_MAX_CHARS, MAX_STEPS)


# ---------------------------------------------------------------------------------------------
# Checks made before an operator, string method or filter builds its result.

_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.", re.S)


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse `*`, `**`, `+` and `%` whose result would pass the limits."""
    if operator == "*":
        if isinstance(left, int) and not isinstance(right, int):
            left, right = right, left
        if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, int):
            size = len(left) if isinstance(left, (str, bytes)) else budget.size(left)
            what = f"template repeats a {type(left).__name__} of size {size:,} {right:,} times"
            budget.build(size * max(right, 0), what)
        elif isinstance(left, int) and isinstance(right, int):
            if _int_digits(left) + _int_digits(right) > MAX_INT_DIGITS:
                raise TemplateTooLarge(
                    f"template computes a number with more than {MAX_INT_DIGITS:,} digits"
                )
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * math.log10(abs(left)) > MAX_INT_DIGITS:
                raise TemplateTooLarge(
                    f"template computes a number with more than {MAX_INT_DIGITS:,} digits"
                )
    elif operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            size = budget.text_size(left) + budget.text_size(right)
            budget.build(size, "template adds two values into one too long")
    elif operator == "%" and isinstance(left, str):
        _check_percent(budget, left, right)


def _check_percent(budget: _Budget, fmt: str, args: Any) -> None:
    size = len(fmt)
    for field in _PERCENT_FIELD.finditer(fmt):
        width, precision = field.group(1) or "0", field.group(2) or "0"
        if "*" in (width, precision):
            raise TemplateUnsafe(
                "template uses a '*' width in %-formatting, which templates may not use"
            )
        # Ten or more digits is over any limit; don't even convert such a width.
        size += max(10**10 if len(n) > 9 else int(n) for n in (width, precision))
    values = (
        args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
    )
    size += sum(budget.text_size(value) for value in values)
    budget.build(size, "template %-formats a string too long")


def _check_str_method(
    budget: _Budget, method: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, ...]:
    """Refuse a str method call whose result would pass the limit; returns its arguments."""
    text: str = method.__self__
    name = getattr(method, "__name__", "")
    what = f"template calls str.{name} with"
    budget.tick(_work(text))
    for arg in (*args, *kwargs.values()):
        if name in _COUNT_METHODS:
            budget.check_count(arg, f"{what} the number")
        budget.check_value(arg, f"{what} an argument too long")
    if name == "join" and args:
        # The items may be a one-shot iterator: list them once and pass the list on.
        items = budget.listed(args[0], len(text), f"{what} items that join into a string too long")
        return (items, *args[1:])
    if (
        name == "replace"
        and len(args) >= 2
        and isinstance(args[0], str)
        and isinstance(args[1], str)
    ):
        count = args[2] if len(args) > 2 and isinstance(args[2], int) else -1
        size = _replaced_size(text, args[0], args[1], count)
        budget.check_size(size, f"{what} arguments that make a string too long")
    return args


def _check_filter(
    budget: _Budget, name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """Size and work checks before a filter runs; returns the value to filter (maybe listed)."""
    budget.check_value(value, f"the '{name}' filter gets a value too long")
    for arg in (*args, *kwargs.values()):
        if name in _COUNT_FILTERS:
            budget.check_count(arg, f"the '{name}' filter gets the number")
        budget.check_value(arg, f"the '{name}' filter gets an argument too long")

    def argument(index: int, key: str, default: Any) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    index = _ATTRIBUTE_ARGUMENT.get(name, -1)
    by_attribute = argument(index, "attribute", None) is not None if index >= 0 else False
    # Looking up an attribute in the sandbox costs about a call per item.
    budget.tick(_CALL_STEPS + _work(value) * (_CALL_STEPS if by_attribute else 1))

    text = value if isinstance(value, str) else None
    too_long = f"the '{name}' filter would make a string too long"
    if name == "replace" and text is not None:
        old, new, count = argument(0, "old", ""), argument(1, "new", ""), argument(2, "count", None)
        if isinstance(old, str) and isinstance(new, str):
            budget.check_size(
                _replaced_size(text, old, new, count if isinstance(count, int) else -1), too_long
            )
    elif name == "join" and text is None and isinstance(value, Iterable):
        return budget.listed(value, len(str(argument(0, "d", ""))), too_long)
    elif name == "indent" and text is not None:
        width = argument(0, "width", 4)
        prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        budget.check_size(len(text) + (text.count("\n") + 1) * prefix, too_long)
    elif name == "wordwrap" and text is not None:
        width, wrap = argument(0, "width", 79), argument(2, "wrapstring", None)
        lines = len(text) // max(width if isinstance(width, int) else 1, 1) + text.count("\n") + 1
        budget.check_size(
            len(text) + lines * len(wrap if isinstance(wrap, str) else "\n"), too_long
        )
    elif name == "sum" and not isinstance(argument(1, "start", 0), (int, float)):
        # sum() of lists copies the running total at every item: quadratic, and rarely meant.
        raise TemplateUnsafe("the 'sum' filter adds numbers only")
    return value


def _guard_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # Jinja passes the context or environment first to filters marked so; the value comes next.
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)  # keeps `jinja_pass_arg`, which Jinja reads off the function
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        value = args[skip] if len(args) > skip else None
        value = _check_filter(budget, name, value, args[skip + 1 :], kwargs)
        result = function(*args[:skip], value, *args[skip + 1 :], **kwargs)
        what = f"the '{name}' filter makes a value too long"
        if isinstance(result, str):
            budget.check_size(len(result), what)
        elif isinstance(result, Iterator):
            return budget.metered(result, what)
        else:
            budget.check_value(result, what)
        return result

    return guarded


def _tojson(value: Any, indent: int | None = None) -> Markup:
    """Jinja's `tojson`, encoding piecewise so that deep indentation stops at the limit."""
    budget = _budget()
    options = dict(_ENV.policies["json.dumps_kwargs"], indent=indent)
    parts, size = [], 0
    for part in json.JSONEncoder(**options).iterencode(value):
        size += len(part)
        budget.check_size(size, "the 'tojson' filter makes a string too long")
        parts.append(part)
    text = "".join(parts)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)  # as Jinja does: safe inside HTML <script> too
    return Markup(text)


# ---------------------------------------------------------------------------------------------
# The sandbox.


class _Buffer(list):  # type: ignore[type-arg]
    """Where macros, call blocks, filter blocks and block `set`s collect output; capped like output."""

    __slots__ = ("_budget", "_size")

    def __init__(self, budget: _Budget) -> None:
        super().__init__()
        self._budget = budget
        self._size = 0

    def _grow(self, size: int) -> None:
        self._size += size
        self._budget.check_size(self._size, "a template macro or block builds text too long")

    def append(self, item: Any) -> None:
        self._grow(len(item))
        super().append(item)

    def extend(self, items: Iterable[Any]) -> None:
        listed = list(items)
        self._grow(sum(len(item) for item in listed))
        super().extend(listed)


class _Generator(CodeGenerator):
    """Jinja's code generator, with capped buffers for output that is not streamed."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.ralign_buffer()")


class _Harden(NodeTransformer):
    """Route loops, `~` and literals through the sandbox, so that each counts against limits."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _environment_call("ralign_iter", [cast(nodes.Expr, node.iter)], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("ralign_concat", list(node.nodes), node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return self._literal(node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return self._literal(node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        # A tuple in store context is an unpacking target (`for k, v in ...`), not a value.
        return self._literal(node) if node.ctx == "load" else node

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("ralign_value", [node], node.lineno)


def _environment_call(method: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    target = nodes.EnvironmentAttribute(method, lineno=lineno)
    return nodes.Call(target, args, [], None, None, lineno=lineno)


def _finalize(value: Any) -> Any:
    _budget().check_value(value, "template prints a value too long")
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus ralign's attribute deny list and size and work limits."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _Generator

    def __init__(self) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            finalize=_finalize,
        )
        # lipsum(n) makes n paragraphs of filler text: no use in a recipe, easy to abuse.
        self.globals.pop("lipsum", None)
        filters = dict(self.filters, tojson=_tojson)
        self.filters = {
            name: _guard_filter(name, function)
            for name, function in filters.items()
            if name not in DENIED_FILTERS
        }

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return attr not in DENIED_ATTRIBUTES and super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja hands out a sandboxed str.format instead of checking the attribute; ralign
        # denies `format` outright, so it must go through `is_safe_attribute` like the rest.
        return None

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(_budget(), operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(
        __self,  # noqa: N805 - Jinja's signature: keyword arguments may be named `self`
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        budget = _budget()
        if isinstance(__obj, Macro):
            budget.tick(_MACRO_STEPS)
            budget.depth += 1
            try:
                if budget.depth > MAX_MACRO_DEPTH:
                    raise TemplateTooLarge(
                        f"template nests macro calls more than {MAX_MACRO_DEPTH} deep"
                    )
                return super().call(__context, __obj, *args, **kwargs)
            finally:
                budget.depth -= 1
        budget.tick(_CALL_STEPS)
        if isinstance(__obj, LoopContext) and args:
            # `loop(children)` in a recursive loop starts a loop over a new iterable.
            args = (budget.iterate(args[0]), *args[1:])
        elif isinstance(getattr(__obj, "__self__", None), str):
            args = _check_str_method(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str):
            budget.check_size(len(result), "template makes a string too long")
        elif getattr(__obj, "__self__", None) is not __self:  # ralign_* check their own
            budget.check_value(result, "template makes a value too long")
        return result

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        # Jinja joins a block's output with this when `self.block()` calls it: capped as well.
        buffer = _Buffer(_budget())
        for part in parts:
            buffer.append(part)
        return "".join(buffer)

    def ralign_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        return _budget().iterate(iterable)

    def ralign_concat(self, *parts: Any) -> str:
        budget = _budget()
        size = 0
        for part in parts:
            size += budget.text_size(part)
            budget.check_size(size, "template joins values with '~' into a string too long")
        budget.build(size, "template joins values with '~' into a string too long")
        return "".join(str(part) for part in parts)

    def ralign_value(self, value: Any) -> Any:
        _budget().check_value(value, "template writes a literal too long")
        return value

    def ralign_buffer(self) -> _Buffer:
        return _Buffer(_budget())


_ENV = _Sandbox()


# ---------------------------------------------------------------------------------------------
# Static checks.


def _name_problem(name: str) -> str | None:
    if name.startswith("_") or name in DENIED_ATTRIBUTES:
        return f"template reads the attribute '{name}', which templates may not use"
    return None


def _attribute_path_problem(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        for part in node.value.split("."):
            problem = _name_problem(part)
            if problem:
                return problem
    return None


def _filter_problem(node: nodes.Filter | nodes.Test) -> _LocatedTemplateError | None:
    kind = "filter" if isinstance(node, nodes.Filter) else "test"
    known = _ENV.filters if kind == "filter" else _ENV.tests
    if kind == "filter" and node.name in DENIED_FILTERS:
        return TemplateUnsafe(f"the '{node.name}' filter is not allowed in templates", node.lineno)
    if node.name not in known:
        return TemplateSyntax(
            f"unknown {kind} '{node.name}'{did_you_mean(node.name, known)}", node.lineno
        )
    if kind != "filter":
        return None
    candidates = [kw.value for kw in node.kwargs if kw.key == "attribute"]
    index = _ATTRIBUTE_ARGUMENT.get(node.name)
    if index is not None and len(node.args) > index:
        candidates.append(node.args[index])
    for candidate in candidates:
        problem = _attribute_path_problem(candidate)
        if problem:
            return TemplateUnsafe(problem, node.lineno)
    # `map('upper')` and `select('odd')` name a filter or test that is looked up at render time.
    index = _NAMED_ARGUMENT.get(node.name)
    named = node.args[index] if index is not None and len(node.args) > index else None
    if isinstance(named, nodes.Const) and isinstance(named.value, str):
        if node.name == "map" and named.value in DENIED_FILTERS:
            return TemplateUnsafe(
                f"the '{named.value}' filter is not allowed in templates", node.lineno
            )
        kind, known = ("filter", _ENV.filters) if node.name == "map" else ("test", _ENV.tests)
        if named.value not in known:
            return TemplateSyntax(
                f"unknown {kind} '{named.value}'{did_you_mean(named.value, known)}", node.lineno
            )
    return None


def _vet(ast: nodes.Template) -> None:
    """Raise the first (by line) use of something templates may not use."""
    problems: list[_LocatedTemplateError] = []
    for node in ast.find_all(nodes.Node):
        problem: str | None = None
        if isinstance(node, (nodes.Getattr, nodes.NSRef)):
            problem = _name_problem(node.attr)
        elif isinstance(node, nodes.Getitem):
            # Only private names: `row['format']` is a legitimate key of a mapping.
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
            if isinstance(key, str) and key.startswith("_"):
                problem = _name_problem(key)
        elif isinstance(node, (nodes.Filter, nodes.Test)):
            found = _filter_problem(node)
            if found is not None:
                problems.append(found)
        elif isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            problem = "templates may not include, import or extend other templates"
        if problem:
            problems.append(TemplateUnsafe(problem, node.lineno))
    if problems:
        raise min(problems, key=lambda p: p.line or 0)


# ---------------------------------------------------------------------------------------------
# Public API.


@functools.lru_cache(maxsize=1024)
def _analyse(text: str) -> tuple[TemplateInfo, Template]:
    """Parse, vet, find variables and compile, once per distinct template text."""
    try:
        ast = _ENV.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateSyntax(exc.message or str(exc), exc.lineno) from exc
    _vet(ast)
    free = find_undeclared_variables(ast)
    first: dict[str, int] = {}
    for name in ast.find_all(nodes.Name):
        if name.ctx == "load" and name.name in free:
            first[name.name] = min(first.get(name.name, name.lineno), name.lineno)
    info = TemplateInfo(text, tuple(sorted(first.items(), key=lambda item: (item[1], item[0]))))
    try:
        template = _ENV.from_string(_Harden().visit(ast))
    except TemplateSyntaxError as exc:
        raise TemplateSyntax(exc.message or str(exc), exc.lineno) from exc
    return info, template


def parse_template(text: str) -> TemplateInfo:
    """Parse and statically vet a recipe template.

    Args:
        text: Jinja2 source from a recipe.
    Returns:
        The template's context variables, each with the line of its first use.
    Raises:
        TemplateSyntax: the text is not valid Jinja or names an unknown filter or test.
        TemplateUnsafe: it reads a private or denied attribute, uses a denied filter, or includes.
    """
    return _analyse(text)[0]


def check_variables(
    info: TemplateInfo, provided: Iterable[str], where: str
) -> list[tuple[str, int, str]]:
    """Report the variables a template reads that its use does not provide.

    Args:
        info: the parsed template.
        provided: the variable names its use supplies.
        where: names the use in messages, e.g. "the rank step".
    Returns:
        (name, line within the template, message) for each missing variable, in template order.
    """
    given = sorted(set(provided))
    listing = ", ".join(given) if given else "nothing"
    return [
        (
            name,
            line,
            f"template uses variable '{name}', which {where} does not provide "
            f"(it provides: {listing}){did_you_mean(name, given)}",
        )
        for name, line in info.variables
        if name not in given
    ]


def render(
    text_or_info: str | TemplateInfo,
    variables: Mapping[str, object],
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_steps: int = MAX_STEPS,
) -> str:
    """Render a template in the sandbox.

    Args:
        text_or_info: template text, or what `parse_template` returned for it.
        variables: the context the template reads.
        max_chars: the most characters the output, or any value made on the way, may print as.
        max_steps: the work one render may do (loop iterations, calls, filters).
    Returns:
        The rendered text.
    Raises:
        TemplateSyntax, TemplateUnsafe: as `parse_template`.
        TemplateTooLarge: a size or work limit was passed.
        TemplateRenderError: an undefined variable, a sandbox refusal, or a failing expression.
    """
    text = text_or_info.text if isinstance(text_or_info, TemplateInfo) else text_or_info
    template = _analyse(text)[1]
    token = _BUDGET.set(_Budget(max_chars, max_steps))
    stream = cast(Generator[str, None, None], template.generate(dict(variables)))
    parts: list[str] = []
    size = 0
    try:
        for chunk in stream:
            size += len(chunk)
            if size > max_chars:
                raise TemplateTooLarge(f"template output exceeds {max_chars:,} characters")
            parts.append(chunk)
    except _LocatedTemplateError as exc:
        if exc.line is None:
            exc.line = _template_line(exc)
        raise
    except Exception as exc:
        raise _render_error(exc) from exc
    finally:
        stream.close()
        _BUDGET.reset(token)
    return "".join(parts)


def _render_error(exc: Exception) -> TemplateError:
    """The ralign error for an exception raised while rendering, with its template line."""
    if isinstance(exc, SecurityError):
        message = f"template tried something the sandbox forbids: {exc}"
    elif isinstance(exc, UndefinedError):
        message = f"template uses an undefined value: {exc.message or exc}"
    elif isinstance(exc, RecursionError):
        message = "template recurses too deeply"
    elif isinstance(exc, MemoryError):
        message = "template ran out of memory"
    else:
        message = f"template failed: {type(exc).__name__}: {exc}"
    return TemplateRenderError(message, _template_line(exc))


def _template_line(exc: BaseException) -> int | None:
    # Jinja rewrites the traceback frames of template code to point at template lines.
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
