"""Batched, seeded sampling from a causal LM: chat-formatted responses and few-shot self-instruct prompts."""

from __future__ import annotations

import copy
import inspect
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ralign.runtime.models import format_prompt
from ralign.runtime.torchutil import device_of, eval_mode, padding_id

Progress = Callable[[int, int], None]

DEFAULT_MAX_LENGTH = 2048  # a model whose config states no context length
CHARS_PER_TOKEN_BOUND = 32  # no real text averages more characters per token than this

SELF_INSTRUCT_DROPS = ("empty", "too_short", "too_long", "truncated", "seed_duplicate", "duplicate")
# A list marker at the start of a line: "-", "*", "•", "1.", "1)", "(1)", "#1", "Q:"/"Instruction:".
_MARKER = re.compile(
    r"^\s*(?:[-*•·]+|\(?\d+[.):]|#\d+[.):]?|(?:q|question|instruction|task|prompt)\s*\d*\s*[:.)])\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’«»"


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    Args:
        text: the new tokens decoded without special tokens, stripped.
        finished: whether the model stopped with an end-of-sequence token (not the length limit).
        tokens: how many tokens were generated (the end token included).
        prompt_too_long: the text was not continued at all (`text` is "", `tokens` 0): it is longer
            than the model's context leaves room for (see `generate`).
    """

    text: str
    finished: bool
    tokens: int
    prompt_too_long: bool = False


TOO_LONG = Completion("", False, 0, prompt_too_long=True)


def _eos_ids(model, tokenizer) -> list[int]:
    """The model's stop tokens (its generation config's, else the tokenizer's eos)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _config(model, tokenizer, *, rows: int, temperature: float, top_p: float, max_new_tokens: int):
    """The model's generation config with this call's decoding settings, copied (never edited in place)."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.min_new_tokens = None
    cfg.num_return_sequences = rows
    cfg.pad_token_id = padding_id(tokenizer)
    cfg.eos_token_id = _eos_ids(model, tokenizer) or None
    cfg.use_cache = True
    cfg.do_sample = temperature > 0
    # Only the sampling knobs this call sets: no model default (top_k=50, repetition penalty...)
    # silently reshapes the distribution.
    cfg.temperature = temperature if temperature > 0 else None
    cfg.top_p = top_p if temperature > 0 else None
    # None would let generate() fill in its default top_k of 50; 0 turns it off (sampling only:
    # greedy decoding warns about any top_k it is given).
    cfg.top_k = 0 if temperature > 0 else None
    cfg.min_p = None
    cfg.typical_p = None
    cfg.repetition_penalty = None
    cfg.no_repeat_ngram_size = None
    return cfg


def generate(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
    add_special_tokens: bool = False,
    sort_by_length: bool = True,
    progress: Progress | None = None,
    max_length: int | None = None,
    prefix: str = "",
) -> list[list[Completion]]:
    """Continue each text n times, batched by token length with left padding and the KV cache.

    A text longer than `max_length - max_new_tokens` tokens (or CHARS_PER_TOKEN_BOUND times that
    in characters, judged untokenized) is dropped, never cut: it gets n `TOO_LONG` completions,
    and the other texts are batched and sampled exactly as if it had not been passed.

    Args:
        texts: the exact texts to continue.
        n: continuations per text; at temperature 0 one greedy continuation is copied n times.
        temperature, top_p, max_new_tokens: the decoding settings (top_p: sampling only).
        seed: seeds the sampler; the process's global RNG state is restored afterwards.
        batch_size: sequences (texts x rows per text) per generate call, at least one text.
        add_special_tokens: let the tokenizer add its BOS (raw text); False for chat text.
        sort_by_length: batch texts of similar length together (False: in input order, as a plain
            loop; sampled answers then differ, greedy ones not). Results keep the input order.
        progress: called as progress(texts_done, tokens_generated) after each batch.
        max_length: text plus continuation, in tokens (default: the model's positions, or 2048).
        prefix: appended to every text, and the start of every completion's `text`: an opening
            the model is made to continue (its tokens are not counted as generated).
    Returns:
        Per text, n Completions in the input order.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0
    rows = 1 if greedy else n
    budget = (max_length if max_length is not None else _max_positions(model)) - max_new_tokens
    encoded = [_encode_within(tokenizer, t + prefix, budget, add_special_tokens) for t in texts]
    kept = [i for i, ids in enumerate(encoded) if ids is not None]
    # Shortest first: similar lengths share a batch, so little compute goes to padding.
    order = sorted(kept, key=lambda i: (len(encoded[i] or ()), i)) if sort_by_length else kept
    per_batch = max(1, batch_size // rows)
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    cfg = _config(model, tokenizer, rows=rows, **sampling)
    eos = set(_eos_ids(model, tokenizer))
    pad = padding_id(tokenizer)
    device = device_of(model)
    results: list[list[Completion]] = [[] if ids is not None else [TOO_LONG] * n for ids in encoded]
    if progress is not None and len(kept) < len(texts):
        progress(len(texts) - len(kept), 0)

    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad(), eval_mode(model):
        torch.manual_seed(seed)
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            input_ids, mask = _left_padded([encoded[i] or [] for i in idx], pad)  # [B, T] each
            out = _generate_rows(model, input_ids.to(device), mask.to(device), cfg, rows)
            new = out[:, input_ids.shape[1] :].tolist()  # out: [B * rows, T + new]
            batch = [
                [_completion(tokenizer, new[b * rows + r], eos, prefix) for r in range(rows)]
                for b in range(len(idx))
            ]
            for i, row in zip(idx, batch, strict=True):
                results[i] = row * n if greedy else row  # greedy: one continuation, copied n times
            if progress is not None:
                progress(len(idx), sum(c.tokens for row in batch for c in row))
    return results


def _left_padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, [B, T] each, padded on the left to the longest row."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, ids in enumerate(batch):
        input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[b, width - len(ids) :] = 1
    return input_ids, mask


def _max_positions(model) -> int:
    """The model's context length from its config, else DEFAULT_MAX_LENGTH."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _encode_within(tokenizer, text: str, budget: int, add_special_tokens: bool) -> list[int] | None:
    """The text's token ids, or None when they are more than `budget`.

    A text of more than CHARS_PER_TOKEN_BOUND x budget characters is None without being tokenized:
    a hostile megabyte prompt costs a length check, not a tokenizer pass.
    """
    if budget < 1 or len(text) > CHARS_PER_TOKEN_BOUND * budget:
        return None
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids if len(ids) <= budget else None


def _cache_keyword(model) -> str | None:
    """The keyword under which the model's forward takes a KV cache ("cache" in recent
    Transformers, "past_key_values" before), or None (e.g. a wrapper that hides its signature)."""
    params = inspect.signature(type(model).forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _no_logits(model) -> dict[str, int]:
    """Forward arguments that skip the vocabulary projection where the model allows it: the
    prefill only fills the cache, and its logits would cost a fifth of SmolLM2's prefill."""
    params = inspect.signature(type(model).forward).parameters
    return next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})


