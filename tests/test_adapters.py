"""LoRA checkpoints: a training step saves its adapter alone, the next step loads base + adapter
merged, bit for bit the weights a folder of merged weights held, and `final/` stays merged."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from conftest import execute_here
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ralign.cli import main
from ralign.errors import RalignError
from ralign.plan import Plan
from ralign.runtime import rundir
from ralign.runtime.context import StepContext
from ralign.runtime.executor import Run, step_folder
from ralign.runtime.models import ModelSpec, load_model, resolve_path

DATA = Path(__file__).parent / "recipes" / "data"
RANK, ALPHA = 4, 8
# Two rounds of SFT then DPO: four LoRA steps, each trained on the policy the one before left.
RECIPE = f"""
recipe "lora-chain" {{
  rounds = 2
  seed = 5
}}

import "std/hhh"

model policy {{
  path = "ralign:tiny-llama"
  dtype = "float32"
  max_length = 128
  lora = {{ rank = {RANK}, alpha = {ALPHA}, dropout = 0.0, targets = ["q_proj", "v_proj"] }}
}}

dataset questions {{
  path = "data/questions.jsonl"
}}

phase learn {{
  sample {{ from = questions, per_prompt = 2, temperature = 1.0, max_new_tokens = 8 }}
  score {{ total = hhh.rules + 0.01 * words(response) }}
  train sft {{ on = "best", lr = 1e-2, epochs = 1, batch_size = 4 }}
  pairs {{ chosen = "best", rejected = "worst", min_margin = 0.0 }}
  train dpo {{ beta = 0.1, lr = 1e-2, epochs = 1, batch_size = 4 }}
}}
"""
STEPS = [
    f"r{r}/learn/{k}"
    for r in (1, 2)
    for k in ("sample", "score", "train.sft", "pairs", "train.dpo")
]
TRAINED = ("r1/learn/train.sft", "r1/learn/train.dpo", "r2/learn/train.sft", "r2/learn/train.dpo")
# Each LoRA step's base: the policy it was trained on.
BASES = {
    TRAINED[0]: "model:policy",
    TRAINED[1]: TRAINED[0],
    TRAINED[2]: TRAINED[1],
    TRAINED[3]: TRAINED[2],
}
# What a LoRA step's model/ holds: the adapter, its record of the base, the tokenizer; no weights.
ADAPTER_FOLDER = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "ralign_base.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def merged_save(self: StepContext, model: Any, tok: Any) -> None:
    """How a training step saved its policy before adapters: LoRA merged, full weights."""
    from ralign.runtime.models import is_peft, save_tokenizer

    if is_peft(model):
        model = model.merge_and_unload()
    tok.padding_side = "left"
    model.save_pretrained(self.out / "model")
    save_tokenizer(tok, self.out / "model")
    self.run.models.adopt(self.step.id, model, tok)


class Runs(NamedTuple):
    plan: Plan
    plan_file: Path
    new: Path  # steps save adapters
    old: Path  # the same plan with steps saving merged weights, as before


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    folder = tmp_path_factory.mktemp("lora")
    (folder / "lora.ralign").write_text(RECIPE, encoding="utf-8")
    shutil.copytree(DATA, folder / "data")
    plan_file = folder / "plan.json"
    assert main(["compile", str(folder / "lora.ralign"), "-o", str(plan_file)]) == 0
    execute_here(plan_file, folder / "new")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepContext, "save_policy", merged_save)
        execute_here(plan_file, folder / "old")
    return Runs(Plan.load(plan_file), plan_file, folder / "new", folder / "old")


@contextmanager
def opened(runs: Runs, run_dir: Path) -> Iterator[Run]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield Run(runs.plan, run_dir, runs.plan_file.parent, "cpu")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def model_dir(runs: Runs, run_dir: Path, step_id: str) -> Path:
    return step_folder(run_dir, runs.plan.step(step_id)) / "model"


def base_weights(runs: Runs, step_id: str) -> dict[str, torch.Tensor]:
    """The weights step `step_id` was trained on, from the run that saved merged folders."""
    base = runs.plan.step(step_id).inputs["policy"]
    if base.startswith("model:"):
        return load_file(Path(resolve_path("ralign:tiny-llama")) / "model.safetensors")
    return load_file(model_dir(runs, runs.old, base) / "model.safetensors")


def by_hand(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> dict:
    """LoRA merged by hand (Hu et al. 2021): W + (alpha / r) * B @ A on every adapted weight."""
    merged = dict(base)
    for key in adapter:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[key.replace("lora_A", "lora_B")]
            merged[f"{name}.weight"] = base[f"{name}.weight"] + (b @ adapter[key]) * (ALPHA / RANK)
    return merged


# --- what a step saves ---------------------------------------------------------------------------


@pytest.mark.parametrize("step_id", TRAINED)
def test_a_lora_step_saves_its_adapter_and_no_weights(runs, step_id):
    folder = model_dir(runs, runs.new, step_id)
    assert {p.name for p in folder.iterdir()} == ADAPTER_FOLDER
    record = json.loads((folder / "ralign_base.json").read_text())
    base = runs.plan.step(step_id).inputs["policy"]
    assert record["base"] == base == BASES[step_id]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == record["base_path"]
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        RANK,
        ALPHA,
        ["q_proj", "v_proj"],
    )
    if base.startswith("model:"):
        assert record["base_path"] == resolve_path("ralign:tiny-llama")
        assert record["base_sha256"] is None
    else:  # the base's model/ files as its manifest lists them
        assert record["base_path"] == str(model_dir(runs, runs.new, base).relative_to(runs.new))
        listed = json.loads((model_dir(runs, runs.new, base).parent / "manifest.json").read_text())
        files = {k: v for k, v in listed["files"].items() if k.startswith("model/")}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        assert record["base_sha256"] == digest
    old = model_dir(runs, runs.old, step_id)
    new_size = sum(p.stat().st_size for p in folder.iterdir())
    old_size = sum(p.stat().st_size for p in old.iterdir())
    print(f"{step_id}: model/ {old_size:,} bytes merged, {new_size:,} as an adapter")
    assert (old / "model.safetensors").is_file() and new_size < old_size


@pytest.mark.parametrize("step_id", TRAINED)
def test_the_manifest_covers_the_adapter(runs, step_id):
    folder = model_dir(runs, runs.new, step_id)
    listed = json.loads((folder.parent / "manifest.json").read_text())["files"]
    for name in ADAPTER_FOLDER:
        data = (folder / name).read_bytes()
        assert listed[f"model/{name}"] == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


# --- the same numbers as merged folders ----------------------------------------------------------


def test_a_run_with_adapters_equals_one_with_merged_folders(runs):
    """Every sampled answer, score, pair, training log and metric, and final/'s weights, byte for
    byte: the next step sees the same weights, and its fresh adapter starts the same."""
    kept = (".jsonl", "metrics.json")
    files = sorted(p.relative_to(runs.old) for p in runs.old.rglob("*") if p.name.endswith(kept))
    assert len([f for f in files if f.name == "train_log.jsonl"]) == len(TRAINED)
    for rel in files:
        assert (runs.new / rel).read_bytes() == (runs.old / rel).read_bytes(), rel
    final = "final/model.safetensors"
    assert (runs.new / final).read_bytes() == (runs.old / final).read_bytes()


@pytest.mark.parametrize("step_id", TRAINED)
def test_a_step_loads_as_its_base_with_the_adapter_merged(runs, step_id):
    with opened(runs, runs.new) as run:
        model, _ = run.models.load(step_id, lora=False)
    loaded = model.state_dict()
    merged = load_file(model_dir(runs, runs.old, step_id) / "model.safetensors")
    adapter = load_file(model_dir(runs, runs.new, step_id) / "adapter_model.safetensors")
    hand = by_hand(base_weights(runs, step_id), adapter)
    assert set(merged) == set(hand) and set(merged) <= set(loaded)
    assert len(adapter) == 2 * 2 * 2  # q_proj and v_proj of two layers, A and B each
    for key in merged:
        assert torch.equal(loaded[key], merged[key]), key  # what the old folder held
        assert torch.allclose(loaded[key], hand[key], atol=1e-6, rtol=0), key
    changed = [k for k in merged if not torch.equal(merged[k], base_weights(runs, step_id)[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_final_is_a_merged_folder_transformers_loads(runs):
    final = runs.new / "final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    with opened(runs, runs.new) as run:
        last, _ = run.models.load(TRAINED[-1], lora=False)
    ours = last.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ours[key]), key


# --- resuming ------------------------------------------------------------------------------------


def copy_run(runs: Runs, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs.new, out)
    return out


def redone(run_dir: Path) -> list[str]:
    """The steps the last execution ran (the lines run.log ends with)."""
    text = (run_dir / "run.log").read_text(encoding="utf-8")
    last = text.rsplit(" run lora-chain ", 1)[1]
    return [s for s in STEPS if f" {s}: done in " in last]


def changed_models(a: Path, b: Path) -> list[str]:
    """Files of the steps' model/ folders and of final/ that differ between two runs (but final's
    ralign_source.json, which holds the step's time)."""
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file()]
    models = [f for f in files if {"model", "final"} & set(f.parts)]
    return [
        str(f)
        for f in models
        if f.name != "ralign_source.json" and (a / f).read_bytes() != (b / f).read_bytes()
    ]


