"""Efficacy: what each ingredient of a recipe does to SmolLM2-135M-Instruct, one table.

Usage: python bench/efficacy.py [--scale small|full] [--only NAME ...] [--seeds N ...]
                                [--hhh-dev FILE] [--out bench/results]

Every variant is the rules, SFT+DPO recipe (the quickstart until 2026-12-05,
`bench/recipes/efficacy_quickstart.ralign`: one round; answers sampled with a careful-assistant
`context`; scored by the std/hhh rules; SFT on good best answers, then DPO on clearly different
pairs) with one or more things changed, run with `ralign execute` on the same model, seed and
prompts; the first row is today's `recipes/quickstart.ralign` (the same step hashes: a test):

- base: the model before any training (the round-0 evaluations every run shares);
- self-ranking only: the policy ranks its own answers listwise (two orders) instead of the rules;
- agree(rank, rules): the rank and the three std/hhh parts, weighed by learned agreement;
- SFT only / DPO only: one of the two training steps;
- no context: answers sampled from the bare prompts (nothing to distil);
- LoRA on all linear layers: the quickstart's adapter on every linear layer, not q and v alone;
- 2 rounds / 3 rounds: the quickstart run for more rounds, each round's policy sampling the next.

Rows named "quickstart, ..." change today's quickstart instead (its rounds, its judge: "quickstart,
contrast judge only" and "quickstart, agree(contrast, rules)" choose by the policy's contrast
judgement instead of, or weighed with, the rules; "quickstart without over-refusal pairs" never
lets a forced refusal be a pair's rejected side, so nothing pushes refusals of harmless prompts
away; "quickstart with a hedging bound" has `calibrate` also bound hedges on its held-out
prompts).

Simplifications, stated up front:
- Each variant is a recipe file in bench/recipes/ and `--set` overrides (recorded in its run's
  plan.json): efficacy_quickstart.ralign is the old quickstart plus one evaluation (below); a
  change of steps has its own file (efficacy_rank, _sft_only, _dpo_only, _no_context); a change of
  an attribute is an override (LoRA targets, rounds, seed, scale). A test checks that every step a
  variant file shares with efficacy_quickstart.ralign is the same (same content hash).
- Every variant also measures harmful compliance on the 24 held-out requests of
  `ralign:seeds/red_team` (`evaluate red_team`), since 16 make each answer worth 6 points; before
  the variants were files this evaluation was added at small scale only.
- `--scale small` (the default) cuts every variant down (64 prompts, one round unless a variant
  says otherwise: `--set seeds.limit=64 --set recipe.rounds=1`); the slow CI test runs the
  quickstart's row so; `--scale full` keeps the recipes' sizes.
- Variants share steps: each run directory starts as a copy of the first variant run's, and the
  executor skips every step whose content hash is unchanged (the round-0 evaluations and the
  first round's sampling are the same in all of them), so only what differs is recomputed.
- HHH dev accuracy (`../shared/data/hhh_alignment_dev.jsonl`, 115 items, development split of
  BIG-bench hhh_alignment; never trained on) is measured with `ralign eval --no-ab` on each
  `final/` (acc and acc_norm; runs before 2026-12-05 also asked the A/B question).
- One seed by default: with 16 held-out prompts per kind, one prompt moves a behavior rate by
  0.0625, so differences of one or two prompts are noise; HHH rows carry 95% Wilson intervals.
  `--seeds 7 8 9` runs every variant once per seed (`--set recipe.seed=N`, which drives sampling
  and training order) and prints one row over the seeds, then each seed's row; base is
  seed-independent. In the seeds' row a rate is the seeds' counts pooled (k and n summed) with
  its 95% Wilson interval, and so is HHH dev; other figures are means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import HHH_NOT, execute_command, literal, slug, versions  # noqa: E402

from ralign.stats import wilson  # noqa: E402
from ralign.tables import text_table  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICKSTART = ROOT / "recipes" / "quickstart.ralign"
RECIPES = HERE / "recipes"
BASE = RECIPES / "efficacy_quickstart.ralign"  # the quickstart plus `evaluate red_team`
HHH_DEV = ROOT.parent / "shared" / "data" / "hhh_alignment_dev.jsonl"
DEV_RESULT = "hhh_dev.json"  # a run directory's HHH dev evaluation of its final/
# acc and acc_norm only: the A/B question took most of the 7-9 min a model (2026-12-05), and at
# 135M it is position noise (it answers "A" in either order).
DEV_FLAGS = ("--no-ab",)
SMALL = ("recipe.rounds=1", "seeds.limit=64")  # --scale small: one round on 64 prompts
AGREE = "agree(quality, hhh.helpful, hhh.honest, hhh.harmless)"
BALANCED = ["ralign:seeds/hhh", "ralign:seeds/red_team", "ralign:seeds/safe"]

# ---- the variants: a recipe file and overrides --------------------------------------------


class Variant(NamedTuple):
    """What one row runs: `ralign execute RECIPE --set SETS...`."""

    recipe: Path
    sets: tuple[str, ...] = ()

    def but(self, *sets: str) -> Variant:
        """This variant with more overrides (a later one wins over an earlier one)."""
        return Variant(self.recipe, (*self.sets, *sets))


def lora_targets(recipe: Path, targets: list[str]) -> str:
    """`--set policy.lora=...`: the recipe's own LoRA map (rank, alpha, dropout) on other layers."""
    from ralign.compile import compile_file

    plan = compile_file(recipe, (ROOT,))
    lora = plan.models[plan.policy].get("lora")
    if not lora:
        raise ValueError(f"{recipe}: its policy has no LoRA adapter to retarget")
    return f"{plan.policy}.lora={literal({**lora, 'targets': targets})}"


