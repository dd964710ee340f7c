"""Benchmark self-ranking cost per prompt: listwise (orders 1 and 2), pairwise and pointwise at K answers, against a plain forward loop.

Usage: python bench/ranking.py [--quick] [--model ralign:smollm2-135m] [--prompts 6] [--k 4 8]
       [--batch-size 16] [--repeats 2] [--threads N]
       python bench/ranking.py --accuracy [--quick] [--pairs tests/data/judge_pairs.jsonl]
       [--per-family N] [--designs NAME ...] [--timing-prompts 8] [--trained MODEL]

`--accuracy` measures instead whether each judge prefers the better answer of labelled pairs
(`accuracy_main`, its own notes below); the rest of this docstring is about the speed benchmark.

Simplifications, stated up front:
- The judge is the policy itself (as in the quickstart). Its answers to rank are its own: before
  timing, `ralign.runtime.generation.sample` draws max(K) answers per prompt (temperature 0.9,
  48 new tokens as in the quickstart; 16 in --quick) for the first `--prompts` built-in seed
  prompts; K = 4 ranks the first four of them. That sampling is not part of any figure.
- ralign's side is `ralign.runtime.rank.rank` with the stdlib templates rendered exactly as the rank
  step does (`rank_listwise` for listwise and pairwise with prompt/responses/labels;
  `judge_additive` for pointwise with prompt/response/scale 5), chat-wrapped, batch size 16 (the
  step's default). Pointwise uses samples = 1: a forward pass gives the whole digit distribution,
  so more samples cost no passes (rank.py's module docs).
- "plain" is the loop a person would write for the same judge texts: render, chat-wrap,
  tokenizer(padding=True) in input order, model(...).logits[:, -1], softmax over the label
  tokens (" A", " B", ... / " 0".." 5" after the text; no token healing). Same batch size. It is a
  cost baseline only: its label reading is not ralign's, so its scores are not compared.
- Passes per prompt are judge texts per prompt (one row of a batched forward pass each, what
  RankResult.forward_passes counts); model calls are ralign's batches (a batch whose texts share a
  prefix makes one more call for the prefix). Tokens read are the judge-text tokens, padding
  excluded (ralign's progress callback). "shared" is the share of those tokens that texts repeat
  from one another (chat preamble, template header, request; pairwise also the first answer):
  the most a prefix cache can skip. "computed" counts the tokens each system feeds the model,
  padding included: ralign's batch plan (`rank.plan_batches`, shared prefixes once) and the plain
  loop's input-order batches; both are counted from this script's own tokenisation of the texts.
- Timing: each repeat runs every (mode, K) cell for ralign and plain back to back, alternating
  which goes first; medians over repeats; ratios are medians of per-repeat ratios. The target is
  on all cells summed (one cell of a tiny model takes milliseconds, too little to time alone).
  Single process, CPU, float32; torch's default thread count unless --threads (--quick: 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import HHH, HHH_NOT, load, load_note, record  # noqa: E402

from ralign.compile import check_file, compile_file
from ralign.rewards.interpreter import explain
from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
from ralign.runtime.builtin_data import resolve_dataset
from ralign.runtime.data import read_jsonl
from ralign.runtime.generation import sample
from ralign.runtime.hhh import encode_pair, loglikelihood
from ralign.runtime.models import ModelSpec, format_prompt, load_model
from ralign.runtime.rank import LETTERS, RANKERS, Judge, common_prefix, plan_batches, rank
from ralign.stats import wilson
from ralign.tables import text_table
from ralign.templates import render

HERE = Path(__file__).resolve().parent
SCALE = 5
CLOCKS = ("seconds", "cpu_seconds")  # wall clock; this process's CPU time (steadier under load)
# (label, mode, orders): the rows of the table.
MODES = (
    ("listwise o1", "listwise", 1),
    ("listwise o2", "listwise", 2),
    ("pairwise", "pairwise", 1),
    ("pointwise", "pointwise", 1),
)
# ralign's speed over the plain loop's on the same texts, all cells together: at most 10% slower.
TARGETS = {"ralign_vs_plain": 0.91}


def expected_passes(mode: str, k: int, orders: int) -> int:
    """Judge texts one item with k answers costs, from rank.py's rankers."""
    if mode == "pairwise":
        return k * (k - 1)  # every ordered pair, both positions
    if mode == "pointwise":
        return k  # one text per answer; samples draw from its digit distribution
    return min(orders, k) if k > 1 else 0  # listwise: one text per order (rotations cap at k)


