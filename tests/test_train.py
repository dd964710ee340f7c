"""Training loops on tiny models: they learn, DPO's reference is right and computed once, runs repeat."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign.errors import RalignError, StepError
from ralign.losses import IGNORE, sft_loss, token_logps
from ralign.runtime.batches import (
    collate,
    collate_pairs,
    encode_example,
    encode_examples,
    encode_pairs,
)
from ralign.runtime.models import ModelSpec, is_peft, load_model, save_final
from ralign.runtime.tiny import build_tiny_model
from ralign.runtime.train import (
    batch_token_logps,
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
    from ralign.runtime.batches import Row

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


def test_dpo_nll_term_keeps_the_chosen_answers_likely(tiny):
    """With the RPO term the chosen answers end more likely than with DPO alone, at the same
    seed and steps."""

    def chosen_logps(nll_weight):
        model, tok = load(tiny)
        ref, _ = load(tiny)
        train_dpo(
            model, tok, PAIRS, beta=0.1, lr=1e-2, epochs=3, batch_size=2, seed=0,
            reference_model=ref, nll_weight=nll_weight,
        )  # fmt: skip
        model.eval()
        with torch.no_grad():
            return pair_logps(model, collate_pairs(encode_pairs(tok, PAIRS, 512), 0))[0]

    before = chosen_logps(0.0)
    with_nll = chosen_logps(1.0)
    assert (with_nll > before).all()


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
from ralign.runtime.batches import encode_pairs
from ralign.runtime.train import reference_logps, train_dpo, train_sft
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
# 2 processes x 2 micro-batches x 2 examples of uneven lengths: one optimizer step over all 8,
# which must equal one process's single batch of 8 (the token mean over every example).
uneven = [{"prompt": f"Tell me about {i}.", "response": "word " * (3 * i * i)} for i in range(1, 9)]
steps = []
torch.manual_seed(0)
model, tok = load_model(ModelSpec(path, lora={"rank": 4, "alpha": 8}), acc.device)
accum = train_sft(model, tok, uneven, lr=1e-2, epochs=1, batch_size=2, seed=0, accelerator=acc,
                  grad_accum=2, gradient_checkpointing=True, on_step=lambda s, m: steps.append(m))
if acc.is_main_process:
    same = all(torch.allclose(a, b) for a, b in zip(shared, alone))
    torch.manual_seed(0)
    model, tok = load_model(ModelSpec(path, lora={"rank": 4, "alpha": 8}), "cpu")
    alone_steps = []
    train_sft(model, tok, uneven, lr=1e-2, epochs=1, batch_size=8, seed=0,
              on_step=lambda s, m: alone_steps.append(m))
    result = {"world": acc.num_processes, "ref_equal": same, "dpo": dpo, "sft": sft, "sums": sums,
              "accum": accum, "accum_steps": steps, "alone_steps": alone_steps}
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
    # grad_accum and gradient checkpointing under data parallelism: one step equals one big batch
    assert result["accum"]["optimizer_steps"] == 1 and result["accum"]["steps"] == 2
    (accum,), (alone,) = result["accum_steps"], result["alone_steps"]
    assert accum["loss"] == pytest.approx(alone["loss"], abs=1e-5)
    assert accum["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-4)
    assert accum["tokens"] == alone["tokens"]


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


# --- training controls ---------------------------------------------------------------------------

# Responses of very different lengths: micro-batches then hold different token counts, so a mean of
# per-micro-batch means would differ from the token mean over the whole batch.
UNEVEN = [
    {"prompt": f"Tell me about {i}.", "response": " ".join(["word"] * (3 * i * i)) + "."}
    for i in range(1, 7)
]


def run_sft(path, examples=UNEVEN, lora=None, **kw):
    """Train a fresh copy of `path`; returns (model, every on_step record, the result)."""
    torch.manual_seed(0)  # the LoRA adapter's random init
    model, tok = load(path, lora)
    seen = []
    kw = {"lr": 1e-2, "epochs": 1, "batch_size": 2, "seed": 0, **kw}
    out = train_sft(model, tok, examples, on_step=lambda s, m: seen.append(m), **kw)
    return model, seen, out


def run_dpo(path, lora=None, pairs=None, **kw):
    torch.manual_seed(0)
    model, tok = load(path, lora)
    ref = None if lora else load(path)[0]
    seen = []
    kw = {"beta": 0.1, "lr": 1e-2, "epochs": 1, "batch_size": 2, "seed": 0, **kw}
    uneven = [
        {**p, "chosen": p["chosen"] * (i % 3 + 1), "rejected": p["rejected"] * (i % 2 + 1)}
        for i, p in enumerate(PAIRS)
    ]
    out = train_dpo(
        model, tok, pairs or uneven, reference_model=ref, on_step=lambda s, m: seen.append(m), **kw
    )
    return model, seen, out


def same_weights(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k], sb[k], atol=atol, rtol=0) for k in sa)


@contextlib.contextmanager
def grads_at_step():
    """Every optimizer step's gradients (param id -> clone), as the optimizer sees them."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen: list[dict[int, torch.Tensor]] = []

    def hook(optimizer, args, kwargs):
        seen.append(
            {
                id(p): p.grad.clone()
                for g in optimizer.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grad_accum": 0}, "grad_accum must be an integer >= 1, got 0"),
        ({"grad_accum": 2.0}, "grad_accum must be an integer >= 1, got 2.0"),
        ({"grad_accum": True}, "grad_accum must be an integer >= 1, got True"),
        ({"schedule": "cosin"}, "schedule must be one of constant, linear, cosine, got 'cosin'; "
         "did you mean 'cosine'"),
        ({"warmup": 1.5}, r"warmup must be a fraction in \[0, 1\) or a whole number of steps"),
        ({"warmup": -2}, "warmup must be a fraction"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0, got -0.1"),
        ({"weight_decay": float("nan")}, "weight_decay must be a number >= 0, got nan"),
        ({"max_grad_norm": -1}, r"max_grad_norm must be a number >= 0 \(0: no clipping\)"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be true or false"),
        ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16, got 'fp8'"),
        # every problem at once, not the first alone
        ({"grad_accum": 0, "weight_decay": -1}, "grad_accum must be .*; weight_decay must be"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_controls_are_checked(tiny, kind, kwargs, message):
    run = run_sft if kind == "sft" else run_dpo
    with pytest.raises(RalignError, match=message):
        run(tiny, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "ipp"}, r"unknown DPO loss 'ipp'; did you mean 'ipo'\? \(known: sigmoid, ipo"),
        ({"loss": "sigmoid", "label_smoothing": 0.1}, "label_smoothing applies to the robust loss"),
        ({"loss": "robust", "label_smoothing": 0.5}, r"must be in \[0, 0.5\) for the robust loss"),
        ({"loss": "robust", "label_smoothing": -0.1}, r"must be in \[0, 0.5\)"),
        ({"beta": 0.0}, "beta must be a number > 0, got 0.0"),
        ({"nll_weight": -1.0}, "nll_weight must be a number >= 0, got -1.0"),
    ],
)
def test_dpo_loss_settings_are_checked(tiny, kwargs, message):
    with pytest.raises(RalignError, match=message):
        run_dpo(tiny, **kwargs)


@pytest.mark.parametrize("accum, batch", [(3, 2), (2, 3), (4, 2)])  # (4, 2): one group of 3
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_grad_accum_equals_one_big_batch(tiny, kind, accum, batch):
    """k micro-batches of b make the same optimizer step as one batch of k*b: the same loss and
    gradients as the optimizer sees them (a wrong weighing of the micro-batches would change them),
    so the same weights. lr is small because Adam's first step, g / (|g| + 1e-8), turns float noise
    in gradients near 1e-8 into weight noise of up to lr * 1e-3."""
    run = run_sft if kind == "sft" else run_dpo
    with grads_at_step() as big_grads:
        big, big_seen, big_out = run(tiny, batch_size=6, lr=1e-3)
    with grads_at_step() as grads:
        small, seen, out = run(tiny, batch_size=batch, grad_accum=accum, lr=1e-3)
    assert out["optimizer_steps"] == big_out["optimizer_steps"] == 1 == len(seen)
    assert out["steps"] == -(-6 // batch) and big_out["steps"] == 1
    assert seen[0]["loss"] == pytest.approx(big_seen[0]["loss"], abs=1e-5)
    assert seen[0]["grad_norm"] == pytest.approx(big_seen[0]["grad_norm"], rel=1e-5)
    for g, big_g in zip(grads[0].values(), big_grads[0].values(), strict=True):
        assert torch.allclose(g, big_g, atol=1e-6, rtol=0)
    assert seen[0]["tokens"] == big_seen[0]["tokens"] == out["tokens"]
    assert same_weights(small, big)
    if kind == "dpo":
        for key in ("reward_margin", "chosen_reward", "rejected_reward"):
            assert seen[0][key] == pytest.approx(big_seen[0][key], abs=1e-6)


def test_weighted_pairs_count_by_their_weight(tiny):
    """Pairs of weight 0 add nothing: six pairs weighted 1, 1, 1, 0, 0, 0 make the step that the
    first three alone make, in one batch or in micro-batches (whose shares of the step are their
    weights, so a micro-batch of two weightless pairs is no 0 / 0)."""
    pairs = [
        {**p, "chosen": p["chosen"] * (i % 3 + 1), "rejected": p["rejected"] * (i % 2 + 1)}
        for i, p in enumerate(PAIRS)
    ]
    weighted = [{**p, "weight": 1.0 if i < 3 else 0.0} for i, p in enumerate(pairs)]
    with grads_at_step() as alone:
        first, _, _ = run_dpo(tiny, pairs=pairs[:3], batch_size=3, lr=1e-3)
    for batch, accum in ((6, 1), (2, 3)):
        with grads_at_step() as grads:
            model, seen, out = run_dpo(
                tiny, pairs=weighted, batch_size=batch, grad_accum=accum, lr=1e-3
            )
        assert out["optimizer_steps"] == 1 and out["pairs"] == 6
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in seen)
        for g, want in zip(grads[0].values(), alone[0].values(), strict=True):
            assert torch.allclose(g, want, atol=1e-6, rtol=0)
        assert same_weights(model, first)
    # equal weights other than 1 are the plain mean
    with grads_at_step() as halves:
        run_dpo(tiny, pairs=[{**p, "weight": 0.5} for p in pairs], batch_size=6, lr=1e-3)
    with grads_at_step() as plain:
        run_dpo(tiny, pairs=pairs, batch_size=6, lr=1e-3)
    for g, want in zip(halves[0].values(), plain[0].values(), strict=True):
        assert torch.allclose(g, want, atol=1e-6, rtol=0)


def test_grad_accum_without_token_weighing_would_differ(tiny):
    """The SFT case above is not vacuous: its micro-batches hold different token counts."""
    _, tok = load(tiny)
    rows = encode_examples(tok, UNEVEN, 512)
    counts = {sum(label != IGNORE for label in r.labels) for r in rows}
    assert len(counts) == len(rows)


def reference_lrs(schedule, warmup, total, lr):
    """transformers' own schedule, stepped by hand."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(
    "warmup, accum, warmup_steps",
    [(0, 1, 0), (3, 1, 3), (0.3, 1, 4), (0.3, 2, 2)],  # 0.3 of 12 steps: 3.6, rounded up; of 6: 1.8
)
def test_schedules_equal_transformers(tiny, schedule, warmup, accum, warmup_steps):
    lr = 1e-3
    _, seen, out = run_sft(
        tiny, EXAMPLES, lr=lr, epochs=2, batch_size=1, grad_accum=accum, schedule=schedule,
        warmup=warmup,
    )  # fmt: skip
    total = 12 // accum  # 6 examples, 2 epochs
    assert out["optimizer_steps"] == total == len(seen)
    assert {s["total_steps"] for s in seen} == {total}  # known from the first step, for the bar
    expected = reference_lrs(schedule, warmup_steps, total, lr)
    assert [s["lr"] for s in seen] == pytest.approx(expected, abs=1e-12)
    if schedule != "constant" or warmup:
        assert len(set(expected)) > 1  # the schedule does something here


def global_norm(grads: dict[int, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()


def test_weight_decay_is_decoupled_and_applied(tiny):
    """AdamW: p <- p (1 - lr wd) - lr adam(g); with the same gradients, the runs differ by lr wd p0."""
    lr, wd = 0.1, 0.5
    init, _ = load(tiny)
    a, _, _ = run_sft(tiny, EXAMPLES, lr=lr, batch_size=6, weight_decay=0.0)
    b, _, _ = run_sft(tiny, EXAMPLES, lr=lr, batch_size=6, weight_decay=wd)
    p0, pa, pb = init.state_dict(), a.state_dict(), b.state_dict()
    for k in p0:
        assert torch.allclose(pb[k] - pa[k], -lr * wd * p0[k], atol=1e-6), k


def test_a_step_equals_the_textbook_update(tiny):
    """Two optimizer steps of train_sft (packed rows, fused AdamW) give the weights of a plain loop:
    padded rows, cross-entropy on the response tokens, clipping to 1.0, torch's default AdamW."""
    lr, wd = 1e-2, 0.01
    trained, _, _ = run_sft(tiny, EXAMPLES, lr=lr, batch_size=6, epochs=2, weight_decay=wd)
    model, tok = load(tiny)
    model.eval()  # the tiny Llama has no dropout; eval keeps it that way whatever the config says
    batch = collate(encode_examples(tok, EXAMPLES, 512), tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, foreach=False)
    for _ in range(2):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss = sft_loss(model(input_ids=ids, attention_mask=mask).logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    # Adam divides by each gradient's own scale, so float rounding in a near-zero gradient moves its
    # update by a share of lr: a few weights may differ by more than a thousandth of lr.
    ours, textbook = trained.state_dict(), model.state_dict()
    diffs = torch.cat([(ours[k] - textbook[k]).abs().flatten() for k in textbook])
    assert diffs.max() <= 1e-2 * lr  # measured: 3.6e-3 lr, on 6 of 196,928 weights
    assert (diffs > 1e-3 * lr).float().mean() < 1e-3


@pytest.mark.parametrize("limit", [0.0, 0.05, 1.0])
def test_max_grad_norm_clips_what_the_optimizer_sees(tiny, limit):
    with grads_at_step() as grads:
        _, seen, _ = run_sft(tiny, EXAMPLES, batch_size=3, max_grad_norm=limit)
    assert len(grads) == len(seen) == 2
    for step, record in zip(grads, seen, strict=True):
        before = record["grad_norm"]  # reported before clipping
        assert before > 1.0  # a random init: large gradients, so each limit bites
        expected = before if limit == 0 else min(before, limit)
        assert global_norm(step) == pytest.approx(expected, rel=1e-4)


CHECKPOINTED = [("sft", "llama", None), ("sft", "gpt2", LORA), ("dpo", "gpt2", None)]


@pytest.mark.parametrize("kind, arch, lora", CHECKPOINTED)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(
    tiny, tiny_gpt2, kind, arch, lora
):
    """GPT-2 has dropout: DPO keeps it off (eval mode) while its layers are checkpointed."""
    path = tiny_gpt2 if arch == "gpt2" else tiny
    run = run_sft if kind == "sft" else run_dpo
    results = {}
    for on in (False, True):
        with grads_at_step() as grads:
            _, seen, _ = run(path, lora=lora, lr=0.0, batch_size=3, gradient_checkpointing=on)
        results[on] = (seen, grads)
    (off_seen, off_grads), (on_seen, on_grads) = results[False], results[True]
    assert [s["loss"] for s in on_seen] == pytest.approx([s["loss"] for s in off_seen], abs=1e-5)
    assert len(off_grads) == len(on_grads) == 2
    for a, b in zip(off_grads, on_grads, strict=True):
        assert len(a) == len(b) > 0
        for ga, gb in zip(a.values(), b.values(), strict=True):
            assert torch.allclose(ga, gb, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, arch, lora", CHECKPOINTED)
def test_gradient_checkpointing_is_on_while_training_and_off_after(
    tiny, tiny_gpt2, kind, arch, lora
):
    path = tiny_gpt2 if arch == "gpt2" else tiny
    model, tok = load(path, lora)
    mlp = next(m for m in model.modules() if type(m).__name__.endswith("MLP"))
    calls: list[int] = []
    original = mlp.forward  # counted in forward itself: the recompute runs no module hooks
    mlp.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    run = dict(lr=0.0, epochs=1, batch_size=6, seed=0, gradient_checkpointing=True)
    if kind == "sft":
        train_sft(model, tok, EXAMPLES, **run)
    else:
        train_dpo(model, tok, PAIRS, beta=0.1, reference_model=load(path)[0], **run)
    assert len(calls) == 2  # one step: the forward, and its recompute in the backward
    hf = model.get_base_model() if is_peft(model) else model
    assert not any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    assert not hf.get_input_embeddings()._forward_hooks  # transformers' require-grad hook, gone


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_trains_close_to_fp32(tiny, precision, monkeypatch):
    """Autocast changes the forward's arithmetic (so the losses are not bitwise fp32's) but not its
    result beyond rounding: the first step's loss within 0.01 of fp32's (at a loss of about 6.2),
    the next two within 0.02. fp16 goes through a loss scaler."""
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(
        torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(1) or original(self, loss)
    )
    _, fp32, _ = run_sft(tiny, EXAMPLES, lr=1e-3, batch_size=2)
    _, mixed, _ = run_sft(tiny, EXAMPLES, lr=1e-3, batch_size=2, precision=precision)
    assert mixed[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.01)
    assert [m["loss"] for m in mixed] == pytest.approx([m["loss"] for m in fp32], abs=0.02)
    assert [m["loss"] for m in mixed] != [m["loss"] for m in fp32]
    assert len(scaled) == (3 if precision == "fp16" else 0)


def test_bf16_lora_dpo_reference_shares_the_autocast(tiny):
    """The reference pass runs under the training forward's autocast: a fresh adapter gives log 2."""
    _, seen, _ = run_dpo(tiny, lora=LORA, precision="bf16", pairs=PAIRS)
    assert seen[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_precision_must_agree_with_the_accelerator(tiny):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        with pytest.raises(RalignError, match="create it with mixed_precision='no'"):
            run_sft(tiny, EXAMPLES, precision="fp32", accelerator=acc)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_on_step_reports_every_value(tiny):
    _, sft, out = run_sft(tiny, EXAMPLES, batch_size=2, epochs=2, schedule="linear")
    keys = {"loss", "lr", "grad_norm", "tokens", "input_tokens", "epoch", "total_steps"}
    assert [set(s) for s in sft] == [keys] * 6 and {s["total_steps"] for s in sft} == {6}
    assert [s["epoch"] for s in sft] == [0, 0, 0, 1, 1, 1]
    assert sft[-1]["tokens"] == out["tokens"] and sft[0]["tokens"] < sft[1]["tokens"]
    # Every token of every example, prompts included, once per epoch, however batches are laid out.
    tok = AutoTokenizer.from_pretrained(tiny)
    lengths = [len(r.input_ids) for r in encode_examples(tok, EXAMPLES, 512)]
    assert sft[-1]["input_tokens"] == 2 * sum(lengths)
    _, dpo, _ = run_dpo(tiny)
    rewards = {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    assert set(dpo[0]) == keys | rewards
    assert all(math.isfinite(v) for s in dpo for v in s.values())


# --- memory-lean log-probs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("llama", "gpt2", "qwen2")}


def oracle_token_logps(model, batch):
    """The plain definition: full (B, T, V) logits from the model, then a float32 log-softmax."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return token_logps(out.logits, batch["labels"])


def logps_and_grads(fn, model, batch):
    """Per-token log-probs and the gradients of a weighted sum of them (weights vary by position)."""
    model.zero_grad(set_to_none=True)
    logps, mask = fn(model, batch)
    weights = torch.linspace(0.5, 1.5, logps.numel()).reshape(logps.shape)
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), mask, grads


@pytest.mark.parametrize("lora", [None, {**LORA, "target_modules": ["all-linear"]}])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_fused_head_equals_the_plain_log_softmax(tiny_archs, arch, lora, monkeypatch):
    """Values and gradients to 1e-5 in fp32, several chunks a batch; qwen2 ties its embeddings."""
    import ralign.losses
    import ralign.runtime.train as train_module

    monkeypatch.setattr(ralign.losses, "CHUNK_LOGITS", 512 * 7)  # 7 positions a chunk
    fused = []
    original = train_module.linear_target_logps

    def counting(*args, **kwargs):
        fused.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "linear_target_logps", counting)
    torch.manual_seed(0)
    model, tok = load(tiny_archs[arch], lora)
    model.eval()  # gpt2's dropout off, so both passes see the same network
    hf = model.get_base_model() if is_peft(model) else model
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert tied == (arch in ("qwen2", "gpt2"))
    rows = encode_pairs(tok, PAIRS, 512)
    batch = collate_pairs(rows, tok.pad_token_id)
    ours, mask, our_grads = logps_and_grads(batch_token_logps, model, batch)
    assert fused == [int(mask.sum())] and fused[0] > 7  # the fused path ran, in several chunks
    plain, plain_mask, plain_grads = logps_and_grads(oracle_token_logps, model, batch)
    assert torch.equal(mask, plain_mask)
    assert torch.allclose(ours, plain, atol=1e-5, rtol=0)
    assert our_grads.keys() == plain_grads.keys() and our_grads
    for name, g in our_grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize(
    "change",
    [
        "softcap",  # an architecture that soft-caps its logits (Gemma 2's config field)
        "lora_head",  # a LoRA adapter on the LM head itself: its weight alone is not the head
    ],
)
def test_heads_the_fused_path_cannot_stand_in_for_use_the_plain_one(tiny, change, monkeypatch):
    import ralign.runtime.train as train_module

    fused = []
    monkeypatch.setattr(
        train_module, "linear_target_logps", lambda *a, **k: fused.append(1) or None
    )
    if change == "softcap":
        model, tok = load(tiny)
        model.config.final_logit_softcapping = 30.0  # llama ignores it; ralign must not assume so
    else:
        model, tok = load(tiny, {**LORA, "target_modules": ["q_proj", "lm_head"]})
    batch = collate_pairs(encode_pairs(tok, PAIRS, 512), tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        ours, mask = batch_token_logps(model, batch)
        plain, _ = oracle_token_logps(model, batch)
    assert not fused
    assert torch.allclose(ours, plain, atol=1e-5)


def test_a_model_that_changes_the_head_output_is_refused(tiny):
    """The fused head hands log-probs to the model as its logits: a model that then transforms them
    (here a forward hook doubling them) would train on wrong values, so ralign stops."""
    model, tok = load(tiny)
    model.register_forward_hook(lambda module, args, out: type(out)(logits=out.logits * 2))
    batch = collate_pairs(encode_pairs(tok, PAIRS, 512), tok.pad_token_id)
    with pytest.raises(RalignError, match="LlamaForCausalLM changes its logits after the LM head"):
        batch_token_logps(model, batch)


def test_fused_head_keeps_no_vocabulary_wide_tensor_for_backward(tiny_archs, monkeypatch):
    """What autograd saves is what training holds until the backward: the plain path saves (N, V)
    logits and log-softmax, the fused head only (N, H) hidden states, the (V, H) weight it already
    has and per-position scalars."""
    import ralign.losses

    monkeypatch.setattr(ralign.losses, "CHUNK_LOGITS", 512 * 4)
    model, tok = load(tiny_archs["qwen2"])
    batch = collate_pairs(encode_pairs(tok, PAIRS, 512), tok.pad_token_id)
    vocab = model.config.vocab_size

    def vocabulary_wide(fn):
        shapes = []

        def pack(t):
            if t.shape and t.shape[-1] == vocab:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(model, batch)
        return shapes

    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert (n, vocab) in vocabulary_wide(oracle_token_logps)  # the check sees such tensors
    assert vocabulary_wide(batch_token_logps) == []
