"""Benchmark ralign's DPO and SFT training steps against TRL's DPOTrainer and SFTTrainer on the same model, data and settings.

Usage: python bench/train_vs_trl.py [--quick] [--models tiny,smollm2,qwen2v] [--kinds dpo,sft]
                                    [--modes full,lora] [--repeats 3] [--threads N]

Simplifications, stated up front:
- Same model, examples, batch size, max_length, float32 on the CPU, AdamW (torch's, not fused; weight
  decay 0.01 = torch's default, which ralign uses; transformers' Trainer exempts biases and norm
  weights from it, ralign decays every trainable parameter), constant learning rate, clipping at 1.0,
  one process, no gradient checkpointing, no mixed precision, on both sides. TRL's own defaults
  differ (gradient checkpointing, bf16, fused AdamW, linear decay): they are set to match ralign,
  so the comparison is of the training step, not of defaults.
- DPO: ralign scores the frozen reference once, before the first epoch. TRL is run with
  `precompute_ref_log_probs=True`, the same algorithm (TRL's default re-scores the reference on
  every step, which costs an extra forward per step). Full fine-tuning passes the same separately
  loaded reference model to both; LoRA passes none, and both use the adapter-disabled policy.
- Throughput counts the tokens of every sequence trained on: for DPO the chosen and rejected
  sequences of the batch (prompt + response each), for SFT the prompt+response sequences. For
  TRL they are the non-pad tokens (attention mask) of each training forward; ralign packs its
  batches (a pair's prompt fed once, SFT rows end to end), so it reports the same count itself
  (each step's "input_tokens"): work saved by packing shows as speed, not as fewer tokens. Both systems
  run whole epochs over the same rows, so they train the same tokens in the same number of steps;
  the batch order differs (each shuffles with its own generator). The first step is a warm-up and
  is excluded: "tokens/s" is the tokens of steps 2..N over the time from the end of step 1 to the
  end of step N. "end to end" is every token over the whole call, setup included: for ralign
  `train_dpo` / `train_sft` whole (its tokenization, reference pass, loop); for TRL building the
  dataset and the trainer (its constructor tokenizes) and `train()` (its reference pass, loop).
  "tokenize_seconds" splits out ralign's encode call and TRL's dataset and constructor (which
  tokenizes and, for DPO with `precompute_ref_log_probs`, also scores the reference).
  Throughput is also reported per second of the trial process's CPU time (all its threads), which
  other work on the machine disturbs less.
- qwen2v is a Qwen2-shaped model with Qwen2's 151,936-token vocabulary and a small body (hidden 64,
  2 layers, tied embeddings; ralign's tiny builder, its own small tokenizer), so the LM head and
  log-softmax dominate memory as they do on a real Qwen2 while the whole runs on a CPU. Its policy
  is the built model nudged off its init and its reference the built model, and one batch holds
  every pair: both systems' first step then sees the same pairs under a policy that differs from
  its reference, and its loss is compared (to 1e-5), not just the memory.
- Peak memory is the trial's own: each trial runs in a fresh process (forked from a server that has
  imported the libraries and run nothing, so imports are paid once); after imports and model
  loading the kernel's peak-RSS mark is reset (/proc/self/clear_refs; where that fails, the RSS at
  that point is subtracted from the process's lifetime peak), and the figure is the peak RSS during
  training minus the RSS before it. It covers everything training allocates: optimizer state,
  activations, gradients, logits, the trainer's own objects.
- Trials alternate ralign/TRL and the order flips every repeat (A B B A ...); each figure is the
  median over repeats, and ratios are ralign / TRL of those medians. Timings on a loaded machine
  are noisy in absolute terms; the load average is recorded per trial.
- Threads: torch's default (2 here) for SmolLM2, one for the tiny and qwen2v models (see SIZES),
  the same for both systems.
- Text is synthetic (seeded English-like word salad cut to a drawn number of tokens), so the
  sequence lengths, not the words, are what is realistic.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import load, record  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("ralign", "trl")
# Per-trial figures reported as medians, and those also reported as ralign / TRL ratios.
MEDIANS = (
    "tokens_per_s",
    "tokens_per_cpu_s",
    "end_to_end_tokens_per_s",
    "end_to_end_tokens_per_cpu_s",
    "train_peak_mb",
    "setup_seconds",
)
RATIOS = (
    "tokens_per_s",
    "tokens_per_cpu_s",
    "end_to_end_tokens_per_s",
    "end_to_end_tokens_per_cpu_s",
    "train_peak_mb",
)
CLOCK = {
    "tokens_per_s": "wall",
    "tokens_per_cpu_s": "cpu",
    "end_to_end_tokens_per_s": "wall",
    "end_to_end_tokens_per_cpu_s": "cpu",
}
PRELOAD = ["torch", "transformers", "datasets", "peft", "trl", "ralign.runtime.train"]
TARGETS = {
    "dpo_tokens_per_s_ratio": 1.2,  # ralign / TRL, at least
    "dpo_peak_memory_ratio": 1.0,  # ralign / TRL, at most
    "sft_tokens_per_s_ratio": 1.0,  # ralign / TRL, at least
    "qwen2v_dpo_peak_memory_ratio": 0.8,  # ralign / TRL, at most, on the 152k vocabulary
    "smollm2_end_to_end_ratio": 1.5,  # ralign / TRL whole-call tokens/s, at least, DPO and SFT
    "first_loss_abs_diff": 1e-5,  # |ralign - TRL| first-step loss, at most, where batches match
}
# A path or ralign: name per model; qwen2v is built by the run itself (`qwen2_vocab_models`).
MODELS = {"tiny": "ralign:tiny-llama", "smollm2": "ralign:smollm2-135m", "qwen2v": ""}
QWEN2_VOCAB = 151_936
LORA = {"rank": 8, "alpha": 16}
# Per model: rows (pairs or examples), batch size, epochs, token ranges of prompt and responses, and
# torch threads (0: torch's default). The tiny model runs on one thread: its ops are too small to
# gain from a second, and on a shared machine the OpenMP barrier between two threads made its step
# times swing tenfold from run to run.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "rows": 64,
        "batch_size": 4,
        "epochs": 1,
        "prompt": (20, 120),
        "response": (20, 120),
        "threads": 1,
    },
    "smollm2": {
        "rows": 16,
        "batch_size": 4,
        "epochs": 1,
        "prompt": (16, 64),
        "response": (16, 64),
        "threads": 0,
    },
    # One batch holding every row (so the first steps compare), several epochs for the timing.
    "qwen2v": {
        "rows": 8,
        "batch_size": 8,
        "epochs": 3,
        "prompt": (16, 64),
        "response": (16, 64),
        "threads": 1,
    },
}
QUICK = {**SIZES["tiny"], "rows": 12, "prompt": (20, 60), "response": (20, 60)}
# --quick also runs qwen2v DPO on full weights, small: the new shape's path and its loss check.
QUICK_QWEN2V = {**SIZES["qwen2v"], "rows": 4, "batch_size": 4, "epochs": 2}

# ---- data ------------------------------------------------------------------------------

WORDS = (
    "the a model answer question people water light river city garden teacher student robot "
    "history science music paper window market morning evening friend family number system "
    "explain describe compare write list help build measure read find keep change carry give "
    "small large careful quick quiet bright simple clear honest useful safe strange old new "
    "because although while before after during without between around under over through "
    "always often never sometimes usually quickly slowly carefully clearly probably really "
    "bread coffee train bridge mountain forest ocean engine letter story problem reason method "
    "first second third next last every each many few several most some other such only "
    "think know believe remember forget decide learn teach share follow open close start stop"
).split()


def _words(rng: random.Random, n: int) -> str:
    out, sentence = [], 0
    for _ in range(n):
        word = rng.choice(WORDS)
        out.append(word.capitalize() if sentence == 0 else word)
        sentence += 1
        if sentence >= rng.randint(6, 14):
            out[-1] += rng.choice(".?!,;") if rng.random() < 0.3 else "."
            sentence = 0
    return " ".join(out)


def _text(tok: Any, rng: random.Random, lo_hi: tuple[int, int]) -> str:
    """Synthetic text cut to a drawn number of tokens in [lo, hi] (as `tok` counts them)."""
    n = rng.randint(*lo_hi)
    ids = tok(_words(rng, 2 * n), add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids).strip()


def make_data(tok: Any, kind: str, rows: int, prompt: tuple, response: tuple, seed: int) -> list:
    """`rows` DPO pairs (prompt, chosen, rejected) or SFT examples (prompt, response), seeded."""
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        p = _text(tok, rng, prompt)
        if kind == "dpo":
            data.append(
                {
                    "prompt": p,
                    "chosen": _text(tok, rng, response),
                    "rejected": _text(tok, rng, response),
                }
            )
        else:
            data.append({"prompt": p, "response": _text(tok, rng, response)})
    return data


# ---- one trial (runs in its own process) ------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # no /proc: the lifetime peak is the best available stand-in
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False when this system cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    import resource

    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


class Recorder:
    """Times steps and counts tokens from forward pre-hooks on the decoder backbones.

    The backbone (e.g. LlamaModel) is called as a module, with the attention mask as a keyword, by
    the plain forward, by peft's wrappers and by TRL's fused LM head alike, so one hook sees every
    forward of either system. Forwards with gradients off are reference passes.
    """

    def __init__(self) -> None:
        self.first_forward: float | None = None
        self.first_forward_cpu: float | None = None
        self.step_ends: list[float] = []
        self.step_ends_cpu: list[float] = []
        self.step_tokens: list[int] = []
        self.losses: list[float] = []  # each step's loss, as the system reports it
        self.tokenize_seconds = 0.0
        self.pending = 0
        self.no_grad_forwards: dict[str, int] = {}
        self.models: dict[str, Any] = {}

    def watch(self, model: Any, name: str, count: bool = True) -> None:
        """Hook `model`'s backbone; `count` False: the system reports its step tokens itself."""
        backbone = _hf_model(model).base_model
        self.no_grad_forwards[name] = 0

        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            import torch

            if not torch.is_grad_enabled():
                self.no_grad_forwards[name] += 1
                return
            if self.first_forward is None:
                self.first_forward = time.perf_counter()
                self.first_forward_cpu = time.process_time()
            if count:
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.pending += int(mask.sum()) if mask is not None else int(ids.numel())

        backbone.register_forward_pre_hook(pre, with_kwargs=True)

    def step_end(self) -> None:
        if not self.step_ends:
            self.models = _models_in_memory()  # once, inside the excluded warm-up step
        self.step_tokens.append(self.pending)
        self.pending = 0
        self.step_ends.append(time.perf_counter())
        self.step_ends_cpu.append(time.process_time())


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _models_in_memory() -> dict[str, Any]:
    """Every live Hugging Face model and the distinct bytes of their parameters, found by gc.

    With LoRA and the adapter-disabled reference there must be one model; a second copy of the
    weights would show as a second model or as twice the bytes.
    """
    from transformers import PreTrainedModel

    with warnings.catch_warnings():  # isinstance probes deprecated module attributes; say nothing
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    # A CausalLM holds its backbone, also a PreTrainedModel: count the outermost ones.
    inner = {id(m) for o in found for m in o.modules() if m is not o}
    found = [m for m in found if id(m) not in inner]
    storages: dict[int, int] = {}
    for m in found:
        for p in m.parameters():
            s = p.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    trainable = sum(p.numel() for m in found for p in m.parameters() if p.requires_grad)
    return {
        "count": len(found),
        "parameter_mb": sum(storages.values()) / 2**20,
        "trainable_parameters": trainable,
    }