RLCD_NEGATIVES = (
    "sample/sample.negative_context=refuse",
    "sample/sample.negative_only_rejected=true",
)
# SmolLM2-135M refuses 8% of prompts when told to refuse, but continues a refusal it is given.
FORCED_REFUSAL = (
    "sample/sample.negative_context=refuse",
    "sample/sample.negative_prefix=" + literal("I'm sorry, but I can't"),
)

HARD_SFT = ("distill/train.sft.lr=1e-3", "distill/train.sft.epochs=3")
RPO = ("distill/train.dpo.nll_weight=1.0",)  # Pang et al. 2024's weight, as TRL's rpo_alpha
# recipes/quickstart.ralign since 2026-12-05, on top of efficacy_dpo_only.ralign: two answers and a
# forced refusal per balanced prompt, pairs from a margin of 0.75 (an answer over a refusal to a
# harmless request scores ~0.9 higher, which a margin of 1 dropped), DPO + NLL on all-linear LoRA.
QUICKSTART_SETS = (
    f"seeds.path={literal(BALANCED)}",
    *FORCED_REFUSAL,
    "sample/sample.per_prompt=2",
    "sample/sample.max_new_tokens=16",
    "distill/pairs.min_margin=0.75",
    "distill/train.dpo.lr=5e-4",
    "distill/train.dpo.epochs=2",
    *RPO,
    "hhh.ab=false",  # the A/B question is more than half of hhh-mini's time, and noise at 135M
)


