"""Source text -> AST: the Lark LALR parser, tree-to-node conversion, and friendly parse errors."""

from __future__ import annotations

import hashlib
import math
import re
from bisect import bisect_left
from dataclasses import fields
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, Tree
from lark import __version__ as lark_version
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, VisitError
from lark.grammar import NonTerminal, Rule
from lark.lexer import TerminalDef
from lark.parsers.lalr_analysis import Shift

from ralign import nodes as n
from ralign.cache import read_json, write_json
from ralign.errors import Diagnostic, RecipeError
from ralign.source import Source, Span


def grammar_path() -> Path:
    """The grammar file: beside the package in a source tree, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "grammar" / "ralign.lark", here.parent / "grammar" / "ralign.lark"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("grammar/ralign.lark is missing from the ralign installation")


@cache
def parser(kind: str = "lalr", strict: bool = False) -> Lark:
    """The shared parser (`kind="earley"` exists only for the benchmark).

    The LALR parser is loaded from its tables, which Lark serializes as JSON (no pickle) into
    the cache, keyed by the grammar's text and Lark's version: building them took ~0.5 s of
    every `ralign` command, most of it Lark validating its own meta-grammar and ours.
    `strict=True` builds from the grammar and proves it free of LALR conflicts and colliding
    terminals (a test does, once).
    """
    grammar = grammar_path().read_text(encoding="utf-8")
    options = dict(maybe_placeholders=False, start=["start", "expr"])  # `expr`: a `--set` value
    if kind != "lalr":
        return Lark(grammar, parser=kind, **options)  # type: ignore[arg-type]
    if strict:
        return Lark(grammar, parser="lalr", strict=True, transformer=_INLINE, **options)  # type: ignore[arg-type]
    key = hashlib.sha256(f"{lark_version}\0{grammar}".encode()).hexdigest()[:16]
    name = f"grammar-{key}.json"
    tables = read_json(name, _int_keys)
    if tables is not None:
        try:
            # Loaded lexers skip re-validating the terminals (as Lark's own cache does).
            return Lark._load_from_dict(tables["data"], tables["memo"], transformer=_INLINE)
        except Exception:  # noqa: BLE001 -- a stale or damaged cache entry is rebuilt, never fatal
            pass
    plain = Lark(grammar, parser="lalr", **options)  # type: ignore[arg-type]
    data, memo = plain.memo_serialize([TerminalDef, Rule])
    write_json(name, {"data": data, "memo": memo})
    return Lark._load_from_dict(data, memo, transformer=_INLINE)


def _int_keys(pairs: list[tuple[str, Any]]) -> dict[Any, Any]:
    """JSON writes Lark's integer keys (states, memo ids) as strings; no name is all digits."""
    return {int(k) if k.isdigit() else k: v for k, v in pairs}


def parse(source: Source, kind: str = "lalr") -> n.Module:
    """Parse one file into a Module, or raise RecipeError with a positioned diagnostic.

    Results are cached by (name, text): nodes are immutable, so the stdlib and shared
    libraries are parsed once per process however many recipes import them.
    """
    return _parse_cached(source.name, source.text, kind)


def clear_cache() -> None:
    """Forget parsed files (a benchmark of cold compiles parses everything again)."""
    _parse_cached.cache_clear()


def parse_value(source: Source) -> n.Expr:
    """Parse one expression (a `--set` value), or raise RecipeError pointing into it."""
    try:
        _INLINE.file = source.name
        value: n.Expr = parser("lalr").parse(source.text, start="expr")  # type: ignore[assignment]
    except UnexpectedInput as exc:
        raise RecipeError([_diagnose(source, exc, "lalr")], {source.name: source}) from None
    except (_NodeError, VisitError) as exc:
        error = exc.orig_exc if isinstance(exc, VisitError) else exc
        if not isinstance(error, _NodeError):
            raise
        raise RecipeError([Diagnostic(*error.args)], {source.name: source}) from None
    deep = _nodes_too_deep([value], MAX_DEPTH)  # type: ignore[list-item]
    if deep is not None:
        message = f"this expression nests more than {MAX_DEPTH} levels deep"
        raise RecipeError([Diagnostic(Span(source.name, *deep), message)], {source.name: source})
    return value