def _generate_rows(model, input_ids, mask, cfg, rows: int):
    """`generate` with `rows` samples of each input row, each prompt encoded once.

    generate(num_return_sequences=K) copies every prompt K times before its first forward pass,
    so the prompt is encoded K times: with the quickstart's 127-token context and 24-token answers
    that is most of the sampling compute. Here the prompt less its last token runs once, its KV
    cache is repeated K times, and generate() continues from there with the same [B*K] rows in the
    same order, so the sampler makes the same draws (tests compare both ways token for token).
    """
    kw = _cache_keyword(model)
    if rows == 1 or input_ids.shape[1] < 2 or kw is None:
        return model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # Transformers before 4.56 builds it without the config
        cache = DynamicCache()
    # The positions generate() would give left-padded rows: count real tokens only.
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        **{kw: cache},
        **_no_logits(model),
    )
    cache.batch_repeat_interleave(rows)
    once = copy.deepcopy(cfg)
    once.num_return_sequences = 1
    return model.generate(
        input_ids=input_ids.repeat_interleave(rows, dim=0),
        attention_mask=mask.repeat_interleave(rows, dim=0),
        generation_config=once,
        **{kw: cache},
    )


def _completion(tokenizer, tokens: list[int], eos: set[int], prefix: str = "") -> Completion:
    """Cut at the first end token, decode without special tokens, after the forced `prefix`
    (decoded unstripped, so the space between the prefix and the first new word stays)."""
    cut = next((k for k, t in enumerate(tokens) if t in eos), None)
    kept = tokens if cut is None else tokens[:cut]
    text = (prefix + tokenizer.decode(kept, skip_special_tokens=True)).strip()
    return Completion(text, cut is not None, len(tokens) if cut is None else cut + 1)