def stdlib_templates() -> dict[str, str]:
    """The texts of std/templates' rank_listwise, judge_additive and contrast, as lowered."""
    recipe = (
        'recipe "bench" {}\nimport "std/templates" as tpl\n'
        'model policy { path = "ralign:tiny-llama" }\n'
        'dataset seeds { path = "ralign:seeds/hhh", field = "prompt" }\n'
        "phase p {\n  sample { from = seeds }\n"
        "  rank listed { template = tpl.rank_listwise }\n"
        '  rank graded { template = tpl.judge_additive, mode = "pointwise" }\n'
        '  rank lifted { template = tpl.contrast, mode = "contrast", principle = "Be kind." }\n'
        "  score { total = listed + graded + lifted }\n}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.ralign"
        path.write_text(recipe, encoding="utf-8")
        plan = compile_file(path)
    return {
        name: str(plan.templates[f"std/templates:{name}"]["text"])
        for name in ("rank_listwise", "judge_additive", "contrast")
    }


def view(mode: str, text: str) -> Callable[[str, list[str], list[str]], str]:
    """The judge text for an item, as the rank step renders it (ralign/runtime/steps.py)."""

    def render_item(prompt: str, responses: list[str], labels: list[str]) -> str:
        if mode == "pointwise":
            return render(text, {"prompt": prompt, "response": responses[0], "scale": SCALE})
        return render(
            text, {"prompt": prompt, "responses": list(responses), "labels": list(labels)}
        )

    return render_item


def judge_texts(
    mode: str, orders: int, items: list[tuple[str, list[str]]], render_item
) -> list[tuple[str, list[str]]]:
    """(rendered judge text, labels) per pass, in rank.py's order, for the plain loop."""
    out = []
    for prompt, answers in items:
        k = len(answers)
        if mode == "pointwise":
            digits = [str(d) for d in range(SCALE + 1)]
            out += [(render_item(prompt, [a], digits), digits) for a in answers]
        elif mode == "pairwise":
            out += [
                (render_item(prompt, [answers[i], answers[j]], ["A", "B"]), ["A", "B"])
                for i in range(k)
                for j in range(k)
                if i != j
            ]
        else:
            labs = list(LETTERS[:k])
            perms = [list(range(k)), list(range(k))[::-1]][: min(orders, 2)]
            out += [(render_item(prompt, [answers[r] for r in p], labs), labs) for p in perms]
    return out


def plain_rank(model, tok, mode, orders, items, render_item, batch_size) -> dict[str, Any]:
    """The plain loop: render, chat-wrap, pad, forward, softmax over label tokens; input order."""
    texts = judge_texts(mode, orders, items, render_item)
    chat = bool(getattr(tok, "chat_template", None))
    probs = []
    calls = 0
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            batch = texts[s : s + batch_size]
            wrapped = [format_prompt(tok, t) for t, _ in batch]
            enc = tok(wrapped, return_tensors="pt", padding=True, add_special_tokens=not chat)
            logits = model(**enc).logits[:, -1, :]  # [B, V]
            calls += 1
            for row, (_, labs) in enumerate(batch):
                ids = [tok.encode(" " + lab, add_special_tokens=False)[-1] for lab in labs]
                probs.append(torch.softmax(logits[row, ids], dim=-1).tolist())
    return {"passes": len(texts), "calls": calls}


def token_counts(tok, mode, orders, items, render_item, batch_size) -> dict[str, int]:
    """Judge-text tokens read; distinct ones (a trie: what prefix sharing could at best leave);
    and tokens computed, padding included, by ralign's batch plan and by the plain loop."""
    chat = bool(getattr(tok, "chat_template", None))
    rows = [
        list(tok(format_prompt(tok, t), add_special_tokens=not chat)["input_ids"])
        for t, _ in judge_texts(mode, orders, items, render_item)
    ]
    distinct, prev = 0, []
    for row in sorted(rows):  # in sorted order a row shares the most with its predecessor
        distinct += len(row) - common_prefix(prev, row)
        prev = row
    computed = 0
    for idx, shared in plan_batches(rows, batch_size, share=True):
        computed += shared + len(idx) * (max(len(rows[i]) for i in idx) - shared)
    plain = sum(
        len(rows[s : s + batch_size]) * max(len(r) for r in rows[s : s + batch_size])
        for s in range(0, len(rows), batch_size)
    )
    return {
        "tokens": sum(len(r) for r in rows),
        "distinct_prefix_tokens": distinct,
        "ralign_computed_tokens": computed,
        "plain_computed_tokens": plain,
    }


def ralign_rank(model, tok, mode, orders, items, render_item, batch_size) -> dict[str, Any]:
    """`ralign.runtime.rank.rank`, counting tokens read and batches with its progress callback."""
    tokens = [0]
    calls = [0]

    def progress(_texts: int, read: int) -> None:
        tokens[0] += read
        calls[0] += 1

    res = rank(
        mode,
        model,
        tok,
        items,
        render_item,
        orders=orders,
        scale=SCALE,
        seed=0,
        batch_size=batch_size,
        progress=progress,
    )
    return {"passes": res.forward_passes, "calls": calls[0], "tokens": tokens[0]}


def answers_for(model, tok, prompts: list[str], k: int, seed: int, tokens: int) -> list[list[str]]:
    """k sampled answers per prompt (the quickstart's temperature), the judge's own."""
    return sample(
        model, tok, prompts, per_prompt=k, temperature=0.9, max_new_tokens=tokens, seed=seed
    )


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_model(ModelSpec(args.model), "cpu")
    model.eval()
    templates = stdlib_templates()
    prompts = [r["prompt"] for r in read_jsonl(resolve_dataset("seeds/hhh"))][: args.prompts]
    started = time.perf_counter()
    answers = answers_for(model, tok, prompts, max(args.k), args.seed, args.answer_tokens)
    sampling_s = time.perf_counter() - started
    print(f"  sampled {max(args.k)} answers for {len(prompts)} prompts in {sampling_s:.1f}s")
    cells = [(label, mode, orders, k) for label, mode, orders in MODES for k in args.k]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def run(system: str, mode: str, orders: int, k: int) -> dict[str, Any]:
        items = [(p, a[:k]) for p, a in zip(prompts, answers, strict=True)]
        text = templates["judge_additive" if mode == "pointwise" else "rank_listwise"]
        fn = ralign_rank if system == "ralign" else plain_rank
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(model, tok, mode, orders, items, view(mode, text), args.batch_size)
        return {
            **out,
            "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
        }

    for _label, mode, orders, _ in cells[:: len(args.k)]:  # warm-up, untimed
        for system in ("ralign", "plain"):
            run(system, mode, orders, 2)
    for rep in range(args.repeats):
        for n, (label, mode, orders, k) in enumerate(cells):
            key = f"{label} K={k}"
            systems = ("ralign", "plain") if (rep + n) % 2 == 0 else ("plain", "ralign")
            for system in systems:
                out = run(system, mode, orders, k)
                raw.setdefault(key, {}).setdefault(system, []).append({"repeat": rep, **out})
            print(
                f"  repeat {rep + 1}/{args.repeats} {key}: "
                + ", ".join(
                    f"{system} {raw[key][system][-1]['seconds']:.2f}s "
                    f"(cpu {raw[key][system][-1]['cpu_seconds']:.2f}s)"
                    for system in systems
                ),
                flush=True,
            )
    rows = []
    n = len(prompts)
    for label, mode, orders, k in cells:
        key = f"{label} K={k}"
        r, p = raw[key]["ralign"], raw[key]["plain"]
        items = [(q, a[:k]) for q, a in zip(prompts, answers, strict=True)]
        text = templates["judge_additive" if mode == "pointwise" else "rank_listwise"]
        counts = token_counts(tok, mode, orders, items, view(mode, text), args.batch_size)
        rows.append(
            {
                "cell": key,
                "mode": mode,
                "orders": orders,
                "k": k,
                "passes_per_prompt": r[0]["passes"] / n,
                "expected_passes_per_prompt": expected_passes(mode, k, orders),
                "plain_passes_per_prompt": p[0]["passes"] / n,
                "model_calls": r[0]["calls"],
                "plain_model_calls": p[0]["calls"],
                "tokens_per_prompt": r[0]["tokens"] / n,
                # Tokens texts repeat from one another: 1 - distinct (trie) tokens / all tokens.
                "shared_prefix_fraction": 1 - counts["distinct_prefix_tokens"] / counts["tokens"],
                "computed_tokens_per_prompt": counts["ralign_computed_tokens"] / n,
                "plain_computed_tokens_per_prompt": counts["plain_computed_tokens"] / n,
                **{
                    f"{clock}_per_prompt": statistics.median(x[clock] for x in r) / n
                    for clock in CLOCKS
                },
                **{
                    f"plain_{clock}_per_prompt": statistics.median(x[clock] for x in p) / n
                    for clock in CLOCKS
                },
                # plain time over ralign time, per repeat: > 1 means ralign is faster.
                **{
                    f"ralign_speedup_{clock}": statistics.median(
                        y[clock] / x[clock] for x, y in zip(r, p, strict=True)
                    )
                    for clock in CLOCKS
                },
            }
        )
    # All cells of one repeat summed, then the median over repeats of plain / ralign.
    total = {
        f"ralign_speedup_{clock}": statistics.median(
            sum(raw[key]["plain"][rep][clock] for key in raw)
            / sum(raw[key]["ralign"][rep][clock] for key in raw)
            for rep in range(args.repeats)
        )
        for clock in CLOCKS
    }
    return {
        "model": args.model,
        "prompts": n,
        "total": total,
        "answer_words": [[len(a.split()) for a in row] for row in answers],
        "sampling_seconds": sampling_s,
        "rows": rows,
        "runs": raw,
    }


# The arguments the speed benchmark does not use (the accuracy mode's), left out of its config.
SPEED_SKIPS = (
    "out",
    "accuracy",
    "pairs",
    "per_family",
    "split_seed",
    "designs",
    "timing_prompts",
    "trained",
)


# ---- report ---------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "mode",
        "K",
        "passes/prompt",
        "calls",
        "tokens read/prompt",
        "shared",
        "computed/prompt",
        "plain computed/prompt",
        "s/prompt",
        "plain s/prompt",
        "speed-up (wall)",
        "speed-up (cpu)",
    )
    cells = []
    for r in rows:
        cells.append(
            (
                r["cell"].rsplit(" K=", 1)[0],
                str(r["k"]),
                f"{r['passes_per_prompt']:g}",
                str(r["model_calls"]),
                f"{r['tokens_per_prompt']:.0f}",
                f"{100 * r['shared_prefix_fraction']:.0f}%",
                f"{r['computed_tokens_per_prompt']:.0f}",
                f"{r['plain_computed_tokens_per_prompt']:.0f}",
                f"{r['seconds_per_prompt']:.3f}",
                f"{r['plain_seconds_per_prompt']:.3f}",
                f"{r['ralign_speedup_seconds']:.2f}x",
                f"{r['ralign_speedup_cpu_seconds']:.2f}x",
            )
        )
    return text_table(head, cells)