@lru_cache(maxsize=256)
def _parse_cached(name: str, text: str, kind: str) -> n.Module:
    source = Source(name, text)
    deep: tuple[int, int] | None = None
    decls: list[n.Decl]
    try:
        if kind == "lalr":
            _INLINE.file = name
            try:
                decls = _fast(parser(kind), text, "start")
            except _Fallback:  # Lark's own lexer and parser say exactly what is wrong
                decls = parser(kind).parse(text, start="start")  # type: ignore[assignment]
            deep = _nodes_too_deep(decls, MAX_DEPTH)
        else:
            tree = parser(kind).parse(text, start="start")
            deep = _too_deep(tree, MAX_DEPTH)  # checked first: Lark's transformer recurses
            decls = [] if deep else _ToNodes(name).transform(tree)  # type: ignore[assignment]
    except UnexpectedInput as exc:
        raise RecipeError([_diagnose(source, exc, kind)], {source.name: source}) from None
    except (_NodeError, VisitError) as exc:  # a node-building check (e.g. a bad escape) failed
        error = exc.orig_exc if isinstance(exc, VisitError) else exc
        if not isinstance(error, _NodeError):
            raise
        span, message = error.args
        raise RecipeError([Diagnostic(span, message)], {source.name: source}) from None
    if (
        deep is not None
    ):  # every later stage recurses over expressions; refuse before it can overflow
        message = (
            f"this expression nests more than {MAX_DEPTH} levels deep; split it with `let` or `def`"
        )
        raise RecipeError([Diagnostic(Span(source.name, *deep), message)], {source.name: source})
    return n.Module(file=source.name, decls=tuple(decls))


def _nodes_too_deep(decls: list[n.Decl], limit: int) -> tuple[int, int] | None:
    """(line, column) of the first node nested deeper than `limit`, found without recursion."""
    stack: list[tuple[object, int]] = [(d, 0) for d in decls]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            span = node.span  # type: ignore[attr-defined]
            return (span.line, span.column)
        for name in _child_fields(type(node)):  # type: ignore[arg-type]
            value = getattr(node, name)
            if isinstance(value, tuple):
                stack.extend((v, depth + 1) for v in value if not isinstance(v, str))
            elif value is not None:
                stack.append((value, depth + 1))
    return None


@cache
def _child_fields(cls: type) -> tuple[str, ...]:
    """The fields of a node class that can hold other nodes (not spans, names or numbers)."""
    plain = {
        "span",
        "name_span",
        "path_span",
        "name",
        "kind",
        "value",
        "path",
        "alias",
        "params",
        "pattern",
        "flags",
        "long",
        "op",
        "parts",
        "file",
    }
    out = tuple(f.name for f in fields(cls) if f.name not in plain)
    if cls in (n.Let, n.Template, n.Attr, n.Rule):
        out += ("value",)
    return out


# How deep a parse tree may nest (operators, calls, lists; parentheses add no level): far beyond any
# hand-written expression, well within Python's recursion limit for the stages that follow.
MAX_DEPTH = 200


def _too_deep(tree: Tree, limit: int) -> tuple[int, int] | None:
    """(line, column) of the first subtree nested deeper than `limit`, found without recursion."""
    stack: list[tuple[Tree, int, tuple[int, int]]] = [(tree, 0, (1, 1))]
    while stack:
        node, depth, where = stack.pop()
        first = next((t for t in node.children if isinstance(t, Token)), None)
        if first is not None and first.line is not None:
            where = (first.line, first.column or 1)
        if depth > limit:
            return where
        stack.extend(
            (child, depth + 1, where) for child in node.children if isinstance(child, Tree)
        )
    return None


