"""Recipe and model chat templates: parse, vet and render untrusted Jinja2 in a budgeted sandbox.

Limits. Every render runs under all of these; `render` and `render_chat` take the first three as
arguments.

- max_chars, 1,000,000 by default: the output, and every value a template builds (a string, a
  list, the text a macro or block collects), must print within this many characters. Wherever
  a value could be large it is sized before it is built.
- max_steps, 1,000,000 by default: the work of one render. A step is one loop item, call or
  filter, one item looked at while sizing a value, or 1,000 characters a filter or string method
  reads.
- max_seconds, 2.0 by default: the wall-clock time of one render, checked every 256 steps and
  every 64 pieces of output. Between two checks run at most 256 steps, and the limits here keep
  each well under a second, so no render runs much past it.
- nesting: 50 levels of blocks, brackets and expressions, 16 of loops (refused when parsed);
  100 levels of calls (macros, `caller()`, `self.block()`, recursive loops).
- numbers of at most 4,300 digits (Python's own limit for printing them), so `round` takes a
  precision within ±4,300 and `int` a string of at most 4,300 characters; `range()` makes at
  most 100,000 items (Jinja's sandbox); `tojson` indents at most 100.
- `wordwrap`, `urlize` and `title` work word by word in Python: at most 20,000 lines or words a
  call; `sort`, `dictsort` and `groupby` take at most 100,000 items.
- refused outright: private attributes (`_x`), DENIED_ATTRIBUTES (among them `format`, and
  `encode` and `to_bytes`, so that templates never hold bytes), the `attr`, `format` and
  `pprint` filters, `lipsum`, include/import/extends, `*` widths in %-formatting, and `sum` of
  anything but numbers.

How. Jinja's ImmutableSandboxedEnvironment guards every attribute and call. Its public hooks
carry the budgets: `call` (calls and string methods), `call_binop` (`*`, `**`, `+`, `%`),
`getattr`/`getitem` (denied attributes), `finalize` (printed values), `concat` (the text a macro
or block collects), the filters (each wrapped) and the globals (`range`, `namespace`). Loops,
`~` and variable bindings have no hook of their own: the `_Bounds` extension's `filter_stream`
(Jinja's documented token hook) routes each through a checking filter, and a walk of the parsed
tree refuses any that is not, so none of them escapes the budget.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from jinja2 import StrictUndefined, Template, nodes, pass_eval_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.ext import Extension, loopcontrols
from jinja2.lexer import Token, TokenStream
from jinja2.meta import find_undeclared_variables
from jinja2.parser import Parser
from jinja2.runtime import LoopContext, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from markupsafe import Markup

from ralign.errors import TemplateError, did_you_mean

DEFAULT_MAX_CHARS = 1_000_000
MAX_STEPS = 1_000_000
MAX_SECONDS = 2.0
MAX_NESTING = 50  # past ~75 brackets Jinja's parser recurses beyond Python's limit
MAX_LOOP_NESTING = 16  # Python compiles at most 20 nested blocks in one function
MAX_CALL_DEPTH = 100
MAX_INT_DIGITS = 4300  # sys.get_int_max_str_digits(): Python will not print longer integers
MAX_WORDS = 20_000
MAX_SORTED = 100_000
MAX_INDENT = 100
_CHARS_PER_STEP = 1_000
_CLOCK_EVERY = 256  # steps between two looks at the clock

# Attributes no template may read: str.format/format_map reach attributes through format fields,
# `translate`/`expandtabs` multiply a string's size, `encode`/`to_bytes` make bytes, which would
# need every size check twice; the rest are interpreter internals.
DENIED_ATTRIBUTES = frozenset(
    "format format_map mro translate maketrans expandtabs encode to_bytes func_globals func_code"
    " func_closure gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await ag_frame ag_code"
    " f_globals f_locals f_builtins f_back f_code tb_frame tb_next co_code im_func im_self"
    " im_class".split()
)
# `attr` reads any attribute by name, `format` is %-formatting with caller-chosen widths and
# `pprint` indents by nesting depth without bound; `map('attr', ...)` must not find them either.
DENIED_FILTERS = frozenset({"attr", "format", "pprint"})
# Filters taking an attribute name (a dotted path) as this positional argument or `attribute=`.
_ATTRIBUTE_ARGUMENT = dict(selectattr=0, rejectattr=0, groupby=0, sum=0, sort=2, unique=1)
_ATTRIBUTE_ARGUMENT.update(min=1, max=1, join=1)
# Filters that name another filter (`map`) or a test: the positional index of that name.
_NAMED_ARGUMENT = {"map": 0, "select": 0, "reject": 0, "selectattr": 1, "rejectattr": 1}
# Filters and str methods whose number arguments set the size of what they build.
_COUNT_FILTERS = frozenset({"center", "batch", "slice"})
_COUNT_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})
# The checking filters `_Bounds` inserts; the space keeps any template from naming them.
_LOOP, _JOIN, _BIND, _LITERAL = "ralign loop", "ralign join", "ralign bind", "ralign literal"


class _LocatedTemplateError(TemplateError):
    """A template problem with the 1-based line within the template text, when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class TemplateSyntax(_LocatedTemplateError):
    """The template is not valid Jinja (or names an unknown filter or test, or nests too deeply)."""


