"""Benchmark self-ranking cost per prompt: listwise (orders 1 and 2), pairwise and pointwise at K answers, against a plain forward loop.

Usage: python bench/ranking.py [--quick] [--model ralign:smollm2-135m] [--prompts 6] [--k 4 8]
       [--batch-size 16] [--repeats 2] [--threads N]

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
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import load, load_note, record  # noqa: E402

from ralign.compile import compile_file
from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
from ralign.runtime.builtin_data import resolve_dataset
from ralign.runtime.data import read_jsonl
from ralign.runtime.generation import sample
from ralign.runtime.models import ModelSpec, format_prompt, load_model
from ralign.runtime.rank import LETTERS, common_prefix, plan_batches, rank
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
    """The texts of std/templates' rank_listwise and judge_additive, as the compiler lowers them."""
    recipe = (
        'recipe "bench" {}\nimport "std/templates" as tpl\n'
        'model policy { path = "ralign:tiny-llama" }\n'
        'dataset seeds { path = "ralign:seeds/hhh", field = "prompt" }\n'
        "phase p {\n  sample { from = seeds }\n"
        "  rank listed { template = tpl.rank_listwise }\n"
        '  rank graded { template = tpl.judge_additive, mode = "pointwise" }\n'
        "  score { total = listed + graded }\n}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.ralign"
        path.write_text(recipe, encoding="utf-8")
        plan = compile_file(path)
    return {
        name: str(plan.templates[f"std/templates:{name}"]["text"])
        for name in ("rank_listwise", "judge_additive")
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
    cells = [head]
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
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"scale": SCALE},
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
