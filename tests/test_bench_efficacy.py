"""bench/efficacy.py: its variants (recipe files and overrides) against the quickstart, and the
helpers that decide what a variant's run reuses and how seeds are averaged; bench/lora_sweep.py's
overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bench_module

from ralign import ir
from ralign.compile import compile_file
from ralign.ir import Var

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eff():
    return bench_module("efficacy")


def test_a_variant_reuses_steps_but_never_the_first_runs_results(eff, tmp_path):
    seed = tmp_path / "first"
    (seed / "r1" / "sample.sample").mkdir(parents=True)
    (seed / "r1" / "sample.sample" / "responses.jsonl").write_text("{}\n")
    (seed / "final").mkdir()
    (seed / "final" / "model.safetensors").write_text("weights")
    (seed / "hhh_dev.json").write_text('{"acc": {"value": 0.5}}')
    run = tmp_path / "variant"
    eff.start_from(seed, run)
    assert (run / "r1" / "sample.sample" / "responses.jsonl").read_text() == "{}\n"
    assert not (run / "final").exists()
    # Reusing it made every variant report the first one's HHH dev figures.
    assert not (run / "hhh_dev.json").exists()


def test_more_rounds_start_from_fewer_rounds_of_the_same_seed(eff, tmp_path):
    first, two = tmp_path / "qs", tmp_path / "two"
    assert eff.seeded_from("quickstart", {}) is None
    assert eff.seeded_from("SFT only", {"quickstart": first}) == first
    assert eff.seeded_from("3 rounds", {"quickstart": first}) == first
    assert eff.seeded_from("3 rounds", {"quickstart": first, "2 rounds": two}) == two
    assert eff.seeded_from("2 rounds", {"quickstart": first, "2 rounds": two}) == first
    # the rows that change the base start from it, not from the quickstart before it
    base = tmp_path / "base"
    assert eff.seeded_from("SFT only", {"quickstart": first, eff.BASE_ROW: base}) == base
    # today's quickstart for more rounds starts from its other-round rows, not from the base
    two, three = tmp_path / "two", tmp_path / "three"
    done = {eff.QUICKSTART_ROW: first, eff.BASE_ROW: base}
    assert eff.seeded_from(eff.QUICKSTART_ROUNDS, done) == first
    assert eff.seeded_from(eff.QUICKSTART_ROUNDS, {**done, eff.QUICKSTART_2_ROUNDS: two}) == two
    assert eff.seeded_from(eff.QUICKSTART_2_ROUNDS, {**done, eff.QUICKSTART_ROUNDS: three}) == three
    assert eff.seeded_from(eff.QUICKSTART_ROUNDS, {eff.BASE_ROW: base}) == base


def test_quickstart_rounds_rows_share_their_first_rounds(eff):
    """The 2- and 3-round rows are the quickstart row's steps, round for round, so each starts
    from another's run and computes only its later rounds."""
    rows = eff.variants()
    plans = [
        _plan(rows[n]) for n in (eff.QUICKSTART_ROW, eff.QUICKSTART_2_ROUNDS, eff.QUICKSTART_ROUNDS)
    ]
    assert [p.rounds for p in plans] == [1, 2, 3]

    def trained(plan, upto):  # every step but the evaluations, rounds 1..upto
        return {s.id: s.hash for s in plan.steps if 1 <= s.round <= upto and "evaluate" not in s.id}

    one, two, three = plans
    assert trained(one, 1) and trained(one, 1) == trained(two, 1) == trained(three, 1)
    assert trained(two, 2) == trained(three, 2) != trained(three, 3)
    # behaviour after every round, so a 3-round run has the 2-round row's evaluations too
    assert two.step("r1/evaluate/behavior").hash == three.step("r1/evaluate/behavior").hash


def test_the_whole_update_row_is_the_two_round_row_but_for_decay(eff):
    rows = eff.variants()
    whole, two = _plan(rows[eff.QUICKSTART_WHOLE]), _plan(rows[eff.QUICKSTART_2_ROUNDS])
    assert [s.id for s in two.steps] == [s.id for s in whole.steps]
    for a, b in zip(whole.steps, two.steps, strict=True):
        if a.kind == "calibrate":
            assert (a.params["decay"], b.params["decay"]) == (1.0, 0.5)
            assert {**a.params, "decay": 0.5} == b.params
        elif "calibrate" not in str(a.inputs) and a.round == 1:
            assert a.hash == b.hash, a.id  # round 1 trains alike; only calibrate's hash differs


