"""Regex literals on RE2, a linear-time engine: patterns that need backtracking are refused up front."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import re2

FLAGS = {"i": "i", "m": "m", "s": "s"}

# Constructs RE2 cannot run in linear time, named for the error message.
_BACKTRACKING = (
    (re.compile(r"\\[1-9]"), "a backreference (\\1 ...)"),
    (re.compile(r"\\k<"), "a named backreference (\\k<name>)"),
    (re.compile(r"\(\?P="), "a named backreference ((?P=name))"),
    (re.compile(r"\(\?<?[=!]"), "lookaround ((?=, (?!, (?<=, (?<!)"),
    (re.compile(r"\(\?>"), "an atomic group ((?>...))"),
    (re.compile(r"[*+?}][+]"), "a possessive quantifier"),
)


class RegexError(ValueError):
    """A regex literal that cannot run on the linear-time engine; str() is the user's message."""


def _strip_classes_and_escapes(pattern: str) -> str:
    """Blank out escaped characters other than backreference-like ones, so `\\(` is not a group."""
    return re.sub(r"\\([^1-9kP])", "__", pattern)


def check(pattern: str, flags: str) -> None:
    """Raise RegexError if `pattern` is not a valid linear-time regex with `flags` among i, m, s."""
    bad = sorted(set(flags) - set(FLAGS))
    if bad:
        raise RegexError(f"unknown regex flag '{bad[0]}' (flags are i, m, s)")
    probe = _strip_classes_and_escapes(pattern)
    for finder, what in _BACKTRACKING:
        if finder.search(probe):
            kind = "backreference" if "backreference" in what else "construct"
            raise RegexError(
                f"this regex uses {what}, which needs backtracking; regexes run on a "
                f"linear-time engine (RE2), so a {kind} like this is not supported"
            )
    try:
        compile_regex(pattern, flags)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        detail = str(detail).split(": (?", 1)[0]  # drop the echo of our inline-flag prefix
        raise RegexError(f"invalid regex: {detail}") from None


@lru_cache(maxsize=4096)
def compile_regex(pattern: str, flags: str) -> Any:
    """The compiled RE2 object for a checked literal (flags become an inline group)."""
    prefix = f"(?{''.join(sorted(set(flags)))})" if flags else ""
    options = re2.Options()
    options.log_errors = False  # we report errors ourselves, at the literal
    options.max_mem = 8 << 20  # bound the automaton: a huge {n,m} is an error, not a memory hog
    return re2.compile(prefix + pattern, options)
