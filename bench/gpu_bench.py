"""Benchmark ralign's SFT, DPO and sampling on one GPU: tokens/s and MFU, against TRL and plain `generate`.

Usage: python bench/gpu_bench.py [--smoke] [--shapes qwen2-0.5b,smollm2-135m] [--steps 20]
       [--warmup 3] [--repeats 2] [--seq 1024] [--batch 8] [--peak-tflops X] [--out DIR]
(`bash bench/gpu.sh` installs what is missing from local wheels and runs this on the GPU machine.)

Simplifications, stated up front:
- Models are random-init, of the real shapes, nothing downloaded: SmolLM2-135M (LlamaConfig, hidden
  576, 30 layers, 9 heads / 3 kv, MLP 1536, vocab 49152, tied) and Qwen2.5-0.5B (Qwen2Config, hidden
  896, 24 layers, 14 heads / 2 kv, MLP 4864, vocab 151936, tied). Weights are bf16 on CUDA with an
  `Accelerator()` and no autocast, exactly as ralign's executor loads a model there (dtype "auto");
  `--smoke` runs tiny shapes in float32 on the CPU on one thread (about 30 s of CPU), to test this
  script (tests/test_bench_gpu.py); its timings mean nothing.
- The tokenizer is ralign's tiny 512-token byte-level BPE (`ralign.runtime.tiny`, built offline);
  its ids are a subset of the model's vocabulary, and speed does not depend on which ids are fed.
- Training data is synthetic English text; every prompt+response is longer than `--seq`, so each
  sequence is cut to exactly `--seq` tokens and nothing is padded. Token counts come from the
  attention masks each framework actually feeds (ralign's collate, TRL's collator) and are stored.
- FLOPs: 6N per trained token (forward + backward) plus 2N per reference-model token (DPO's frozen
  reference scores the same sequences once). N is every weight a token is multiplied by: all
  parameters except the input-embedding lookup, a tied matrix counted once as the output layer; for
  both (tied) shapes here that is all parameters (134.5M, 494.0M). Attention-score FLOPs are not
  counted (12 * layers * hidden * seq per trained token, stored as `attention_share`, about 9% of
  6N at 0.5B / 1024 tokens), so MFU is understated by that much. Peak = dense bf16 tensor FLOP/s of
  the card, looked up by `torch.cuda.get_device_name()` in PEAK_TFLOPS (H100 SXM: 989).
- A run is one whole training call on a freshly initialised model: ralign's `train_sft`/`train_dpo`
  (its tokenization, reference pass and optimizer set-up included) or TRL's `trainer.train()` (its
  dataset tokenization happens in the constructor, untimed). Each framework first does one untimed
  warm-up run of `--warmup` steps; then `--repeats` timed runs of `--steps` steps, ralign and TRL
  interleaved, in alternating order. Medians are reported; CUDA is synchronised around each run.
  Per-step times are stored too (ralign syncs every step when it reads the loss; TRL is synced by a
  callback for those stamps only, so its run time includes one sync per step as well).
- TRL gets the same bf16 model with `bf16=False` (no autocast on bf16 weights: the same arithmetic
  as ralign), its defaults otherwise, and runs twice: as configured by default (gradient
  checkpointing on, which recomputes activations) and like-for-like with ralign (checkpointing
  off). The ">= 1.2x TRL" target is checked against the faster of the two.
- Sampling: ralign's `generation.sample` (chat-formatted prompts, length-sorted batches) against
  plain `model.generate` on the same formatted prompts, in input order, same batch, temperature,
  top_p = 1, top_k off. Tokens = new tokens up to and including the first end token.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import versions  # noqa: E402

from ralign.tables import text_table  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = {"mfu_sft": 0.35, "mfu_dpo": 0.35, "vs_trl_sft": 1.2, "vs_trl_dpo": 1.2}
TARGET_SHAPE = "qwen2-0.5b"  # the MFU targets apply at 0.5B with seq >= 1024
MIN_TARGET_SEQ = 1024

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, no sparsity). Most specific name first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": {
        "arch": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "arch": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    # --smoke: the same two architectures, tiny.
    "tiny-qwen2": {
        "arch": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
    "tiny-llama": {
        "arch": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "tie_word_embeddings": False,
    },
}

FULL = {
    "shapes": "qwen2-0.5b,smollm2-135m",
    "seq": 1024,
    "batch": 8,
    "dpo_batch": 4,
    "steps": 20,
    "warmup": 3,
    "repeats": 2,
    "prompts": 32,
    "per_prompt": 4,
    "new_tokens": 128,
    "sample_batch": 128,
    "frameworks": "ralign,trl,trl_gc",
    "modes": "sft,dpo,sample",
}
SMOKE = {
    "shapes": "tiny-qwen2,tiny-llama",
    "seq": 48,
    "batch": 2,
    "dpo_batch": 2,
    "steps": 2,
    "warmup": 0,
    "repeats": 1,
    "prompts": 4,
    "per_prompt": 2,
    "new_tokens": 8,
    "sample_batch": 8,
    "frameworks": "ralign,trl,trl_gc",
    "modes": "sft,dpo,sample",
}
LR, BETA, SEED = 1e-6, 0.1, 0

# ---- models and FLOPs ---------------------------------------------------------------------


def model_config(shape: str, tok: Any) -> Any:
    """The transformers config of a named shape, with the tokenizer's special ids."""
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch")]
    return cls(
        **spec,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def param_counts(config: Any) -> dict[str, int]:
    """{"total", "embedding", "matmul"}: parameters (tied ones once), the input embedding, and N.

    N ("matmul") is every parameter a token is multiplied by: all but the input-embedding lookup;
    a tied embedding is the output layer's matrix, so it counts (once). Counted on the meta device.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    return {
        "total": total,
        "embedding": emb.numel(),
        "matmul": total - (0 if emb is out else emb.numel()),
    }


def flops_per_token(n: int, mode: str) -> int:
    """Training FLOPs per token: 6N (forward + backward), plus 2N for DPO's reference forward."""
    return {"sft": 6 * n, "dpo": 8 * n}[mode]


def mfu(tokens: int, seconds: float, n: int, mode: str, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the card's peak."""
    if not peak_flops or seconds <= 0:
        return None
    return tokens * flops_per_token(n, mode) / seconds / peak_flops


def attention_share(config: Any, seq: int, n: int) -> float:
    """Attention-score FLOPs per trained token (12 * layers * hidden * seq, PaLM's count) over 6N."""
    return 12 * config.num_hidden_layers * config.hidden_size * seq / (6 * n)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None when unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    if override_tflops:
        return name, override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS:
        if device.type == "cuda" and key in name:
            return name, tflops * 1e12
    return name, None


def build_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A fresh random-init model, initialised on `device` (seeded: every run starts the same)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Most GPU memory allocated since `reset_peak`, GiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- data -----------------------------------------------------------------------------------


def text_of_tokens(tok: Any, rng: random.Random, n_tokens: int) -> str:
    """Random corpus sentences joined until the text is at least `n_tokens` tokens long."""
    from ralign.runtime.tiny import corpus

    lines = corpus()
    parts: list[str] = []
    # Grow by whole chunks, encoding the joined text once per chunk (re-encoding per sentence is slow).
    while not parts or len(tok.encode(" ".join(parts), add_special_tokens=False)) < n_tokens:
        parts += [rng.choice(lines) for _ in range(max(1, n_tokens // 40))]
    return " ".join(parts)


def training_data(tok: Any, n_rows: int, seq: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(SFT examples, DPO pairs): prompts of ~seq/4 tokens, responses long enough to be cut at seq."""
    rng = random.Random(seed)
    pool = [text_of_tokens(tok, rng, seq) for _ in range(8)]  # reused: tokenizing is the slow part
    prompts = [text_of_tokens(tok, rng, seq // 4) for _ in range(8)]
    sft, dpo = [], []
    for i in range(n_rows):
        prompt = f"{i}. {prompts[i % len(prompts)]}"
        sft.append({"prompt": prompt, "response": pool[i % len(pool)]})
        chosen, rejected = pool[i % len(pool)], pool[(i + 3) % len(pool)]
        dpo.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return sft, dpo


def sampling_prompts(n: int, seed: int) -> list[str]:
    """n prompts of 1 to 4 corpus sentences (varied lengths, so length-sorting has work to do)."""
    from ralign.runtime.tiny import corpus

    rng = random.Random(seed)
    lines = corpus()
    return [" ".join(rng.sample(lines, rng.randint(1, 4))) for _ in range(n)]


# ---- ralign ---------------------------------------------------------------------------------


def ralign_tokens(tok: Any, data: list[dict], mode: str, seq: int) -> int:
    """Tokens ralign's training feeds (attention-mask ones), from its own encoding."""
    from ralign.runtime.batches import encode_example, encode_pairs

    if mode == "sft":
        rows = [encode_example(tok, d["prompt"], d["response"], seq) for d in data]
        return sum(len(r.input_ids) for r in rows if r is not None)
    return sum(
        len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in encode_pairs(tok, data, seq)
    )


def run_ralign(env: dict, mode: str, data: list[dict], batch: int) -> dict:
    """One ralign training call on a fresh model; wall time and per-step times."""
    from ralign.runtime.train import train_dpo, train_sft

    device, acc = env["device"], env["accelerator"]
    model = build_model(env["config"], device, env["dtype"])
    ref = None
    if mode == "dpo":
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    stamps: list[float] = []
    on_step = lambda step, metrics: stamps.append(time.perf_counter())  # noqa: E731  (.item() inside syncs)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    if mode == "sft":
        out = train_sft(
            model,
            env["tok"],
            data,
            lr=LR,
            epochs=1,
            batch_size=batch,
            seed=SEED,
            accelerator=acc,
            max_length=env["seq"],
            on_step=on_step,
        )
    else:
        out = train_dpo(
            model,
            env["tok"],
            data,
            beta=BETA,
            lr=LR,
            epochs=1,
            batch_size=batch,
            seed=SEED,
            reference_model=ref,
            accelerator=acc,
            max_length=env["seq"],
            on_step=on_step,
        )
    sync(device)
    seconds = time.perf_counter() - start
    memory = peak_gib(device)
    acc.free_memory()  # prepare() keeps references to every model/optimizer it has seen
    del model, ref
    release(device)
    return {
        "seconds": seconds,
        "steps": out["steps"],
        "loss": out["loss"],
        "peak_gib": memory,
        "step_seconds": [b - a for a, b in zip([start, *stamps], stamps, strict=False)],
    }


def run_ralign_sample(env: dict, prompts: list[str]) -> dict:
    from ralign.runtime.generation import sample

    made = [0]
    p = env["params"]

    def progress(done: int, tokens: int) -> None:
        made[0] += tokens

    sync(env["device"])
    start = time.perf_counter()
    sample(
        env["model"],
        env["tok"],
        prompts,
        per_prompt=p["per_prompt"],
        temperature=0.9,
        max_new_tokens=p["new_tokens"],
        seed=SEED,
        batch_size=p["sample_batch"],
        progress=progress,
    )
    sync(env["device"])
    return {"seconds": time.perf_counter() - start, "tokens": made[0]}


# ---- baselines ------------------------------------------------------------------------------


def run_generate(env: dict, prompts: list[str]) -> dict:
    """What a user writes: tokenize a batch with left padding, `model.generate`, count new tokens."""
    from ralign.runtime.models import format_prompt

    model, tok, p, device = env["model"], env["tok"], env["params"], env["device"]
    texts = [format_prompt(tok, x) for x in prompts]
    per_call = max(1, p["sample_batch"] // p["per_prompt"])
    eos = tok.eos_token_id
    tokens = 0
    torch.manual_seed(SEED)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), per_call):
            enc = tok(
                texts[i : i + per_call], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = enc.to(device)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=0.9,
                top_p=1.0,
                top_k=0,
                max_new_tokens=p["new_tokens"],
                num_return_sequences=p["per_prompt"],
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)
    sync(device)
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def trl_dataset(tok: Any, mode: str, data: list[dict]) -> Any:
    # TRL's non-conversational path with ralign's chat-formatted prompt, as tests/test_dpo_trl.py does.
    from datasets import Dataset

    from ralign.runtime.models import format_prompt

    if mode == "sft":
        rows = [
            {"prompt": format_prompt(tok, d["prompt"]), "completion": d["response"]} for d in data
        ]
    else:
        rows = [{**d, "prompt": format_prompt(tok, d["prompt"])} for d in data]
    return Dataset.from_list(rows)


def trl_trainer(
    env: dict, mode: str, data: list[dict], batch: int, checkpointing: bool, out_dir: str
) -> Any:
    import trl
    from transformers import PrinterCallback, TrainerCallback

    device = env["device"]
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_length=env["seq"],
        gradient_checkpointing=checkpointing,
        bf16=False,  # the weights are already bf16 on CUDA: no autocast, as ralign
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=SEED,
        use_cpu=device.type == "cpu",
    )
    model = build_model(env["config"], device, env["dtype"])
    dataset = trl_dataset(env["tok"], mode, data)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync(device)  # TRL does not sync per step; ralign's loss .item() does
            stamps.append(time.perf_counter())

    if mode == "sft":
        trainer = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(**common),
            train_dataset=dataset,
            processing_class=env["tok"],
            callbacks=[Stamp()],
        )
    else:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=ref,
            args=trl.DPOConfig(**common, beta=BETA),
            train_dataset=dataset,
            processing_class=env["tok"],
            callbacks=[Stamp()],
        )
    trainer.remove_callback(PrinterCallback)  # it prints the metrics dict at the end of train()
    return trainer, stamps


def trl_tokens(trainer: Any) -> int:
    """Tokens TRL feeds the policy (attention-mask ones), from its own collator over its dataset."""
    ds = trainer.train_dataset
    total = 0
    for i in range(0, len(ds), 16):
        batch = trainer.data_collator([ds[j] for j in range(i, min(i + 16, len(ds)))])
        total += int(batch["attention_mask"].sum())
    return total


def run_trl(env: dict, mode: str, data: list[dict], batch: int, checkpointing: bool) -> dict:
    device = env["device"]
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, stamps = trl_trainer(env, mode, data, batch, checkpointing, out_dir)
        tokens = trl_tokens(trainer)
        sync(device)
        reset_peak(device)
        start = time.perf_counter()
        out = trainer.train()
        sync(device)
        seconds = time.perf_counter() - start
        memory = peak_gib(device)
        steps = trainer.state.global_step
    del trainer
    release(device)
    return {
        "seconds": seconds,
        "steps": steps,
        "loss": out.training_loss,
        "tokens": tokens,
        "peak_gib": memory,
        "step_seconds": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
    }


# ---- one shape ------------------------------------------------------------------------------


def bench_shape(shape: str, env: dict, log: Any) -> dict:
    p = env["params"]
    config = model_config(shape, env["tok"])
    env["config"] = config
    counts = param_counts(config)
    n = counts["matmul"]
    frameworks = p["frameworks"].split(",")
    modes = p["modes"].split(",")
    result: dict[str, Any] = {
        "config": {k: getattr(config, k) for k in SHAPES[shape] if k != "arch"}
        | {"arch": SHAPES[shape]["arch"]},
        "params": counts,
        "N": n,
        "N_is": "all parameters but the input-embedding lookup (tied: all parameters)",
        "attention_share": attention_share(config, env["seq"], n),
        "runs": {},
    }
    for mode, batch in (("sft", p["batch"]), ("dpo", p["dpo_batch"])):
        if mode not in modes:
            continue
        sft, dpo = env["data"]
        data = (sft if mode == "sft" else dpo)[: batch * p["steps"]]
        warm = data[: batch * p["warmup"]]
        ours = ralign_tokens(env["tok"], data, mode, env["seq"])

        def one(fw: str, rows: list[dict], mode: str = mode, batch: int = batch) -> dict:
            if fw == "ralign":
                return run_ralign(env, mode, rows, batch)
            return run_trl(env, mode, rows, batch, checkpointing=fw == "trl_gc")

        runs: dict[str, list[dict]] = {fw: [] for fw in frameworks}
        if warm:
            for fw in frameworks:
                one(fw, warm)
        for rep in range(p["repeats"]):
            for fw in frameworks if rep % 2 == 0 else frameworks[::-1]:
                r = one(fw, data)
                r.setdefault("tokens", ours)
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                r["mfu"] = mfu(r["tokens"], r["seconds"], n, mode, env["peak"])
                # Steady state: the median step, without the call's set-up (tokenization, the
                # reference pass, the first step's allocations) that the whole-run figure includes.
                step_s = statistics.median(r["step_seconds"])
                r["step_tokens_per_s"] = r["tokens"] / r["steps"] / step_s
                r["step_mfu"] = mfu(r["tokens"] / r["steps"], step_s, n, mode, env["peak"])
                runs[fw].append(r)
                log(
                    f"  {shape} {mode} {fw:7s} rep {rep}: {r['seconds']:.2f} s, {r['tokens_per_s']:,.0f} tok/s"
                )
        result["runs"][mode] = runs

    if "sample" not in modes:
        result["summary"] = summarize(result["runs"])
        return result
    model = build_model(config, env["device"], env["dtype"]).eval()
    env["model"] = model
    prompts = sampling_prompts(p["prompts"], SEED)
    samplers = {"ralign": run_ralign_sample, "generate": run_generate}
    runs = {k: [] for k in samplers}
    for fn in samplers.values():  # warm-up: one short call each
        fn(env, prompts[:2])
    for rep in range(p["repeats"]):
        for name in samplers if rep % 2 == 0 else list(samplers)[::-1]:
            r = samplers[name](env, prompts)
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            runs[name].append(r)
            log(
                f"  {shape} sample {name:8s} rep {rep}: {r['seconds']:.2f} s, {r['tokens_per_s']:,.0f} tok/s"
            )
    result["runs"]["sample"] = runs
    del env["model"], model
    release(env["device"])
    result["summary"] = summarize(result["runs"])
    return result


def summarize(runs: dict) -> dict:
    out: dict[str, Any] = {}
    for mode in runs:
        for fw, rs in runs[mode].items():
            for key in ("tokens_per_s", "mfu", "step_tokens_per_s", "step_mfu"):
                if rs and rs[0].get(key) is not None:
                    out[f"{mode}.{fw}.{key}"] = statistics.median(r[key] for r in rs)
        trls = [fw for fw in ("trl", "trl_gc") if fw in runs[mode]]
        if mode != "sample" and "ralign" in runs[mode] and trls:
            ours = out[f"{mode}.ralign.tokens_per_s"]
            out[f"{mode}.vs_trl"] = ours / max(out[f"{mode}.{fw}.tokens_per_s"] for fw in trls)
            if "trl_gc" in trls:
                out[f"{mode}.vs_trl_default"] = ours / out[f"{mode}.trl_gc.tokens_per_s"]
            steps = [out.get(f"{mode}.{fw}.step_tokens_per_s") for fw in trls]
            if out.get(f"{mode}.ralign.step_tokens_per_s") and all(steps):
                out[f"{mode}.step_vs_trl"] = out[f"{mode}.ralign.step_tokens_per_s"] / max(steps)
    if "sample" in runs:
        out["sample.vs_generate"] = (
            out["sample.ralign.tokens_per_s"] / out["sample.generate.tokens_per_s"]
        )
    return out


# ---- report ---------------------------------------------------------------------------------


def checks(results: dict, seq: int) -> list[dict]:
    """Each target as {name, value, target, pass}; MFU targets only for the 0.5B shape at seq >= 1024."""
    rows = []
    for shape, res in results["shapes"].items():
        s = res["summary"]
        for mode in ("sft", "dpo"):
            if f"{mode}.vs_trl" in s:
                rows.append(
                    {
                        "name": f"{shape} {mode} vs TRL (best config)",
                        "value": s[f"{mode}.vs_trl"],
                        "target": TARGETS[f"vs_trl_{mode}"],
                    }
                )
            if shape == TARGET_SHAPE and seq >= MIN_TARGET_SEQ and f"{mode}.ralign.mfu" in s:
                rows.append(
                    {
                        "name": f"{shape} {mode} MFU (ralign)",
                        "value": s[f"{mode}.ralign.mfu"],
                        "target": TARGETS[f"mfu_{mode}"],
                    }
                )
    for r in rows:
        r["pass"] = r["value"] >= r["target"]
    return rows


def table(results: dict) -> str:
    head = (
        "shape",
        "mode",
        "framework",
        "tokens/s",
        "MFU",
        "vs ralign",
        "step tok/s",
        "step MFU",
        "peak GiB",
        "runs (s)",
    )
    cells = []
    for shape, res in results["shapes"].items():
        s = res["summary"]
        for mode, runs in res["runs"].items():
            base = s.get(f"{mode}.ralign.tokens_per_s")
            for fw, rs in runs.items():
                rate = s[f"{mode}.{fw}.tokens_per_s"]
                m = s.get(f"{mode}.{fw}.mfu")
                step_rate = s.get(f"{mode}.{fw}.step_tokens_per_s")
                step_m = s.get(f"{mode}.{fw}.step_mfu")
                cells.append(
                    (
                        shape,
                        mode,
                        fw,
                        f"{rate:,.0f}",
                        f"{m:.1%}" if m is not None else "-",
                        f"{base / rate:.2f}x" if base else "-",
                        f"{step_rate:,.0f}" if step_rate else "-",
                        f"{step_m:.1%}" if step_m is not None else "-",
                        f"{max(r.get('peak_gib') or 0 for r in rs):.1f}"
                        if rs[0].get("peak_gib")
                        else "-",
                        " ".join(f"{r['seconds']:.2f}" for r in rs),
                    )
                )
    return text_table(head, cells, left=3)  # shape, mode, framework; the figures right-aligned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes, float32, CPU, a couple of steps"
    )
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    ap.add_argument(
        "--device", default=None, help="default: cuda when available (cpu with --smoke)"
    )
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on CUDA, float32 on the CPU (as ralign's executor)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 peak")
    ap.add_argument("--tag", default="", help="added to the result's file name: gpu-DATE-TAG.json")
    ap.add_argument(
        "--out", type=Path, default=None, help="default: $OUT if set, else bench/results"
    )
    args = ap.parse_args(argv)
    params = {
        k: getattr(args, k) if getattr(args, k) is not None else v
        for k, v in (SMOKE if args.smoke else FULL).items()
    }
    device = torch.device(
        args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results")

    import datasets
    from accelerate import Accelerator

    from ralign.runtime.tiny import train_tokenizer

    datasets.disable_progress_bars()
    if args.smoke:
        torch.set_num_threads(1)  # tiny matrices: extra threads only spin against a loaded machine
    started = time.perf_counter()
    tok = train_tokenizer("llama", 512)
    tok.padding_side = "left"
    name, peak = peak_flops(device, args.peak_tflops)
    rows = max(params["batch"], params["dpo_batch"]) * params["steps"]
    env = {
        "device": device,
        "dtype": dtype,
        "tok": tok,
        "seq": params["seq"],
        "params": params,
        "peak": peak,
        "accelerator": Accelerator(cpu=device.type == "cpu"),  # as ralign's executor makes it
        "data": training_data(tok, rows, params["seq"], SEED),
    }
    load = os.getloadavg()
    print(
        f"device {name} ({device}, {dtype}); peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
        + (" (HIGH: timings noisy)" if load[0] > (os.cpu_count() or 1) else "")
    )
    print("versions: " + " ".join(f"{k} {v}" for k, v in versions().items()))
    results: dict[str, Any] = {
        "bench": "gpu",
        "date": dt.date.today().isoformat(),
        "smoke": args.smoke,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_start": list(load),
            "device": str(device),
            "device_name": name,
            "peak_flops": peak,
        },
        "versions": versions(),
        "params": params,
        "dtype": str(dtype),
        "targets": TARGETS,
        "flops": "6N per trained token + 2N per reference token; N = "
        + "all parameters but the input-embedding lookup",
        "shapes": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-{results['date']}{'-' + args.tag if args.tag else ''}.json"
    for shape in params["shapes"].split(","):
        print(f"{shape}: {SHAPES[shape]}")
        results["shapes"][shape] = bench_shape(shape, env, lambda line: print(line, flush=True))
        results["checks"] = checks(results, params["seq"])
        results["machine"]["load_average_end"] = list(os.getloadavg())
        results["seconds"] = time.perf_counter() - started
        path.write_text(
            json.dumps(results, indent=1, default=str)
        )  # after each shape: a kill keeps the rest

    print()
    print(
        f"seq {params['seq']}, SFT batch {params['batch']}, DPO batch {params['dpo_batch']} pairs, "
        f"{params['steps']} steps per run, median of {params['repeats']}; sampling {params['prompts']} "
        f"prompts x {params['per_prompt']}, {params['new_tokens']} new tokens"
    )
    print(table(results))
    print()
    for c in results["checks"]:
        print(
            f"{'PASS' if c['pass'] else 'MISS'}  {c['name']}: {c['value']:.3f} (target >= {c['target']})"
        )
    load = os.getloadavg()
    print(
        f"load average at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; total {results['seconds']:.0f} s"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
