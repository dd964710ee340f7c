"""The GPU recipes in recipes/gpu/ compile, offline, into plans that carry their training settings,
and the Accelerate configs beside them are what they say (FSDP2 full shard, DeepSpeed ZeRO-2)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ralign.compile import compile_file

GPU = Path(__file__).resolve().parents[1] / "recipes" / "gpu"
RECIPES = sorted(GPU.glob("*.ralign"))

# Per recipe: the policy's model attributes, and each train step's parameters, as the plan holds them.
EXPECTED = {
    "qwen2_5_0_5b.ralign": {
        "model": {
            "path": "Qwen/Qwen2.5-0.5B-Instruct",
            "precision": "bf16",
            "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["all-linear"]},
        },
        "train sft": {"grad_accum": 4, "schedule": "cosine", "warmup": 0.1, "batch_size": 8},
        "train dpo": {
            "grad_accum": 4,
            "schedule": "cosine",
            "warmup": 0.1,
            "reference": "previous",
            "loss": "sigmoid",
        },
    },
}


def test_every_gpu_recipe_has_expectations():
    assert [r.name for r in RECIPES] == sorted(EXPECTED)


@pytest.fixture
def offline(monkeypatch):
    """Any network connection fails the test: compiling must not fetch a hub model."""

    def refuse(*args, **kwargs):
        raise AssertionError("compiling opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_compiles_offline_with_its_settings(recipe: Path, offline):
    plan = compile_file(recipe)
    want = EXPECTED[recipe.name]
    model = plan.models[plan.policy]
    assert {k: model.get(k) for k in want["model"]} == want["model"]
    assert "sha256" not in model  # a hub id, not a local folder
    trains = [s for s in plan.steps if s.kind.startswith("train")]
    assert {s.kind for s in trains} == {"train sft", "train dpo"}
    for step in trains:
        assert {k: step.params.get(k) for k in want[step.kind]} == want[step.kind], step.id
    for dpo in (s for s in trains if s.kind == "train dpo"):
        # reference = "previous": the SFT step just before it, which is also its starting policy
        sft = f"r{dpo.round}/distill/train.sft"
        assert dpo.inputs["reference"] == dpo.inputs["policy"] == sft
    assert plan.rounds >= 2  # the DPO of round 1 is the policy round 2 starts from
    round2 = [s for s in trains if s.round == 2 and s.kind == "train sft"]
    assert round2[0].inputs["policy"] == "r1/distill/train.dpo"


def test_accelerate_configs_are_what_the_docs_say():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(GPU / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False  # ralign loads the model
    zero = load_config_from_file(str(GPU / "deepspeed_zero2.yaml"))
    assert zero.distributed_type == DistributedType.DEEPSPEED and zero.mixed_precision == "bf16"
    assert zero.deepspeed_config["zero_stage"] == 2
    # ralign accumulates itself and refuses grad_accum > 1 under DeepSpeed; its clipping default
    assert zero.deepspeed_config["gradient_accumulation_steps"] == 1
    assert zero.deepspeed_config["gradient_clipping"] == 1.0