def _plan(variant):
    return compile_file(variant.recipe, (ROOT,), sets=variant.sets)


def test_with_seed_sets_the_recipe_seed_and_nothing_else(eff):
    first = eff.variants()[eff.QUICKSTART_ROW]
    assert eff.with_seed(first, None) == first
    seeded = eff.with_seed(first, 11)
    assert seeded.sets == (*first.sets, "recipe.seed=11")
    plan, before = _plan(seeded), _plan(first)
    assert plan.seed == 11 and before.seed == 7
    assert [(s.id, s.params) for s in plan.steps] == [(s.id, s.params) for s in before.steps]


@pytest.mark.parametrize("scale", ["full", "small"])
def test_every_variant_compiles_and_changes_the_plan(eff, scale):
    plans = {name: _plan(variant) for name, variant in eff.variants(scale).items()}
    hashes = {name: plan.hash for name, plan in plans.items()}
    assert len(set(hashes.values())) == len(hashes), hashes
    for name, plan in plans.items():
        rounds = 3 if name.endswith("3 rounds") else 2 if name.endswith("2 rounds") else 1
        assert plan.rounds == rounds, name  # a variant's own rounds win over the scale's one
        assert plan.datasets["seeds"].get("limit") == (64 if scale == "small" else None), name


# Steps of each variant file that are the base's own (efficacy_quickstart.ralign, the quickstart
# until 2026-12-05): the same content hash means the same parameters, templates, rewards, inputs
# and seed. Everything downstream of what a variant changes differs, by design.
SAME_AS_BASE = {
    "efficacy_rank.ralign": ["sample/sample"],
    "efficacy_sft_only.ralign": ["sample/sample", "judge/score", "distill/train.sft"],
    "efficacy_dpo_only.ralign": ["sample/sample", "judge/score", "distill/pairs"],
    "efficacy_calibrated.ralign": ["sample/sample", "judge/score", "distill/pairs"],
    "efficacy_no_context.ralign": [],
}
# What a variant changes in the base's steps: a step gone, a new one, or attributes set to
# another value (None: absent). Every other step keeps its parameters (its inputs may differ).
CHANGED = {
    "efficacy_rank.ralign": {"judge/rank.quality": "new"},  # and `score { total = quality }`
    "efficacy_no_context.ralign": {
        "sample/sample": {"context": None},
        "distill/train.sft": {"drop_context": False},
    },
    "efficacy_sft_only.ralign": {"distill/pairs": "gone", "distill/train.dpo": "gone"},
    "efficacy_dpo_only.ralign": {"distill/train.sft": "gone"},
    "efficacy_calibrated.ralign": {"distill/train.sft": "gone", "distill/calibrate": "new"},
}


def evaluations(plan):
    """A plan's evaluations by name, without their source lines."""
    return {e["name"]: {k: v for k, v in e.items() if k != "line"} for e in plan.evaluations}


def _params(plan, step):
    """A step's parameters, its own file's templates (`FILE:name`) named alike in every file."""
    own = f"{plan.source}:"
    return {
        k: v.replace(own, "<recipe>:") if isinstance(v, str) else v for k, v in step.params.items()
    }


@pytest.mark.parametrize("file", sorted(SAME_AS_BASE))
def test_variant_files_are_the_base_but_for_their_change(eff, file):
    """bench/recipes/efficacy_*.ralign copy efficacy_quickstart.ralign: a change there must be
    made in them too, or this fails."""
    path = eff.RECIPES / file
    assert path.is_file()
    base, plan = compile_file(eff.BASE), compile_file(path)
    assert (plan.seed, plan.rounds, plan.policy) == (base.seed, base.rounds, "policy")
    assert plan.models == base.models and plan.datasets == base.datasets

    ours_evals, base_evals = evaluations(plan), evaluations(base)
    assert ours_evals == base_evals
    red_team = ours_evals["red_team"]
    assert (red_team["task"], red_team["data"]["path"]) == ("behavior", "ralign:seeds/red_team")
    ours = {s.id: s for s in plan.steps}
    theirs = {s.id: s for s in base.steps}
    # Round 0 evaluates the untrained model: the same in every variant.
    same = [f"r0/{i}" for i in ("evaluate/hhh", "evaluate/behavior", "evaluate/red_team")]
    same += [f"r1/{i}" for i in SAME_AS_BASE[file]]
    assert {i: ours[i].hash for i in same} == {i: theirs[i].hash for i in same}
    changed = CHANGED.get(file, {})
    for i, s in theirs.items():
        what = changed.get(i.split("/", 1)[1], {})
        if what == "gone":
            assert i not in ours
            continue
        want = {**_params(base, s), **what}
        assert _params(plan, ours[i]) == {k: v for k, v in want.items() if v is not None}, i
    assert {i.split("/", 1)[1] for i in ours} - {i.split("/", 1)[1] for i in theirs} == {
        k for k, v in changed.items() if v == "new"
    }


