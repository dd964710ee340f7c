"""Model specs, built-in name resolution, loading with LoRA, prompt formatting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from ralign.errors import RalignError
from ralign.runtime.models import (
    RESOLVERS,
    ModelSpec,
    format_prompt,
    is_peft,
    load_model,
    resolve_path,
    resolver,
)
from ralign.runtime.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny") / "gpt2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "bfloat"}, "unknown dtype 'bfloat'; did you mean 'bfloat16'?"),
        (
            {"lora": {"rank": 4, "alpha": 8, "dropuot": 0.1}},
            "unknown lora setting 'dropuot'; did you mean 'dropout'?",
        ),
        ({"lora": {"alpha": 8}}, "lora needs 'rank'"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(RalignError) as err:
        ModelSpec("x", **kwargs)
    assert message in str(err.value)


def test_unknown_builtin_name_suggests_a_close_one():
    with pytest.raises(RalignError) as err:
        resolve_path("ralign:tiny-lama")
    assert "unknown built-in model 'ralign:tiny-lama'; did you mean 'tiny-llama'?" in str(err.value)


def test_paths_pass_through_and_resolvers_register(monkeypatch):
    assert resolve_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.setitem(RESOLVERS, "dummy", None)
    resolver("dummy")(lambda name: f"/models/{name}")
    assert resolve_path("ralign:dummy") == "/models/dummy"


def test_builtin_tiny_model_is_built_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path))
    model, tok = load_model(ModelSpec("ralign:tiny-qwen2"), "cpu")
    assert model.config.model_type == "qwen2"
    assert (tmp_path / "models" / "tiny-qwen2" / "config.json").is_file()


def test_load_model_plain(tiny):
    model, tok = load_model(ModelSpec(str(tiny)), "cpu")
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>"
    assert model.dtype == torch.float32 and not is_peft(model)


def test_load_model_bfloat16_with_lora(tiny):
    spec = ModelSpec(str(tiny), dtype="bfloat16", lora={"rank": 2, "alpha": 4, "dropout": 0.05})
    model, _ = load_model(spec, "cpu")
    assert is_peft(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert model.peft_config["default"].r == 2 and model.peft_config["default"].lora_alpha == 4
    assert model.get_base_model().dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize(
    "targets, adapted",
    [
        # What recipes default to: every projection of attention and MLP, never the output head.
        (
            ["all-linear"],
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        ),
        (["q_proj", "o_proj"], {"q_proj", "o_proj"}),
        # Absent (plans compiled before the default existed): peft's choice for Llama.
        (None, {"q_proj", "v_proj"}),
    ],
)
def test_lora_targets(tiny_llama, targets, adapted):
    lora = {"rank": 2, "alpha": 4, "target_modules": targets}
    model, _ = load_model(ModelSpec(str(tiny_llama), lora=lora), "cpu")
    names = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in model.named_parameters()
        if ".lora_A" in n
    }
    assert names == adapted


def test_missing_pad_token_falls_back_to_eos(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((tiny / name).read_bytes())
    _, loaded = load_model(ModelSpec(str(tmp_path)), "cpu")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_format_prompt(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    assert format_prompt(tok, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    assert format_prompt(tok, "Hi") == "Hi\n"