# ---- the fast path ----------------------------------------------------------------
#
# Lark's LALR tables and node callbacks, driven by a tighter loop and a one-regex lexer: Lark's
# generic driver and contextual lexer cost ~20 us a token, which made a 20,000-line recipe take
# seconds. Any input the fast path cannot take (a lexing or parsing error) is parsed again by
# Lark itself, so every diagnostic is Lark's. When the fast path succeeds it has built exactly
# the tokens Lark's contextual lexer would: each token is accepted by the parser state it was
# read in, the regex alternation keeps Lark's terminal order (priority, width, length, name), a
# keyword is a keyword only where the state accepts it (else a NAME, as Lark's unless-callbacks
# do), and `/` starts a /regex/ only where the state accepts one. tests/test_parser.py and
# tests/test_fuzz.py check the two paths give equal nodes on every recipe in the repository and
# on fuzzed ones.


_NEWLINE = re.compile("\n")


class _Fallback(Exception):
    """The fast path met something only Lark's full parser should judge."""


class _Tables:
    """What the fast path needs from a built Lark LALR parser, computed once."""

    def __init__(self, lark: Lark) -> None:
        terminals = sorted(
            lark.terminals,
            key=lambda t: (-t.priority, -t.pattern.max_width, -len(t.pattern.value), t.name),
        )
        by_name = {t.name: t for t in terminals}
        word = re.compile(by_name["NAME"].pattern.to_regexp())
        self.keywords = {
            t.pattern.value: t.name
            for t in terminals
            if t.pattern.type == "str" and word.fullmatch(t.pattern.value)
        }
        self.slash = next(
            t.name for t in terminals if t.pattern.type == "str" and t.pattern.value == "/"
        )
        self.regex = re.compile(by_name["REGEX"].pattern.to_regexp()).match
        kept = [
            t
            for t in terminals
            if t.name != "REGEX"
            and not (t.pattern.type == "str" and t.pattern.value in self.keywords)
        ]
        # Ignored text (spaces, comments) is skipped inside the same match as the token after it.
        skip = "|".join(by_name[name].pattern.to_regexp() for name in lark.lexer_conf.ignore)
        alternatives = "|".join(f"(?P<{t.name}>{t.pattern.to_regexp()})" for t in kept)
        # Atomic: a run of blanks is never split up again when the token after it fails to match.
        self.match = re.compile(f"(?>(?:{skip})*)(?:{alternatives}|(?P<_EOF>\\Z))").match
        lalr = lark.parser.parser.parser  # ParsingFrontend -> LALR_Parser -> _Parser
        table = lalr.parse_table
        # Lark keys its tables by Token and Rule objects, whose Python-level __eq__ ran on every
        # lookup: re-keyed by plain strings. A reduce is (width, callback, the rule's name); a
        # rule that only passes its one child up (`?expr: or_expr`) has no callback to call.
        reduce = {
            rule: (
                len(rule.expansion),
                None if _passes_child(rule) else lalr.callbacks[rule],
                str(rule.origin.name),
            )
            for rule in lalr.callbacks
        }
        self.states = {
            state: {
                str(term): (True, arg) if action is Shift else (False, reduce[arg])
                for term, (action, arg) in actions.items()
            }
            for state, actions in table.states.items()
        }
        # Terminals Lark's tree builder always drops (`"let"`, `"="`, `"("`): no Token is built.
        uses: dict[str, set[bool]] = {}
        for rule in lalr.callbacks:
            for symbol in rule.expansion:
                if symbol.is_term:
                    uses.setdefault(symbol.name, set()).add(symbol.filter_out)
        self.dropped = frozenset(name for name, filtered in uses.items() if filtered == {True})
        self.chains: dict[tuple[int, int, str], int] = {}
        self.start_states = {str(k): v for k, v in table.start_states.items()}
        self.end_states = {str(k): v for k, v in table.end_states.items()}


def _chain(states: dict[Any, Any], below: int, top: int, kind: str) -> int:
    """The top state after every pass-the-child reduce that lookahead `kind` triggers on `top`."""
    while True:
        try:
            shift, arg = states[top][kind]
        except KeyError:
            raise _Fallback from None
        if shift or arg[1] is not None:
            return top
        top = states[below][arg[2]][1]


def _passes_child(rule: Rule) -> bool:
    """A `?rule` alternative of one nonterminal and no alias: Lark returns that child as is."""
    expansion = rule.expansion
    return (
        rule.options.expand1
        and rule.alias is None
        and len(expansion) == 1
        and isinstance(expansion[0], NonTerminal)
    )