def test_the_quickstart_row_is_the_shipped_quickstart(eff):
    """What the first row measures is what recipes/quickstart.ralign does: the same steps and
    hashes, but for the row's red-team evaluation."""
    row = _plan(eff.variants()[eff.QUICKSTART_ROW])
    shipped = compile_file(eff.QUICKSTART)
    assert {s.id: s.hash for s in shipped.steps} == {
        s.id: s.hash for s in row.steps if "red_team" not in s.id
    }
    assert not any(s.kind == "train sft" for s in shipped.steps)
    assert row.step("r1/distill/train.dpo").params["nll_weight"] == 1.0
    # The row without calibrate trains the same policy and keeps it whole.
    whole = _plan(eff.variants()[eff.QUICKSTART_UNCALIBRATED])
    assert [s.id for s in whole.steps if s.round == 1 and s.kind != "evaluate"] == [
        "r1/sample/sample",
        "r1/judge/score",
        "r1/distill/pairs",
        "r1/distill/train.dpo",
    ]
    assert whole.step("r1/distill/train.dpo").hash == row.step("r1/distill/train.dpo").hash
    assert row.step("r1/evaluate/behavior").inputs["policy"] == "r1/distill/calibrate"


def test_the_contrast_row_is_the_quickstart_but_for_its_judge_and_rounds(eff):
    """The contrast recipe changes the quickstart's judging and nothing else it trains with: the
    same sampling (its first round reuses the quickstart's), pairs and DPO."""
    contrast = compile_file(eff.RECIPES / "efficacy_quickstart_contrast.ralign")
    one = compile_file(eff.QUICKSTART)
    assert (contrast.rounds, one.rounds) == (3, 1)
    assert contrast.models == one.models and contrast.datasets == one.datasets
    assert contrast.step("r1/sample/sample").hash == one.step("r1/sample/sample").hash
    for i in ("r1/distill/pairs", "r1/distill/train.dpo", "r1/distill/calibrate"):
        assert contrast.step(i).params == one.step(i).params, i
    rank = contrast.step("r1/judge/rank.quality").params
    assert rank["mode"] == "contrast" and rank["judge"] == "policy"
    total = contrast.step("r1/judge/score").exprs["total"]
    assert Var("quality") in set(ir.walk(total))
    small = _plan(eff.variants("small")[eff.QUICKSTART_CONTRAST])
    assert small.rounds == 3 and small.datasets["seeds"]["limit"] == 64


def test_the_implicit_row_is_the_quickstart_but_for_its_judge_and_rounds(eff):
    """The implicit recipe copies recipes/quickstart.ralign but for two rounds, every round's
    behaviour evaluation and one rank step added to its score: its first sampling is the
    quickstart's (reused), and from round 2 the judge is the policy as the round began, compared
    with the declared model."""
    mine = _plan(eff.variants()[eff.QUICKSTART_IMPLICIT])
    one = compile_file(eff.QUICKSTART)
    assert (mine.rounds, one.rounds) == (2, 1)
    assert mine.models == one.models and mine.datasets == one.datasets
    assert mine.step("r1/sample/sample").hash == one.step("r1/sample/sample").hash
    for i in (
        "r1/sample/sample",
        "r1/distill/pairs",
        "r1/distill/train.dpo",
        "r1/distill/calibrate",
    ):
        assert _params(mine, mine.step(i)) == _params(one, one.step(i)), i
    for r, judge in ((1, "model:policy"), (2, "r1/distill/calibrate")):
        rank = mine.step(f"r{r}/judge/rank.self")
        assert rank.params["mode"] == "implicit" and "template" not in rank.params
        assert rank.inputs["judge"] == judge and rank.inputs["reference"] == "model:policy"
    walked = set(ir.walk(mine.step("r1/judge/score").exprs["total"]))
    assert Var("self") in walked and Var("self") not in set(
        ir.walk(one.step("r1/judge/score").exprs["total"])
    )
    assert [s.id for s in mine.steps if s.kind == "evaluate" and s.name == "behavior"] == [
        "r0/evaluate/behavior",
        "r1/evaluate/behavior",
        "r2/evaluate/behavior",
    ]


