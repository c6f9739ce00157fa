"""Short attention (LongLoRA's pilot-study baseline): the S²-Attn groups with no shifted heads.

It must equal blockwise-causal attention inside groups of G (a slow loop over groups, written
here without the S²-Attn code), and differ from S²-Attn only in the shifted half of the heads.
"""

from __future__ import annotations

import math

import pytest
import torch

from megalong.attention import s2_attention


def _qkv(b, h, hk, n, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, n, d, generator=gen, dtype=torch.float64) for heads in (h, hk, hk))


def _blockwise_causal(q, k, v, group_size, doc_lengths=None):
    """Every query attends causally to the keys of its own group (groups counted from each
    document start), one small softmax per (row, head, group): the obviously-correct loop."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    starts = [0]
    for length in doc_lengths or [n]:
        starts.append(starts[-1] + length)
    for doc_start, doc_end in zip(starts, starts[1:]):
        for g0 in range(doc_start, doc_end, group_size):
            g1 = min(g0 + group_size, doc_end)
            for head in range(h):
                qs, ks, vs = q[:, head, g0:g1], k[:, head // rep, g0:g1], v[:, head // rep, g0:g1]
                scores = qs @ ks.transpose(-1, -2) / math.sqrt(d)  # (B, L, L)
                causal = torch.ones(g1 - g0, g1 - g0, dtype=torch.bool).tril()
                out[:, head, g0:g1] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vs
    return out


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("b, h, hk, n, g", [(2, 4, 2, 37, 8), (1, 6, 3, 24, 6), (1, 5, 5, 13, 4), (1, 1, 1, 9, 4)])
def test_short_equals_blockwise_causal_within_groups(backend, b, h, hk, n, g):
    """Awkward sizes: partial last group, GQA with a non-uniform split (6/3), odd head count, one head."""
    q, k, v = _qkv(b, h, hk, n)
    out = s2_attention(q, k, v, g, backend=backend, shift=False)
    torch.testing.assert_close(out, _blockwise_causal(q, k, v, g), atol=1e-10, rtol=1e-10)


def test_short_respects_documents():
    """With packed documents the groups restart at every document start."""
    q, k, v = _qkv(1, 4, 2, 30)
    seg = torch.tensor([[0] * 11 + [1] * 19])
    for backend in ("sdpa", "reference"):
        out = s2_attention(q, k, v, 6, backend=backend, segment_ids=seg, shift=False)
        torch.testing.assert_close(out, _blockwise_causal(q, k, v, 6, [11, 19]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_short_differs_from_s2_only_in_shifted_half(backend):
    h, g = 6, 8
    q, k, v = _qkv(2, h, 2, 40)
    short = s2_attention(q, k, v, g, backend=backend, shift=False)
    s2 = s2_attention(q, k, v, g, backend=backend)
    torch.testing.assert_close(short[:, : h // 2], s2[:, : h // 2], atol=1e-12, rtol=1e-12)
    # the shifted half: equal in the first half-group (both see [0, G/2) causally), different after
    torch.testing.assert_close(short[:, h // 2 :, : g // 2], s2[:, h // 2 :, : g // 2], atol=1e-12, rtol=1e-12)
    assert (short[:, h // 2 :, g // 2 :] - s2[:, h // 2 :, g // 2 :]).abs().amax() > 1e-3


def test_short_gradients_match_reference():
    q, k, v = (x.float().requires_grad_(True) for x in _qkv(1, 4, 2, 29))
    grad_out = torch.randn(1, 4, 29, 8, generator=torch.Generator().manual_seed(1))
    grads = [torch.autograd.grad(s2_attention(q, k, v, 8, backend=be, shift=False), (q, k, v), grad_out)
             for be in ("sdpa", "reference")]
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


def test_config_and_model_switch():
    """attention.train=short reaches the model as S²-Attn without shift; the checks know it."""
    from transformers import LlamaConfig

    from megalong.attention.hf import SPEC_ATTR, attention_modules
    from megalong.config.loader import config_from_dict
    from megalong.engine.setup import set_attention
    from megalong.models.loading import create_model

    cfg = config_from_dict({"model": {"name_or_path": "unused"}, "attention": {"train": "short"},
                            "data": {"max_seq_len": 64}})
    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
    model = create_model(hf, dtype=torch.float32, seed=0)
    set_attention(cfg, model, "train")
    spec = getattr(attention_modules(model)[0], SPEC_ATTR)
    assert (spec.group_size, spec.shift) == (16, False)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    short = model(ids).logits
    cfg.attention.train = "s2"
    set_attention(cfg, model, "train")
    assert not torch.allclose(short, model(ids).logits)


def test_short_is_refused_with_sequence_parallelism():
    from megalong.config.loader import config_from_dict
    from megalong.engine.checks import check_layout

    cfg = config_from_dict({"model": {"name_or_path": "unused"}, "attention": {"train": "short"},
                            "data": {"max_seq_len": 64}, "parallel": {"sp": 2}})
    errors = [f.message for f in check_layout(cfg, world=2) if f.level == "error"]
    assert any("attention.train=short" in e and "parallel.sp=1" in e for e in errors)
