"""ralign's DPO losses equal TRL's DPOTrainer loss of the same loss_type on the same tiny model, batch and beta."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.losses import dpo_loss, next_token_mask
from ralign.runtime.batches import collate_pairs, encode_pairs
from ralign.runtime.models import format_prompt, is_peft
from ralign.runtime.tiny import build_tiny_model
from ralign.runtime.train import (
    pair_logps,
    reference_logps,
    train_dpo,
)

trl = pytest.importorskip("trl")

BETA = 0.1
# Each ralign loss and the label_smoothing it is compared at (TRL's loss_type of the same name).
LOSS_TYPES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
PAIRS = [
    {"prompt": "What is 2 plus 3?", "chosen": "It is 5.", "rejected": "Seven"},
    {"prompt": "Name a colour", "chosen": "Blue, like the sky.", "rejected": "No"},
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Goodbye and farewell, my friend."},
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def perturbed(path, seed: int):
    """The tiny model nudged off its init, so policy and reference differ."""
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def trl_trainer(policy, ref, tok, tmp_path, peft_config=None, loss_type="sigmoid", smoothing=0.0):
    # TRL's non-conversational path: the prompt is text (here ralign's chat-formatted prompt),
    # and TRL appends EOS to each completion, as ralign does.
    dataset = Dataset.from_list([{**p, "prompt": format_prompt(tok, p["prompt"])} for p in PAIRS])
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=BETA,
        loss_type=[loss_type],
        label_smoothing=smoothing,
        per_device_train_batch_size=len(PAIRS),
        max_length=512,
        report_to=[],
        use_cpu=True,
        bf16=False,  # transformers 5 defaults to bf16 autocast; ralign's side here is float32
    )
    return trl.DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
    )


def trl_batch_and_loss(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    mode = "train" if trainer.model.training else "eval"
    return batch, loss.item(), trainer._metrics[mode]


@pytest.mark.parametrize("loss_type, smoothing", LOSS_TYPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_dpo_loss_matches_trl(arch, loss_type, smoothing, tiny_root, tmp_path):
    path = build_tiny_model(arch, tiny_root / arch)
    tok = AutoTokenizer.from_pretrained(path)
    policy, ref = perturbed(path, 1), AutoModelForCausalLM.from_pretrained(path)
    trainer = trl_trainer(policy, ref, tok, tmp_path, loss_type=loss_type, smoothing=smoothing)
    batch, trl_loss, metrics = trl_batch_and_loss(trainer)

    # Same tokens and the same response positions, from ralign's own encoding of the raw pairs.
    ours = collate_pairs(encode_pairs(tok, PAIRS, 512), tok.pad_token_id)
    assert torch.equal(ours["input_ids"], batch["input_ids"])
    assert torch.equal(ours["attention_mask"], batch["attention_mask"])
    assert torch.equal(ours["labels"] != -100, batch["completion_mask"].bool())

    policy.eval()
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, ours)
        ref_chosen, ref_rejected = pair_logps(ref, ours)
    chosen_tokens, rejected_tokens = next_token_mask(ours["labels"]).sum(-1).chunk(2)
    loss, chosen_r, rejected_r = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        BETA,
        kind=loss_type,
        label_smoothing=smoothing,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )

    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert chosen.mean().item() == pytest.approx(metrics["logps/chosen"][-1], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(metrics["logps/rejected"][-1], abs=1e-4)
    margin = (chosen_r - rejected_r).mean().item()
    assert margin == pytest.approx(metrics["rewards/margins"][-1], abs=1e-5)
    assert (
        abs(margin) > 1e-3
    )  # policy and reference differ: the comparison is not at a trivial point
    if loss_type == "ipo":  # the comparison needs ralign's per-token averaging
        unaveraged, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, BETA, kind="ipo")
        assert abs(unaveraged.item() - trl_loss) > 1e-3


@pytest.mark.parametrize("loss_type, smoothing", LOSS_TYPES)
def test_train_dpo_first_step_matches_trl(loss_type, smoothing, tiny_root, tmp_path):
    """Whole path: ralign's encoding, precomputed reference and loop give TRL's loss at step 1."""
    path = build_tiny_model("llama", tiny_root / "llama")
    tok = AutoTokenizer.from_pretrained(path)
    trainer = trl_trainer(
        perturbed(path, 1),
        AutoModelForCausalLM.from_pretrained(path),
        tok,
        tmp_path,
        loss_type=loss_type,
        smoothing=smoothing,
    )
    _, trl_loss, _ = trl_batch_and_loss(trainer)

    seen = []
    train_dpo(
        perturbed(path, 1),
        tok,
        PAIRS,
        beta=BETA,
        lr=1e-3,
        epochs=1,
        batch_size=len(PAIRS),  # one batch holding every pair: the mean does not depend on order
        seed=0,
        reference_model=AutoModelForCausalLM.from_pretrained(path),
        on_step=lambda step, m: seen.append(m["loss"]),
        loss=loss_type,
        label_smoothing=smoothing,
    )
    assert seen[0] == pytest.approx(trl_loss, abs=1e-5)


def test_lora_dpo_matches_trl_adapter_disabled_reference(tiny_root, tmp_path):
    """With a fresh LoRA on the policy and no reference, both use the adapter-disabled policy.

    TRL builds the adapter from `peft_config` (a PeftModel passed in would instead get a copy of
    its adapter as the reference); init_lora_weights=False makes it random, so policy != reference.
    """
    from peft import LoraConfig

    path = build_tiny_model("llama", tiny_root / "llama")
    tok = AutoTokenizer.from_pretrained(path)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    trainer = trl_trainer(AutoModelForCausalLM.from_pretrained(path), None, tok, tmp_path, config)
    _, trl_loss, _ = trl_batch_and_loss(trainer)
    policy = trainer.model
    assert is_peft(policy)

    rows = encode_pairs(tok, PAIRS, 512)
    ref_chosen, ref_rejected = reference_logps(policy, rows, batch_size=2, pad_id=tok.pad_token_id)
    policy.eval()
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, collate_pairs(rows, tok.pad_token_id))
    loss, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, BETA)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - 0.6931471805599453) > 1e-3