def test_the_plain_row_is_the_implicit_row_but_for_needless_hedges_from_round_2(eff):
    """Round 1 of the plain row is the implicit row's in everything but its score expression,
    which from round 2 adds the `plain` reward (and its rule only scores hedges to answerable
    requests): the same steps, models, data and round-1 sampling and judging."""
    plain = _plan(eff.variants()[eff.QUICKSTART_IMPLICIT_PLAIN])
    implicit = _plan(eff.variants()[eff.QUICKSTART_IMPLICIT])
    assert [s.id for s in plain.steps] == [s.id for s in implicit.steps]
    assert plain.models == implicit.models and plain.datasets == implicit.datasets
    for i in ("r1/sample/sample", "r1/judge/rank.self"):
        assert plain.step(i).hash == implicit.step(i).hash, i
    for s in plain.steps:
        if s.kind != "score":
            assert _params(plain, s) == _params(implicit, implicit.step(s.id)), s.id
    total = plain.step("r1/judge/score").exprs["total"]
    walked = set(ir.walk(total))
    assert Var("round") in walked and Var("self") in walked
    assert any(isinstance(x, ir.RewardRef) and x.qname.endswith(":plain") for x in walked)
    plain_reward = next(r for q, r in plain.programs.rewards.items() if q.endswith(":plain"))
    assert [r.name for r in plain_reward.rules] == ["needless_hedge"]


def test_the_last_round_row_is_the_plain_row_but_for_round_two_s_hedging_bound(eff):
    """Round 1 of the row is the implicit-plain row's, hash for hash (its bound is off there),
    and round 2 differs only in calibrate bounding hedges from the round's start."""
    last = _plan(eff.variants()[eff.QUICKSTART_IMPLICIT_LAST])
    plain = _plan(eff.variants()[eff.QUICKSTART_IMPLICIT_PLAIN])
    assert [s.id for s in last.steps] == [s.id for s in plain.steps]
    differ = [s.id for s in last.steps if s.hash != plain.step(s.id).hash]
    assert differ == ["r2/distill/calibrate", "r2/evaluate/hhh", "r2/evaluate/behavior"]
    got = last.step("r2/distill/calibrate").params
    assert got == {**plain.step("r2/distill/calibrate").params} | {
        "max_hedging_rise": 0,
        "hedging_relative_to": "round_start",
    }
    assert got["relative_to"] == "base"  # refusals still from the declared model


def test_the_plain_control_is_the_plain_row_without_the_judge(eff):
    """The control has the plain row's steps less its rank step, with the same parameters, and
    its score is the plain row's without `self`."""
    control = _plan(eff.variants()[eff.QUICKSTART_PLAIN])
    plain = _plan(eff.variants()[eff.QUICKSTART_IMPLICIT_PLAIN])
    assert [s.id for s in control.steps] == [s.id for s in plain.steps if s.kind != "rank"]
    assert control.step("r1/sample/sample").hash == plain.step("r1/sample/sample").hash
    for s in control.steps:
        if s.kind != "score":
            assert _params(control, s) == _params(plain, plain.step(s.id)), s.id
    walked = set(ir.walk(control.step("r2/judge/score").exprs["total"]))
    assert Var("round") in walked and Var("self") not in walked


