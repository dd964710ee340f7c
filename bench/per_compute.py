"""Alignment per compute: the quickstart, constitutional SL and TRL GRPO on the same token budget.

Usage: python bench/per_compute.py [--smoke] [--work DIR] [--quickstart-run DIR]
                                   [--only ARM ...] [--out bench/results] [--threads N]

Issue 5, item 7: does self-alignment without RL match or beat RL at lower cost? Four arms, each
scored by the same evaluations (the quickstart's first 240 prompts of `ralign:evals/behavior`, hhh-mini, HHH dev):

- base: SmolLM2-135M-Instruct untrained;
- quickstart: `ralign execute recipes/quickstart.ralign` (or a finished run given by
  `--quickstart-run`). The tokens it generates (its `sample` step) are the BUDGET;
- constitutional_sl: `recipes/constitutional_sl.ralign` (sample red-team prompts, critique and
  revise twice, SFT on the revisions), its prompt count scaled so that everything it generates
  (answers, critiques, revisions) is within 15% of the budget;
- grpo: TRL `GRPOTrainer` on the same model with a LoRA adapter like the quickstart's (r 16,
  alpha 32, dropout 0), on the quickstart's 192 training prompts, rewarded by exactly the
  expression the quickstart scores with (`hhh.rules + style`, evaluated by ralign's own reward
  programs), stopped when its completions reach the budget.

Simplifications, stated up front:
- Generated tokens are counted exactly, as every generated token including the end token: for the
  recipe arms as their `sample`, `revise` and `generate` steps report them (`generated_tokens` in
  each step's metrics.json), for GRPO from the completion ids TRL hands its reward function. A
  quickstart run whose steps lack the count (`--quickstart-run` of a run made before ralign
  reported it) has its sampled answers re-tokenized with the model's tokenizer (+1 for the end
  token of an answer shorter than `max_new_tokens`), and the JSON says `tokens_exact: false`.
- Constitutional SL is scaled by a calibration run first: the recipe's answer phase alone on its first
  few red-team prompts (12; `--smoke`: 1) gives tokens per answer, from which `limit` (and, past the
  72 training prompts, `per_prompt`) is set; the recipe is left as it is when its natural size is
  predicted within 7.5% of the budget. If the real run still misses the budget by more than 15%, it
  is redone once, rescaled from both measurements. The calibration's time and tokens are reported
  but not charged to the arm. The arm runs bench/recipes/constitutional_sl.ralign, the recipe
  without its `evaluate hhh` block (the arm is evaluated like the others, below), and the
  calibration bench/recipes/constitutional_sl_answers.ralign, its answer phase alone (a test checks
  both against recipes/constitutional_sl.ralign step by step); the sizes are `--set` overrides
  (`red_team.limit`, `answer/sample.per_prompt`), recorded in each run's plan.json. Everything
  else, full fine-tuning included, is as written.
- GRPO: TRL's defaults except where stated: num_generations 4, max_completion_length 40,
  temperature 0.8 and top_k off (as the quickstart samples), 8 completions (2 prompts) per step, one
  generation per step, learning rate 2e-4 constant (the quickstart's LoRA rate; TRL's default 1e-6
  with linear decay barely moves a LoRA adapter), float32, no gradient checkpointing, seed 7. TRL's
  defaults kept: loss_type "dapo", beta 0 (no KL term, so no reference model), epsilon 0.2,
  scale_rewards "group", one iteration per generation. It samples the bare, chat-formatted prompts
  (the quickstart samples them behind a careful-assistant context, then distils it away); GRPO is
  trained on what it is asked. It stops after the step whose generated tokens come nearest the
  budget (`should_stop`); `max_steps` is only a cap that cannot bind first.
- Evaluations are ralign's own, with the quickstart's settings: hhh-mini and the held-out behaviour
  prompts (greedy, max_new_tokens 48, batch 16; mean reward = `hhh.rules` over the answers) as its
  `evaluate` steps run them; HHH dev as `ralign eval` runs it. The quickstart's and base's hhh-mini
  and behaviour figures are read from the quickstart run's own evaluate steps (rounds 1 and 0) when
  their settings match; every other evaluation runs `evaluate_model`, the same calls on the saved
  model. The HHH dev set (`../shared/data/hhh_alignment_dev.jsonl`) is skipped if absent.
- Wall time: generation (sample, revise; GRPO: its `generate` calls), training (train steps; GRPO:
  the rest of its loop: forward, backward, optimizer), other (scoring, pairs; GRPO: the reward
  function), and their total, from each recipe step's own timing (meta.json) and, for GRPO, from
  model loading to the saved merged model. Imports and evaluations are not charged to any arm.
- The recipe arms run `python -m ralign execute` in a child process each (the runs' step times
  exclude its start-up); GRPO and the evaluations run in this process. One seed; on a machine
  shared with other work absolute times are noisy (load average recorded).
- `--smoke`: a tiny random-init Llama with a tokenizer trained on the spot (in the work folder,
  passed to ralign with `--root`), 4 prompts, 2 answers of at most 8 tokens, 1-2 GRPO steps, 4 items
  per evaluation: every code path, no meaningful numbers. The recipes are shrunk by `--set`.

Results go to `--out` as per_compute-DATE.json (per_compute-smoke-DATE.json with `--smoke`), written
after every arm, so a killed run keeps what it finished; rerunning with the same `--work` resumes
(the executor skips finished steps; finished GRPO training and evaluations are reused).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import execute_command, literal, load, machine, versions  # noqa: E402

from ralign.schema import STEPS  # noqa: E402
from ralign.tables import text_table  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICKSTART = ROOT / "recipes" / "quickstart.ralign"
CONSTITUTIONAL = HERE / "recipes" / "constitutional_sl.ralign"  # the recipe, evaluation dropped
CALIBRATION = HERE / "recipes" / "constitutional_sl_answers.ralign"  # its answer phase alone
HHH_DEV = ROOT.parent / "shared" / "data" / "hhh_alignment_dev.jsonl"
MODEL = "ralign:smollm2-135m"

ARMS = ("quickstart", "base", "constitutional_sl", "grpo")  # in the order they run
GENERATING = ("sample", "revise", "generate")  # the step kinds that report `generated_tokens`
TRAINING = tuple(name for name, kind in STEPS.items() if kind.trains)
TOLERANCE = 0.15  # the budget match asked of the constitutional arm
SEED = 7  # the quickstart's


@dataclass(frozen=True)
class Settings:
    """Sizes of one mode (the real benchmark or `--smoke`)."""

    smoke: bool
    hhh_mini_limit: int | None = None
    behavior_limit: int | None = 240  # as the quickstart's `evaluate behavior`
    dev_limit: int | None = None
    behavior_max_new_tokens: int = 40
    eval_batch_size: int = 16
    train_prompts: int | None = None  # GRPO's prompts: the first N training prompts (None: all 192)
    num_generations: int = 4
    max_completion_length: int = 40
    temperature: float = 0.8
    completions_per_step: int = 8
    lr: float = 2e-4
    lora_rank: int = 16
    lora_alpha: int = 32
    calibration_prompts: int = 12
    logging_steps: int = 10


REAL = Settings(smoke=False)
SMOKE = Settings(
    smoke=True,
    hhh_mini_limit=4,
    behavior_limit=4,
    dev_limit=4,
    behavior_max_new_tokens=8,
    train_prompts=4,
    num_generations=2,
    max_completion_length=8,
    completions_per_step=4,
    calibration_prompts=1,
    logging_steps=1,
)

# ---- what each arm runs: a recipe file and `--set` overrides -----------------------------------


# The quickstart skips hhh-mini's A/B question (half its evaluation time); every arm here asks it.
SAME_EVALS = ("hhh.ab=true",)


def smoke_quickstart(model_dir: Path, s: Settings) -> tuple[str, ...]:
    """The quickstart on a tiny model: 4 prompts, 2 answers of 8 tokens (and a forced refusal), a
    threshold a random model can pass, one epoch, evaluations cut to a few items."""
    return (
        f"policy.path={literal(str(model_dir))}",
        f"seeds.limit={s.train_prompts}",
        f"sample/sample.per_prompt={s.num_generations}",
        f"sample/sample.max_new_tokens={s.max_completion_length}",
        "distill/pairs.min_margin=0.0",
        "distill/train.dpo.epochs=1",
        f"hhh.limit={s.hhh_mini_limit}",
        f"behavior.limit={s.behavior_limit}",
        f"behavior.max_new_tokens={s.behavior_max_new_tokens}",
        f"distill/calibrate.max_new_tokens={s.behavior_max_new_tokens}",
    )


def smoke_constitutional(model_dir: Path, s: Settings, train: bool = True) -> tuple[str, ...]:
    """Constitutional SL on a tiny model: 8-token answers, critiques and revisions, one epoch
    (`train=False`: the calibration recipe, which has no training step)."""
    flags = (
        f"policy.path={literal(str(model_dir))}",
        f"answer/sample.max_new_tokens={s.max_completion_length}",
        f"answer/revise.max_new_tokens={s.max_completion_length}",
    )
    return (*flags, "distill/train.sft.epochs=1") if train else flags


def scaled(limit: int | None, per_prompt: int) -> tuple[str, ...]:
    """Constitutional SL on its first `limit` red-team prompts (None: all), `per_prompt` answers each."""
    flags = () if limit is None else (f"red_team.limit={limit}",)
    return flags if per_prompt == 1 else (*flags, f"answer/sample.per_prompt={per_prompt}")


# ---- budget arithmetic -----------------------------------------------------------------------


def scale_constitutional(
    budget: int, tokens_per_answer: float, available: int
) -> tuple[int | None, int]:
    """(limit, per_prompt) whose predicted generated tokens come nearest `budget`.

    `tokens_per_answer` is what one sampled answer costs with its critiques and revisions. The
    natural recipe (limit None: all `available` prompts, one answer each) is kept when it is
    predicted within half the tolerance; otherwise as few answers per prompt as reach the budget,
    on the first `limit` prompts.
    """
    natural = available * tokens_per_answer
    if abs(natural / budget - 1) <= TOLERANCE / 2:
        return None, 1
    per_prompt = max(1, math.ceil(budget / natural))
    limit = min(available, max(1, round(budget / (per_prompt * tokens_per_answer))))
    return limit, per_prompt


def planned_steps(budget: int, completions_per_step: int, mean_tokens: float) -> int:
    """GRPO steps expected to generate `budget` tokens at `mean_tokens` per completion."""
    return max(1, round(budget / (completions_per_step * mean_tokens)))


def step_cap(budget: int, completions_per_step: int) -> int:
    """`max_steps` for GRPO: a completion has at least one token, so the budget is reached first."""
    return max(1, -(-budget // completions_per_step))


def should_stop(tokens: int, last_step_tokens: int, budget: int) -> bool:
    """Stop after this step if one more (as long as the last) would land farther from the budget:
    |tokens + last - budget| >= |tokens - budget|, i.e. tokens + last / 2 >= budget."""
    return tokens + last_step_tokens / 2 >= budget


def within(tokens: int | None, budget: int, tolerance: float = TOLERANCE) -> bool:
    return tokens is not None and abs(tokens - budget) <= tolerance * budget + 1e-9


# ---- reading runs --------------------------------------------------------------------------


def estimate_tokens(tokenizer: Any, responses: list[str], max_new_tokens: int) -> int:
    """Generated tokens re-counted from decoded answers: each answer's tokens, plus its end token
    when it stopped before `max_new_tokens` (an answer that long was cut at the limit)."""
    total = 0
    for r in responses:
        n = len(tokenizer(r, add_special_tokens=False)["input_ids"])
        total += max_new_tokens if n >= max_new_tokens else n + 1
    return total


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def execute(ctx: Context, recipe: Path, run_dir: Path, sets: tuple[str, ...] = ()) -> None:
    """`ralign execute RECIPE --run-dir RUN_DIR --set ...` in a child process (its own Accelerate
    state); its log goes to this process's output."""
    cmd = execute_command(recipe, run_dir, sets, ctx.roots, device())
    env = dict(os.environ)
    if ctx.threads:
        env["OMP_NUM_THREADS"] = str(ctx.threads)  # torch's intra-op threads in the child
    print("  " + shlex.join(["ralign", *cmd[3:]]), flush=True)
    status = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    if status != 0:
        raise RuntimeError(f"ralign execute {recipe} --run-dir {run_dir} exited with {status}")