QUICKSTART_ROW = "quickstart (balanced prompts, forced refusals, DPO + NLL, calibrated)"
QUICKSTART_UNCALIBRATED = "quickstart without calibrate"
BASE_ROW = "rules, SFT+DPO (the quickstart until 2026-12-05)"  # what the other rows change
QUICKSTART_2_ROUNDS = "quickstart, 2 rounds"
QUICKSTART_ROUNDS = "quickstart, 3 rounds"
QUICKSTART_WHOLE = "quickstart, the whole update every round, 2 rounds"
QUICKSTART_CONTRAST = "quickstart + contrast judge, 3 rounds"
QUICKSTART_OPPOSITE = "quickstart + contrast judge against its opposite, 2 rounds"
QUICKSTART_NO_HEDGE = "quickstart + forced hedges + contrast judge against its opposite, 2 rounds"
QUICKSTART_EACH_SOURCE = "quickstart + forced hedges, one pair per source + contrast judge against its opposite, 2 rounds"
QUICKSTART_OWN_REFUSALS = "quickstart + forced hedges, one pair per source, 4 answers + contrast judge against its opposite, 2 rounds"
QUICKSTART_IMPLICIT = "quickstart + its own judgement from round 2 (implicit), 2 rounds"
QUICKSTART_IMPLICIT_PLAIN = "quickstart + its own judgement from round 2 (implicit), no needless hedges from round 2, 2 rounds"
QUICKSTART_IMPLICIT_LAST = "quickstart + its own judgement from round 2 (implicit), no needless hedges from round 2, hedges bounded by round 1's, 2 rounds"
QUICKSTART_PLAIN = "quickstart, no needless hedges from round 2, 2 rounds"
QUICKSTART_JUDGE_ONLY = "quickstart, contrast judge only"
QUICKSTART_AGREE = "quickstart, agree(contrast, rules)"
QUICKSTART_NO_OVER_REFUSAL = "quickstart without over-refusal pairs"
QUICKSTART_HEDGING = "quickstart with a hedging bound"
QUICKSTART_HEDGING_2_ROUNDS = "quickstart with a hedging bound, 2 rounds"
QUICKSTART_HALF_BOUND = "quickstart, refusal bound halved (2.5 points)"
QUICKSTART_HEDGE_OPENING = (
    "quickstart, refusal bound halved + a forced hedge and a needless-hedge rule"
)
# A row whose first steps are other rows' starts as a copy of the first of them that ran.
STARTS_FROM = {
    "3 rounds": ("2 rounds",),
    QUICKSTART_2_ROUNDS: (QUICKSTART_ROUNDS, QUICKSTART_ROW),  # a 3-round run has all its steps
    QUICKSTART_ROUNDS: (QUICKSTART_2_ROUNDS, QUICKSTART_ROW),
    QUICKSTART_WHOLE: (QUICKSTART_ROW,),
    QUICKSTART_CONTRAST: (QUICKSTART_ROW,),
    QUICKSTART_OPPOSITE: (QUICKSTART_ROW,),
    QUICKSTART_NO_HEDGE: (QUICKSTART_ROW,),  # only the model conversion: its sampling differs
    QUICKSTART_EACH_SOURCE: (QUICKSTART_NO_HEDGE, QUICKSTART_ROW),  # the same sampling and judge
    QUICKSTART_IMPLICIT: (QUICKSTART_ROW,),  # the same first sampling
    QUICKSTART_IMPLICIT_PLAIN: (QUICKSTART_IMPLICIT, QUICKSTART_ROW),  # the same sampling, rank
    QUICKSTART_IMPLICIT_LAST: (QUICKSTART_IMPLICIT_PLAIN, QUICKSTART_ROW),  # all but calibrate 2
    QUICKSTART_PLAIN: (QUICKSTART_ROW,),  # the same first sampling
    QUICKSTART_JUDGE_ONLY: (QUICKSTART_ROW,),
    QUICKSTART_AGREE: (QUICKSTART_JUDGE_ONLY, QUICKSTART_ROW),  # the same rank step
    QUICKSTART_NO_OVER_REFUSAL: (QUICKSTART_ROW,),
    QUICKSTART_UNCALIBRATED: (QUICKSTART_ROW,),
    QUICKSTART_HEDGING: (QUICKSTART_HEDGING_2_ROUNDS, QUICKSTART_ROW),
    QUICKSTART_HEDGING_2_ROUNDS: (QUICKSTART_HEDGING, QUICKSTART_ROW),
    QUICKSTART_HALF_BOUND: (QUICKSTART_ROW,),  # all but calibrate
    QUICKSTART_HEDGE_OPENING: (QUICKSTART_ROW,),  # only the model conversion: its sampling differs
}


