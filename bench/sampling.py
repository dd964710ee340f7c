"""Benchmark ralign's sampling against a plain hand-written `model.generate` loop, and the gain from length-sorted batching.

Usage: python bench/sampling.py [--quick] [--models ralign:smollm2-135m ...] [--prompts 32]
       [--per-prompt 2] [--max-new-tokens 32] [--batch-size 32] [--repeats 3] [--threads N]

Simplifications, stated up front:
- Three systems generate for the same prompts with the same settings (chat template, batch size
  in sequences, temperature, top_p, top_k off, max_new_tokens, answers per prompt, left padding,
  seed): "plain" is the loop a person would write (tokenizer(padding=True) + model.generate over
  the prompts in input order, then batch_decode); "ralign (input order)" is
  `ralign.runtime.generation.sample` with `sort_by_length=False`, so it forms the same batches and
  draws the same random numbers as the plain loop and must produce the same tokens (the script
  checks it): the ratio of these two is ralign's overhead; "ralign" is `sample` as the sample step
  calls it (prompts sorted by token length before batching, outputs restored to input order).
  Sorting changes which prompts share a batch, so its sampled answers (and token counts) differ
  from the other two; compare it in tokens/s.
- Generated tokens are counted the same way for every system: per answer, the tokens up to and
  including the first end token, or all of them when it never came (padding after an end token
  is not counted). ralign's count comes from its progress callback, which counts exactly that.
- Prompts: the built-in seed prompts (`ralign:seeds/hhh`, short: 5-19 words) with every fourth
  replaced by one of a few long prompts written here (70-150 words), a realistic mix for sorting.
- Timing: each repeat runs every system once, in a rotating order (A B C, B C A, ...), after one
  untimed warm-up call each; medians over repeats. Ratios are medians of the per-repeat ratios,
  so machine load that drifts between repeats cancels. Single process, CPU, float32, torch's
  default thread count unless --threads (--quick: 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import load, load_note, record  # noqa: E402

from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
from ralign.runtime.builtin_data import resolve_dataset
from ralign.runtime.data import read_jsonl
from ralign.runtime.generation import sample
from ralign.runtime.models import ModelSpec, load_model
from ralign.tables import text_table

HERE = Path(__file__).resolve().parent
TARGETS = {"overhead_ratio": 0.91}  # ralign tokens/s over plain tokens/s, same batches
SYSTEMS = ("plain", "ralign_input_order", "ralign")

LONG_PROMPTS = [
    "I am writing a short guide for new volunteers at our community garden. They arrive on "
    "Saturday mornings, most have never gardened before, and some are retired while others are "
    "teenagers doing it for school credit. The guide should explain where the tools are kept, how "
    "to tell a weed from a seedling, why we never use pesticides, what to do if someone gets hurt, "
    "and how to log the hours they worked. Please write the guide in a friendly tone, with short "
    "sections and headings, and keep it under one page so that people actually read it.",
    "Here is a paragraph from my history essay: 'The printing press changed Europe because books "
    "became cheaper, which meant more people could read, and this caused the Reformation and also "
    "the scientific revolution, and also newspapers.' My teacher says the argument is too "
    "compressed and the causes are asserted rather than shown. Rewrite it as two or three clear "
    "sentences that make the chain of causes explicit, and then tell me briefly which claim in it "
    "would most need a source.",
    "My elderly father keeps getting phone calls from people who say they are from his bank and "
    "ask him to confirm his account number and a code that arrives by text message. He almost "
    "gave it to them last week. What should I explain to him, in simple words, so that he "
    "recognises these calls, and what practical steps can our family take to protect his accounts "
    "without taking away his independence? He is proud and does not like being told what to do.",
    "I run a small bakery and want to reduce food waste. Every evening we throw away about twenty "
    "loaves and a tray of pastries. We open at seven, close at six, and most customers come "
    "before ten or after four. Suggest a plan with concrete steps: how to adjust what we bake and "
    "when, what to do with what is left at closing time, and how to measure whether the plan "
    "works over the next month. Keep the suggestions realistic for a shop with three employees.",
    "Explain to a curious twelve-year-old how vaccines train the immune system. She already knows "
    "that germs can make people sick and that the body fights them, but she asked me why a shot "
    "today can protect her from an illness years later, and why some vaccines need boosters. Use "
    "an analogy if it helps, avoid jargon, and finish with one sentence about why scientists test "
    "vaccines carefully before giving them to people.",
    "Compare renting and buying a home for someone in their late twenties who has stable income, "
    "some savings, and might move to another city for work within five years. Lay out the main "
    "financial and practical considerations on both sides, say which facts about their situation "
    "would change the answer, and be honest about what cannot be known in advance, such as future "
    "house prices and interest rates. Do not give a single verdict without explaining the "
    "trade-offs.",
]


# ---- prompts and the plain loop ------------------------------------------------------


def make_prompts(n: int) -> list[str]:
    """n prompts: the built-in seed prompts in file order, every fourth swapped for a long one."""
    seeds = [r["prompt"] for r in read_jsonl(resolve_dataset("seeds/hhh"))]
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(LONG_PROMPTS[(i // 4) % len(LONG_PROMPTS)])
        else:
            out.append(seeds[i % len(seeds)])
    return out


def count_generated(rows: list[list[int]], eos: set[int]) -> int:
    """Tokens up to and including the first end token per row (all of them without one)."""
    total = 0
    for row in rows:
        cut = next((k for k, t in enumerate(row) if t in eos), None)
        total += len(row) if cut is None else cut + 1
    return total


def stop_ids(model: Any, tok: Any) -> set[int]:
    """The tokens a plain `generate` stops at: the generation config's end tokens, else the
    tokenizer's (as ralign's sampling stops)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tok.eos_token_id if eos is None else eos
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