def test_the_opposite_row_is_the_contrast_row_but_for_its_opposite_and_rounds(eff):
    """Its `opposite` is the contrast recipe's own principle negated, and nothing else changes:
    the same first sampling, the same judge otherwise."""
    common = bench_module("common")
    bare = _plan(eff.variants()[eff.QUICKSTART_CONTRAST])
    opposed = _plan(eff.variants()[eff.QUICKSTART_OPPOSITE])
    assert (bare.rounds, opposed.rounds) == (3, 2)
    rank, rank_opposed = (p.step("r1/judge/rank.quality").params for p in (bare, opposed))
    assert rank["principle"] == common.HHH and "opposite" not in rank
    assert rank_opposed == {**rank, "opposite": common.HHH_NOT}
    assert opposed.step("r1/sample/sample").hash == bare.step("r1/sample/sample").hash
    assert opposed.step("r1/judge/rank.quality").hash != bare.step("r1/judge/rank.quality").hash


def test_the_two_round_quickstart_is_the_quickstart_but_for_rounds_and_calibrate(eff):
    """bench/recipes/efficacy_rounds_confident.ralign copies recipes/quickstart.ralign: a change
    there must be made in it too, or this fails."""
    one = compile_file(eff.QUICKSTART)
    two = compile_file(eff.RECIPES / "efficacy_rounds_confident.ralign")
    assert (one.rounds, two.rounds, one.seed) == (1, 2, two.seed)
    assert one.models == two.models
    assert evaluations(one) == evaluations(two)
    assert {k: v for k, v in two.datasets.items() if k != "harmless"} == one.datasets
    for i in ("sample/sample", "judge/score", "distill/pairs", "distill/train.dpo"):
        assert two.step(f"r1/{i}").hash == one.step(f"r1/{i}").hash, i
    cal1, cal2 = one.step("r1/distill/calibrate").params, two.step("r1/distill/calibrate").params
    differ = ("data", "confidence", "decay")  # measured before `decay`: it kept whole updates
    assert {k: v for k, v in cal2.items() if k not in differ} == {
        k: v for k, v in cal1.items() if k not in differ
    }
    assert (cal1["confidence"], cal2["confidence"]) == (0.5, 0.95)
    assert (cal1["decay"], cal2["decay"]) == (0.5, 1.0)
    assert cal2["data"]["path"] == [
        "ralign:seeds/hhh",
        "ralign:seeds/safe",
        "ralign:seeds/calibration",
    ]
    assert two.step("r2/distill/calibrate").inputs["baseline"] == "model:policy"  # the base


def test_self_ranking_rows_score_by_the_rank(eff):
    rows = eff.variants()
    alone, agree = _plan(rows["self-ranking only"]), _plan(rows["agree(rank, rules)"])
    assert alone.step("r1/judge/rank.quality").params["orders"] == 2
    assert (
        alone.step("r1/judge/score").exprs["total"] != agree.step("r1/judge/score").exprs["total"]
    )
    assert rows["agree(rank, rules)"].sets == (f"judge/score.total={eff.AGREE}",)


def test_lora_targets_keeps_the_recipes_adapter_on_other_layers(eff):
    flag = eff.lora_targets(eff.BASE, ["all-linear"])
    assert (
        flag == 'policy.lora={ rank = 16, alpha = 32.0, dropout = 0.0, targets = ["all-linear"] }'
    )
    plan = compile_file(eff.BASE, (ROOT,), sets=(flag,))
    want = {**compile_file(eff.BASE).models["policy"]["lora"], "targets": ["all-linear"]}
    assert plan.models["policy"]["lora"] == want
    with pytest.raises(ValueError, match="no LoRA"):
        eff.lora_targets(ROOT / "recipes" / "constitutional_sl.ralign", ["all-linear"])


def test_the_rpo_row_adds_the_nll_term_to_the_fitted_all_linear_row(eff):
    rows = eff.variants()
    name = "+ red_team and safe prompts, forced refusals, LoRA on all linear layers"
    rpo = _plan(rows[name + ", SFT lr 1e-3, 3 epochs, DPO + NLL"])
    plain = _plan(rows[name])
    assert rpo.step("r1/distill/train.dpo").params["nll_weight"] == 1.0
    assert "nll_weight" not in plain.step("r1/distill/train.dpo").params
    assert rpo.step("r1/distill/train.sft").params["lr"] == 1e-3
    # the same sampled answers: a new row costs training and evaluations only
    assert rpo.step("r1/sample/sample").hash == plain.step("r1/sample/sample").hash
    # recipes/balanced_hhh.ralign is this row, minus its red-team evaluation: what the row
    # measured is what the shipped recipe does
    shipped = compile_file(ROOT / "recipes" / "balanced_hhh.ralign")
    assert {s.id: s.hash for s in shipped.steps} == {
        s.id: s.hash for s in rpo.steps if "red_team" not in s.id
    }


