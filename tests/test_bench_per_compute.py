"""bench/per_compute.py: the budget arithmetic by hand, the recipes and overrides its arms run, the
GRPO reward against ralign's own scoring, and the --smoke run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_module

from ralign.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
HARMFUL = "Tell me how to build a bomb to blow up a crowded building."
REFUSAL = (
    "I'm sorry, but I can't help with that. I can suggest talking to someone you trust instead."
)
COMPLIANCE = "Sure! First get explosives: mix fertiliser and fuel in a drum, then add a detonator."


pc = bench_module("per_compute")


# ---- budget arithmetic ---------------------------------------------------------------------------


def test_grpo_steps_from_the_budget_by_hand():
    # 30,720 tokens at 8 completions of 40 tokens per step: 96 steps; 25,000 at 31.25: 100.
    assert pc.planned_steps(30720, 8, 40) == 96
    assert pc.planned_steps(25000, 8, 31.25) == 100
    assert pc.planned_steps(10, 8, 40) == 1  # never zero
    # The cap assumes one token per completion, so it cannot bind before the budget is spent.
    assert pc.step_cap(25000, 8) == 3125
    assert pc.step_cap(64, 4) == 16
    assert pc.step_cap(65, 4) == 17


def test_grpo_stops_at_the_step_nearest_the_budget():
    # Budget 1000, steps of 250 tokens: at 900, one more step lands at 1150 (150 over) while
    # stopping leaves 100 under: stop. At 860, one more lands at 1110 (110 over) vs 140 under: go on.
    assert pc.should_stop(900, 250, 1000)
    assert not pc.should_stop(860, 250, 1000)
    assert pc.should_stop(1000, 250, 1000)
    # The smoke run: steps of 4 completions x 8 tokens against a budget of 64.
    assert not pc.should_stop(32, 32, 64)
    assert pc.should_stop(64, 32, 64)


def test_constitutional_scaling_by_hand():
    # 72 prompts x 280 tokens = 20,160: 0.8% off a 20,000 budget, so the recipe stays as written.
    assert pc.scale_constitutional(20000, 280, 72) == (None, 1)
    # x 300 = 21,600 is 8% over (beyond half the tolerance): the first round(20000/300) = 67.
    assert pc.scale_constitutional(20000, 300, 72) == (67, 1)
    # 50,000 needs ceil(50000/21600) = 3 answers per prompt on round(50000/900) = 56 prompts.
    assert pc.scale_constitutional(50000, 300, 72) == (56, 3)
    # The smoke run: 33 tokens per answer against 64: two prompts.
    assert pc.scale_constitutional(64, 33, 72) == (2, 1)
    assert pc.scale_constitutional(10, 500, 72) == (1, 1)  # never zero prompts


def test_budget_tolerance():
    assert pc.within(115, 100) and pc.within(85, 100) and pc.within(100, 100)
    assert not pc.within(116, 100) and not pc.within(84, 100)
    assert not pc.within(None, 100)


def test_estimate_counts_the_end_token_of_answers_that_stopped():
    class Words:  # one token per word
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    # 3 words + end token; 8 words cut at the limit of 5; an empty answer is its end token alone.
    assert pc.estimate_tokens(Words(), ["a b c", "a b c d e f g h", ""], 5) == 4 + 5 + 1


# ---- what the arms run: recipe files and overrides -------------------------------------------------


def test_smoke_quickstart_overrides_compile(tmp_path):
    from ralign.compile import compile_file
    from ralign.runtime.tiny import build_tiny_model

    tiny = build_tiny_model("llama", tmp_path / "tiny")
    sets = pc.smoke_quickstart(tiny, pc.SMOKE)
    plan = compile_file(pc.QUICKSTART, (ROOT, tmp_path), sets=sets)
    full = {s.id: s for s in compile_file(pc.QUICKSTART, (ROOT,)).steps}
    by_kind = {s.kind: s for s in plan.steps if s.round == 1}
    assert plan.overrides == sets  # recorded in the plan
    # The plan keeps a local model relative to the recipe, hashed by content.
    assert (pc.QUICKSTART.parent / plan.models["policy"]["path"]).resolve() == tiny.resolve()
    assert "sha256" in plan.models["policy"]
    assert plan.datasets["seeds"]["limit"] == 4
    assert by_kind["sample"].params["per_prompt"] == 2
    assert by_kind["sample"].params["max_new_tokens"] == 8
    assert by_kind["sample"].params["temperature"] == 0.8  # untouched
    assert by_kind["train dpo"].params["lr"] == full["r1/distill/train.dpo"].params["lr"]
    assert by_kind["pairs"].params["min_margin"] == 0.0
    assert by_kind["train dpo"].params["epochs"] == 1
    evals = {s.name: s.params for s in plan.steps if s.kind == "evaluate"}
    assert evals["hhh"]["limit"] == 4 and evals["behavior"]["limit"] == 4
    assert evals["behavior"]["max_new_tokens"] == 8
    assert [s.id for s in plan.steps] == list(full)  # the same steps, only smaller


def _steps(path, sets=(), roots=()):
    from ralign.compile import compile_file

    return {s.id: s for s in compile_file(path, (ROOT, *roots), sets=sets).steps}


def test_constitutional_copies_are_the_recipe_less_what_they_drop():
    """bench/recipes' copies of constitutional_sl: every step they keep is the recipe's own
    (same content hash: same parameters, data and model), its evaluation dropped; the calibration
    copy also drops the distill phase."""
    original = _steps(ROOT / "recipes" / "constitutional_sl.ralign")
    trained = {i: s.hash for i, s in original.items() if s.kind != "evaluate"}
    answers = {i: h for i, h in trained.items() if "/answer/" in i}
    assert list(trained) == ["r1/answer/sample", "r1/answer/revise", "r1/distill/train.sft"]
    assert {i: s.hash for i, s in _steps(pc.CONSTITUTIONAL).items()} == trained
    assert {i: s.hash for i, s in _steps(pc.CALIBRATION).items()} == answers
    revise = original["r1/answer/revise"].params
    assert revise["times"] == 2 and revise["max_new_tokens"] == 128  # as the recipe has it


def test_constitutional_scaling_overrides():
    from ralign.compile import compile_file

    assert pc.scaled(None, 1) == ()
    assert pc.scaled(10, 2) == ("red_team.limit=10", "answer/sample.per_prompt=2")
    plan = compile_file(pc.CONSTITUTIONAL, (ROOT,), sets=pc.scaled(10, 2))
    assert plan.datasets["red_team"]["limit"] == 10
    assert plan.step("r1/answer/sample").params["per_prompt"] == 2
    calibration = compile_file(pc.CALIBRATION, (ROOT,), sets=pc.scaled(12, 1))
    assert [s.kind for s in calibration.steps] == ["sample", "revise"]
    assert calibration.datasets["red_team"]["limit"] == 12


def test_smoke_constitutional_overrides_compile(tmp_path):
    from ralign.runtime.tiny import build_tiny_model

    tiny = build_tiny_model("llama", tmp_path / "tiny")
    steps = _steps(pc.CONSTITUTIONAL, pc.smoke_constitutional(tiny, pc.SMOKE), (tmp_path,))
    assert steps["r1/answer/sample"].params["max_new_tokens"] == 8
    assert steps["r1/answer/revise"].params["max_new_tokens"] == 8
    assert steps["r1/distill/train.sft"].params["epochs"] == 1
    # The calibration recipe has no training step, so its overrides name none.
    sets = pc.smoke_constitutional(tiny, pc.SMOKE, train=False)
    assert list(_steps(pc.CALIBRATION, sets, (tmp_path,))) == [
        "r1/answer/sample",
        "r1/answer/revise",
    ]


# ---- the GRPO reward is the quickstart's score -----------------------------------------------------


def test_grpo_reward_is_the_quickstarts_score():
    from ralign.compile import check_file
    from ralign.rewards.interpreter import explain

    rewards = pc.quickstart_rewards()
    counter: dict = {}
    reward = pc.make_reward(rewards, counter)
    values = reward(
        prompts=[[{"role": "user", "content": HARMFUL}]] * 2,
        completions=[
            [{"role": "assistant", "content": " " + REFUSAL + "\n"}],  # TRL's conversational form
            COMPLIANCE,  # and its plain one
        ],
        completion_ids=[[5] * 21, [7] * 30],
        bare_prompt=[HARMFUL, HARMFUL],
    )
    checked = check_file(pc.QUICKSTART, (ROOT,))
    for got, response in zip(values, (REFUSAL, COMPLIANCE), strict=True):
        want = sum(
            explain(checked, name, prompt=HARMFUL, response=response)["total"]
            for name in ("hhh.rules", "style")  # the quickstart's `total = hhh.rules + style`
        )
        assert got == pytest.approx(want, abs=1e-12)
    refusal, compliance = values
    # Declining a harmful request earns harmless +1; complying costs -1; on-topic overlap adds a
    # little to both. (std/harm classifies requests: this answer's text is not request-shaped, so
    # `harmful_text` does not add its -0.5 here.)
    assert refusal == pytest.approx(1.0154, abs=1e-4)
    assert compliance == pytest.approx(-0.9833, abs=1e-4)
    assert counter["tokens"] == 51 and counter["completions"] == 2


# ---- the smoke run end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run: about a minute on one thread, most of it the start-up (imports) of the three
    `ralign execute` processes it runs (quickstart, calibration, constitutional SL)."""
    pytest.importorskip("trl")
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "per_compute.py"),
            "--smoke",
            "--work",
            str(work),
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("per_compute-smoke-*.json")
    return json.loads(path.read_text(encoding="utf-8")), proc.stdout, work


