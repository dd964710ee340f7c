"""Tiny test models: build, load, generate, single-token labels, deterministic bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.runtime.tiny import DIGITS, LETTERS, build_tiny_model

ARCHS = ["llama", "gpt2", "qwen2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def toks(built) -> dict:
    return {arch: AutoTokenizer.from_pretrained(path) for arch, path in built.items()}


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_generates(built, arch):
    tok = AutoTokenizer.from_pretrained(built[arch])
    model = AutoModelForCausalLM.from_pretrained(built[arch])
    assert model.config.model_type == arch
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert len(tok) == model.config.vocab_size == 512
    assert tok.pad_token_id != tok.eos_token_id and tok.bos_token is not None
    assert tok.padding_side == "left"
    enc = tok(["Hello there", "Answer: A"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template(toks, arch):
    tok = toks[arch]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert no_gen == "<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label", LETTERS + DIGITS)
def test_labels_are_single_tokens(toks, arch, label):
    tok = toks[arch]
    assert len(tok.encode(label, add_special_tokens=False)) == 1
    spaced = tok.encode(" " + label, add_special_tokens=False)
    if arch == "qwen2" and label in DIGITS:
        # Like the real Qwen2 tokenizer (which transformers forces on qwen2 folders): " 7" -> " ", "7".
        assert tok.convert_ids_to_tokens(spaced) == ["Ġ", label]
    else:
        assert len(spaced) == 1
    # The label after "Answer:" is that same token at the end of a longer text.
    ids = tok.encode("Answer: " + label, add_special_tokens=False)
    assert tok.decode(ids[-1:]).strip() == label


@pytest.mark.parametrize("arch", ARCHS)
def test_build_is_deterministic(built, arch, tmp_path):
    again = build_tiny_model(arch, tmp_path / "again")
    assert folder_bytes(again) == folder_bytes(built[arch])
    other = build_tiny_model(arch, tmp_path / "other", seed=1)
    w0 = AutoModelForCausalLM.from_pretrained(built[arch]).state_dict()
    w1 = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_cached_build_is_reused(tmp_path):
    path = build_tiny_model("gpt2", tmp_path / "m")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model("gpt2", tmp_path / "m") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # A different request for the same folder rebuilds it rather than returning the wrong model.
    build_tiny_model("gpt2", tmp_path / "m", seed=3)
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("llama", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny arch 'bert'"):
        build_tiny_model("bert", tmp_path / "m")