def test_mean_row_averages_each_figure_over_seeds(eff):
    def run(acc, harmful, dev, seconds, extra=None):
        after = {"hhh:acc": acc, "behavior:harmful_compliance_rate": harmful, **(extra or {})}
        return {"after": after, "hhh_dev": {"acc": {"value": dev}}, "step_seconds": seconds}

    row = eff.mean_row("q", [run(0.5, 0.25, 0.4, 100), run(0.75, 0.5, 0.6, 200, {"x": 1.0})])
    assert row["name"] == "q (mean of 2)"
    assert row["evals"] == {"hhh:acc": 0.625, "behavior:harmful_compliance_rate": 0.375}  # no "x"
    assert row["hhh_dev"] == {"acc": pytest.approx(0.5)}
    assert row["step_seconds"] == 150
    assert eff.mean_row("q", [run(0.5, 0.25, 0.4, 100)])["name"] == "q"


def test_mean_row_pools_the_seeds_counts_with_an_interval(eff):
    def run(k, dev_k):
        return {
            "after": {"behavior:harmful_compliance_rate": k / 80},
            "after_counts": {"behavior:harmful_compliance_rate": [k, 80]},
            "hhh_dev": {"acc": {"value": dev_k / 115, "k": dev_k, "n": 115}},
            "step_seconds": 1,
        }

    row = eff.mean_row("q", [run(8, 50), run(16, 51), run(24, 52)])
    # 48 of 240 pooled; Wilson by hand: p = 0.2, z = 1.96, centre (0.2 + 1.96^2 / 480) / (1 +
    # 1.96^2 / 240) = 0.20473, half 1.96 * sqrt(0.2 * 0.8 / 240 + 1.96^2 / 4 / 240^2) / 1.01601
    # = 0.05043
    assert row["evals"]["behavior:harmful_compliance_rate"] == pytest.approx(0.2)
    low, high = row["intervals"]["behavior:harmful_compliance_rate"]
    assert (low, high) == (pytest.approx(0.1543, abs=1e-4), pytest.approx(0.2552, abs=1e-4))
    assert row["hhh_dev"]["acc"]["value"] == pytest.approx(153 / 345)
    assert eff.cell(row, "behavior:harmful_compliance_rate") == "0.200 [0.15,0.26]"
    # one seed: its own figure, no pooled interval
    assert eff.mean_row("q", [run(8, 50)])["intervals"] == {}


def test_lora_sweep_variants_compile_and_share_samples_where_they_should():
    sweep = bench_module("lora_sweep")
    samples = {}
    for name, sets in sweep.variants().items():
        plan = compile_file(sweep.QUICKSTART, (ROOT,), sets=sets)
        assert plan.overrides == sets
        assert plan.step("r1/sample/sample").params["batch_size"] == 128
        samples[name] = plan.step("r1/sample/sample").hash
        lr = {k: plan.step(f"r1/distill/train.{k}").params["lr"] for k in ("sft", "dpo")}
        assert lr == {
            "all linear, DPO lr 5e-5": {"sft": 2e-4, "dpo": 5e-5},
            "all linear, SFT 1e-4, DPO 1e-4": {"sft": 1e-4, "dpo": 1e-4},
            "all linear, SFT 1e-4, DPO 5e-5": {"sft": 1e-4, "dpo": 5e-5},
        }.get(name, {"sft": 2e-4, "dpo": 2e-4})
    # Every all-linear row answers the same samples; the q,v row has its own model, so its own.
    assert len({h for n, h in samples.items() if n.startswith("all linear")}) == 1
    assert samples["q,v (the quickstart until 2026-12-05)"] != samples["all linear"]


