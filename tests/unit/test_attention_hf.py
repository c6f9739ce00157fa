"""transformers integration: Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 / Phi-3 with "megalong_s2" and
"megalong_full"."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from megalong.attention import (
    FULL_IMPLEMENTATION,
    S2_IMPLEMENTATION,
    unwrap_model,
    use_full_attention,
    use_s2_attention,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}
VOCAB, N, G = 96, 36, 8
# What makes each family itself at this size: Qwen3's q/k norms over head_dim 12 (H·D != hidden);
# Gemma 3's softmax scale query_pre_attn_scalar^-0.5 != head_dim^-0.5, a sliding layer whose window (24)
# is shorter than the rows, then a global one; Phi-3's fused qkv_proj (its pad id must fit the vocabulary).
FAMILY_OVERRIDES = {
    "qwen3": dict(head_dim=12),
    "gemma3": dict(head_dim=16, query_pre_attn_scalar=10, sliding_window=24,
                   layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def _model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    kwargs.update(FAMILY_OVERRIDES.get(family, {}))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def _ids(batch=2, n=N, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_path_is_exactly_stock(family):
    model, ids = _model(family), _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in row 0
    stock = _logits(model, ids)
    stock_padded = _logits(model, ids, attention_mask=mask)
    model.set_attn_implementation("eager")
    eager = _logits(model, ids)
    use_full_attention(model)
    assert model.config._attn_implementation == FULL_IMPLEMENTATION
    assert torch.equal(_logits(model, ids), stock)
    assert torch.equal(_logits(model, ids, attention_mask=mask), stock_padded)
    torch.testing.assert_close(_logits(model, ids), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_s2_matches_reference_backend_and_switches_back(family):
    model, ids = _model(family), _ids()
    stock = _logits(model, ids)
    use_s2_attention(model, G)
    assert model.config._attn_implementation == S2_IMPLEMENTATION
    fast = _logits(model, ids)
    use_s2_attention(model, G, backend="reference")
    torch.testing.assert_close(fast, _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, stock, atol=1e-3)  # S²-Attn really is in use
    use_full_attention(model)
    assert torch.equal(_logits(model, ids), stock)
    use_s2_attention(model, G)
    assert torch.equal(_logits(model, ids), fast)
    model.set_attn_implementation("sdpa")
    assert torch.equal(_logits(model, ids), stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_s2_with_groups_past_the_row_equals_stock_eager(family):
    """For N <= G/2 S²-Attn is causal attention over the whole row, so it must equal transformers' own
    eager attention: this catches a kernel that ignores the scale or head layout the family passes
    (Gemma 3's query_pre_attn_scalar, Qwen3's head_dim, Phi-3's split of the fused qkv_proj)."""
    over = {"sliding_window": 4 * N} if family in ("gemma3", "mistral") else {}
    model, ids = _model(family, **over), _ids()
    model.set_attn_implementation("eager")
    eager = _logits(model, ids)
    use_s2_attention(model, 2 * N)
    torch.testing.assert_close(_logits(model, ids), eager, atol=1e-5, rtol=1e-5)


def _packed():
    """Two documents of 15 and 21 tokens in one row, with per-document positions."""
    ids = _ids(batch=1)
    segment_ids = torch.tensor([[0] * 15 + [1] * 21])
    position_ids = torch.cat([torch.arange(15), torch.arange(21)])[None]
    return ids, segment_ids, position_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["s2", "full"])