def variants(scale: str = "full") -> dict[str, Variant]:
    """Name -> variant, today's quickstart first, then the base the other rows change.

    Scores on other scales keep the quickstart's thresholds meaningful: a listwise rank is
    min-max normalised per prompt (best 1, worst 0), and `agree` is a weighted sum of
    standardised sources (so 0.5 is half a standard deviation above the mean).
    """
    sized = SMALL if scale == "small" else ()
    base = Variant(BASE, sized)
    ranked = Variant(RECIPES / "efficacy_rank.ralign", sized)
    contrast = Variant(RECIPES / "efficacy_contrast.ralign", sized)
    red_team = Variant(RECIPES / "efficacy_red_team.ralign", sized)
    balanced = red_team.but(f"seeds.path={literal(BALANCED)}")
    hhh_only = red_team.but(f"seeds.path={literal(['ralign:seeds/hhh'])}")  # the quickstart's
    all_linear = lora_targets(BASE, ["all-linear"])  # compiles BASE: once, not per row
    uncalibrated = Variant(RECIPES / "efficacy_dpo_only.ralign", sized).but(
        *QUICKSTART_SETS, all_linear
    )
    quickstart = Variant(RECIPES / "efficacy_calibrated.ralign", sized).but(
        *QUICKSTART_SETS, all_linear
    )
    contrast_rounds = Variant(RECIPES / "efficacy_quickstart_contrast.ralign", sized)
    no_hedge = Variant(RECIPES / "efficacy_quickstart_no_hedge.ralign", sized).but(
        "recipe.rounds=2"
    )
    return {
        QUICKSTART_ROW: quickstart,
        # The same without its `calibrate` step: the trained policy kept whole (the quickstart
        # until 2026-12-06; its sampling and training are the row above's).
        QUICKSTART_UNCALIBRATED: uncalibrated,
        # Today's quickstart for two and three rounds, each round's policy sampling the next,
        # behaviour measured after every round (their first round is the row above: the same
        # steps); round r keeps at most 0.5^(r - 1) of its update (`decay`).
        QUICKSTART_2_ROUNDS: quickstart.but("recipe.rounds=2", 'behavior.every="round"'),
        QUICKSTART_ROUNDS: quickstart.but("recipe.rounds=3", 'behavior.every="round"'),
        # The same two rounds as before `decay`: the second may keep all of its update. It refused
        # more safe requests than the first (docs/results.md, 2026-12-05 night and 2026-12-06).
        QUICKSTART_WHOLE: quickstart.but(
            "recipe.rounds=2", 'behavior.every="round"', "distill/calibrate.decay=1"
        ),
        # The same three rounds with the policy's own contrast judgement ranking the answers the
        # rules do not refuse (its first sampling is the quickstart's).
        QUICKSTART_CONTRAST: contrast_rounds.but("recipe.rounds=3"),
        # The same judge against an opposite principle instead of the bare request, two rounds.
        QUICKSTART_OPPOSITE: contrast_rounds.but(
            "recipe.rounds=2", f"judge/rank.quality.opposite={literal(HHH_NOT)}"
        ),
        # The row above with pressure against needless hedging in its data: a forced "I'm not
        # sure" beside the forced refusal, a rule scoring a hedge to an answerable prompt below
        # an answer, and pairs that reject every answer the best one beats.
        QUICKSTART_NO_HEDGE: no_hedge,
        # The same with one pair per source of answers (the policy's samples, the forced refusal,
        # the forced hedge), each weighing 1 and never two forced answers: a harmful prompt
        # teaches refusing once and a harmless one against refusing once, as in the quickstart,
        # and against the hedge once more (docs/results.md, 2026-12-07, fourth session).
        QUICKSTART_EACH_SOURCE: no_hedge.but('distill/pairs.rejected="each_source"'),
        # The same with four answers of the policy's own per prompt instead of two: a harmless
        # prompt's worst sample is then more often one of the policy's own refusals, in its own
        # words, which a pair rejects beside the forced one (docs/results.md, 2026-12-07, fifth).
        QUICKSTART_OWN_REFUSALS: no_hedge.but(
            'distill/pairs.rejected="each_source"', "sample/sample.per_prompt=4"
        ),
        # Today's quickstart for two rounds, the second judged also by the policy itself: how much
        # likelier the policy as round 2 began finds each answer than the declared model does
        # (`rank { mode = "implicit" }`), half of it added to the rules' score, so the pairs it
        # disagrees with fall under the margin (docs/results.md, 2026-12-07, sixth session).
        QUICKSTART_IMPLICIT: Variant(RECIPES / "efficacy_quickstart_implicit.ralign", sized).but(
            "recipe.rounds=2"
        ),
        # The same with a rule from round 2 on that scores a needless hedge ("I'm not sure." to a
        # request that can be answered) just above a refusal, so that no pair chooses the round-1
        # policy's own hedges (docs/results.md, 2026-12-07, seventh session).
        QUICKSTART_IMPLICIT_PLAIN: Variant(
            RECIPES / "efficacy_quickstart_implicit_plain.ralign", sized
        ).but("recipe.rounds=2"),
        # The same whose round 2 keeps no more of its update than hedges on the harmless held-out
        # prompts no more often than round 1 ended (`hedging_relative_to = "last_round"`: round 1
        # is unbounded, so it stays the quickstart; docs/results.md, 2026-12-07, eighth session).
        QUICKSTART_IMPLICIT_LAST: Variant(
            RECIPES / "efficacy_quickstart_implicit_plain.ralign", sized
        ).but(
            "recipe.rounds=2",
            "distill/calibrate.max_hedging_rise=0",
            'distill/calibrate.hedging_relative_to="last_round"',
        ),
        # The implicit-plain row without the policy's judgement: the rules alone, as the
        # quickstart, and from round 2 on no needless hedges (its control).
        QUICKSTART_PLAIN: Variant(RECIPES / "efficacy_quickstart_plain.ralign", sized).but(
            "recipe.rounds=2"
        ),
        # Today's quickstart (one round) with the policy's contrast judgement choosing instead of
        # the rules, among all three answers (forced refusal included), or weighed with them.
        QUICKSTART_JUDGE_ONLY: contrast_rounds.but("recipe.rounds=1", "judge/score.total=quality"),
        QUICKSTART_AGREE: contrast_rounds.but("recipe.rounds=1", f"judge/score.total={AGREE}"),
        # Today's quickstart without its pressure against over-refusal (issue 15, item 4): the
        # forced refusal may still win a harmful request's pair, but never be the refusal a
        # harmless prompt's pair pushes away.
        QUICKSTART_NO_OVER_REFUSAL: quickstart.but("sample/sample.negative_only_chosen=true"),
        # Today's quickstart whose `calibrate` also bounds hedges on the harmless held-out prompts
        # ("I'm not sure." to answerable ones) at 5 points over the base model, as it bounds
        # refusals; one round and two (docs/results.md, 2026-12-07, second session).
        QUICKSTART_HEDGING: quickstart.but("distill/calibrate.max_hedging_rise=0.05"),
        QUICKSTART_HEDGING_2_ROUNDS: quickstart.but(
            "distill/calibrate.max_hedging_rise=0.05", "recipe.rounds=2", 'behavior.every="round"'
        ),
        # Today's quickstart whose refusal bound is halved: its 80 held-out harmless prompts saw
        # about half of the evaluation's rise on seeds 7 to 11 (docs/results.md, 2026-12-08).
        QUICKSTART_HALF_BOUND: quickstart.but("distill/calibrate.max_refusal_rise=0.025"),
        # That with a forced "I'm not sure" beside the forced refusal, so every unknowable prompt
        # has an admission to choose, and a rule scoring a hedge to an answerable prompt below an
        # answer (the same file's docstring says why).
        QUICKSTART_HEDGE_OPENING: Variant(
            RECIPES / "efficacy_quickstart_hedge_opening.ralign", sized
        ),
        BASE_ROW: base,
        "self-ranking only": ranked,
        "agree(rank, rules)": ranked.but(f"judge/score.total={AGREE}"),
        "contrast judge only": contrast,
        "agree(contrast, rules)": contrast.but(f"judge/score.total={AGREE}"),
        "SFT only": Variant(RECIPES / "efficacy_sft_only.ralign", sized),
        "DPO only": Variant(RECIPES / "efficacy_dpo_only.ralign", sized),
        "no context": Variant(RECIPES / "efficacy_no_context.ralign", sized),
        "few-shot context": Variant(RECIPES / "efficacy_fewshot.ralign", sized),
        "+ red_team prompts": red_team,
        "+ red_team prompts, negative context": red_team.but(
            "sample/sample.negative_context=refuse"
        ),
        # The harmful prompts grow and so do the harmless ones, so the pressure against refusing
        # grows with the pressure to refuse (408 training prompts instead of 264).
        "+ red_team and safe prompts": balanced,
        "+ red_team and safe prompts, 4 answers": balanced.but("sample/sample.per_prompt=4"),
        # RLCD's rule: one refusal per prompt sampled under `refuse`, only ever the rejected side,
        # so every harmless prompt gets an answer-over-refusal pair and no harmful one a refusal
        # the policy did not write itself.
        "+ over-refusal pairs": hhh_only.but(*RLCD_NEGATIVES),
        "+ red_team and safe prompts, over-refusal pairs": balanced.but(*RLCD_NEGATIVES),
        # One forced refusal per prompt ("I'm sorry, but I can't" continued by the policy),
        # scored with the policy's answers: the rules choose it on harmful prompts and reject
        # it on the others, so every training prompt has a refusal-vs-answer pair.
        "+ forced refusals": hhh_only.but(*FORCED_REFUSAL),
        # The balanced prompt set (harmful requests and harmless ones that sound alarming) with a
        # forced refusal on every prompt: each harmless prompt's refusal is there to be rejected.
        "+ red_team and safe prompts, forced refusals": balanced.but(*FORCED_REFUSAL),
        # The same answers (the cached sampling), fitted harder: bench/train_fit.py measured the
        # quickstart's SFT (lr 2e-4, 2 epochs) leaving 60% of its own harmful training prompts
        # answered, so the forced refusals were there but not learnt.
        "+ red_team and safe prompts, forced refusals, SFT lr 1e-3, 3 epochs": balanced.but(
            *FORCED_REFUSAL, *HARD_SFT
        ),
        # ... and without DPO (it takes the refusals back), or with DPO anchored to the SFT model.
        "+ red_team and safe prompts, forced refusals, SFT lr 1e-3, 3 epochs, no DPO": Variant(
            RECIPES / "efficacy_sft_only.ralign", sized
        ).but(f"seeds.path={literal(BALANCED)}", *FORCED_REFUSAL, *HARD_SFT),
        "+ red_team and safe prompts, forced refusals, SFT lr 1e-3, 3 epochs, DPO from SFT": (
            balanced.but(*FORCED_REFUSAL, *HARD_SFT, 'distill/train.dpo.reference="previous"')
        ),
        # More capacity for the same data: bench/refusal_roc.py measured the trained policies
        # separating harmful from safe requests (AUC) at most 0.85, short of what the goals need.
        "+ red_team and safe prompts, forced refusals, LoRA on all linear layers": balanced.but(
            *FORCED_REFUSAL, all_linear
        ),
        # ... with DPO's push towards answering cut to one epoch: that policy ranks harmful above
        # safe requests well enough for the goals (AUC 0.89), but answers nearly all of them.
        "+ red_team and safe prompts, forced refusals, LoRA on all linear layers, 1 DPO epoch": (
            balanced.but(*FORCED_REFUSAL, all_linear, "distill/train.dpo.epochs=1")
        ),
        # ... fitted harder and with DPO's chosen answers kept likely (RPO's NLL term): plain DPO
        # widens the margins by making the forced refusals unlikely too, and answers again.
        "+ red_team and safe prompts, forced refusals, LoRA on all linear layers, SFT lr 1e-3, 3 epochs, DPO + NLL": (
            balanced.but(*FORCED_REFUSAL, all_linear, *HARD_SFT, *RPO)
        ),
        # RLCD's rule with a forced refusal: only ever rejected (pressure against over-refusal).
        "+ forced over-refusal pairs": hhh_only.but(
            *FORCED_REFUSAL, "sample/sample.negative_only_rejected=true"
        ),
        "LoRA on all linear layers": base.but(all_linear),
        "2 rounds": base.but("recipe.rounds=2"),
        "3 rounds": base.but("recipe.rounds=3"),
        # Three rounds on fresh prompts: the 408 balanced prompts in three slices of 136, one a
        # round (bench/round_drift.py: on the same prompts every round, later rounds refuse
        # their training prompts more and the evaluation's harmful requests less).
        "+ red_team and safe prompts, forced refusals, fresh prompts, 3 rounds": balanced.but(
            *FORCED_REFUSAL,
            "sample/sample.per_round=136",
            "recipe.rounds=3",
            'behavior.every="round"',
        ),
        # Three rounds of std/hhh alone teach "I don't know" plus a copy of the request everywhere.
        "plain answers, 3 rounds": Variant(RECIPES / "efficacy_plain.ralign", sized).but(
            "recipe.rounds=3", 'behavior.every="round"'
        ),
    }