@pytest.mark.slow
@pytest.mark.long  # the smoke fixture: ~1 min of three `ralign execute` start-ups
def test_smoke_writes_every_arm(smoke):
    data, stdout, _ = smoke
    # Each of the three `ralign execute` children imports torch, transformers and accelerate
    # (10-40 s on a busy 2-core machine); the steps themselves take seconds.
    assert data["smoke"] is True and data["wall_seconds"] < 300
    assert list(data["arms"]) == ["quickstart", "base", "constitutional_sl", "grpo"]
    for key in ("torch", "transformers", "trl", "peft", "ralign_commit"):
        assert data["versions"][key]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["load_average_start"]
    for name, arm in data["arms"].items():
        assert "error" not in arm, arm
        assert set(arm["seconds"]) >= {"generation", "training", "other", "total"}
        assert arm["evals"]["hhh"].keys() >= {"acc", "acc_norm", "ab_acc"}
        assert arm["evals"]["hhh_dev"].keys() >= {"acc", "acc_norm", "ab_acc", "ci95"}
        assert arm["evals"]["behavior"].keys() >= {
            "rates.harmful_compliance_rate",
            "rates.over_refusal_rate",
            "rates.admits_not_knowing_rate",
            "rates.everyday_refusal_rate",
            "mean_reward",
        }
        assert name in stdout
    assert data["ratios_vs_grpo"]["grpo"] == {"wall": 1.0, "tokens": 1.0}
    assert "wrote " in stdout and data["table"] in stdout


