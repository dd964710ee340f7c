"""Small torch helpers every runtime module needs: a model's device, the padding id, eval mode,
padded batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ralign.errors import RalignError


def device_of(model: Any) -> torch.device:
    """Where a model's weights live (CPU for a parameterless stand-in)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else torch.device("cpu")


def padding_id(tokenizer: Any) -> int:
    """The padding token id: pad, else end-of-sequence, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Dropout off for the duration (so results are deterministic), then the caller's mode back."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def padded(
    rows: Sequence[Sequence[int]], pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one [B, T] batch: (ids, attention mask), padded on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for b, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[b, span] = torch.tensor(r, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def narrow_hidden(hidden: torch.Tensor, at: torch.Tensor, lines: torch.Size) -> torch.Tensor:
    """(B, T, H) hidden states -> (N, H) at the flat positions `at` of the (B, T) input."""
    if hidden.shape[:2] != lines:
        raise RalignError(f"the LM head got hidden states of shape {tuple(hidden.shape)}")
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)


@contextmanager
def head_only_at(model: Any, at: torch.Tensor, lines: torch.Size) -> Iterator[None]:
    """Run the model's LM head on the scored positions `at` alone.

    Prompt and padding positions carry no loss, yet on a large vocabulary their logits are a large
    share of a step's memory and of its LM-head compute. A pre-hook on the head module narrows its
    input to the counted positions, so the model returns (N, V) logits in mask order; the call
    itself still goes through the model's own forward, and so through peft's and DDP's wrappers.
    """
    head = getattr(model, "module", model).get_output_embeddings()  # `module`: under DDP
    hook = lambda m, args: (narrow_hidden(args[0], at, lines), *args[1:])  # noqa: E731
    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def logits_at(model: Any, ids: torch.Tensor, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the flat positions `at` of a (B, T) batch, the LM head run on those alone
    where the model has one to narrow (a stand-in without `get_output_embeddings` pays for all)."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, at)
    with head_only_at(model, at, ids.shape):
        return model(input_ids=ids, attention_mask=mask).logits