class TemplateUnsafe(_LocatedTemplateError):
    """The template uses something templates may not use (private attributes, `attr`, includes)."""


class TemplateTooLarge(_LocatedTemplateError):
    """The template's output, one of its values, its work or its time passes a limit."""


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


def _int_digits(n: int) -> int:
    return int(abs(n).bit_length() * 0.30103) + 1


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
        if not isinstance(value, _CONTAINERS):
            if isinstance(value, str):
                return len(value) + 2  # quotes, inside a container
            if isinstance(value, int) and not isinstance(value, bool):
                return _int_digits(value) + 1
            return 5 if isinstance(value, bool) or value is None else 32
        known = memo.get(id(value))
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
        memo[id(value)] = total
        return total

    return size(value), visited


def _work(value: object) -> int:
    """Steps a builtin takes to go over `value` once."""
    if isinstance(value, str):
        return len(value) // _CHARS_PER_STEP
    return len(value) if isinstance(value, _CONTAINERS) else 0


def _replaced_size(text: str, old: str, new: str, count: object) -> int:
    occurrences = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and 0 <= count < occurrences:
        occurrences = count
    return len(text) + occurrences * (len(new) - len(old))


# ---------------------------------------------------------------------------------------------
# Per-render limits. The sandbox's hooks find the current render's budget through a context
# variable, so one module-level environment serves every render (and every thread).


class _Budget:
    """Limits and counters of one render; mutable by design, never shared between renders."""

    __slots__ = "max_chars max_steps max_seconds steps_left next_clock deadline depth".split()

    def __init__(self, max_chars: int, max_steps: int, max_seconds: float) -> None:
        self.max_chars, self.max_steps, self.max_seconds = max_chars, max_steps, max_seconds
        self.steps_left = max_steps
        self.next_clock = max_steps - _CLOCK_EVERY if max_steps > _CLOCK_EVERY else 0
        self.deadline = time.monotonic() + max_seconds
        self.depth = 0

    def tick(self, steps: int = 1) -> None:
        self.steps_left -= steps
        if self.steps_left < self.next_clock:  # one comparison on the hot path
            self.check_clock()

    def check_clock(self) -> None:
        """Refuse to go on past the step budget or the deadline."""
        if self.steps_left < 0:
            raise TemplateTooLarge(
                f"template does too much work (over its budget of {self.max_steps:,} steps; "
                "loop iterations, calls and filters all count)"
            )
        if time.monotonic() > self.deadline:
            raise TemplateTooLarge(
                "template does too much work "
                f"(it ran past its time limit of {self.max_seconds:g} s)"
            )
        self.next_clock = max(self.steps_left - _CLOCK_EVERY, 0)

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise TemplateTooLarge(f"{what}, over the {self.max_chars:,}-character limit")

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
        if not isinstance(value, _SCALARS):
            self.check_size(self.size(value), what)

    def check_count(self, number: object, what: str) -> None:
        """Refuse a number that sets the size of something to build."""
        if isinstance(number, int) and not isinstance(number, bool):
            self.check_size(number, f"{what} {number:,}")

    def metered(self, items: Iterator[Any], what: str) -> Iterator[Any]:
        """A lazily made sequence (`map`, `select`) whose items together must fit the limit."""
        size = 0
        for item in items:
            self.tick()
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
    return budget if budget is not None else _Budget(DEFAULT_MAX_CHARS, MAX_STEPS, MAX_SECONDS)


