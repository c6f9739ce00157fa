"""Family quirks as pure logic (seconds): LoRA targets on fused projections, which norms LoRA+ trains,
sliding windows per layer type, and the run checks that refuse what megalong cannot reproduce.

The whole road per family (launcher, export, stock reload) is tests/e2e/test_families.py.
"""

from __future__ import annotations

import pytest
import torch

from megalong.config.loader import config_from_dict
from megalong.config.schema import ConfigError, LoraConfig
from megalong.engine import checks
from megalong.engine.dryrun import dry_run
from megalong.engine.setup import base_hf_config
from megalong.lora import apply_lora_plus, resolve_lora_targets, trainable_module_names
from megalong.models import create_model
from megalong.models.families import sliding_window_of
from tests.conftest import tiny_config

PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi-3's default pad id (32000) is past a tiny vocab


@pytest.fixture(scope="module")
def phi3():
    with torch.device("meta"):
        return create_model(tiny_config("phi3", **PHI3))


@pytest.mark.parametrize("asked,resolved,also", [
    (["q_proj", "k_proj", "v_proj", "o_proj"], ("qkv_proj", "o_proj"), ()),
    (["q_proj", "v_proj"], ("qkv_proj",), ("k_proj",)),
    (["gate_proj", "up_proj", "down_proj"], ("gate_up_proj", "down_proj"), ()),
    (["qkv_proj", "o_proj"], ("qkv_proj", "o_proj"), ()),
])
def test_phi3_targets_resolve_to_its_fused_projections(phi3, asked, resolved, also):
    t = resolve_lora_targets(phi3, asked)
    assert (t.resolved, t.also_covers) == (resolved, also)
    if asked != list(resolved):
        assert "Phi3ForCausalLM fuses" in t.describe() and t.describe().startswith(", ".join(asked) + " -> ")