def run_trial(cfg: dict) -> dict:
    """Load, train once with `cfg["system"]`, and return the raw timings and memory figures."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside TRL
    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.models import ModelSpec, apply_lora, load_model

    if cfg["system"] == "trl":
        import trl  # noqa: F401  (imported before the baseline: its import is not training memory)
        from datasets import Dataset  # noqa: F401
        from peft import LoraConfig  # noqa: F401
    else:
        from ralign.runtime import train  # noqa: F401

    data = json.loads(Path(cfg["data"]).read_text(encoding="utf-8"))
    torch.manual_seed(cfg["seed"])
    model, tok = load_model(ModelSpec(cfg["model"]))
    reference = None if cfg["lora"] else load_model(ModelSpec(cfg["reference"]))[0]
    if cfg["lora"] and cfg["system"] == "ralign":
        model = apply_lora(model, LORA)  # trl applies the same config itself (peft_config)
    rec = Recorder()
    # ralign packs sequences (a DPO pair's prompt once, SFT rows end to end), so an attention mask
    # no longer counts them: it reports its steps' sequence tokens, prompts included (on_step's
    # "input_tokens"), the same count TRL's padded masks give.
    rec.watch(model, "policy", count=cfg["system"] != "ralign")
    if reference is not None:
        rec.watch(reference, "reference")

    gc.collect()
    reset = _reset_peak()
    rss0 = _rss_mb()
    load_now = load()
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg["system"] == "ralign":
        out = _train_ralign(cfg, model, reference, tok, data, rec)
    else:
        out = _train_trl(cfg, model, reference, tok, data, rec)
    t1, c1 = time.perf_counter(), time.process_time()
    peak = _peak_mb()

    steps = len(rec.step_ends)
    timed_tokens = sum(rec.step_tokens[1:])
    timed_s = rec.step_ends[-1] - rec.step_ends[0] if steps > 1 else float("nan")
    timed_cpu = rec.step_ends_cpu[-1] - rec.step_ends_cpu[0] if steps > 1 else float("nan")
    starts = [rec.first_forward, *rec.step_ends[:-1]]
    starts_cpu = [rec.first_forward_cpu, *rec.step_ends_cpu[:-1]]
    return {
        **{k: cfg[k] for k in ("system", "kind", "model_key", "lora", "repeat")},
        "steps": steps,
        "tokens": sum(rec.step_tokens),
        "step_tokens": rec.step_tokens,
        "step_seconds": [e - s for s, e in zip(starts, rec.step_ends, strict=True)],
        "timed_tokens": timed_tokens,
        "step_cpu_seconds": [e - s for s, e in zip(starts_cpu, rec.step_ends_cpu, strict=True)],
        "timed_seconds": timed_s,
        "timed_cpu_seconds": timed_cpu,
        "tokens_per_s": timed_tokens / timed_s if steps > 1 else float("nan"),
        "tokens_per_cpu_s": timed_tokens / timed_cpu if steps > 1 else float("nan"),
        "setup_seconds": rec.first_forward - t0,
        "end_to_end_seconds": t1 - t0,
        "end_to_end_tokens_per_s": sum(rec.step_tokens) / (t1 - t0),
        "end_to_end_cpu_seconds": c1 - c0,
        "end_to_end_tokens_per_cpu_s": sum(rec.step_tokens) / (c1 - c0),
        "tokenize_seconds": rec.tokenize_seconds,
        "first_loss": rec.losses[0] if rec.losses else float("nan"),
        "rss_before_training_mb": rss0,
        "peak_rss_mb": peak,
        # Without the reset the peak may be loading's, so the figure is then an upper bound.
        "train_peak_mb": peak - rss0,
        "peak_mark_reset": reset,
        "reference_forwards": rec.no_grad_forwards,
        "models_in_memory": rec.models,
        "load_average": load_now,
        "torch_threads": torch.get_num_threads(),
        "result": out,
    }


def _train_ralign(
    cfg: dict, model: Any, reference: Any, tok: Any, data: list, rec: Recorder
) -> dict:
    from ralign.runtime import train
    from ralign.runtime.train import train_dpo, train_sft

    def timed(encode: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = encode(*args, **kwargs)
            rec.tokenize_seconds += time.perf_counter() - start
            return out

        return run

    # This trial's own process: the wrap ends with it.
    train.encode_pairs, train.encode_examples = (
        timed(train.encode_pairs),
        timed(train.encode_examples),
    )

    def on_step(step: int, metrics: dict) -> None:
        rec.losses.append(metrics["loss"])
        rec.pending = metrics["input_tokens"] - sum(rec.step_tokens)
        rec.step_end()

    common = dict(
        lr=cfg["lr"],
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
        max_length=cfg["max_length"],
        on_step=on_step,
    )
    if cfg["kind"] == "dpo":
        out = train_dpo(model, tok, data, beta=cfg["beta"], reference_model=reference, **common)
    else:
        out = train_sft(model, tok, data, **common)
    return {"mean_loss": out["mean_loss"], "steps": out["steps"]}


def _train_trl(cfg: dict, model: Any, reference: Any, tok: Any, data: list, rec: Recorder) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback

    from ralign.runtime.models import format_prompt

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rec.step_end()

    # ralign's loader pads on the left, for generation; TRL's collators pad training batches right.
    tok.padding_side = "right"
    # TRL's non-conversational path, on ralign's chat-formatted prompt text; TRL appends EOS to the
    # completions and splits prompt from completion where their tokenizations diverge, as ralign does.
    rows = [{**d, "prompt": format_prompt(tok, d["prompt"])} for d in data]
    if cfg["kind"] == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]
    common = dict(
        output_dir=cfg["tmp"],
        per_device_train_batch_size=cfg["batch_size"],
        num_train_epochs=cfg["epochs"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.01,
        max_grad_norm=1.0,
        max_length=cfg["max_length"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=cfg["seed"],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    # TRL turns gradient checkpointing on by default; transformers 5 renamed it.
    fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    common[name] = False
    peft_config = (
        LoraConfig(
            r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        if cfg["lora"]
        else None
    )
    start = time.perf_counter()
    dataset = Dataset.from_list(rows)
    if cfg["kind"] == "dpo":
        args = trl.DPOConfig(beta=cfg["beta"], precompute_ref_log_probs=True, **common)
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[StepEnd()],
        )
    else:
        args = trl.SFTConfig(completion_only_loss=True, packing=False, **common)
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[StepEnd()],
        )
    rec.tokenize_seconds = time.perf_counter() - start  # the constructor tokenizes the dataset
    trainer.remove_callback(PrinterCallback)  # the end-of-training summary line, not needed here
    compute_loss = trainer.compute_loss

    def recorded(*args: Any, **kwargs: Any) -> Any:
        out = compute_loss(*args, **kwargs)
        rec.losses.append((out[0] if isinstance(out, tuple) else out).item())
        return out

    trainer.compute_loss = recorded  # type: ignore[method-assign]
    out = trainer.train()
    return {"mean_loss": out.training_loss, "steps": out.global_step}


# ---- the comparison ------------------------------------------------------------------------


def trial(cfg: dict) -> dict:
    """Run one trial in a fresh process, forked from a server that has only imported the libraries."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # imports once, not once per trial; no torch op runs there
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_trial_child, args=(cfg, send))
    proc.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:  # died without a word: killed, e.g. out of memory
        status, payload = "error", "the trial process died"
    proc.join()
    if status != "ok":
        raise SystemExit(f"trial {cfg['system']} {cfg['kind']} failed:\n{payload}")
    return payload


