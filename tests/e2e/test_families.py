"""The whole road for each model family users bring, through the real ``deepspeed`` launcher.

    tiny base of the family (built from a config, saved as an HF dir by the run)
      └─ deepspeed --num_gpus 2: 2 CPU ranks, ZeRO-3, S²-Attn, LoRA+ (embed + norms), PI, fp32, 2 steps
           └─ export_hf ─► stock AutoModelForCausalLM      ┐ logits on real rows longer than the base
           └─ export_adapter ─► stock PeftModel on the base ├ context (RoPE scaling exercised) equal to
                                                           ┘ megalong's own model (full attention)

One launcher run per family (module-scoped fixture); the tests of a family share it, and every run is
also checked as a 2-rank launcher run (metrics, progress lines, checkpoint, RNG states): these runs are
the suite's launcher tests. Runs whose road is the same are shared: Llama 3's is also the 9/3-head one,
and Llama 2's starts the launcher from a localhost hostfile (``--hostfile --no_ssh_check --master_addr``)
with ZeRO-2, so ZeRO-2 partitions go through the export too; the others use ``--num_gpus 2`` and ZeRO-3.
Pure-logic quirks (LoRA targets, refusals) are unit tests (tests/unit/test_families.py); sp=2 equal to
sp=1 for the new families is tests/dist/test_sp_attention.py.
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
    check_launcher_run,
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
STEPS = 2

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=BASE_CONTEXT)
FAMILIES = {
    # Llama 2: multi-head attention, separate lm_head
    "llama2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # Llama 3 (3.2-1B style: tied, rope_theta 5e5, llama3 RoPE scaling) with SmolLM's head layout: 9 query
    # heads over 3 KV heads (3 per group; S²-Attn shifts 4 of 9)
    "llama3": dict(model_type="llama", num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                   rope_theta=500000.0, hidden_size=72),
    # Mistral: sliding window (S²-Attn group 32 fits inside it)
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=48,
                    tie_word_embeddings=False),
    # Qwen2 (2.5-0.5B style): q/k/v biases (transformers' default), tied embeddings
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3: per-head q_norm/k_norm inside attention (trained as norms), head_dim 32 (H·D = 128 != hidden), tied
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=True),
    # Gemma 3 (text): a sliding layer (window 48 >= G) then a global one, softmax scale query_pre_attn_scalar^-0.5,
    # embedding × sqrt(hidden), (1 + w) norms, q/k norms, tied; PI on the global layer's RoPE only; and a final
    # logit soft-cap (Gemma 2's, which Gemma 3 configs may set; the chunked loss applies it)
    "gemma3": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   query_pre_attn_scalar=24, sliding_window=48, layer_types=["sliding_attention", "full_attention"],
                   final_logit_softcapping=2.0, tie_word_embeddings=True),
    # Phi-3: fused qkv_proj and gate_up_proj (LoRA on qkv_proj + o_proj), untied. Its config takes no linear
    # PI (only default/longrope), so this one trains at its base context with rope.type=none
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128),
}
ROPE = {"llama3": {"type": "llama3"}, "phi3": {"type": "none"}}
LORA_TARGETS = {"phi3": ("qkv_proj", "o_proj")}  # others: q_proj, k_proj, v_proj, o_proj
HOSTFILE_ZERO2 = "llama2"  # the run that also covers the launcher's hostfile mode and ZeRO-2


def _rope_type(family: str) -> str:
    kind = ROPE.get(family, {"type": "linear"})["type"]
    return "default" if kind == "none" else kind


def _launch(cfg: dict, root: Path, hostfile: bool = False) -> str:
    cfg_path = root / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    args = ["--num_gpus", "2"]
    if hostfile:
        (root / "hostfile").write_text("localhost slots=2\n")
        args = ["--hostfile", str(root / "hostfile"), "--no_ssh_check", "--master_addr", "127.0.0.1"]
    try:
        res = run_launcher(args, ["--config", str(cfg_path)])
    finally:
        clean_shm()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, assets, tmp_path_factory):
    """(family, run_dir, launcher output) after 2 training steps of that family on 2 ranks."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    init = {"vocab_size": assets["vocab_size"], **_COMMON, **FAMILIES[family]}
    cfg = tiny_run_config(
        assets, root / "run", model={"init_config": init}, rope=ROPE.get(family, {"type": "linear"}),
        lora={"trainable": ["embed", "norm"]}, zero={"stage": 2 if family == HOSTFILE_ZERO2 else 3},
        train={"max_steps": STEPS, "warmup_steps": 0, "eval_interval": 0}, checkpoint={"save_interval": STEPS},
    )
    return family, root / "run", _launch(cfg, root, hostfile=family == HOSTFILE_ZERO2)