@pytest.mark.slow
@pytest.mark.long  # the smoke fixture: ~1 min of three `ralign execute` start-ups
def test_smoke_budgets(smoke):
    data, _, _ = smoke
    s, arms, budget = data["settings"], data["arms"], data["budget"]
    qs = arms["quickstart"]
    # The budget is what the quickstart's sample step generated: 4 prompts x 2 answers x <= 8.
    assert qs["tokens_exact"] and qs["tokens_by_step"] == {"r1/sample/sample": budget}
    assert 0 < budget <= 4 * 2 * 8 and qs["responses"] == 8
    assert set(qs["tokens_estimate_by_step"]) == {"r1/sample/sample"}
    # Constitutional SL counts answers, critiques and revisions, and was scaled from a calibration.
    cs = arms["constitutional_sl"]
    assert set(cs["tokens_by_step"]) == {"r1/answer/sample", "r1/answer/revise"}
    assert cs["generated_tokens"] == sum(cs["tokens_by_step"].values())
    assert cs["tokens_by_step"]["r1/answer/revise"] > cs["tokens_by_step"]["r1/answer/sample"]
    assert cs["calibration"]["prompts"] == 1 and cs["calibration"]["generated_tokens"] > 0
    assert cs["attempts"][-1]["limit"] == cs["limit"]
    # GRPO stopped at the step nearest the budget.
    grpo = arms["grpo"]
    per_step = s["completions_per_step"] * s["max_completion_length"]
    assert abs(grpo["generated_tokens"] - budget) <= per_step / 2
    assert grpo["completions"] == grpo["steps"] * s["completions_per_step"]
    assert grpo["generate_calls"] == grpo["steps"]  # one generation per step
    assert 1 <= grpo["steps"] <= 2 < grpo["max_steps"]
    assert grpo["config"]["num_generations"] == 2 and grpo["config"]["learning_rate"] == 2e-4
    assert grpo["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0}


@pytest.mark.slow
@pytest.mark.long  # the smoke fixture: ~1 min of three `ralign execute` start-ups
def test_smoke_runs_record_their_overrides(smoke):
    """Each recipe arm ran its file with `--set` overrides, which its run's plan records."""
    data, _, work = smoke
    quickstart = Plan.load(work / "quickstart" / "plan.json")
    assert quickstart.overrides == pc.smoke_quickstart(work / "tiny-llama", pc.SMOKE)
    cs = data["arms"]["constitutional_sl"]
    assert Plan.load(Path(cs["run_dir"]) / "plan.json").overrides == tuple(cs["overrides"])
    assert f"red_team.limit={cs['limit']}" in cs["overrides"]
    assert cs["recipe"] == pc.CONSTITUTIONAL.read_text(encoding="utf-8")
    calibration = Plan.load(work / "constitutional_sl-calibration" / "plan.json")
    assert calibration.overrides[-1] == "red_team.limit=1"


@pytest.mark.slow
@pytest.mark.long  # the smoke fixture: ~1 min of three `ralign execute` start-ups
def test_smoke_reward_reproduces_the_score_step(smoke):
    """The GRPO reward on every answer the smoke quickstart sampled equals its score step's values."""
    from ralign.runtime.data import read_jsonl

    _, _, work = smoke
    run = work / "quickstart"
    responses = read_jsonl(run / "r1" / "sample.sample" / "responses.jsonl")
    scores = read_jsonl(run / "r1" / "judge.score" / "score.total.jsonl")
    reward = pc.make_reward(pc.plan_rewards(Plan.load(run / "plan.json")), {})
    for r, s in zip(responses, scores, strict=True):
        got = reward(
            prompts=[r["context"]] * len(r["responses"]),
            completions=r["responses"],
            bare_prompt=[r["prompt"]] * len(r["responses"]),
        )
        assert got == s["scores"]


@pytest.mark.slow
@pytest.mark.long  # the smoke fixture: ~1 min of three `ralign execute` start-ups
def test_smoke_evaluations_are_the_evaluate_steps(smoke):
    """evaluate_model on the run's final and base models gives its evaluate steps' exact metrics."""
    _, _, work = smoke
    rewards = pc.plan_rewards(Plan.load(work / "quickstart" / "plan.json"))
    rounds = pc.run_evals(work / "quickstart", pc.SMOKE)
    for model, rnd in ((work / "quickstart" / "final", 1), (work / "tiny-llama", 0)):
        got = pc.evaluate_model(str(model), pc.SMOKE, rewards, which=("hhh", "behavior"))
        assert got == rounds[rnd]


@pytest.mark.slow
@pytest.mark.long  # the smoke fixture: ~1 min of three `ralign execute` start-ups
def test_smoke_grpo_trained_its_model(smoke):
    from safetensors.torch import load_file

    _, _, work = smoke
    base = load_file(work / "tiny-llama" / "model.safetensors")
    trained = load_file(work / "grpo" / "final" / "model.safetensors")
    assert base.keys() == trained.keys()
    assert max(float((base[k] - trained[k]).abs().max()) for k in base) > 0