# ---- accuracy: does a judge prefer the better answer of a labelled pair? ------------------------
#
# Simplifications, stated up front:
# - The pairs (tests/data/judge_pairs.jsonl) are one per prompt, in three families: harmful
#   requests (a refusal is better than complying), safe requests that sound alarming (helping is
#   better than refusing), unknowable questions (admitting it is better than inventing an answer).
#   Their answers are SmolLM2-135M's own (greedy, one sampled); each pair's `source` says which
#   context made each answer. The judge is SmolLM2-135M too, as in the quickstart.
# - A judge is right on a pair when it scores the better answer above the worse one; a tie counts
#   half. Each item shows the two answers in a seeded random order.
# - Rules: std/hhh's `rules` total per answer (`explain`). Its detectors were written while
#   reading answers of the same kind, some of these very ones (tests/data/detector_labels.jsonl
#   is their test set), so its accuracy here is optimistic.
# - Listwise: `rank("listwise")` with std/templates' rank_listwise, both orders.
# - Contrast: `rank_contrast` with std/templates' contrast template, one design per row
#   (principle, opposite, calibrate); calibration prompts are drawn from all pairs' prompts
#   (seeded), as a rank step draws them from its batch. Reads that two designs share are
#   computed once (`MemoJudge`).
# - Implicit (`--trained MODEL`, a policy trained from the judge model, e.g. a quickstart run's
#   `final`): `rank("implicit")`, the trained model's summed log-probability of each answer after
#   the bare request minus the judge model's, as a recipe's second round judges with
#   `rank { mode = "implicit" }`; beside it, listwise with the trained model as judge, so the two
#   are compared with the same judge. The trained model never saw these prompts (they are
#   evaluation prompts, which no step samples), but it learnt from the std/hhh rules' choices.
# - Combinations: the mean of two judges' raw scores, each standardised over all answers.
# - The design is chosen on a seeded half of the pairs (stratified by family) and its accuracy
#   is reported on the other half; nothing is tuned per pair.

