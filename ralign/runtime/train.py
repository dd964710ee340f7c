"""Supervised fine-tuning and DPO loops over lists of dicts, plain or data-parallel with accelerate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ralign.errors import RalignError, StepError
from ralign.losses import (
    IGNORE,
    dpo_loss,
    next_token_mask,
    sft_loss_on_logps,
    spread,
    target_logps,
)
from ralign.runtime.models import format_prompt, is_peft
from ralign.runtime.torchutil import padding_id

OnStep = Callable[[int, dict], None]

# ---------------------------------------------------------------------------------------------
# Tokenizing and batching


@dataclass(frozen=True)
class Row:
    """One tokenized training sequence: prompt then response, labels IGNORE on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class PairRow:
    """One tokenized preference pair sharing a prompt."""

    chosen: Row
    rejected: Row


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, in one batched call (a fast tokenizer encodes them in parallel).

    Special tokens (BOS) are added only when there is no chat template, because a chat template
    writes its own.
    """
    if not texts:
        return []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(texts, add_special_tokens=not has_template)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one bounds the prefix
        if x != y:
            break
        n += 1
    return n


def _with_eos(tokenizer: Any, response: str) -> str:
    eos = tokenizer.eos_token
    return response if response.endswith(eos) else response + eos


def _row(ids: list[int], prompt_len: int, max_length: int) -> Row:
    labels = [IGNORE] * prompt_len + ids[prompt_len:]
    return Row(tuple(ids[:max_length]), tuple(labels[:max_length]))


def _encode_with_prompts(
    tokenizer: Any,
    prompts: list[str],
    responses: list[list[str]],
    max_length: int,
    finished: list[list[bool]] | None = None,
) -> list[list[Row] | None]:
    """Rows of each prompt's responses, all starting at one position: the shortest prefix any of
    them shares with the prompt alone.

    The prompt and prompt+response are tokenized separately and a response starts where they
    diverge, exactly as TRL does, so a merge across the boundary cannot shift the labels. All
    texts go to the tokenizer in one batch: one call per text made tokenization the slowest part
    of a short GPU training run. None where the prompt alone fills max_length. A response cut off
    by the sampling length limit (`finished` False) gets no EOS: training on it must not teach the
    model to stop mid-sentence.
    """
    texts = [format_prompt(tokenizer, p) for p in prompts]
    ends = finished if finished is not None else [[True] * len(rs) for rs in responses]
    fulls = [
        t + (_with_eos(tokenizer, r) if end else r)
        for t, rs, es in zip(texts, responses, ends, strict=True)
        for r, end in zip(rs, es, strict=True)
    ]
    ids = encode_texts(tokenizer, texts + fulls)
    prompt_ids, full_ids = ids[: len(texts)], iter(ids[len(texts) :])
    out: list[list[Row] | None] = []
    for p_ids, rs in zip(prompt_ids, responses, strict=True):
        each = [next(full_ids) for _ in rs]
        n = min(_common_prefix(p_ids, f) for f in each)
        out.append(None if n >= max_length else [_row(f, n, max_length) for f in each])
    return out


def encode_examples(tokenizer: Any, examples: list[dict], max_length: int) -> list[Row | None]:
    """Tokenize (prompt, response) dicts for training: the chat-formatted prompt, the response, EOS.

    Args:
        tokenizer: formats with its chat template when it has one.
        examples: dicts with "prompt", "response" and optionally "finished" (False for an answer
            cut off by the length limit; otherwise EOS is appended unless present).
        max_length: longer sequences keep their start.
    Returns:
        A Row per example, or None when its prompt alone fills max_length (no response token
        would remain).
    """
    rows = _encode_with_prompts(
        tokenizer,
        [e["prompt"] for e in examples],
        [[e["response"]] for e in examples],
        max_length,
        [[e.get("finished", True)] for e in examples],
    )
    return [r[0] if r is not None else None for r in rows]


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> Row | None:
    """`encode_examples` of one (prompt, response)."""
    return encode_examples(tokenizer, [{"prompt": prompt, "response": response}], max_length)[0]


def encode_pairs(tokenizer: Any, pairs: list[dict], max_length: int) -> list[PairRow]:
    """Tokenize preference pairs like `encode_examples`; both responses start at one position.

    Pairs whose prompt alone fills max_length are dropped; "chosen_finished" / "rejected_finished"
    False mark an answer cut off by the length limit (no EOS).
    """
    rows = _encode_with_prompts(
        tokenizer,
        [p["prompt"] for p in pairs],
        [[p["chosen"], p["rejected"]] for p in pairs],
        max_length,
        [[p.get("chosen_finished", True), p.get("rejected_finished", True)] for p in pairs],
    )
    return [PairRow(*r) for r in rows if r is not None]


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into (B, T) input_ids / attention_mask / labels tensors."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(rows: Sequence[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, T) batch, so one forward pass scores both."""
    return collate([r.chosen for r in rows] + [r.rejected for r in rows], pad_id)


