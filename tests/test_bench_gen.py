"""bench/sampling.py, bench/ranking.py (speed and --accuracy) and bench/round.py --quick run on tiny models and report consistent figures."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, out: Path, *args: str, result: str | None = None) -> tuple[dict, str]:
    """`python bench/NAME.py ARGS --out OUT`, run in this process (torch and transformers are
    imported once for all three), restoring torch's thread count; its JSON (`RESULT*.json`,
    by default `NAME*.json`) and printed report."""
    import torch

    module = bench_module(name, f"bench_{name}")
    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert module.main([*args, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = out.glob(f"{result or name}*.json")
    return json.loads(path.read_text(encoding="utf-8")), printed.getvalue()


def check_header(data: dict) -> None:
    for key in ("torch", "transformers", "trl", "peft", "ralign_commit"):
        assert data["versions"][key]
    assert data["machine"]["cpu_count"] >= 1
    assert "load_average_start" in data["machine"]
    assert data["date"] and data["command"].startswith("python bench/")


@pytest.fixture(scope="module")
def sampling(tmp_path_factory):
    return run_bench("sampling", tmp_path_factory.mktemp("sampling"), "--quick")


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    return run_bench("ranking", tmp_path_factory.mktemp("ranking"), "--quick")


@pytest.fixture(scope="module")
def judge_accuracy(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    # --trained: the judge model itself, so its implicit judge (its likelihoods against its own)
    # ties every pair and its listwise judgement is the plain listwise row's.
    return run_bench(
        "ranking",
        out,
        "--accuracy",
        "--quick",
        "--trained",
        "ralign:tiny-llama",
        result="judge-accuracy",
    )


@pytest.fixture(scope="module")
def round_run(tmp_path_factory):
    keep = tmp_path_factory.mktemp("round-run")
    data, stdout = run_bench(
        "round", tmp_path_factory.mktemp("round"), "--quick", "--keep", str(keep)
    )
    return data, stdout, keep / "run"


def test_sampling_systems_did_the_same_work(sampling):
    data, stdout = sampling
    check_header(data)
    cfg = data["config"]
    (res,) = data["results"]
    assert res["model"] == "ralign:tiny-llama"
    systems = res["systems"]
    assert set(systems) == {"plain", "ralign_input_order", "ralign"}
    most = cfg["prompts"] * cfg["per_prompt"] * cfg["max_new_tokens"]
    for name, s in systems.items():
        runs = res["runs"][name]
        assert len(runs) == cfg["repeats"]
        # Same seed, same inputs: every repeat generates the same tokens.
        assert len(s["tokens"]) == 1
        assert cfg["prompts"] * cfg["per_prompt"] <= s["tokens"][0] <= most
        assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in runs)
    # ralign in input order forms the plain loop's batches and draws the same numbers.
    assert systems["plain"]["tokens"] == systems["ralign_input_order"]["tokens"]
    assert res["same_answers_plain_vs_input_order"] is True
    # Sorting by length can only shrink the padded prefill.
    assert (
        systems["ralign"]["prefill_tokens_with_padding"]
        < systems["plain"]["prefill_tokens_with_padding"]
    )
    assert (
        systems["plain"]["prefill_tokens_with_padding"]
        == (systems["ralign_input_order"]["prefill_tokens_with_padding"])
    )
    for ratio in res["ratios"].values():
        assert ratio > 0
    assert "overhead" in stdout and ("PASS" in stdout or "MISS" in stdout)


def passes_per_item(mode: str, k: int, orders: int) -> int:
    """What rank.py scores per item: listwise one text per order (at most K rotations),
    pairwise every ordered pair, pointwise one text per answer (samples cost no pass)."""
    return {"listwise": min(orders, k), "pairwise": k * (k - 1), "pointwise": k}[mode]


def test_ranking_passes_follow_each_mode(ranking):
    data, stdout = ranking
    check_header(data)
    cfg, res = data["config"], data["result"]
    rows = res["rows"]
    assert {(r["mode"], r["orders"], r["k"]) for r in rows} == {
        (mode, orders, k)
        for mode, orders in (("listwise", 1), ("listwise", 2), ("pairwise", 1), ("pointwise", 1))
        for k in cfg["k"]
    }
    for r in rows:
        want = passes_per_item(r["mode"], r["k"], r["orders"])
        assert r["passes_per_prompt"] == want
        assert r["plain_passes_per_prompt"] == want  # both systems scored the same texts
        texts = want * res["prompts"]
        # Batches hold at most batch_size texts; texts sharing a prefix may get batches of their own.
        assert math.ceil(texts / cfg["batch_size"]) <= r["model_calls"] <= texts
        # Computing shared prefixes once never costs more than the plain loop's padded batches.
        assert 0 < r["computed_tokens_per_prompt"] <= r["plain_computed_tokens_per_prompt"]
        assert 0 <= r["shared_prefix_fraction"] < 1
        assert r["tokens_per_prompt"] > 0
        assert r["seconds_per_prompt"] > 0 and r["plain_seconds_per_prompt"] > 0
        assert len(res["runs"][r["cell"]]["ralign"]) == cfg["repeats"]
    by = {(r["mode"], r["orders"], r["k"]): r for r in rows}
    k = max(cfg["k"])
    # Two orders read the listwise text twice (reordered, so tokens may merge a little
    # differently at the seams); pairwise K > 2 reads more than one list.
    assert by[("listwise", 2, k)]["tokens_per_prompt"] == pytest.approx(
        2 * by[("listwise", 1, k)]["tokens_per_prompt"], rel=0.05
    )
    assert by[("pairwise", 1, k)]["tokens_per_prompt"] > by[("listwise", 1, k)]["tokens_per_prompt"]
    assert data["meets"]["passes_formula"] is True
    assert "passes per prompt match" in stdout


def test_judge_accuracy_counts_every_pair_once(judge_accuracy):
    data, stdout = judge_accuracy
    check_header(data)
    res = data["result"]
    families = ("harmful", "scary_harmless", "unknowable")
    assert res["families"] == dict.fromkeys(families, 2) and res["pairs"] == 6
    scores = res["scores"]
    assert len(scores) == 6 and sum(s["choose_half"] for s in scores) == 3
    judges = set(res["rates"])
    contrasts = {f"contrast {d['name']}" for d in res["designs"]}
    assert {"rules (std/hhh)", "listwise o2"} | contrasts <= judges
    assert res["chosen"] in contrasts
    for name, rates in res["rates"].items():
        # Each rate is recomputed from the stored scores: 1 when the better answer scores
        # higher, a half on a tie; families and halves partition the pairs.
        def credit(s, name=name):
            better, worse = s[name][s["better_at"]], s[name][1 - s["better_at"]]
            return 0.5 if abs(better - worse) <= 1e-12 else float(better > worse)

        for key, keep in (
            [("all", lambda s: True)]
            + [(f, lambda s, f=f: s["kind"] == f) for f in families]
            + [
                ("choose_half", lambda s: s["choose_half"]),
                ("held_out_half", lambda s: not s["choose_half"]),
            ]
        ):
            rate, picked = rates[key], [credit(s) for s in scores if keep(s)]
            assert rate["n"] == len(picked) and rate["k"] == pytest.approx(sum(picked))
            lo, hi = rate["ci95"]
            assert 0 <= lo <= rate["value"] + 1e-12 and rate["value"] <= hi <= 1  # float rounding
    # The chosen design against listwise and the rules on the same pairs: the mean of the
    # per-pair differences in credit, inside its bootstrap interval.
    for other in ("listwise o2", "rules (std/hhh)"):
        d = res["paired"][f"{res['chosen']} - {other}"]
        chosen_rate = res["rates"][res["chosen"]]["all"]["value"]
        assert d["value"] == pytest.approx(chosen_rate - res["rates"][other]["all"]["value"])
        assert -1 <= d["ci95"][0] <= d["value"] + 1e-12 and d["value"] <= d["ci95"][1] + 1e-12
        assert d["ci95"][1] <= 1 and d["n"] == 6
        assert f"{res['chosen']} - {other} = {d['value']:+.3f}" in stdout
    # Reading answers after a shared context gives what evaluate.loglikelihood gives.
    assert res["shared_vs_plain_max_abs_diff"] < 1e-4
    assert res["contrast_reads"]["reads"] > 0 and res["contrast_answer_tokens_per_s"] > 0
    # Quickstart-shaped timing: 8 answers per prompt, each read with and without the principle
    # under its own prompt and R others (at most all the other prompts).
    for t in res["quickstart_timing"]:
        others = min(t["calibrate"], t["prompts"] - 1)
        assert t["reads"] == t["prompts"] * 8 * 2 * (1 + others)
    assert [t["calibrate"] for t in res["quickstart_timing"]] == [0, 2]
    assert "held_out_half" in stdout and f"chosen on half A: {res['chosen']}" in stdout
    # The trained policy is the judge model itself: every implicit score is 0, every pair a tie.
    assert res["trained"] == "ralign:tiny-llama"
    assert all(s["implicit (trained)"] == [0.0, 0.0] for s in scores)
    assert res["rates"]["implicit (trained)"]["all"]["value"] == 0.5
    assert [s["listwise o2 (trained)"] for s in scores] == [s["listwise o2"] for s in scores]
    d = res["paired"]["implicit (trained) - listwise o2 (trained)"]
    assert d["value"] == pytest.approx(0.5 - res["rates"]["listwise o2"]["all"]["value"])


def test_round_split_sums_to_the_steps_it_read(round_run):
    data, stdout, run_dir = round_run
    check_header(data)
    metas = [json.loads(p.read_text(encoding="utf-8")) for p in run_dir.glob("r*/*/meta.json")]
    assert len(metas) == len(data["steps"]) > 0
    total = data["split"]["total"]
    assert sum(total["seconds"].values()) == pytest.approx(
        sum(m["seconds"] for m in metas), abs=1e-2
    )
    assert total["step_seconds"] == pytest.approx(sum(m["seconds"] for m in metas), abs=1e-2)
    assert sum(total["percent"].values()) == pytest.approx(100.0)
    assert total["slowest"] == max(total["seconds"], key=total["seconds"].__getitem__)
    # One round: evaluations before it (r0) and after it (r1), every step kind of the recipe.
    assert set(data["split"]["rounds"]) == {"r0", "r1"}
    assert set(data["split"]["rounds"]["r0"]["seconds"]) == {"evaluate"}
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    assert set(total["seconds"]) == {s["kind"].split()[0] for s in plan["steps"]}
    assert {"generate", "sample", "rank", "train", "evaluate"} <= set(total["seconds"])
    for col in data["split"]["rounds"].values():
        assert sum(col["seconds"].values()) == pytest.approx(col["step_seconds"], abs=1e-2)
    assert data["wall_seconds"] >= total["step_seconds"]
    assert "steps total" in stdout and "slowest kind" in stdout


def test_round_reads_a_finished_run(round_run, tmp_path):
    data, _, run_dir = round_run
    read, stdout = run_bench("round", tmp_path, "--run-dir", str(run_dir))
    assert read["split"] == data["split"]  # the same numbers, whether it ran the recipe or not
    assert read["wall_source"].startswith("run.log")
    assert str(run_dir) in stdout


@pytest.mark.parametrize(
    "recipe",
    [ROOT / "recipes" / "quickstart.ralign", ROOT / "tests" / "recipes" / "every_step.ralign"],
)
def test_cut_down_keeps_the_steps(recipe):
    """round.py's cut-down recipe: one round, fewer prompts and evaluation items, the same steps,
    all by `--set` overrides (which the plan records)."""
    from ralign.compile import compile_file

    module = bench_module("round", "bench_round")
    full = compile_file(recipe)
    sets = module.cut_down(full, count=8, eval_limit=5)
    small = compile_file(recipe, sets=sets)
    assert small.rounds == 1 and small.overrides == sets

    def round_one(plan):
        return [(s.id, s.kind) for s in plan.steps if s.round == 1 and s.kind != "evaluate"]

    assert round_one(small) == round_one(full)  # the same steps, in the same order
    assert {s.kind for s in small.steps} == {s.kind for s in full.steps}
    # Fewer prompts: the generate step's count, or else a limit on the datasets.
    generate = [s for s in small.steps if s.kind == "generate"]
    if generate:
        assert all(s.params["count"] == 8 for s in generate)
        assert small.datasets == full.datasets
    else:
        assert all(d["limit"] == 8 for d in small.datasets.values())
    evaluate = [s for s in small.steps if s.kind == "evaluate"]
    assert evaluate and all(s.params["limit"] == 5 for s in evaluate)
    # Nothing else changes: every parameter but those is the recipe's own.
    theirs = {s.id: s.params for s in full.steps}

    def rest(params):
        return {k: v for k, v in params.items() if k not in ("count", "limit")}

    shared = [s for s in small.steps if s.id in theirs]
    assert len(shared) >= len(round_one(full))
    assert all(rest(s.params) == rest(theirs[s.id]) for s in shared)
    assert module.cut_down(full, count=None, eval_limit=5)[0] == "recipe.rounds=1"


def test_round_kinds_are_the_schemas():
    from ralign.schema import STEPS

    module = bench_module("round", "bench_round")
    assert set(module.KINDS) == {name.split()[0] for name in STEPS}
    assert module.family("train dpo") == "train" and module.KINDS[-1] == "evaluate"


def test_eval_batch_times_every_size_against_16(tmp_path):
    data, printed = run_bench(
        "eval_batch",
        tmp_path,
        "--model",
        "ralign:tiny-llama",
        "--prompts",
        "6",
        "--batch-sizes",
        "4",
        "16",
        "--max-new-tokens",
        "4",
    )
    check_header(data)
    rows = {r["batch_size"]: r for r in data["rows"]}
    assert sorted(rows) == [4, 16]
    assert rows[16]["speedup_vs_16"] == 1.0 and rows[16]["same_answers_as_16"] == 6
    assert 0 <= rows[4]["same_answers_as_16"] <= 6 and rows[4]["seconds"] > 0
    assert "x1.00 vs 16" in printed
