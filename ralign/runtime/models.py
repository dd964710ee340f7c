"""Load a causal LM and its tokenizer from a spec (HF id, folder or built-in `ralign:` name), and save the result."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ralign.cache import cache_root
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
# What a LoRA training step saves instead of full weights (`save_adapter`).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # peft's, for peft users; ralign never reads it
ADAPTER_BASE = "ralign_base.json"  # which base the adapter applies to, as the run resolved it
ADAPTER_FORMAT = "ralign-adapter/1"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    Args:
        path: a Hugging Face id, a local folder, or `ralign:<name>` for a built-in model.
        dtype: one of DTYPES.
        lora: None for full fine-tuning, else {rank, alpha, dropout?, target_modules?}.
        system: a system message put before every prompt (`format_prompt`).
        chat_template: None keeps the tokenizer's template; "" formats plain text; any other
            text replaces the template (the model's own is kept for saving).
    """

    path: str
    dtype: str = "float32"
    lora: dict | None = None
    system: str | None = None  # a system message before every prompt
    chat_template: str | None = None  # None: the model's own; "": none (plain text); else its text

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
    tokenizer = _tokenizer(path, spec)
    try:
        # Weights load from safetensors only: a pickled checkpoint can run code when it is read,
        # and a model folder is untrusted input. No remote code either (Transformers' default).
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[spec.dtype], use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RalignError(f"cannot load the model {spec.path}: {_first_line(exc)}") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    return model, tokenizer


def _tokenizer(path: str, spec: ModelSpec) -> Any:
    """The tokenizer in `path`, padding on the left, with a pad token and the spec's chat settings."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RalignError(f"cannot load the model {spec.path}: {_first_line(exc)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _chat_settings(tokenizer, spec)
    return tokenizer


def _chat_settings(tokenizer: Any, spec: ModelSpec) -> None:
    """Apply the recipe's chat settings to the tokenizer every step formats prompts with; the
    model's own template is kept aside, so a saved policy carries it unchanged."""
    tokenizer.ralign_own_template = getattr(tokenizer, "chat_template", None)
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template or None
    tokenizer.ralign_system = spec.system


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save a tokenizer with the model's own chat template (not the one a recipe ran it with)."""
    used = getattr(tokenizer, "chat_template", None)
    if hasattr(tokenizer, "ralign_own_template"):
        tokenizer.chat_template = tokenizer.ralign_own_template
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = used