def _loader(n: int, batch_size: int, seed: int, collate_fn: Callable) -> DataLoader:
    # The dataset is the row indices, so a batch can look up per-row data such as reference logps.
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        range(n), batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_fn
    )


# ---------------------------------------------------------------------------------------------
# Shared loop pieces


@dataclass(frozen=True)
class _OnDevice:
    """Re-iterable like a DataLoader (each epoch reshuffles), with batches moved to `device`."""

    loader: DataLoader
    device: torch.device

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield {k: v.to(self.device) for k, v in batch.items()}


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
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits


@contextlib.contextmanager
def _head_only_at(model: Any, mask: torch.Tensor) -> Iterator[None]:
    """Run the model's LM head on the positions where `mask` (B, T-1) is True alone.

    Prompt and padding positions carry no loss, yet on a large vocabulary their logits are a large
    share of a step's memory and of its LM-head compute. A pre-hook on the head module narrows its
    input to the counted positions, so the model returns (N, V) logits in mask order; the call
    itself still goes through the model's own forward, and so through peft's and DDP's wrappers.
    """
    head = getattr(model, "module", model).get_output_embeddings()  # `module`: under DDP

    def narrow(module: Any, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != (mask.shape[0], mask.shape[1] + 1):
            raise RalignError(f"the LM head got hidden states of shape {tuple(hidden.shape)}")
        return (hidden[:, :-1][mask], *args[1:])

    handle = head.register_forward_pre_hook(narrow)
    try:
        yield
    finally:
        handle.remove()


def batch_token_logps(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ralign.losses.token_logps` of the model on a collated batch, with logits only where counted.

    Returns:
        (logps (B, T-1) float32, 0 off the mask; mask (B, T-1) bool).
    """
    mask = next_token_mask(batch["labels"])
    with _head_only_at(model, mask):
        logits = _forward_logits(model, batch)
    return spread(target_logps(logits, batch["labels"][:, 1:][mask]), mask), mask


def _optimizer(model: Any, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RalignError("the model has no trainable parameters")
    # On CUDA, one fused kernel updates every tensor: at small batches a step is bound by kernel
    # launches rather than FLOPs (bench/gpu_bench.py), and the per-tensor path launches several
    # kernels per parameter. The CPU keeps the default path, whose arithmetic the tests pin.
    fused = all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW(params, lr=lr, fused=fused)


def _backward(model: Any, loss: torch.Tensor, accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def _read(values: dict[str, torch.Tensor], accelerator: Any) -> dict[str, float]:
    """A step's statistics, averaged over processes, in one reduction and one copy to the host.

    Each `.item()` waits for the device to finish its queue, so reading values one by one stalled
    every step once per value (and under data parallelism cost one collective each).
    """
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if accelerator is not None:
        stacked = accelerator.reduce(stacked, "mean")
    return dict(zip(values, stacked.tolist(), strict=True))


def _update(optimizer: Any, loss: float, step: int) -> None:
    """Apply the step's gradients, unless its loss is not finite (then raise, weights untouched).

    `loss` is the mean over processes, so every process sees the same value and raises together:
    one raising while the others wait in a collective would hang.
    """
    if not math.isfinite(loss):
        what = "NaN" if math.isnan(loss) else "infinite"
        optimizer.zero_grad(set_to_none=True)
        raise StepError(f"training loss became {what} at step {step}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _total(value: torch.Tensor, accelerator: Any) -> int:
    value = value.detach()
    return int((accelerator.reduce(value, "sum") if accelerator is not None else value).item())


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning


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
) -> dict:
    """Fine-tune `model` in place on (prompt, response) examples, loss on response tokens only.

    Args:
        model: a causal LM (plain or peft); its trainable parameters are updated.
        tokenizer: formats prompts (chat template) and pads.
        examples: dicts with "prompt" and "response".
        lr: AdamW learning rate (constant).
        epochs: passes over the examples.
        batch_size: examples per step (per process under accelerate).
        seed: seeds the shuffle and dropout; the same seed gives the same weights on CPU.
        accelerator: an `accelerate.Accelerator` for data-parallel training, or None.
        max_length: sequences keep their first max_length tokens.
        on_step: called as on_step(step, {"loss", "epoch", "tokens"}) after each step.
    Returns:
        {"loss": last step's loss, "mean_loss", "steps", "tokens": response tokens trained on,
         "examples": examples used, "dropped": examples whose prompt filled max_length}.
    """
    rows = encode_examples(tokenizer, examples, max_length)
    kept = [r for r in rows if r is not None]
    if not kept:
        raise RalignError(f"no example fits in max_length={max_length} tokens")
    pad_id = padding_id(tokenizer)
    loader = _loader(
        len(kept), batch_size, seed, lambda idx: collate([kept[i] for i in idx], pad_id)
    )
    device = _device(model, accelerator)
    model.to(device)  # before the optimizer, which picks its kernels by the parameters' device
    optimizer = _optimizer(model, lr)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:
        loader = _OnDevice(loader, device)
    world = accelerator.num_processes if accelerator is not None else 1

    was_training = model.training
    model.train()
    losses, tokens, step = [], 0, 0
    with _seeded(seed, device):
        for epoch in range(epochs):
            for batch in loader:
                logps, mask = batch_token_logps(model, batch)
                loss = sft_loss_on_logps(logps, mask)
                counted = mask.sum()
                if world > 1:
                    # The loss is a mean over the global batch's tokens. Each process holds a share
                    # of them and data parallelism averages gradients over processes, so a process
                    # weighs its own token mean by world * (its tokens / all tokens): the update
                    # and the reported loss then equal one process's on the whole batch.
                    everyone = _total(counted, accelerator)
                    loss = loss * (world * counted.float() / max(everyone, 1))
                step += 1
                _backward(model, loss, accelerator)
                stats = _read({"loss": loss, "tokens": counted}, accelerator)
                _update(optimizer, stats["loss"], step)
                losses.append(stats["loss"])
                tokens += round(stats["tokens"] * world)
                if on_step is not None:
                    on_step(step, {"loss": losses[-1], "epoch": epoch, "tokens": tokens})
    model.train(was_training)
    return {
        "loss": losses[-1] if losses else math.nan,
        "mean_loss": sum(losses) / len(losses) if losses else math.nan,
        "steps": step,
        "tokens": tokens,
        "examples": len(kept),
        "dropped": len(rows) - len(kept),
    }


# ---------------------------------------------------------------------------------------------
# DPO


def pair_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of a `collate_pairs` batch in ONE forward pass.

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, in row order; under accelerate each process scores a share.

    Args:
        model: the policy; used with its adapter disabled when reference_model is None (peft only).
        rows: encoded pairs.
        batch_size: pairs per forward pass.
        pad_id: padding token id.
        reference_model: a frozen reference, or None for the adapter-disabled policy.
        accelerator: an `accelerate.Accelerator`, or None.
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
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with torch.no_grad(), context, autocast:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            batch = collate_pairs([rows[i] for i in idx], pad_id)
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
) -> dict:
    """Train `model` in place with sigmoid DPO on (prompt, chosen, rejected) pairs.

    Reference log-probs are computed once, before the first epoch. Dropout is off throughout (as
    TRL's default `disable_dropout`), so policy and reference score sequences the same way.

    Args:
        model: the policy (plain or peft).
        tokenizer: formats prompts and pads.
        pairs: dicts with "prompt", "chosen", "rejected".
        beta: DPO temperature.
        lr: AdamW learning rate (constant).
        epochs: passes over the pairs.
        batch_size: pairs per step (per process under accelerate).
        seed: seeds the shuffle; the same seed gives the same weights on CPU.
        reference_model: the frozen reference; None means the policy with its LoRA adapter
            disabled (required then: a plain model needs an explicit reference).
        accelerator: an `accelerate.Accelerator` for data-parallel training, or None.
        max_length: each sequence keeps its first max_length tokens.
        on_step: called as on_step(step, {"loss", "reward_accuracy", "reward_margin", "epoch"}).
    Returns:
        {"loss": last step's loss, "mean_loss", "reward_accuracy" and "reward_margin" (mean over
         the last epoch), "chosen_reward", "rejected_reward" (last epoch), "steps", "tokens",
         "pairs", "dropped"}.
    """
    if reference_model is None and not is_peft(model):
        raise RalignError("DPO needs a reference model unless the policy is a LoRA (peft) model")
    rows = encode_pairs(tokenizer, pairs, max_length)
    if not rows:
        raise RalignError(f"no preference pair fits in max_length={max_length} tokens")
    pad_id = padding_id(tokenizer)
    device = _device(model, accelerator)
    model.to(device)
    if reference_model is not None:
        reference_model.to(device)
    ref_chosen, ref_rejected = reference_logps(
        model,
        rows,
        batch_size=batch_size,
        pad_id=pad_id,
        reference_model=reference_model,
        accelerator=accelerator,
    )
    ref_chosen, ref_rejected = ref_chosen.to(device), ref_rejected.to(device)

    def collate_fn(idx: list[int]) -> dict[str, torch.Tensor]:
        return {**collate_pairs([rows[i] for i in idx], pad_id), "index": torch.tensor(idx)}

    loader = _loader(len(rows), batch_size, seed, collate_fn)
    optimizer = _optimizer(model, lr)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:
        loader = _OnDevice(loader, device)
    world = accelerator.num_processes if accelerator is not None else 1

    was_training = model.training
    model.eval()  # dropout off; gradients still flow
    losses, tokens, step, epoch_stats = [], 0, 0, []
    with _seeded(seed, device):
        for epoch in range(epochs):
            epoch_stats = []
            for batch in loader:
                chosen, rejected = pair_logps(model, batch)
                idx = batch["index"]
                loss, chosen_rewards, rejected_rewards = dpo_loss(
                    chosen, rejected, ref_chosen[idx], ref_rejected[idx], beta
                )
                step += 1
                _backward(model, loss, accelerator)
                stats = _read(
                    {
                        "loss": loss,
                        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
                        "chosen_reward": chosen_rewards.mean(),
                        "rejected_reward": rejected_rewards.mean(),
                        "tokens": (batch["labels"][:, 1:] != IGNORE).sum(),
                    },
                    accelerator,
                )
                _update(optimizer, stats["loss"], step)
                tokens += round(stats.pop("tokens") * world)
                losses.append(stats["loss"])
                epoch_stats.append(stats)
                if on_step is not None:
                    on_step(step, {**stats, "epoch": epoch})
    model.train(was_training)

    def last_epoch(key: str) -> float:
        return sum(s[key] for s in epoch_stats) / len(epoch_stats) if epoch_stats else math.nan

    return {
        "loss": losses[-1] if losses else math.nan,
        "mean_loss": sum(losses) / len(losses) if losses else math.nan,
        "reward_accuracy": last_epoch("reward_accuracy"),
        "reward_margin": last_epoch("reward_margin"),
        "chosen_reward": last_epoch("chosen_reward"),
        "rejected_reward": last_epoch("rejected_reward"),
        "steps": step,
        "tokens": tokens,
        "pairs": len(rows),
        "dropped": len(pairs) - len(rows),
    }
