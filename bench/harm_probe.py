"""Does std/hhh recognise harmful requests worded apart from its word lists? The probe it ships, measured.

Usage: python bench/harm_probe.py [--seed-negatives] [--everyday-negatives] [--write-stdlib]
                                 [--out bench/results] [--no-eval]

A logistic regression on MiniLM sentence embeddings (the bundled all-MiniLM-L6-v2, as `dedupe`
uses), harmful requests (1) against the rest (0), is fitted on development sets only:
`tests/data/harm_dev.jsonl`, the "dev" split of `tests/data/harm_dev_2.jsonl` and, with
--seed-negatives, the seed sets' train splits (everyday and unknowable requests too), and with
--everyday-negatives `tests/data/everyday_dev.jsonl` (everyday requests in users' own styles:
lower case, fragments, typos, long ones with numbers and units). Its L2 weight
is chosen by 5-fold cross-validation on those rows alone; the weights are rounded to 4 significant
digits as stdlib/harm_probe.ralign stores them (--write-stdlib writes that file: std/harm's
`by_probe`). Then three verdicts are measured on what the fit never saw: the probe alone, std/harm's
word lists (`by_words`, the baseline) and std/hhh's `is_harmful` (the word lists, or the probe where
a harm cue fires and no homonym explains it), on the "test" split of harm_dev_2, the behaviour
evaluation set (harmful vs scary_harmless, unless --no-eval), and the seed sets' held-out prompts,
with the share of prompts of other kinds (everyday, unknowable) each calls harmful, since a reward
that calls an everyday request harmful trains refusals. Nothing here is tuned on the evaluation
set: it is read once, after the fit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ralign.stats import rate, wilson  # noqa: E402

DEV = ROOT / "tests" / "data" / "harm_dev.jsonl"
DEV2 = ROOT / "tests" / "data" / "harm_dev_2.jsonl"
EVERYDAY = ROOT / "tests" / "data" / "everyday_dev.jsonl"
EVAL = ROOT / "ralign" / "data" / "evals" / "behavior.jsonl"
SEEDS = sorted((ROOT / "ralign" / "data" / "seeds").glob("*.jsonl"))
LAMBDAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
BINARY = ("harmful", "scary_harmless")
STDLIB = ROOT / "stdlib" / "harm_probe.ralign"


def rows(path: Path, split: str | None = None) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r for r in out if split is None or r.get("split") == split]


def fit(x, y, lam: float):
    """Logistic regression with an L2 penalty `lam * |w|^2`, by L-BFGS from zero (deterministic)."""
    import torch

    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + lam * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def cross_validate(x, y, lambdas=LAMBDAS, folds: int = 5) -> dict[float, float]:
    """Mean held-out accuracy per L2 weight over `folds` interleaved folds of a fixed shuffle."""
    import torch

    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    out = {}
    for lam in lambdas:
        accuracy = []
        for k in range(folds):
            held = order[k::folds]
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            w, b = fit(x[keep], y[keep], lam)
            said = (x[held] @ w + b) > 0
            accuracy.append((said == (y[held] > 0.5)).float().mean().item())
        out[lam] = sum(accuracy) / folds
    return out


def precision_recall(said: list[bool], truth: list[bool]) -> dict[str, Any]:
    tp = sum(s and t for s, t in zip(said, truth, strict=True))
    fp = sum(s and not t for s, t in zip(said, truth, strict=True))
    fn = sum(t and not s for s, t in zip(said, truth, strict=True))
    return {
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "precision_ci95": list(wilson(tp, tp + fp)),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "recall_ci95": list(wilson(tp, tp + fn)),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def rule_verdicts():
    """(std/harm's word lists, std/hhh's `is_harmful`: the word lists or the shipped probe), each a
    verdict on a prompt through the interpreter."""
    import tempfile

    from ralign.compile import check_file
    from ralign.rewards.interpreter import explain

    folder = Path(tempfile.mkdtemp(prefix="harm-probe-"))
    (folder / "lib.ralign").write_text(
        'import "std/hhh"\nimport "std/harm"\n'
        "reward h { rule x = 1 when harm.by_words(prompt) }\n"
        "reward s { rule x = 1 when hhh.is_harmful(prompt) }\n",
        encoding="utf-8",
    )
    checked = check_file(folder / "lib.ralign")
    return tuple(
        lambda prompt, name=name: explain(checked, name, prompt=prompt, response="")["total"] > 0
        for name in ("h", "s")
    )


def four_digits(x: float) -> str:
    """How std/harm_probe writes a weight: 4 significant digits (the probe measured here rounds so)."""
    return f"{x:.4g}"


def stdlib_text(w, b, lam: float, seed_negatives: bool, everyday_negatives: bool = False) -> str:
    """std/harm_probe: the weights as a ralign list."""
    numbers = [four_digits(x) for x in [*w.tolist(), b.item()]]
    rows = [", ".join(numbers[i : i + 10]) for i in range(0, len(numbers), 10)]
    sources = ["harm_dev", "harm_dev_2's dev\n# split"]
    sources += ["the seed sets' train splits (every kind)"] if seed_negatives else []
    sources += ["everyday_dev"] if everyday_negatives else []
    fitted_on = ", ".join(sources[:-1]) + " and " + sources[-1]
    flag = " --seed-negatives" if seed_negatives else ""
    flag += " --everyday-negatives" if everyday_negatives else ""
    head = f"""# std/harm_probe: a linear probe on all-MiniLM-L6-v2 sentence embeddings; 1 = a harmful request.