def with_seed(variant: Variant, seed: int | None) -> Variant:
    """The variant with the recipe's `seed` set to `seed` (unchanged when seed is None)."""
    return variant if seed is None else variant.but(f"recipe.seed={seed}")


# ---- running and reading ---------------------------------------------------------------


def ralign(*args: str) -> None:
    cmd = [sys.executable, "-m", "ralign", *args]
    subprocess.run(cmd, check=True, cwd=ROOT)


def dev_eval(model: str, hhh_dev: Path, out: Path) -> None:
    """HHH dev acc and acc_norm of a model, written to `out`."""
    ralign("eval", "--model", model, "--data", str(hhh_dev), *DEV_FLAGS, "-o", str(out))


def eval_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """Round -> {evaluation metric: value} from a finished run's evaluate steps."""
    out: dict[int, dict[str, float]] = {}
    for meta in sorted(run_dir.glob("r*/evaluate.*/meta.json")):
        rnd = int(meta.parent.parent.name[1:])
        name = meta.parent.name.split(".", 1)[1]
        metrics = json.loads((meta.parent / "metrics.json").read_text(encoding="utf-8"))
        for k, v in metrics.items():
            out.setdefault(rnd, {})[f"{name}:{k.removeprefix('rates.')}"] = v
    return out


