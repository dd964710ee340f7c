"""bench/efficacy.py: the helpers that decide what a variant's run reuses and how seeds are averaged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ralign.compile import compile_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eff():
    spec = importlib.util.spec_from_file_location("efficacy", ROOT / "bench" / "efficacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_with_seed_sets_the_recipe_seed_and_nothing_else(eff, tmp_path):
    text = (ROOT / "recipes" / "quickstart.ralign").read_text()
    assert eff.with_seed(text, None) == text
    seeded = eff.with_seed(text, 11)
    changed = [
        (a, b) for a, b in zip(text.splitlines(), seeded.splitlines(), strict=True) if a != b
    ]
    assert changed == [("  seed = 7", "  seed = 11")]
    path = tmp_path / "seeded.ralign"
    path.write_text(seeded)
    assert compile_file(path).to_json()["seed"] == 11


@pytest.mark.parametrize("scale", ["full", "small"])
def test_every_variant_compiles_and_changes_the_plan(eff, tmp_path, scale):
    text = (ROOT / "recipes" / "quickstart.ralign").read_text()
    base = eff.small(text) if scale == "small" else text
    hashes = {}
    for name, variant in eff.variants(base).items():
        path = tmp_path / f"{len(hashes)}.ralign"
        path.write_text(variant)
        hashes[name] = compile_file(path).hash
    assert len(set(hashes.values())) == len(hashes), hashes


def test_single_step_rows_keep_the_quickstarts_training_settings(eff, tmp_path):
    text = (ROOT / "recipes" / "quickstart.ralign").read_text()
    rows = eff.variants(text)
    plans = {}
    for name in ("quickstart (rules, SFT+DPO)", "SFT only", "DPO only"):
        path = tmp_path / f"{len(plans)}.ralign"
        path.write_text(rows[name])
        plans[name] = {s.id: s for s in compile_file(path).steps}
    full, sft, dpo = plans.values()
    assert sft["r1/distill/train.sft"].params == full["r1/distill/train.sft"].params
    assert dpo["r1/distill/train.dpo"].params == full["r1/distill/train.dpo"].params
    assert dpo["r1/distill/pairs"].params == full["r1/distill/pairs"].params
    assert "r1/distill/train.dpo" not in sft and "r1/distill/train.sft" not in dpo
    with pytest.raises(ValueError, match="no single line"):
        eff.distill_lines(text, "revise")


def test_lora_targets_replaces_the_list(eff):
    text = 'lora = { rank = 16, targets = ["q_proj", "v_proj"] }'
    assert (
        eff.lora_targets(text, '["all-linear"]') == 'lora = { rank = 16, targets = ["all-linear"] }'
    )
    with pytest.raises(ValueError, match="no targets"):
        eff.lora_targets("lora = { rank = 16 }", '["all-linear"]')


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


def test_lora_sweep_variants_compile_and_share_samples_where_they_should(tmp_path):
    spec = importlib.util.spec_from_file_location("lora_sweep", ROOT / "bench" / "lora_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    todo = sweep.variants((ROOT / "recipes" / "quickstart.ralign").read_text())
    samples = {}
    for i, (name, text) in enumerate(todo.items()):
        path = tmp_path / f"{i}.ralign"
        path.write_text(text)
        plan = compile_file(path)
        samples[name] = plan.step("r1/sample/sample").hash
    # Every all-linear row answers the same samples; the q,v row has its own model, so its own.
    assert len({h for n, h in samples.items() if n.startswith("all linear")}) == 1
    assert samples["q,v (the quickstart)"] != samples["all linear"]