def plain_generate(
    model,
    tok,
    prompts: list[str],
    *,
    per_prompt: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
) -> tuple[list[list[str]], int]:
    """The plain loop: chat-format, pad left, model.generate in input order, decode."""
    chat = bool(getattr(tok, "chat_template", None))
    eos = stop_ids(model, tok)
    per_batch = max(1, batch_size // per_prompt)
    answers: list[list[str]] = []
    generated = 0
    tok.padding_side = "left"
    torch.manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(prompts), per_batch):
            batch = prompts[start : start + per_batch]
            if chat:
                texts = [
                    tok.apply_chat_template(
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                    )
                    for p in batch
                ]
            else:
                texts = [p + "\n" for p in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=per_prompt,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(eos),
            )  # [B * per_prompt, T + new]
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            cut = [row[: next((k for k, t in enumerate(row) if t in eos), len(row))] for row in new]
            generated += count_generated(new, eos)
            texts_out = [t.strip() for t in tok.batch_decode(cut, skip_special_tokens=True)]
            for b in range(len(batch)):
                answers.append(texts_out[b * per_prompt : (b + 1) * per_prompt])
    return answers, generated


def ralign_generate(model, tok, prompts: list[str], *, sort_by_length: bool, **kw: Any):
    """`ralign.runtime.generation.sample`, counting generated tokens with its progress callback."""
    counted = [0]

    def progress(_done: int, tokens: int) -> None:
        counted[0] += tokens

    answers = sample(
        model,
        tok,
        prompts,
        per_prompt=kw["per_prompt"],
        temperature=kw["temperature"],
        top_p=kw["top_p"],
        max_new_tokens=kw["max_new_tokens"],
        seed=kw["seed"],
        batch_size=kw["batch_size"],
        sort_by_length=sort_by_length,
        progress=progress,
    )
    return answers, counted[0]


def run_system(name: str, model, tok, prompts: list[str], kw: dict[str, Any]):
    if name == "plain":
        return plain_generate(model, tok, prompts, **kw)
    return ralign_generate(model, tok, prompts, sort_by_length=name == "ralign", **kw)


