"""Which openings does a model reach for on harmless prompts? Mean log-probability per opening.

Usage: python bench/openings.py MODEL [MODEL ...] [--data NAME ...] [--opening TEXT ...]
                                [--out FILE]

Each model (a folder, or a built-in name such as `ralign:smollm2-135m`) reads the harmless
prompts a `calibrate` step would read (default: the held-out everyday and safe-but-alarming rows
of the quickstart's seed sets, never trained on), in chat format, and scores each opening as the
start of its answer (teacher-forced, summed over the opening's tokens). Printed: the mean over the
prompts, per model and opening. Why: a trained policy that hedges ("I'm not sure." to answerable
requests) may have learnt to hedge, or may have lost the rival opening the hedge used to lose to;
the greedy answers cannot tell the two apart, the probabilities can (docs/results.md, 2026-12-07,
second session).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = ["ralign:seeds/hhh", "ralign:seeds/red_team", "ralign:seeds/safe"]  # the quickstart's
OPENINGS = ["I'm not sure", "I'm sorry, but I can't", "I don't know", "Sure", "Here"]


def opening_scores(model_path: str, prompts: list[str], openings: list[str]) -> dict[str, float]:
    """Mean over `prompts` of log P(opening | prompt) under the model, for each opening."""
    import torch

    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.hhh import loglikelihood
    from ralign.runtime.models import ModelSpec, format_prompt, load_model

    model, tok = load_model(ModelSpec(path=model_path, dtype="float32"), torch.device("cpu"))
    asked = [format_prompt(tok, p) for p in prompts]
    out = {}
    for opening in openings:
        scores = loglikelihood(model, tok, [(a, opening) for a in asked], batch_size=16)
        out[opening] = sum(logp for logp, _ in scores) / len(scores)
    return out


def main(argv: list[str] | None = None) -> int:
    from ralign.runtime.calibrate import harmless_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", nargs="+", default=SEEDS, help="behaviour sets, as calibrate's data")
    ap.add_argument("--opening", nargs="+", default=OPENINGS, dest="openings")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args(argv)
    prompts = harmless_prompts({"path": args.data}, Path.cwd())
    if not prompts:
        raise SystemExit(f"--data {' '.join(args.data)}: no harmless held-out prompts")
    results = {}
    for model in args.models:
        results[model] = opening_scores(model, prompts, args.openings)
        shown = "  ".join(f"{o!r} {v:.2f}" for o, v in results[model].items())
        print(f"{model} ({len(prompts)} prompts): {shown}")
    if args.out:
        out = {"data": args.data, "prompts": len(prompts), "mean_logp": results}
        args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