def test_a_deleted_later_step_is_trained_again_on_the_earlier_adapter(runs, tmp_path):
    run_dir = copy_run(runs, tmp_path)
    shutil.rmtree(step_folder(run_dir, runs.plan.step(TRAINED[-1])))
    shutil.rmtree(run_dir / "final")
    execute_here(runs.plan_file, run_dir)
    assert redone(run_dir) == [TRAINED[-1]]
    assert changed_models(runs.new, run_dir) == []


def test_a_deleted_earlier_step_is_trained_again_and_later_adapters_still_fit(runs, tmp_path):
    """CPU training is deterministic: the retrained adapter has the same bytes, so the steps
    trained on top of it stay done."""
    run_dir = copy_run(runs, tmp_path)
    shutil.rmtree(step_folder(run_dir, runs.plan.step(TRAINED[0])))
    execute_here(runs.plan_file, run_dir)
    assert redone(run_dir) == [TRAINED[0]]
    assert changed_models(runs.new, run_dir) == []


def test_a_flipped_byte_in_an_adapter_makes_its_step_run_again(runs, tmp_path):
    run_dir = copy_run(runs, tmp_path)
    file = model_dir(runs, run_dir, TRAINED[1]) / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # in the last weight, past the header
    file.write_bytes(bytes(data))
    execute_here(runs.plan_file, run_dir)
    log = (run_dir / "run.log").read_text(encoding="utf-8")
    assert "its files changed since it finished (model/adapter_model.safetensors)" in log
    assert redone(run_dir) == [TRAINED[1]]
    assert changed_models(runs.new, run_dir) == []


