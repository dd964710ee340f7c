"""One small function per step kind, in a registry: read inputs from the context, write outputs, return metrics.

Artifacts (JSONL, readable by a person) in each step's folder:
prompts.jsonl {prompt}; responses.jsonl {prompt, context, responses, finished[, original]};
score.NAME.jsonl {prompt, scores}; pairs.jsonl {prompt, chosen, rejected, margin};
model/ (a Hugging Face folder) for training steps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from ralign import ir
from ralign.errors import StepError
from ralign.runtime.data import write_jsonl

if TYPE_CHECKING:
    from pathlib import Path

    from ralign.plan import Step
    from ralign.runtime.context import StepContext

StepFn = Callable[["StepContext"], dict[str, Any]]
STEP_FUNCTIONS: dict[str, StepFn] = {}


def step(kind: str) -> Callable[[StepFn], StepFn]:
    """Register the function that runs steps of `kind` (e.g. "rank", "train dpo")."""

    def register(fn: StepFn) -> StepFn:
        STEP_FUNCTIONS[kind] = fn
        return fn

    return register


def _nonempty(ctx: StepContext, items: list[Any], what: str) -> list[Any]:
    if not items:
        raise StepError(f"{ctx.where}: {what} is empty, so there is nothing to work on")
    return items


@step("generate")
def generate(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.generation import self_instruct

    p = ctx.params
    seeds = [r["prompt"] for r in _nonempty(ctx, ctx.input("dataset"), f"dataset '{p['from']}'")]
    model, tok = ctx.model("policy")
    prompts, stats = self_instruct(
        model,
        tok,
        lambda examples: ctx.render("template", {"examples": examples}),
        seeds,
        count=p["count"],
        shots=p["shots"],
        temperature=p["temperature"],
        top_p=p["top_p"],
        max_new_tokens=p["max_new_tokens"],
        seed=ctx.seed,
        progress=ctx.progress(p["count"], "prompts"),
    )
    if not prompts:
        raise StepError(
            f"{ctx.where}: the policy wrote no usable prompt out of {p['count']} ({_drops(stats)})"
        )
    write_jsonl(ctx.out / "prompts.jsonl", ({"prompt": x} for x in prompts))
    return {
        "prompts": len(prompts),
        "generated_tokens": stats["generated_tokens"],
        **{f"dropped_{k}": v for k, v in stats.get("dropped", {}).items()},
    }


def _drops(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in stats.get("dropped", {}).items() if v) or "all empty"


@step("dedupe")
def dedupe(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.dedupe import dedupe as run

    records = _nonempty(ctx, ctx.input("prompts"), "the prompt set")
    kept, method = run(
        [r["prompt"] for r in records],
        max_similarity=ctx.params["max_similarity"],
        method=ctx.params["method"],
    )
    ctx.log(f"dedupe by {method}: kept {len(kept)} of {len(records)}")
    write_jsonl(ctx.out / "prompts.jsonl", (records[i] for i in kept))
    return {"prompts": len(kept), "dropped": len(records) - len(kept), f"method_{method}": 1}


@step("filter")
def filter_(ctx: StepContext) -> dict[str, Any]:
    records = _nonempty(ctx, ctx.input("prompts"), "the prompt set")
    holds = ctx.programs.holds(ctx.step.exprs["keep"], [{"prompt": r["prompt"]} for r in records])
    kept = [r for r, ok in zip(records, holds, strict=True) if ok]
    if not kept:
        raise StepError(f"{ctx.where}: the filter kept none of {len(records)} prompts")
    write_jsonl(ctx.out / "prompts.jsonl", kept)
    return {"prompts": len(kept), "dropped": len(records) - len(kept)}


@step("sample")
def sample(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.generation import generated_tokens
    from ralign.runtime.generation import sample_completions as run

    p = ctx.params
    slot = "dataset" if "from" in p else "prompts"
    records = _nonempty(
        ctx, ctx.input(slot), f"dataset '{p['from']}'" if "from" in p else "the prompt set"
    )
    if "per_round" in p:
        records = round_slice(records, p["per_round"], ctx.step.round, ctx.run.plan.seed)
        ctx.log(f"round {ctx.step.round}: {len(records)} prompts of dataset '{p['from']}'")
    prompts = [r["prompt"] for r in records]
    contexts = [ctx.render("context", {"prompt": x}) if "context" in p else None for x in prompts]
    model, tok = ctx.model("policy")
    # A prompt is dropped (counted) when it leaves the answer no room in max_length, or passes
    # the policy's max_prompt_length.
    limit = ctx.run.plan.models[ctx.run.plan.policy].get("max_prompt_length")
    total = ctx.max_length if limit is None else min(ctx.max_length, limit + p["max_new_tokens"])

    def run_shard(
        idx: list[int],
        under: list[Any] = contexts,
        k: int = p["per_prompt"],
        part: int = 0,
        prefix: str = "",
    ) -> list[list[Any]]:
        return run(
            model,
            tok,
            [prompts[i] for i in idx],
            per_prompt=k,
            temperature=p["temperature"],
            top_p=p["top_p"],
            max_new_tokens=p["max_new_tokens"],
            seed=ctx.seed + part,  # the negative answers draw from a sampler of their own
            batch_size=p["batch_size"],
            context=[under[i] for i in idx],
            progress=ctx.progress(len(idx), "prompts"),
            max_length=total,
            prefix=prefix,
        )

    done = ctx.sharded(len(prompts), run_shard)
    spent = generated_tokens(done, p["temperature"])
    negatives: list[str | None] = [None] * len(prompts)
    if "negative_context" in p:  # more answers under the second context, after the first ones
        negatives = [ctx.render("negative_context", {"prompt": x}) for x in prompts]
        # Each forced opening draws from a sampler of its own (parts 1, 2, ...), so adding a
        # second opening leaves the first one's answers as they were.
        for part, lead in enumerate(negative_prefixes(p), start=1):
            more = ctx.sharded(
                len(prompts),
                lambda idx, lead=lead, part=part: run_shard(
                    idx, negatives, p["negative_per_prompt"], part, lead
                ),
            )
            spent += generated_tokens(more, p["temperature"])
            done = [
                a + b if not a[0].prompt_too_long else a for a, b in zip(done, more, strict=True)
            ]
    # A prompt longer than the policy's max_length (less the answer's tokens) is dropped, counted.
    kept = [k for k, row in enumerate(done) if not row[0].prompt_too_long]
    if not kept:
        raise ctx.fail(
            f"every prompt is longer than the policy's max_length = {ctx.max_length} tokens allows"
        )
    write_jsonl(
        ctx.out / "responses.jsonl",
        (_answers(prompts[k], contexts[k], negatives[k], done[k], p) for k in kept),
    )
    words = [len(a.text.split()) for k in kept for a in done[k]]
    return {
        "prompts": len(kept),
        "responses": len(words),
        "mean_words": sum(words) / max(1, len(words)),
        "cut_off": sum(not a.finished for k in kept for a in done[k]),
        "dropped_too_long": len(prompts) - len(kept),
        "generated_tokens": spent,
    }


def negative_prefixes(p: dict[str, Any]) -> list[str]:
    """The forced openings of a sample step's negative answers: one (maybe empty) or a list."""
    lead = p.get("negative_prefix", "")
    return [lead] if isinstance(lead, str) else list(lead)


