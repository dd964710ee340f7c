"""Packed batch layouts score every sequence exactly as one padded row each does.

`pack` (SFT: rows end to end, position ids restarting) and `pack_pairs` (DPO: the prompt once,
then both responses, the rejected one masked from the chosen one) must give the same per-token
log-probs and the same gradients as `collate` / `collate_pairs`, on every architecture listed in
`train.PACKABLE`, under both attention implementations that take a 4D mask.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.losses import IGNORE
from ralign.runtime.batches import (
    PairRow,
    Row,
    collate,
    collate_pairs,
    encode_examples,
    encode_pairs,
    pack,
    pack_pairs,
)
from ralign.runtime.tiny import build_tiny_model
from ralign.runtime.train import PACKABLE, batch_token_logps, packing, train_dpo, train_sft

# Prompts and responses of very different lengths, so padding and packing both have work to do.
EXAMPLES = [
    {"prompt": "Hi", "response": " ".join(["Hello there, how can I help you today?"] * 12)},
    {"prompt": "Name three colours that appear in a rainbow, please.", "response": "Red."},
    {"prompt": "What is two plus two?", "response": "Four, because two and two make four."},
    {"prompt": "A", "response": "B"},
    {"prompt": "Tell me something about the sea and the ships on it.", "response": "It is wet."},
]
PAIRS = [
    {"prompt": e["prompt"], "chosen": e["response"], "rejected": r}
    for e, r in zip(
        EXAMPLES,
        ["No.", "Blue and green and also purple.", "Five", "C D E F", "Salty."],
        strict=True,
    )
]


@pytest.fixture(scope="module", params=sorted(PACKABLE))
def arch(request, tmp_path_factory):
    path = build_tiny_model(request.param, tmp_path_factory.mktemp("tiny") / request.param)
    return request.param, path


def _model(path, attn: str = "sdpa"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    return model.float().eval()


def _logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logps, counted = batch_token_logps(model, batch)
    # A loss that weighs every token differently, so a token scored at a wrong place shows.
    weights = torch.arange(1, counted.sum() + 1, dtype=torch.float32)
    (logps[counted] * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), counted, grads


def _assert_same(a, b):
    (la, ca, ga), (lb, cb, gb) = a, b
    assert torch.equal(ca, cb)
    assert torch.allclose(la, lb, atol=1e-5, rtol=0), (la - lb).abs().max()
    assert ga.keys() == gb.keys()
    for name in ga:  # relative to the largest entry: the weighted loss makes gradients large
        assert (ga[name] - gb[name]).abs().max() <= 1e-5 * gb[name].abs().max(), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pack_scores_rows_as_collate(arch, attn):
    name, path = arch
    tok = AutoTokenizer.from_pretrained(path)
    model = _model(path, attn)
    assert packing(model, 512) is not None, f"{name} with {attn} attention should pack"
    rows = [r for r in encode_examples(tok, EXAMPLES, 512) if r is not None]
    packed = pack(rows, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(rows)  # rows did share lines
    assert torch.equal(packed["lengths"], collate(rows, tok.pad_token_id)["lengths"])
    _assert_same(
        _logps_and_grads(model, packed), _logps_and_grads(model, collate(rows, tok.pad_token_id))
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pack_pairs_scores_pairs_as_collate_pairs(arch, attn):
    name, path = arch
    tok = AutoTokenizer.from_pretrained(path)
    model = _model(path, attn)
    kind = packing(model, 1024)
    assert kind == {"sdpa": "bool", "eager": "float"}[attn]
    rows = encode_pairs(tok, PAIRS, 512)
    packed = pack_pairs(rows, tok.pad_token_id, kind)
    padded = collate_pairs(rows, tok.pad_token_id)
    # The prompt is fed once: fewer token positions than two padded rows per pair.
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert torch.equal(packed["lengths"], padded["lengths"])  # the tokens trained on, the same
    _assert_same(_logps_and_grads(model, packed), _logps_and_grads(model, padded))


def test_pack_layout_by_hand():
    rows = [
        Row((1, 2, 3), (IGNORE, 2, 3)),
        Row((4, 5, 6, 7, 8), (IGNORE, IGNORE, 6, 7, 8)),
        Row((9, 10), (IGNORE, 10)),
    ]
    batch = pack(rows, pad_id=0)
    # Longest first: [4..8] fills a line of 5; [1,2,3] then [9,10] share the second.
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    # Row order: row 0's tokens 2, 3 (predicted at flat 5, 6), row 1's 6, 7, 8 (at 1, 2, 3),
    # row 2's 10 (at 8).
    assert batch["targets"].tolist() == [2, 3, 6, 7, 8, 10]
    assert batch["at"].tolist() == [5, 6, 1, 2, 3, 8]
    assert batch["counted"].tolist() == [
        [True, True, False, False],
        [False, True, True, True],
        [True, False, False, False],
    ]


def test_pack_pairs_layout_by_hand():
    # Prompt (1, 2), chosen (3, 4), rejected (5, 6, 7).
    pair = PairRow(
        Row((1, 2, 3, 4), (IGNORE, IGNORE, 3, 4)), Row((1, 2, 5, 6, 7), (IGNORE, IGNORE, 5, 6, 7))
    )
    batch = pack_pairs([pair], pad_id=0, mask_kind="bool")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    # Chosen 3, 4 predicted at 1, 2; rejected 5 at the prompt's last token (1), 6 at 4, 7 at 5.
    assert batch["targets"].tolist() == [3, 4, 5, 6, 7]
    assert batch["at"].tolist() == [1, 2, 1, 4, 5]
    mask = batch["attention_mask"][0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False]  # not the chosen
    assert mask[6].tolist() == [True, True, False, False, True, True, True]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]  # causal
    floats = pack_pairs([pair], pad_id=0, mask_kind="float")["attention_mask"][0, 0]
    assert torch.equal(floats == 0, mask)


def test_not_packed_where_it_would_differ(arch):
    _, path = arch
    model = _model(path)
    assert packing(model, 64) is not None
    model.config.sliding_window, model.config.use_sliding_window = 32, True
    assert packing(model, 64) is None  # a window shorter than a packed line
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert packing(model, 64) is None  # takes no 4D mask


def test_training_packed_equals_padded(tiny_llama, monkeypatch):
    """Whole runs: the same losses step by step, and the same weights, packed or not."""
    import ralign.runtime.train as train

    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def run(kind):
        model = _model(tiny_llama).train()
        reference = _model(tiny_llama)
        losses = []
        on_step = lambda step, m: losses.append(m["loss"])  # noqa: E731
        common = dict(lr=1e-3, epochs=2, batch_size=3, seed=0, on_step=on_step)
        if kind == "sft":
            train_sft(model, tok, EXAMPLES, **common)
        else:
            train_dpo(model, tok, PAIRS, beta=0.1, reference_model=reference, **common)
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    for kind in ("sft", "dpo"):
        packed_losses, packed_weights = run(kind)
        with monkeypatch.context() as m:
            m.setattr(train, "packing", lambda model, longest: None)
            padded_losses, padded_weights = run(kind)
        assert packed_losses == pytest.approx(padded_losses, abs=1e-5)
        assert torch.allclose(packed_weights, padded_weights, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_an_empty_answer_packs_to_no_scored_token():
    """A cut-off answer with no token (no EOS either) scores nothing, as in padded rows."""
    empty = Row((1, 2), (IGNORE, IGNORE))
    pair = PairRow(Row((1, 2, 3), (IGNORE, IGNORE, 3)), empty)
    batch = pack_pairs([pair], pad_id=0, mask_kind="bool")
    assert batch["targets"].tolist() == [3] and batch["counted"].sum(-1).tolist() == [1, 0]
    assert pack([empty, Row((4, 5), (IGNORE, 5))], pad_id=0)["targets"].tolist() == [5]
