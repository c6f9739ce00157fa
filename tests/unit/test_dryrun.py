"""Dry run: recipes validated for a cluster on the meta device, with exact parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalong.config.loader import config_from_dict
from megalong.config.schema import ConfigError
from megalong.engine.dryrun import dry_run
from megalong.utils.memory import ModelShape, analytic_param_counts
from tests.conftest import tiny_config

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False)


def _recipe(**sections) -> dict:
    base = {
        "model": {"init_config": dict(TINY)},
        "attention": {"train": "s2"},
        "zero": {"stage": 3},
        "data": {"max_seq_len": 512},
        "train": {"dtype": "bf16", "activation_checkpointing": "deepspeed", "micro_batch_size": 1, "grad_accum": 4},
    }
    for key, val in sections.items():
        base[key] = {**base.get(key, {}), **val}
    return base


def test_tiny_recipe_counts_equal_the_real_model():
    from megalong.config.schema import LoraConfig
    from megalong.lora import apply_lora_plus, count_parameters
    from megalong.models import create_model

    report = dry_run(config_from_dict(_recipe()), nodes=1, gpus_per_node=2, gpu_memory_gb=80, host_memory_gb=64)
    real = apply_lora_plus(create_model(tiny_config("llama"), seed=0), LoraConfig())
    trainable, total = count_parameters(real)
    assert (report.counts.trainable, report.counts.total) == (trainable, total)
    assert report.errors == [] and report.fits
    assert report.batch.train_batch == 1 * 4 * 2 and report.ds_config["train_batch_size"] == 8
    assert report.ds_config["zero_optimization"]["stage"] == 3
    assert report.rope["factor"] == 512 / 128  # linear PI to the training length
    summary = report.summary()
    json.dumps(summary)
    assert summary["params"] == {"total": total, "trainable": trainable, "frozen": total - trainable}
    assert summary["batch"]["tokens_per_step"] == 8 * 512
    text = report.render()
    for part in ("DeepSpeed JSON", "checks:", "memory plan:", "per-GPU peak", "dry run verdict: FITS"):
        assert part in text


def test_70b_recipe_via_arch_fallback_fits_8x80gb():
    recipe = _recipe(
        model={"name_or_path": "/nonexistent/models/Llama-2-70b-hf", "arch": "llama2-70b"},
        zero={"stage": 3, "offload_optimizer": True, "offload_param": True},
        data={"max_seq_len": 32768, "prefixes": ["/nonexistent/data/train"]},
        attention={"backend": "flash"},
    )
    recipe["model"].pop("init_config")
    report = dry_run(config_from_dict(recipe), nodes=1, gpus_per_node=8, gpu_memory_gb=80, host_memory_gb=1024)
    expected = analytic_param_counts(ModelShape.known("llama2-70b"))
    assert report.counts.trainable == expected.trainable == 296_230_912  # LoRA r=8 on q,k,v,o + embed + norms
    assert report.counts.total == expected.total
    assert report.errors == [] and report.fits
    assert "llama2-70b" in report.model_source
    assert any(c.level == "warn" and c.what == "data" for c in report.checks)
    assert report.estimate.gpu_peak < 80 * 2**30


def test_70b_without_offload_does_not_fit_and_suggests_fixes():
    recipe = _recipe(model={"name_or_path": "/nonexistent/Llama-2-70b-hf", "arch": "llama2-70b"},
                     data={"max_seq_len": 32768})
    recipe["model"].pop("init_config")
    report = dry_run(config_from_dict(recipe), nodes=1, gpus_per_node=8)
    assert report.errors == [] and not report.fits
    assert report.suggestions and "would fit with" in report.render()


def test_impossible_layout_fails_with_a_clear_message():
    report = dry_run(config_from_dict(_recipe(parallel={"sp": 3})), nodes=1, gpus_per_node=8)
    assert not report.fits
    assert any("parallel.sp=3 does not divide the world size 8" in e for e in report.errors)
    assert "INVALID" in report.render()
    json.dumps(report.summary())


def test_missing_model_dir_without_arch_names_the_fix():
    recipe = _recipe(model={"name_or_path": "/nonexistent/Llama-2-7b-hf"})
    recipe["model"].pop("init_config")
    report = dry_run(config_from_dict(recipe))
    assert not report.fits and any("set model.arch" in e for e in report.errors)


def test_unknown_arch_is_a_config_error():
    recipe = _recipe(model={"name_or_path": "/x", "arch": "llama9-1t"})
    recipe["model"].pop("init_config")
    with pytest.raises(ConfigError, match="model.arch='llama9-1t' is not supported"):
        config_from_dict(recipe)


@pytest.mark.parametrize("name", ["llama2_7b_100k", "llama2_13b_64k", "llama2_70b_32k"])
def test_shipped_long_recipes_fit_one_8x80gb_node(name):
    from megalong.config import load_config

    path = Path(__file__).resolve().parents[2] / "launch" / "configs" / f"{name}.yaml"
    report = dry_run(load_config(path), nodes=1, gpus_per_node=8, gpu_memory_gb=80, host_memory_gb=1024)
    assert report.errors == [], report.errors
    assert report.fits, report.render()
