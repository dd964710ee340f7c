"""Evaluations by name: a registry of evaluators (HHH, behaviour) and the helpers that feed them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ralign.errors import DataError, RalignError, did_you_mean
from ralign.runtime.hhh import HHHItem, eval_hhh, load_hhh

Evaluator = Callable[..., dict[str, Any]]
EVALUATORS: dict[str, Evaluator] = {}


def evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    """Register `fn(model, tokenizer, data, **opts) -> dict` as the evaluation called `name`."""

    def register(fn: Evaluator) -> Evaluator:
        EVALUATORS[name] = fn
        return fn

    return register


def _data_path(data: str | Path) -> Path:
    """A file or folder path, or a built-in dataset name like `evals/hhh-mini`."""
    p = Path(data)
    if p.exists():
        return p
    from ralign.runtime.builtin_data import DATASETS, resolve_dataset

    if str(data) in DATASETS:
        return resolve_dataset(str(data))
    raise DataError(
        f"{data}: no such file, and not a built-in dataset{did_you_mean(str(data), DATASETS)}"
    )


@evaluator("hhh")
def _hhh(
    model: Any, tokenizer: Any, data: str | Path | Iterable[HHHItem], **opts: Any
) -> dict[str, Any]:
    items = load_hhh(_data_path(data)) if isinstance(data, (str, Path)) else list(data)
    return eval_hhh(model, tokenizer, items, **opts)


@evaluator("behavior")
def _behavior(
    model: Any, tokenizer: Any, data: str | Path | Iterable[dict], **opts: Any
) -> dict[str, Any]:
    from ralign.runtime.behavior import eval_behavior, load_prompts

    split = opts.pop("split", None)
    if isinstance(data, (str, Path)):
        prompts = load_prompts(_data_path(data), split=split)
    else:
        prompts = [p for p in data if split is None or p.get("split") == split]
    return eval_behavior(model, tokenizer, prompts, **opts)


def run_eval(
    name: str, model: Any, tokenizer: Any, data: str | Path | Iterable[Any], **opts: Any
) -> dict[str, Any]:
    """Run the evaluation `name` ("hhh" or "behavior") on a path, a built-in dataset name, or items.

    Raises:
        RalignError: for an unknown evaluation name, with a did-you-mean hint.
    """
    if name not in EVALUATORS:
        raise RalignError(
            f"unknown evaluation '{name}'{did_you_mean(name, EVALUATORS)}; known: {', '.join(sorted(EVALUATORS))}"
        )
    result = EVALUATORS[name](model, tokenizer, data, **opts)
    result.setdefault("eval", name)
    return result


def eval_items(task: str, file: Path, limit: int | None) -> list[Any]:
    """The items an evaluation scores: HHH rows, or behavior prompts (only the held-out ones of
    a set that marks splits, as the built-in seed sets do), the first `limit` of them."""
    if task == "hhh":
        items: list[Any] = load_hhh(file)
    else:
        from ralign.runtime.behavior import load_prompts

        items = load_prompts(file)
        if any("split" in r for r in items):
            items = [r for r in items if r.get("split") == "heldout"]
    return items[:limit] if limit else items


def flatten_eval(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation result: every {value, ...} rate, overall and per subset."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            if "value" in node and isinstance(node["value"], (int, float)):
                out[prefix] = float(node["value"])
                return
            for k, v in node.items():
                if k in ("examples", "items"):
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", {k: v for k, v in result.items() if k not in ("examples", "items")})
    return out
