"""Pass `declarations`: the recipe block, models, datasets and evaluations, and which model is the policy.

Every input a recipe names is confined and fingerprinted here: local data files and model folders
must lie inside the import roots and are hashed by content; hub names must be hub ids.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ralign import inputs
from ralign import nodes as n
from ralign import schema as sc
from ralign.check.attrs import BAD, check_attrs, value_check
from ralign.check.context import Context, Work
from ralign.errors import DataError
from ralign.imports import Unit, confined
from ralign.source import Span

MAX_NAME = 100  # characters in a recipe name (it names the default run folder)


def declarations(ctx: Context) -> Context:
    """Check the main file's recipe block, models, datasets and evaluations."""
    w = Work(ctx)
    main = ctx.loaded.units[ctx.loaded.main]
    recipe = _recipe(w, main)
    models = {d.name: _model(w, main, d) for d in ctx.decls(n.Model)}
    datasets = {d.name: _dataset(w, main, d) for d in ctx.decls(n.Dataset)}
    evaluations = tuple(_evaluation(w, main, d, datasets) for d in ctx.decls(n.Evaluate))
    return w.finish(
        recipe=recipe,
        models=models,
        datasets=datasets,
        evaluations=evaluations,
        policy=_policy(w, models),
    )


def _recipe(w: Work, main: Unit) -> dict[str, Any]:
    decl = next(iter(w.ctx.decls(n.Recipe)), None)
    if decl is None:
        return {}
    out = check_attrs(w, main, decl.attrs, sc.DECLS["recipe"].attrs, "the recipe block", decl.span)
    problem = name_problem(decl.name)
    if problem:
        w.error(decl.span, problem)
    out["name"] = decl.name
    return out