def test_family_trains_two_steps_through_the_launcher(family_run):
    from megalong.engine.export import open_checkpoint, trained_tensors
    from megalong.engine.setup import base_hf_config

    family, run, output = family_run
    check_launcher_run(run, 2, STEPS, output)
    losses = step_losses(run)
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    rc = open_checkpoint(run)
    assert rc.meta["zero_stage"] == (2 if family == HOSTFILE_ZERO2 else 3)
    trained = trained_tensors(rc)
    lora_b = {k: v for k, v in trained.items() if ".lora_B." in k}
    targets = LORA_TARGETS.get(family, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert {k.split(".lora_B.")[0].rsplit(".", 1)[-1] for k in lora_b} == set(targets), family
    assert len(lora_b) == len(targets) * 2 and all(v.abs().max() > 0 for v in lora_b.values()), family
    base = safetensors_of(rc.base_dir)
    norms = [k for k in base if k.endswith("norm.weight")]
    assert norms and all(not torch.equal(trained[k], base[k]) for k in norms), family  # every norm trained
    if family in ("qwen3", "gemma3"):  # the per-head q/k norms inside attention are among them
        assert {f"model.layers.{i}.self_attn.{n}.weight" for i in (0, 1) for n in ("q_norm", "k_norm")} <= set(norms)
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    hf_cfg, _ = base_hf_config(rc.cfg, rc.base_dir)  # the base is the family asked for
    assert hf_cfg.model_type == FAMILIES[family]["model_type"]
    assert hf_cfg.tie_word_embeddings is FAMILIES[family]["tie_word_embeddings"]


def test_family_exports_and_reloads_in_stock_libraries_with_equal_logits(family_run, assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from megalong.engine.export import export_adapter, export_hf

    family, run, _ = family_run
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
    rope = stock.config.rope_parameters
    if family == "gemma3":  # one RoPE per layer type: PI on the global layers, the sliding ones unchanged
        assert rope["sliding_attention"]["rope_type"] == "default"
        rope = rope["full_attention"]
    assert rope["rope_type"] == _rope_type(family)
    if spec["tie_word_embeddings"]:
        assert "lm_head.weight" not in sd and cfg["tie_word_embeddings"] is True
        assert stock.lm_head.weight is stock.get_input_embeddings().weight
        torch.testing.assert_close(stock.lm_head.weight, trained_embed, rtol=0, atol=0)
    else:
        assert "lm_head.weight" in sd and not cfg.get("tie_word_embeddings", False)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in sd
    if family in ("mistral", "gemma3"):
        assert stock.config.sliding_window == spec["sliding_window"]
    if family == "gemma3":  # the trained embedding is stored unscaled; the model scales it by sqrt(hidden)
        assert float(stock.model.embed_tokens.embed_scale) == 64**0.5
        assert stock.config.final_logit_softcapping == spec["final_logit_softcapping"]
    if family == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in sd and "model.layers.0.mlp.gate_up_proj.weight" in sd
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, want, rtol=1e-4, atol=1e-5)

    adapter = export_adapter(run, tmp_path / "adapter")
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(LORA_TARGETS.get(family, ("q_proj", "k_proj", "v_proj", "o_proj")))
    assert_adapter_logits(run, rc.base_dir, adapter, x, want)