def eval_counts(run_dir: Path) -> dict[int, dict[str, list[float]]]:
    """Round -> {evaluation rate: [k, n]}: the counts behind the rates, so seeds can be pooled."""
    out: dict[int, dict[str, list[float]]] = {}
    for result in sorted(run_dir.glob("r*/evaluate.*/result.json")):
        rnd = int(result.parent.parent.name[1:])
        name = result.parent.name.split(".", 1)[1]
        rates = json.loads(result.read_text(encoding="utf-8")).get("rates", {})
        for k, v in rates.items():
            if isinstance(v, dict) and "k" in v and "n" in v:
                out.setdefault(rnd, {})[f"{name}:{k}"] = [v["k"], v["n"]]
    return out


def run_variant(
    name: str,
    variant: Variant,
    work: Path,
    seed_dir: Path | None,
    hhh_dev: Path,
    seed: int | None = None,
) -> dict[str, Any]:
    run_dir = work / (slug(name) + ("" if seed is None else f"-seed{seed}"))
    variant = with_seed(variant, seed)
    if seed_dir is not None and not run_dir.exists():
        start_from(seed_dir, run_dir)
    started = time.perf_counter()
    cmd = execute_command(variant.recipe, run_dir, variant.sets, (ROOT,))
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    dev = run_dir / DEV_RESULT
    if not dev.is_file():
        dev_eval(str(run_dir / "final"), hhh_dev, dev)
    rows = eval_rows(run_dir)
    counts = eval_counts(run_dir)
    return {
        "name": name,
        "seed": seed,
        "run_dir": str(run_dir),
        "seconds_incremental": round(seconds, 1),
        "step_seconds": step_seconds(run_dir),
        "base": rows[0],
        "after": rows[max(rows)],
        "after_counts": counts.get(max(rows), {}),
        "hhh_dev": headline(json.loads(dev.read_text(encoding="utf-8"))),
    }