def name_problem(name: str) -> str | None:
    """Why a recipe name is not a name (it names the run folder `runs/<name>`), or None."""
    if not name.strip():
        return "the recipe needs a non-empty name"
    bad = next((c for c in name if c in "/\\" or unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        return f"a recipe name is a name, not a path: it may not contain {bad!r}"
    if name.startswith(".") or name != name.strip():
        return "a recipe name may not start with '.' or begin or end with spaces"
    if len(name) > MAX_NAME:
        return f"a recipe name has at most {MAX_NAME} characters, this one {len(name)}"
    return None


def _model(w: Work, main: Unit, decl: n.Model) -> dict[str, Any]:
    what = f"model '{decl.name}'"
    attrs = check_attrs(w, main, decl.attrs, sc.DECLS["model"].attrs, what, decl.span)
    path = attrs.get("path")
    if not isinstance(path, str):
        return attrs
    span = next(a.value.span for a in decl.attrs if a.name == "path")
    if path.startswith("ralign:"):
        name = path[len("ralign:") :]
        if name not in sc.BUILTIN_MODELS:
            builtin = ", ".join("ralign:" + m for m in sc.BUILTIN_MODELS)
            w.error(
                span,
                f"unknown built-in model '{path}' (built in: {builtin}){w.suggest(name, sc.BUILTIN_MODELS)}",
            )
    elif (local := _local_folder(w, main, path, span)) is not None:
        attrs.update(local)
    elif (problem := inputs.hub_model_problem(path)) is not None:
        w.error(span, problem)
    _chat_template(w, main, decl, attrs)
    _max_length(w, decl, attrs)
    return attrs


def _max_length(w: Work, decl: n.Model, attrs: dict[str, Any]) -> None:
    """A `max_length` the recipe sets may not pass the model's positions, where they are known
    (built-in models, local folders); the default is cut to fit when the model loads."""
    written = next((a for a in decl.attrs if a.name == "max_length"), None)
    if written is None or not isinstance(attrs.get("max_length"), int):
        return
    path = str(attrs.get("path", ""))
    positions = (
        sc.BUILTIN_POSITIONS.get(path.removeprefix("ralign:"))
        if path.startswith("ralign:")
        else None
    )
    if "sha256" in attrs:
        positions = inputs.model_positions(w.ctx.loaded.recipe_dir / path)
    if positions is not None and attrs["max_length"] > positions:
        w.error(
            written.value.span,
            f"`max_length` of model '{decl.name}' is {attrs['max_length']}, but the model takes at most {positions} tokens",
        )


def _chat_template(w: Work, unit: Unit, decl: n.Model, attrs: dict[str, Any]) -> None:
    """`chat_template = "x.j2"`: the file's text goes into the plan (hashed with the model)."""
    name = attrs.get("chat_template")
    if name in (None, "auto", "none"):
        return
    span = next(a.value.span for a in decl.attrs if a.name == "chat_template")
    file = unit.folder / str(name)
    if "\0" in str(name) or file.suffix not in (".j2", ".jinja"):
        w.error(span, 'chat_template is "auto", "none", or a .j2 or .jinja file')
    elif not confined(file, w.ctx.loaded.roots):
        w.error(
            span,
            f"chat template '{name}' is outside the recipe's folder and the --root folders; refusing to read it",
        )
    elif not file.is_file():
        w.error(span, f"chat template '{name}' does not exist (paths are relative to the recipe)")
    else:
        try:
            attrs["chat_template_text"] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            w.error(span, f"chat template '{name}' cannot be read as UTF-8 text ({exc})")


def _local_folder(w: Work, unit: Unit, path: str, span: Span) -> dict[str, Any] | None:
    """A model path that names a folder: relative to the recipe, inside the roots, hashed by content.

    None when `path` does not look like a folder (it is then a hub id); an error is reported and
    `{}` returned for a folder that is missing, outside the roots or unreadable.
    """
    if "\0" in path:
        w.error(span, "a model path may not contain a NUL character")
        return {}
    folder = unit.folder / Path(path).expanduser()
    looks_local = path.startswith(("./", "../", "/", "~")) or folder.is_dir()
    if not looks_local:
        return None
    if not confined(folder, w.ctx.loaded.roots):
        w.error(
            span,
            f"model folder '{path}' is outside the recipe's folder and the --root folders; refusing to read it",
        )
        return {}
    if not folder.is_dir():
        w.error(span, f"model folder '{path}' does not exist (paths are relative to the recipe)")
        return {}
    try:
        digest = inputs.sha256_folder(folder, memo=True)
    except DataError as exc:
        w.error(span, f"model folder '{path}': {exc}")
        return {}
    rel = Path(os.path.relpath(folder.resolve(), w.ctx.loaded.recipe_dir)).as_posix()
    return {"path": rel, "sha256": digest}


@value_check(sc.PATHS)
def _paths(w: Work, unit: Unit, v: n.Expr, rule: sc.Attr, label: str, scores: Any) -> Any:
    """A string, or a non-empty list of string literals (each element's error at its own span)."""
    if isinstance(v, n.String):
        return v.value
    if not isinstance(v, n.ListExpr):
        w.error(v.span, f"{label} must be a string or a list of strings")
        return BAD
    if not v.items:
        w.error(v.span, f"{label} is an empty list: `path` needs at least one file")
        return BAD
    paths = [item.value for item in v.items if isinstance(item, n.String)]
    for item in v.items:
        if not isinstance(item, n.String):
            w.error(item.span, f"{label}: each file in the list must be a string")
    return paths if len(paths) == len(v.items) else BAD


def _dataset(w: Work, main: Unit, decl: n.Dataset) -> dict[str, Any]:
    what = f"dataset '{decl.name}'"
    attrs = check_attrs(w, main, decl.attrs, sc.DECLS["dataset"].attrs, what, decl.span)
    path_attr = next((a for a in decl.attrs if a.name == "path"), None)
    value = None if path_attr is None else path_attr.value
    if isinstance(value, n.ListExpr):
        # Each file is checked as a single path would be, its errors at its own span (the string
        # ones too when another element is not a string: all errors are reported at once). The
        # plan keeps `path` a list and adds `sha256` as a list beside it (null for hub parts).
        files = [item for item in value.items if isinstance(item, n.String)]
        parts = [p for f in files if (p := _part(w, main, f.value, f.span)) is not None]
        if "path" in attrs and len(parts) == len(value.items):
            attrs["path"] = [part["path"] for part in parts]
            attrs["sha256"] = [part.get("sha256") for part in parts]
    elif value is not None and "path" in attrs:
        resolved = data_path(w, main, attrs["path"], value.span)
        if resolved is not None:
            attrs.update(resolved)
    return attrs


def _part(w: Work, unit: Unit, path: str, span: Span) -> dict[str, Any] | None:
    """One file of a dataset's list: as `data_path` resolves it, with its path always given.

    Evaluation sets may not be parts: a list can only be sampled from (an evaluation reads one
    file), and steps never read evaluation prompts.
    """
    if path.startswith(sc.EVAL_SETS):
        w.error(
            span,
            f"'{path}' is an evaluation set: it cannot be part of a dataset's list of files (steps never read evaluation prompts)",
        )
        return None
    resolved = data_path(w, unit, path, span)
    return None if resolved is None else {"path": path, **resolved}


def data_path(w: Work, unit: Unit, path: str, span: Span) -> dict[str, Any] | None:
    """A built-in set or a local file, hashed by content; a hub dataset, checked to be a hub id."""
    if path.startswith("ralign:"):
        name = path[len("ralign:") :]
        if name not in sc.BUILTIN_DATASETS:
            builtin = ", ".join("ralign:" + d for d in sc.BUILTIN_DATASETS)
            w.error(
                span,
                f"unknown built-in dataset '{path}' (built in: {builtin}){w.suggest(name, sc.BUILTIN_DATASETS)}",
            )
            return None
        # Built-in sets change with ralign's releases; hashing them keeps a cached step from
        # outliving the data it was computed from.
        return {"sha256": inputs.sha256_file(inputs.resolve_dataset(name))}
    if path.startswith("hf:"):
        problem = inputs.hub_dataset_problem(path)
        if problem is not None:
            w.error(span, problem)
            return None
        return {}
    return _local_file(w, unit, path, span)


def _local_file(w: Work, unit: Unit, path: str, span: Span) -> dict[str, Any] | None:
    if "\0" in path:
        w.error(span, "a data file name may not contain a NUL character")
        return None
    file = unit.folder / path
    if not confined(file, w.ctx.loaded.roots):
        w.error(
            span,
            f"data file '{path}' is outside the recipe's folder and the --root folders; refusing to read it",
        )
        return None
    if not file.is_file():
        w.error(span, f"data file '{path}' does not exist (paths are relative to the recipe)")
        return None
    if file.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        w.error(span, f"data file '{path}' must be .jsonl, .json, .csv or .parquet")
        return None
    try:
        digest = inputs.sha256_file(file, memo=True)
    except DataError as exc:
        w.error(span, f"data file '{path}': {exc}")
        return None
    rel = Path(os.path.relpath(file.resolve(), w.ctx.loaded.recipe_dir)).as_posix()
    return {"path": rel, "sha256": digest}


def _evaluation(
    w: Work, main: Unit, decl: n.Evaluate, datasets: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    what = f"evaluate '{decl.name}'"
    attrs = check_attrs(w, main, decl.attrs, sc.DECLS["evaluate"].attrs, what, decl.span)
    choices = sc.DECLS["evaluate"].attrs["task"].choices
    if "task" not in attrs:
        if decl.name in choices:
            attrs["task"] = decl.name
        else:
            w.error(
                decl.span,
                f"evaluate '{decl.name}' needs `task` (one of: {', '.join(choices)}){w.suggest(decl.name, choices)}",
            )
    if "reward" in attrs and attrs.get("task") != "behavior":
        span = next(a.value.span for a in decl.attrs if a.name == "reward")
        w.error(span, "`reward` applies to behavior evaluations only")
    if "data" in attrs:
        span = next(a.value.span for a in decl.attrs if a.name == "data")
        attrs["data"] = resolve_data(w, main, attrs["data"], span, datasets, "an evaluation")
    return {**attrs, "name": decl.name, "line": decl.span.line}


def resolve_data(
    w: Work,
    unit: Unit,
    data: Any,
    span: Span,
    datasets: Mapping[str, Mapping[str, Any]],
    reader: str | None = None,
) -> Any:
    """A `data` attribute's value for the plan: a file with its content hash, or a declared
    dataset's spec under its name; `reader` (e.g. "an evaluation") reads one file, not a list."""
    if isinstance(data, dict) and "path" in data:
        resolved = data_path(w, unit, data["path"], span)
        return data if resolved is None else {"path": data["path"], **resolved}
    if isinstance(data, dict) and "dataset" in data:
        out = {"dataset": data["dataset"], **datasets.get(data["dataset"], {})}
        if reader and isinstance(out.get("path"), list):
            w.error(
                span,
                f"dataset '{data['dataset']}' is a list of files, and {reader} reads one file: give it the file itself",
            )
        return out
    return data


def _policy(w: Work, models: dict[str, dict[str, Any]]) -> str:
    recipe = next(iter(w.ctx.decls(n.Recipe)), None)
    if w.ctx.library or recipe is None:
        return ""
    if "policy" in models:
        return "policy"
    if len(models) == 1:
        return next(iter(models))
    if not models:
        w.error(
            recipe.span,
            'the recipe declares no model; add one, e.g. `model policy { path = "ralign:smollm2-135m" }`',
        )
    else:
        w.error(
            recipe.span,
            f"the recipe declares several models ({', '.join(models)}); name the one to train `policy`",
        )
    return ""
