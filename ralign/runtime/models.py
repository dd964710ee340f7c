"""Load a causal LM and its tokenizer from a spec (HF id, folder or built-in `ralign:` name), and save the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ralign.errors import RalignError, TemplateError, did_you_mean
from ralign.templates import render_chat

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
    _check_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Weights load from safetensors only: a pickled checkpoint can run code when it is read,
        # and a model folder is untrusted input. No remote code either (Transformers' default).
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[spec.dtype], use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RalignError(f"cannot load the model {spec.path}: {_first_line(exc)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    return model, tokenizer


def _check_folder(path: str) -> None:
    """A local model folder exists and holds safetensors weights (never pickles)."""
    folder = Path(path)
    if path.startswith(("/", "./", "../", "~")) and not folder.is_dir():
        raise RalignError(f"no model folder at {path}")
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        found = f" (it has {', '.join(pickles)})" if pickles else ""
        raise RalignError(
            f"model folder {path} has no .safetensors weights{found}: ralign loads only safetensors, "
            "because reading pickled weights can run code"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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

    The chat template comes with the model folder, so it is as untrusted as a recipe: it renders
    in ralign's template sandbox, with the same limits, not with Transformers' unbudgeted one
    (the text is the same as `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`).

    Args:
        tokenizer: its chat template, if any, decides the format.
        prompt: the user's message.
    Returns:
        The formatted prompt string (not tokenized).
    Raises:
        TemplateError: the chat template fails or passes a limit; the message names the model.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt + "\n"
    where = f"the chat template of model '{getattr(tokenizer, 'name_or_path', '') or '?'}'"
    try:
        text = tokenizer.get_chat_template()
        return render_chat(
            text,
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            **tokenizer.special_tokens_map,
        )
    except ValueError as exc:  # several templates and none named "default"
        raise TemplateError(f"{where}: {exc}") from None
    except TemplateError as exc:
        line = getattr(exc, "line", None)
        raise type(exc)(f"{where}{f' (line {line})' if line else ''}: {exc}") from None


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