def round_slice(records: list[Any], size: int, rnd: int, seed: int) -> list[Any]:
    """Round `rnd`'s `size` records: the next slice of one seeded shuffle of them all, wrapping
    around, so consecutive rounds see different prompts until the dataset is used up."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)  # one order for every round: the slices partition it
    size = min(size, len(records))
    start = (rnd - 1) * size
    return [records[order[(start + i) % len(records)]] for i in range(size)]


def _answers(
    prompt: str, context: str | None, negative: str | None, row: list[Any], p: dict[str, Any]
) -> dict[str, Any]:
    """A responses.jsonl record: with a negative context, each answer's own context too."""
    record = {
        "prompt": prompt,
        "context": context,
        "responses": [a.text for a in row],
        "finished": [a.finished for a in row],
    }
    if negative is not None:
        # Which sampler each answer came from: 0 the policy's own, then one per forced opening.
        openings = len(negative_prefixes(p))
        forced = [part for part in range(1, openings + 1) for _ in range(p["negative_per_prompt"])]
        sources = [0] * (len(row) - len(forced)) + forced
        record["contexts"] = [negative if s else context for s in sources]
        record["negative"] = [s > 0 for s in sources]
        record["sources"] = sources
        if p.get("negative_only_rejected"):
            record["may_choose"] = [not x for x in record["negative"]]
        if p.get("negative_only_chosen"):
            record["may_reject"] = [not x for x in record["negative"]]
    return record


