"""How fast the behaviour evaluation answers at each batch size, against batch 16 in the same run.

Usage: python bench/eval_batch.py [--model ralign:smollm2-135m] [--prompts 64] [--batch-sizes 8 16 32 64]
                                  [--max-new-tokens 40] [--out bench/results]

Greedy answers (`greedy_answers`, what `evaluate behavior` runs) to the first N prompts of
`ralign:evals/behavior`, once per batch size; prints seconds, the speed-up over batch 16 (the old
default) and how many answers match batch 16's (padding more rows must not change a greedy answer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import load, record  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINE = 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ralign:smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    started_load = load()

    from ralign.inputs import resolve_dataset
    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.behavior import greedy_answers, load_prompts
    from ralign.runtime.models import ModelSpec, load_model

    prompts = [r["prompt"] for r in load_prompts(resolve_dataset("evals/behavior"))]
    prompts = prompts[: args.prompts]
    model, tok = load_model(ModelSpec(args.model))
    sizes = [BASELINE] + [b for b in args.batch_sizes if b != BASELINE]  # the baseline first
    answers: dict[int, list[str]] = {}
    seconds: dict[int, float] = {}
    for size in sizes:
        t = time.perf_counter()
        answers[size] = greedy_answers(
            model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=size
        )
        seconds[size] = time.perf_counter() - t
    rows = [
        {
            "batch_size": size,
            "seconds": round(seconds[size], 2),
            "speedup_vs_16": round(seconds[BASELINE] / seconds[size], 2),
            "same_answers_as_16": sum(
                a == b for a, b in zip(answers[size], answers[BASELINE], strict=True)
            ),
        }
        for size in sorted(sizes)
    ]
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.model}")
    for r in rows:
        print(
            f"batch {r['batch_size']:>3}: {r['seconds']:7.1f} s  x{r['speedup_vs_16']:.2f} vs 16  "
            f"same answers as 16: {r['same_answers_as_16']}/{len(prompts)}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    head = record("eval_batch.py", argv, started_load)
    path = args.out / f"eval_batch-{head['date'][:10]}.json"
    path.write_text(json.dumps({**head, "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