def sample(model, tokenizer, prompts: Sequence[str], **kwargs: Any) -> list[list[str]]:
    """`sample_completions`, texts only."""
    return [
        [c.text for c in row] for row in sample_completions(model, tokenizer, prompts, **kwargs)
    ]


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
    context: Sequence[str | None] | None = None,
    sort_by_length: bool = True,
    progress: Progress | None = None,
    max_length: int | None = None,
    prefix: str = "",
) -> list[list[Completion]]:
    """Sample responses to prompts, each wrapped as a user turn with the chat template.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (its chat template formats the turn).
        prompts: the user prompts.
        per_prompt: K responses per prompt.
        temperature: 0 = greedy (the K responses are then identical).
        top_p: nucleus sampling mass.
        max_new_tokens: the most tokens per response.
        seed: the same inputs and seed give the same responses.
        batch_size: sequences per generate call.
        context: optional, per prompt, a full text (already rendered with the prompt inside) to
            wrap instead of the bare prompt; None or "" entries fall back to the prompt.
        sort_by_length: batch prompts of similar token length together (see `generate`).
        progress: called as progress(prompts_done, tokens_generated) after each batch.
        max_length: as `generate`'s: an over-long prompt gets K `TOO_LONG` completions. One
            certainly too long by its characters is never even formatted.
        prefix: every response starts with this text, which the model continues (after the
            chat template's generation prompt): a forced opening, part of each `text`.
    Returns:
        Per prompt, K Completions (text: the prefix and the new tokens, special tokens skipped,
        stripped; and whether each ended on its own).
    """
    if context is not None and len(context) != len(prompts):
        raise ValueError(f"context has {len(context)} entries for {len(prompts)} prompts")
    chosen = [
        context[i] if context is not None and context[i] else p for i, p in enumerate(prompts)
    ]
    budget = (max_length if max_length is not None else _max_positions(model)) - max_new_tokens
    kept = [i for i, text in enumerate(chosen) if len(text) <= CHARS_PER_TOKEN_BOUND * budget]
    texts = [format_prompt(tokenizer, chosen[i]) for i in kept]
    done = generate(
        model,
        tokenizer,
        texts,
        n=per_prompt,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        # A chat template writes its own special tokens; without one the text is plain.
        add_special_tokens=not getattr(tokenizer, "chat_template", None),
        sort_by_length=sort_by_length,
        progress=progress,
        max_length=max_length,
        prefix=prefix,
    )
    out = [[TOO_LONG] * per_prompt for _ in prompts]
    for i, row in zip(kept, done, strict=True):
        out[i] = row
    if progress is not None and len(kept) < len(prompts):
        progress(len(prompts) - len(kept), 0)
    return out