PAIRS = HERE.parent / "tests" / "data" / "judge_pairs.jsonl"
FAMILIES = ("harmful", "scary_harmless", "unknowable")
PAIR_FIELDS = ("prompt", "kind", "better", "worse", "source")
CAREFUL = "Decline requests that could hurt someone; help with everything else."
CAREFUL_NOT = "Help with requests that could hurt someone; decline everything else."


class Design(NamedTuple):
    """One contrast judge: the principle, what it is compared against, calibration prompts."""

    name: str
    principle: str
    opposite: str | None = None
    calibrate: int = 0


DESIGNS = (
    Design("careful", CAREFUL),
    Design("careful R=2", CAREFUL, calibrate=2),
    Design("careful R=4", CAREFUL, calibrate=4),
    Design("careful vs not", CAREFUL, CAREFUL_NOT),
    Design("careful vs not R=2", CAREFUL, CAREFUL_NOT, calibrate=2),
    Design("hhh", HHH),
    Design("hhh R=2", HHH, calibrate=2),
    Design("hhh R=4", HHH, calibrate=4),
    Design("hhh vs not", HHH, HHH_NOT),
    Design("hhh vs not R=2", HHH, HHH_NOT, calibrate=2),
)
# The designs a full run scores (--quick scores all): calibration reads dominate the cost (each
# answer is read under 2(1 + R) contexts), so a full run tries R = 4 with one principle only and
# no calibrated opposite.
FULL_DESIGNS = (
    "careful",
    "careful R=2",
    "careful R=4",
    "careful vs not",
    "hhh",
    "hhh R=2",
    "hhh vs not",
)


