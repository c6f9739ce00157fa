"""A CPU stand-in for flash-attn 2.x's two entry points, for tests only (never a megalong backend).

``install(monkeypatch)`` puts a fake ``flash_attn`` module into ``sys.modules`` and lets megalong's
flash backend accept CPU tensors, so the real code path (``megalong/attention/flash.py``: layouts,
``cu_seqlens``, head splits, GQA) runs on machines without a GPU. Every call checks what the real
kernels require and megalong must get right, then computes each sequence with SDPA in fp32:

    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None)
        q (total_q, H, D), k/v (total_k, H_kv, D): contiguous, fp16/bf16; cu_seqlens int32 (batch + 1,)
        from 0 to total; max_seqlen Python ints covering every sequence; H % H_kv == 0
    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), ...)
        q (B, N_q, H, D), k/v (B, N_k, H_kv, D)

Causal masks align bottom-right (flash-attn ≥ 2.1: with N_q < N_k the queries are the last N_q
positions); ``window_size=(left, right)`` keeps keys in [i - left, i + right] (-1: unbounded).
``deterministic`` must be passed explicitly (megalong forwards ``attention.deterministic``); every
call is recorded in ``CALLS`` so tests can see what reached the kernel.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

_UNSET = object()
CALLS: list[dict] = []
"""One entry per call: ``fn``, ``deterministic``, ``causal``, ``window_size``, ``softmax_scale``."""


def _check_common(q, k, v, dropout_p, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs):
    assert deterministic is not _UNSET, "deterministic must be passed explicitly (attention.deterministic)"
    assert isinstance(deterministic, bool), f"deterministic={deterministic!r} is not a bool"
    assert isinstance(causal, bool), f"causal={causal!r} is not a bool"
    assert dropout_p == 0.0, f"megalong never uses attention dropout, got dropout_p={dropout_p}"
    assert softcap == 0.0 and alibi_slopes is None and not return_attn_probs
    assert isinstance(window_size, tuple) and len(window_size) == 2 and all(isinstance(w, int) for w in window_size)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.dtype in (torch.float16, torch.bfloat16), f"flash-attn runs fp16/bf16 only; {name} is {x.dtype}"
        assert x.dtype == q.dtype, f"{name} is {x.dtype}, q is {q.dtype}"
    assert q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] <= 256, "head dims must agree and be <= 256"
    assert q.shape[-2] % k.shape[-2] == 0 and k.shape[-2] == v.shape[-2], (
        f"{q.shape[-2]} query heads are not a multiple of {k.shape[-2]} kv heads")


def _attend(q, k, v, scale, causal, window_size):
    """One sequence: q (N_q, H, D), k/v (N_k, H_kv, D) -> (N_q, H, D) in q's dtype, fp32 math."""
    n_q, n_k = q.shape[0], k.shape[0]
    pos_q = torch.arange(n_k - n_q, n_k)[:, None]  # bottom-right alignment
    pos_k = torch.arange(n_k)[None, :]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        allowed &= pos_k <= pos_q
    left, right = window_size
    if left >= 0:
        allowed &= pos_k >= pos_q - left
    if right >= 0:
        allowed &= pos_k <= pos_q + right
    qf, kf, vf = (x.float().transpose(0, 1) for x in (q, k, v))  # (H, N, D)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=allowed, scale=scale,
                                         enable_gqa=qf.shape[0] != kf.shape[0])
    return out.transpose(0, 1).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=_UNSET, return_attn_probs=False, block_table=None):
    """flash-attn's varlen entry point, on CPU: the same checks, SDPA per sequence."""
    _check_common(q, k, v, dropout_p, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    assert block_table is None
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.dim() == 3 and x.is_contiguous(), f"{name} must be a contiguous (total, heads, dim) tensor"
    for name, cu, total, max_len in (("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1, f"cu_seqlens_{name} must be 1D int32, got {cu.dtype}"
        assert cu.device == q.device, f"cu_seqlens_{name} is on {cu.device}, q on {q.device}"
        lens = cu[1:] - cu[:-1]
        assert int(cu[0]) == 0 and int(cu[-1]) == total and bool((lens >= 0).all()), f"bad cu_seqlens_{name}"
        assert isinstance(max_len, int) and not isinstance(max_len, bool), f"max_seqlen_{name} must be a Python int"
        assert max_len >= int(lens.max()), f"max_seqlen_{name}={max_len} < the longest sequence {int(lens.max())}"
    assert cu_seqlens_q.shape == cu_seqlens_k.shape
    CALLS.append({"fn": "varlen", "deterministic": deterministic, "causal": causal, "window_size": window_size,
                  "softmax_scale": softmax_scale})
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [_attend(q[a:b], k[c:d], v[c:d], softmax_scale, causal, window_size)
            for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]) if b > a]
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=_UNSET, return_attn_probs=False):
    """flash-attn's batched entry point (B, N, H, D), on CPU."""
    _check_common(q, k, v, dropout_p, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    assert q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] and k.shape[:3] == v.shape[:3]
    assert all(x.stride(-1) == 1 for x in (q, k, v)), "the head dim must be contiguous"
    CALLS.append({"fn": "dense", "deterministic": deterministic, "causal": causal, "window_size": window_size,
                  "softmax_scale": softmax_scale})
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal, window_size) for b in range(q.shape[0])])


def install(monkeypatch) -> list[dict]:
    """Make ``import flash_attn`` find this stand-in and megalong's flash backend accept CPU tensors."""
    import megalong.attention.flash as flash

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.__version__ = "2.8.3+cpu-standin"
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(flash, "FLASH_DEVICES", ("cuda", "cpu"))
    CALLS.clear()
    return CALLS
