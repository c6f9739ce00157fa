"""Every shipped recipe loads, validates, renders its DeepSpeed JSON with consistent batch arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalong.config import ConfigError, load_config
from megalong.config.deepspeed import batch_arithmetic, render_deepspeed_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "launch" / "configs").glob("*.yaml"))


def test_all_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"tiny_cpu", "tiny_base_cpu", "llama2_7b_100k", "llama2_13b_64k", "llama2_70b_32k",
            "llama2_7b_sft_32k"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("dp", [1, 2, 8])
def test_recipe_renders(path, dp):
    cfg = load_config(path)
    for accel in ("cuda", "cpu"):
        ds = render_deepspeed_config(cfg, dp, accel)
        b = batch_arithmetic(cfg, dp)
        assert ds["train_batch_size"] == b.train_batch == cfg.train.micro_batch_size * cfg.train.grad_accum * dp
        assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
        assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum
        assert ds["zero_optimization"]["stage"] == cfg.zero.stage
        assert ds["bf16"]["enabled"] == (cfg.train.dtype == "bf16")
        off = ds["zero_optimization"]["offload_optimizer"]["device"]
        assert off == ("cpu" if cfg.zero.offload_optimizer else "none")
        assert ds["optimizer"]["params"]["torch_adam"] == (accel == "cpu")
    if cfg.attention.train == "s2":
        assert cfg.group_size == cfg.data.max_seq_len // 4 or cfg.attention.group_size == cfg.group_size


def test_big_recipes_say_what_longlora_did():
    c7 = load_config(RECIPES[0].parent / "llama2_7b_100k.yaml")
    assert (c7.data.max_seq_len, c7.group_size, c7.lora.trainable) == (100000, 25000, ["embed", "norm"])
    c70 = load_config(RECIPES[0].parent / "llama2_70b_32k.yaml")
    assert c70.zero.stage == 3 and c70.zero.offload_param and c70.train.activation_checkpointing != "none"
    sft = load_config(RECIPES[0].parent / "llama2_7b_sft_32k.yaml")
    assert sft.data.kind == "sft"


LONGLORA_RECIPES = ["llama2_7b_100k", "llama2_13b_64k", "llama2_70b_32k", "llama2_7b_256k_sp", "llama2_7b_sft_32k",
                    "pilot/extend_gpu_7b"]


@pytest.mark.parametrize("name", LONGLORA_RECIPES)
def test_longlora_recipes_use_its_optimizer_and_cite_each_value(name):
    """LongLoRA trains with HF Trainer's adamw_torch at its defaults (betas 0.9/0.999; stage2.json defines no
    optimizer), lr 2e-5 (7B/13B) or 1e-5 (70B), no weight decay, 20 warm-up steps then constant, clip 1.0;
    every such value in the recipe carries its source as a comment."""
    path = RECIPES[0].parent / f"{name}.yaml"
    t = load_config(path).train
    assert (tuple(t.betas), t.eps, t.weight_decay, t.warmup_steps, t.schedule, t.grad_clip) == (
        (0.9, 0.999), 1e-8, 0.0, 20, "constant", 1.0)
    assert t.lr == (1e-5 if "70b" in name else 2e-5)
    keys = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "schedule", "grad_clip", "micro_batch_size",
            "grad_accum", "max_steps", "dtype", "r", "trainable", "group_size_ratio")
    for line in path.read_text().splitlines():
        key = line.strip().split(":")[0]
        if line.startswith("  ") and key in keys:
            assert "#" in line, (name, line)


def test_overrides_and_impossible_configs(tmp_path):
    path = RECIPES[0].parent / "tiny_cpu.yaml"
    cfg = load_config(path, ["--train.max_steps=3", "--zero.stage=2", "--train.lr=2e-5"])
    assert (cfg.train.max_steps, cfg.zero.stage, cfg.train.lr) == (3, 2, 2e-5)
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(path, ["--train.max_step=3"])
    with pytest.raises(ConfigError, match="must be even"):
        load_config(path, ["--attention.group_size=255"])
    with pytest.raises(ConfigError, match="larger than data.max_seq_len"):
        load_config(path, ["--attention.group_size=4096"])
    with pytest.raises(ConfigError, match="zero.offload_param needs zero.stage=3"):
        load_config(path, ["--zero.stage=2", "--zero.offload_param=true"])
    with pytest.raises(ConfigError, match="cpu_checkpointing needs"):
        load_config(path, ["--train.cpu_checkpointing=true"])
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(path, ["--train.max_steps=many"])
    with pytest.raises(ConfigError, match="exactly one of model.name_or_path"):
        load_config(path, ["--model.init_config={model_type: llama}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
