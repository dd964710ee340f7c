"""What each declaration and step kind accepts: attribute types, defaults, ranges, and data flow.

This table is the single source for the checker, the plan's defaults and the
language reference (docs/language.md is tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Attribute value kinds (what the checker accepts for each).
INT, NUMBER, STRING, BOOL = "int", "number", "string", "bool"
MODEL, DATASET, TEMPLATE, TEXTS, DATA = "model", "dataset", "template", "texts", "data"
EXPR_BOOL, EXPR_NUMBER, LORA = "expr:bool", "expr:number", "lora"


@dataclass(frozen=True)
class Attr:
    """One attribute: its kind, default (None: optional, absent), bounds and meaning."""

    kind: str
    doc: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # `min` itself is excluded (e.g. lr > 0)


@dataclass(frozen=True)
class Kind:
    """A declaration or step kind: its attributes, and (steps) what it consumes and produces."""

    doc: str
    attrs: dict[str, Attr]
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    named: str = "no"  # "no", "optional", "required" (a step's NAME after its kind)
    template_vars: dict[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # attr -> variables provided
    open_attrs: str | None = None  # kind of any further attribute (score: each is an expression)


def _positive(doc: str, default: Any, kind: str = NUMBER) -> Attr:
    return Attr(kind, doc, default, min=0, min_open=True)


LORA_ATTRS: dict[str, Attr] = {
    "rank": Attr(INT, "adapter rank r", 8, min=1, max=1024),
    "alpha": Attr(
        NUMBER, "scaling alpha (the update is scaled by alpha / rank)", 16, min=0, min_open=True
    ),
    "dropout": Attr(NUMBER, "dropout on the adapter input", 0.05, min=0, max=0.99),
    "targets": Attr(
        TEXTS,
        'module names to adapt; `["all-linear"]` (the default) adapts every linear layer of the'
        " blocks, attention and MLP projections, but not the output head",
        ["all-linear"],
    ),
}

DECLS: dict[str, Kind] = {
    "recipe": Kind(
        "the recipe: how many rounds of the phases to run, and the seed",
        {
            "rounds": Attr(
                INT,
                "how many times the phases run; round r+1 starts from round r's policy",
                1,
                min=1,
                max=1000,
            ),
            "seed": Attr(
                INT,
                "seed for every random choice; each step derives its own from (seed, round, step)",
                0,
                min=0,
            ),
        },
    ),
    "model": Kind(
        "a causal language model: Hugging Face id, local folder, or built-in `ralign:NAME`",
        {
            "path": Attr(STRING, "hub id, local folder, or `ralign:smollm2-135m`", required=True),
            "dtype": Attr(
                STRING, "weights' dtype", "auto", choices=("auto", "float32", "bfloat16", "float16")
            ),
            "lora": Attr(
                LORA,
                "train a LoRA adapter instead of all weights: `{ rank, alpha, dropout, targets }`",
            ),
            "max_length": Attr(
                INT, "longest prompt+response, in tokens, for training and judging", 1024, min=16
            ),
        },
    ),
    "dataset": Kind(
        "prompts: a `.jsonl`/`.json`/`.csv`/`.parquet` file, `hf:org/name[:split]`, or built-in `ralign:NAME`",
        {
            "path": Attr(
                STRING,
                "file (relative to the recipe), `hf:...` or `ralign:seeds/hhh`",
                required=True,
            ),
            "field": Attr(STRING, "the record field that holds the prompt text", "prompt"),
            "limit": Attr(INT, "use at most this many records (the first ones)", min=1),
        },
    ),
    "evaluate": Kind(
        "an evaluation of the policy, before round 1 and after each round (or only at the end)",
        {
            "data": Attr(
                DATA, "a dataset name, a file, `hf:...` or `ralign:evals/hhh-mini`", required=True
            ),
            "task": Attr(
                STRING,
                "the evaluator (default: the block's name when it names one)",
                choices=("hhh", "behavior"),
            ),
            "every": Attr(STRING, "when to run", "round", choices=("round", "end")),
            "limit": Attr(INT, "evaluate at most this many items", min=1),
            "batch_size": Attr(INT, "items per forward pass", 16, min=1),
            "max_new_tokens": Attr(
                INT, "answer length for generating evaluations (behavior)", 64, min=1
            ),
            "reward": Attr(
                EXPR_NUMBER,
                "behavior: also report the mean of this expression over the answers (e.g. `hhh.rules`)",
            ),
        },
    ),
}

_T = Attr(NUMBER, "sampling temperature (0 = greedy)", 1.0, min=0, max=10)

STEPS: dict[str, Kind] = {
    "generate": Kind(
        "self-instruct: the policy writes new prompts, few-shot from a dataset",
        {
            "from": Attr(DATASET, "the seed prompts shown as examples", required=True),
            "template": Attr(
                TEMPLATE,
                "the few-shot prompt; the model continues it (variable `examples`)",
                required=True,
            ),
            "count": Attr(INT, "how many prompts to write (before dropping bad ones)", 64, min=1),
            "shots": Attr(INT, "examples per few-shot prompt", 4, min=0, max=64),
            "temperature": _T,
            "top_p": Attr(NUMBER, "nucleus sampling mass", 1.0, min=0, max=1, min_open=True),
            "max_new_tokens": Attr(INT, "longest prompt to write, in tokens", 48, min=1),
        },
        produces=("prompts",),
        template_vars={"template": ("examples",)},
    ),
    "dedupe": Kind(
        "drop near-duplicate prompts (MiniLM embedding cosine when installed, else word n-gram Jaccard)",
        {
            "max_similarity": Attr(
                NUMBER, "drop a prompt this similar to an earlier kept one", 0.9, min=0, max=1
            ),
            "method": Attr(
                STRING, "similarity measure", "auto", choices=("auto", "embedding", "jaccard")
            ),
        },
        consumes=("prompts",),
        produces=("prompts",),
    ),
    "filter": Kind(
        "keep the prompts where an expression over `prompt` holds",
        {"keep": Attr(EXPR_BOOL, "a bool expression over `prompt`", required=True)},
        consumes=("prompts",),
        produces=("prompts",),
    ),
    "sample": Kind(
        "the policy answers each prompt several times",
        {
            "from": Attr(DATASET, "answer this dataset instead of the round's prompts"),
            "per_prompt": Attr(INT, "answers per prompt (K)", 4, min=1, max=64),
            "temperature": Attr(NUMBER, "sampling temperature (0 = greedy)", 0.8, min=0, max=10),
            "top_p": Attr(NUMBER, "nucleus sampling mass", 1.0, min=0, max=1, min_open=True),
            "max_new_tokens": Attr(INT, "longest answer, in tokens", 128, min=1),
            "context": Attr(
                TEMPLATE,
                "a template prepended while sampling (variable `prompt`); `train sft { drop_context = true }` distils it away",
            ),
            "batch_size": Attr(INT, "prompts per generation batch", 32, min=1),
        },
        consumes=("prompts",),
        produces=("responses",),
        template_vars={"context": ("prompt",)},
    ),
    "revise": Kind(
        "critique and revise each answer against principles, `times` passes",
        {
            "template": Attr(
                TEMPLATE,
                "the revision prompt (variables `prompt`, `response`, `principle`, `critique`, `stage`)",
                required=True,
            ),
            "principles": Attr(
                TEXTS, "principles to revise against, one drawn per pass", required=True
            ),
            "times": Attr(INT, "revision passes", 1, min=1, max=16),
            "temperature": Attr(
                NUMBER, "sampling temperature for critiques and revisions", 0.7, min=0, max=10
            ),
            "max_new_tokens": Attr(INT, "longest critique or revision, in tokens", 128, min=1),
        },
        consumes=("responses",),
        produces=("responses", "revised"),
        template_vars={"template": ("prompt", "response", "principle", "critique", "stage")},
    ),
    "rank": Kind(
        "in-context self-ranking: the judge model ranks each prompt's answers; the result is a score named by the step",
        {
            "judge": Attr(
                MODEL, "the judging model (default: the policy itself, as it is in this round)"
            ),
            "template": Attr(
                TEMPLATE,
                "the judging prompt (listwise/pairwise: `prompt`, `responses`, `labels`; pointwise: `prompt`, `response`)",
                required=True,
            ),
            "mode": Attr(
                STRING,
                "how answers are compared",
                "listwise",
                choices=("listwise", "pairwise", "pointwise"),
            ),
            "orders": Attr(
                INT,
                "listwise: orders scored and averaged (2 = also reversed; more = rotations)",
                1,
                min=1,
                max=16,
            ),
            "samples": Attr(
                INT,
                "pointwise: judge samples drawn from the digit distribution and averaged (1 = its exact expectation)",
                1,
                min=1,
                max=32,
            ),
            "scale": Attr(
                INT, "pointwise: the rubric's top score (digits 0..scale)", 5, min=1, max=9
            ),
            "batch_size": Attr(INT, "judge prompts per forward pass", 16, min=1),
        },
        consumes=("responses",),
        produces=("score",),
        named="required",
        template_vars={"template": ("prompt", "responses", "labels")},
    ),
    "score": Kind(
        "combine ranks and rewards into scores; each attribute defines one (usually `total`)",
        {},
        consumes=("responses",),
        produces=("score",),
        open_attrs=EXPR_NUMBER,
    ),
    "pairs": Kind(
        "preference pairs per prompt from a score",
        {
            "chosen": Attr(
                STRING,
                "which answer is preferred (the pair is then oriented by score)",
                "best",
                choices=("best", "random"),
            ),
            "rejected": Attr(
                STRING, "which answer is dispreferred", "worst", choices=("worst", "random")
            ),
            "min_margin": Attr(NUMBER, "drop pairs whose score gap is below this", 0.0, min=0),
            "min_score": Attr(
                NUMBER,
                "drop pairs whose chosen answer scores below this (two bad answers teach the lesser evil)",
            ),
            "by": Attr(
                STRING, "the score to use (default: `total` if defined, else the latest score)"
            ),
        },
        consumes=("score",),
        produces=("pairs",),
    ),
    "train sft": Kind(
        "supervised self-distillation on the best (or revised) answers; loss on answer tokens only",
        {
            "on": Attr(STRING, "what to train on", "best", choices=("best", "revised", "all")),
            "by": Attr(
                STRING,
                "the score that picks the best answer (default: `total` if defined, else the latest)",
            ),
            "min_score": Attr(
                NUMBER,
                'on = "best" or "all": train only on answers scoring at least this (rejection sampling: a best answer that is still bad teaches nothing)',
            ),
            "drop_context": Attr(
                BOOL,
                "train on the bare prompt, without the sampling context (context distillation)",
                False,
            ),
            "lr": _positive("learning rate (AdamW)", 1e-5),
            "epochs": Attr(INT, "passes over the examples", 1, min=1, max=100),
            "batch_size": Attr(INT, "examples per optimizer step", 8, min=1),
        },
        consumes=("responses",),
        produces=("policy",),
    ),
    "train dpo": Kind(
        "Direct Preference Optimization on the pairs (Rafailov et al. 2023)",
        {
            "beta": _positive("strength of the KL anchor to the reference", 0.1),
            "lr": _positive("learning rate (AdamW)", 5e-6),
            "epochs": Attr(INT, "passes over the pairs", 1, min=1, max=100),
            "batch_size": Attr(INT, "pairs per optimizer step", 8, min=1),
            "reference": Attr(
                STRING,
                "the frozen reference policy",
                "round_start",
                choices=("round_start", "base"),
            ),
        },
        consumes=("pairs",),
        produces=("policy",),
    ),
}

TRAIN_METHODS = tuple(k.split()[1] for k in STEPS if k.startswith("train "))
STEP_KINDS = tuple(sorted({k.split()[0] for k in STEPS}))

# What each use provides to a pointwise rank template (the others use Kind.template_vars).
POINTWISE_VARS = ("prompt", "response", "scale")

# The template each evaluator or builtin dataset name resolves to is a runtime matter;
# the compiler only knows the names.
BUILTIN_DATASETS = ("seeds/hhh", "seeds/red_team", "evals/hhh-mini")
BUILTIN_MODELS = (
    "smollm2-135m",
    "tiny-llama",
    "tiny-gpt2",
    "tiny-qwen2",
)  # tiny-*: random-init test models