@cache
def _tables(lark: Lark) -> _Tables:
    return _Tables(lark)


def _fast(lark: Lark, text: str, start: str) -> Any:
    """Parse `text` with Lark's tables and callbacks, or raise _Fallback."""
    t = _tables(lark)
    states, match, keywords = t.states, t.match, t.keywords
    stack, end = [t.start_states[start]], t.end_states[start]
    values: list[Any] = []
    chains, dropped = t.chains, t.dropped
    new = Token._future_new  # (type, value, start_pos, line, column, end_line, end_column, end_pos)
    newlines = [m.start() for m in _NEWLINE.finditer(text)]
    pos = 0
    while True:
        m = match(text, pos)
        if m is None:
            raise _Fallback
        kind: str = m.lastgroup or ""  # every alternative is a named group
        done = kind == "_EOF"
        token = None  # also stands for a token the tree builder drops: none is built
        if done:
            kind = "$END"
        else:
            at, stop = m.span(kind)
            if kind == "NAME":
                keyword = keywords.get(m.group(kind))
                if keyword is not None and keyword in states[stack[-1]]:
                    kind = keyword
            elif kind == t.slash and "REGEX" in states[stack[-1]]:
                r = t.regex(text, at)
                if r is not None:
                    kind, stop = "REGEX", r.end()
            if kind not in dropped:
                line = bisect_left(newlines, at)  # newlines before the token: its line - 1
                column = at - (newlines[line - 1] if line else -1)
                multiline = text.find("\n", at, stop) >= 0
                end_line = bisect_left(newlines, stop - 1) if multiline else line
                end_column = stop - (newlines[end_line - 1] if end_line else -1)
                token = new(
                    kind, text[at:stop], at, line + 1, column, end_line + 1, end_column, stop
                )
            pos = stop
        while True:  # reduce as long as the lookahead asks, then shift it
            try:
                shift, arg = states[stack[-1]][kind]
            except KeyError:
                raise _Fallback from None
            if shift:
                stack.append(arg)
                values.append(token)
                break
            width, callback, origin = arg
            if callback is None:  # the child stands for the rule: only the top state changes
                # A run of such rules (atom -> unary -> ... -> expr) depends only on the state
                # below the child, the state on top and the lookahead: walked once, then looked up.
                key = (stack[-2], stack[-1], kind)
                top = chains.get(key)
                if top is None:
                    top = chains[key] = _chain(states, stack[-2], stack[-1], kind)
                stack[-1] = top
                if done and top == end:
                    return values[-1]
                continue
            if width:
                children = values[-width:]
                del stack[-width:]
                del values[-width:]
            else:
                children = []
            values.append(callback(children))
            stack.append(states[stack[-1]][origin][1])
            if done and stack[-1] == end:
                return values[-1]


# ---- errors ---------------------------------------------------------------------

_WORDS = {
    "NAME": "a name",
    "STRING": "a string",
    "LONG_STRING": 'a """string"""',
    "NUMBER": "a number",
    "REGEX": "a /regex/",
    "COMPARE": "a comparison",
    "$END": "the end of the file",
}


def _word(terminal: str, lark: Lark) -> str:
    if terminal in _WORDS:
        return _WORDS[terminal]
    try:
        pattern = lark.get_terminal(terminal).pattern
    except KeyError:
        return terminal.lower()
    return f"'{pattern.value}'"


def _describe(token: Token | str, lark: Lark) -> str:
    if not isinstance(token, Token) or token.type == "$END":
        return "the end of the file"
    text = str(token)
    if token.type in ("STRING", "LONG_STRING"):
        return "a string"
    return f"'{text[:30]}'"