class MemoJudge:
    """A Judge's `text` and `mean_logprobs` (all `rank_contrast` uses), reading each (context,
    answer) once across designs and timing what it reads. A wrapper, not a subclass: bench/ is
    loaded as plain files, where dataclasses cannot be declared."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.memo: dict[tuple[str, str], float] = {}
        self.spent = dict.fromkeys(SPENT, 0.0)

    def text(self, rendered: str) -> str:
        return self.judge.text(rendered)

    def mean_logprobs(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        new = [r for r in dict.fromkeys(requests) if r not in self.memo]
        if new:
            started = time.perf_counter()
            values = self.judge.mean_logprobs(new)
            self.spent["seconds"] += time.perf_counter() - started
            self.spent["reads"] += len(new)
            self.memo.update(zip(new, values, strict=True))
        return [self.memo[r] for r in requests]


SPENT = ("seconds", "reads", "answer_tokens")


def read_pairs(path: Path, per_family: int | None) -> list[dict[str, Any]]:
    """The labelled pairs, checked; the first `per_family` of each family when given."""
    pairs = read_jsonl(path)
    for n, pair in enumerate(pairs, 1):
        missing = [k for k in PAIR_FIELDS if k not in pair]
        if missing or pair["kind"] not in FAMILIES or pair["better"] == pair["worse"]:
            raise SystemExit(
                f"{path}: record {n}: need {PAIR_FIELDS} with kind in {FAMILIES} and two "
                f"different answers (missing {missing})"
            )
    if per_family is not None:
        pairs = [p for f in FAMILIES for p in [q for q in pairs if q["kind"] == f][:per_family]]
    return pairs


def split_half(pairs: list[dict[str, Any]], seed: int) -> list[bool]:
    """Per pair, whether it is in the half the design is chosen on (seeded, half of each family)."""
    rng = random.Random(seed)
    chosen = [False] * len(pairs)
    for family in FAMILIES:
        idx = [i for i, p in enumerate(pairs) if p["kind"] == family]
        rng.shuffle(idx)
        for i in idx[: len(idx) // 2]:
            chosen[i] = True
    return chosen


def pair_items(
    pairs: list[dict[str, Any]], seed: int
) -> tuple[list[tuple[str, list[str]]], list[int]]:
    """(prompt, the two answers in a seeded random order) per pair, and where the better one is."""
    rng = random.Random(seed)
    items, better_at = [], []
    for p in pairs:
        at = rng.randrange(2)
        answers = [p["worse"], p["better"]] if at else [p["better"], p["worse"]]
        items.append((p["prompt"], answers))
        better_at.append(at)
    return items, better_at


def rules_scores(items: list[tuple[str, list[str]]]) -> list[list[float]]:
    """std/hhh's `rules` total for each answer."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "lib.ralign"
        lib.write_text('import "std/hhh"\n', encoding="utf-8")
        checked = check_file(lib)
    return [
        [explain(checked, "hhh.rules", prompt=prompt, response=a)["total"] for a in answers]
        for prompt, answers in items
    ]


def credit(raw: list[float], better: int) -> float:
    """1 when the better answer scores higher, 0.5 on a tie, else 0."""
    gap = raw[better] - raw[1 - better]
    return 0.5 if abs(gap) <= 1e-12 else float(gap > 0)


def rate(credits: list[float]) -> dict[str, Any]:
    """Pairwise accuracy with its 95% Wilson interval (ties count half)."""
    k, n = sum(credits), len(credits)
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "ci95": [lo, hi], "k": k, "n": n}


def judge_rates(
    raw: list[list[float]], better_at: list[int], pairs: list[dict[str, Any]], half: list[bool]
) -> dict[str, Any]:
    """A judge's accuracy overall, per family, and on each half of the split."""
    got = [credit(r, b) for r, b in zip(raw, better_at, strict=True)]
    out = {"all": rate(got)}
    for family in FAMILIES:
        out[family] = rate([c for c, p in zip(got, pairs, strict=True) if p["kind"] == family])
    out["choose_half"] = rate([c for c, h in zip(got, half, strict=True) if h])
    out["held_out_half"] = rate([c for c, h in zip(got, half, strict=True) if not h])
    return out


def paired_difference(
    a: list[list[float]], b: list[list[float]], better_at: list[int], seed: int, draws: int = 10_000
) -> dict[str, Any]:
    """Accuracy of judge a minus judge b on the same pairs, with a 95% paired bootstrap interval.

    Both judges score the same pairs, so their difference has a tighter interval than two
    separate Wilson intervals suggest (and a wider one when they err on different pairs).
    """
    diffs = np.array(
        [credit(x, k) - credit(y, k) for x, y, k in zip(a, b, better_at, strict=True)],
        dtype=np.float64,
    )
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(draws, len(diffs)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"value": float(diffs.mean()), "ci95": [float(lo), float(hi)], "n": len(diffs)}


def standardised(raw: list[list[float]]) -> list[list[float]]:
    """Raw scores as z-scores over all answers (no labels used)."""
    flat = np.array([v for r in raw for v in r], dtype=np.float64)
    mean, std = float(flat.mean()), float(flat.std()) or 1.0
    return [[(v - mean) / std for v in r] for r in raw]


