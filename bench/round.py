"""Benchmark where the time of a quickstart round goes: seconds and share per step kind, from each step's meta.json.

Usage: python bench/round.py [--run-dir DIR] [--quick] [--count 32] [--eval-limit 12] [--threads N]
       [--keep DIR]

Simplifications, stated up front:
- The figures are the `seconds` each step's meta.json records (the executor times the step
  function: loading its inputs, the work, writing its outputs; models load lazily, so the first
  step that uses one also pays for loading it, e.g. r0's evaluation). Step folders are
  `r<k>/<phase>.<kind>[.<name>]`; evaluations sit under r0 (before training) and the last round.
  Kinds are grouped by the word a phase starts them with (`ralign.schema.STEPS`: train sft and
  train dpo are both train), in the schema's order, evaluate last.
- With `--run-dir` it only reads a finished (or partial) run. Without it, it runs a cut-down copy
  of recipes/quickstart.ralign (or, with --quick, of tests/recipes/every_step.ralign on a tiny
  random model) with `python -m ralign execute` in a temporary folder, then reads that run. The
  cut-down keeps every step and setting per prompt (answers per prompt, new tokens, judge orders,
  epochs) and changes only, by `--set` overrides (recorded in the run's plan.json): rounds = 1,
  --count prompts (the generate step's count, or without one a `limit` on the datasets the
  prompts come from), evaluations limited to --eval-limit items (--quick: the recipe's own count, 6 items, and one torch thread through
  OMP_NUM_THREADS). Evaluation cost does not shrink with the prompt count, so its share of a
  cut-down run is larger than in the full quickstart; a full run's split comes from
  `--run-dir` on a full run.
- "outside steps" is the wall time of the whole `ralign execute` this script ran, minus the
  steps' sum: interpreter start, imports, compiling, saving `final/`. A run read with
  --run-dir only has run.log, whose lines start after start-up: its span is printed as such.
- Results go to bench/results/round-DATE.json (the cut-down run), round-quick-DATE.json, or
  round-<run folder name>-DATE.json (a run read with --run-dir).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import execute_command, load, load_note, record, target  # noqa: E402

from ralign.schema import STEPS  # noqa: E402
from ralign.tables import text_table  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The table's rows, in order: each step kind's first word ("train sft" and "train dpo" are "train").
KINDS = tuple(dict.fromkeys(kind.keyword for kind in STEPS.values()))
ROUND_DIR = re.compile(r"^r(\d+)$")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)$")


# ---- reading a run ---------------------------------------------------------------------


def family(kind: str) -> str:
    """The table row of a step kind: "train sft" and "train dpo" are both "train"."""
    return kind.split()[0]


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished step of a run: id, round, kind, family and seconds, in plan order if known."""
    steps = []
    for folder in sorted(run_dir.iterdir()):
        m = ROUND_DIR.match(folder.name)
        if not m or not folder.is_dir():
            continue
        for step in sorted(folder.iterdir()):
            meta_file = step / "meta.json"
            if not meta_file.is_file():
                continue
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            steps.append(
                {
                    "id": meta.get("id", f"{folder.name}/{step.name}"),
                    "folder": f"{folder.name}/{step.name}",
                    "round": int(m.group(1)),
                    "kind": meta["kind"],
                    "family": family(meta["kind"]),
                    "seconds": float(meta["seconds"]),
                }
            )
    order = plan_order(run_dir)
    steps.sort(key=lambda s: (s["round"], order.get(s["id"], len(order)), s["id"]))
    return steps


def plan_order(run_dir: Path) -> dict[str, int]:
    try:
        plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {s["id"]: i for i, s in enumerate(plan.get("steps", []))}


