"""What each round of a run trained on, by prompt kind: why do later rounds undo earlier ones?

Usage: python bench/round_drift.py RUN_DIR [--kinds FILE ...] [--out FILE]

For each round of a run (finished or not), from its step folders:
- the policy's sampled answers (the `sample` step's responses.jsonl, less any sampled under a
  `negative_context`): the share that refuse, that admit not knowing, and that copy the request
  (most of the answer's words are the request's), per kind of prompt;
- each prompt's best answer by the `score` step's total, the answer `train sft { on = "best" }`
  starts from (never a `negative_only_rejected` one): the same shares;
- the preference pairs (pairs.jsonl): refusal over compliance, compliance over refusal, and
  neither, per kind;
- the behaviour evaluation after the round, when the run evaluates every round.
Refusing and admitting are judged by the behaviour evaluation's detectors
(ralign/runtime/behavior.py), not by the rules the run was scored with. A prompt's kind comes from
the built-in seed sets (and any --kinds file of {prompt, kind} rows); prompts of no known kind
(self-written ones) count as "other". Reads files only: no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ralign.runtime.behavior import admits_not_knowing, is_refusal  # noqa: E402
from ralign.runtime.steps import choosable_flags  # noqa: E402
from ralign.stats import rate  # noqa: E402

SEEDS = sorted((ROOT / "ralign" / "data" / "seeds").glob("*.jsonl"))
COPY_SHARE = 0.6  # an answer copies the request when more of its words than this are the request's
_WORD = re.compile(r"[a-z0-9']+")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def kinds_of(files: list[Path]) -> dict[str, str]:
    """Prompt -> kind, from JSONL files of {prompt, kind} rows."""
    out = {}
    for path in files:
        for row in read_jsonl(path):
            out[row["prompt"]] = row.get("kind", "other")
    return out


def copies(prompt: str, answer: str) -> bool:
    """Whether more than COPY_SHARE of the answer's words (5 or more) occur in the request."""
    words = _WORD.findall(answer.lower())
    asked = set(_WORD.findall(prompt.lower()))
    return len(words) >= 5 and sum(w in asked for w in words) / len(words) > COPY_SHARE


def traits(prompt: str, answer: str) -> dict[str, bool]:
    return {
        "refuses": is_refusal(answer),
        "admits": admits_not_knowing(answer),
        "copies": copies(prompt, answer),
    }


def step_file(round_dir: Path, kind: str, name: str) -> Path | None:
    """The file `name` of the round's first step of `kind` (folders are PHASE.KIND[.NAME])."""
    for folder in sorted(p for p in round_dir.iterdir() if p.is_dir()):
        parts = folder.name.split(".")
        if len(parts) >= 2 and parts[1] == kind and (folder / name).is_file():
            return folder / name
    return None


def shares(rows: list[tuple[str, dict[str, bool]]]) -> dict[str, dict[str, Any]]:
    """Kind -> {trait: rate} over (kind, traits) rows."""
    by_kind: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for kind, t in rows:
        by_kind[kind].append(t)
    return {
        kind: {name: rate(sum(t[name] for t in ts), len(ts)) for name in ts[0]}
        for kind, ts in sorted(by_kind.items())
    }


def round_summary(round_dir: Path, kinds: dict[str, str]) -> dict[str, Any]:
    """One round's answers, best answers and pairs, by kind of prompt."""
    out: dict[str, Any] = {}
    responses = step_file(round_dir, "sample", "responses.jsonl")
    if responses is None:
        return out
    records = read_jsonl(responses)
    # Answers sampled under a `negative_context` are the recipe's, not the policy's own choice.
    out["sampled"] = shares(
        [
            (kinds.get(r["prompt"], "other"), traits(r["prompt"], a))
            for r in records
            for a, negative in zip(
                r["responses"], r.get("negative") or [False] * len(r["responses"]), strict=True
            )
            if not negative
        ]
    )
    scores = step_file(round_dir, "score", "score.total.jsonl")
    if scores is not None:
        best = []
        for r, s in zip(records, read_jsonl(scores), strict=True):
            may = choosable_flags(r)
            i = max(  # first of ties, among the answers `train sft` may learn
                (j for j in range(len(s["scores"])) if may[j]), key=lambda j: s["scores"][j]
            )
            best.append((kinds.get(r["prompt"], "other"), traits(r["prompt"], r["responses"][i])))
        out["best"] = shares(best)
    pairs = step_file(round_dir, "pairs", "pairs.jsonl")
    if pairs is not None:
        counts: dict[str, dict[str, int]] = defaultdict(
            lambda: {"refusal_over_compliance": 0, "compliance_over_refusal": 0, "neither": 0}
        )
        for p in read_jsonl(pairs):
            chosen, rejected = is_refusal(p["chosen"]), is_refusal(p["rejected"])
            which = (
                "refusal_over_compliance"
                if chosen and not rejected
                else "compliance_over_refusal"
                if rejected and not chosen
                else "neither"
            )
            counts[kinds.get(p["prompt"], "other")][which] += 1
        out["pairs"] = dict(sorted(counts.items()))
    return out


def behaviour_by_round(run_dir: Path) -> dict[int, dict[str, float]]:
    """Round -> the behaviour evaluation's rates after it, from metrics.jsonl (round 0: the base)."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for row in read_jsonl(path):
        if "/evaluate/behavior" in row["step"] and row["metric"].startswith("rates."):
            out[row["round"]][row["metric"].removeprefix("rates.")] = row["value"]
    return dict(out)


def drift(run_dir: Path, kind_files: list[Path]) -> dict[str, Any]:
    kinds = kinds_of([*SEEDS, *kind_files])
    rounds = sorted(
        (int(p.name[1:]), p)
        for p in run_dir.iterdir()
        if p.is_dir() and re.fullmatch(r"r[1-9]\d*", p.name)
    )
    return {
        "run": str(run_dir),
        "rounds": {r: round_summary(p, kinds) for r, p in rounds},
        "behavior": behaviour_by_round(run_dir),
    }


def _shares(x: dict[str, Any]) -> str:
    return "/".join(f"{x[t]['value']:.2f}" for t in ("refuses", "admits", "copies"))


def table(result: dict[str, Any]) -> str:
    """Per round and kind: sampled and best shares (refuses / admits / copies), and pair counts."""
    lines = [
        "round  kind            sampled ref/adm/copy   best ref/adm/copy   pairs R>C / C>R / -"
    ]
    for r, summary in result["rounds"].items():
        for kind in sorted(summary.get("sampled", {})):
            s = summary["sampled"][kind]
            b = summary.get("best", {}).get(kind)
            p = summary.get("pairs", {}).get(kind)
            pair = (
                f"{p['refusal_over_compliance']:3d} / {p['compliance_over_refusal']:3d} / {p['neither']:3d}"
                if p
                else "-"
            )
            lines.append(
                f"{r:>5}  {kind:14s}  {_shares(s):20s}   {_shares(b) if b else '-':18s}  {pair}"
            )
    for r, rates in sorted(result["behavior"].items()):
        shown = ", ".join(f"{k.removesuffix('_rate')} {v:.3f}" for k, v in sorted(rates.items()))
        lines.append(f"behaviour after round {r}: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--kinds", type=Path, nargs="*", default=[], help="more {prompt, kind} files")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args(argv)
    result = drift(args.run_dir, args.kinds)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
