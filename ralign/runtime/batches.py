"""Training batches: tokenized rows, and the layouts they are batched in (padded or packed).

Every layout also says what it scores, so the trainers need not know which one they got:
"at" (N,) the flat position in input_ids (B*T) whose logits predict each counted token,
"targets" (N,) those tokens, and "counted" (S, W) bool, sequence by sequence, True where a
sequence's token counts, in the order of "targets" (row-major). S is the number of sequences:
rows for `collate`, examples for `pack`, chosen then rejected for the pair layouts. "lengths" (S,)
is each sequence's tokens, prompt included: the tokens trained on, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ralign.losses import IGNORE, next_token_mask
from ralign.runtime.models import format_prompt


@dataclass(frozen=True)
class Row:
    """One tokenized training sequence: prompt then response, labels IGNORE on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class PairRow:
    """One tokenized preference pair sharing a prompt, and its weight in the loss."""

    chosen: Row
    rejected: Row
    weight: float = 1.0


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
    False mark an answer cut off by the length limit (no EOS); "weight" (default 1) is kept.
    """
    rows = _encode_with_prompts(
        tokenizer,
        [p["prompt"] for p in pairs],
        [[p["chosen"], p["rejected"]] for p in pairs],
        max_length,
        [[p.get("chosen_finished", True), p.get("rejected_finished", True)] for p in pairs],
    )
    return [
        PairRow(*r, weight=float(p.get("weight", 1.0)))
        for r, p in zip(rows, pairs, strict=True)
        if r is not None
    ]


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
    lengths = torch.tensor([len(r.input_ids) for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "lengths": lengths,
        **scoring(labels),
    }


def scoring(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a padded (B, T) batch scores: position t predicts token t+1 of the same row."""
    counted = next_token_mask(labels)
    rows, cols = counted.nonzero(as_tuple=True)
    return {
        "at": rows * labels.shape[1] + cols,
        "targets": labels[:, 1:][counted],
        "counted": counted,
    }