def test_unfused_families_keep_their_targets_and_unknown_names_fail():
    with torch.device("meta"):
        llama = create_model(tiny_config("llama"))
    t = resolve_lora_targets(llama, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert t.resolved == t.asked and t.notes == () and t.describe() == "q_proj, k_proj, v_proj, o_proj"
    with pytest.raises(ConfigError, match=r"match no module of LlamaForCausalLM.*'q_proj'"):
        resolve_lora_targets(llama, ["qkv_proj"])


def test_phi3_adapters_sit_on_the_fused_projections_and_merge_back(tmp_path):
    from peft import PeftModel

    from megalong.lora import export_peft_adapter, merge_lora

    torch.manual_seed(0)
    base = create_model(tiny_config("phi3", **PHI3), seed=0)
    model = apply_lora_plus(base, LoraConfig(r=4, alpha=8))
    lora = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_" in n})
    assert lora == ["o_proj", "qkv_proj"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        want = model(x).logits
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    export_peft_adapter(model, state, LoraConfig(r=4, alpha=8), tmp_path, base_model_name_or_path="base")
    stock = PeftModel.from_pretrained(create_model(tiny_config("phi3", **PHI3), seed=0), tmp_path).eval()
    assert sorted(stock.peft_config["default"].target_modules) == ["o_proj", "qkv_proj"]
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merge_lora(model).eval()(x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,over", [("qwen3", {"head_dim": 12}), ("gemma3_text", {"head_dim": 16})])
def test_qk_norms_inside_attention_are_norms_lora_plus_trains(family, over):
    """LongLoRA trains every normalisation layer; Qwen3's and Gemma 3's per-head q_norm/k_norm are ones."""
    with torch.device("meta"):
        model = apply_lora_plus(create_model(tiny_config(family, **over)), LoraConfig())
    names = trainable_module_names(model, ["norm"])
    for layer in (0, 1):
        assert {f"base_model.model.model.layers.{layer}.self_attn.{n}" for n in ("q_norm", "k_norm")} <= set(names)
    per_layer = 6 if family == "gemma3_text" else 4  # Gemma 3: 4 norms around attention and MLP
    assert len(names) == 2 * per_layer + 1
    assert all(p.requires_grad for n, p in model.named_parameters() if "_norm." in n)


def test_sliding_window_per_layer_type():
    both = tiny_config("gemma3_text", head_dim=16, sliding_window=48, layer_types=["sliding_attention", "full_attention"])
    assert sliding_window_of(both) == 48
    assert sliding_window_of(tiny_config("gemma3_text", head_dim=16, sliding_window=48,
                                         layer_types=["full_attention"] * 2)) is None
    assert sliding_window_of(tiny_config("qwen3")) is None  # use_sliding_window=false (the default)
    assert sliding_window_of(tiny_config("phi3", sliding_window=40, **PHI3)) == 40  # every layer


def test_multimodal_gemma3_is_refused_with_the_text_decoder_as_the_fix():
    """google/gemma-3-4b and larger are Gemma3ForConditionalGeneration (model_type gemma3): no top-level heads."""
    from megalong.models.families import check_family
    from megalong.utils.model_shapes import hf_config_from_dict

    with pytest.raises(ConfigError, match="gemma3_text / Gemma3ForCausalLM"):
        check_family(hf_config_from_dict({"model_type": "gemma3"}))


def _cfg(family: str, rope: str = "linear", group: int = 32, **init):
    base = {**dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, model_type=family), **init}
    return config_from_dict({"model": {"init_config": base}, "rope": {"type": rope},
                             "attention": {"group_size": group}, "data": {"prefixes": ["/nowhere/x"],
                                                                          "max_seq_len": 128}})


def _findings(cfg) -> list[checks.Finding]:
    hf, _ = base_hf_config(cfg)
    # the CPU-dtype advice depends on this machine's CPU (tests/unit/test_checks.py covers it)
    return [f for f in checks.run_checks(cfg, hf, 2, "cpu", 96) if f.level != "ok" and f.what != "train.dtype"]


REFUSED = {
    # family, rope, group, init overrides, (level, what, a phrase of the reason / fix)
    "gemma2 attention softcap": ("gemma2", "linear", 32, dict(head_dim=16, attn_logit_softcapping=50.0),
                                 ("error", "model", "caps attention logits")),
    "gemma3 attention softcap is ignored": ("gemma3_text", "linear", 32, dict(head_dim=16, attn_logit_softcapping=50.0),
                                            ("warn", "model", "never applies it")),
    "bidirectional": ("gemma3_text", "linear", 32, dict(head_dim=16, use_bidirectional_attention=True),
                      ("error", "model", "causal only")),
    "phi3 linear PI": ("phi3", "linear", 32, PHI3, ("error", "rope", "set rope.type=none")),
    "phi3 dynamic": ("phi3", "dynamic", 32, PHI3, ("error", "rope", "must be one of ['longrope']")),
    "cohere logit scale": ("cohere", "linear", 32, dict(logit_scale=0.25), ("error", "model", "logit_scale=0.25")),
    "gemma3 group past the sliding window": ("gemma3_text", "linear", 64,
                                             dict(head_dim=16, sliding_window=48,
                                                  layer_types=["sliding_attention", "full_attention"]),
                                             ("error", "attention", "set attention.group_size <= 48")),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_run_checks_refuse_what_megalong_cannot_reproduce(case):
    family, rope, group, init, (level, what, phrase) = REFUSED[case]
    found = _findings(_cfg(family, rope, group, **init))
    assert [(f.level, f.what) for f in found if f.what != "tokenizer"] == [(level, what)], found
    assert phrase in found[0].message, found[0].message


@pytest.mark.parametrize("family,rope,init", [
    ("qwen3", "linear", dict(head_dim=32)),
    ("gemma3_text", "linear", dict(head_dim=16, sliding_window=48, final_logit_softcapping=30.0,
                                   layer_types=["sliding_attention", "full_attention"])),
    ("phi3", "none", dict(PHI3, max_position_embeddings=128)),
])
def test_the_new_families_pass_the_run_checks(family, rope, init):
    assert _findings(_cfg(family, rope, **init)) == []


def test_dry_run_shows_the_lora_targets_of_the_family():
    report = dry_run(_cfg("phi3", "none", **dict(PHI3, max_position_embeddings=128)), nodes=1, gpus_per_node=2,
                     accelerator="cpu")
    assert report.errors == [] and report.lora_targets == ["qkv_proj", "o_proj"]
    assert "lora: LoRA targets: q_proj, k_proj, v_proj, o_proj -> qkv_proj, o_proj (Phi3ForCausalLM fuses" \
        in report.render()
    assert report.summary()["lora_targets"] == ["qkv_proj", "o_proj"]
    llama = dry_run(_cfg("llama"), nodes=1, gpus_per_node=2, accelerator="cpu")
    assert "lora: LoRA targets: q_proj, k_proj, v_proj, o_proj\n" in llama.render()