def test_segments_and_positions_flow_through_forward(family, mode):
    """A packed row equals its documents run alone: segment_ids reach attention, position_ids RoPE."""
    model = _model(family)
    if mode == "s2":
        use_s2_attention(model, G)
    else:
        use_full_attention(model)
    ids, segment_ids, position_ids = _packed()
    packed = _logits(model, ids, segment_ids=segment_ids, position_ids=position_ids)
    alone = torch.cat([_logits(model, ids[:, :15]), _logits(model, ids[:, 15:])], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # Global positions + segment_ids: documents still never see each other; results change.
    global_pos = _logits(model, ids, segment_ids=segment_ids)
    torch.testing.assert_close(global_pos[:, :15], alone[:, :15], atol=1e-5, rtol=1e-5)
    no_segments = _logits(model, ids)
    assert not torch.allclose(no_segments[:, 15:], alone[:, 15:], atol=1e-3)


def test_restarting_position_ids_alone_define_documents():
    model = use_s2_attention(_model("llama"), G)
    ids, segment_ids, position_ids = _packed()
    torch.testing.assert_close(
        _logits(model, ids, position_ids=position_ids),
        _logits(model, ids, position_ids=position_ids, segment_ids=segment_ids),
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_padding_flows_through_s2(family, left):
    """Valid tokens of a padded row equal the unpadded row alone (RoPE is relative, groups start
    at the first valid token); the padded batch stays finite."""
    model = use_s2_attention(_model(family), G)
    ids = _ids()
    length = 23
    mask = torch.ones_like(ids)
    valid = slice(N - length, N) if left else slice(0, length)
    if left:
        mask[1, : N - length] = 0
    else:
        mask[1, length:] = 0
    padded = _logits(model, ids, attention_mask=mask)
    assert torch.isfinite(padded).all()
    alone = _logits(model, ids[1:, valid])
    torch.testing.assert_close(padded[1:, valid], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[:1], _logits(model, ids[:1]), atol=1e-5, rtol=1e-5)
    use_s2_attention(model, G, backend="reference")
    torch.testing.assert_close(padded, _logits(model, ids, attention_mask=mask), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradient_checkpointing_gives_same_grads(family):
    ids, segment_ids, position_ids = _packed()

    def grads(checkpointing: bool):
        model = use_s2_attention(_model(family), G).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.layers[0].gradient_checkpointing
        out = model(ids, labels=ids, segment_ids=segment_ids, position_ids=position_ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, grads_a = grads(False)
    loss_b, grads_b = grads(True)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_peft_wrapped_model_switches_base_model():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    ids = _ids()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert unwrap_model(wrapped) is model
    stock = _logits(wrapped, ids)
    use_s2_attention(wrapped, G)
    assert model.config._attn_implementation == S2_IMPLEMENTATION
    fast = _logits(wrapped, ids)
    use_s2_attention(wrapped, G, backend="reference")
    torch.testing.assert_close(fast, _logits(wrapped, ids), atol=1e-5, rtol=1e-5)
    use_full_attention(wrapped)
    assert torch.equal(_logits(wrapped, ids), stock)


def test_wrapped_model_is_found():
    class TrainWrapper(torch.nn.Module):  # like a training module that holds the HF model
        def __init__(self, model):
            super().__init__()
            self.model = model

    model = _model("llama")
    use_s2_attention(TrainWrapper(model), G)
    assert model.config._attn_implementation == S2_IMPLEMENTATION
    with pytest.raises(TypeError, match="no transformers PreTrainedModel"):
        use_s2_attention(torch.nn.Linear(2, 2), G)


def test_saved_model_loads_with_stock_transformers(tmp_path):
    model = use_s2_attention(_model("qwen2"), G)
    ids = _ids()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not any("megalong" in str(key) or "megalong" in str(value) for key, value in config.items())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_full_attention_matches_stock(family):
    model = _model(family)
    ids = _ids(n=12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as for batched generation
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    stock = model.generate(ids, **kwargs)
    use_full_attention(model)
    assert torch.equal(model.generate(ids, **kwargs), stock)


def test_s2_refuses_kv_cache_and_missing_group_size():
    model = use_s2_attention(_model("llama"), G)
    with pytest.raises(ValueError, match="use_full_attention"):
        model.generate(_ids(n=12), max_new_tokens=2, do_sample=False, pad_token_id=0)
    fresh = _model("llama")
    fresh.set_attn_implementation(S2_IMPLEMENTATION)
    with pytest.raises(ValueError, match="use_s2_attention"):
        _logits(fresh, _ids())


def test_mistral_sliding_window_smaller_than_group_is_an_error():
    model = use_s2_attention(_model("mistral", sliding_window=6), G)
    with pytest.raises(ValueError, match="sliding_window=6"):
        _logits(model, _ids())


def test_odd_group_size_is_rejected_before_switching():
    model = _model("llama")
    with pytest.raises(ValueError, match="odd"):
        use_s2_attention(model, 7)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_flash_backend_through_transformers(family, flash_standin):
    """backend=flash on flash-attn's interface (CPU stand-in): a bf16 model with a packed row (S²-Attn for
    training, full attention for evaluation) equals the reference backend in logits and gradients, and
    attention.deterministic reaches every kernel call."""
    ids, segment_ids, position_ids = _packed()
    for mode in ("s2", "full"):
        results = []
        for backend in ("flash", "reference"):
            model = _model(family, seed=2).to(torch.bfloat16).train()
            if mode == "s2":
                use_s2_attention(model, G, backend=backend, deterministic=True)
            else:
                use_full_attention(model, backend=backend, deterministic=True)
            logits = model(ids, segment_ids=segment_ids, position_ids=position_ids).logits.float()
            logits.square().mean().backward()
            grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
            results.append((logits.detach(), grads))
        (got, got_grads), (want, want_grads) = results
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
        assert len(got_grads) == len(want_grads)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=3e-2 * float(b.abs().max()), rtol=5e-2)
    assert flash_standin and all(c["deterministic"] is True and c["fn"] == "varlen" for c in flash_standin)