def collate_pairs(rows: Sequence[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, T) batch, so one forward pass scores both."""
    return collate([r.chosen for r in rows] + [r.rejected for r in rows], pad_id)


def _counted(rows: Sequence[Row]) -> torch.Tensor:
    """(S, W) bool: which of each row's positions predict a counted token, as `scoring` has it."""
    width = max(len(r.labels) for r in rows) - 1
    counted = torch.zeros((len(rows), max(width, 0)), dtype=torch.bool)
    for i, r in enumerate(rows):
        counted[i, : len(r.labels) - 1] = torch.tensor([x != IGNORE for x in r.labels[1:]])
    return counted


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices grouped into lines of at most `width` tokens: first fit, longest row first."""
    lines: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep order
        for j, u in enumerate(used):
            if u + lengths[i] <= width:
                lines[j].append(i)
                used[j] += lengths[i]
                break
        else:
            lines.append([i])
            used.append(lengths[i])
    return lines


def pack(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows end to end on as few lines as hold them, none longer than the longest row.

    Padding shrinks to the lines' leftover tails where short rows fit together (with rows of very
    different lengths, much of a padded batch's compute goes to padding; with lengths alike, rows
    keep a line each and nothing changes). Position ids restart at 0 on every row; given no attention
    mask, transformers reads the restarts as sequence boundaries and keeps each row's attention
    within itself, so a row is scored exactly as alone (packing without cross-contamination:
    Krell et al. 2021, arXiv:2107.02027; tests/test_batches.py compares it with `collate`).

    Args:
        rows: encoded rows.
        pad_id: unused (the signature is `collate`'s): see below.
    Returns:
        input_ids and position_ids (L, W); at and targets (N,); counted (len(rows), W-1) in
        row order, so the scores read back per row as with `collate`.
    """
    lengths = [len(r.input_ids) for r in rows]
    width = max(lengths)
    lines = _first_fit(lengths, width)
    # Tails are filled with the line's first token, not padding: nothing reads them, and a padding
    # id in a batch without an attention mask makes transformers warn on every step.
    ids = torch.tensor([[rows[m[0]].input_ids[0]] * width for m in lines], dtype=torch.long)
    positions = torch.zeros((len(lines), width), dtype=torch.long)
    starts = [0] * len(rows)  # where each row sits, flat
    for j, members in enumerate(lines):
        offset = 0
        for i in members:
            n = lengths[i]
            ids[j, offset : offset + n] = torch.tensor(rows[i].input_ids)
            positions[j, offset : offset + n] = torch.arange(n)
            starts[i] = j * width + offset
            offset += n
    counted = _counted(rows)
    which, cols = counted.nonzero(as_tuple=True)
    targets = [
        r.labels[t + 1] for r in rows for t in range(len(r.labels) - 1) if r.labels[t + 1] != IGNORE
    ]
    return {
        "input_ids": ids,
        "position_ids": positions,
        "at": torch.tensor(starts)[which] + cols,
        "targets": torch.tensor(targets, dtype=torch.long),
        "counted": counted,
        "lengths": torch.tensor(lengths),
    }


def _prompt_length(row: Row) -> int:
    """Tokens before the response (all of them when nothing counts, e.g. an empty cut-off answer)."""
    return next((i for i, x in enumerate(row.labels) if x != IGNORE), len(row.labels))


def pack_pairs(rows: Sequence[PairRow], pad_id: int, mask_kind: str) -> dict[str, torch.Tensor]:
    """Each pair on one line, its prompt once: prompt, chosen response, rejected response.

    The rejected response attends to the prompt and to itself, never to the chosen one, and its
    positions continue from the prompt's, so each response is scored exactly as after the prompt
    alone, while the prompt runs through the model once instead of twice (prefix sharing: Wang et
    al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv:2410.20305).

    Args:
        rows: encoded pairs; both responses of a pair start at one position.
        pad_id: padding token id.
        mask_kind: "bool" (True attends; sdpa) or "float" (0 or the float32 minimum, added to
            the scores; eager attention).
    Returns:
        input_ids and position_ids (B, W), attention_mask (B, 1, W, W), at and targets (N,),
        counted (2B, T-1) chosen rows then rejected rows, as `collate_pairs` orders them.
    """
    lines: list[tuple[int, ...]] = []
    positions: list[list[int]] = []
    at: list[int] = []
    rejected_at: list[int] = []
    width = max(
        len(r.chosen.input_ids) + len(r.rejected.input_ids) - _prompt_length(r.chosen) for r in rows
    )
    allowed = torch.ones((len(rows), width, width), dtype=torch.bool).tril()
    for i, pair in enumerate(rows):
        chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
        n, c = _prompt_length(pair.chosen), len(chosen)
        if _prompt_length(pair.rejected) != n:
            raise ValueError("a pair's two responses must start at one position")
        lines.append(chosen + rejected[n:])
        positions.append(list(range(c)) + list(range(n, len(rejected))))
        allowed[i, c : c + len(rejected) - n, n:c] = False
        base = i * width
        # Token u of a response is predicted at its token u-1: in the prompt, or in that response.
        at += [base + u - 1 for u in range(n, c)]
        rejected_at += [
            base + (u - 1 if u == n else c + u - 1 - n) for u in range(n, len(rejected))
        ]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (line, p) in enumerate(zip(lines, positions, strict=True)):
        ids[i, : len(line)] = torch.tensor(line)
        pos[i, : len(p)] = torch.tensor(p)
    sequences = [r.chosen for r in rows] + [r.rejected for r in rows]
    targets = [
        row.labels[u] for row in sequences for u in range(_prompt_length(row), len(row.labels))
    ]
    mask: torch.Tensor = allowed.unsqueeze(1)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "attention_mask": mask,
        "at": torch.tensor(at + rejected_at, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "counted": _counted(sequences),
        "lengths": torch.tensor([len(r.input_ids) for r in sequences]),
    }