def load_run_plan(run_dir: Path) -> Any:
    from ralign.plan import Plan

    path = run_dir / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a ralign run (no plan.json)")
    return Plan.load(path)


def _step_files(run_dir: Path, step: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(meta, metrics) of a finished step, None when it has not finished."""
    from ralign.runtime.executor import step_folder

    folder = step_folder(run_dir, step)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (meta, metrics) if meta.get("hash") == step.hash else None


def run_finished(run_dir: Path) -> bool:
    plan = load_run_plan(run_dir)
    return (run_dir / "final").is_dir() and all(_step_files(run_dir, s) for s in plan.steps)


def run_cost(run_dir: Path, model: str) -> dict[str, Any]:
    """Generated tokens and seconds of a finished run, from its steps' metrics and meta files."""
    from ralign.runtime.data import read_jsonl
    from ralign.runtime.executor import step_folder

    plan = load_run_plan(run_dir)
    seconds = {"generation": 0.0, "training": 0.0, "other": 0.0, "evaluation": 0.0}
    by_step: dict[str, int | None] = {}
    estimate: dict[str, int] = {}  # sample steps' answers re-tokenized
    exact = True
    tokenizer = None
    for step in plan.steps:
        files = _step_files(run_dir, step)
        if files is None:
            raise RuntimeError(f"{run_dir}: step {step.id} has not finished")
        meta, metrics = files
        kind = step.kind
        part = (
            "generation"
            if kind in GENERATING
            else "training"
            if kind in TRAINING
            else "evaluation"
            if kind == "evaluate"
            else "other"
        )
        seconds[part] += float(meta["seconds"])
        if kind not in GENERATING:
            continue
        counted = metrics.get("generated_tokens")
        by_step[step.id] = None if counted is None else int(counted)
        exact = exact and counted is not None
        if kind != "sample":  # critiques and intermediate revisions are not written down
            continue
        # Answers are: re-counted from their text, as a check of the count (or in its place).
        if tokenizer is None:
            from transformers import AutoTokenizer

            from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
            from ralign.runtime.models import resolve_path

            # The arm's starting model, as given: the plan's copy of a local path is relative to
            # the recipe's folder, which a run dir does not record.
            tokenizer = AutoTokenizer.from_pretrained(resolve_path(model))
        rows = read_jsonl(step_folder(run_dir, step) / "responses.jsonl")
        estimate[step.id] = estimate_tokens(
            tokenizer, [r for row in rows for r in row["responses"]], step.params["max_new_tokens"]
        )
        if counted is None:
            by_step[step.id] = estimate[step.id]
    known = [v for v in by_step.values() if v is not None]
    seconds["total"] = seconds["generation"] + seconds["training"] + seconds["other"]
    return {
        "generated_tokens": sum(known) if len(known) == len(by_step) else None,
        "tokens_exact": exact,
        "tokens_by_step": by_step,
        "tokens_estimate_by_step": estimate,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def run_evals(run_dir: Path, s: Settings) -> dict[int, dict[str, dict[str, float]]]:
    """Round -> {evaluation name: metrics} of a run's evaluate steps, only where they were run as
    `evaluate_model` runs them (same data, limit, batch, answer length, reward)."""
    plan = load_run_plan(run_dir)
    want = {
        "hhh": ({"path": "ralign:evals/hhh-mini"}, s.hhh_mini_limit, None),
        "behavior": (
            {"path": "ralign:evals/behavior"},
            s.behavior_limit,
            s.behavior_max_new_tokens,
        ),
    }
    out: dict[int, dict[str, dict[str, float]]] = {}
    for step in plan.steps:
        if step.kind != "evaluate" or step.params.get("task") not in want:
            continue
        p, (data, limit, tokens) = step.params, want[step.params["task"]]
        same = (
            {k: v for k, v in p["data"].items() if k != "sha256"} == data  # the plan hashes data
            and p.get("limit") == limit
            and p["batch_size"] == s.eval_batch_size
            and (tokens is None or (p["max_new_tokens"] == tokens and "reward" in step.exprs))
        )
        files = _step_files(run_dir, step)
        if same and files is not None:
            out.setdefault(step.round, {})[p["task"]] = files[1]
    return out


# ---- rewards and evaluation ------------------------------------------------------------------


@dataclass
class Rewards:
    """The quickstart's scoring expression and its behaviour reward, compiled from its recipe."""

    programs: Any
    total: Any  # the IR of its `score { total = ... }`
    behavior: Any  # the IR of its `evaluate behavior { reward = ... }`


def quickstart_rewards(sets: tuple[str, ...] = (), roots: tuple[Path, ...] = (ROOT,)) -> Rewards:
    """The rewards of the quickstart compiled with `sets` (its smoke overrides, say)."""
    from ralign.compile import compile_file

    return plan_rewards(compile_file(QUICKSTART, roots, sets=sets))


def plan_rewards(plan: Any) -> Rewards:
    """The `score { total = ... }` and behaviour reward of a quickstart plan (a run's plan.json)."""
    from ralign.rewards.interpreter import Programs

    score = next(s for s in plan.steps if s.kind == "score" and "total" in s.exprs)
    behavior = next(s for s in plan.steps if s.kind == "evaluate" and "reward" in s.exprs)
    return Rewards(Programs(plan.programs), score.exprs["total"], behavior.exprs["reward"])


def make_reward(rewards: Rewards, counter: dict[str, Any]) -> Callable[..., list[float]]:
    """A TRL reward function: the quickstart's `total` score of each (bare prompt, completion),
    evaluated by ralign's reward programs exactly as its `score` step does. It also counts the
    completions and their tokens (TRL's completion ids stop after the end token, included)."""

    def rules_total(
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        bare_prompt: list[str] | None = None,
        **_: Any,
    ) -> list[float]:
        started = time.perf_counter()
        texts = [
            (c if isinstance(c, str) else c[-1]["content"]).strip() for c in completions
        ]  # the score step sees stripped answers
        asked = bare_prompt if bare_prompt is not None else [str(p) for p in prompts]
        records = [{"prompt": p, "response": r} for p, r in zip(asked, texts, strict=True)]
        values = rewards.programs.score(rewards.total, records).values
        counter["completions"] = counter.get("completions", 0) + len(texts)
        counter["tokens"] = counter.get("tokens", 0) + sum(len(i) for i in completion_ids or [])
        counter["reward_seconds"] = counter.get("reward_seconds", 0.0) + (
            time.perf_counter() - started
        )
        return values

    return rules_total


def evaluate_model(
    path: str, s: Settings, rewards: Rewards, *, which: tuple[str, ...] = ("hhh", "behavior", "dev")
) -> dict[str, dict[str, Any]]:
    """The quickstart's evaluations of a saved model, by the calls its evaluate steps make (hhh-mini,
    behaviour with the `hhh.rules` mean), and HHH dev as `ralign eval` runs it."""
    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.builtin_data import resolve_dataset
    from ralign.runtime.evaluators import eval_items, flatten_eval, run_eval
    from ralign.runtime.models import ModelSpec, load_model

    model, tok = load_model(ModelSpec(path=path, dtype="float32"), device())
    model.eval()
    out: dict[str, dict[str, Any]] = {}
    if "hhh" in which:
        items = eval_items("hhh", resolve_dataset("evals/hhh-mini"), s.hhh_mini_limit)
        out["hhh"] = flatten_eval(run_eval("hhh", model, tok, items, batch_size=s.eval_batch_size))
    if "behavior" in which:
        items = eval_items("behavior", resolve_dataset("evals/behavior"), s.behavior_limit)
        result = run_eval(
            "behavior",
            model,
            tok,
            items,
            batch_size=s.eval_batch_size,
            max_new_tokens=s.behavior_max_new_tokens,
            details=True,
        )
        records = result.pop("records")
        values = rewards.programs.score(
            rewards.behavior, [{"prompt": r["prompt"], "response": r["answer"]} for r in records]
        ).values
        result["mean_reward"] = {"value": sum(values) / len(values), "n": len(values)}
        out["behavior"] = flatten_eval(result)
    if "dev" in which and HHH_DEV.is_file():
        result = run_eval("hhh", model, tok, eval_items("hhh", HHH_DEV, s.dev_limit))
        out["hhh_dev"] = {
            **flatten_eval(result),
            "ci95": {k: result[k]["ci95"] for k in ("acc", "acc_norm", "ab_acc") if k in result},
        }
    return out


def fingerprint(path: str) -> str:
    """What identifies a model folder's weights: the run's source marker, else the weights' mtime."""
    folder = Path(path)
    marker = folder / "ralign_source.txt"
    if marker.is_file():
        return marker.read_text(encoding="utf-8")
    weights = sorted(folder.glob("*.safetensors"))
    return f"{path}@{weights[0].stat().st_mtime_ns}" if weights else path


def cached_eval(
    work: Path, name: str, path: str, s: Settings, rewards: Rewards, which: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """`evaluate_model`, reused from work/evals/NAME.json when the same weights were evaluated."""
    cache = work / "evals" / f"{name}.json"
    key = {"model": fingerprint(path), "which": list(which), "settings": asdict(s)}
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved["key"] == key:
            return saved["evals"]
    started = time.perf_counter()
    evals = evaluate_model(path, s, rewards, which=which)
    print(f"  evaluated {name} ({', '.join(which)}) in {time.perf_counter() - started:.1f}s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "evals": evals}, indent=2), encoding="utf-8")
    return evals


# ---- the arms --------------------------------------------------------------------------------


@dataclass
class Context:
    s: Settings
    work: Path
    model: str  # the model every arm starts from
    quickstart_sets: tuple[str, ...]  # `--set` overrides of the quickstart (--smoke: a tiny run)
    quickstart_run: Path
    rewards: Rewards
    roots: tuple[Path, ...] = (ROOT,)  # `--root` folders of the runs (the tiny model's, too)
    threads: int | None = None  # torch threads of the runs (None: torch's default)
    budget: int | None = None
    quickstart_responses: int | None = None  # answers the quickstart sampled


def arm_quickstart(ctx: Context, execute_it: bool) -> dict[str, Any]:
    run_dir = ctx.quickstart_run
    if execute_it:
        execute(ctx, QUICKSTART, run_dir, ctx.quickstart_sets)
    elif not run_finished(run_dir):
        raise RuntimeError(f"{run_dir}: the quickstart run has not finished")
    cost = run_cost(run_dir, ctx.model)
    rounds = run_evals(run_dir, ctx.s)
    last = rounds.get(max(rounds), {}) if rounds and max(rounds) > 0 else {}
    which = ("dev",) if {"hhh", "behavior"} <= set(last) else ("hhh", "behavior", "dev")
    evals = cached_eval(ctx.work, "quickstart", str(run_dir / "final"), ctx.s, ctx.rewards, which)
    if which == ("dev",):
        evals = {**evals, "hhh": last["hhh"], "behavior": last["behavior"]}
    plan = load_run_plan(run_dir)
    sample = next(s for s in plan.steps if s.kind == "sample")
    sample_metrics = _step_files(run_dir, sample)
    responses = sample_metrics[1].get("responses") if sample_metrics else None
    return {
        "arm": "quickstart",
        "run_dir": str(run_dir),
        "executed_here": execute_it,
        **cost,
        "responses": responses,
        "evals": evals,
        "eval_source": "run (round 1) + evaluate_model (dev)"
        if which == ("dev",)
        else "evaluate_model",
    }


def arm_base(ctx: Context) -> dict[str, Any]:
    rounds = (
        run_evals(ctx.quickstart_run, ctx.s) if (ctx.quickstart_run / "plan.json").is_file() else {}
    )
    first = rounds.get(0, {})
    which = ("dev",) if {"hhh", "behavior"} <= set(first) else ("hhh", "behavior", "dev")
    evals = cached_eval(ctx.work, "base", ctx.model, ctx.s, ctx.rewards, which)
    if which == ("dev",):
        evals = {**evals, "hhh": first["hhh"], "behavior": first["behavior"]}
    return {
        "arm": "base",
        "model": ctx.model,
        "generated_tokens": 0,
        "tokens_exact": True,
        "seconds": {"generation": 0.0, "training": 0.0, "other": 0.0, "total": 0.0},
        "evals": evals,
        "eval_source": "quickstart run (round 0) + evaluate_model (dev)"
        if which == ("dev",)
        else "evaluate_model",
    }


def arm_constitutional(ctx: Context) -> dict[str, Any]:
    from ralign.runtime.data import load_records

    assert ctx.budget
    smoke = ctx.s.smoke
    base = smoke_constitutional(Path(ctx.model), ctx.s) if smoke else ()
    available = len(load_records({"path": "ralign:seeds/red_team", "field": "prompt"}, ROOT))
    # Calibration: the answer phase alone on the first few prompts.
    n0 = min(ctx.s.calibration_prompts, available)
    answers_only = smoke_constitutional(Path(ctx.model), ctx.s, train=False) if smoke else ()
    run_dir = ctx.work / "constitutional_sl-calibration"
    execute(ctx, CALIBRATION, run_dir, (*answers_only, *scaled(n0, 1)))
    calib = run_cost(run_dir, ctx.model)
    measured = [(calib["generated_tokens"], n0)]  # (tokens, answers)
    per_answer = calib["generated_tokens"] / n0
    limit, per_prompt = scale_constitutional(ctx.budget, per_answer, available)
    attempts = []
    for attempt in range(2):
        name = "constitutional_sl" if attempt == 0 else f"constitutional_sl-{attempt + 1}"
        sets = (*base, *scaled(limit, per_prompt))
        run_dir = ctx.work / name
        print(
            f"  {name}: {limit or available} prompts x {per_prompt} answer(s), predicted "
            f"{(limit or available) * per_prompt * per_answer:.0f} tokens for a budget of {ctx.budget}"
        )
        execute(ctx, CONSTITUTIONAL, run_dir, sets)
        cost = run_cost(run_dir, ctx.model)
        answers = (limit or available) * per_prompt
        attempts.append(
            {"run_dir": str(run_dir), "limit": limit, "per_prompt": per_prompt, "overrides": sets}
            | cost
        )
        if within(cost["generated_tokens"], ctx.budget) or attempt == 1:
            break
        measured.append((cost["generated_tokens"], answers))
        per_answer = sum(t for t, _ in measured) / sum(n for _, n in measured)
        again = scale_constitutional(ctx.budget, per_answer, available)
        if again == (limit, per_prompt):
            break
        limit, per_prompt = again
    final = attempts[-1]
    evals = cached_eval(
        ctx.work,
        "constitutional_sl",
        str(Path(final["run_dir"]) / "final"),
        ctx.s,
        ctx.rewards,
        ("hhh", "behavior", "dev"),
    )
    return {
        "arm": "constitutional_sl",
        **{k: final[k] for k in ("run_dir", "limit", "per_prompt")},
        **{k: final[k] for k in ("generated_tokens", "tokens_exact", "tokens_by_step", "seconds")},
        "available_prompts": available,
        "within_tolerance": within(final["generated_tokens"], ctx.budget),
        "calibration": {"prompts": n0, **calib},
        "attempts": attempts,
        "recipe": CONSTITUTIONAL.read_text(encoding="utf-8"),  # run with these overrides:
        "overrides": list(final["overrides"]),
        "evals": evals,
        "eval_source": "evaluate_model",
    }


def arm_grpo(ctx: Context) -> dict[str, Any]:
    assert ctx.budget
    out_dir = ctx.work / "grpo"
    result_file = out_dir / "result.json"
    s = ctx.s
    if result_file.is_file() and (out_dir / "final").is_dir():
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if result.get("budget") == ctx.budget and result.get("settings") == asdict(s):
            print("  grpo: reusing the finished training in", out_dir)
        else:
            result = train_grpo(ctx, out_dir)
    else:
        result = train_grpo(ctx, out_dir)
    evals = cached_eval(
        ctx.work, "grpo", str(out_dir / "final"), s, ctx.rewards, ("hhh", "behavior", "dev")
    )
    return {**result, "evals": evals, "eval_source": "evaluate_model"}


def train_grpo(ctx: Context, out_dir: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer until its completions reach the budget; the merged model in out_dir/final."""
    import dataclasses
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer  # one trainer per process: no Accelerate state to reset

    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.data import load_records
    from ralign.runtime.models import ModelSpec, load_model

    s = ctx.s
    assert ctx.budget
    budget: int = ctx.budget
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    spec: dict[str, Any] = {"path": "ralign:seeds/hhh", "field": "prompt"}
    if s.train_prompts:
        spec["limit"] = s.train_prompts
    prompts = [r["prompt"] for r in load_records(spec, ROOT)]  # the training split only
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}], "bare_prompt": p} for p in prompts]
    )
    mean_tokens = budget / ctx.quickstart_responses if ctx.quickstart_responses else None
    plan = (
        planned_steps(budget, s.completions_per_step, mean_tokens) if mean_tokens else None
    )  # what the quickstart's answer lengths predict; the budget decides
    counter: dict[str, Any] = {"tokens": 0, "completions": 0, "reward_seconds": 0.0}
    clock = {"generation": 0.0, "calls": 0}
    steps: list[dict[str, Any]] = []

    class Budget(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            last = counter["tokens"] - (steps[-1]["tokens"] if steps else 0)
            steps.append({"step": state.global_step, "tokens": counter["tokens"]})
            if should_stop(counter["tokens"], last, budget):
                control.should_training_stop = True

    started = time.perf_counter()
    cpu = device() == "cpu"
    model, tok = load_model(ModelSpec(path=ctx.model, dtype="float32"), device())
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    no_checkpointing: dict[str, Any] = {checkpointing: False}
    config = GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=s.completions_per_step,
        gradient_accumulation_steps=1,
        num_generations=s.num_generations,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=step_cap(budget, s.completions_per_step),
        bf16=False,
        fp16=False,
        use_cpu=cpu,
        seed=SEED,
        logging_steps=s.logging_steps,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **no_checkpointing,
    )
    peft_config = LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[make_reward(ctx.rewards, counter)],  # type: ignore[list-item]
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Budget()],
    )
    trainer.remove_callback(PrinterCallback)
    policy: Any = trainer.model
    generate = policy.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            clock["generation"] += time.perf_counter() - t0
            clock["calls"] += 1

    policy.generate = timed_generate  # TRL generates with the unwrapped (peft) model
    setup = time.perf_counter() - started
    train_out = trainer.train()
    merged = policy.merge_and_unload()
    tok.padding_side = "left"
    merged.save_pretrained(out_dir / "final")
    tok.save_pretrained(out_dir / "final")
    total = time.perf_counter() - started
    history = [
        {
            k: h[k]
            for k in ("step", "reward", "reward_std", "loss", "completions/mean_length")
            if k in h
        }
        for h in trainer.state.log_history
        if "reward" in h
    ]
    del trainer, merged, model
    if not cpu:
        torch.cuda.empty_cache()
    other = counter["reward_seconds"]
    result = {
        "arm": "grpo",
        "model_dir": str(out_dir / "final"),
        "budget": budget,
        "settings": asdict(s),
        "generated_tokens": counter["tokens"],
        "tokens_exact": True,
        "completions": counter["completions"],
        "steps": train_out.global_step,
        "planned_steps": plan,
        "max_steps": config.max_steps,
        "train_prompts": len(prompts),
        "generate_calls": clock["calls"],
        "seconds": {
            "generation": round(clock["generation"], 1),
            "training": round(total - clock["generation"] - other, 1),
            "other": round(other, 1),
            "total": round(total, 1),
            "setup": round(setup, 1),
        },
        "config": {
            k: getattr(config, k)
            for k in (
                "learning_rate",
                "lr_scheduler_type",
                "per_device_train_batch_size",
                "num_generations",
                "max_completion_length",
                "temperature",
                "top_k",
                "top_p",
                "beta",
                "loss_type",
                "epsilon",
                "scale_rewards",
                "num_iterations",
                "steps_per_generation",
                "seed",
            )
        },
        "lora": {"r": s.lora_rank, "alpha": s.lora_alpha, "dropout": 0.0},
        "reward_log": history,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


# ---- report ----------------------------------------------------------------------------------

COLUMNS = (
    ("behavior", "rates.harmful_compliance_rate", "harmful"),
    ("behavior", "rates.over_refusal_rate", "over-ref"),
    ("behavior", "rates.admits_not_knowing_rate", "admits"),
    ("behavior", "rates.everyday_refusal_rate", "everyday-ref"),
    ("behavior", "rates.needless_hedging_rate", "hedge"),
    ("behavior", "mean_reward", "reward"),
    ("hhh", "acc", "mini acc"),
    ("hhh", "acc_norm", "mini norm"),
    ("hhh", "ab_acc", "mini A/B"),
    ("hhh_dev", "acc", "dev acc"),
    ("hhh_dev", "acc_norm", "dev norm"),
    ("hhh_dev", "ab_acc", "dev A/B"),
)


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each arm's wall time and generated tokens over GRPO's."""
    grpo = results.get("grpo")
    out: dict[str, dict[str, float | None]] = {}
    for name, r in results.items():
        if "error" in r or grpo is None or "error" in grpo:
            continue
        wall, tokens = r["seconds"]["total"], r.get("generated_tokens")
        gw, gt = grpo["seconds"]["total"], grpo.get("generated_tokens")
        out[name] = {
            "wall": wall / gw if gw else None,
            "tokens": tokens / gt if gt and tokens is not None else None,
        }
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ["arm", "gen tokens", "gen s", "train s", "total s", "wall/grpo", "tok/grpo"]
    head += [c[2] for c in COLUMNS]
    rat = ratios(results)
    rows: list[list[str]] = []
    for name in ARMS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append(
                [name, "error: " + r["error"].splitlines()[0][:60]] + [""] * (len(head) - 2)
            )
            continue
        sec = r["seconds"]
        tokens = r.get("generated_tokens")
        row = [
            name,
            "-" if tokens is None else f"{tokens}{'' if r.get('tokens_exact', True) else '~'}",
            _num(sec["generation"], ".1f"),
            _num(sec["training"], ".1f"),
            _num(sec["total"], ".1f"),
            _num(rat.get(name, {}).get("wall"), ".2f"),
            _num(rat.get(name, {}).get("tokens"), ".2f"),
        ]
        evals = r.get("evals", {})
        row += [_num(evals.get(group, {}).get(key), ".3f") for group, key, _ in COLUMNS]
        rows.append(row)
    return text_table(head, rows)


def report(
    args: argparse.Namespace,
    ctx: Context,
    results: dict[str, dict[str, Any]],
    start_load: list[float],
    started: float,
) -> Path:
    """Print the table so far and write the JSON (after every arm: a killed run keeps the rest)."""

    print()
    print(table(results), flush=True)
    print(
        f"budget {ctx.budget} generated tokens (the quickstart's); ~ = re-tokenized estimate; "
        f"wall/tok over GRPO's; rates on held-out prompts, mini = hhh-mini, dev = HHH dev"
    )
    now = dt.datetime.now(dt.timezone.utc)
    payload = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/per_compute.py", *args.argv]),
        "machine": machine(start_load) | {"device": device()},
        "versions": versions(),
        "smoke": ctx.s.smoke,
        "settings": asdict(ctx.s),
        "model": ctx.model,
        "budget": ctx.budget,
        "tolerance": TOLERANCE,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "work": str(ctx.work),
        "arms": results,
        "ratios_vs_grpo": ratios(results),
        "table": table(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "per_compute-smoke" if ctx.s.smoke else "per_compute"
    path = args.out / f"{name}-{now.date().isoformat()}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, tiny budget (about a minute, mostly the start-up of three ralign runs)",
    )
    ap.add_argument(
        "--work", type=Path, help="run folders (default: runs/per_compute; smoke: a temp folder)"
    )
    ap.add_argument(
        "--quickstart-run",
        type=Path,
        help="a finished quickstart run to use instead of executing it",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=ARMS,
        help="run only these arms (the quickstart's "
        "run is still needed for the budget: executed, resumed or given)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    s = SMOKE if args.smoke else REAL
    if args.smoke:
        os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = (
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="per_compute-")))
                if args.smoke
                else ROOT / "runs" / "per_compute"
            )
        return run(args, s)


def run(args: argparse.Namespace, s: Settings) -> int:
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start_load = load()
    started = time.perf_counter()
    print(f"load average at start: {start_load} on {os.cpu_count()} CPUs; work in {work}")
    if s.smoke:
        from ralign.runtime.tiny import build_tiny_model

        model = str(build_tiny_model("llama", work / "tiny-llama"))
        sets = (*smoke_quickstart(Path(model), s), *SAME_EVALS)
    else:
        model, sets = MODEL, SAME_EVALS
    given = args.quickstart_run is not None
    roots = (ROOT, work)  # the tiny model lies in the work folder
    ctx = Context(
        s=s,
        work=work,
        model=model,
        quickstart_sets=sets,
        quickstart_run=(args.quickstart_run.resolve() if given else work / "quickstart"),
        rewards=quickstart_rewards(sets, roots),
        roots=roots,
        threads=args.threads,
    )
    wanted = set(args.only or ARMS)
    results: dict[str, dict[str, Any]] = {}
    for name in ARMS:
        if name != "quickstart" and name not in wanted:
            continue
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            if name == "quickstart":
                r = arm_quickstart(ctx, execute_it=not given)
                ctx.budget, ctx.quickstart_responses = r["generated_tokens"], r["responses"]
                if not ctx.budget:
                    raise RuntimeError("the quickstart's generated tokens are unknown: no budget")
            elif name == "base":
                r = arm_base(ctx)
            elif name == "constitutional_sl":
                r = arm_constitutional(ctx)
            else:
                r = arm_grpo(ctx)
        except Exception as exc:  # one arm failing keeps the others
            if name == "quickstart":
                raise
            traceback.print_exc()
            r = {"arm": name, "error": f"{type(exc).__name__}: {exc}"}
        r["bench_seconds"] = round(time.perf_counter() - t0, 1)  # evaluations included
        results[name] = r
        report(args, ctx, results, start_load, started)
    failed = [n for n, r in results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