# ---------------------------------------------------------------------------------------------
# Checks made before an operator, string method or filter builds its result.

_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.", re.S)


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse `*`, `**`, `+` and `%` whose result would pass the limits."""
    if operator == "*" and isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    digits = 0
    if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
        size = len(left) if isinstance(left, str) else budget.size(left)
        what = f"template repeats a {type(left).__name__} of size {size:,} {right:,} times"
        budget.build(size * max(right, 0), what)
    elif operator == "*" and isinstance(left, int) and isinstance(right, int):
        digits = _int_digits(left) + _int_digits(right)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        digits = int(right * math.log10(abs(left))) if abs(left) > 1 else 0
    elif operator == "+" and isinstance(left, (str, list, tuple)):
        if isinstance(right, (str, list, tuple)):
            size = budget.text_size(left) + budget.text_size(right)
            budget.build(size, "template adds two values into one too long")
    elif operator == "%" and isinstance(left, str):
        _check_percent(budget, left, right)
    if digits > MAX_INT_DIGITS:
        raise TemplateTooLarge(
            f"template computes a number with more than {MAX_INT_DIGITS:,} digits"
        )


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
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str):
        if isinstance(args[1], str):
            size = _replaced_size(text, args[0], args[1], args[2] if len(args) > 2 else -1)
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
    budget.tick(1 + _work(value))

    def argument(index: int, key: str, default: Any) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    def width(number: Any) -> int:  # a width given as a number or as the string it repeats
        return len(number) if isinstance(number, str) else number if isinstance(number, int) else 0

    text = value if isinstance(value, str) else ""
    too_long = f"the '{name}' filter would make a string too long"
    too_many = ""
    if name == "replace" and text:
        old, new, count = argument(0, "old", ""), argument(1, "new", ""), argument(2, "count", -1)
        if isinstance(old, str) and isinstance(new, str):
            budget.check_size(_replaced_size(text, old, new, count), too_long)
    elif name == "join" and not isinstance(value, str) and isinstance(value, Iterable):
        return budget.listed(value, len(str(argument(0, "d", ""))), too_long)
    elif name == "indent":
        budget.check_size(
            len(text) + (text.count("\n") + 1) * width(argument(0, "width", 4)), too_long
        )
    elif name == "wordwrap":
        lines = len(text) // max(width(argument(0, "width", 79)), 1) + text.count("\n") + 1
        budget.check_size(
            len(text) + lines * (width(argument(2, "wrapstring", None)) or 1), too_long
        )
        too_many = f"would make more than {MAX_WORDS:,} lines" if lines > MAX_WORDS else ""
    elif name in ("urlize", "title") and sum(map(text.count, " \t\n\r-({[<")) >= MAX_WORDS:
        too_many = f"gets more than {MAX_WORDS:,} words"  # (at most one word per separator)
    elif name in ("sort", "dictsort", "groupby") and _work(value) > MAX_SORTED:
        too_many = f"gets more than {MAX_SORTED:,} items"
    elif name == "tojson" and width(argument(0, "indent", None)) > MAX_INDENT:
        # json writes each line's indent in one piece, as long as indent x depth
        too_many = (
            f"gets an indent of {width(argument(0, 'indent', None)):,} (at most {MAX_INDENT})"
        )
    elif name == "round" and abs(width(argument(0, "precision", 0))) > MAX_INT_DIGITS:
        precision = argument(0, "precision", 0)  # round(1, -10**9) computes 10**(10**9)
        too_many = f"gets the precision {precision:,}, beyond ±{MAX_INT_DIGITS:,} digits"
    elif name in ("int", "float") and len(text) > MAX_INT_DIGITS:
        too_many = f"gets a number with more than {MAX_INT_DIGITS:,} digits"
    elif name == "sum" and not isinstance(argument(1, "start", 0), (int, float)):
        # sum() of lists copies the running total at every item: quadratic, and rarely meant.
        raise TemplateUnsafe("the 'sum' filter adds numbers only")
    if too_many:
        raise TemplateTooLarge(f"the '{name}' filter {too_many}")
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


def _encode_json(value: Any, **options: Any) -> str:
    """`json.dumps`, encoded piecewise so that deep indentation stops at the limit."""
    budget = _budget()
    parts, size = [], 0
    for part in json.JSONEncoder(**options).iterencode(value):
        size += len(part)
        budget.check_size(size, "the 'tojson' filter makes a string too long")
        parts.append(part)
    return "".join(parts)


def _tojson(value: Any, indent: int | None = None) -> Markup:
    """Jinja's `tojson` (sorted keys, HTML-safe)."""
    text = _encode_json(value, sort_keys=True, indent=indent)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)  # as Jinja does: safe inside HTML <script> too
    return Markup(text)