def split(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per kind, per round folder and over the run, with shares and the slowest kind."""
    rounds = sorted({s["round"] for s in steps})
    per_round: dict[str, dict[str, float]] = {}
    for r in rounds:
        per_round[f"r{r}"] = _sum_by_kind(s for s in steps if s["round"] == r)
    total = _sum_by_kind(steps)
    out: dict[str, Any] = {"rounds": {}, "total": _shares(total)}
    for name, seconds in per_round.items():
        out["rounds"][name] = _shares(seconds)
    return out


def _sum_by_kind(steps) -> dict[str, float]:
    sums: dict[str, float] = {}
    for s in steps:
        sums[s["family"]] = sums.get(s["family"], 0.0) + s["seconds"]
    return sums


def _shares(seconds: dict[str, float]) -> dict[str, Any]:
    total = sum(seconds.values())
    kinds = sorted(seconds, key=_kind_rank)
    return {
        "seconds": {k: round(seconds[k], 3) for k in kinds},
        "percent": {k: (100 * seconds[k] / total if total else 0.0) for k in kinds},
        "step_seconds": round(total, 3),
        "slowest": max(kinds, key=seconds.__getitem__) if kinds else None,
    }


def _kind_rank(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def log_wall_seconds(run_dir: Path) -> float | None:
    """Wall seconds of the run's last session in run.log (from its "run ..." line to its last line)."""
    try:
        lines = (run_dir / "run.log").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    stamps: list[tuple[dt.datetime, str]] = []
    for line in lines:
        m = LOG_TIME.match(line)
        if m:
            stamps.append((dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), m.group(2)))
    starts = [i for i, (_, text) in enumerate(stamps) if text.startswith("run ")]
    if not starts:
        return None
    session = stamps[starts[-1] :]
    return (session[-1][0] - session[0][0]).total_seconds()


# ---- running a cut-down quickstart ---------------------------------------------------------


def cut_down(plan: Any, *, count: int | None, eval_limit: int) -> tuple[str, ...]:
    """`--set` overrides for one round; `count` prompts (a generate step's count if there is one,
    else a limit on the datasets; None: as it was); evaluations of at most `eval_limit` items."""
    flags = ["recipe.rounds=1"]
    generate = dict.fromkeys(target(s.id) for s in plan.steps if s.kind == "generate")
    if count is not None:
        where = [f"{g}.count" for g in generate] or [f"{d}.limit" for d in plan.datasets]
        flags += [f"{attr}={count}" for attr in where]
    flags += [f"{e['name']}.limit={eval_limit}" for e in plan.evaluations]
    return tuple(flags)


def run_recipe(recipe: Path, run_dir: Path, args: argparse.Namespace) -> float:
    """Run `recipe` cut down (`cut_down`'s overrides) with `ralign execute`; the wall seconds."""
    from ralign.compile import compile_file

    sets = cut_down(compile_file(recipe), count=args.count, eval_limit=args.eval_limit)
    cmd = execute_command(recipe, run_dir, sets)
    print(f"running {shlex.join(['ralign', *cmd[3:]])}", flush=True)
    started = time.perf_counter()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the child
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"ralign execute failed with status {done.returncode}")
    return wall


# ---- report ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """Rows = kinds; per round folder and for the whole run: seconds and % (* = slowest)."""
    columns = [*result["rounds"].items(), ("all", result["total"])]
    kinds = sorted({k for _, c in columns for k in c["seconds"]}, key=_kind_rank)
    head = ["kind"]
    for name, _ in columns:
        head += [f"{name} s", f"{name} %"]
    rows = []
    for kind in kinds:
        row = [kind]
        for _, col in columns:
            if kind in col["seconds"]:
                mark = "*" if col["slowest"] == kind else ""
                row += [f"{col['seconds'][kind]:.1f}", f"{col['percent'][kind]:.1f}{mark}"]
            else:
                row += ["-", "-"]
        rows.append(row)
    total = ["steps total"]
    for _, col in columns:
        total += [f"{col['step_seconds']:.1f}", "100.0"]
    rows.append(total)
    lines = text_table(head, rows).splitlines()
    lines.insert(len(lines) - 1, lines[1])  # the title's rule again above the total
    return "\n".join(lines)