def finished_flags(record: dict[str, Any]) -> list[bool]:
    """Per response, whether it ended on its own (False: cut off by the length limit). Records
    without the field (older runs, hand-made data) count as finished."""
    return list(record.get("finished") or [True] * len(record["responses"]))


def choosable_flags(record: dict[str, Any]) -> list[bool]:
    """Per response, whether a pair or `train sft` may prefer it (False: sampled under a
    `negative_context` with `negative_only_rejected`). Without the field, every answer may."""
    return list(record.get("may_choose") or [True] * len(record["responses"]))


def answer_sources(record: dict[str, Any]) -> list[int]:
    """Per response, where it came from: 0 the policy's own samples, 1, 2, ... each forced
    opening of a negative context. Records from before the field: 1 for every negative answer."""
    if "sources" in record:
        return list(record["sources"])
    return [int(x) for x in record.get("negative") or [False] * len(record["responses"])]


def rejectable_flags(record: dict[str, Any]) -> list[bool]:
    """Per response, whether a pair may reject it (False: sampled under a `negative_context`
    with `negative_only_chosen`). Without the field, every answer may."""
    return list(record.get("may_reject") or [True] * len(record["responses"]))


@step("revise")
def revise(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.generation import generate as continue_texts
    from ralign.runtime.generation import generated_tokens
    from ralign.runtime.models import format_prompt
    from ralign.templates import parse_template

    p = ctx.params
    records = _nonempty(ctx, ctx.input("responses"), "the response set")
    model, tok = ctx.model("policy")
    text = ctx.template("template")
    two_stage = "stage" in parse_template(text).names
    rng = random.Random(ctx.seed)
    flat = [(i, j) for i, r in enumerate(records) for j in range(len(r["responses"]))]
    current = [records[i]["responses"][j] for i, j in flat]
    ended = [finished_flags(records[i])[j] for i, j in flat]

    spent = [0]

    def answer(texts: list[str], seed: int) -> list[Any]:
        done = continue_texts(
            model,
            tok,
            [format_prompt(tok, t) for t in texts],
            n=1,
            temperature=p["temperature"],
            max_new_tokens=p["max_new_tokens"],
            seed=seed,
            progress=ctx.progress(len(texts), "answers"),
        )
        spent[0] += generated_tokens(done, 0)  # one continuation per text
        return [c[0] for c in done]

    for time in range(p["times"]):
        principles = [rng.choice(p["principles"]) for _ in flat]
        base = [
            {
                "prompt": records[i]["prompt"],
                "response": current[k],
                "principle": principles[k],
                "critique": "",
                "stage": "revision",
            }
            for k, (i, _) in enumerate(flat)
        ]
        if two_stage:
            critiques = answer(
                [ctx.render("template", {**v, "stage": "critique"}) for v in base],
                ctx.seed + 2 * time,
            )
            base = [{**v, "critique": c.text} for v, c in zip(base, critiques, strict=True)]
        revised = answer([ctx.render("template", v) for v in base], ctx.seed + 2 * time + 1)
        # An empty revision keeps the answer it was meant to improve.
        keep = [not r.text for r in revised]
        current = [old if k else r.text for r, old, k in zip(revised, current, keep, strict=True)]
        ended = [old if k else r.finished for r, old, k in zip(revised, ended, keep, strict=True)]
    out = []
    for i, r in enumerate(records):
        mine = [k for k, (ii, _) in enumerate(flat) if ii == i]
        out.append(
            {
                **r,
                "original": r["responses"],
                "responses": [current[k] for k in mine],
                "finished": [ended[k] for k in mine],
            }
        )
    write_jsonl(ctx.out / "responses.jsonl", out)
    changed = sum(a != b for r in out for a, b in zip(r["responses"], r["original"], strict=True))
    return {"responses": len(flat), "changed": changed, "generated_tokens": spent[0]}


@step("rank")
def rank(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.rank import rank as run

    p = ctx.params
    records = _nonempty(ctx, ctx.input("responses"), "the response set")
    judge, tok = ctx.model("judge")
    pointwise = p["mode"] == "pointwise"
    view, contrast = _judge_view(ctx)
    reference = None
    if p["mode"] == "implicit" and ctx.step.inputs["reference"] != ctx.step.inputs["judge"]:
        # a copy beside the judge: the run keeps only one model of its own in memory
        reference, _ = ctx.run.models.load(ctx.step.inputs["reference"], lora=False)

    shards: list[
        tuple[float | None, int, int]
    ] = []  # (agreement, what it is a fraction of, passes)

    def run_shard(idx: list[int]) -> list[list[float]]:
        res = run(
            p["mode"],
            judge,
            tok,
            [(records[i]["prompt"], records[i]["responses"]) for i in idx],
            view,
            orders=p["orders"],
            samples=p["samples"],
            scale=p["scale"],
            seed=ctx.seed,
            batch_size=p["batch_size"],
            progress=ctx.progress(
                sum(_judge_texts(p, len(records[i]["responses"])) for i in idx), "judge texts"
            ),
            reference_model=reference,
            **contrast,
        )
        units = sum(_agreement_units(p["mode"], len(records[i]["responses"])) for i in idx)
        shards.append((res.agreement, units, res.forward_passes))
        return [(list(s), list(raw)) for s, raw in zip(res.scores, res.raw, strict=True)]

    scored = ctx.sharded(len(records), run_shard)
    # Pointwise judges grade on a rubric: its raw grades (0..scale) are kept beside the scores,
    # which are min-max normalised per prompt, so `pairs`/`train sft` can ask for a grade.
    grades = pointwise and p["scale"]
    write_jsonl(
        ctx.out / f"score.{ctx.step.name}.jsonl",
        (
            {
                "prompt": r["prompt"],
                "scores": s,
                **({"grades": [round(g * p["scale"], 6) for g in raw]} if grades else {}),
            }
            for r, (s, raw) in zip(records, scored, strict=True)
        ),
    )
    # Each process judged a share of the items: metrics cover them all, whatever the process count.
    every = [s for mine in ctx.everywhere(shards) for s in mine]
    metrics: dict[str, Any] = {"items": len(records), "forward_passes": sum(s[2] for s in every)}
    agreed = [(a, n) for a, n, _ in every if a is not None and n]
    if len(agreed) == 1:
        metrics["order_agreement"] = agreed[0][0]
    elif agreed:
        metrics["order_agreement"] = sum(a * n for a, n in agreed) / sum(n for _, n in agreed)
    return metrics


def _judge_view(ctx: StepContext) -> tuple[Callable[..., str], dict[str, Any]]:
    """How a rank step renders what its judge reads, and the contrast settings (when contrast)."""
    p = ctx.params
    if p["mode"] == "contrast":
        settings = {k: p[k] for k in ("principle", "opposite", "calibrate") if k in p}
        return lambda prompt, principle: ctx.render(
            "template", {"prompt": prompt, "principle": principle}
        ), settings
    if p["mode"] == "implicit":  # what both models read: the bare prompt unless a template says
        if "template" not in p:
            return lambda prompt: prompt, {}
        return lambda prompt: ctx.render("template", {"prompt": prompt}), {}

    def view(prompt: str, responses: list[str], labels: list[str]) -> str:
        if p["mode"] == "pointwise":
            variables = {"prompt": prompt, "response": responses[0], "scale": p["scale"]}
        else:
            variables = {"prompt": prompt, "responses": list(responses), "labels": list(labels)}
        return ctx.render("template", variables)

    return view, {}


def _agreement_units(mode: str, k: int) -> int:
    """What rank agreement is a fraction of, for an item with k answers: unordered pairs
    (pairwise), else the item itself when it has two answers to order."""
    return k * (k - 1) // 2 if mode == "pairwise" else int(k >= 2)


def _judge_texts(p: dict[str, Any], k: int) -> int:
    """Judge texts (forward-pass rows) one item costs: what the rank progress bar counts."""
    if p["mode"] == "pairwise":
        return k * (k - 1)
    if p["mode"] == "pointwise":
        return k
    if p["mode"] == "contrast":  # each answer read with and without the principle, per prompt
        return 2 * k * (1 + p.get("calibrate", 0))
    if p["mode"] == "implicit":  # each answer read by the judge and by the reference
        return 2 * k
    return min(p["orders"], k) if k > 1 else 1


@step("score")
def score(ctx: StepContext) -> dict[str, Any]:
    records = _nonempty(ctx, ctx.input("responses"), "the response set")
    named = {
        slot.split(":", 1)[1]: ctx.input(slot)
        for slot in ctx.step.inputs
        if slot.startswith("score:")
    }
    flat = []
    for i, r in enumerate(records):
        for j, response in enumerate(r["responses"]):
            flat.append(
                {
                    "prompt": r["prompt"],
                    "response": response,
                    ir.ROUND: float(ctx.step.round),
                    **{n: float(v[i]["scores"][j]) for n, v in named.items()},
                }
            )
    metrics: dict[str, Any] = {}
    for name, expr in ctx.step.exprs.items():
        scored = ctx.programs.score(expr, flat)
        it = iter(scored.values)
        grouped = [[next(it) for _ in r["responses"]] for r in records]
        write_jsonl(
            ctx.out / f"score.{name}.jsonl",
            ({"prompt": r["prompt"], "scores": s} for r, s in zip(records, grouped, strict=True)),
        )
        metrics[f"mean_{name}"] = sum(scored.values) / max(1, len(scored.values))
        agrees = [n for n in ir.walk(expr) if isinstance(n, ir.Agree)]
        for k, (node, weights, means) in enumerate(
            zip(agrees, scored.agree_weights, scored.agree_means, strict=True)
        ):
            prefix = ("" if name == "total" else f"{name}.") + f"agree{k or ''}"
            labels = ir.labels(node.sources)
            for label, w, mean in zip(labels, weights, means, strict=True):
                metrics[f"{prefix}_weight_{label}"] = w
                metrics[f"{prefix}_mean_{label}"] = mean  # the sum is standardised: mean 0
            shown = ", ".join(f"{label} {w:.3f}" for label, w in zip(labels, weights, strict=True))
            ctx.log(f"{name}: agree weights {shown}")
    return metrics


@step("pairs")
def pairs(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.pairs import make_pairs

    p = ctx.params
    records = _nonempty(ctx, ctx.input("responses"), "the response set")
    scores = ctx.input(f"score:{p['by']}")
    made, stats = make_pairs(
        [r["prompt"] for r in records],
        [r["responses"] for r in records],
        [s["scores"] for s in scores],
        chosen=p["chosen"],
        rejected=p["rejected"],
        min_margin=p["min_margin"],
        min_score=p.get("min_score"),
        seed=ctx.seed,
        finished=[finished_flags(r) for r in records],
        choosable=[choosable_flags(r) for r in records],
        rejectable=[rejectable_flags(r) for r in records],
        grades=[s["grades"] for s in scores] if "min_grade" in p else None,
        min_grade=p.get("min_grade"),
        sources=[answer_sources(r) for r in records],
    )
    if not made:
        raise StepError(
            f"{ctx.where}: no preference pair survived ({', '.join(f'{k}: {v}' for k, v in stats['dropped'].items() if v)}); lower min_margin or min_score, or sample more answers"
        )
    write_jsonl(ctx.out / "pairs.jsonl", made)
    return {
        "pairs": len(made),
        "mean_margin": sum(x["margin"] for x in made) / len(made),
        **{f"dropped_{k}": v for k, v in stats["dropped"].items()},
    }


def sft_examples(
    records: list[dict[str, Any]],
    scores: list[dict[str, Any]] | None,
    *,
    on: str,
    min_score: float | None = None,
    drop_context: bool = False,
    min_grade: float | None = None,
) -> list[dict[str, Any]]:
    """The (prompt, response) examples `train sft` trains on.

    Args:
        records: response records {prompt, context, responses[, finished, may_choose]}; an
            answer with may_choose False is never trained on.
        scores: score records aligned with `records` ({scores: [...]}), for on = "best" or a floor.
        on: "best" (each prompt's top answer; ties to the first), "all" or "revised" (every answer).
        min_score: keep only answers scoring at least this.
        min_grade: keep only answers a pointwise judge graded at least this (`grades` of `scores`).
        drop_context: train on the bare prompt rather than the context it was sampled with.
    """
    picked: list[tuple[dict[str, Any], list[tuple[str, bool, str | None]]]] = []
    for i, r in enumerate(records):
        # Each answer with the context it was sampled in (a negative context's answers have theirs).
        contexts = r.get("contexts") or [r.get("context")] * len(r["responses"])
        answers = list(zip(r["responses"], finished_flags(r), contexts, strict=True))
        keep = [j for j, ok in enumerate(choosable_flags(r)) if ok]
        if scores is not None:
            marks = scores[i]["scores"]
            if on == "best" and keep:
                keep = [max(keep, key=marks.__getitem__)]
            grades = scores[i].get("grades") if min_grade is not None else None
            keep = [
                j
                for j in keep
                if (min_score is None or marks[j] >= min_score)
                and (grades is None or grades[j] >= min_grade)
            ]
        picked.append((r, [answers[j] for j in keep]))
    return [
        {
            "prompt": r["prompt"] if drop_context or not context else context,
            "response": x,
            "finished": end,
        }
        for r, xs in picked
        for x, end, context in xs
        if x.strip()
    ]


@step("train sft")
def train_sft(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.train import train_sft as run
    from ralign.runtime.train import unsharded

    p = ctx.params
    records = _nonempty(ctx, ctx.input("responses"), "the response set")
    floor = p.get("min_score")
    grade = p.get("min_grade")
    scored = p["on"] == "best" or (p["on"] == "all" and (floor, grade) != (None, None))
    examples = sft_examples(
        records,
        ctx.input(f"score:{p['by']}") if scored else None,
        on=p["on"],
        min_score=floor,
        drop_context=p["drop_context"],
        min_grade=grade,
    )
    if not examples and grade is not None:
        raise StepError(f"{ctx.where}: no answer was graded at least min_grade = {grade:g}")
    if not examples and floor is not None:
        raise StepError(
            f"{ctx.where}: no answer scored at least min_score = {floor:g}; lower it or sample more answers"
        )
    model, tok = ctx.trainable()
    kept, long = _short_prompts(ctx, tok, _nonempty(ctx, examples, "the training set"))
    metrics = run(
        model,
        tok,
        _nonempty(ctx, kept, "the training set (every prompt is over max_prompt_length)"),
        lr=p["lr"],
        epochs=p["epochs"],
        batch_size=ctx.per_process(p["batch_size"]),
        seed=ctx.seed,
        accelerator=ctx.accelerator,
        max_length=ctx.max_length,
        on_step=ctx.on_train_step(),
        **training_controls(ctx),
    )
    ctx.save_policy(unsharded(model, ctx.accelerator), tok)
    return {**metrics, "dropped_long_prompt": long}


def training_controls(ctx: StepContext) -> dict[str, Any]:
    """The step's optimizer controls and the policy's precision, as the training loops take them."""
    names = (
        "grad_accum",
        "schedule",
        "warmup",
        "weight_decay",
        "max_grad_norm",
        "gradient_checkpointing",
    )
    controls = {k: ctx.params[k] for k in names if k in ctx.params}
    if isinstance(controls.get("warmup"), float) and controls["warmup"] >= 1:
        controls["warmup"] = int(controls["warmup"])  # a count of steps
    precision = ctx.run.plan.models[ctx.run.plan.policy].get("precision")
    return {**controls, **({"precision": precision} if precision else {})}


def _short_prompts(
    ctx: StepContext, tok: Any, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """`rows` without those whose formatted prompt is over the policy's `max_prompt_length`
    tokens (dropped, never cut), and how many were dropped."""
    from ralign.runtime.models import format_prompt

    limit = ctx.run.plan.models[ctx.run.plan.policy].get("max_prompt_length")
    if limit is None:
        return rows, 0
    kept = [r for r in rows if len(tok(format_prompt(tok, r["prompt"]))["input_ids"]) <= limit]
    return kept, len(rows) - len(kept)


@step("train dpo")
def train_dpo(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.train import train_dpo as run
    from ralign.runtime.train import unsharded

    p = ctx.params
    model, tok = ctx.trainable()
    pairs_, long = _short_prompts(ctx, tok, _nonempty(ctx, ctx.input("pairs"), "the pair set"))
    reference = ctx.reference(model)
    metrics = run(
        model,
        tok,
        _nonempty(ctx, pairs_, "the pair set (every prompt is over max_prompt_length)"),
        beta=p["beta"],
        lr=p["lr"],
        epochs=p["epochs"],
        batch_size=ctx.per_process(p["batch_size"]),
        seed=ctx.seed,
        reference_model=reference,
        accelerator=ctx.accelerator,
        max_length=ctx.max_length,
        on_step=ctx.on_train_step(),
        loss=p.get("loss", "sigmoid"),
        label_smoothing=p.get("label_smoothing", 0.0),
        nll_weight=p.get("nll_weight", 0.0),
        **training_controls(ctx),
    )
    ctx.save_policy(unsharded(model, ctx.accelerator), tok)
    return {**metrics, "dropped_long_prompt": long}


@step("calibrate")
def calibrate(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.calibrate import HARMLESS, choose, harmless_prompts, interpolate, verdicts

    p = ctx.params
    prompts = harmless_prompts(p["data"], ctx.run.recipe_dir)
    if not prompts:
        raise ctx.fail(
            f"its data has no harmless prompts (kind {' or '.join(HARMLESS)}) to calibrate on"
        )
    opts = {"max_new_tokens": p["max_new_tokens"], "batch_size": p["batch_size"]}
    trained, tok = ctx.model("policy")
    end = dict(trained.named_parameters())
    model, _ = ctx.run.models.load(ctx.step.inputs["start"], lora=False)
    model.eval()
    before = verdicts(model, tok, prompts, **opts)
    base = before
    separate = ctx.step.inputs["baseline"] != ctx.step.inputs["start"]  # the base, later rounds
    if separate:
        bound, _ = ctx.run.models.load(ctx.step.inputs["baseline"], lora=False)
        base = verdicts(bound.eval(), tok, prompts, **opts)
        del bound
    # Each count is bounded from its own reference (lowering resolved "last_round").
    refs = {"refused": p["relative_to"], "hedged": p.get("hedging_relative_to", p["relative_to"])}
    baseline = {name: (base if ref == "base" else before)[name] for name, ref in refs.items()}
    start = {k: v.detach().clone() for k, v in model.named_parameters()}

    def tried(weight: float) -> dict[str, list[str]]:
        if weight == 1:
            return verdicts(trained, tok, prompts, **opts)
        interpolate(model, start, end, weight)
        return verdicts(model, tok, prompts, **opts)

    n = len(prompts)
    bounds = {"refused": p["max_refusal_rise"], "hedged": p["max_hedging_rise"]}
    z = NormalDist().inv_cdf(p["confidence"])
    # Later rounds take shorter steps (`decay`): the largest weight tried shrinks round by round.
    top = p["decay"] ** (ctx.step.round - 1)
    weight, rows = choose(tried, before, baseline, n, p["spacing"], bounds, z, top)
    if weight == 1:
        model = trained
    else:
        interpolate(model, start, end, weight)
    record = {
        "start": {name: {"k": len(got), "n": n, "prompts": got} for name, got in before.items()},
        "baseline": {
            name: {"k": len(got), "n": n, "prompts": got, "max_rise": bounds[name]}
            | {"relative_to": refs[name]}
            for name, got in baseline.items()
        }
        | {"confidence": p["confidence"]},
        "largest_weight": top,
        "tried": rows,
    }
    (ctx.out / "calibration.json").write_text(
        json.dumps(record, indent=2, sort_keys=True), encoding="utf-8"
    )
    chosen = rows[-1]

    def counted(name: str, verb: str) -> str:
        got = chosen[name]
        then = f"the round's start {len(before[name])}"
        then += f", the base {len(base[name])}" if refs[name] == "base" and separate else ""
        sure = f", at most {got['rise_upper']:+.3f} ({p['confidence']:g})" if z > 0 else ""
        return f"{verb} {got['k']} ({then}; rise {got['rise']:+.3f}{sure})"

    counts = [counted("refused", "refuses")]
    counts += [counted("hedged", "hedges on")] if bounds["hedged"] < 1 else []
    at_most = f" (at most {top:g})" if top < 1 else ""
    ctx.log(f"weight {weight:g}{at_most}, of {n} harmless held-out prompts: " + "; ".join(counts))
    if not chosen["passed"]:
        ctx.log("even the round's start is over a bound relative to the base: it is kept as it was")
    ctx.save_policy(model, tok)
    return {
        "weight": weight,
        "harmless_refusal": chosen["refused"]["rate"],
        "harmless_refusal_start": len(before["refused"]) / n,
        "harmless_refusal_baseline": len(baseline["refused"]) / n,
        "harmless_hedging": chosen["hedged"]["rate"],
        "harmless_hedging_start": len(before["hedged"]) / n,
        "harmless_hedging_baseline": len(baseline["hedged"]) / n,
        "harmless_prompts": n,
    }


def stamp(step: Step) -> dict[str, str]:
    """What a finished step's outputs depend on beyond its hash, recorded in its meta.json: a
    behaviour evaluation's verdicts depend on the detectors of the ralign that made them."""
    if step.kind == "evaluate" and step.params.get("task") == "behavior":
        from ralign.runtime.behavior import DETECTORS

        return {"detectors": DETECTORS}
    return {}


def rescore(folder: Path) -> dict[str, Any]:
    """Re-score a behaviour evaluation's stored answers with the current detectors, in `folder`
    (a copy of the finished step's): answers.jsonl and result.json rewritten, the greedy answers
    and the mean reward kept. Returns the step's new metrics."""
    from ralign.runtime.behavior import score_records
    from ralign.runtime.data import read_jsonl
    from ralign.runtime.evaluators import flatten_eval

    old = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    new = score_records(read_jsonl(folder / "answers.jsonl"))
    write_jsonl(folder / "answers.jsonl", new.pop("records"))
    result = {k: v for k, v in old.items() if k != "subsets"} | new
    _write_result(folder, result)
    return flatten_eval(result)


def _write_result(folder: Path, result: dict[str, Any]) -> None:
    (folder / "result.json").write_text(
        json.dumps(result, indent=2, sort_keys=True, default=str), encoding="utf-8"
    )


@step("evaluate")
def evaluate(ctx: StepContext) -> dict[str, Any]:
    from ralign.runtime.data import dataset_file
    from ralign.runtime.evaluators import eval_items, flatten_eval, run_eval

    p = ctx.params
    model, tok = ctx.model("policy")
    path = p["data"].get("path", "")
    file = dataset_file({"path": path}, ctx.run.recipe_dir) if path else None
    if file is None:
        raise ctx.fail(f"evaluation data '{path}' must be a local file or a built-in ralign: set")
    opts: dict[str, Any] = {"batch_size": p["batch_size"]}
    if p["task"] == "behavior":  # every answer is kept, in answers.jsonl (the report reads them)
        opts.update(max_new_tokens=p["max_new_tokens"], details=True)
    else:
        opts.update(ab=p["ab"])
    result = run_eval(p["task"], model, tok, eval_items(p["task"], file, p.get("limit")), **opts)
    records = result.pop("records", None)
    if records is not None:
        write_jsonl(ctx.out / "answers.jsonl", records)
    if "reward" in ctx.step.exprs and records is not None:
        values = ctx.programs.score(
            ctx.step.exprs["reward"],
            [{"prompt": r["prompt"], "response": r["answer"]} for r in records],
        ).values
        result["mean_reward"] = {"value": sum(values) / len(values), "n": len(values)}
    _write_result(ctx.out, result)
    return flatten_eval(result)
