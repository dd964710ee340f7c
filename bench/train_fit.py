"""Does a run's policy do, on its own training prompts, what it was trained to do?

Usage: python bench/train_fit.py RUN_DIR [--model PATH] [--kinds FILE ...] [--out FILE]

The prompts the run's `sample` steps answered (every round), those of a known kind (the built-in
seed sets and any --kinds file of {prompt, kind} rows), answered greedily and bare (no context,
as the evaluation asks) by the run's final/ policy, or by --model (`ralign:smollm2-135m`: the
base), and judged by the behaviour evaluation's detectors, as `evaluate behavior` judges its own
held-out prompts. Read against the run's evaluation: a policy that refuses its harmful training
prompts but not the evaluation's has memorised them; one that refuses neither has not fit them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from round_drift import SEEDS, kinds_of, read_jsonl, step_file  # noqa: E402

from ralign.runtime.behavior import KINDS  # noqa: E402


def training_items(run_dir: Path, kinds: dict[str, str]) -> list[dict[str, str]]:
    """{prompt, kind} of every prompt a `sample` step of the run answered, once each, in order;
    prompts of no known kind (self-written ones) are left out."""
    seen: dict[str, str] = {}
    rounds = sorted(run_dir.glob("r[0-9]*"), key=lambda p: int(p.name[1:]))
    for round_dir in rounds:
        path = step_file(round_dir, "sample", "responses.jsonl")
        for row in read_jsonl(path) if path else []:
            kind = kinds.get(row["prompt"])
            if kind in KINDS:
                seen.setdefault(row["prompt"], kind)
    return [{"prompt": p, "kind": k} for p, k in seen.items()]


def fit(model_path: str, items: list[dict[str, str]], max_new_tokens: int) -> dict[str, Any]:
    """The behaviour evaluation's rates for `model_path` on `items`."""
    import torch

    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.evaluators import run_eval
    from ralign.runtime.models import ModelSpec, load_model

    model, tok = load_model(ModelSpec(path=model_path, dtype="float32"), torch.device("cpu"))
    result = run_eval("behavior", model, tok, items, max_new_tokens=max_new_tokens)
    return {k: v for k, v in result["rates"].items() if v.get("n")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", help="a model folder or built-in name (default: RUN_DIR/final)")
    ap.add_argument("--kinds", nargs="*", type=Path, default=[], help="more {prompt, kind} files")
    ap.add_argument("--max-new-tokens", type=int, default=40)  # the quickstart's evaluation's
    ap.add_argument("--out", type=Path, help="write the rates as JSON here too")
    args = ap.parse_args(argv)
    items = training_items(args.run_dir, kinds_of([*SEEDS, *args.kinds]))
    if not items:
        print(f"{args.run_dir}: no sampled prompt of a known kind", file=sys.stderr)
        return 2
    model = args.model or str(args.run_dir / "final")
    rates = fit(model, items, args.max_new_tokens)
    for name, r in rates.items():
        print(f"{name:28} {r['value']:.3f} [{r['low']:.2f}, {r['high']:.2f}]  ({r['k']}/{r['n']})")
    if args.out:
        out = {"run_dir": str(args.run_dir), "model": model, "prompts": len(items), "rates": rates}
        args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