def _diagnose(source: Source, exc: UnexpectedInput, kind: str) -> Diagnostic:
    lark = parser(kind)
    line = getattr(exc, "line", 1) or 1
    column = getattr(exc, "column", 1) or 1
    if line < 1:  # Lark reports the end of input as line -1
        line, column = _end_of(source)
    span = Span(source.name, line, column)
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = source.text[pos] if pos < len(source.text) else ""
        if (
            char == '"' and source.text[max(0, pos - 2) : pos + 1] == '"""'
        ):  # `""` lexed as an empty string
            return Diagnostic(
                Span(source.name, line, max(1, column - 2)), 'this """string""" is never closed'
            )
        hint = ""
        if char == '"':
            hint = (
                ' (a string must close on the same line; use """...""" for text over several lines)'
            )
        elif char == "/":
            hint = " (a /regex/ must close on the same line)"
        return Diagnostic(span, f"unexpected character {char!r}{hint}")
    expected = sorted(getattr(exc, "expected", None) or getattr(exc, "accepts", None) or ())
    token = getattr(exc, "token", None)
    if {"NUMBER", "STRING", "NAME"} <= set(expected):  # an operand may stand here
        expected = [t for t in expected if t not in _OPERAND_STARTS] + ["@expr"]
    words = sorted({"an expression" if t == "@expr" else _word(t, lark) for t in expected})
    listed = words[0] if len(words) == 1 else "one of " + ", ".join(words)
    got = _describe(token, lark) if token is not None else "the end of the file"
    message = f"expected {listed}, but found {got}"
    at_end = token is None or (isinstance(token, Token) and token.type == "$END")
    if at_end or set(expected) & {"RBRACE", "RSQB", "RPAR"}:
        opener = _innermost_open(exc)
        if opener is None:  # no parser state to ask: scan the text for braces
            upto = len(source.text) if at_end else (getattr(token, "start_pos", None) or 0)
            brace = _unclosed_brace(source, upto)
            opener = None if brace is None else ("{", *brace)
        if opener is not None:
            char, o_line, o_col = opener
            close = _CLOSER[char]
            where = Span(source.name, o_line, o_col)
            if at_end:
                return Diagnostic(
                    where,
                    f"this '{char}' is never closed: expected '{close}' before the end of the file",
                    ((span, message),),
                )
            if str(token) in _TOP_LEVEL:
                what = "the block" if char == "{" else f"the '{char}'"
                message += f" (is {what} opened at line {o_line} missing its '{close}'?)"
                return Diagnostic(span, message, ((where, f"{what} opened here"),))
    return Diagnostic(span, message)


_CLOSER = {"{": "}", "[": "]", "(": ")"}


def _innermost_open(exc: UnexpectedInput) -> tuple[str, int, int] | None:
    """The innermost bracket still open when the LALR parser stopped: (char, line, column)."""
    state = getattr(getattr(exc, "interactive_parser", None), "parser_state", None)
    if state is None:
        return None
    opened = [
        v
        for v in state.value_stack
        if isinstance(v, Token) and v.type in ("LBRACE", "LSQB", "LPAR")
    ]
    if not opened:
        return None
    tok = opened[-1]
    return str(tok), tok.line or 1, tok.column or 1


_OPERAND_STARTS = {
    "NUMBER",
    "STRING",
    "LONG_STRING",
    "REGEX",
    "NAME",
    "LPAR",
    "LSQB",
    "LBRACE",
    "MINUS",
    "NOT",
    "TRUE",
    "FALSE",
}
_TOP_LEVEL = {
    "recipe",
    "import",
    "model",
    "dataset",
    "template",
    "let",
    "def",
    "reward",
    "phase",
    "evaluate",
}


def _end_of(source: Source) -> tuple[int, int]:
    lines = source.text.split(
        "\n"
    )  # as the lexer counts lines (not str.splitlines, which also breaks at \f, \x1c, U+2028...)
    return len(lines), len(lines[-1]) + 1


def _unclosed_brace(source: Source, upto: int) -> tuple[int, int] | None:
    """Where the innermost '{' still open at offset `upto` was opened (strings and comments skipped)."""
    stack: list[tuple[int, int]] = []
    text, i, line, col = source.text[:upto], 0, 1, 1
    while i < len(text):
        c = text[i]
        if text.startswith('"""', i):
            j = text.find('"""', i + 3)
            j = len(text) if j < 0 else j + 3
        elif c == '"':
            j = i + 1
            while j < len(text) and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            j += 1
        elif c == "#":
            j = text.find("\n", i)
            j = len(text) if j < 0 else j
        else:
            if c == "{":
                stack.append((line, col))
            elif c == "}" and stack:
                stack.pop()
            j = i + 1
        chunk = text[i:j]
        newlines = chunk.count("\n")
        if newlines:
            line += newlines
            col = len(chunk) - chunk.rfind("\n")
        else:
            col += len(chunk)
        i = j
    return stack[-1] if stack else None


