"""Load a causal LM and its tokenizer from a spec (HF id, folder or built-in `ralign:` name), and save the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ralign.errors import RalignError, did_you_mean

DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
LORA_KEYS = frozenset({"rank", "alpha", "dropout", "target_modules"})
PREFIX = "ralign:"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    Args:
        path: a Hugging Face id, a local folder, or `ralign:<name>` for a built-in model.
        dtype: one of DTYPES.
        lora: None for full fine-tuning, else {rank, alpha, dropout?, target_modules?}.
    """

    path: str
    dtype: str = "float32"
    lora: dict | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise RalignError(
                f"unknown dtype '{self.dtype}'{did_you_mean(self.dtype, DTYPES)}; "
                f"choose one of {', '.join(DTYPES)}"
            )
        if self.lora is not None:
            extra = set(self.lora) - LORA_KEYS
            if extra:
                key = sorted(extra)[0]
                raise RalignError(f"unknown lora setting '{key}'{did_you_mean(key, LORA_KEYS)}")
            for key in ("rank", "alpha"):
                if key not in self.lora:
                    raise RalignError(f"lora needs '{key}'")


# Built-in `ralign:<name>` models: each resolver returns a local folder (building/caching it if needed).
RESOLVERS: dict[str, Callable[[str], str]] = {}


def resolver(name: str) -> Callable[[Callable[[str], str]], Callable[[str], str]]:
    """Register `fn(name) -> folder` as the resolver for `ralign:<name>`."""

    def register(fn: Callable[[str], str]) -> Callable[[str], str]:
        RESOLVERS[name] = fn
        return fn

    return register


def cache_root() -> Path:
    """`$RALIGN_CACHE`, else `~/.cache/ralign`."""
    env = os.environ.get("RALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ralign"


def _tiny(arch: str) -> Callable[[str], str]:
    def resolve(name: str) -> str:
        from ralign.runtime.tiny import build_tiny_model  # tokenizer training only when asked for

        return str(build_tiny_model(arch, cache_root() / "models" / name))

    return resolve


for _arch in ("llama", "gpt2", "qwen2"):
    resolver(f"tiny-{_arch}")(_tiny(_arch))


def resolve_path(path: str) -> str:
    """Turn `ralign:<name>` into a local folder; pass anything else through.

    Raises:
        RalignError: for an unknown built-in name, with a did-you-mean hint.
    """
    if not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX) :]
    if name not in RESOLVERS:
        known = ", ".join(f"{PREFIX}{n}" for n in sorted(RESOLVERS))
        raise RalignError(
            f"unknown built-in model '{path}'{did_you_mean(name, RESOLVERS)}; known: {known}"
        )
    return RESOLVERS[name](name)


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load model and tokenizer for `spec`, on `device`, with a fresh LoRA adapter when asked.

    Args:
        spec: what to load.
        device: where the weights go.
    Returns:
        (model, tokenizer); the tokenizer pads on the left (for generation) and always has a pad token.
    """
    path = resolve_path(spec.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[spec.dtype])
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    return model, tokenizer


def apply_lora(model: PreTrainedModel, lora: dict) -> Any:
    """Wrap `model` in a new trainable LoRA adapter (peft); the base weights are frozen.

    Args:
        model: the base model.
        lora: {rank, alpha, dropout=0.0, target_modules=None}: module names, or ["all-linear"] (what
            recipes default to) for every linear layer but the output head, as QLoRA (Dettmers et al.
            2023) recommends; None is peft's default for the architecture (q_proj, v_proj on Llama),
            which plans compiled before that default keep.
    Returns:
        A `peft.PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora.get("target_modules")
    config = LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=lora["alpha"],
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft(model: Any) -> bool:
    """Whether `model` carries peft adapters (so `disable_adapter()` gives back the base model)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain model needs nothing from it
        return False
    return isinstance(model, PeftModel)


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a model sees for `prompt`: a user turn plus generation prompt, or plain text + newline.

    Args:
        tokenizer: its chat template, if any, decides the format.
        prompt: the user's message.
    Returns:
        The formatted prompt string (not tokenized).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def save_final(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a folder that `AutoModelForCausalLM.from_pretrained` loads without peft.

    A LoRA model is merged into its base first (`merge_and_unload`, which changes `model` in place:
    call this last).

    Args:
        model: a plain or peft model (unwrap any accelerate wrapper first).
        tokenizer: saved beside the weights.
        out_dir: the folder to write.
    Returns:
        `out_dir` as a Path.
    """
    out = Path(out_dir)
    if is_peft(model):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