def _trial_child(cfg: dict, send: Any) -> None:
    try:
        send.send(("ok", run_trial(cfg)))
    except BaseException:
        send.send(("error", traceback.format_exc()))
    send.close()


def qwen2_vocab_models(root: Path) -> tuple[str, str]:
    """(policy, reference) folders of the qwen2v shape: a tiny Qwen2 with Qwen2's vocabulary, and
    the same nudged off its init, so the policy's first loss is not DPO's trivial log 2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ralign.runtime.tiny import build_tiny_model

    reference = build_tiny_model("qwen2", root / "qwen2v", vocab_size=QWEN2_VOCAB)
    policy = root / "qwen2v-policy"
    if not policy.is_dir():
        model = AutoModelForCausalLM.from_pretrained(reference)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(policy)
        AutoTokenizer.from_pretrained(reference).save_pretrained(policy)
    return str(policy), str(reference)


def model_paths(key: str, tmp: Path) -> tuple[str, str]:
    """(policy, reference) of a model key; the same model except for qwen2v."""
    if key == "qwen2v":
        return qwen2_vocab_models(tmp)
    return MODELS[key], MODELS[key]


def compare(
    key: str,
    kind: str,
    lora: bool,
    sizes: dict,
    args: argparse.Namespace,
    tmp: Path,
    paths: tuple[str, str],
) -> dict:
    """Interleaved trials of both systems on one configuration; medians and ratios."""
    from transformers import AutoTokenizer

    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.models import resolve_path

    tok = AutoTokenizer.from_pretrained(resolve_path(paths[0]))
    data = make_data(tok, kind, sizes["rows"], sizes["prompt"], sizes["response"], args.seed)
    data_path = tmp / f"{key}-{kind}.json"
    data_path.write_text(json.dumps(data), encoding="utf-8")
    cfg = {
        "kind": kind,
        "model_key": key,
        "model": paths[0],
        "reference": paths[1],
        "lora": lora,
        "rows": sizes["rows"],
        "batch_size": sizes["batch_size"],
        "epochs": sizes["epochs"],
        "prompt_tokens": list(sizes["prompt"]),
        "response_tokens": list(sizes["response"]),
        "max_length": args.max_length,
        "lr": args.lr,
        "beta": args.beta,
        "seed": args.seed,
        "threads": sizes["threads"] if args.threads is None else args.threads,
        "data": str(data_path),
    }
    trials: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for r in range(args.repeats):
        for system in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
            out_dir = tmp / f"{key}-{kind}-{lora}-{system}-{r}"
            out_dir.mkdir()
            t = trial({**cfg, "system": system, "repeat": r, "tmp": str(out_dir)})
            trials[system].append(t)
            print(
                f"  {key:8} {kind} {'lora' if lora else 'full'} {system:6} #{r}: "
                f"{t['tokens_per_s']:9.1f} tok/s ({t['tokens_per_cpu_s']:9.1f} per CPU s), "
                f"peak {t['train_peak_mb']:7.1f} MB "
                f"(load {t['load_average'][0] if t['load_average'] else '?'})",
                flush=True,
            )
    med = {s: {m: statistics.median(t[m] for t in trials[s]) for m in MEDIANS} for s in SYSTEMS}
    ratios = {m: med["ralign"][m] / med["trl"][m] for m in RATIOS}
    same = {
        "tokens": len({t["tokens"] for s in SYSTEMS for t in trials[s]}) == 1,
        "steps": len({t["steps"] for s in SYSTEMS for t in trials[s]}) == 1,
    }
    out = {
        "config": {k: v for k, v in cfg.items() if k != "data"},
        "data_tokens": _data_tokens(tok, data),
        "trials": trials,
        "median": med,
        "ratio": ratios,
        "same_work": same,
    }
    if cfg["rows"] <= cfg["batch_size"]:
        # One batch holds every row, so both systems' first step saw the same examples.
        out["first_loss_abs_diff"] = max(
            abs(a["first_loss"] - b["first_loss"]) for a in trials["ralign"] for b in trials["trl"]
        )
    return out


def _data_tokens(tok: Any, data: list[dict]) -> dict[str, dict[str, float]]:
    """Min/mean/max token counts of each text field (raw text, before chat formatting)."""
    out = {}
    for field in data[0]:
        n = [len(tok(d[field], add_special_tokens=False)["input_ids"]) for d in data]
        out[field] = {"min": min(n), "mean": statistics.fmean(n), "max": max(n)}
    return out


# ---- report ------------------------------------------------------------------------------


def verdicts(results: list[dict]) -> list[dict]:
    """One PASS/MISS line per target and configuration."""
    out = []
    for res in results:
        c = res["config"]
        name = f"{c['model_key']} {c['kind']} {'lora' if c['lora'] else 'full'}"
        # Throughput is judged on both clocks, as bench/compile.py does: wall time is what a user
        # waits, CPU time is steadier while other work shares the machine.
        target = f"{c['kind']}_tokens_per_s_ratio"
        checks = [("tokens_per_s", target, ">="), ("tokens_per_cpu_s", target, ">=")]
        if c["kind"] == "dpo":
            memory = f"{c['model_key']}_dpo_peak_memory_ratio"
            checks.append(
                ("train_peak_mb", memory if memory in TARGETS else "dpo_peak_memory_ratio", "<=")
            )
        whole = f"{c['model_key']}_end_to_end_ratio"
        if whole in TARGETS:
            checks.append(("end_to_end_tokens_per_s", whole, ">="))
            checks.append(("end_to_end_tokens_per_cpu_s", whole, ">="))
        values = dict(res["ratio"])
        if "first_loss_abs_diff" in res:
            values["first_loss_abs_diff"] = res["first_loss_abs_diff"]
            checks.append(("first_loss_abs_diff", "first_loss_abs_diff", "<="))
        for metric, target, way in checks:
            value, goal = values[metric], TARGETS[target]
            ok = value >= goal if way == ">=" else value <= goal
            out.append(
                {
                    "config": name,
                    "target": target,
                    "metric": metric,
                    "value": value,  # a ralign / TRL ratio, or the loss difference
                    "goal": f"{way} {goal}",
                    "pass": ok,
                }
            )
    return out


def _shown(verdict: dict) -> str:
    value = verdict["value"]
    return f"{value:.1e}" if verdict["metric"] == "first_loss_abs_diff" else f"{value:.2f}x"


def table(results: list[dict]) -> str:
    head = (
        "config",
        "ralign tok/s",
        "TRL tok/s",
        "ratio",
        "CPU ratio",
        "e2e ratio",
        "e2e CPU",
        "ralign peak MB",
        "TRL peak MB",
        "ratio",
        "tokens",
        "steps",
        "models (r/T)",
        "weights MB (r/T)",
        "1st loss |r-T|",
    )
    cells = [head]
    for res in results:
        c, m, r = res["config"], res["median"], res["ratio"]
        first = {s: res["trials"][s][0] for s in SYSTEMS}
        cells.append(
            (
                f"{c['model_key']} {c['kind']} {'lora' if c['lora'] else 'full'}",
                f"{m['ralign']['tokens_per_s']:.1f}",
                f"{m['trl']['tokens_per_s']:.1f}",
                f"{r['tokens_per_s']:.2f}x",
                f"{r['tokens_per_cpu_s']:.2f}x",
                f"{r['end_to_end_tokens_per_s']:.2f}x",
                f"{r['end_to_end_tokens_per_cpu_s']:.2f}x",
                f"{m['ralign']['train_peak_mb']:.1f}",
                f"{m['trl']['train_peak_mb']:.1f}",
                f"{r['train_peak_mb']:.2f}x",
                f"{first['ralign']['tokens']}/{first['trl']['tokens']}",
                f"{first['ralign']['steps']}/{first['trl']['steps']}",
                f"{first['ralign']['models_in_memory'].get('count', '?')}/"
                f"{first['trl']['models_in_memory'].get('count', '?')}",
                f"{first['ralign']['models_in_memory'].get('parameter_mb', 0):.1f}/"
                f"{first['trl']['models_in_memory'].get('parameter_mb', 0):.1f}",
                f"{res['first_loss_abs_diff']:.1e}" if "first_loss_abs_diff" in res else "-",
            )
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            row[i].rjust(widths[i]) if i else row[i].ljust(widths[i]) for i in range(len(head))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny model and qwen2v DPO (full), one repeat, small sizes (about 2 minutes)",
    )
    ap.add_argument(
        "--models", default="tiny,smollm2,qwen2v", help="comma list of: " + ", ".join(MODELS)
    )
    ap.add_argument("--kinds", default="dpo,sft", help="comma list of: dpo, sft")
    ap.add_argument("--modes", default="full,lora", help="comma list of: full, lora")
    ap.add_argument("--repeats", type=int, default=3, help="trials per system and configuration")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per trial (0: torch's default; default: per model, 1 for tiny)",
    )
    args = ap.parse_args(argv)
    # Set before the first trial starts the fork server, which every trial inherits them from.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    models = ["tiny", "qwen2v"] if args.quick else args.models.split(",")
    runs = [
        (key, kind, mode) for key in models for kind in args.kinds.split(",")
        for mode in args.modes.split(",")
        if not args.quick or key == "tiny" or (kind, mode) == ("dpo", "full")
    ]  # fmt: skip
    sizes = {k: SIZES[k] for k in models}
    if args.quick:
        sizes = {"tiny": QUICK, "qwen2v": QUICK_QWEN2V}
    repeats = 1 if args.quick else args.repeats
    args.repeats = repeats
    start_load = load()
    cpus = os.cpu_count() or 1
    high = bool(start_load) and start_load[0] > 0.5 * cpus
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)} on {cpus} CPUs"
        + (
            " -- HIGH: other work is running, absolute figures are noisy (ratios are interleaved)"
            if high
            else ""
        )
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: model_paths(key, Path(tmp)) for key in models}
        for key, kind, mode in runs:
            lora = mode == "lora"
            results.append(compare(key, kind, lora, sizes[key], args, Path(tmp), paths[key]))
    end_load = load()
    checks = verdicts(results)

    print(
        f"\nmedians of {repeats} trial(s) per system; tok/s = non-pad tokens of steps 2..N per "
        "wall-clock second (CPU ratio: per second of the process's CPU time); e2e = every token over "
        "the whole call, setup included (e2e CPU: per CPU second); peak = RSS growth during "
        "training; ratios = ralign / TRL"
    )
    print(table(results))
    print()
    for v in checks:
        print(
            f"{'PASS' if v['pass'] else 'MISS'}  {v['config']:18} {v['target']:28} "
            f"{CLOCK.get(v['metric'], ''):5} {_shown(v)} (target {v['goal']})"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in end_load)}")
    for res in results:
        c, r = res["config"], res["trials"]["ralign"][0]
        if c["kind"] == "dpo" and c["lora"]:
            held, refs = r["models_in_memory"], r["reference_forwards"]
            print(
                f"{c['model_key']} dpo lora: ralign holds {held['count']} model(s), "
                f"{held['parameter_mb']:.1f} MB of parameters ({held['trainable_parameters']:,} "
                f"trainable); its reference forwards ran on the policy itself: {refs}"
            )
    for res in results:
        if not all(res["same_work"].values()):
            print(
                f"WARNING: {res['config']['model_key']} {res['config']['kind']}: the systems did different work {res['same_work']}"
            )

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        **record("train_vs_trl.py", argv, start_load),
        "quick": args.quick,
        "settings": {
            "repeats": repeats,
            "lr": args.lr,
            "beta": args.beta,
            "max_length": args.max_length,
            "seed": args.seed,
            "lora": LORA,
            "sizes": sizes,
        },
        "targets": TARGETS,
        "results": results,
        "verdicts": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "train_vs_trl-quick" if args.quick else "train_vs_trl"
    out = args.out / f"{name}-{now.date().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