def generated_tokens(rows: Sequence[Sequence[Completion]], temperature: float) -> int:
    """Tokens a sampling call generated (end tokens included); a greedy row is one continuation
    copied, so it counts once."""
    if temperature == 0:
        return sum(row[0].tokens for row in rows if row)
    return sum(c.tokens for row in rows for c in row)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def clean_instruction(
    completion: Completion, *, min_words: int = 3, max_words: int = 100
) -> tuple[str | None, str | None]:
    """The instruction in a self-instruct continuation, or why there is none.

    Keeps the first non-blank line, strips a leading list marker and surrounding quotes.

    Args:
        completion: the raw continuation.
        min_words: fewer words than this is "too_short".
        max_words: more words than this is "too_long".
    Returns:
        (instruction, None) or (None, reason) with reason one of "empty", "too_short",
        "too_long", "truncated" (the line never ended: no newline and the length limit was hit).
    """
    text = completion.text.lstrip()
    line, newline, _ = text.partition("\n")
    if not newline and not completion.finished and line.strip():
        return None, "truncated"
    line = line.strip()
    # Markers and quotes can nest ('1. "Write ..."'), so strip until nothing changes.
    while True:
        stripped = _MARKER.sub("", line, count=1).strip().strip(_QUOTES).strip()
        if stripped == line:
            break
        line = stripped
    words = len(line.split())
    if words == 0:
        return None, "empty"
    if words < min_words:
        return None, "too_short"
    if words > max_words:
        return None, "too_long"
    return line, None


def self_instruct(
    model,
    tokenizer,
    render_few_shot: Callable[[list[str]], str],
    seeds: Sequence[str],
    *,
    count: int,
    shots: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_p: float = 1.0,
    batch_size: int = 32,
    min_words: int = 3,
    max_words: int = 100,
    progress: Progress | None = None,
) -> tuple[list[str], dict]:
    """Few-shot self-instruct: the model continues a list of example instructions with a new one.

    Each of `count` prompts shows `shots` seed instructions drawn at random (seeded) and is a
    completion prompt: it is NOT wrapped in the chat template, and the tokenizer adds its usual
    BOS. The first line of each continuation is kept after cleaning (`clean_instruction`).

    Args:
        render_few_shot: builds the prompt from the chosen examples, ending where the model goes on.
        seeds: the example instructions; `shots` of them per prompt (all, when there are fewer).
        count: continuations to generate.
        seed: seeds both the example choice and the sampler (the rest as `generate`).
        min_words, max_words: shorter or longer instructions are dropped ("too_short"/"too_long").
    Returns:
        (instructions, stats): the kept instructions in generation order; stats with "requested",
        "kept" and "dropped" (a count for each of SELF_INSTRUCT_DROPS: the cleaning reasons, plus
        "seed_duplicate" = same as a seed and "duplicate" = same as an earlier kept one, both
        compared case- and whitespace-insensitively).
    """
    if not seeds:
        raise ValueError("self_instruct needs at least one seed instruction")
    rng = random.Random(seed)
    k = min(shots, len(seeds))
    texts = [render_few_shot(rng.sample(list(seeds), k)) for _ in range(count)]
    done = generate(
        model,
        tokenizer,
        texts,
        n=1,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        add_special_tokens=True,
        progress=progress,
    )
    seen_seeds = {_norm(s) for s in seeds}
    seen: set[str] = set()
    kept: list[str] = []
    dropped = dict.fromkeys(SELF_INSTRUCT_DROPS, 0)
    for (completion,) in done:
        text, reason = clean_instruction(completion, min_words=min_words, max_words=max_words)
        if text is not None:
            key = _norm(text)
            reason = "seed_duplicate" if key in seen_seeds else "duplicate" if key in seen else None
            if reason is None:
                seen.add(key)
                kept.append(text)
                continue
        dropped[reason] += 1
    generated = sum(row[0].tokens for row in done)
    return kept, {
        "requested": count,
        "kept": len(kept),
        "dropped": dropped,
        "generated_tokens": generated,
    }