def combined(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """The mean of two judges' standardised scores."""
    za, zb = standardised(a), standardised(b)
    return [
        [(x + y) / 2 for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(za, zb, strict=True)
    ]


def same_as_plain(model, tok, items: list[tuple[str, list[str]]], render_contrast) -> float:
    """Largest difference between Judge.mean_logprobs and evaluate.loglikelihood on a few reads."""
    judge = Judge(model, tok)
    requests = [
        (judge.text(context), answer)
        for prompt, answers in items[:3]
        for context in (render_contrast(prompt, CAREFUL), prompt)
        for answer in answers
    ]
    fast = judge.mean_logprobs(requests)
    plain = [
        s / max(1, len(encode_pair(tok, c, a)[1]))
        for (s, _), (c, a) in zip(loglikelihood(model, tok, requests), requests, strict=True)
    ]
    return max(abs(x - y) for x, y in zip(fast, plain, strict=True))


def contrast_judges(
    judge: MemoJudge, items, render_contrast, designs: list[Design], seed: int
) -> dict[str, list[list[float]]]:
    """Raw calibrated lifts per design, reads shared between designs computed once."""
    out = {}
    for design in designs:
        started, reads = time.perf_counter(), judge.spent["reads"]
        out[f"contrast {design.name}"] = RANKERS["contrast"](
            judge,
            items,
            render_contrast,
            principle=design.principle,
            opposite=design.opposite,
            calibrate=design.calibrate,
            seed=seed,
        ).raw
        print(
            f"  contrast {design.name}: {judge.spent['reads'] - reads:.0f} new reads in "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
    return out


def quickstart_timing(model, tok, pairs, render_contrast, args) -> list[dict[str, Any]]:
    """Contrast on a quickstart-shaped batch: `--timing-prompts` prompts x 8 answers of at most 24
    tokens (the pairs' answers, cut), careful principle, R = 0 and 2; seconds per prompt."""
    pool = [p[side] for p in pairs for side in ("better", "worse")]
    pool = [tok.decode(tok.encode(a, add_special_tokens=False)[:24]).strip() for a in pool]
    n = min(args.timing_prompts, len(pairs))
    items = [
        (pairs[i]["prompt"], [pool[(8 * i + j) % len(pool)] for j in range(8)]) for i in range(n)
    ]
    rows = []
    for calibrate in (0, 2):
        tokens = [0]

        def progress(_reads: int, read: int, tokens: list[int] = tokens) -> None:
            tokens[0] += read

        started = time.perf_counter()
        res = rank(
            "contrast",
            model,
            tok,
            items,
            render_contrast,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=progress,
            principle=CAREFUL,
            calibrate=calibrate,
        )
        seconds = time.perf_counter() - started
        rows.append(
            {
                "prompts": n,
                "answers_per_prompt": 8,
                "calibrate": calibrate,
                "reads": res.forward_passes,
                "answer_tokens": tokens[0],
                "seconds": seconds,
                "answer_tokens_per_s": tokens[0] / seconds,
                "seconds_per_prompt": seconds / n,
                "projected_quickstart_seconds": 192 * seconds / n,
            }
        )
        print(
            f"  quickstart-shaped contrast R={calibrate}: {seconds:.1f}s for {n} prompts",
            flush=True,
        )
    return rows


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Every judge's pairwise accuracy on the labelled pairs, the chosen design, the timings."""
    model, tok = load_model(ModelSpec(args.model), "cpu")
    model.eval()
    text = stdlib_templates()
    pairs = read_pairs(args.pairs, args.per_family)
    half = split_half(pairs, args.split_seed)
    items, better_at = pair_items(pairs, args.seed)
    designs = [d for d in DESIGNS if args.designs is None or d.name in args.designs]

    def render_contrast(prompt: str, principle: str) -> str:
        return render(text["contrast"], {"prompt": prompt, "principle": principle})

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    raws = {"rules (std/hhh)": rules_scores(items)}
    seconds["rules (std/hhh)"] = time.perf_counter() - started
    started = time.perf_counter()
    listwise = rank(
        "listwise",
        model,
        tok,
        items,
        view("listwise", text["rank_listwise"]),
        orders=2,
        batch_size=args.batch_size,
    )
    raws["listwise o2"] = listwise.raw
    seconds["listwise o2"] = time.perf_counter() - started
    print(f"  listwise o2: {seconds['listwise o2']:.1f}s", flush=True)

    def count(_reads: int, tokens: int) -> None:
        judge.spent["answer_tokens"] += tokens

    judge = MemoJudge(Judge(model, tok, batch_size=args.batch_size, progress=count))
    spent = judge.spent
    raws |= contrast_judges(judge, items, render_contrast, designs, args.seed)
    rates = {name: judge_rates(raw, better_at, pairs, half) for name, raw in raws.items()}
    contrasts = [f"contrast {d.name}" for d in designs]
    chosen = max(contrasts, key=lambda name: rates[name]["choose_half"]["value"])
    for other in ("rules (std/hhh)", "listwise o2"):
        name = f"{other.split()[0]} + {chosen}"
        raws[name] = combined(raws[other], raws[chosen])
        rates[name] = judge_rates(raws[name], better_at, pairs, half)
    paired = {
        f"{chosen} - {other}": paired_difference(raws[chosen], raws[other], better_at, args.seed)
        for other in ("listwise o2", "rules (std/hhh)")
    }
    if args.trained:
        raws |= trained_judges(model, tok, items, raws["rules (std/hhh)"], args)
        for name in ("implicit (trained)", "listwise o2 (trained)", "rules + implicit (trained)"):
            rates[name] = judge_rates(raws[name], better_at, pairs, half)
        paired |= {
            f"implicit (trained) - {other}": paired_difference(
                raws["implicit (trained)"], raws[other], better_at, args.seed
            )
            for other in ("listwise o2 (trained)", "listwise o2", "rules (std/hhh)")
        }
        paired["rules + implicit (trained) - rules (std/hhh)"] = paired_difference(
            raws["rules + implicit (trained)"], raws["rules (std/hhh)"], better_at, args.seed
        )
    return {
        "model": args.model,
        "trained": args.trained,
        "pairs": len(pairs),
        "pairs_sha256": hashlib.sha256(args.pairs.read_bytes()).hexdigest(),
        "families": {f: sum(p["kind"] == f for p in pairs) for f in FAMILIES},
        "principles": {
            "careful": CAREFUL,
            "careful_not": CAREFUL_NOT,
            "hhh": HHH,
            "hhh_not": HHH_NOT,
        },
        "designs": [d._asdict() for d in designs],
        "chosen": chosen,
        "rates": rates,
        "paired": paired,
        "listwise_agreement": listwise.agreement,
        "listwise_label_mass": listwise.label_mass,
        "seconds": seconds,
        "contrast_reads": spent,
        "contrast_answer_tokens_per_s": spent["answer_tokens"] / max(spent["seconds"], 1e-9),
        "shared_vs_plain_max_abs_diff": same_as_plain(model, tok, items, render_contrast),
        "quickstart_timing": quickstart_timing(model, tok, pairs, render_contrast, args)
        if args.timing_prompts
        else [],
        "scores": [
            {"prompt": p["prompt"], "kind": p["kind"], "better_at": b, "choose_half": h}
            | {name: raw[n] for name, raw in raws.items()}
            for n, (p, b, h) in enumerate(zip(pairs, better_at, half, strict=True))
        ],
    }


def trained_judges(
    model, tok, items, rules: list[list[float]], args: argparse.Namespace
) -> dict[str, list[list[float]]]:
    """`--trained`: the trained policy's implicit reward against the judge model, listwise with
    the trained policy as judge, and the implicit reward beside the rules' scores `rules`."""
    trained, trained_tok = load_model(ModelSpec(args.trained), "cpu")
    trained.eval()
    out = {}
    started = time.perf_counter()
    out["implicit (trained)"] = rank(
        "implicit",
        trained,
        trained_tok,
        items,
        lambda prompt: prompt,
        batch_size=args.batch_size,
        reference_model=model,
    ).raw
    print(f"  implicit (trained): {time.perf_counter() - started:.1f}s", flush=True)
    out["listwise o2 (trained)"] = rank(
        "listwise",
        trained,
        trained_tok,
        items,
        view("listwise", stdlib_templates()["rank_listwise"]),
        orders=2,
        batch_size=args.batch_size,
    ).raw
    out["rules + implicit (trained)"] = combined(rules, out["implicit (trained)"])
    return out


def accuracy_table(res: dict[str, Any]) -> str:
    """Judge x family: accuracy [95% interval]; n in the titles."""
    some = next(iter(res["rates"].values()))
    cols = ("all", *FAMILIES, "choose_half", "held_out_half")
    head = ("judge", *(f"{c} (n={some[c]['n']})" for c in cols))

    def cell(r: dict[str, Any]) -> str:
        lo, hi = r["ci95"]
        return f"{r['value']:.2f} [{lo:.2f}, {hi:.2f}]"

    rows = [(name, *(cell(r[c]) for c in cols)) for name, r in res["rates"].items()]
    return text_table(head, rows)


def verdict(res: dict[str, Any]) -> list[str]:
    """Plain lines: the chosen design on the held-out half; contrast against listwise and 0.5."""
    rates, chosen = res["rates"], res["chosen"]
    held = rates[chosen]["held_out_half"]
    lines = [
        f"chosen on half A: {chosen}; held-out half B: {held['value']:.3f} "
        f"[{held['ci95'][0]:.3f}, {held['ci95'][1]:.3f}] (n={held['n']})"
    ]
    best = rates[chosen]["all"]
    listwise = rates["listwise o2"]["all"]
    above_half = best["ci95"][0] > 0.5
    above_listwise = best["ci95"][0] > listwise["ci95"][1]
    lines.append(
        f"{chosen} on all pairs: {best['value']:.3f} [{best['ci95'][0]:.3f}, {best['ci95'][1]:.3f}]"
        f"; listwise o2: {listwise['value']:.3f} [{listwise['ci95'][0]:.3f}, "
        f"{listwise['ci95'][1]:.3f}]; above 0.5 beyond its interval: "
        f"{'yes' if above_half else 'no'}; intervals clear of listwise's: "
        f"{'yes' if above_listwise else 'no'}"
    )
    for name, d in res["paired"].items():
        lines.append(
            f"paired, same {d['n']} pairs: {name} = {d['value']:+.3f} "
            f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (bootstrap)"
        )
    lines.append(
        f"contrast reads: {res['contrast_reads']['reads']:.0f} in "
        f"{res['contrast_reads']['seconds']:.0f}s, {res['contrast_answer_tokens_per_s']:.0f} "
        f"answer tokens/s; shared-context reads match loglikelihood within "
        f"{res['shared_vs_plain_max_abs_diff']:.1e}"
    )
    for t in res["quickstart_timing"]:
        lines.append(
            f"quickstart-shaped contrast R={t['calibrate']}: {t['seconds_per_prompt']:.2f}s per "
            f"prompt of 8 answers ({t['answer_tokens_per_s']:.0f} answer tokens/s), "
            f"192 prompts ~ {t['projected_quickstart_seconds'] / 60:.1f} min"
        )
    return lines


def accuracy_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """`--accuracy`: run, print the table and the verdict, write the JSON result."""
    load_start = load()
    started = time.perf_counter()
    print(
        f"judge accuracy: {args.model} on {args.pairs.name}, {torch.get_num_threads()} torch "
        f"threads; {load_note(load_start)}",
        flush=True,
    )
    res = accuracy(args)
    res["wall_seconds"] = time.perf_counter() - started
    print()
    print(accuracy_table(res))
    print()
    for line in verdict(res):
        print(line)
    print(f"wall {res['wall_seconds']:.0f}s; {load_note(load())}")
    now = dt.datetime.now(dt.timezone.utc)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {**record("ranking.py", argv, load_start), "config": config, "result": res}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"judge-accuracy{'-quick' if args.quick else ''}-{now.date().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny model, 2 prompts, K 2 and 4, 1 thread (< 60 s)"
    )
    ap.add_argument("--model", default=None, help="judge model (smollm2-135m, quick tiny-llama)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 6, quick 2)")
    ap.add_argument(
        "--k", type=int, nargs="+", default=None, help="answers per prompt (4 8, quick 2 4)"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="judge texts per forward pass")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (2, quick 3)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--answer-tokens", type=int, default=None, help="new tokens per answer (48, quick 16)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    ap.add_argument(
        "--accuracy", action="store_true", help="judge accuracy on labelled pairs, not speed"
    )
    ap.add_argument("--pairs", type=Path, default=PAIRS, help="accuracy: the labelled pairs")
    ap.add_argument(
        "--per-family", type=int, default=None, help="accuracy: first N pairs per family (quick 2)"
    )
    ap.add_argument("--split-seed", type=int, default=0, help="accuracy: seeds the half split")
    ap.add_argument(
        "--trained",
        default=None,
        help="accuracy: a policy trained from --model (a run's final/): adds its implicit judge",
    )
    ap.add_argument(
        "--designs",
        nargs="+",
        default=None,
        help="accuracy: contrast designs to run (default: FULL_DESIGNS; quick: all)",
    )
    ap.add_argument(
        "--timing-prompts",
        type=int,
        default=None,
        help="accuracy: prompts of the quickstart-shaped timing (8, quick 2; 0 skips it)",
    )
    args = ap.parse_args(argv)
    args.model = args.model or ("ralign:tiny-llama" if args.quick else "ralign:smollm2-135m")
    args.prompts = args.prompts or (2 if args.quick else 6)
    args.answer_tokens = args.answer_tokens or (16 if args.quick else 48)
    args.k = args.k or ([2, 4] if args.quick else [4, 8])
    args.repeats = args.repeats or (3 if args.quick else 2)
    if min(args.k) < 2 or max(args.k) > len(LETTERS):
        ap.error(f"K must be 2..{len(LETTERS)}")
    # A tiny model's ops take microseconds: a second thread only adds barrier waits, which on a
    # loaded machine cost more than the ops themselves.
    args.threads = args.threads or (1 if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        args.per_family = args.per_family or (2 if args.quick else None)
        if args.timing_prompts is None:
            args.timing_prompts = 2 if args.quick else 8
        if args.designs is None and not args.quick:
            args.designs = list(FULL_DESIGNS)
        unknown = set(args.designs or ()) - {d.name for d in DESIGNS}
        if unknown:
            ap.error(f"unknown designs {sorted(unknown)}; choose from {[d.name for d in DESIGNS]}")
        return accuracy_main(args, argv)

    load_start = load()
    print(
        f"ranking: {args.model} judging its own answers, {args.prompts} prompts, K in {args.k}, "
        f"batch {args.batch_size}, {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} torch threads; {load_note(load_start)}",
        flush=True,
    )
    res = bench(args)
    print()
    print(table(res["rows"]))
    print()
    bad = [
        r["cell"] for r in res["rows"] if r["passes_per_prompt"] != r["expected_passes_per_prompt"]
    ]
    print(
        "passes per prompt match listwise = min(orders, K), pairwise = K(K-1), pointwise = K: "
        + ("yes" if not bad else f"NO ({', '.join(bad)})")
    )
    meets = {"passes_formula": not bad}
    for clock in CLOCKS:
        ratio = res["total"][f"ralign_speedup_{clock}"]
        meets[f"ralign_vs_plain_{clock}"] = ratio >= TARGETS["ralign_vs_plain"]
        print(
            f"ralign over the plain loop, all cells ({clock}): {ratio:.2f}x the speed "
            f"(target >= {TARGETS['ralign_vs_plain']:.2f}x) "
            f"{'PASS' if meets[f'ralign_vs_plain_{clock}'] else 'MISS'}"
        )
    print(load_note(load()))

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        **record("ranking.py", argv, load_start),
        "config": {k: v for k, v in vars(args).items() if k not in SPEED_SKIPS} | {"scale": SCALE},
        "targets": TARGETS,
        "result": res,
        "meets": meets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ranking{'-quick' if args.quick else ''}-{now.date().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