# --- untrusted folders ---------------------------------------------------------------------------


def resealed(folder: Path) -> None:
    """Rewrite a step's manifest to match its files: only the adapter checks can then object."""
    rundir.write_json(folder.parent / "manifest.json", rundir.manifest(folder.parent))


def edit_json(name: str, **changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        value = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**value, **changes}))

    return edit


def add_weight(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    state = load_file(file)
    save_file({**state, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 4)}, file)


def zero_adapter(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(file).items()}, file)


def misshapen(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    state = load_file(file)
    first = sorted(state)[0]
    save_file({**state, first: torch.zeros(RANK + 1, state[first].shape[1])}, file)


def pickle_only(folder: Path) -> None:
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


# What is done to r1's DPO adapter folder (its manifest then rewritten to match), and the objection.
# A wrong record of the base is caught when the step is verified: the step trains again.
REFUSED_WHEN_VERIFIED = [
    pytest.param(
        edit_json("ralign_base.json", base="model:policy"),
        "its adapter was trained on model:policy, not on r1/learn/train.sft",
        id="another-base",
    ),
    pytest.param(
        edit_json("ralign_base.json", format="peft"),
        "not an adapter record that ralign wrote (ralign-adapter/1)",
        id="bad-record",
    ),
    pytest.param(
        lambda folder: (folder / "ralign_base.json").write_text("{"),
        "ralign_base.json: unreadable",
        id="broken-record",
    ),
]
# Weights that do not fit the plan's adapter are caught when they are loaded: a clear error.
REFUSED_WHEN_LOADED = [
    pytest.param(
        add_weight,
        "does not fit the run's LoRA settings (0 missing, 1 unexpected, 0 misshapen",
        id="extra-weight",
    ),
    pytest.param(
        misshapen,
        "does not fit the run's LoRA settings (0 missing, 0 unexpected, 1 misshapen",
        id="misshapen",
    ),
    pytest.param(pickle_only, "cannot read the adapter", id="pickle-only"),
]


def tampered(runs: Runs, tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    run_dir = copy_run(runs, tmp_path)
    folder = model_dir(runs, run_dir, TRAINED[1])
    edit(folder)
    resealed(folder)
    return run_dir


@pytest.mark.parametrize("edit, message", REFUSED_WHEN_VERIFIED)
def test_a_wrong_record_of_the_base_makes_the_step_train_again(runs, tmp_path, edit, message):
    run_dir = tampered(runs, tmp_path, edit)
    with opened(runs, run_dir) as run:
        assert not run.done(runs.plan.step(TRAINED[1]))
        assert message in str(run.verified[TRAINED[1]])
        with pytest.raises(RalignError, match=re.escape(message)):
            run.models.load(TRAINED[1], lora=False)
    execute_here(runs.plan_file, run_dir)
    assert redone(run_dir) == [TRAINED[1]]
    assert changed_models(runs.new, run_dir) == []


@pytest.mark.parametrize("edit, message", REFUSED_WHEN_LOADED)
def test_adapter_weights_that_do_not_fit_are_refused(runs, tmp_path, edit, message):
    run_dir = tampered(runs, tmp_path, edit)
    with opened(runs, run_dir) as run:
        with pytest.raises(RalignError, match=re.escape(message)):
            run.models.load(TRAINED[1], lora=False)


def test_the_adapter_config_is_never_followed(runs, tmp_path):
    """An adapter_config.json naming another base and rank changes nothing: the base is the run's
    own, and the shape is the plan's."""
    run_dir = copy_run(runs, tmp_path)
    folder = model_dir(runs, run_dir, TRAINED[1])
    edit_json("adapter_config.json", base_model_name_or_path="/nowhere", r=64, lora_alpha=1)(folder)
    resealed(folder)
    with opened(runs, run_dir) as run:
        model, _ = run.models.load(TRAINED[1], lora=False)
    merged = load_file(model_dir(runs, runs.old, TRAINED[1]) / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)


def test_a_changed_base_makes_the_steps_on_it_train_again(runs, tmp_path):
    """r1's DPO adapter replaced (and resealed, as if that step had run again with other results):
    r2's SFT adapter was trained on the old one, so it trains again, and so does r2's DPO."""
    run_dir = copy_run(runs, tmp_path)
    folder = model_dir(runs, run_dir, TRAINED[1])
    zero_adapter(folder)
    resealed(folder)
    with opened(runs, run_dir) as run:
        assert not run.done(runs.plan.step(TRAINED[2]))
        assert run.verified[TRAINED[2]] == (
            f"its base {TRAINED[1]} changed since the adapter was trained on it"
        )
        with pytest.raises(RalignError, match="changed since the adapter was trained on it"):
            run.models.load(TRAINED[2], lora=False)
    execute_here(runs.plan_file, run_dir)
    assert redone(run_dir) == list(TRAINED[2:])


def test_an_adapter_folder_is_not_a_model(runs):
    """`ralign eval --model` or a recipe pointed at a step's model/ gets a clear error: loading it
    would mean following its adapter_config.json to whatever base it names."""
    with pytest.raises(RalignError, match="holds a LoRA adapter, not a model"):
        load_model(ModelSpec(path=str(model_dir(runs, runs.new, TRAINED[0]))))


# --- the helpers alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_adapter_gives_the_merged_folder_and_the_same_fresh_adapter(dtype, tmp_path):
    """Per dtype: base + saved adapter merged equals the folder `merge_and_unload` saved, and a
    fresh adapter on top starts from the same random draws as one on the merged folder."""
    from ralign.runtime.models import merge_adapter, save_adapter, save_final

    lora = {"rank": RANK, "alpha": ALPHA, "target_modules": ["q_proj", "v_proj"]}
    base = ModelSpec("ralign:tiny-llama", dtype=dtype)
    model, tok = load_model(ModelSpec(base.path, dtype=dtype, lora=lora))
    for p in model.parameters():  # a trained-looking adapter: B is no longer zero
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    record = {"base": "model:policy", "base_path": "ralign:tiny-llama", "base_sha256": None}
    save_adapter(model, tok, tmp_path / "adapter", record)
    save_final(model, tok, tmp_path / "merged")
    torch.manual_seed(1)
    old, _ = load_model(ModelSpec(str(tmp_path / "merged"), dtype=dtype, lora=lora))
    old_rng = torch.get_rng_state()
    torch.manual_seed(1)
    new, _ = merge_adapter(
        load_model(base)[0], ModelSpec(str(tmp_path / "adapter"), dtype=dtype, lora=lora), lora
    )
    assert torch.equal(torch.get_rng_state(), old_rng)
    ours, theirs = new.state_dict(), old.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
