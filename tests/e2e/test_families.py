"""The whole road for each model family users bring, through the real ``deepspeed`` launcher.

    tiny base of the family (built from a config, saved as an HF dir by the run)
      └─ deepspeed --num_gpus 2: 2 CPU ranks, ZeRO-3, S²-Attn, LoRA+ (embed + norms), PI, fp32, 2 steps
           └─ export_hf ─► stock AutoModelForCausalLM      ┐ logits on real rows longer than the base
           └─ export_adapter ─► stock PeftModel on the base ├ context (RoPE scaling exercised) equal to
                                                           ┘ megalong's own model (full attention)

One launcher run per family (module-scoped fixture); the tests of a family share it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.assets import (
    assert_adapter_logits,
    clean_shm,
    megalong_model,
    real_rows,
    run_launcher,
    safetensors_of,
    step_losses,
    tiny_run_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE_CONTEXT = 64  # the tiny bases' max_position_embeddings; runs train at 128 (PI factor 2)

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=BASE_CONTEXT)
FAMILIES = {
    # Llama 2: multi-head attention, separate lm_head
    "llama2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # Llama 3 (3.2-1B style): GQA, tied embeddings, rope_theta 5e5, llama3 RoPE scaling
    "llama3": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                   rope_theta=500000.0),
    # Mistral: sliding window (S²-Attn group 32 fits inside it)
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=48,
                    tie_word_embeddings=False),
    # Qwen2 (2.5-0.5B style): q/k/v biases (transformers' default), tied embeddings
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM style: 9 query heads over 3 KV heads (3 per group; S²-Attn shifts 4 of 9 heads), tied
    "gqa9x3": dict(model_type="llama", num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                   hidden_size=72),
}
ROPE = {"llama3": {"type": "llama3"}}


def _launch(cfg: dict, root: Path) -> None:
    cfg_path = root / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    try:
        res = run_launcher(["--num_gpus", "2"], ["--config", str(cfg_path)])
    finally:
        clean_shm()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, assets, tmp_path_factory):
    """(family, run_dir) after 2 training steps of that family on 2 ranks."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    init = {"vocab_size": assets["vocab_size"], **_COMMON, **FAMILIES[family]}
    cfg = tiny_run_config(
        assets, root / "run", model={"init_config": init}, rope=ROPE.get(family, {"type": "linear"}),
        lora={"trainable": ["embed", "norm"]}, zero={"stage": 3},
        train={"max_steps": 2, "warmup_steps": 0, "eval_interval": 0}, checkpoint={"save_interval": 2},
    )
    _launch(cfg, root)
    return family, root / "run"


def test_family_trains_two_steps_through_the_launcher(family_run):
    from megalong.engine.export import open_checkpoint, trained_tensors
    from megalong.engine.setup import base_hf_config

    family, run = family_run
    losses = step_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values())
    rc = open_checkpoint(run)
    assert rc.meta["world_size"] == 2 and rc.meta["step"] == 2
    trained = trained_tensors(rc)
    lora_b = {k: v for k, v in trained.items() if ".lora_B." in k}
    assert len(lora_b) == 4 * 2 and all(v.abs().max() > 0 for v in lora_b.values()), family
    base = safetensors_of(rc.base_dir)
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(trained["model.norm.weight"], base["model.norm.weight"])
    hf_cfg, _ = base_hf_config(rc.cfg, rc.base_dir)  # the base is the family asked for
    assert hf_cfg.model_type == FAMILIES[family]["model_type"]
    assert hf_cfg.tie_word_embeddings is FAMILIES[family]["tie_word_embeddings"]


def test_family_exports_and_reloads_in_stock_libraries_with_equal_logits(family_run, assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from megalong.engine.export import export_adapter, export_hf

    family, run = family_run
    spec = FAMILIES[family]
    model, rc = megalong_model(run)
    x = real_rows(assets, 100)  # 100 tokens: past the base's 64, so the RoPE scaling is exercised
    assert x.shape[1] > BASE_CONTEXT
    with torch.no_grad():
        want = model(x).logits
    trained_embed = model.get_input_embeddings().weight.detach().clone()

    hf = export_hf(run, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    sd = safetensors_of(hf)
    assert cfg["max_position_embeddings"] == 128 and not any("lora" in k for k in sd)
    stock = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    assert stock.config.rope_parameters["rope_type"] == ROPE.get(family, {"type": "linear"})["type"]
    if spec["tie_word_embeddings"]:
        assert "lm_head.weight" not in sd and cfg["tie_word_embeddings"] is True
        assert stock.lm_head.weight is stock.get_input_embeddings().weight
        torch.testing.assert_close(stock.lm_head.weight, trained_embed, rtol=0, atol=0)
    else:
        assert "lm_head.weight" in sd and not cfg.get("tie_word_embeddings", False)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in sd
    if family == "mistral":
        assert stock.config.sliding_window == spec["sliding_window"]
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, want, rtol=1e-4, atol=1e-5)

    adapter = export_adapter(run, tmp_path / "adapter")
    assert_adapter_logits(run, rc.base_dir, adapter, x, want)