# ---- tree -> nodes ----------------------------------------------------------------


class _NodeError(Exception):
    """Raised inside the transformer; turned into a diagnostic by `parse`."""


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/", "0": "\0"}


def unescape(body: str, span: Span) -> str:
    """Decode the escapes of a "..." string (no eval: a fixed table, plus \\uXXXX)."""
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1] if i + 1 < len(body) else ""
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and len(body) >= i + 6 and _is_hex(body[i + 2 : i + 6]):
            code = int(body[i + 2 : i + 6], 16)
            if (
                0xD800 <= code <= 0xDFFF
            ):  # a lone surrogate is not a character: it cannot be written as UTF-8
                raise _NodeError(
                    span, f"'\\u{body[i + 2 : i + 6]}' is a surrogate code point, not a character"
                )
            out.append(chr(code))
            i += 6
        else:
            raise _NodeError(
                span,
                f"unknown escape '\\{nxt}' in string (known: \\n \\t \\r \\\" \\\\ \\/ \\uXXXX)",
            )
    return "".join(out)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


class _ToNodes(Transformer):
    """Tree -> nodes. Spans come from tokens and child nodes (no Lark position propagation,
    which doubled the parse time): a node spans its first token to its last."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    def _tok(self, tok: Token) -> Span:
        return Span(
            self.file, tok.line or 1, tok.column or 1, tok.end_line or 0, tok.end_column or 0
        )

    def _join(self, first: object, last: object) -> Span:
        # Read positions straight off tokens and child spans: no throwaway Span per end.
        if isinstance(first, Token):
            line, column = first.line or 1, first.column or 1
        else:
            line, column = first.span.line, first.span.column  # type: ignore[attr-defined]
        if isinstance(last, Token):
            end_line, end_column = last.end_line or 0, last.end_column or 0
        else:
            end_line, end_column = last.span.end_line, last.span.end_column  # type: ignore[attr-defined]
        return Span(self.file, line, column, end_line, end_column)

    # declarations
    def start(self, c):  # type: ignore[no-untyped-def]
        return c

    def recipe(self, c):  # type: ignore[no-untyped-def]
        return n.Recipe(self._join(c[0], c[1]), self._string(c[1]), c[2])

    def import_decl(self, c):  # type: ignore[no-untyped-def]
        alias = str(c[2]) if len(c) > 2 else None
        return n.Import(self._join(c[0], c[-1]), self._string(c[1]), self._tok(c[1]), alias)

    def model(self, c):  # type: ignore[no-untyped-def]
        return n.Model(self._tok(c[0]), str(c[0]), c[1])

    def dataset(self, c):  # type: ignore[no-untyped-def]
        return n.Dataset(self._tok(c[0]), str(c[0]), c[1])

    def template(self, c):  # type: ignore[no-untyped-def]
        return n.Template(self._tok(c[0]), str(c[0]), c[1])

    def let(self, c):  # type: ignore[no-untyped-def]
        return n.Let(self._tok(c[0]), str(c[0]), c[1])

    def def_(self, c):  # type: ignore[no-untyped-def]
        return n.Def(self._tok(c[0]), str(c[0]), c[1], c[2])

    def params(self, c):  # type: ignore[no-untyped-def]
        return tuple(str(t) for t in c)

    def reward(self, c):  # type: ignore[no-untyped-def]
        return n.Reward(self._tok(c[0]), str(c[0]), tuple(c[1:]))

    def rule(self, c):  # type: ignore[no-untyped-def]
        when = c[2] if len(c) > 2 else None
        return n.Rule(self._tok(c[0]), str(c[0]), c[1], when)

    def phase(self, c):  # type: ignore[no-untyped-def]
        return n.Phase(self._tok(c[0]), str(c[0]), tuple(c[1:]))

    def step(self, c):  # type: ignore[no-untyped-def]
        kind = c[0]
        name = c[1] if len(c) == 3 else None
        return n.Step(
            self._tok(kind),
            str(kind),
            str(name) if name is not None else None,
            c[-1],
            self._tok(name) if name is not None else None,
        )

    def evaluate(self, c):  # type: ignore[no-untyped-def]
        return n.Evaluate(self._tok(c[0]), str(c[0]), c[1])

    def block(self, c):  # type: ignore[no-untyped-def]
        return tuple(c)

    def attr(self, c):  # type: ignore[no-untyped-def]
        return n.Attr(self._tok(c[0]), str(c[0]), c[1])

    # expressions
    def _string(self, tok: Token) -> str:
        return unescape(str(tok)[1:-1], self._tok(tok))

    def number(self, c):  # type: ignore[no-untyped-def]
        value = float(c[0])
        if not math.isfinite(value):  # plans are JSON, which has no infinity
            raise _NodeError(self._tok(c[0]), f"the number {str(c[0])[:30]} is too large")
        return n.Number(self._tok(c[0]), value)

    def string(self, c):  # type: ignore[no-untyped-def]
        return n.String(self._tok(c[0]), self._string(c[0]))

    def long_string(self, c):  # type: ignore[no-untyped-def]
        return n.String(self._tok(c[0]), str(c[0])[3:-3], long=True)

    def regex(self, c):  # type: ignore[no-untyped-def]
        text = str(c[0])
        end = text.rfind("/")
        return n.Regex(self._tok(c[0]), text[1:end].replace("\\/", "/"), text[end + 1 :])

    def true(self, c):  # type: ignore[no-untyped-def]
        return n.Bool(self._tok(c[0]), True)

    def false(self, c):  # type: ignore[no-untyped-def]
        return n.Bool(self._tok(c[0]), False)

    def dotted(self, c):  # type: ignore[no-untyped-def]
        if len(c) == 1:  # the common case, a plain name
            return n.Ref(self._tok(c[0]), (str(c[0]),))
        return n.Ref(self._join(c[0], c[-1]), tuple(str(t) for t in c))

    def ref(self, c):  # type: ignore[no-untyped-def]
        return c[0]

    def call(self, c):  # type: ignore[no-untyped-def]
        return n.Call(self._join(c[0], c[-1]), c[0], c[1])

    def args(self, c):  # type: ignore[no-untyped-def]
        return tuple(c)

    def list(self, c):  # type: ignore[no-untyped-def]
        return n.ListExpr(self._join(c[0], c[-1]), tuple(c[1:-1]))

    def map(self, c):  # type: ignore[no-untyped-def]
        return n.MapExpr(self._join(c[0], c[-1]), tuple(c[1:-1]))

    def neg(self, c):  # type: ignore[no-untyped-def]
        return n.Unary(self._join(c[0], c[-1]), "-", c[-1])

    def not_(self, c):  # type: ignore[no-untyped-def]
        return n.Unary(self._join(c[0], c[-1]), "not", c[-1])

    def _bin(self, op: str, c):  # type: ignore[no-untyped-def]
        return n.Binary(self._join(c[0], c[-1]), op, c[0], c[-1])

    def compare(self, c):  # type: ignore[no-untyped-def]
        return self._bin(str(c[1]), c)

    def or_(self, c):  # type: ignore[no-untyped-def]
        return self._bin("or", c)

    def and_(self, c):  # type: ignore[no-untyped-def]
        return self._bin("and", c)

    def add(self, c):  # type: ignore[no-untyped-def]
        return self._bin("+", c)

    def sub(self, c):  # type: ignore[no-untyped-def]
        return self._bin("-", c)

    def mul(self, c):  # type: ignore[no-untyped-def]
        return self._bin("*", c)

    def div(self, c):  # type: ignore[no-untyped-def]
        return self._bin("/", c)


# `def` is a Python keyword, so the grammar rule named `def` needs an alias here.
setattr(_ToNodes, "def", _ToNodes.def_)
# The LALR parser's built-in transformer; `file` is set before each parse (parsing is not re-entrant).
_INLINE = _ToNodes("")
_ = Tree  # re-exported for type users
