"""Small torch helpers every runtime module needs: a model's device, the padding id, eval mode,
padded batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


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