def test_the_ablation_of_over_refusal_pairs_is_the_quickstart_but_for_one_flag(eff):
    """ "quickstart without over-refusal pairs": the same answers (one flag more on the sampling
    step, whose generation is unchanged) and the same scoring, pairs and training."""
    one = _plan(eff.variants()[eff.QUICKSTART_ROW])  # today's quickstart (its hashes: a test)
    ablated = _plan(eff.variants()[eff.QUICKSTART_NO_OVER_REFUSAL])
    assert ablated.rounds == one.rounds == 1
    mine, theirs = ablated.step("r1/sample/sample").params, one.step("r1/sample/sample").params
    assert mine == {**theirs, "negative_only_chosen": True}
    assert theirs["negative_prefix"] and "negative_only_rejected" not in theirs
    for i in ("r1/judge/score", "r1/distill/pairs", "r1/distill/train.dpo", "r1/distill/calibrate"):
        assert ablated.step(i).params == one.step(i).params, i


def test_the_hedging_rows_are_the_quickstart_but_for_calibrates_second_bound(eff):
    """ "quickstart with a hedging bound" (one round, and two): the quickstart's sampling, scoring,
    pairs and training, step for step; only `calibrate` also bounds hedges."""
    one = _plan(eff.variants()[eff.QUICKSTART_ROW])
    hedging = _plan(eff.variants()[eff.QUICKSTART_HEDGING])
    two = _plan(eff.variants()[eff.QUICKSTART_HEDGING_2_ROUNDS])
    assert (hedging.rounds, two.rounds) == (1, 2)
    for i in ("r1/sample/sample", "r1/judge/score", "r1/distill/pairs", "r1/distill/train.dpo"):
        assert hedging.step(i).hash == one.step(i).hash == two.step(i).hash, i
    cal = one.step("r1/distill/calibrate").params
    assert cal["max_hedging_rise"] == 1  # the quickstart bounds refusals only
    for plan in (hedging, two):
        assert plan.step("r1/distill/calibrate").params == {**cal, "max_hedging_rise": 0.05}
    assert two.step("r2/distill/calibrate").params["max_hedging_rise"] == 0.05


def test_the_judge_rows_are_the_quickstart_but_for_their_total(eff):
    """The rows "contrast judge only" and "agree(contrast, rules)" on today's quickstart: one
    round, its sampling and training; only the score's total differs (the judge alone, or weighed
    with the rules by learned agreement)."""
    one = compile_file(eff.QUICKSTART)
    only = _plan(eff.variants()[eff.QUICKSTART_JUDGE_ONLY])
    agree = _plan(eff.variants()[eff.QUICKSTART_AGREE])
    assert only.rounds == agree.rounds == 1
    assert only.step("r1/sample/sample").hash == one.step("r1/sample/sample").hash
    assert only.step("r1/judge/rank.quality").hash == agree.step("r1/judge/rank.quality").hash
    assert only.step("r1/judge/score").exprs["total"] == Var("quality")
    total = agree.step("r1/judge/score").exprs["total"]
    assert total == ir.Agree(
        (Var("quality"), *(ir.RewardRef(f"std/hhh:{p}") for p in ("helpful", "honest", "harmless")))
    )
    for i in ("r1/distill/pairs", "r1/distill/train.dpo", "r1/distill/calibrate"):
        assert only.step(i).params == one.step(i).params == agree.step(i).params, i


def test_the_no_hedge_row_is_the_opposite_row_but_for_its_pressure_against_hedging(eff):
    """ "quickstart + forced hedges + ...": the judge-against-its-opposite row, two rounds, with a
    second forced opening, a penalty for needless hedges in the total and pairs against every
    answer the best one beats; its judge, training and calibration are that row's."""
    opposed = _plan(eff.variants()[eff.QUICKSTART_OPPOSITE])
    hedged = _plan(eff.variants()[eff.QUICKSTART_NO_HEDGE])
    assert hedged.rounds == opposed.rounds == 2

    def same(step):
        return _params(hedged, hedged.step(step)), _params(opposed, opposed.step(step))

    mine, theirs = same("r1/sample/sample")
    assert theirs["negative_prefix"] == "I'm sorry, but I can't"
    assert mine == {**theirs, "negative_prefix": ["I'm sorry, but I can't", "I'm not sure"]}
    for name in ("careful", "refuse"):
        mine, theirs = (p.templates[f"{p.source}:{name}"]["text"] for p in (hedged, opposed))
        assert mine == theirs, name
    mine, theirs = same("r1/distill/pairs")
    assert mine == {**theirs, "rejected": "all"}
    mine, theirs = same("r1/distill/train.dpo")
    assert mine == {**theirs, "epochs": 1}  # about 2.7 times the pairs
    for i in ("r1/judge/rank.quality", "r2/distill/calibrate"):
        mine, theirs = same(i)
        assert mine == theirs, i

    def rewards(plan):
        walked = ir.walk(plan.step("r1/judge/score").exprs["total"])
        return {n.qname.split(":")[-1] for n in walked if isinstance(n, ir.RewardRef)}

    assert rewards(hedged) == rewards(opposed) | {"hedging"}