# `embedding_probe(text, weights)` is sigmoid(w . e + b): w the first {len(numbers) - 1} numbers, b the last.
# Written by `python bench/harm_probe.py{flag} --write-stdlib`; do not edit by hand.
# A logistic regression, harmful requests against the rest, fitted on {fitted_on};
# L2 weight {lam:g} by 5-fold cross-validation. Never fitted on ralign:evals.
"""
    return head + "\nlet weights = [\n  " + ",\n  ".join(rows) + "\n]\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--no-eval", action="store_true", help="leave the evaluation set unread")
    ap.add_argument(
        "--write-stdlib",
        action="store_true",
        help=f"write the fitted weights to {STDLIB.relative_to(ROOT)} (std/harm's probe)",
    )
    ap.add_argument(
        "--seed-negatives",
        action="store_true",
        help="fit on the seed sets' train splits too (every kind; harmful against the rest)",
    )
    ap.add_argument(
        "--everyday-negatives",
        action="store_true",
        help=f"fit on {EVERYDAY.relative_to(ROOT)} too (everyday requests in users' own styles)",
    )
    args = ap.parse_args(argv)

    import torch

    from ralign.runtime.dedupe import embed

    torch.manual_seed(0)
    train = [r for r in rows(DEV) + rows(DEV2, "dev") if r["kind"] in BINARY]
    if args.seed_negatives:
        # Everyday and unknowable requests too: a probe shown only alarming ones has no reason to
        # call "write a thank-you note" harmless, and as a reward it would train refusals on it.
        train += [r for path in SEEDS for r in rows(path, "train")]
    if args.everyday_negatives:
        # The seed sets' everyday requests are tidy sentences; users write "iphone photos to pc,
        # easiest way?" and "70kg, 3 workouts a week, how much protein", which a probe that never
        # saw such text places nearer the harmful requests' short imperatives.
        train += rows(EVERYDAY)
    x = embed([r["prompt"] for r in train])
    y = torch.tensor([float(r["kind"] == "harmful") for r in train])
    cv = cross_validate(x, y)
    lam = max(cv, key=lambda k: (cv[k], -k))  # ties: the smaller weight
    w, b = fit(x, y, lam)
    # Rounded as std/harm_probe stores them, so what is measured here is what the stdlib runs.
    w = torch.tensor([float(four_digits(v)) for v in w.tolist()])
    b = torch.tensor([float(four_digits(b.item()))])
    probe = lambda prompts: ((embed(prompts) @ w + b) > 0).tolist()  # noqa: E731
    if args.write_stdlib:  # before the rules are compiled: std/harm reads it
        text = stdlib_text(w, b, lam, args.seed_negatives, args.everyday_negatives)
        STDLIB.write_text(text, encoding="utf-8")
        print(f"wrote {STDLIB.relative_to(ROOT)}")
    regex, stdlib = rule_verdicts()

    sets = {"harm_dev_2 test": rows(DEV2, "test")}
    if not args.no_eval:
        sets["evaluation (behavior)"] = rows(EVAL)
    for path in SEEDS:
        # Held-out prompts only when the fit saw the train split.
        sets[f"seeds/{path.stem}"] = rows(path, "heldout" if args.seed_negatives else None)
    result: dict[str, Any] = {"cv_accuracy": {str(k): v for k, v in cv.items()}, "l2": lam}
    for name, data in sets.items():
        prompts = [r["prompt"] for r in data]
        said = {"probe": probe(prompts), "words": [regex(p) for p in prompts]}
        said["std/hhh"] = [stdlib(p) for p in prompts]
        entry: dict[str, Any] = {}
        binary = [i for i, r in enumerate(data) if r["kind"] in BINARY]
        if {data[i]["kind"] for i in binary} == set(BINARY):
            truth = [data[i]["kind"] == "harmful" for i in binary]
            for judge, verdicts in said.items():
                entry[judge] = precision_recall([verdicts[i] for i in binary], truth)
        for kind in sorted({r["kind"] for r in data}):
            idx = [i for i, r in enumerate(data) if r["kind"] == kind]
            for judge, verdicts in said.items():
                entry.setdefault("called harmful", {}).setdefault(judge, {})[kind] = rate(
                    sum(verdicts[i] for i in idx), len(idx)
                )
        result[name] = entry
        print(f"== {name}")
        for judge in said:
            if judge in entry:
                pr = entry[judge]
                print(f"  {judge:8s} precision {pr['precision']:.3f}  recall {pr['recall']:.3f}")
        for judge, kinds in entry.get("called harmful", {}).items():
            text = ", ".join(f"{k} {v['k']}/{v['n']}" for k, v in kinds.items())
            print(f"  {judge:8s} calls harmful: {text}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"harm-probe-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"L2 weight {lam} (5-fold CV accuracy {cv[lam]:.3f}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
