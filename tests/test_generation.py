"""Sampling and self-instruct on tiny random models: shapes, seeding, batching, padding and cleaning."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from ralign.runtime.generation import (
    SELF_INSTRUCT_DROPS,
    Completion,
    clean_instruction,
    generate,
    sample,
    sample_completions,
    self_instruct,
)
from ralign.runtime.models import format_prompt

PROMPTS = [
    "What is 2 plus 3?",
    "Hi",
    "Please explain your reasoning step by step, and then summarize the text in one sentence.",
    "The cat reads the book at home.",
    "Why is the sky blue?",
]
SEEDS = ["Write a poem about cats.", "Explain gravity to a child.", "List three red fruits."]


def few_shot(examples: list[str]) -> str:
    return "Instructions:\n" + "".join(f"- {e}\n" for e in examples) + "-"


def test_k_samples_per_prompt_and_seeded(tiny_models):
    model, tok = tiny_models("llama")
    kw = dict(per_prompt=3, temperature=1.0, max_new_tokens=6, seed=7, batch_size=6)
    first = sample(model, tok, PROMPTS, **kw)
    torch.rand(100)  # global RNG use in between must not matter
    again = sample(model, tok, PROMPTS, **kw)
    other = sample(model, tok, PROMPTS, **{**kw, "seed": 8})
    assert [len(r) for r in first] == [3] * len(PROMPTS)
    assert all(isinstance(s, str) and s == s.strip() for r in first for s in r)
    assert first == again
    assert first != other
    assert len({s for r in first for s in r}) > len(PROMPTS)  # sampling: not all copies


def test_global_rng_is_left_alone(tiny_models):
    model, tok = tiny_models("llama")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(model, tok, PROMPTS[:2], per_prompt=2, temperature=1.0, max_new_tokens=4, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_sorted_batching_matches_one_by_one_greedy(tiny_models, arch):
    model, tok = tiny_models(arch)
    kw = dict(per_prompt=2, temperature=0.0, max_new_tokens=6, seed=0)
    batched = sample(model, tok, PROMPTS[:4], batch_size=64, **kw)
    alone = [sample(model, tok, [p], batch_size=1, **kw)[0] for p in PROMPTS[:4]]
    assert batched == alone  # order restored, and left padding changes nothing
    assert all(r[0] == r[1] for r in batched)  # greedy: the K copies are identical


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_prompts_encoded_once_sample_what_k_copies_sample(tiny_models, arch, monkeypatch):
    """Each prompt's KV cache is computed once and repeated for its K samples; the answers are
    token for token those of generate(num_return_sequences=K), which encodes every copy."""
    import ralign.runtime.generation as gen

    model, tok = tiny_models(arch)
    kw = dict(per_prompt=3, temperature=1.0, max_new_tokens=8, seed=5, batch_size=6)
    encoded = []
    forward = type(model).forward

    @functools.wraps(forward)  # keeps the signature, which says how the model takes a cache
    def counting(self, *args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a prefill, which needs no logits
            encoded.append(ids.shape[0])
            assert kwargs.get("logits_to_keep") == 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    shared = gen.sample_completions(model, tok, PROMPTS, **kw)
    assert encoded == [2, 2, 1]  # 5 prompts, 2 a batch (6 rows / 3 samples), each encoded once
    monkeypatch.setattr(type(model), "forward", forward)
    monkeypatch.setattr(gen, "_cache_keyword", lambda model: None)  # generate()'s own copies
    copies = gen.sample_completions(model, tok, PROMPTS, **kw)
    assert shared == copies
    assert len({c.text for row in shared for c in row}) > len(PROMPTS)  # really sampled


def test_left_padding_and_length_sorted_batches(tiny_models, monkeypatch):
    model, tok = tiny_models("llama")
    calls = []
    real = model.generate

    def spy(**kwargs):
        calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    sample(
        model, tok, PROMPTS, per_prompt=2, temperature=1.0, max_new_tokens=3, seed=0, batch_size=4
    )
    # 4 rows per call = 2 prompts x 2 samples, each prompt's rows side by side (its cache is shared)
    assert [ids.shape[0] for ids, _ in calls] == [4, 4, 2]
    assert all(torch.equal(ids[0::2], ids[1::2]) for ids, _ in calls)
    lengths = [
        len(tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS
    ]
    seen = [int(n) for _, mask in calls for n in mask.sum(1)]
    assert seen[0::2] == sorted(lengths)  # shortest prompts share the first batch
    for ids, mask in calls:
        assert bool(mask[:, -1].all())  # every row ends on a real token: padding is on the left
        assert bool((ids[mask == 0] == tok.pad_token_id).all())


def _texts_fed(model, tok, monkeypatch) -> list[str]:
    """A list that collects, decoded, every text `model.generate` is given from now on."""
    seen: list[str] = []
    real = model.generate

    def spy(**kwargs):
        seen.extend(
            tok.decode(row[m.bool()])
            for row, m in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True)
        )
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_context_replaces_the_bare_prompt(tiny_models, monkeypatch):
    model, tok = tiny_models("llama")
    seen = _texts_fed(model, tok, monkeypatch)
    sample(
        model,
        tok,
        ["p1", "p2"],
        context=["Earlier turns, then: p1", None],
        per_prompt=1,
        temperature=0.0,
        max_new_tokens=2,
        seed=0,
    )
    assert sorted(seen) == sorted(
        [format_prompt(tok, "Earlier turns, then: p1"), format_prompt(tok, "p2")]
    )


def test_a_forced_prefix_is_continued_and_starts_every_answer(tiny_models, monkeypatch):
    """`prefix`: the model continues an opening it did not write; the answer's text is the
    opening plus what followed, joined exactly as the tokens decode (no space added or lost)."""
    model, tok = tiny_models("llama")
    prefix = "I'm sorry, but I"
    seen = _texts_fed(model, tok, monkeypatch)
    kw = dict(per_prompt=2, temperature=0.0, max_new_tokens=5, seed=0)
    forced = sample_completions(model, tok, ["p1", "p2"], prefix=prefix, **kw)
    assert sorted(seen) == sorted(format_prompt(tok, p) + prefix for p in ["p1", "p2"])
    texts = [format_prompt(tok, p) + prefix for p in ["p1", "p2"]]
    plain = generate(model, tok, texts, n=1, temperature=0.0, max_new_tokens=5, seed=0)
    for row, (alone,) in zip(forced, plain, strict=True):
        assert all(c.text.startswith(prefix) for c in row)
        assert row[0].tokens == alone.tokens  # the prefix's tokens are not counted as generated
        # The same continuation, joined to the prefix as decoded (a leading space kept).
        assert row[0].text.removeprefix(prefix).strip() == alone.text
        assert row[0].text == row[1].text


def test_progress_counts_prompts_and_tokens(tiny_models):
    model, tok = tiny_models("llama")
    reports = []
    sample(
        model,
        tok,
        PROMPTS,
        per_prompt=2,
        temperature=1.0,
        max_new_tokens=5,
        seed=0,
        batch_size=4,
        progress=lambda n, t: reports.append((n, t)),
    )
    assert sum(n for n, _ in reports) == len(PROMPTS)
    assert 0 < sum(t for _, t in reports) <= len(PROMPTS) * 2 * 5


def test_generate_cuts_at_end_token(tiny_models):
    model, tok = tiny_models("llama")
    (done,) = generate(model, tok, ["Hi"], n=1, temperature=0.0, max_new_tokens=4, seed=0)
    assert len(done) == 1 and isinstance(done[0], Completion)
    assert done[0].finished or done[0].tokens == 4


@pytest.mark.parametrize(
    "text, finished, expected",
    [
        ("Write a haiku about rain.\n- next one", False, ("Write a haiku about rain.", None)),
        ("  Describe the moon in detail.", True, ("Describe the moon in detail.", None)),
        ("- Name three rivers in Europe.\n", False, ("Name three rivers in Europe.", None)),
        ('3. "Summarize this short story."\n', False, ("Summarize this short story.", None)),
        ("(2) 'Give me a recipe'\n", False, ("Give me a recipe", None)),
        ("Instruction: Plan a week of meals.\n", False, ("Plan a week of meals.", None)),
        ("\n\nTranslate this sentence please\n", False, ("Translate this sentence please", None)),
        ("", True, (None, "empty")),
        ("-  \nSecond line here too", False, (None, "empty")),
        ('""', True, (None, "empty")),
        ("Hello there\n", False, (None, "too_short")),
        ("one two three four five six\n", False, ("one two three four five six", None)),
        ("word " * 101 + "\n", False, (None, "too_long")),
        ("An instruction that never ended because", False, (None, "truncated")),
        (
            "An instruction that ended at the end token",
            True,
            ("An instruction that ended at the end token", None),
        ),
    ],
)
def test_clean_instruction(text, finished, expected):
    assert clean_instruction(Completion(text, finished, 1), min_words=3, max_words=100) == expected


def test_self_instruct_counts_every_completion(tiny_models):
    model, tok = tiny_models("llama")
    kw = dict(count=12, shots=2, temperature=1.0, max_new_tokens=12, seed=0)
    kept, stats = self_instruct(model, tok, few_shot, SEEDS, **kw)
    again = self_instruct(model, tok, few_shot, SEEDS, **kw)
    assert (kept, stats) == again
    assert set(stats["dropped"]) == set(SELF_INSTRUCT_DROPS)
    assert stats["requested"] == 12
    assert stats["kept"] == len(kept)
    assert len(kept) + sum(stats["dropped"].values()) == 12


def test_self_instruct_drops_and_counts_empty(tiny_models, tmp_path):
    # Zero the final norm: every logit is 0, greedy picks token 0 ("<|endoftext|>", special),
    # which decodes to nothing, so every continuation is empty.
    model, tok = tiny_models("llama")
    silent = AutoModelForCausalLM.from_pretrained(model.name_or_path).eval()
    with torch.no_grad():
        silent.model.norm.weight.zero_()
    kept, stats = self_instruct(
        silent, tok, few_shot, SEEDS, count=5, shots=2, temperature=0.0, max_new_tokens=4, seed=0
    )
    assert kept == []
    assert stats["dropped"]["empty"] == 5


def test_self_instruct_drops_seed_copies_and_duplicates(tiny_models, monkeypatch):
    import ralign.runtime.generation as gen

    model, tok = tiny_models("llama")
    scripted = [
        "write a poem  about cats.\n",  # a seed, up to case and spaces
        "Design a board game for kids.\n",
        "Design a board game for kids.\n",  # repeats the kept one
        "ok\n",
    ]
    monkeypatch.setattr(
        gen, "generate", lambda *a, **k: [[Completion(t, False, 3)] for t in scripted]
    )
    kept, stats = self_instruct(
        model, tok, few_shot, SEEDS, count=4, shots=2, temperature=1.0, max_new_tokens=8, seed=0
    )
    assert kept == ["Design a board game for kids."]
    assert stats["dropped"]["seed_duplicate"] == 1
    assert stats["dropped"]["duplicate"] == 1
    assert stats["dropped"]["too_short"] == 1


def test_no_hidden_top_k(tiny_models):
    # At a huge temperature the next token is near uniform over all 512; transformers' default
    # top_k=50 would cap the distinct first tokens at 50.
    model, tok = tiny_models("llama")
    (row,) = generate(
        model, tok, ["Hi"], n=300, temperature=1e4, max_new_tokens=1, seed=0, batch_size=300
    )
    assert len({c.text for c in row}) > 60


def test_dropout_is_off_while_generating_and_mode_restored(tiny_models):
    model, tok = tiny_models("gpt2")  # GPT-2 has dropout 0.1 by default
    kw = dict(per_prompt=1, temperature=0.0, max_new_tokens=6, seed=0)
    expected = sample(model, tok, PROMPTS[:2], **kw)
    model.train()
    try:
        assert sample(model, tok, PROMPTS[:2], **kw) == expected
        assert model.training
    finally:
        model.eval()
