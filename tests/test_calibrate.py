"""`calibrate`: the trained policy interpolated with the round's start (WiSE-FT), the largest weight
kept whose refusals of harmless held-out prompts rise at most `max_refusal_rise`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import execute_here, metrics
from safetensors.torch import load_file

from ralign.plan import PlanError, check_inputs, with_hashes
from ralign.runtime import calibrate as cal
from ralign.stats import Z95, paired_rise, wilson


@pytest.mark.parametrize(
    "spacing, expected",
    [
        (0.25, [1, 0.75, 0.5, 0.25, 0]),
        (0.3, [1, 0.7, 0.4, 0.1, 0]),
        (1, [1, 0]),
        (0.5, [1, 0.5, 0]),
    ],
)
def test_weights_run_from_one_down_to_zero(spacing: float, expected: list[float]) -> None:
    assert cal.weights(spacing) == expected


@pytest.mark.parametrize(
    "spacing, top, expected",
    [(0.25, 0.5, [0.5, 0.375, 0.25, 0.125, 0]), (0.5, 0.25, [0.25, 0.125, 0]), (1, 0.5, [0.5, 0])],
)
def test_a_smaller_top_scales_every_weight(
    spacing: float, top: float, expected: list[float]
) -> None:
    assert cal.weights(spacing, top) == expected


def _asked(answers: dict[float, int]):
    """A `tried` that refuses the first answers[w] of 80 prompts, and records the weights asked."""
    prompts = [f"p{i}" for i in range(80)]
    asked: list[float] = []

    def tried(w: float) -> dict[str, list[str]]:
        asked.append(w)
        return {"refused": prompts[: answers[w]]}

    return prompts, asked, tried


def _first(k: int, prompts: list[str]) -> dict[str, list[str]]:
    return {"refused": prompts[:k]}


def _choose(tried, prompts, start: int, baseline: int, spacing: float, rise: float, **kw):
    return cal.choose(
        tried,
        _first(start, prompts),
        _first(baseline, prompts),
        80,
        spacing,
        {"refused": rise},
        **kw,
    )


def test_the_largest_weight_within_the_bound_is_kept() -> None:
    # start refuses 3/80 = 0.0375; w=1 refuses 10/80 (+0.0875, over 0.05); w=0.75 6/80 (+0.0375)
    prompts, asked, tried = _asked({1: 10, 0.75: 6, 0.5: 4})
    weight, rows = _choose(tried, prompts, 3, 3, 0.25, 0.05)
    assert weight == 0.75
    assert asked == [1, 0.75]  # stops at the first that passes
    got = [(r["weight"], r["refused"]["k"], r["refused"]["passed"], r["passed"]) for r in rows]
    assert got == [(1, 10, False, False), (0.75, 6, True, True)]
    assert rows[1]["refused"]["rate"] == pytest.approx(0.075)
    low, high = rows[1]["refused"]["ci95"]
    assert low < 0.075 < high


def test_a_rise_exactly_at_the_bound_passes_and_none_allowed_falls_back_to_the_start() -> None:
    prompts, _, tried = _asked({1: 7})  # 3/80 -> 7/80 is +0.05 exactly
    assert _choose(tried, prompts, 3, 3, 0.25, 0.05)[0] == 1
    prompts, asked, tried = _asked({1: 4, 0.5: 4})
    weight, rows = _choose(tried, prompts, 3, 3, 0.5, 0.0)
    assert weight == 0 and asked == [1, 0.5]  # the start itself is never generated again
    assert (rows[-1]["weight"], rows[-1]["refused"]["k"], rows[-1]["passed"]) == (0.0, 3, True)


def test_the_bound_may_start_from_the_base_and_then_the_start_may_fail_it() -> None:
    # A later round: the start refuses 6/80, the base 2/80 (bound 0.025 + 0.05 = 6/80).
    prompts, asked, tried = _asked({1: 9, 0.5: 6})
    weight, rows = _choose(tried, prompts, 6, 2, 0.5, 0.05)
    assert (weight, asked, rows[-1]["passed"]) == (0.5, [1, 0.5], True)
    # Over the bound everywhere, the start included: the start is kept, and says it failed.
    prompts, asked, tried = _asked({1: 12, 0.5: 9})
    weight, rows = _choose(tried, prompts, 8, 2, 0.5, 0.05)
    assert (weight, [r["passed"] for r in rows]) == (0, [False, False, False])
    assert rows[-1]["refused"]["k"] == 8


def test_with_a_smaller_top_the_largest_weight_asked_is_the_top() -> None:
    prompts, asked, tried = _asked({0.5: 10, 0.375: 4})  # start 3/80: +0.0875, then +0.0125
    weight, rows = _choose(tried, prompts, 3, 3, 0.25, 0.05, top=0.5)
    assert (weight, asked) == (0.375, [0.5, 0.375])
    assert [r["weight"] for r in rows] == [0.5, 0.375]


def test_a_weight_passes_only_within_every_bound() -> None:
    # Refusals never rise (3/80 throughout); hedges rise 0/80 -> 12 (w=1), 6 (0.75), 3 (0.5).
    # Bounded at 5 points (4/80) the hedges decide: 0.5. Unbounded (1), weight 1 passes.
    prompts = [f"p{i}" for i in range(80)]
    hedged = {1: 12, 0.75: 6, 0.5: 3}

    def tried(w: float) -> dict[str, list[str]]:
        return {"refused": prompts[:3], "hedged": prompts[-hedged[w] :]}

    start = {"refused": prompts[:3], "hedged": []}
    both = {"refused": 0.05, "hedged": 0.05}
    weight, rows = cal.choose(tried, start, start, 80, 0.25, both)
    assert weight == 0.5
    assert [(r["refused"]["passed"], r["hedged"]["k"], r["passed"]) for r in rows] == [
        (True, 12, False),
        (True, 6, False),
        (True, 3, True),
    ]
    assert rows[0]["hedged"]["rise"] == pytest.approx(0.15)
    assert cal.choose(tried, start, start, 80, 0.25, {"refused": 0.05, "hedged": 1.0})[0] == 1
    # A count with no bound asked of it is not counted at all.
    assert "hedged" not in cal.choose(tried, start, start, 80, 0.25, {"refused": 0.05})[1][0]


def test_verdicts_count_a_hedge_only_where_the_answer_does_not_refuse(monkeypatch) -> None:
    answers = {
        "a": "I'm not sure.",  # a hedge
        "b": "I'm sorry, but I can't help with that. I'm not sure it is safe.",  # a refusal
        "c": "15% of 240 is 36.",  # an answer
    }
    monkeypatch.setattr(cal, "greedy_answers", lambda m, t, ps, **_: [answers[p] for p in ps])
    got = cal.verdicts(None, None, list(answers), max_new_tokens=8, batch_size=2)
    assert got == {"refused": ["b"], "hedged": ["a"]}


def test_paired_rise_by_hand() -> None:
    # 100 prompts: the base refuses 5, the model those 5 and 5 more (a=5, b=5, c=0, d=90).
    # Wilson 95% (z=1.96): 10/100 -> upper 0.174365 (0.074365 above 0.10); 5/100 -> lower
    # 0.021543 (0.028457 below 0.05). phi = (5*90 - 5*0) / sqrt(10*90*5*95) = 0.688248.
    # Upper = 0.05 + sqrt(0.074365^2 - 2*0.688248*0.074365*0.028457 + 0.028457^2) = 0.108541.
    assert paired_rise(10, 5, 5, 100, Z95) == pytest.approx((0.05, 0.108541), abs=2e-6)
    assert paired_rise(10, 5, 5, 100, 0.0) == pytest.approx((0.05, 0.05))
    # Pairing narrows the bound: the same rates refused by unrelated prompts (phi < 0) are wider.
    assert paired_rise(10, 5, 0, 100, Z95)[1] > 0.108541 + 0.02
    # More prompts, the same rates: a tighter bound.
    assert paired_rise(40, 20, 20, 400, Z95)[1] < 0.08


def test_with_confidence_a_rise_within_the_noise_does_not_pass() -> None:
    # 3/80 -> 7/80 is +0.05, at the bound: it passes as a measured rise; at 95% confidence on 80
    # prompts even one more refusal (+0.0125, upper bound 0.0517) does not, the same three do.
    prompts, asked, tried = _asked({1: 7, 0.75: 4, 0.5: 3})
    assert _choose(tried, prompts, 3, 3, 0.25, 0.05)[0] == 1
    weight, rows = _choose(tried, prompts, 3, 3, 0.25, 0.05, z=1.6449)
    assert weight == 0.5
    assert [r["refused"]["rise"] for r in rows] == pytest.approx([0.05, 0.0125, 0.0])
    assert rows[1]["refused"]["rise_upper"] == pytest.approx(0.0517, abs=1e-4)
    assert [r["passed"] for r in rows] == [False, False, True]


def test_interpolation_is_exact_at_both_ends() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 5)
    start = {k: torch.randn_like(v) for k, v in layer.named_parameters()}
    end = {k: torch.randn_like(v) * 1e-3 + 1e3 for k, v in layer.named_parameters()}
    for w, want in ((0.0, start), (1.0, end)):
        cal.interpolate(layer, start, end, w)
        for k, v in layer.named_parameters():
            assert torch.equal(v, want[k])
    cal.interpolate(layer, start, end, 0.25)
    assert torch.allclose(layer.weight, start["weight"] + 0.25 * (end["weight"] - start["weight"]))


RECIPE = """recipe "cal" { seed = 3 }
import "std/hhh"
model policy { path = "ralign:tiny-llama", max_length = 128, lora = { rank = 4, alpha = 8 } }
dataset seeds { path = ["ralign:seeds/hhh", "ralign:seeds/safe"] }
phase p {
  sample { from = seeds, per_prompt = 2, max_new_tokens = 6, per_round = 6, temperature = 1.0 }
  score { total = hhh.rules + 0.01 * words(response) }
  pairs { chosen = "best", rejected = "worst" }
  train dpo { lr = 0.01 }
CALIBRATE}
"""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_calibrate_saves_the_interpolated_policy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe, run = tmp_path / "cal.ralign", tmp_path / "run"
    recipe.write_text(RECIPE.replace("CALIBRATE", ""), encoding="utf-8")
    execute_here(recipe, run)
    trained = _weights(run / "final")
    base = _weights(tmp_path / "cache" / "models" / "tiny-llama")

    # A random tiny model never refuses: the whole update is kept, bit for bit.
    recipe.write_text(RECIPE.replace("CALIBRATE", "  calibrate { data = seeds }\n"), "utf-8")
    execute_here(recipe, run)
    assert metrics(run)["r1/p/calibrate"]["weight"] == 1
    assert all(torch.equal(v, trained[k]) for k, v in _weights(run / "final").items())

    # Refusing every harmless prompt at weight 1 and none at 0.75: 0.75 is kept, and saved.
    answers = iter([0, 80, 0])  # the start, weight 1, weight 0.75

    def verdicts(model, tok, prompts, **_):
        return {"refused": prompts[: next(answers)], "hedged": prompts[:1]}

    monkeypatch.setattr(cal, "verdicts", verdicts)
    recipe.write_text(
        RECIPE.replace(
            "CALIBRATE", "  calibrate { data = seeds, max_refusal_rise = 0.1, confidence = 0.95 }\n"
        ),
        "utf-8",
    )
    execute_here(recipe, run)
    got = metrics(run)["r1/p/calibrate"]
    assert got == {
        "weight": 0.75,
        "harmless_refusal": 0.0,
        "harmless_refusal_start": 0.0,
        "harmless_refusal_baseline": 0.0,
        "harmless_hedging": 1 / 80,
        "harmless_hedging_start": 1 / 80,
        "harmless_hedging_baseline": 1 / 80,
        "harmless_prompts": 80,  # held-out harmless rows: hhh 16 + 16, safe 32 + 16
    }
    record = json.loads((run / "r1" / "p.calibrate" / "calibration.json").read_text())
    assert [(r["weight"], r["refused"]["k"], r["passed"]) for r in record["tried"]] == [
        (1, 80, False),
        (0.75, 0, True),
    ]
    # At 95%: no refusal in 80 may still be a rise of up to Wilson's upper bound for 0 of 80.
    assert record["baseline"]["confidence"] == 0.95
    assert record["tried"][1]["refused"]["rise_upper"] == pytest.approx(wilson(0, 80, 1.6448536)[1])
    final = _weights(run / "final")
    changed = 0
    for k, v in final.items():
        assert torch.equal(v, torch.lerp(base[k], trained[k], 0.75)), k
        changed += not torch.equal(v, trained[k])
    assert changed > 0  # the LoRA update touched these weights, and a quarter of it is gone


def test_a_hedging_bound_steps_back_from_an_update_that_hedges(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe, run = tmp_path / "cal.ralign", tmp_path / "run"
    # No refusals anywhere; hedges: the start none, weight 1 on 8 of 80, weight 0.75 on 1 of 80.
    hedged = iter([0, 8, 1])

    def verdicts(model, tok, prompts, **_):
        return {"refused": [], "hedged": prompts[: next(hedged)]}

    monkeypatch.setattr(cal, "verdicts", verdicts)
    step = "  calibrate { data = seeds, max_hedging_rise = 0.02 }\n"
    recipe.write_text(RECIPE.replace("CALIBRATE", step), "utf-8")
    execute_here(recipe, run)
    got = metrics(run)["r1/p/calibrate"]
    assert (got["weight"], got["harmless_hedging"], got["harmless_refusal"]) == (0.75, 1 / 80, 0)
    record = json.loads((run / "r1" / "p.calibrate" / "calibration.json").read_text())
    assert [(r["refused"]["passed"], r["hedged"]["k"], r["passed"]) for r in record["tried"]] == [
        (True, 8, False),
        (True, 1, True),
    ]
    assert record["baseline"]["hedged"]["max_rise"] == 0.02
    said = "weight 0.75, of 80 harmless held-out prompts: refuses 0 (the round's start 0; rise"
    assert said in (log := (run / "run.log").read_text())
    assert "hedges on 1 (the round's start 0; rise +0.013)" in log


def test_a_plan_may_not_calibrate_on_an_evaluation_set(tmp_path: Path) -> None:
    from ralign.compile import compile_file

    recipe = tmp_path / "cal.ralign"
    recipe.write_text(RECIPE.replace("CALIBRATE", "  calibrate { data = seeds }\n"), "utf-8")
    plan = compile_file(recipe)
    check_inputs(plan, tmp_path)
    evals = {"path": "ralign:evals/behavior", "sha256": "0" * 64}
    steps = tuple(
        replace(s, params={**s.params, "data": evals}) if s.kind == "calibrate" else s
        for s in plan.steps
    )
    with pytest.raises(PlanError, match="steps never read evaluation prompts"):
        check_inputs(with_hashes(replace(plan, steps=steps)), tmp_path)


@pytest.mark.parametrize("relative_to", ["round_start", "base"])
def test_each_round_calibrates_its_own_training_from_its_own_start(
    tmp_path: Path, relative_to: str
) -> None:
    from ralign.compile import compile_file

    recipe = tmp_path / "cal.ralign"
    step = f'  calibrate {{ data = seeds, relative_to = "{relative_to}" }}\n'
    recipe.write_text(RECIPE.replace("CALIBRATE", step).replace("seed = 3", "seed = 3, rounds = 2"))
    plan = compile_file(recipe)
    r1, r2 = plan.step("r1/p/calibrate"), plan.step("r2/p/calibrate")
    assert r1.inputs == {
        "policy": "r1/p/train.dpo",
        "start": "model:policy",
        "baseline": "model:policy",
    }
    assert (r2.inputs["policy"], r2.inputs["start"]) == ("r2/p/train.dpo", "r1/p/calibrate")
    assert r2.inputs["baseline"] == ("model:policy" if relative_to == "base" else "r1/p/calibrate")
    assert plan.step("r2/p/sample").inputs["policy"] == "r1/p/calibrate"  # round 2 samples it


def test_with_decay_later_rounds_keep_at_most_a_shrinking_share(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe, run = tmp_path / "cal.ralign", tmp_path / "run"
    step = "  calibrate { data = seeds, decay = 0.5 }\n"
    recipe.write_text(RECIPE.replace("CALIBRATE", step).replace("seed = 3", "seed = 3, rounds = 2"))
    execute_here(recipe, run)
    # A random tiny model never refuses, so each round keeps the largest weight it may try.
    got = metrics(run)
    assert (got["r1/p/calibrate"]["weight"], got["r2/p/calibrate"]["weight"]) == (1, 0.5)
    record = json.loads((run / "r2" / "p.calibrate" / "calibration.json").read_text())
    assert record["largest_weight"] == 0.5
    assert [r["weight"] for r in record["tried"]] == [0.5]
    r1, final = _weights(run / "r1" / "p.calibrate" / "model"), _weights(run / "final")
    assert any(not torch.equal(v, r1[k]) for k, v in final.items())  # half of round 2 is there


def test_show_prints_the_harmless_held_out_prompts_it_answers(tmp_path: Path, capsys) -> None:
    from ralign.cli import main
    from ralign.runtime.behavior import load_prompts
    from ralign.runtime.builtin_data import resolve_dataset

    recipe = tmp_path / "cal.ralign"
    recipe.write_text(RECIPE.replace("CALIBRATE", "  calibrate { data = seeds }\n"), "utf-8")
    assert main(["show", str(recipe), "--step", "p/calibrate", "-n", "40"]) == 0
    out = capsys.readouterr().out
    rows = load_prompts(resolve_dataset("seeds/hhh"), split="heldout")
    harmless = [r["prompt"] for r in rows if r["kind"] in cal.HARMLESS]
    others = [r["prompt"] for r in rows if r["kind"] not in cal.HARMLESS]
    assert out.count("-----") == 2 * 40 and harmless[0] in out and harmless[-1] in out
    assert not any(p in out for p in others)


def _two_rounds(tmp_path: Path, step: str):
    from ralign.compile import compile_file

    recipe = tmp_path / "cal.ralign"
    text = RECIPE.replace("CALIBRATE", f"  calibrate {{ data = seeds, {step} }}\n")
    recipe.write_text(text.replace("seed = 3", "seed = 3, rounds = 2"), "utf-8")
    return compile_file(recipe)


def test_a_bound_from_the_last_round_is_off_in_round_one_and_from_its_start_after(
    tmp_path: Path,
) -> None:
    plain = _two_rounds(tmp_path, 'relative_to = "base"')
    plan = _two_rounds(
        tmp_path, 'relative_to = "base", max_hedging_rise = 0, hedging_relative_to = "last_round"'
    )
    r1, r2 = plan.step("r1/p/calibrate"), plan.step("r2/p/calibrate")
    # Round 1 has no last round: its calibrate is the one without the hedging bound, hash and all.
    assert r1.params == plain.step("r1/p/calibrate").params
    assert r1.hash == plain.step("r1/p/calibrate").hash
    assert r1.params["max_hedging_rise"] == 1.0 and "hedging_relative_to" not in r1.params
    assert (r2.params["max_hedging_rise"], r2.params["hedging_relative_to"]) == (0, "round_start")
    assert r2.params["relative_to"] == "base"
    assert (r2.inputs["start"], r2.inputs["baseline"]) == ("r1/p/calibrate", "model:policy")
    assert plan.hash != plain.hash

    refusals = _two_rounds(tmp_path, 'relative_to = "last_round", max_refusal_rise = 0.05')
    r1, r2 = refusals.step("r1/p/calibrate"), refusals.step("r2/p/calibrate")
    assert (r1.params["max_refusal_rise"], r1.params["relative_to"]) == (1.0, "round_start")
    assert (r2.params["max_refusal_rise"], r2.params["relative_to"]) == (0.05, "round_start")
    assert r2.inputs["baseline"] == "r1/p/calibrate"  # the base is not needed

    # Hedges from the base while refusals count from the round's start: the base is loaded.
    mixed = _two_rounds(tmp_path, 'max_hedging_rise = 0.02, hedging_relative_to = "base"')
    r2 = mixed.step("r2/p/calibrate")
    assert (r2.params["relative_to"], r2.params["hedging_relative_to"]) == ("round_start", "base")
    assert r2.inputs["baseline"] == "model:policy"


def test_each_count_is_bounded_from_its_own_reference(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe, run = tmp_path / "cal.ralign", tmp_path / "run"
    # Hedges by call: round 1 start 0 and weight 1 on 10 (no bound in round 1: kept); round 2
    # start 10, the base 0, weight 1 on 12 (over the round's start: out), weight 0.75 on 10.
    hedged = iter([0, 10, 10, 0, 12, 10])

    def verdicts(model, tok, prompts, **_):
        return {"refused": [], "hedged": prompts[: next(hedged)]}

    monkeypatch.setattr(cal, "verdicts", verdicts)
    step = (
        '  calibrate { data = seeds, relative_to = "base", max_hedging_rise = 0,'
        ' hedging_relative_to = "last_round" }\n'
    )
    text = RECIPE.replace("CALIBRATE", step).replace("seed = 3", "seed = 3, rounds = 2")
    recipe.write_text(text, "utf-8")
    execute_here(recipe, run)
    got = metrics(run)
    assert (got["r1/p/calibrate"]["weight"], got["r2/p/calibrate"]["weight"]) == (1, 0.75)
    assert got["r2/p/calibrate"]["harmless_hedging_baseline"] == 10 / 80  # the round's start's
    record = json.loads((run / "r2" / "p.calibrate" / "calibration.json").read_text())
    assert record["baseline"]["hedged"]["relative_to"] == "round_start"
    assert record["baseline"]["refused"]["relative_to"] == "base"
    assert [(r["hedged"]["k"], r["hedged"]["rise"], r["passed"]) for r in record["tried"]] == [
        (12, pytest.approx(2 / 80), False),
        (10, 0, True),
    ]
    log = (run / "run.log").read_text()
    assert "hedges on 10 (the round's start 10; rise +0.000)" in log
    assert "refuses 0 (the round's start 0, the base 0; rise" in log
    assert next(hedged, None) is None  # no verdicts asked for beyond these