def _check_folder(path: str) -> None:
    """A local model folder exists, holds safetensors weights (never pickles) and is no adapter."""
    folder = Path(path)
    if path.startswith(("/", "./", "../", "~")) and not folder.is_dir():
        raise RalignError(f"no model folder at {path}")
    if folder.is_dir() and (folder / ADAPTER_CONFIG).exists():
        # Transformers would load the base that the adapter's config names, wherever it points.
        raise RalignError(
            f"model folder {path} holds a LoRA adapter, not a model: ralign applies an adapter only "
            "within its own run, to the base the run's plan names; load the run's final/ folder"
        )
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        found = f" (it has {', '.join(pickles)})" if pickles else ""
        raise RalignError(
            f"model folder {path} has no .safetensors weights{found}: ralign loads only safetensors, "
            "because reading pickled weights can run code"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer alone, with the spec's chat settings (what `ralign show` formats with)."""
    path = resolve_path(spec.path)
    _check_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RalignError(f"cannot load the tokenizer of {spec.path}: {_first_line(exc)}") from None
    _chat_settings(tokenizer, spec)
    return tokenizer


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
    """The text a model sees for `prompt`: a user turn plus generation prompt, or plain text + newline;
    after the recipe's system message, when its model declares one (`model { system = ... }`).

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
    system = getattr(tokenizer, "ralign_system", None)
    if not getattr(tokenizer, "chat_template", None):
        return (f"{system}\n\n" if system else "") + prompt + "\n"
    where = f"the chat template of model '{getattr(tokenizer, 'name_or_path', '') or '?'}'"
    turns = [{"role": "system", "content": system}] if system else []
    try:
        text = tokenizer.get_chat_template()
        return render_chat(
            text,
            [*turns, {"role": "user", "content": prompt}],
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
    save_tokenizer(tokenizer, out)
    return out


def save_adapter(model: Any, tokenizer: Any, out: str | Path, base: dict[str, Any]) -> Path:
    """Save a LoRA model's adapter alone, not the weights it adapts: `adapter_model.safetensors`,
    peft's `adapter_config.json`, the tokenizer, and `ralign_base.json` naming its base.

    Args:
        model: a peft model with one adapter (unwrap any accelerate wrapper first).
        tokenizer: saved beside the adapter.
        out: the folder to write.
        base: what `ralign_base.json` records: `base` (the plan reference of the model the adapter
            was trained on), `base_path` (where the run found it) and `base_sha256` (a digest of
            its files, or None).
    Returns:
        `out` as a Path.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = model.peft_config[model.active_adapter].to_dict()
    # Sets (peft keeps target_modules as one) are sorted, so the same run writes the same bytes.
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config.update(base_model_name_or_path=base["base_path"], inference_mode=True)
    _write_json(folder / ADAPTER_CONFIG, config)
    save_tokenizer(tokenizer, folder)
    _write_json(folder / ADAPTER_BASE, {"format": ADAPTER_FORMAT, **base})
    return folder


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_adapter_base(folder: str | Path) -> dict[str, Any] | None:
    """The `ralign_base.json` of a folder `save_adapter` wrote; None for a folder of full weights.

    Raises:
        RalignError: the record is unreadable or not one ralign writes (a model folder is untrusted).
    """
    file = Path(folder) / ADAPTER_BASE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RalignError(f"{file}: unreadable ({_first_line(exc)})") from None
    if (
        not isinstance(record, dict)
        or record.get("format") != ADAPTER_FORMAT
        or not isinstance(record.get("base"), str)
        or not isinstance(record.get("base_sha256"), (str, type(None)))
    ):
        raise RalignError(f"{file}: not an adapter record that ralign wrote ({ADAPTER_FORMAT})")
    return record


def merge_adapter(
    base: Any, spec: ModelSpec, adapter: dict, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """`base` with the adapter that `save_adapter` wrote in folder `spec.path` merged into its
    weights: the very weights `merge_and_unload` gave when the adapter was trained.

    The adapter's shape comes from `adapter`, the run's own LoRA settings, never from the folder's
    adapter_config.json, and its weights from safetensors only. Building it leaves the random
    generators as they were, so a fresh adapter (`spec.lora`) starts exactly as it does on a model
    loaded from a folder of merged weights.

    Args:
        base: the model the adapter was trained on (plain, on `device`); changed in place.
        spec: the adapter's folder, the dtype and chat settings, and `lora` for a fresh adapter.
        adapter: {rank, alpha, dropout?, target_modules?} the adapter was trained with.
        device: where `base` is.
    Returns:
        (model, the folder's tokenizer), as `load_model` gives them.
    Raises:
        RalignError: the adapter file is missing, unreadable, or does not fit `adapter`.
    """
    folder = Path(spec.path)
    tokenizer = _tokenizer(str(folder), spec)
    with _rng_kept(device):
        model = apply_lora(base, adapter)
    _load_adapter_weights(model, folder / ADAPTER_WEIGHTS)
    model = model.merge_and_unload()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    return model, tokenizer


def _load_adapter_weights(model: Any, file: Path) -> None:
    """Copy the adapter weights in `file` into `model`'s adapter: the same names and shapes, or an error."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise RalignError(f"cannot read the adapter {file}: {_first_line(exc)}") from None
    wanted = get_peft_model_state_dict(model)
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    misshapen = sorted(k for k in set(state) & set(wanted) if state[k].shape != wanted[k].shape)
    if missing or extra or misshapen:
        names = ", ".join((missing or extra or misshapen)[:2])
        raise RalignError(
            f"the adapter {file} does not fit the run's LoRA settings "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(misshapen)} misshapen: {names})"
        )
    set_peft_model_state_dict(model, state)


@contextlib.contextmanager
def _rng_kept(device: str | torch.device) -> Iterator[None]:
    """The CPU's (and `device`'s) random generators as they were before the block."""
    dev = torch.device(device)
    if dev.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
        return
    module = getattr(torch, dev.type)
    index = dev.index if dev.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=dev.type):
        yield