def prefill_tokens(tok, prompts: list[str], per_prompt: int, batch_size: int, sort: bool) -> int:
    """Prompt tokens fed to the model, padding included (rows x batch width, summed over batches)."""
    chat = bool(getattr(tok, "chat_template", None))
    lengths = [
        len(
            tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                if chat
                else p + "\n",
                add_special_tokens=not chat,
            )["input_ids"]
        )
        for p in prompts
    ]
    order = sorted(lengths) if sort else lengths
    per_batch = max(1, batch_size // per_prompt)
    return sum(
        max(order[s : s + per_batch]) * len(order[s : s + per_batch]) * per_prompt
        for s in range(0, len(order), per_batch)
    )


# ---- the benchmark ---------------------------------------------------------------------


def bench_model(path: str, args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_model(ModelSpec(path), "cpu")
    model.eval()
    prompts = make_prompts(args.prompts)
    kw = {
        "per_prompt": args.per_prompt,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    for name in SYSTEMS:  # warm-up: first-call allocations and lazy imports are not generation
        run_system(name, model, tok, prompts[:2], {**kw, "max_new_tokens": 2})
    raw: dict[str, list[dict[str, Any]]] = {n: [] for n in SYSTEMS}
    answers: dict[str, list[list[str]]] = {}
    for rep in range(args.repeats):
        for k in range(len(SYSTEMS)):
            name = SYSTEMS[(rep + k) % len(SYSTEMS)]
            started = time.perf_counter()
            out, tokens = run_system(name, model, tok, prompts, kw)
            seconds = time.perf_counter() - started
            raw[name].append(
                {
                    "repeat": rep,
                    "seconds": seconds,
                    "tokens": tokens,
                    "tokens_per_s": tokens / seconds,
                }
            )
            answers.setdefault(name, out)
            print(
                f"  {path} repeat {rep + 1}/{args.repeats} {name}: {tokens} tokens in {seconds:.2f}s"
            )
    systems = {}
    for name, runs in raw.items():
        systems[name] = {
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "tokens": sorted({r["tokens"] for r in runs}),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "prefill_tokens_with_padding": prefill_tokens(
                tok, prompts, args.per_prompt, args.batch_size, sort=name == "ralign"
            ),
        }

    def paired(a: str, b: str) -> float:
        return statistics.median(
            x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(raw[a], raw[b], strict=True)
        )

    return {
        "model": path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_words": [len(p.split()) for p in prompts],
        "systems": systems,
        "runs": raw,
        "same_answers_plain_vs_input_order": answers["plain"] == answers["ralign_input_order"],
        "same_tokens_plain_vs_input_order": systems["plain"]["tokens"]
        == systems["ralign_input_order"]["tokens"],
        "ratios": {
            "overhead": paired("ralign_input_order", "plain"),
            "sorting_gain": paired("ralign", "ralign_input_order"),
            "ralign_vs_plain": paired("ralign", "plain"),
        },
    }


# ---- report ---------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    head = ("model", "system", "tokens", "prefill+pad", "median s", "tokens/s", "vs plain")
    rows = []
    for res in results:
        for name in SYSTEMS:
            s = res["systems"][name]
            ratio = {
                "plain": "1.00",
                "ralign_input_order": f"{res['ratios']['overhead']:.3f}",
                "ralign": f"{res['ratios']['ralign_vs_plain']:.3f}",
            }[name]
            rows.append(
                (
                    res["model"],
                    name,
                    "/".join(str(t) for t in s["tokens"]),
                    str(s["prefill_tokens_with_padding"]),
                    f"{s['median_seconds']:.2f}",
                    f"{s['median_tokens_per_s']:.1f}",
                    ratio,
                )
            )
    return text_table(head, rows, left=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny model, small sizes, 1 thread (< 60 s)"
    )
    ap.add_argument("--models", nargs="+", default=None, help="model specs to benchmark")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 32, quick 16)")
    ap.add_argument("--per-prompt", type=int, default=2, help="answers per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32, quick 16")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="sequences per generate call (32, quick 8)"
    )
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    args = ap.parse_args(argv)
    # A tiny model's ops take microseconds: a second thread only adds barrier waits, which on a
    # loaded machine cost more than the ops themselves.
    args.threads = args.threads or (1 if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    args.models = args.models or (
        ["ralign:tiny-llama"] if quick else ["ralign:tiny-llama", "ralign:smollm2-135m"]
    )
    args.prompts = args.prompts or (16 if quick else 32)
    args.batch_size = args.batch_size or (8 if quick else 32)
    args.max_new_tokens = args.max_new_tokens or (16 if quick else 32)
    args.repeats = args.repeats or 3
    if args.batch_size < args.per_prompt:
        ap.error("--batch-size must hold at least one prompt's answers")

    load_start = load()
    print(
        f"sampling: {args.prompts} prompts x {args.per_prompt} answers x <= {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size} sequences, temperature {args.temperature}, top_p {args.top_p}; "
        f"{args.repeats} interleaved repeats; {load_note(load_start)}"
    )
    results = [bench_model(m, args) for m in args.models]

    print()
    print(table(results))
    print()
    meets = {}
    for res in results:
        r = res["ratios"]
        ok = r["overhead"] >= TARGETS["overhead_ratio"]
        meets[res["model"]] = {"overhead_ratio": ok}
        print(
            f"{res['model']}: ralign overhead (same batches) {r['overhead']:.3f}x plain tokens/s "
            f"(target >= {TARGETS['overhead_ratio']}) {'PASS' if ok else 'MISS'}; "
            f"length sorting {r['sorting_gain']:.3f}x; ralign as shipped {r['ralign_vs_plain']:.3f}x plain; "
            f"same answers as plain in input order: {res['same_answers_plain_vs_input_order']}"
        )
    print(load_note(load()))

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        **record("sampling.py", argv, load_start),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "targets": TARGETS,
        "results": results,
        "meets": meets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"sampling{'-quick' if quick else ''}-{now.date().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
