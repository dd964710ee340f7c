"""Templates: resolve a template value to its text (inline, `file(...)` or a name), and pass `templates`,
which checks each step's templates against the variables the step provides."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ralign import ir
from ralign import nodes as n
from ralign import schema as sc
from ralign import templates as tp
from ralign.check.context import Context, TemplateValue, Work
from ralign.check.names import lookup
from ralign.errors import TemplateError
from ralign.imports import Unit, confined
from ralign.source import Source, Span


def template_value(
    w: Work, unit: Unit, value: n.Expr, key: str | None = None
) -> TemplateValue | None:
    """Resolve a template declaration's or attribute's value to its text and origin (parsed and vetted)."""
    if isinstance(value, n.String):
        col = value.span.column + (3 if value.long else 1)
        tv = TemplateValue(
            key or _inline_key(value.value),
            value.value,
            Span(value.span.file, value.span.line, col),
        )
    elif (
        isinstance(value, n.Call)
        and value.func.dotted == "file"
        and len(value.args) == 1
        and isinstance(value.args[0], n.String)
    ):
        found = _from_file(w, unit, value.args[0], key)
        if found is None:
            return None
        tv = found
    elif isinstance(value, n.Ref):
        return _named(w, unit, value)
    else:
        w.error(
            value.span,
            'a template is a string, """text""", file("x.j2"), or the name of a template',
        )
        return None
    try:
        tp.parse_template(tv.text)
    except TemplateError as exc:
        w.error(template_span(w, tv, getattr(exc, "line", None) or 1, None), _message(exc))
        return None
    w.templates[tv.key] = tv
    return tv


def _from_file(w: Work, unit: Unit, arg: n.String, key: str | None) -> TemplateValue | None:
    rel = arg.value
    if "\0" in rel:
        w.error(arg.span, "a template file name may not contain a NUL character")
        return None
    path = unit.folder / rel
    if not confined(path, w.ctx.loaded.roots):
        w.error(arg.span, f"template file '{rel}' is outside the import roots; refusing to read it")
        return None
    if not path.is_file():
        w.error(arg.span, f"template file '{rel}' does not exist")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        w.error(
            arg.span,
            f"template file '{rel}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
        )
        return None
    name = _display(path, unit, w.ctx.loaded.recipe_dir)
    w.sources.setdefault(name, Source(name, text, path))
    return TemplateValue(key or _inline_key(text), text, Span(name, 1, 1))


def _named(w: Work, unit: Unit, value: n.Ref) -> TemplateValue | None:
    found = lookup(w.ctx, unit.key, value, None, w.suggest)
    if isinstance(found, str):
        w.error(value.span, found)
        return None
    if found.keyword != "template":
        w.error(value.span, f"'{value.dotted}' is a {found.keyword}, not a template")
        return None
    if found.qname in w.templates:
        return w.templates[found.qname]
    if found.qname in w.in_progress:
        w.error(
            value.span,
            f"template '{value.dotted}' refers to itself, directly or through other templates",
        )
        return None
    w.in_progress.add(found.qname)
    try:
        return template_value(w, w.ctx.loaded.units[found.unit], found.decl.value, found.qname)
    finally:
        w.in_progress.discard(found.qname)


def template_span(w: Work, tv: TemplateValue, line: int, word: str | None) -> Span:
    """The recipe position of line `line` (1-based) of a template, at `word` when it is found there."""
    src_line = tv.origin.line + line - 1
    column = tv.origin.column if line == 1 else 1
    source = w.sources.get(tv.origin.file)
    if source is not None and word:
        text = source.line(src_line)
        found = re.compile(rf"(?<![\w.]){re.escape(word)}(?!\w)").search(
            text, column - 1 if line == 1 else 0
        )
        if found is not None:
            column = found.start() + 1
    return Span(tv.origin.file, src_line, column, src_line, column + len(word or " "))


def templates(ctx: Context) -> Context:
    """Every template a step uses reads only variables that the step provides, or text constants
    (`let`s of a text or a list of texts) of its own file: `{{ name }}`, or `{{ alias.name }}` for
    an imported file's. The constants it reads are put beside its text in the plan."""
    w = Work(ctx)
    for step in ctx.steps:
        kind = sc.STEPS[step.kind]
        for attr, key in step.templates.items():
            where = f"the {step.kind} step"
            provided = kind.provides(attr, step.params)
            tv = w.templates[key]
            lets = _lets_read(w, key, tp.parse_template(tv.text).names - set(provided))
            if lets:
                w.templates[key] = replace(tv, lets={**tv.lets, **lets})
            _check_use(w, tv, (*provided, *lets), where, step.attr_spans.get(attr, step.span))
    return w.finish()


def _lets_read(w: Work, key: str, names: Iterable[str]) -> dict[str, Any]:
    """The text constants among `names`, as seen from the file that declares template `key`."""
    from ralign.rewards.interpreter import Programs

    unit = key.rsplit(":", 1)[0] if not key.startswith("inline:") else w.ctx.loaded.main
    if unit not in w.ctx.symbols:
        unit = w.ctx.loaded.main
    values = Programs(ir.Programs(w.lets, w.defs, w.rewards))
    aliases = w.ctx.loaded.units[unit].alias_map()
    out: dict[str, Any] = {}
    for name in sorted(names):
        if name in aliases:
            table = w.ctx.symbols[aliases[name]]
            found = {
                k: _text_value(values, s.qname) for k, s in table.items() if s.keyword == "let"
            }
            found = {k: v for k, v in found.items() if v is not None}
            if found:
                out[name] = found
        elif (sym := w.ctx.symbols[unit].get(name)) is not None and sym.keyword == "let":
            value = _text_value(values, sym.qname)
            if value is not None:
                out[name] = value
    return out


def _text_value(values: Any, qname: str) -> Any:
    """A let's value when it is a text or a list of texts (what a template can print), else None."""
    if qname not in values.source.lets:
        return None
    value = values.let(qname)
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return value
    return None


def _check_use(
    w: Work, tv: TemplateValue, provided: tuple[str, ...], where: str, use: Span
) -> None:
    info = tp.parse_template(tv.text)
    for name, line, message in tp.check_variables(info, provided, where=where):
        w.error(template_span(w, tv, line, name), message, ((use, f"used by {where} here"),))


def _message(exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith("template") else f"template: {text}"


def _inline_key(text: str) -> str:
    return "inline:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _display(path: Path, unit: Unit, recipe_dir: Path) -> str:
    """How a template file is named in messages and plans: relative to the recipe, or std/..."""
    if unit.key.startswith("std/"):
        return "std/" + path.name
    return Path(os.path.relpath(path.resolve(), recipe_dir)).as_posix()
