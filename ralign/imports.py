"""The import graph: find, confine and parse every file a recipe imports, once each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ralign import nodes as n
from ralign.errors import Diagnostic, RecipeError, did_you_mean
from ralign.source import Source, Span
from ralign.syntax import parse


def stdlib_dir() -> Path:
    """The shipped stdlib: inside the package in a wheel, beside it in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "stdlib", here.parent / "stdlib"):
        if (candidate / "hhh.ralign").is_file():
            return candidate
    raise FileNotFoundError("the ralign stdlib is missing from this installation")


@dataclass(frozen=True)
class Unit:
    """One loaded file: its key (how plans name it), folder, AST and resolved imports (alias -> key)."""

    key: str
    folder: Path
    module: n.Module
    imports: tuple[tuple[str, str, Span], ...]  # (alias, key, span of the import)

    def alias_map(self) -> dict[str, str]:
        return {alias: key for alias, key, _ in self.imports}


@dataclass(frozen=True)
class Loaded:
    main: str
    units: dict[str, Unit]
    sources: dict[str, Source]
    roots: tuple[Path, ...]
    recipe_dir: Path


def confined(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path` (resolved, symlinks followed) lies inside one of `roots`."""
    real = path.resolve()
    return any(real == r or r in real.parents for r in roots)


def load(path: Path, extra_roots: tuple[Path, ...] = (), parser_kind: str = "lalr") -> Loaded:
    """Parse `path` and everything it imports; all import problems are reported together.

    Args:
        path: the recipe file.
        extra_roots: further folders imports and data may come from (the recipe's folder
            and the stdlib always are roots).
        parser_kind: the Lark parser: "lalr" ("earley" exists only for bench/compile.py).
    """
    path = path.resolve()
    recipe_dir = path.parent
    std = stdlib_dir().resolve()
    roots = (recipe_dir, *(r.resolve() for r in extra_roots), std)
    units: dict[str, Unit] = {}
    sources: dict[str, Source] = {}
    problems: list[Diagnostic] = []

    def key_for(p: Path) -> str:
        if std == p.parent or std in p.parents:
            return "std/" + p.relative_to(std).with_suffix("").as_posix()
        for root in roots:
            if root == p.parent or root in p.parents:
                return p.relative_to(root).as_posix()
        return p.name  # unreachable: callers confine first

    def visit(file: Path, key: str, chain: tuple[str, ...]) -> None:
        if key in units:
            return
        try:
            source = _read(file, key)
        except UnicodeDecodeError as exc:
            data = file.read_bytes()[: exc.start]
            line = data.count(b"\n") + 1
            column = len(data) - (data.rfind(b"\n") + 1) + 1
            problems.append(
                Diagnostic(
                    Span(key, line, column),
                    f"this file is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
                )
            )
            return
        sources[key] = source
        try:
            module = parse(source, parser_kind)
        except RecipeError as exc:
            problems.extend(exc.diagnostics)
            return
        resolved: list[tuple[str, str, Span]] = []
        seen_alias: dict[str, Span] = {}
        for decl in module.decls:
            if not isinstance(decl, n.Import):
                continue
            target = _resolve(decl, file.parent, std, roots, problems)
            if target is None:
                continue
            tkey = key_for(target)
            alias = decl.alias or target.stem
            if alias in seen_alias:
                problems.append(
                    Diagnostic(
                        decl.span,
                        f"the namespace '{alias}' is already imported; use `as` to name this one differently",
                    )
                )
                continue
            seen_alias[alias] = decl.span
            trail = (*chain, key)
            if tkey in trail:
                cycle = " -> ".join((*trail[trail.index(tkey) :], tkey))
                problems.append(Diagnostic(decl.path_span, f"import cycle: {cycle}"))
                continue
            resolved.append((alias, tkey, decl.span))
            visit(target, tkey, (*chain, key))
        units[key] = Unit(key, file.parent, module, tuple(resolved))

    main_key = path.name
    visit(path, main_key, ())
    if problems:
        raise RecipeError(problems, sources)
    return Loaded(main_key, units, sources, roots, recipe_dir)


def _read(file: Path, key: str) -> Source:
    """A file's text as UTF-8, newlines made `\\n` (a leading byte-order mark, which some editors write, is dropped)."""
    text = (
        file.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    )  # universal newlines
    return Source(name=key, text=text.removeprefix("\ufeff"), path=file)


def _resolve(
    decl: n.Import, folder: Path, std: Path, roots: tuple[Path, ...], problems: list[Diagnostic]
) -> Path | None:
    text = decl.path
    if "\0" in text:
        problems.append(
            Diagnostic(decl.path_span, "an import path may not contain a NUL character")
        )
        return None
    if text.startswith("std/"):
        target = std / (text[4:] + ("" if text.endswith(".ralign") else ".ralign"))
        if not confined(target, (std,)) or not target.is_file():
            known = sorted("std/" + p.stem for p in std.glob("*.ralign"))
            problems.append(
                Diagnostic(
                    decl.path_span,
                    f"no stdlib module '{text}' (it has: {', '.join(known)}){did_you_mean(text, known)}",
                )
            )
            return None
        return target
    if not (text.startswith("./") or text.startswith("../")):
        problems.append(
            Diagnostic(
                decl.path_span, f"import paths start with 'std/', './' or '../', not '{text}'"
            )
        )
        return None
    target = folder / text
    if not confined(target, roots):
        problems.append(
            Diagnostic(
                decl.path_span,
                f"import '{text}' points outside the import roots (the recipe's folder, the stdlib, and any --root); refusing to read it",
            )
        )
        return None
    if not target.is_file():
        problems.append(Diagnostic(decl.path_span, f"imported file '{text}' does not exist"))
        return None
    return target
