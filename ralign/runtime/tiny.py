"""Tiny random-init causal LMs with their own byte-level BPE tokenizer, built offline for tests."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ENDOFTEXT, PAD, BOS, EOS, IM_START = (
    "<|endoftext|>",
    "<|pad|>",
    "<|bos|>",
    "<|im_end|>",
    "<|im_start|>",
)
SPECIAL_TOKENS = (ENDOFTEXT, PAD, BOS, EOS, IM_START)

# Labels the ranker reads one token at a time: each is a single token bare and after a space,
# except that qwen2 (like the real Qwen2 tokenizer) splits every digit from a preceding space.
LETTERS, DIGITS = tuple("ABCDEFGH"), tuple("0123456789")
LABELS = LETTERS + DIGITS

# Qwen2's own split: transformers 5 loads any qwen2 folder with Qwen2Tokenizer, which imposes it.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MARKER = "ralign_tiny.json"  # written last: its presence means the folder is a complete build
HIDDEN, LAYERS, HEADS, MAX_POSITIONS = 64, 2, 4, 512


# The words the tiny corpus is drawn from (order matters: the draws are seeded).
_SUBJECTS = "The cat|A dog|My friend|The teacher|Our team|The model|She|He|Alice|Bob|Every student|The old farmer|A small robot|They|We".split(
    "|"
)
_VERBS = "reads|writes|answers|likes|checks|finds|explains|counts|paints|carries|builds|remembers|questions|describes|follows".split(
    "|"
)
_OBJECTS = "the book|a letter|the question|every answer|the numbers|a story|the green box|a bright lamp|the long river|a quiet song|the map".split(
    "|"
)
_PLACES = "at home|in the park|at school|on Monday|before lunch|after dinner|near the window|under the bridge|during winter|with great care".split(
    "|"
)
_NOUNS = "apples|books|chairs|birds|coins|pens|cups|stars|trees|shoes|clouds|horses|letters|stones|boats|flowers".split(
    "|"
)


def corpus() -> list[str]:
    """A few hundred varied English sentences, fixed (no randomness leaks in from outside)."""
    rng = random.Random(1234)
    lines = []
    for _ in range(200):
        s, v, o, p = (rng.choice(x) for x in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES))
        lines.append(f"{s} {v} {o} {p}.")
    for _ in range(150):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        label = rng.choice(LETTERS)
        lines.append(f"Question: What is {a} plus {b}? Answer: {a + b}")
        lines.append(f"I have {a} {rng.choice(_NOUNS)} and {b} {rng.choice(_NOUNS)}.")
        opts = " ".join(f"{c}) {rng.choice(_NOUNS)}" for c in LETTERS[:4])
        lines.append(f"Which one is best? {opts} Answer: {label}")
        lines.append(f"Rate the reply from 1 to 9. Score: {a}")
    for c in LABELS:
        lines.append(f"The answer is {c}. Answer: {c}")
    lines += [
        "Be helpful, honest and kind.",
        "Please explain your reasoning step by step.",
        "Thank you for the clear answer!",
        "Is this response good? Yes or no.",
        "Why is the sky blue? Because light scatters.",
        "Summarize the text in one sentence, then stop.",
    ]
    return lines


def _pre_tokenizer(arch: str) -> pre_tokenizers.PreTokenizer:
    if arch == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def train_tokenizer(arch: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus()` with the labels single tokens.

    Args:
        arch: picks the pre-tokenizer ("qwen2" uses Qwen2's split, others GPT-2's).
        vocab_size: the most tokens the result may hold (specials included).
    Returns:
        A fast tokenizer with pad/bos/eos tokens and a ChatML-like chat template.
    """
    if vocab_size < 320:
        raise ValueError(f"vocab_size must be at least 320 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(arch)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # A space before a digit never reaches the BPE with Qwen2's split, so no merge can help there.
    tok = _force_merges(tok, LETTERS if arch == "qwen2" else LABELS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=ENDOFTEXT,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _force_merges(tok: Tokenizer, labels: tuple[str, ...]) -> Tokenizer:
    """Make "Ġ"+label a top-priority merge for each label, dropping the newest merges to keep size.

    Dropping merges from the end is safe: no later merge can use the token the last merge made.
    """
    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    missing = [("Ġ", c) for c in labels if "Ġ" + c not in vocab]
    for pair in missing:
        a, b = merges.pop()
        free_id = vocab.pop(a + b)
        vocab[pair[0] + pair[1]] = free_id
    spec["model"]["merges"] = [list(m) for m in missing] + [list(m) for m in merges]
    return Tokenizer.from_str(json.dumps(spec))


def _config(arch: str, vocab_size: int, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return CONFIGS[arch](vocab_size, ids)


CONFIGS: dict[str, Callable[[int, dict], PretrainedConfig]] = {
    "llama": lambda v, ids: LlamaConfig(
        vocab_size=v,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        **ids,
    ),
    "gpt2": lambda v, ids: GPT2Config(
        vocab_size=v, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITIONS, **ids
    ),
    "qwen2": lambda v, ids: Qwen2Config(
        vocab_size=v,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        **ids,
    ),
}


def build_tiny_model(
    arch: str, out_dir: str | Path, *, seed: int = 0, vocab_size: int = 512
) -> Path:
    """Build (or reuse) a tiny random-init causal LM plus tokenizer in `out_dir`.

    Args:
        arch: one of "llama", "gpt2", "qwen2".
        out_dir: folder to write; reused as-is when it already holds this exact build.
        seed: seeds the weight init; the same seed gives the same bytes.
        vocab_size: tokenizer and embedding size.
    Returns:
        `out_dir` as a Path, loadable with AutoModelForCausalLM / AutoTokenizer.
    """
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(CONFIGS)}")
    out = Path(out_dir)
    want = {"arch": arch, "seed": seed, "vocab_size": vocab_size}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return out

    tok = train_tokenizer(arch, vocab_size)
    config = _config(arch, vocab_size, tok)
    # fork_rng: seed the init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id

    # Build beside the target and rename, so a crash or a concurrent builder never leaves half a folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(want, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