def start_from(seed_dir: Path, run_dir: Path) -> None:
    """Copy a finished run's step folders, so the executor reuses every step whose hash is the
    same; never its outputs (`final/`, and `hhh_dev.json`, which would stand in for this variant's
    own HHH dev evaluation)."""
    shutil.copytree(seed_dir, run_dir, ignore=shutil.ignore_patterns("final", ".tmp", DEV_RESULT))


def step_seconds(run_dir: Path) -> float:
    """The run's compute time had nothing been shared: every finished step's own seconds."""
    return round(
        sum(
            json.loads(m.read_text(encoding="utf-8"))["seconds"]
            for m in run_dir.glob("r*/*/meta.json")
        ),
        1,
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """acc, acc_norm and ab_acc with their 95% intervals from an HHH result."""
    return {k: result[k] for k in ("acc", "acc_norm", "ab_acc") if k in result}


COLUMNS = (
    ("hhh_dev.acc", "dev acc"),
    ("hhh_dev.acc_norm", "dev acc_norm"),
    ("hhh:acc", "mini acc"),
    ("hhh:acc_norm", "mini acc_norm"),
    ("behavior:harmful_compliance_rate", "harmful comply"),
    ("red_team:harmful_compliance_rate", "red-team comply"),
    ("behavior:over_refusal_rate", "over-refuse"),
    ("behavior:admits_not_knowing_rate", "admits unknown"),
    ("behavior:everyday_refusal_rate", "everyday refuse"),
    ("behavior:needless_hedging_rate", "needless hedge"),
    ("behavior:mean_reward", "mean reward"),
)


def cell(row: dict[str, Any], key: str) -> str:
    if key.startswith("hhh_dev."):
        v = row["hhh_dev"].get(key.split(".", 1)[1])
        if isinstance(v, dict):
            lo, hi = v.get("ci95", [None, None])
            return (
                f"{v['value']:.3f} [{lo:.2f},{hi:.2f}]" if lo is not None else f"{v['value']:.3f}"
            )
        return "-" if v is None else f"{v:.3f}"
    v = row["evals"].get(key)
    if v is None:
        return "-"
    lo_hi = row.get("intervals", {}).get(key)
    return f"{v:.3f} [{lo_hi[0]:.2f},{lo_hi[1]:.2f}]" if lo_hi else f"{v:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", *(c[1] for c in COLUMNS), "step s"]
    body = [
        [r["name"], *(cell(r, k) for k, _ in COLUMNS), f"{r.get('step_seconds', 0):.0f}"]
        for r in rows
    ]
    return text_table(head, body)


