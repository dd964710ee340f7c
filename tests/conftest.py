"""Fixtures shared by the runtime's test files."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.runtime.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """`get(arch) -> (model, tokenizer)`: a tiny random-init model in eval mode, loaded once per module."""
    models = {}

    def get(arch: str):
        if arch not in models:
            path = build_tiny_model(arch, tmp_path_factory.getbasetemp() / f"tiny-{arch}")
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            models[arch] = (model, AutoTokenizer.from_pretrained(path))
        return models[arch]

    return get
