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


_SPECIAL = re.compile(r"[\\\[]")  # where an escape or a character class may start


class RegexError(ValueError):
    """A regex literal that cannot run on the linear-time engine; str() is the user's message."""


def _strip_classes_and_escapes(pattern: str) -> str:
    """Blank out what cannot hold a group or quantifier, so `\\(`, `[(?=]` or `\\p{Greek}+` is not mistaken for one.

    Character classes, `\\Q...\\E` quotes and escapes (with their `{...}` argument, as in
    `\\p{Greek}` or `\\x{41}`) become `_`; backreference-like escapes (`\\1`, `\\k`) are kept.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        # Copy a run of plain characters at once: long alternations of words are most of a pattern.
        special = _SPECIAL.search(pattern, i)
        stop = len(pattern) if special is None else special.start()
        if stop > i:
            out.append(pattern[i:stop])
            i = stop
            continue
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "123456789k":
                out.append(pattern[i : i + 2])
                i += 2
            elif nxt == "Q":
                end = pattern.find("\\E", i + 2)
                i = len(pattern) if end < 0 else end + 2
                out.append("_")
            elif nxt in "pPx" and pattern.startswith("{", i + 2) and "}" in pattern[i + 2 :]:
                i = pattern.index("}", i + 2) + 1
                out.append("_")
            else:
                out.append("_")
                i += 2
        elif c == "[":
            j = i + 1
            if pattern.startswith("^", j):
                j += 1
            if pattern.startswith("]", j):  # a leading `]` is a literal
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                if pattern.startswith("[:", j) and ":]" in pattern[j + 2 :]:
                    j = pattern.index(":]", j + 2) + 2
                else:
                    j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            out.append("_")
        else:
            out.append(c)
            i += 1
    return "".join(out)


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
    # Rewards only ask whether (or how often) a regex matches, never for its groups; without
    # submatch extraction a large alternation is several times faster per call.
    options.never_capture = True
    return re2.compile(prefix + pattern, options)