@pytest.mark.parametrize(
    ("row", "of", "kind", "change"),
    [
        # one pair per source of answers
        ("QUICKSTART_EACH_SOURCE", "QUICKSTART_NO_HEDGE", "pairs", {"rejected": "each_source"}),
        # four answers of the policy's own per prompt instead of two
        ("QUICKSTART_OWN_REFUSALS", "QUICKSTART_EACH_SOURCE", "sample", {"per_prompt": 4}),
    ],
)
def test_a_row_is_another_but_for_one_step(eff, row, of, kind, change):
    """The row's steps are the other row's, and only the `kind` step's params change."""
    theirs_plan = _plan(eff.variants()[getattr(eff, of)])
    mine_plan = _plan(eff.variants()[getattr(eff, row)])
    assert [s.id for s in mine_plan.steps] == [s.id for s in theirs_plan.steps]
    changed = 0
    for step in mine_plan.steps:
        mine, theirs = _params(mine_plan, step), _params(theirs_plan, theirs_plan.step(step.id))
        if step.kind == kind:
            assert mine == {**theirs, **change} != theirs, step.id
            changed += 1
        else:
            assert mine == theirs, step.id
    assert changed == 2  # the step of each of the two rounds


def test_the_half_bound_row_is_the_quickstart_but_for_its_refusal_bound(eff):
    """Only `calibrate` (and what evaluates its policy) differs from the quickstart row: its
    sampling, pairs and training are reused, and its bound is half the quickstart's."""
    half = _plan(eff.variants()[eff.QUICKSTART_HALF_BOUND])
    row = _plan(eff.variants()[eff.QUICKSTART_ROW])
    assert [s.id for s in half.steps] == [s.id for s in row.steps]
    differ = [s.id for s in half.steps if s.hash != row.step(s.id).hash]
    assert differ[0] == "r1/distill/calibrate"
    assert all(i.startswith("r1/evaluate/") for i in differ[1:])
    got, theirs = (p.step("r1/distill/calibrate").params for p in (half, row))
    assert theirs["max_refusal_rise"] == 0.05
    assert got == theirs | {"max_refusal_rise": 0.025}


def test_the_hedge_opening_row_is_the_quickstart_but_for_its_hedges_and_bound(eff):
    """The probe's recipe is the shipped quickstart with a second forced opening, a needless-
    hedge reward in its score and the halved bound; pairs and DPO keep their parameters."""
    mine = compile_file(eff.RECIPES / "efficacy_quickstart_hedge_opening.ralign")
    one = compile_file(eff.QUICKSTART)
    assert (mine.seed, mine.rounds, mine.models, mine.datasets) == (
        one.seed,
        one.rounds,
        one.models,
        one.datasets,
    )
    assert evaluations(mine) == evaluations(one)
    sample = _params(mine, mine.step("r1/sample/sample"))
    assert sample["negative_prefix"] == [
        _params(one, one.step("r1/sample/sample"))["negative_prefix"],
        "I'm not sure",
    ]
    assert {k: v for k, v in sample.items() if k != "negative_prefix"} == {
        k: v
        for k, v in _params(one, one.step("r1/sample/sample")).items()
        if k != "negative_prefix"
    }
    for i in ("r1/distill/pairs", "r1/distill/train.dpo"):
        assert _params(mine, mine.step(i)) == _params(one, one.step(i)), i
    assert mine.step("r1/distill/calibrate").params == one.step("r1/distill/calibrate").params | {
        "max_refusal_rise": 0.025
    }

    def rewards(plan):
        total = plan.step("r1/judge/score").exprs["total"]
        return {
            n.qname.replace(plan.source, "<recipe>")
            for n in ir.walk(total)
            if isinstance(n, ir.RewardRef)
        }

    assert rewards(mine) == rewards(one) | {"<recipe>:hedging"}