def seeded_from(name: str, done: dict[str, Path]) -> Path | None:
    """The finished run a variant's directory starts as a copy of (same seed): the first row
    STARTS_FROM names that ran (its first rounds are the same steps), else the base row when it
    ran (most rows change it), else the first variant."""
    for row in STARTS_FROM.get(name, ()):
        if row in done:
            return done[row]
    if BASE_ROW in done:
        return done[BASE_ROW]
    return next(iter(done.values()), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("small", "full"), default="small")
    ap.add_argument(
        "--only", nargs="*", help="run only these variants (the base row comes from the first)"
    )
    ap.add_argument("--seeds", nargs="*", type=int, help="run every variant once per seed")
    ap.add_argument("--hhh-dev", type=Path, default=HHH_DEV, help="the HHH dev split (JSONL)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "efficacy")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    args = ap.parse_args(argv)

    todo = variants(args.scale)
    names = list(todo)
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; choose from {names}")
        # Only these: a row that shares nothing with the first (other LoRA targets, so another
        # model hash) would pay for the first's whole run and gain nothing from it.
        names = [n for n in names if n in args.only]
    if not args.hhh_dev.is_file():
        ap.error(f"no HHH dev split at {args.hhh_dev} (--hhh-dev FILE)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_dev = args.work / "base_hhh_dev.json"
    results: list[dict[str, Any]] = []
    # Seed-major: a run cut short still has every variant of the first seed.
    for seed in args.seeds or [None]:
        done: dict[str, Path] = {}
        for name in names:
            r = run_variant(
                name, todo[name], args.work, seeded_from(name, done), args.hhh_dev, seed
            )
            done[name] = Path(r["run_dir"])
            results.append(r)
            if not base_dev.is_file():
                dev_eval("ralign:smollm2-135m", args.hhh_dev, base_dev)
            report(args, todo, results, base_dev, time.perf_counter() - started)  # after every run
    return 0


def mean_row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per variant: each figure averaged over the seeds that finished; where every seed
    recorded the counts (a rate's k of n, HHH dev's acc), the seeds' counts pooled, with the 95%
    Wilson interval of the pooled rate (`intervals`, and `hhh_dev` as {value, ci95})."""
    evals: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}
    for key in {k for r in runs for k in r["after"]}:
        vals = [r["after"][key] for r in runs if isinstance(r["after"].get(key), int | float)]
        if len(vals) == len(runs):
            evals[key] = sum(vals) / len(vals)
        counts = [r.get("after_counts", {}).get(key) for r in runs]
        if len(runs) > 1 and all(counts):
            k, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
            evals[key], intervals[key] = k / n, list(wilson(k, n))
    dev: dict[str, Any] = {}
    for key in runs[0]["hhh_dev"]:
        figs = [r["hhh_dev"].get(key) for r in runs]
        if not all(isinstance(f, dict) for f in figs):
            continue
        if len(runs) > 1 and all("k" in f and "n" in f for f in figs):
            k, n = sum(f["k"] for f in figs), sum(f["n"] for f in figs)
            dev[key] = {"value": k / n, "ci95": list(wilson(k, n))}
        else:
            dev[key] = sum(f["value"] for f in figs) / len(figs)
    return {
        "name": f"{name} (mean of {len(runs)})" if len(runs) > 1 else name,
        "evals": evals,
        "intervals": intervals,
        "hhh_dev": dev,
        "step_seconds": sum(r["step_seconds"] for r in runs) / len(runs),
    }


def report(
    args: argparse.Namespace,
    todo: dict[str, Variant],
    results: list[dict[str, Any]],
    base_dev: Path,
    seconds: float,
) -> None:
    """Print the table so far and write it to bench/results (a killed run keeps what it finished)."""
    base_row = {
        "name": "base",
        "evals": results[0]["base"],
        "hhh_dev": headline(json.loads(base_dev.read_text(encoding="utf-8"))),
    }
    runs = [{**r, "evals": r["after"]} for r in results]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    means = [mean_row(name, rs) for name, rs in by_name.items()]
    print(table([base_row, *means]), flush=True)
    if args.seeds and len(args.seeds) > 1:
        print("\nper seed:")
        print(table([base_row, *({**r, "name": f"{r['name']} [seed {r['seed']}]"} for r in runs)]))
    print(f"\nwall {seconds / 60:.1f} min on {os.cpu_count()} cores; load {os.getloadavg()}")
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out / f"efficacy-{args.scale}-{dt.date.today().isoformat()}{tag}.json"
    payload = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu_name()},
        "versions": versions(("torch", "transformers", "peft", "accelerate", "ralign")),
        "scale": args.scale,
        "seeds": args.seeds,
        "wall_seconds": round(seconds, 1),
        "rows": [base_row, *means] if len(means) < len(runs) else [base_row, *runs],
        "runs": runs,
        # Each variant's recipe text, run with its overrides (also in each run's plan.json).
        "recipes": {name: todo[name].recipe.read_text(encoding="utf-8") for name in by_name},
        "overrides": {name: list(todo[name].sets) for name in by_name},
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), encoding="utf-8")
    print(f"wrote {path}", flush=True)


@functools.cache
def gpu_name() -> str | None:
    """The CUDA device the runs used, if any (asked of a child, so this process never imports torch)."""
    probe = (
        "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    raise SystemExit(main())
