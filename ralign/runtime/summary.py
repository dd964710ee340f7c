"""The per-round table a run prints: what each round made, its losses, and its evaluations against base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ralign.plan import Plan
from ralign.runtime.rundir import step_folder
from ralign.tables import text_table

# (metric in a step's metrics.json, column title): the first step of a round with it fills it.
COLUMNS = (
    ("prompts", "prompts"),
    ("responses", "answers"),
    ("order_agreement", "rank agree"),
    ("agree_weights", "agree weights"),
    ("pairs", "pairs"),
    ("mean_total", "mean reward"),
    ("weight", "update kept"),  # calibrate's weight on the trained policy
)
# Diagnostics of an evaluation that the table leaves to the step's result.json.
QUIET_EVAL_KEYS = {"ab_first", "ab_consistency"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def flatten_result(result: Any) -> dict[str, dict[str, Any]]:
    """Every `{value, ...}` figure of an evaluation result, by dotted key (intervals kept)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(prefix: str, node: Any) -> None:
        if not isinstance(node, dict):
            return
        if isinstance(node.get("value"), (int, float)) and not isinstance(node["value"], bool):
            out[prefix] = node
            return
        for k, v in node.items():
            if k not in ("examples", "items", "records", "subsets", "categories"):
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", result)
    return out


def summary_rows(plan: Plan, run_dir: Path) -> list[dict[str, Any]]:
    """One row per round (0 = before training) of headline metrics, from the finished steps."""
    rows: dict[int, dict[str, Any]] = {}
    for s in plan.steps:
        folder = step_folder(run_dir, s)
        m = read_json(folder / "metrics.json")
        if not isinstance(m, dict):
            continue
        row = rows.setdefault(s.round, {"round": s.round})
        for key, _ in COLUMNS:
            if key in m and key not in row:
                row[key] = m[key]
        if s.kind.startswith("train") and "loss" in m:
            row[f"{s.kind.split()[1]} loss"] = m["loss"]
        weights = {
            k.split("_weight_", 1)[1]: v for k, v in m.items() if k.startswith("agree_weight_")
        }
        if weights:
            row["agree_weights"] = ", ".join(f"{name} {w:.2f}" for name, w in weights.items())
            means = {
                k.split("_mean_", 1)[1]: v for k, v in m.items() if k.startswith("agree_mean_")
            }
            if means:  # an agree() total is standardised (mean 0): show its sources' own means
                row["mean_total"] = ", ".join(f"{name} {v:.3f}" for name, v in means.items())
        if s.kind == "evaluate":
            for key, figure in flatten_result(read_json(folder / "result.json")).items():
                short = key.removeprefix("rates.").removesuffix("_rate")
                if short not in QUIET_EVAL_KEYS and key != "n":
                    row[f"{s.name}:{short}"] = figure
    return [rows[k] for k in sorted(rows)]


def _eval_cell(figure: Any) -> str:
    if not isinstance(figure, dict):
        return ""
    value = f"{figure['value']:.3f}"
    if isinstance(figure.get("low"), (int, float)) and isinstance(figure.get("high"), (int, float)):
        value += f" [{figure['low']:.2f}, {figure['high']:.2f}]"
    return value


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The table: a column per headline metric and train kind's loss, then one per evaluation
    figure (with its 95% interval where the evaluator gives one), and a last row of changes from base."""
    losses = sorted({k for r in rows for k in r if k.endswith(" loss")})
    evals = sorted({k for r in rows for k in r if ":" in k})
    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)] + [(k, k) for k in losses]
    head = ["round", *(t for _, t in cols), *evals]
    body = [
        [
            str(r["round"]) if r["round"] else "base",
            *(r.get(k, "") for k, _ in cols),
            *(_eval_cell(r.get(k)) for k in evals),
        ]
        for r in rows
    ]
    base, last = rows[0], rows[-1]
    if len(rows) > 1 and base["round"] == 0 and any(k in base for k in evals):
        change = ["vs base", *("" for _ in cols)]
        for k in evals:
            a, b = base.get(k), last.get(k)
            change.append(
                f"{b['value'] - a['value']:+.3f}"
                if isinstance(a, dict) and isinstance(b, dict)
                else ""
            )
        body.append(change)
    return text_table(head, body, left=0)