def _chat_tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """Transformers' `tojson` for chat templates: plain `json.dumps`, non-ASCII kept."""
    options = dict(ensure_ascii=ensure_ascii, indent=indent, separators=separators)
    return _encode_json(value, sort_keys=sort_keys, **options)


# ---------------------------------------------------------------------------------------------
# The checking filters that `_Bounds` routes loops, `~` and bound values through.


class _Loop:
    """A loop's iterable: each item costs a step and must print within the limit."""

    __slots__ = ("iterable",)

    def __init__(self, iterable: Any) -> None:
        self.iterable = iterable

    def __len__(self) -> int:  # `loop.length` without listing the items first
        return len(self.iterable)

    def __iter__(self) -> Iterator[Any]:
        budget = _budget()
        for item in self.iterable:
            budget.tick()
            budget.check_value(item, "template loops over an item too long")
            yield item


@pass_eval_context
def _join(eval_ctx: Any, parts: tuple[Any, ...]) -> str:
    """`a ~ b ~ c`: each part sized before any is joined."""
    budget = _budget()
    size = 0
    for part in parts:
        size += budget.text_size(part)
        budget.check_size(size, "template joins values with '~' into a string too long")
    budget.tick(size // _CHARS_PER_STEP)
    if eval_ctx.autoescape and any(hasattr(part, "__html__") for part in parts):
        return Markup("").join(parts)  # as Jinja joins inside an autoescape block
    return "".join([str(part) for part in parts])


def _checker(what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        _budget().check_value(value, what)
        return value

    return check


# ---------------------------------------------------------------------------------------------
# The token rewriting. `{% for x in xs %}` becomes `{% for x in (xs)|"ralign loop" %}`; `a ~ b`
# becomes `((a), (b),)|"ralign join"`; a value that `set`, `with` or a parameter's default binds
# becomes `(value)|"ralign bind"` (or "ralign literal", for a bracketed literal). A tag's tokens
# are nested by brackets first: an item is a Token or a list [open, *items, close].

_Item = Any
_OPEN = {"lparen": "rparen", "lbracket": "rbracket", "lbrace": "rbrace"}
_LOOSER = frozenset({"comma", "colon", "assign", "eq", "ne", "lt", "lteq", "gt", "gteq"})
_LOOSER_WORDS = frozenset({"and", "or", "not", "in", "if", "else", "recursive"})
_BLOCKS = frozenset({"for", "if", "macro", "call", "filter", "with", "block", "autoescape"})


def _is(item: _Item, kind: str, *values: str) -> bool:
    return isinstance(item, Token) and item.type == kind and (not values or item.value in values)


def _line(item: _Item) -> int:
    return _line(item[0]) if isinstance(item, list) else cast(int, item.lineno)


def _nest(tokens: list[Token]) -> list[_Item]:
    """Group bracketed tokens; unbalanced brackets stay flat (Jinja reports them)."""
    stack: list[list[_Item]] = [[]]
    for token in tokens:
        if token.type in _OPEN:
            stack.append([token])
        elif len(stack) > 1 and token.type == _OPEN[stack[-1][0].type]:
            group = stack.pop()
            stack[-1].append([*group, token])
        else:
            stack[-1].append(token)
    while len(stack) > 1:
        group = stack.pop()
        stack[-1].extend(group)
    return stack[0]


def _flat(items: list[_Item]) -> Iterator[Token]:
    for item in items:
        yield from _flat(item) if isinstance(item, list) else (item,)


def _wrapped(items: list[_Item], name: str) -> list[_Item]:
    """`(items)|"name"`."""
    line = _line(items[0])
    group = [Token(line, "lparen", "("), *items, Token(line, "rparen", ")")]
    return [group, Token(line, "pipe", "|"), Token(line, "name", name)]


def _looser(item: _Item, prev: _Item, before: _Item) -> bool:
    """Whether `item` binds looser than `~`, and so ends a chain of joined values."""
    if isinstance(item, list):
        return False
    if item.type in ("add", "sub"):  # binary after an operand; a unary sign is part of one
        return isinstance(prev, list) or (
            isinstance(prev, Token)
            and prev.type in ("name", "string", "integer", "float")
            and prev.value not in _LOOSER_WORDS | {"is"}
        )
    if item.type == "name" and item.value in _LOOSER_WORDS:
        # `x.in`, `x is in(y)`, `x is not none`: an attribute or a test, not an operator
        after_is = _is(prev, "name", "is") or (
            _is(prev, "name", "not") and _is(before, "name", "is")
        )
        return not (_is(prev, "dot") or after_is)
    return item.type in _LOOSER


def _join_chains(items: list[_Item], tag: bool = False) -> list[_Item]:
    """Rewrite each `a ~ b ~ c` at this bracket level (and inside brackets) to a checked join."""
    out: list[_Item] = []
    operands: list[list[_Item]] = [[]]
    tildes: list[Token] = []
    prev = before = None

    def flush() -> None:
        if tildes and all(operands):
            line = _line(operands[0][0])
            parts: list[_Item] = []
            for operand in operands:
                parts.append([Token(line, "lparen", "("), *operand, Token(line, "rparen", ")")])
                parts.append(Token(line, "comma", ","))
            out.extend(_wrapped(parts, _JOIN))
        else:  # no `~`, or a broken chain: as written (the tree walk refuses a bare `~`)
            out.extend(operands[0])
            for tilde, operand in zip(tildes, operands[1:], strict=True):
                out.extend([tilde, *operand])
        operands[:] = [[]]
        tildes.clear()

    for index, item in enumerate(items):
        if isinstance(item, list):
            item = [item[0], *_join_chains(item[1:-1]), item[-1]]
        if _is(item, "tilde"):
            tildes.append(item)
            operands.append([])
        elif (tag and index == 0) or _looser(item, prev, before):
            flush()
            out.append(item)
            item = None  # what follows starts a new operand
        else:
            operands[-1].append(item)
        before, prev = prev, item
    flush()
    return out


def _bind_value(items: list[_Item], start: int) -> list[_Item]:
    """Wrap `items[start:]`, a value being bound, in its checking filter."""
    value = items[start:]
    if not value:
        return items
    group = value[0] if len(value) == 1 and isinstance(value[0], list) else None
    literal = group is not None and (
        group[0].type != "lparen" or any(_is(i, "comma") for i in group)
    )
    return [*items[:start], *_wrapped(value, _LITERAL if literal else _BIND)]


def _bind_each(items: list[_Item]) -> list[_Item]:
    """Wrap the value of each `name = value` among comma-separated `items`."""
    out: list[_Item] = []
    part: list[_Item] = []
    for item in [*items, None]:
        if item is None or _is(item, "comma"):
            eq = next((k for k, it in enumerate(part) if _is(it, "assign")), None)
            out.extend(part if eq is None else _bind_value(part, eq + 1))
            out.extend([item] if item is not None else [])
            part = []
        else:
            part.append(item)
    return out


def _bind_tag(items: list[_Item]) -> list[_Item]:
    """Route a block tag's loop iterable or bound values through their checking filters."""
    tag = items[0].value if items and _is(items[0], "name") else ""
    if tag == "for":  # {% for TARGET in ITERABLE [if TEST] [recursive] %}
        start = next((k + 1 for k, it in enumerate(items) if _is(it, "name", "in")), len(items))
        ends = (k for k in range(start, len(items)) if _is(items[k], "name", "if", "recursive"))
        end = next((k for k in ends if not _is(items[k - 1], "dot")), len(items))
        return (
            items
            if end <= start
            else [*items[:start], *_wrapped(items[start:end], _LOOP), *items[end:]]
        )
    if tag == "set":  # {% set TARGET = VALUE %}; a block set's text goes through `concat`
        eq = next((k for k, it in enumerate(items) if _is(it, "assign")), None)
        return items if eq is None else _bind_value(items, eq + 1)
    if tag == "with":
        return [items[0], *_bind_each(items[1:])]
    # Parameters with defaults: {% macro m(a, b=1) %}, {% call(a, b=1) m() %}
    at = {"macro": 2, "call": 1}.get(tag, len(items))
    group = items[at] if at < len(items) else None
    if isinstance(group, list) and _is(group[0], "lparen"):
        return [*items[:at], [group[0], *_bind_each(group[1:-1]), group[-1]], *items[at + 1 :]]
    return items


def _check_nesting(tokens: list[Token]) -> None:
    """Refuse nesting deeper than Jinja's parser and Python's compiler take."""
    depth = loops = 0
    for k, token in enumerate(tokens):
        if token.type in _OPEN:
            depth += 1
        elif token.type in _OPEN.values():
            depth -= 1
        elif token.type == "name" and k and tokens[k - 1].type == "block_begin":
            name = token.value.removeprefix("end")
            step = (1 if name == token.value else -1) if name in _BLOCKS else 0
            depth, loops = depth + step, loops + (step if name == "for" else 0)
        if depth > MAX_NESTING or loops > MAX_LOOP_NESTING:
            raise TemplateSyntaxError(
                f"template nests loops too deeply (more than {MAX_LOOP_NESTING} levels)"
                if loops > MAX_LOOP_NESTING
                else f"template nests too deeply (more than {MAX_NESTING} levels)",
                token.lineno,
            )


class _Bounds(Extension):
    """Route each loop, `~` and bound value through its checking filter (see above)."""

    def filter_stream(self, stream: TokenStream) -> Iterator[Token]:
        tokens = list(stream)
        _check_nesting(tokens)
        ends = {"block_begin": "block_end", "variable_begin": "variable_end"}
        k = 0
        while k < len(tokens):
            yield tokens[k]
            end, block, k = ends.get(tokens[k].type), tokens[k].type == "block_begin", k + 1
            if end is not None:
                stop = next(
                    (j for j in range(k, len(tokens)) if tokens[j].type == end), len(tokens)
                )
                items = _join_chains(_nest(tokens[k:stop]), tag=block)
                yield from _flat(_bind_tag(items) if block else items)
                k = stop


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` of Transformers' chat templates: its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# ---------------------------------------------------------------------------------------------
# The sandbox.


class _Namespace(Namespace):
    """Jinja's `namespace()`, printed without its attributes.

    Otherwise namespaces holding namespaces would print exponentially long, and sizing them would
    need Jinja's private attribute store.
    """

    def __repr__(self) -> str:
        return "<Namespace>"


def _finalize(value: Any) -> Any:
    _budget().check_value(value, "template prints a value too long")
    return value


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(f"the chat template refuses the conversation: {message}")


def _strftime_now(format: str) -> str:  # noqa: A002 - Transformers' name
    return datetime.now().strftime(format)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus ralign's attribute deny list and size, work and time limits.

    `chat=True` renders Transformers chat templates as Transformers does: lenient undefined
    values, `trim_blocks`/`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` and
    its `tojson`.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, chat: bool) -> None:
        options: dict[str, Any] = dict(undefined=StrictUndefined, keep_trailing_newline=True)
        if chat:
            options = dict(undefined=Undefined, trim_blocks=True, lstrip_blocks=True)
        extensions = [_Bounds, loopcontrols, _Generation] if chat else [_Bounds]
        super().__init__(autoescape=False, finalize=_finalize, extensions=extensions, **options)
        # lipsum(n) makes n paragraphs of filler text: no use in a template, easy to abuse.
        self.globals.pop("lipsum", None)
        self.globals["namespace"] = _Namespace
        if chat:
            self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        filters = dict(self.filters, tojson=_chat_tojson if chat else _tojson)
        self.filters = {
            name: _guard_filter(name, function)
            for name, function in filters.items()
            if name not in DENIED_FILTERS
        }
        self.filters.update({_LOOP: _Loop, _JOIN: _join})
        self.filters[_BIND] = _checker("template sets a variable to a value too long")
        self.filters[_LITERAL] = _checker("template writes a literal too long")

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return attr not in DENIED_ATTRIBUTES and super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Before Jinja's own lookup, which hands out a sandboxed `str.format` unasked.
        if attribute in DENIED_ATTRIBUTES and hasattr(obj, attribute):
            return self.unsafe_undefined(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, str) and argument in DENIED_ATTRIBUTES:
            try:
                return obj[argument]  # `row['format']`: a key is data, not the str method
            except (TypeError, LookupError):
                return self.getattr(obj, argument)
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(_budget(), operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(
        __self,  # noqa: N805 - Jinja's signature: keyword arguments may be named `self`
        __context: Any,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        budget = _budget()
        budget.tick()
        if isinstance(__obj, LoopContext) and args:
            args = (_Loop(args[0]), *args[1:])  # `loop(children)` in a recursive loop
        elif isinstance(getattr(__obj, "__self__", None), str):
            args = _check_str_method(budget, __obj, args, kwargs)
        budget.depth += 1
        try:
            if budget.depth > MAX_CALL_DEPTH:
                raise TemplateTooLarge(
                    f"template nests macro calls more than {MAX_CALL_DEPTH} deep "
                    "(recursive loops and blocks count too)"
                )
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        if isinstance(result, str):
            budget.check_size(len(result), "template makes a string too long")
        else:
            budget.check_value(result, "template makes a value too long")
        return result

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """Join the text a macro, block, `caller()`, filter block or block `set` collected."""
        budget = _budget()
        collected, size = [], 0
        for part in parts:
            size += len(part)
            budget.check_size(size, "a template macro or block builds text too long")
            collected.append(part)
        return "".join(collected)


_ENVS = {"recipe": _Sandbox(chat=False), "chat": _Sandbox(chat=True)}
_PUBLIC_FILTERS = [name for name in _ENVS["chat"].filters if " " not in name]
_TESTS = list(_ENVS["chat"].tests)


# ---------------------------------------------------------------------------------------------
# Static checks, on the parsed tree.


def _name_problem(name: str) -> str | None:
    if name.startswith("_") or name in DENIED_ATTRIBUTES:
        return f"template reads the attribute '{name}', which templates may not use"
    return None


def _attribute_path_problem(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        return next(filter(None, map(_name_problem, node.value.split("."))), None)
    return None


def _filter_problem(node: nodes.Filter | nodes.Test) -> _LocatedTemplateError | None:
    kind, known = (
        ("filter", _PUBLIC_FILTERS) if isinstance(node, nodes.Filter) else ("test", _TESTS)
    )
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
    problem = next(filter(None, map(_attribute_path_problem, candidates)), None)
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
        kind, known = ("filter", _PUBLIC_FILTERS) if node.name == "map" else ("test", _TESTS)
        if named.value not in known:
            message = f"unknown {kind} '{named.value}'{did_you_mean(named.value, known)}"
            return TemplateSyntax(message, node.lineno)
    return None


def _checked(node: nodes.Node | None, *names: str) -> bool:
    return isinstance(node, nodes.Filter) and node.name in names


def _node_problem(node: nodes.Node) -> _LocatedTemplateError | None:
    """What templates may not do at `node`, or what in it escaped the `_Bounds` rewriting."""
    problem = unbounded = None
    if isinstance(node, (nodes.Getattr, nodes.NSRef)):
        problem = _name_problem(node.attr)
    elif isinstance(node, nodes.Getitem):
        # Only private names: `row['format']` is a legitimate key of a mapping.
        key = node.arg.value if isinstance(node.arg, nodes.Const) else None
        problem = _name_problem(key) if isinstance(key, str) and key.startswith("_") else None
    elif isinstance(node, (nodes.Filter, nodes.Test)):
        return None if " " in node.name else _filter_problem(node)
    elif isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        problem = "templates may not include, import or extend other templates"
    elif isinstance(node, nodes.Concat):
        unbounded = "'~'"
    elif isinstance(node, nodes.For) and not _checked(node.iter, _LOOP):
        unbounded = "a loop"
    elif isinstance(node, (nodes.Assign, nodes.With, nodes.Macro, nodes.CallBlock)):
        values = getattr(node, "defaults", None) or getattr(node, "values", None) or []
        values = [node.node] if isinstance(node, nodes.Assign) else values
        unbounded = None if all(_checked(v, _BIND, _LITERAL) for v in values) else "a value"
    if unbounded:  # never, for a template Jinja parses the usual way
        message = f"ralign cannot bound {unbounded} written this way; add parentheses around it"
        return TemplateSyntax(message, node.lineno)
    return TemplateUnsafe(problem, node.lineno) if problem else None


def _vet(ast: nodes.Template) -> None:
    """Raise the first problem (by line): too deep, unsafe, unknown, or unbounded."""
    stack: list[tuple[nodes.Node, int]] = [(ast, 1)]
    while stack:  # by hand: a deep tree must not recurse in here, nor in Jinja's compiler
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            message = f"template nests too deeply (more than {MAX_NESTING} levels)"
            raise TemplateSyntax(message, node.lineno)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    problems = [p for p in map(_node_problem, ast.find_all(nodes.Node)) if p is not None]
    if problems:
        raise min(problems, key=lambda p: p.line or 0)


# ---------------------------------------------------------------------------------------------
# Public API.


@functools.lru_cache(maxsize=1024)
def _analyse(kind: str, text: str) -> tuple[TemplateInfo, Template]:
    """Parse, vet, find variables and compile, once per distinct template text."""
    env = _ENVS[kind]
    try:
        ast = env.parse(text)
        _vet(ast)
        free = find_undeclared_variables(ast)
        template = env.from_string(ast)
    except TemplateSyntaxError as exc:
        raise TemplateSyntax(exc.message or str(exc), exc.lineno) from None
    except (RecursionError, SyntaxError):  # a last resort: the checks above bound the depth
        message = f"template nests too deeply (more than {MAX_NESTING} levels)"
        raise TemplateSyntax(message, 1) from None
    first: dict[str, int] = {}
    for name in ast.find_all(nodes.Name):
        if name.ctx == "load" and name.name in free:
            first[name.name] = min(first.get(name.name, name.lineno), name.lineno)
    info = TemplateInfo(text, tuple(sorted(first.items(), key=lambda item: (item[1], item[0]))))
    return info, template


def parse_template(text: str) -> TemplateInfo:
    """Parse and statically vet a recipe template.

    Args:
        text: Jinja2 source from a recipe.
    Returns:
        The template's context variables, each with the line of its first use.
    Raises:
        TemplateSyntax: the text is not valid Jinja, names an unknown filter or test, or nests
            too deeply.
        TemplateUnsafe: it reads a private or denied attribute, uses a denied filter, or includes.
    """
    return _analyse("recipe", text)[0]


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
    max_seconds: float = MAX_SECONDS,
) -> str:
    """Render a recipe template in the sandbox.

    Args:
        text_or_info: template text, or what `parse_template` returned for it.
        variables: the context the template reads.
        max_chars: the most characters the output, or any value made on the way, may print as.
        max_steps: the work one render may do (loop items, calls, filters; see the module).
        max_seconds: the wall-clock time one render may take.
    Returns:
        The rendered text.
    Raises:
        TemplateSyntax, TemplateUnsafe: as `parse_template`.
        TemplateTooLarge: a size, work or time limit was passed.
        TemplateRenderError: an undefined variable, a sandbox refusal, or a failing expression.
    """
    text = text_or_info.text if isinstance(text_or_info, TemplateInfo) else text_or_info
    template = _analyse("recipe", text)[1]
    return _render(template, dict(variables), _Budget(max_chars, max_steps, max_seconds))


def render_chat(
    template_text: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_steps: int = MAX_STEPS,
    max_seconds: float = MAX_SECONDS,
    **special: Any,
) -> str:
    """Render a model's chat template in the sandbox, under the same limits as a recipe's.

    The text equals Transformers' `apply_chat_template(messages, tokenize=False, ...)`.

    Args:
        template_text: the `chat_template` of a model folder (untrusted, like a recipe).
        messages: the conversation, each message a dict with `role` and `content`.
        add_generation_prompt: end with the start of an assistant turn.
        max_chars, max_steps, max_seconds: as for `render`.
        special: more template variables: the tokenizer's special tokens (`bos_token`,
            `eos_token`, ...), and `tools` or `documents` when given.
    Returns:
        The conversation as the model reads it.
    Raises:
        TemplateSyntax, TemplateUnsafe, TemplateTooLarge, TemplateRenderError: as `render`; the
            template's own `raise_exception(message)` is a TemplateRenderError.
    """
    template = _analyse("chat", template_text)[1]
    variables = {"tools": None, "documents": None, **special}
    variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
    return _render(template, variables, _Budget(max_chars, max_steps, max_seconds))


def _render(template: Template, variables: dict[str, Any], budget: _Budget) -> str:
    """Stream `template`'s output under `budget`, turning every failure into a TemplateError."""
    token = _BUDGET.set(budget)
    stream = cast(Generator[str, None, None], template.generate(variables))
    parts: list[str] = []
    size = 0
    try:
        for chunk in stream:
            size += len(chunk)
            if size > budget.max_chars:
                raise TemplateTooLarge(f"template output exceeds {budget.max_chars:,} characters")
            parts.append(chunk)
            if not len(parts) % 64 and time.monotonic() > budget.deadline:
                budget.check_clock()
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
