"""Blind reading: where two runs on the same samples chose different answers, which reads better?

Usage: python bench/blind_choices.py RUN_A RUN_B [--round 1] [--n 30] [--skip 0] [--seed 2026]
           [--labels XY=...] [--out FILE]

Two runs that share a round's sampled answers (the same `sample` step) but judge them differently
choose different pairs. This prints, for `--n` prompts where the chosen answers differ (drawn with
`--seed`), the two chosen answers as X and Y in a seeded random order, without saying which run
chose which. Read them, then run the same command with `--labels` (one letter per item: X, Y, or
= for no difference, e.g. `--labels XY=X...`) to count how often each run's choice read better.

Simplifications, stated up front: one reader, answers cut to 120 characters as printed, and the
reader's own sense of "better" (answers the request, is true, is not a needless refusal).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any


def chosen(run: Path, rnd: int) -> dict[str, str]:
    """Prompt -> the chosen answer of the round's pairs."""
    path = run / f"r{rnd}" / "distill.pairs" / "pairs.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {r["prompt"]: r["chosen"] for r in rows}


def items(
    a: dict[str, str], b: dict[str, str], n: int, skip: int, seed: int
) -> list[dict[str, Any]]:
    """Prompts whose chosen answers differ, drawn and blinded with `seed`: X/Y and which is A's."""
    rng = random.Random(seed)
    differ = sorted(p for p in a if p in b and a[p] != b[p])
    rng.shuffle(differ)
    out = []
    for p in differ[skip : skip + n]:
        a_first = rng.random() < 0.5
        x, y = (a[p], b[p]) if a_first else (b[p], a[p])
        out.append({"prompt": p, "X": x, "Y": y, "a_is": "X" if a_first else "Y"})
    return out


def tally(blind: list[dict[str, Any]], labels: str) -> dict[str, int]:
    """How often the reader preferred run A's choice, run B's, or neither."""
    if len(labels) != len(blind) or set(labels) - set("XY="):
        raise SystemExit(f"--labels needs {len(blind)} letters of X, Y and =, got {labels!r}")
    out = {"a": 0, "b": 0, "same": 0}
    for item, label in zip(blind, labels, strict=True):
        out["same" if label == "=" else "a" if label == item["a_is"] else "b"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--skip", type=int, default=0, help="skip the first SKIP drawn (already seen)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--labels", help="the reader's verdicts, one of X, Y, = per item")
    ap.add_argument("--out", type=Path, help="write items, labels and the tally as JSON")
    args = ap.parse_args(argv)
    a, b = chosen(args.run_a, args.round), chosen(args.run_b, args.round)
    blind = items(a, b, args.n, args.skip, args.seed)
    if args.labels is None:
        for i, item in enumerate(blind):
            print(f"{i} P: {item['prompt'][:90]}")
            for side in "XY":
                print(f"   {side}: {item[side][:120]}".replace("\n", " "))
        return 0
    counts = tally(blind, args.labels)
    print(
        f"{args.run_a.name}'s choice read better: {counts['a']}, {args.run_b.name}'s: "
        f"{counts['b']}, no difference: {counts['same']} (of {len(blind)})"
    )
    if args.out:
        result = {
            "command": " ".join(sys.argv),
            "runs": [str(args.run_a), str(args.run_b)],
            "round": args.round,
            "labels": args.labels,
            "tally": counts,
            "items": blind,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
