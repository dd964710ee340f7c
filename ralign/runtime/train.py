"""Supervised fine-tuning and DPO loops over lists of dicts, plain or data-parallel with accelerate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ralign.errors import RalignError, StepError, did_you_mean
from ralign.losses import (
    DPO_LOSSES,
    LABEL_SMOOTHING,
    dpo_loss,
    linear_target_logps,
    sft_loss_on_logps,
    spread,
    target_logps,
)
from ralign.runtime.batches import (
    PairRow,
    collate,
    collate_pairs,
    encode_examples,
    encode_pairs,
    pack,
    pack_pairs,
)
from ralign.runtime.models import is_peft
from ralign.runtime.torchutil import padding_id

OnStep = Callable[[int, dict], None]


def _loader(n: int, batch_size: int, seed: int, collate_fn: Callable) -> DataLoader:
    # The dataset is the row indices, so a batch can look up per-row data such as reference logps.
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        range(n), batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_fn
    )


# ---------------------------------------------------------------------------------------------
# Log-probs of a batch, with the LM head run on counted positions only


@dataclass(frozen=True)
class _OnDevice:
    """Re-iterable like a DataLoader (each epoch reshuffles), with batches moved to `device`."""

    loader: DataLoader
    device: torch.device

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield {k: v.to(self.device) for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self.loader)


def _device(model: Any, accelerator: Any) -> torch.device:
    return accelerator.device if accelerator is not None else next(model.parameters()).device


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    # Dropout draws from the global RNG: seed it for reproducibility, restore the caller's after.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    given = ("input_ids", "attention_mask", "position_ids")
    return model(**{k: batch[k] for k in given if k in batch}, use_cache=False).logits


def _narrow(hidden: torch.Tensor, at: torch.Tensor, lines: torch.Size) -> torch.Tensor:
    """(B, T, H) hidden states -> (N, H) at the flat positions `at` of the (B, T) input."""
    if hidden.shape[:2] != lines:
        raise RalignError(f"the LM head got hidden states of shape {tuple(hidden.shape)}")
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)


@contextlib.contextmanager
def _head_only_at(model: Any, at: torch.Tensor, lines: torch.Size) -> Iterator[None]:
    """Run the model's LM head on the scored positions `at` alone.

    Prompt and padding positions carry no loss, yet on a large vocabulary their logits are a large
    share of a step's memory and of its LM-head compute. A pre-hook on the head module narrows its
    input to the counted positions, so the model returns (N, V) logits in mask order; the call
    itself still goes through the model's own forward, and so through peft's and DDP's wrappers.
    """
    head = getattr(model, "module", model).get_output_embeddings()  # `module`: under DDP
    hook = lambda m, args: (_narrow(args[0], at, lines), *args[1:])  # noqa: E731
    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# Config fields with which an architecture rescales or soft-caps its logits after the LM head
# (Gemma 2, Cohere, Granite, Falcon-H1, ...). The fused head would skip that step, so such models
# take the plain path. Llama, Qwen2, Mistral and GPT-2 have none of them.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def _fusable_head(model: Any) -> torch.nn.Linear | None:
    """The model's LM head when `linear_target_logps` can stand in for it, else None.

    It must be a plain `nn.Linear` (not a LoRA-wrapped head, whose weight alone is not the head)
    whose forward nobody replaced (accelerate's device-map hooks do), on a model that does not
    transform its logits afterwards.
    """
    inner = getattr(model, "module", model)  # `module`: under DDP
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or "forward" in vars(head):
        return None
    config: Any = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


@contextlib.contextmanager
def _head_scores(
    head: torch.nn.Linear, at: torch.Tensor, lines: torch.Size, targets: torch.Tensor
) -> Iterator[list]:
    """Make `head` return the (N,) log-probs of `targets` at the positions `at`, not logits.

    The model's own forward still calls the head, so the result flows through peft's and DDP's
    wrappers and under their autocast exactly as logits would; the list yielded receives it, so the
    caller can check the model handed it back untouched.
    """
    made: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        made.append(
            linear_target_logps(_narrow(hidden, at, lines), head.weight, head.bias, targets)
        )
        return made[-1]

    head.forward = forward  # type: ignore[method-assign,assignment]
    try:
        yield made
    finally:
        del head.forward


def batch_token_logps(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ralign.losses.token_logps` of the model on a batch in any layout of
    `ralign.runtime.batches`, scoring its counted positions only.

    The LM head and the log-softmax run fused, a chunk of positions at a time
    (`ralign.losses.linear_target_logps`), so no (N, V) float32 log-softmax is held: on a 152k
    vocabulary that was a step's peak memory. Models the fused head cannot stand in for (see
    `_fusable_head`) get the model's (N, V) logits and a plain log-softmax.

    Returns:
        (logps (S, W) float32, 0 off the mask; mask (S, W) bool): per sequence, as the batch's
        "counted" (for `collate`, (B, T-1) with position t scoring token t+1).
    """
    at, targets, counted = batch["at"], batch["targets"], batch["counted"]
    lines = batch["input_ids"].shape
    head = _fusable_head(model)
    if head is None:
        with _head_only_at(model, at, lines):
            logits = _forward_logits(model, batch)
        return spread(target_logps(logits, targets), counted), counted
    with _head_scores(head, at, lines, targets) as made:
        logps = _forward_logits(model, batch)
    if len(made) != 1 or logps is not made[0]:
        kind = type(getattr(model, "module", model)).__name__
        raise RalignError(f"{kind} changes its logits after the LM head; ralign cannot train it")
    return spread(logps, counted), counted


# Architectures whose packed layouts tests/test_batches.py checks against one padded row per
# sequence (same log-probs and gradients): their attention reads position ids and 4D masks
# through transformers' masking_utils.
PACKABLE = frozenset({"llama", "qwen2", "gpt2"})
# The attention implementations that take a custom 4D mask, and the mask each wants.
_MASK_KINDS = {"sdpa": "bool", "eager": "float"}


def packing(model: Any, longest: int) -> str | None:
    """How this model takes packed batches (`pack`, `pack_pairs`): the 4D mask kind its attention
    wants, or None to keep one padded row per sequence.

    Args:
        model: the model (plain, peft or DDP-wrapped).
        longest: the longest line a packed batch may hold; a sliding-window attention shorter than
            that would see a packed line differently from its rows.
    """
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE:
        return None
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window and window < longest:
        return None
    return _MASK_KINDS.get(getattr(config, "_attn_implementation", None) or "")


# ---------------------------------------------------------------------------------------------
# Training controls: what every trainer lets you set about an optimizer step

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# `Accelerator(mixed_precision=...)` for each precision: under accelerate it owns autocast and the
# fp16 loss scaler, so it must be created with the run's precision.
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# transformers.get_scheduler's name for each schedule; every one takes a warmup.
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass(frozen=True)
class Controls:
    """How optimizer steps are taken; the defaults are ralign's behaviour before they existed.

    grad_accum: micro-batches per optimizer step (int >= 1); the effective batch is batch_size x
        grad_accum x processes, and the loss is weighed so it equals one batch of that size.
    schedule: learning-rate schedule, "constant", "linear" (to 0) or "cosine" (to 0).
    warmup: linear warmup from 0, a fraction in [0, 1) of the run's optimizer steps (rounded up)
        or an int count of steps.
    weight_decay: AdamW's decoupled weight decay (>= 0), on every trainable parameter.
    max_grad_norm: clip the global gradient norm to this, or 0 for no clipping.
    gradient_checkpointing: recompute each layer's activations in the backward pass (less memory,
        about a third more compute); switched off again after training.
    precision: "fp32", "bf16" (autocast) or "fp16" (autocast and a loss scaler); None follows the
        accelerator's mixed_precision (fp32 without one).
    """

    grad_accum: int = 1
    schedule: str = "constant"
    warmup: float | int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    precision: str | None = None

    def __post_init__(self) -> None:
        problems = _control_problems(self)
        if problems:
            raise RalignError("; ".join(problems))

    def warmup_steps(self, total: int) -> int:
        """Warmup in optimizer steps, for a run of `total` of them."""
        if isinstance(self.warmup, float):
            return math.ceil(self.warmup * total)
        return self.warmup


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_of(name: str, value: Any, known: Iterable[str]) -> str | None:
    if value in known:
        return None
    hint = did_you_mean(value, known) if isinstance(value, str) else ""
    return f"{name} must be one of {', '.join(known)}, got {value!r}{hint}"


def _control_problems(c: Controls) -> list[str]:
    """Every invalid setting of `c`, as messages (all at once, not the first alone)."""
    checks = [
        (isinstance(c.grad_accum, int) and not isinstance(c.grad_accum, bool) and c.grad_accum >= 1,
         f"grad_accum must be an integer >= 1, got {c.grad_accum!r}"),
        (isinstance(c.warmup, float) and 0 <= c.warmup < 1
         or isinstance(c.warmup, int) and not isinstance(c.warmup, bool) and c.warmup >= 0,
         "warmup must be a fraction in [0, 1) or a whole number of steps, "
         f"got {c.warmup!r}"),
        (_number(c.weight_decay) and c.weight_decay >= 0,
         f"weight_decay must be a number >= 0, got {c.weight_decay!r}"),
        (_number(c.max_grad_norm) and c.max_grad_norm >= 0,
         f"max_grad_norm must be a number >= 0 (0: no clipping), got {c.max_grad_norm!r}"),
        (isinstance(c.gradient_checkpointing, bool),
         f"gradient_checkpointing must be true or false, got {c.gradient_checkpointing!r}"),
    ]  # fmt: skip
    problems = [message for ok, message in checks if not ok]
    problems.append(_one_of("schedule", c.schedule, SCHEDULES) or "")
    if c.precision is not None:
        problems.append(_one_of("precision", c.precision, PRECISIONS) or "")
    return [p for p in problems if p]


def _precision(controls: Controls, accelerator: Any) -> str:
    """The run's precision; under accelerate, the accelerator's, which must agree with `controls`."""
    if accelerator is None:
        return controls.precision or "fp32"
    theirs = {v: k for k, v in ACCELERATE_PRECISION.items()}.get(str(accelerator.mixed_precision))
    if theirs is None:
        raise RalignError(f"unsupported accelerate mixed_precision {accelerator.mixed_precision!r}")
    if controls.precision not in (None, theirs):
        raise RalignError(
            f"precision = {controls.precision!r} but the accelerator runs mixed_precision = "
            f"{accelerator.mixed_precision!r}; create it with "
            f"mixed_precision={ACCELERATE_PRECISION[controls.precision]!r}"
        )
    return theirs


def _autocast(precision: str, device: torch.device, accelerator: Any) -> Any:
    """The forward's autocast context. Accelerate's prepared model autocasts its own forward."""
    dtype = PRECISIONS[precision]
    if accelerator is not None or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if is_peft(model) else model


@contextlib.contextmanager
def _checkpointing(model: Any, on: bool) -> Iterator[None]:
    """Gradient checkpointing on `model` (plain or peft) inside the block, as it was after.

    Non-reentrant checkpointing needs no input that requires grad, but transformers hooks the input
    embeddings to require it anyway; those hooks are removed again too.
    """
    hf = _hf_model(model)
    already = any(getattr(m, "gradient_checkpointing", False) is True for m in hf.modules())
    if not on or already:  # a model the caller checkpoints stays checkpointed
        yield
        return
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise RalignError(f"{type(hf).__name__} does not support gradient checkpointing")
    hooked = bool(getattr(hf, "_require_grads_hooks", None))
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5's name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if hasattr(hf, "activation_checkpointing_disable"):
            hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_disable()
        if not hooked:
            hf.disable_input_require_grads()


@contextlib.contextmanager
def _mode(model: Any, dropout: bool) -> Iterator[None]:
    """Train mode (dropout on) or eval mode (off) inside the block, the caller's mode after.

    transformers checkpoints a layer only in training mode, so with dropout off the checkpointed
    layers alone are marked training; their dropout submodules stay in eval mode.
    """
    was_training = model.training
    model.train(dropout)
    if not dropout:
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The loop SFT and DPO share: micro-batches, accumulation, one optimizer step at a time


@dataclass(frozen=True)
class _Run:
    """The moving parts of one training call; the optimizer, schedule and scaler keep its state."""

    model: Any  # under accelerate, the prepared (DDP-wrapped) model
    loader: Any
    optimizer: Any
    scheduler: Any
    scaler: Any  # torch's loss scaler for fp16 without accelerate (accelerate has its own), or None
    accelerator: Any
    controls: Controls
    precision: str
    device: torch.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def autocast(self) -> Any:
        return _autocast(self.precision, self.device, self.accelerator)


# A micro-batch's loss: (mean over its units, per-unit values to summarise over the step).
Micro = Callable[[Any, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RalignError("the model has no trainable parameters")
    # One fused kernel updates every tensor in one pass over its memory. On CUDA, at small batches a
    # step is bound by kernel launches rather than FLOPs (bench/gpu_bench.py); on the CPU the
    # default path's several passes took 0.7 s a step for SmolLM2's 135M weights (fused: 0.16 s),
    # an eighth of a full fine-tuning step. Same update to float rounding (tests/test_train.py).
    fused = all(p.device.type in ("cuda", "cpu") for p in params) or None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _start(
    model: Any, loader: Any, *, lr: float, epochs: int, controls: Controls, accelerator: Any
) -> _Run:
    """Optimizer, learning-rate schedule and loss scaler for `model`, prepared for accelerate."""
    from transformers import get_scheduler

    device = _device(model, accelerator)
    precision = _precision(controls, accelerator)
    model.to(device)  # before the optimizer, which picks its kernels by the parameters' device
    optimizer = raw = _optimizer(model, lr, controls.weight_decay)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:
        loader = _OnDevice(loader, device)
    total = epochs * math.ceil(len(loader) / controls.grad_accum)
    # Not prepared by accelerate, which would step it once per process: it steps once per update.
    scheduler = get_scheduler(
        SCHEDULES[controls.schedule],
        raw,
        num_warmup_steps=controls.warmup_steps(total),
        num_training_steps=total,
    )
    fp16_alone = precision == "fp16" and accelerator is None
    scaler = torch.amp.GradScaler(device.type) if fp16_alone else None
    return _Run(
        model, loader, optimizer, scheduler, scaler, accelerator, controls, precision, device
    )


def _groups(loader: Any, size: int) -> Iterator[list[dict]]:
    """The loader's batches, `size` at a time; the last group of an epoch may be smaller."""
    group: list[dict] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _global_sum(value: torch.Tensor, accelerator: Any) -> torch.Tensor:
    return accelerator.reduce(value, "sum") if accelerator is not None else value


def _backward(run: _Run, loss: torch.Tensor) -> None:
    if run.accelerator is not None:
        run.accelerator.backward(loss)  # scales the fp16 loss with accelerate's scaler
    elif run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()


def _accumulate(
    run: _Run, group: list[dict], micro: Micro, units: Callable[[dict], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward and backward each micro-batch of one optimizer step.

    A micro-batch's loss is its mean over its units (tokens for SFT, pairs for DPO) weighed by its
    share of the step's units over all processes, times the process count because data
    parallelism averages gradients over processes. The gradient and the summed loss then equal
    those of one batch holding every micro-batch of every process, whatever their sizes.

    Returns:
        ({"loss", "tokens", "input_tokens"} of this process, per-unit values of every micro-batch,
        concatenated).
    """
    counts = [units(batch) for batch in group]
    total = _global_sum(torch.stack(counts).sum(), run.accelerator).clamp(min=1)
    loss: torch.Tensor | int = 0
    tokens: torch.Tensor | int = 0
    inputs: torch.Tensor | int = 0
    parts: list[dict[str, torch.Tensor]] = []
    for i, batch in enumerate(group):
        # Under data parallelism gradients are all-reduced once, on the step's last micro-batch.
        last = i == len(group) - 1 or run.accelerator is None
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.model):
            with run.autocast():
                mean, values = micro(run.model, batch)
                part = mean * (run.world * counts[i] / total)
            _backward(run, part)
        loss = loss + part.detach()
        tokens = tokens + batch["counted"].sum()
        inputs = inputs + batch["lengths"].sum()
        parts.append(values)
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {"loss": loss, "tokens": tokens, "input_tokens": inputs}, merged  # type: ignore[dict-item]


def _clip(run: _Run) -> torch.Tensor:
    """Clip the gradients' global norm to max_grad_norm (0: leave them); the norm before clipping."""
    limit = run.controls.max_grad_norm or math.inf  # inf: scaled by exactly 1, norm still measured
    if run.accelerator is not None:
        norm = run.accelerator.clip_grad_norm_(run.model.parameters(), limit)
    else:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), limit)
    return norm if norm is not None else torch.tensor(math.nan, device=run.device)  # DeepSpeed


def _read(values: dict[str, torch.Tensor], accelerator: Any) -> dict[str, float]:
    """A step's statistics, averaged over processes, in one reduction and one copy to the host.

    Each `.item()` waits for the device to finish its queue, so reading values one by one stalled
    every step once per value (and under data parallelism cost one collective each).
    """
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if accelerator is not None:
        stacked = accelerator.reduce(stacked, "mean")
    return dict(zip(values, stacked.tolist(), strict=True))


def _update(run: _Run, loss: float, step: int) -> None:
    """Apply the step's gradients and advance the schedule, unless its loss is not finite (then
    raise, weights untouched).

    `loss` is the mean over processes, so every process sees the same value and raises together:
    one raising while the others wait in a collective would hang.
    """
    if not math.isfinite(loss):
        what = "NaN" if math.isnan(loss) else "infinite"
        run.optimizer.zero_grad(set_to_none=True)
        raise StepError(f"training loss became {what} at step {step}")
    if run.scaler is not None:
        scale = run.scaler.get_scale()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        skipped = run.scaler.get_scale() < scale
    else:
        run.optimizer.step()
        skipped = bool(getattr(run.optimizer, "step_was_skipped", False))  # accelerate's fp16
    if not skipped:  # as transformers' Trainer: a step the fp16 scaler dropped keeps the schedule
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _loop(
    run: _Run,
    epochs: int,
    micro: Micro,
    units: Callable[[dict], torch.Tensor],
    summary: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    on_step: OnStep | None,
) -> list[dict[str, float]]:
    """Train for `epochs`. Returns one record per optimizer step, as `on_step` received it:
    loss, lr (the step's), grad_norm (before clipping), tokens (counted ones, so far),
    input_tokens (every token of the sequences, prompts included, so far), epoch, and
    `summary`'s."""
    history: list[dict[str, float]] = []
    tokens = inputs = 0
    total_steps = epochs * math.ceil(len(run.loader) / run.controls.grad_accum)  # for progress bars
    for epoch in range(epochs):
        for group in _groups(run.loader, run.controls.grad_accum):
            values, per_unit = _accumulate(run, group, micro, units)
            values.update(summary(per_unit), grad_norm=_clip(run))
            stats = _read(values, run.accelerator)
            lr = run.optimizer.param_groups[0]["lr"]
            _update(run, stats["loss"], len(history) + 1)
            tokens += round(stats.pop("tokens") * run.world)
            inputs += round(stats.pop("input_tokens") * run.world)
            record = {**stats, "lr": lr, "tokens": tokens, "input_tokens": inputs, "epoch": epoch}
            history.append(record)
            if on_step is not None:
                on_step(len(history), {**history[-1], "total_steps": total_steps})
    return history


def _mean(history: list[dict[str, float]], key: str) -> float:
    return sum(h[key] for h in history) / len(history) if history else math.nan


def _totals(history: list[dict[str, float]], run: _Run, epochs: int) -> dict[str, Any]:
    """What both trainers return about the whole run."""
    return {
        "loss": history[-1]["loss"] if history else math.nan,
        "mean_loss": _mean(history, "loss"),
        "steps": epochs * len(run.loader),  # micro-batches: forward and backward passes
        "optimizer_steps": len(history),
        "tokens": history[-1]["tokens"] if history else 0,
    }


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning


def _sft_micro(model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return sft_loss_on_logps(*batch_token_logps(model, batch)), {}


def _counted(batch: dict) -> torch.Tensor:
    return batch["counted"].sum()


def train_sft(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    accelerator: Any = None,
    max_length: int = 512,
    on_step: OnStep | None = None,
    grad_accum: int = 1,
    schedule: str = "constant",
    warmup: float | int = 0,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    precision: str | None = None,
) -> dict:
    """Fine-tune `model` in place on (prompt, response) examples, loss on response tokens only.

    Args:
        model: a causal LM (plain or peft); its trainable parameters are updated.
        tokenizer: formats prompts (chat template) and pads.
        examples: dicts with "prompt" and "response".
        lr: AdamW's peak learning rate.
        epochs: passes over the examples.
        batch_size: examples per micro-batch (per process under accelerate).
        seed: seeds the shuffle and dropout; the same seed gives the same weights on CPU.
        accelerator: an `accelerate.Accelerator` for data-parallel training, or None.
        max_length: sequences keep their first max_length tokens.
        on_step: called as on_step(step, {"loss", "lr", "grad_norm", "tokens", "input_tokens",
            "epoch", "total_steps"}) after each optimizer step; the loss is the mean over the
            step's response tokens.
        grad_accum, schedule, warmup, weight_decay, max_grad_norm, gradient_checkpointing,
            precision: see `Controls`.
    Returns:
        {"loss": last step's loss, "mean_loss", "steps": micro-batches, "optimizer_steps",
         "tokens": response tokens trained on, "examples": examples used, "dropped": examples
         whose prompt filled max_length}.
    """
    controls = Controls(
        grad_accum, schedule, warmup, weight_decay, max_grad_norm, gradient_checkpointing, precision
    )
    rows = encode_examples(tokenizer, examples, max_length)
    kept = [r for r in rows if r is not None]
    if not kept:
        raise RalignError(f"no example fits in max_length={max_length} tokens")
    pad_id = padding_id(tokenizer)
    layout = pack if packing(model, max_length) else collate
    loader = _loader(
        len(kept), batch_size, seed, lambda idx: layout([kept[i] for i in idx], pad_id)
    )
    with _checkpointing(model, controls.gradient_checkpointing):
        run = _start(
            model, loader, lr=lr, epochs=epochs, controls=controls, accelerator=accelerator
        )
        with _seeded(seed, run.device), _mode(run.model, dropout=True):
            history = _loop(run, epochs, _sft_micro, _counted, lambda values: {}, on_step)
    return {
        **_totals(history, run, epochs),
        "examples": len(kept),
        "dropped": len(rows) - len(kept),
    }


# ---------------------------------------------------------------------------------------------
# DPO


def pairs_batch(model: Any, rows: Sequence[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """The pairs' batch for this model: prompt once per pair where it can (`pack_pairs`), else
    chosen and rejected padded rows (`collate_pairs`)."""
    longest = max(len(r.chosen.input_ids) + len(r.rejected.input_ids) for r in rows)
    kind = packing(model, longest)
    return pack_pairs(rows, pad_id, kind) if kind else collate_pairs(rows, pad_id)


def pair_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of a pairs batch (`pairs_batch`) in ONE forward pass.

    Returns:
        (chosen (B,), rejected (B,)).
    """
    logps, _ = batch_token_logps(model, batch)
    return logps.sum(-1).chunk(2)


def _reference_context(
    model: Any, reference_model: Any
) -> tuple[Any, contextlib.AbstractContextManager]:
    if reference_model is not None:
        return reference_model, contextlib.nullcontext()
    # Same weights with the adapter switched off: the base model, without a second copy in memory.
    return model, model.disable_adapter()


def reference_logps(
    model: Any,
    rows: list[PairRow],
    *,
    batch_size: int,
    pad_id: int,
    reference_model: Any = None,
    accelerator: Any = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, in row order; under accelerate each process scores a share.

    Args:
        model: the policy; used with its adapter disabled when reference_model is None (peft only).
        rows: encoded pairs.
        batch_size: pairs per forward pass.
        pad_id: padding token id.
        reference_model: a frozen reference, or None for the adapter-disabled policy.
        accelerator: an `accelerate.Accelerator`, or None.
        precision: the training forward's precision without an accelerator ("fp32", "bf16",
            "fp16"); with one, its autocast applies.
    Returns:
        (chosen (N,), rejected (N,)) float32 on the CPU.
    """
    if reference_model is None and not is_peft(model):
        raise RalignError("DPO needs a reference model unless the policy is a LoRA (peft) model")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(rows), world))
    device = _device(model, accelerator)
    ref, context = _reference_context(model, reference_model)
    was_training = ref.training
    ref.eval()
    scored = []
    # Under the same autocast as the policy's training forward, so mixed precision matches.
    autocast = (
        accelerator.autocast() if accelerator is not None else _autocast(precision, device, None)
    )
    with torch.no_grad(), context, autocast:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            batch = pairs_batch(ref, [rows[i] for i in idx], pad_id)
            chosen, rejected = pair_logps(ref, {k: v.to(device) for k, v in batch.items()})
            scored.append(torch.stack([chosen, rejected]).float())
    ref.train(was_training)
    # One copy to the host at the end: a copy per batch would stall the device every batch.
    values = torch.cat(scored, dim=1).tolist() if scored else [[], []]
    scored = list(zip(mine, *values, strict=True))
    if accelerator is not None:
        from accelerate.utils import gather_object

        scored = gather_object(scored)
    out = torch.zeros(2, len(rows))
    for i, c, r in scored:
        out[0, i], out[1, i] = c, r
    return out[0], out[1]


def check_dpo_loss(loss: str, beta: float, label_smoothing: float) -> None:
    """Raise a RalignError unless `loss` names a DPO loss and beta / label_smoothing suit it."""
    if loss not in DPO_LOSSES:
        known = ", ".join(DPO_LOSSES)
        hint = did_you_mean(loss, DPO_LOSSES) if isinstance(loss, str) else ""
        raise RalignError(f"unknown DPO loss {loss!r}{hint} (known: {known})")
    if not (_number(beta) and beta > 0):
        raise RalignError(f"beta must be a number > 0, got {beta!r}")
    low, high = LABEL_SMOOTHING[loss]
    if low == high:
        if label_smoothing != 0:
            takes = [k for k, (lo, hi) in LABEL_SMOOTHING.items() if hi > lo]
            raise RalignError(
                f"label_smoothing applies to the {' and '.join(takes)} loss, not {loss!r}"
            )
    elif not (_number(label_smoothing) and low <= label_smoothing < high):
        raise RalignError(
            f"label_smoothing must be in [{low:g}, {high:g}) for the {loss} loss, "
            f"got {label_smoothing!r}"
        )


def _reward_stats(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    chosen, rejected = values["chosen"], values["rejected"]
    return {
        "reward_accuracy": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
    }


def _scored_reference(
    model: Any,
    reference_model: Any,
    rows: list[PairRow],
    batch_size: int,
    pad_id: int,
    accelerator: Any,
    controls: Controls,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_logps` of every pair, on the training device, the models moved there first."""
    device = _device(model, accelerator)
    model.to(device)
    if reference_model is not None:
        reference_model.to(device)
    chosen, rejected = reference_logps(
        model,
        rows,
        batch_size=batch_size,
        pad_id=pad_id,
        reference_model=reference_model,
        accelerator=accelerator,
        precision=_precision(controls, accelerator),
    )
    return chosen.to(device), rejected.to(device)


def _pairs_in(batch: dict) -> torch.Tensor:
    """A micro-batch's share of a step: its pairs, or the sum of their weights when weighted."""
    if "weight" in batch:
        return batch["weight"].sum()
    return batch["index"].new_tensor(batch["index"].numel())


@dataclass(frozen=True)
class _DpoMicro:
    """A DPO micro-batch's mean loss against the reference log-probs scored before training."""

    ref_chosen: torch.Tensor  # (N,) for every pair, indexed by the batch's "index"
    ref_rejected: torch.Tensor
    beta: float
    kind: str
    label_smoothing: float
    nll_weight: float

    def __call__(self, policy: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, mask = batch_token_logps(policy, batch)
        chosen, rejected = logps.sum(-1).chunk(2)
        chosen_tokens, rejected_tokens = mask.sum(-1).chunk(2)
        idx = batch["index"]
        mean, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            self.ref_chosen[idx],
            self.ref_rejected[idx],
            self.beta,
            kind=self.kind,
            label_smoothing=self.label_smoothing,
            chosen_tokens=chosen_tokens,
            rejected_tokens=rejected_tokens,
            nll_weight=self.nll_weight,
            weights=batch.get("weight"),
        )
        return mean, {"chosen": chosen_rewards, "rejected": rejected_rewards}


def train_dpo(
    model: Any,
    tokenizer: Any,
    pairs: list[dict],
    *,
    beta: float,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    reference_model: Any = None,
    accelerator: Any = None,
    max_length: int = 512,
    on_step: OnStep | None = None,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    grad_accum: int = 1,
    schedule: str = "constant",
    warmup: float | int = 0,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    precision: str | None = None,
) -> dict:
    """Train `model` in place with a DPO loss on (prompt, chosen, rejected) pairs.

    Reference log-probs are computed once, before the first epoch. Dropout is off throughout (as
    TRL's default `disable_dropout`), so policy and reference score sequences the same way.

    Args:
        model, tokenizer, lr, epochs, seed, accelerator, max_length: as in `train_sft`.
        pairs: dicts with "prompt", "chosen", "rejected"; beta: the loss's temperature (> 0).
        batch_size: pairs per micro-batch (per process under accelerate).
        reference_model: the frozen reference; None: the policy with its LoRA adapter disabled.
        on_step: called as on_step(step, {"loss", "lr", "grad_norm", "tokens", "input_tokens",
            "epoch", "total_steps", "reward_accuracy", "reward_margin", "chosen_reward",
            "rejected_reward"}) after each optimizer step; the loss and rewards are means over
            the step's pairs.
        loss: a name in `ralign.losses.DPO_LOSSES`: "sigmoid", "ipo", "hinge" or "robust".
        label_smoothing: the robust loss's label flip rate, in [0, 0.5); 0 for the others.
        nll_weight: weight (>= 0) of the chosen responses' per-token NLL added to the loss (RPO,
            `ralign.losses.dpo_loss`); 0: the preference loss alone.
        grad_accum, schedule, warmup, weight_decay, max_grad_norm, gradient_checkpointing,
            precision: see `Controls`.
    Returns:
        {"loss": last step's loss, "mean_loss", "reward_accuracy" and "reward_margin" (mean over
         the last epoch's steps), "chosen_reward", "rejected_reward" (likewise), "steps":
         micro-batches, "optimizer_steps", "tokens", "pairs", "dropped"}.
    """
    controls = Controls(
        grad_accum, schedule, warmup, weight_decay, max_grad_norm, gradient_checkpointing, precision
    )
    check_dpo_loss(loss, beta, label_smoothing)
    if not (_number(nll_weight) and nll_weight >= 0):
        raise RalignError(f"nll_weight must be a number >= 0, got {nll_weight!r}")
    if reference_model is None and not is_peft(model):
        raise RalignError("DPO needs a reference model unless the policy is a LoRA (peft) model")
    rows = encode_pairs(tokenizer, pairs, max_length)
    if not rows:
        raise RalignError(f"no preference pair fits in max_length={max_length} tokens")
    pad_id = padding_id(tokenizer)
    device = _device(model, accelerator)
    ref_chosen, ref_rejected = _scored_reference(
        model, reference_model, rows, batch_size, pad_id, accelerator, controls
    )

    # Pairs weighted other than 1 (`pairs { rejected = "all" }`: 1/k for each of a prompt's k
    # pairs) count by weight, in the loss and in a micro-batch's share of its step.
    weighted = any(r.weight != 1.0 for r in rows)

    def collate_fn(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = {**pairs_batch(model, [rows[i] for i in idx], pad_id), "index": torch.tensor(idx)}
        if weighted:
            batch["weight"] = torch.tensor([rows[i].weight for i in idx])
        return batch

    loader = _loader(len(rows), batch_size, seed, collate_fn)
    with _checkpointing(model, controls.gradient_checkpointing):
        run = _start(
            model, loader, lr=lr, epochs=epochs, controls=controls, accelerator=accelerator
        )
        with _seeded(seed, device), _mode(run.model, dropout=False):
            micro = _DpoMicro(ref_chosen, ref_rejected, beta, loss, label_smoothing, nll_weight)
            history = _loop(run, epochs, micro, _pairs_in, _reward_stats, on_step)
    last_epoch = [h for h in history if h["epoch"] == epochs - 1]
    rewards = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
    return {
        **_totals(history, run, epochs),
        **{key: _mean(last_epoch, key) for key in rewards},
        "pairs": len(rows),
        "dropped": len(pairs) - len(rows),
    }


# ---------------------------------------------------------------------------------------------
# After training


def unsharded(model: Any, accelerator: Any) -> Any:
    """`model` as a plain module that holds all its weights on every process.

    FSDP shards a prepared model's weights across the processes in place, and every forward of a
    sharded model is a collective. The steps after a train step run the policy on each process's
    own share of the prompts (different numbers of forwards: a sharded model would deadlock) and
    save it from the main process alone, so under FSDP the full weights are gathered (a collective,
    on every process) into a fresh unsharded copy. Any other model comes back as it is.

    Args:
        model: the trained policy, as `train_sft` / `train_dpo` left it.
        accelerator: the run's `accelerate.Accelerator`, or None.
    Returns:
        `model`, or under FSDP a new model (peft adapters kept) with the trained weights.
    """
    if accelerator is None or accelerator.distributed_type != "FSDP":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    sharded = accelerator.unwrap_model(model)
    with torch.device(accelerator.device):
        plain = AutoModelForCausalLM.from_config(
            sharded.config, dtype=next(iter(full.values())).dtype
        )
    if is_peft(sharded):
        from peft import get_peft_model

        plain = get_peft_model(plain, sharded.peft_config[sharded.active_adapter])
    plain.load_state_dict(full)
    plain.generation_config = sharded.generation_config
    return plain.train(sharded.training)