def report(run_dir: Path, wall: float | None, wall_source: str, args, argv, load_start) -> int:
    steps = read_steps(run_dir)
    if not steps:
        raise SystemExit(f"no finished steps (r<k>/<step>/meta.json) under {run_dir}")
    result = split(steps)
    step_total = result["total"]["step_seconds"]
    print(
        f"run {run_dir}: {len(steps)} steps in {len(result['rounds'])} round folders; "
        + (load_note(load()) if wall_source == "measured" else "times as that run recorded them")
    )
    print()
    print(table(result))
    print()
    slowest = result["total"]["slowest"]
    print(
        f"slowest kind over the run: {slowest} ({result['total']['seconds'][slowest]:.1f}s, "
        f"{result['total']['percent'][slowest]:.1f}% of step time)"
    )
    for name, col in result["rounds"].items():
        print(
            f"  {name}: slowest {col['slowest']} ({col['percent'][col['slowest']]:.1f}% of {col['step_seconds']:.1f}s)"
        )
    outside = None
    if wall is not None and wall_source == "measured":
        outside = wall - step_total
        print(
            f"wall {wall:.1f}s (measured): steps {step_total:.1f}s, outside steps {outside:.1f}s "
            f"({100 * outside / wall:.1f}%: start-up, imports, compiling, final/)"
        )
    elif wall is not None:
        print(
            f"run.log spans {wall:.0f}s (whole seconds, from its 'run' line, after start-up and "
            f"imports) for {step_total:.1f}s of steps"
        )
    now = dt.datetime.now(dt.timezone.utc)
    out_json = {
        **record("round.py", argv, load_start),
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"
        },
        "run_dir": str(run_dir),
        "steps": steps,
        "split": result,
        "wall_seconds": wall,
        "wall_source": wall_source,
        "outside_steps_seconds": outside,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_dir is not None:  # a result per run read, beside the one this script ran
        name = run_dir.resolve().name
        suffix = "-" + "".join(
            c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in name
        )
    else:
        suffix = "-quick" if args.quick else ""
    out = args.out / f"round{suffix}-{now.date().isoformat()}.json"
    out.write_text(json.dumps(out_json, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run-dir", type=Path, default=None, help="read this run instead of running one"
    )
    ap.add_argument(
        "--quick", action="store_true", help="run tests/recipes/every_step.ralign (tiny model)"
    )
    ap.add_argument(
        "--recipe", type=Path, default=None, help="recipe to cut down and run (default quickstart)"
    )
    ap.add_argument(
        "--count",
        type=int,
        default=None,
        help="prompts per round: the generate count, else a dataset limit (32; quick: as is)",
    )
    ap.add_argument(
        "--eval-limit", type=int, default=None, help="items per evaluation (12, quick 6)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the run (default torch's; quick 1)",
    )
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    args = ap.parse_args(argv)
    load_start = load()
    if args.run_dir is not None:
        if not args.run_dir.is_dir():
            ap.error(f"no run directory {args.run_dir}")
        return report(
            args.run_dir,
            log_wall_seconds(args.run_dir),
            "run.log, whole seconds",
            args,
            argv,
            load_start,
        )
    args.recipe = args.recipe or (
        ROOT / "tests" / "recipes" / "every_step.ralign"
        if args.quick
        else ROOT / "recipes" / "quickstart.ralign"
    )
    if args.count is None and not args.quick:
        args.count = 32
    args.eval_limit = args.eval_limit or (6 if args.quick else 12)
    # A tiny model's ops take microseconds: a second thread only adds barrier waits, which on a
    # loaded machine cost more than the ops themselves.
    args.threads = args.threads or (1 if args.quick else None)
    print(f"round: one cut-down round of {args.recipe.name}; {load_note(load_start)}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run_dir = args.keep / "run"
        wall = run_recipe(args.recipe, run_dir, args)
        return report(run_dir, wall, "measured", args, argv, load_start)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        wall = run_recipe(args.recipe, run_dir, args)
        return report(run_dir, wall, "measured", args, argv, load_start)


if __name__ == "__main__":
    raise SystemExit(main())
