"""Training loops on tiny models: they learn, DPO's reference is right and computed once, runs repeat."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.errors import RalignError, StepError
from ralign.losses import IGNORE, sft_loss
from ralign.runtime.models import ModelSpec, is_peft, load_model, save_final
from ralign.runtime.tiny import build_tiny_model
from ralign.runtime.train import (
    collate,
    collate_pairs,
    encode_example,
    encode_examples,
    encode_pairs,
    pair_logps,
    reference_logps,
    train_dpo,
    train_sft,
)

EXAMPLES = [
    {"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(1, 7)
]
PAIRS = [
    {"prompt": f"Question {i}: is it good?", "chosen": "Yes, it is good.", "rejected": "No"}
    for i in range(1, 7)
]
LORA = {"rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny") / "gpt2")  # has dropout


def load(path, lora=None):
    return load_model(ModelSpec(str(path), lora=lora), "cpu")


def eval_sft_loss(model, tok) -> float:
    rows = [encode_example(tok, e["prompt"], e["response"], 512) for e in EXAMPLES]
    batch = collate(rows, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sft_loss(logits, batch["labels"]).item()


def margins(model, tok) -> torch.Tensor:
    """Per-pair log pi(chosen) - log pi(rejected)."""
    model.eval()
    with torch.no_grad():
        chosen, rejected = pair_logps(model, collate_pairs(encode_pairs(tok, PAIRS, 512), 0))
    return chosen - rejected


# --- batching ------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_response_and_eos(tiny):
    _, tok = load(tiny)
    row = encode_example(tok, "Hi", "Hello there", 512)
    n_prompt = sum(label == IGNORE for label in row.labels)
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(row.input_ids[:n_prompt]) == prompt_text
    assert row.labels[n_prompt:] == row.input_ids[n_prompt:]
    assert tok.decode(row.labels[n_prompt:]) == "Hello there<|im_end|>"
    assert row.labels[:n_prompt] == (IGNORE,) * n_prompt


def test_an_answer_cut_off_by_the_length_limit_gets_no_eos(tiny):
    _, tok = load(tiny)
    ended, cut = encode_examples(
        tok,
        [
            {"prompt": "Hi", "response": "Hello there", "finished": True},
            {"prompt": "Hi", "response": "Hello there", "finished": False},
        ],
        512,
    )
    assert ended.input_ids[:-1] == cut.input_ids and ended.labels[:-1] == cut.labels
    n_prompt = sum(label == IGNORE for label in cut.labels)
    assert tok.decode(cut.labels[n_prompt:]) == "Hello there"
    assert tok.decode(ended.labels[n_prompt:]) == "Hello there<|im_end|>"
    pair = encode_pairs(
        tok,
        [
            {
                "prompt": "Hi",
                "chosen": "Hello there",
                "rejected": "Go away",
                "chosen_finished": False,
                "rejected_finished": True,
            }
        ],
        512,
    )[0]
    assert pair.chosen.input_ids == cut.input_ids
    assert tok.decode(pair.rejected.labels[-1:]) == "<|im_end|>"


@pytest.mark.parametrize("max_length, kept", [(512, None), (20, 20), (5, 0)])
def test_truncation_keeps_the_start(tiny, max_length, kept):
    _, tok = load(tiny)
    full = encode_example(tok, "Hi", "Hello there, this is long", 512)
    row = encode_example(tok, "Hi", "Hello there, this is long", max_length)
    if kept == 0:
        assert row is None  # the prompt alone fills max_length: no response token left
    else:
        kept = kept or len(full.input_ids)
        assert row.input_ids == full.input_ids[:kept] and row.labels == full.labels[:kept]


def test_collate_pads_right():
    from ralign.runtime.train import Row

    batch = collate([Row((5, 6, 7), (IGNORE, 6, 7)), Row((8,), (IGNORE,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]


# --- SFT -----------------------------------------------------------------------------------------


def test_sft_lowers_the_loss_on_its_examples(tiny):
    model, tok = load(tiny)
    before = eval_sft_loss(model, tok)
    seen = []
    metrics = train_sft(
        model,
        tok,
        EXAMPLES,
        lr=1e-2,
        epochs=4,
        batch_size=2,
        seed=0,
        on_step=lambda s, m: seen.append((s, m["loss"])),
    )
    after = eval_sft_loss(model, tok)
    assert before > math.log(512) - 1.0  # random init: near-uniform over the vocabulary
    assert after < before / 2
    assert metrics["steps"] == 12 == len(seen) and [s for s, _ in seen] == list(range(1, 13))
    assert metrics["loss"] == seen[-1][1]
    assert metrics["mean_loss"] == pytest.approx(sum(v for _, v in seen) / 12)
    n_tokens = sum(
        sum(
            label != IGNORE for label in encode_example(tok, e["prompt"], e["response"], 512).labels
        )
        for e in EXAMPLES
    )
    assert metrics["tokens"] == 4 * n_tokens
    assert metrics["examples"] == 6 and metrics["dropped"] == 0


def test_sft_with_lora_trains_only_the_adapter(tiny):
    model, tok = load(tiny, LORA)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    before = eval_sft_loss(model, tok)
    train_sft(model, tok, EXAMPLES, lr=3e-2, epochs=3, batch_size=3, seed=0)
    assert eval_sft_loss(model, tok) < before
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())


@pytest.mark.parametrize("kind, arch", [("sft", "gpt2"), ("dpo", "llama")])
def test_same_seed_gives_bitwise_identical_weights(tiny, tiny_gpt2, kind, arch):
    path = tiny_gpt2 if arch == "gpt2" else tiny

    def run(seed):
        model, tok = load(path)
        if kind == "sft":
            train_sft(model, tok, EXAMPLES, lr=1e-2, epochs=2, batch_size=2, seed=seed)
        else:
            ref, _ = load(path)
            train_dpo(
                model,
                tok,
                PAIRS,
                beta=0.1,
                lr=1e-2,
                epochs=2,
                batch_size=2,
                seed=seed,
                reference_model=ref,
            )
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters (batch order)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_nan_loss_raises_step_error(tiny, kind):
    model, tok = load(tiny, LORA if kind == "dpo" else None)
    run = dict(lr=1e-2, epochs=1, batch_size=2, seed=0)
    with pytest.raises(StepError, match="loss became NaN at step 1"):
        if kind == "sft":
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))
            train_sft(model, tok, EXAMPLES, **run)
        else:
            # The adapter-disabled reference pass is fine; the NaN adapter poisons the policy.
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    with torch.no_grad():
                        p.fill_(float("nan"))
            train_dpo(model, tok, PAIRS, beta=0.1, **run)


def test_sft_restores_the_global_rng(tiny):
    model, tok = load(tiny)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    train_sft(model, tok, EXAMPLES[:2], lr=1e-3, epochs=1, batch_size=2, seed=0)
    assert torch.equal(torch.rand(2), expected)


# --- DPO -----------------------------------------------------------------------------------------


def test_dpo_increases_the_chosen_margin(tiny):
    model, tok = load(tiny)
    ref, _ = load(tiny)
    before = margins(model, tok)
    metrics = train_dpo(
        model, tok, PAIRS, beta=0.1, lr=1e-2, epochs=3, batch_size=2, seed=0, reference_model=ref
    )
    after = margins(model, tok)
    assert (after > before).all()
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0
    assert metrics["loss"] < math.log(2)
    assert metrics["steps"] == 9 and metrics["pairs"] == 6
    # the reference was left alone
    assert torch.allclose(margins(ref, tok), before)


def test_reference_logps_computed_once(tiny):
    model, tok = load(tiny)
    ref, _ = load(tiny)
    calls = []
    ref.register_forward_hook(lambda module, args, out: calls.append(1))
    train_dpo(
        model, tok, PAIRS, beta=0.1, lr=1e-3, epochs=3, batch_size=2, seed=0, reference_model=ref
    )
    assert len(calls) == 3  # 6 pairs / 2 per batch, once, not once per epoch


def test_lora_dpo_reference_is_the_adapter_disabled_base(tiny, monkeypatch):
    model, tok = load(tiny, LORA)
    base, _ = load(tiny)
    rows = encode_pairs(tok, PAIRS, 512)
    base.eval()
    with torch.no_grad():
        base_chosen, base_rejected = pair_logps(base, collate_pairs(rows, tok.pad_token_id))

    # No second copy of the weights: loading or copying a model during training fails the test.
    def forbidden(*args, **kwargs):
        raise AssertionError("a second model was created")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", forbidden)
    monkeypatch.setattr("copy.deepcopy", forbidden)
    disabled = []
    original = type(model).disable_adapter

    def counting_disable(self):
        disabled.append(1)
        return original(self)

    monkeypatch.setattr(type(model), "disable_adapter", counting_disable)
    seen = []
    train_dpo(
        model,
        tok,
        PAIRS,
        beta=0.1,
        lr=3e-2,
        epochs=3,
        batch_size=2,
        seed=0,
        on_step=lambda s, m: seen.append(m),
    )
    assert disabled == [1]  # the reference pass ran once, with the adapter off
    # A fresh LoRA adapter is a no-op, so the first step's policy equals its reference exactly.
    assert seen[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert seen[0]["reward_margin"] == 0.0
    assert seen[-1]["reward_margin"] > 0
    # After training, the adapter-disabled model still scores exactly like the untouched base.
    ref_chosen, ref_rejected = reference_logps(model, rows, batch_size=4, pad_id=tok.pad_token_id)
    assert torch.allclose(ref_chosen, base_chosen, atol=1e-5)
    assert torch.allclose(ref_rejected, base_rejected, atol=1e-5)


def test_dpo_without_reference_needs_peft(tiny):
    model, tok = load(tiny)
    with pytest.raises(RalignError, match="needs a reference model"):
        train_dpo(model, tok, PAIRS, beta=0.1, lr=1e-3, epochs=1, batch_size=2, seed=0)


def test_dpo_drops_pairs_that_cannot_fit(tiny):
    model, tok = load(tiny, LORA)
    long = {"prompt": "word " * 80, "chosen": "a", "rejected": "b"}
    metrics = train_dpo(
        model,
        tok,
        PAIRS[:2] + [long],
        beta=0.1,
        lr=1e-3,
        epochs=1,
        batch_size=2,
        seed=0,
        max_length=40,
    )
    assert metrics["pairs"] == 2 and metrics["dropped"] == 1 and metrics["steps"] == 1


# --- accelerate ----------------------------------------------------------------------------------


@pytest.fixture(params=["no", "bf16"])
def accelerator(request):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A process-wide singleton: start clean (another test may have made one) and leave clean.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision=request.param)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_path_trains(tiny, accelerator):
    """Also under bf16 autocast: the reference pass runs under the same autocast as the policy,
    so a fresh adapter still gives exactly log 2 at the first step."""
    model, tok = load(tiny, LORA)
    seen = []
    metrics = train_dpo(
        model,
        tok,
        PAIRS,
        beta=0.1,
        lr=3e-2,
        epochs=2,
        batch_size=2,
        seed=0,
        accelerator=accelerator,
        on_step=lambda s, m: seen.append(m),
    )
    assert metrics["steps"] == 6 and seen[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"] > 0
    model, tok = load(tiny)
    before = eval_sft_loss(model, tok)
    train_sft(
        model, tok, EXAMPLES, lr=1e-2, epochs=2, batch_size=2, seed=0, accelerator=accelerator
    )
    assert eval_sft_loss(accelerator.unwrap_model(model), tok) < before


DDP_SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from ralign.runtime.models import ModelSpec, load_model
from ralign.runtime.train import encode_pairs, reference_logps, train_dpo, train_sft
path, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True)
model, tok = load_model(ModelSpec(path, lora={"rank": 4, "alpha": 8}), acc.device)
pairs = [
    {"prompt": f"Question {i}: is it good?", "chosen": "Yes, it is good.", "rejected": "No"}
    for i in range(1, 9)
]
rows = encode_pairs(tok, pairs, 512)
shared = reference_logps(model, rows, batch_size=2, pad_id=tok.pad_token_id, accelerator=acc)
alone = reference_logps(model, rows, batch_size=2, pad_id=tok.pad_token_id)
dpo = train_dpo(model, tok, pairs, beta=0.1, lr=3e-2, epochs=2, batch_size=2, seed=0, accelerator=acc)
sft = train_sft(model, tok, [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs],
                lr=1e-2, epochs=1, batch_size=2, seed=0, accelerator=acc)
# gradients were averaged across processes: every replica holds the same weights
checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
sums = acc.gather(checksum.reshape(1)).tolist()
if acc.is_main_process:
    same = all(torch.allclose(a, b) for a, b in zip(shared, alone))
    result = {"world": acc.num_processes, "ref_equal": same, "dpo": dpo, "sft": sft, "sums": sums}
    json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
def test_two_process_data_parallel(tiny, tmp_path):
    """Two CPU processes (gloo): the reference pass is split and gathered, steps halve."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, str(script), str(tiny), str(out)], check=True, env=env, timeout=300)
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["ref_equal"]
    assert result["dpo"]["steps"] == 4  # 8 pairs, 2 per process per step, 2 epochs
    assert result["dpo"]["reward_margin"] > 0 and result["dpo"]["reward_accuracy"] == 1.0
    assert result["sft"]["steps"] == 2
    assert result["sums"][0] == result["sums"][1]


# --- saving --------------------------------------------------------------------------------------


def test_save_final_merges_lora_into_a_plain_folder(tiny, tmp_path):
    model, tok = load(tiny, LORA)
    train_sft(model, tok, EXAMPLES, lr=3e-2, epochs=2, batch_size=3, seed=0)
    batch = tok(["What is 1 plus 1?"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_final(model, tok, tmp_path / "final")
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not is_peft(loaded)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, expected, atol=1e-4)
    tok2 = AutoTokenizer.from_pretrained(out)
    gen = loaded.generate(**tok2(["Hi"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == len(tok2("Hi").input_ids) + 3
