"""S²-Attn (shifted sparse attention, LongLoRA) and segment-aware full causal attention.

The contract (DESIGN.md, "S²-Attn: exact semantics"). For each row, or each document of a packed
row, with x the position inside the document, group size G (even) and head h of H:

    half(h) = 0 for the first ⌊H/2⌋ heads, 1 for the rest
    grp0(x) = ⌊x / G⌋          grp1(x) = ⌊(x + G/2) / G⌋
    query i sees key j  ⇔  j ≤ i  and  grp_half(h)(i) = grp_half(h)(j)  (and same document)

    N = 20, G = 8        x: 0 1 2 3 4 5 6 7 8 9 ...      15 16 ...  19
    half 0 groups          [ 0 . . . . . . . ][ 1 . . . . . . . ][ 2 . . ]
    half 1 groups          [ 0 . . ][ 1 . . . . . . . ][ 2 . . . . . . . ]

Short attention (LongLoRA's pilot-study baseline) is the same kernel with ``shift=False``: every
head uses the half-0 groups grp0, i.e. blockwise-causal attention inside groups and nothing across
them; only the shifted half differs from S²-Attn.

No wrap-around: LongLoRA's roll-based version lets the first tokens of the shifted half attend
to the last ones (a future-token leak); here the shifted half simply starts with a half group.
N need not be a multiple of G; groups at the end may be partial; a row shorter than G/2 is one
group. GQA: query head h uses kv head ⌊h / (H / H_kv)⌋, as transformers' ``repeat_kv``.

Backends:
    reference  dense boolean mask from the formula, fp32 math (slow, obviously right)
    sdpa       grouped views / bucketed chunks + causal SDPA (CPU and GPU; see ``sdpa.py``)
    flash      flash-attn varlen with cu_seqlens at group and document starts (``flash.py``)

``segment_ids`` (B, N): a document is a maximal run of equal consecutive ids. To honour an HF
padding mask as well, merge it first with ``combine_segments_and_padding``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .flash import full_flash, s2_flash
from .heads import HeadLayout, split_halves
from .layout import combine_segments_and_padding, doc_starts, positions_in_doc
from .sdpa import decode_mask, full_sdpa, s2_sdpa, windowed_sdpa

__all__ = [
    "BACKENDS",
    "HeadLayout",
    "s2_attention",
    "full_attention",
    "s2_mask",
    "full_mask",
    "combine_segments_and_padding",
    "check_group_size",
]

BACKENDS = ("sdpa", "flash", "reference")


def check_group_size(group_size: int) -> None:
    """Raise a ValueError that says what to use instead when G is not a positive even int."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive even int (LongLoRA uses max_seq_len // 4)"
        )
    if group_size % 2:
        raise ValueError(
            f"group_size={group_size} is odd; S²-Attn shifts half the heads by G/2, so G must be even: "
            f"use {group_size - 1} or {group_size + 1} (LongLoRA uses max_seq_len // 4)"
        )


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}; 'sdpa' works everywhere")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_len: bool, mapped: bool = False) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4D (batch, heads, seq_len, head_dim); got {q.dim()}D, {k.dim()}D, {v.dim()}D"
        )
    (b, h, n, d), (bk, hk, nk, dk) = q.shape, k.shape
    if v.shape[:3] != k.shape[:3] or bk != b or dk != d:
        raise ValueError(
            f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
            "q (B, H, N, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v)"
        )
    if h % hk and not mapped:  # with a HeadLayout, split_halves checks the mapping
        raise ValueError(f"{h} query heads are not a multiple of {hk} kv heads; GQA needs H % H_kv == 0")
    if same_len and nk != n:
        raise ValueError(
            f"S²-Attn needs q and k of the same length (got {n} and {nk}): it is a training-time "
            "attention; use full_attention for decoding with a KV cache"
        )
    if nk < n:
        raise ValueError(f"q is longer than k ({n} > {nk}); queries must be the last positions of k")


def _check_segments(segment_ids: torch.Tensor | None, batch: int, seq_len: int) -> None:
    if segment_ids is None:
        return
    if segment_ids.shape != (batch, seq_len):
        raise ValueError(
            f"segment_ids has shape {tuple(segment_ids.shape)}; expected (batch, seq_len) = ({batch}, {seq_len})"
        )
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex:
        raise ValueError(f"segment_ids must be an integer (or bool) tensor, got {segment_ids.dtype}")


def _doc_ids_and_positions(segment_ids: torch.Tensor | None, batch: int, seq_len: int, device,
                           positions: torch.Tensor | None = None):
    """(B, N) document index and position inside the document (given ``positions`` win)."""
    if segment_ids is None:
        starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        starts[:, 0] = True
    else:
        starts = doc_starts(segment_ids.to(device))
    if positions is not None:
        positions = positions.to(device)
        return (starts | (positions == 0)).cumsum(dim=-1), positions
    return starts.cumsum(dim=-1), positions_in_doc(starts)


def s2_mask(
    batch: int, num_heads: int, seq_len: int, group_size: int, segment_ids: torch.Tensor | None, device,
    positions: torch.Tensor | None = None, heads: HeadLayout | None = None, shift: bool = True,
) -> torch.Tensor:
    """Dense (B, H, N, N) boolean S²-Attn mask straight from the formula (True = may attend).

    ``positions``: position of each token inside its document (default: counted from the row and
    document starts). ``heads``: which of the layer's heads these are (the half follows the global
    head index; default: all of them). ``shift=False``: short attention (no head is shifted)."""
    docs, pos = _doc_ids_and_positions(segment_ids, batch, seq_len, device, positions)
    ar = torch.arange(seq_len, device=device)
    allowed = (ar[None, :] <= ar[:, None]) & (docs[:, :, None] == docs[:, None, :])  # (B, N, N)
    halves = []
    for offset in (0, group_size // 2 if shift else 0):
        grp = (pos + offset) // group_size  # (B, N)
        halves.append(allowed & (grp[:, :, None] == grp[:, None, :]))
    mid, q0 = (heads.num_heads // 2, heads.q_start) if heads is not None else (num_heads // 2, 0)
    half_of_head = torch.tensor([int(q0 + h >= mid) for h in range(num_heads)], device=device)
    return torch.stack(halves, dim=1)[:, half_of_head]  # (B, H, N, N)


def full_mask(batch: int, q_len: int, kv_len: int, segment_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Dense (B, 1, Q, K) causal mask; queries are the last Q of the K positions."""
    return decode_mask(segment_ids, batch, q_len, kv_len, device)


def window_mask(q_len: int, kv_len: int, window: int, device) -> torch.Tensor:
    """(1, 1, Q, K) sliding-window band for queries at the last Q of K positions: i - window < j."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] > q_pos - window)[None, None]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float | None,
    heads: HeadLayout | None = None,
) -> torch.Tensor:
    """Masked softmax attention in (at least) fp32 with repeated kv heads; (B, H, Q, Dv) in q's dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    if heads is None:
        kv_of = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])
    else:  # local query head j is the layer's head q_start + j
        kv_of = (torch.arange(q.shape[1], device=q.device) + heads.q_start) // heads.rep - heads.q_start // heads.rep
    k_r = k.index_select(1, kv_of).to(compute)  # (B, H, K, D)
    v_r = v.index_select(1, kv_of).to(compute)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(compute) @ k_r.transpose(-1, -2)) * scale  # (B, H, Q, K)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v_r).to(q.dtype)


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    *,
    backend: str = "sdpa",
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    positions: torch.Tensor | None = None,
    heads: HeadLayout | None = None,
    shift: bool = True,
    deterministic: bool = False,
) -> torch.Tensor:
    """Shifted sparse attention (LongLoRA's S²-Attn), causal and leak-free.

    Args:
        q: (B, H, N - q_offset, D) queries: the last N - q_offset positions of the keys.
        k: (B, H_kv, N, D) keys; H must be a multiple of H_kv (GQA/MQA).
        v: (B, H_kv, N, D_v) values.
        group_size: G, even; the first ⌊H/2⌋ heads attend in groups [0,G), [G,2G), …, the others
            in [0,G/2), [G/2,3G/2), … — counted from each document start.
        backend: "sdpa" (default, CPU/GPU), "flash" (flash-attn, CUDA bf16/fp16) or "reference".
        segment_ids: optional (B, N) ints over the keys; documents (runs of equal ids) never see each other.
        scale: softmax scale, default 1/sqrt(D).
        q_offset: keys that come before the first query (a sequence-parallel halo): causality is
            counted from the end of the keys.
        positions: optional (B, N) position of each key inside its document, for rows that begin
            inside a document (the group layout is counted from document starts); a position 0
            starts a document. Default: rows begin at a document start.
        heads: which of the layer's heads q/k/v hold (HeadLayout; the shifted half follows the
            global head index). Default: all of them.
        shift: False gives short attention (LongLoRA's pilot-study baseline): the second half of
            the heads uses the unshifted groups too, so no head attends across a group boundary.
        deterministic: flash backend: flash-attn's deterministic backward (same gradients run to run).

    Returns:
        (B, H, N - q_offset, D_v) attention output.
    """
    check_group_size(group_size)
    _check_backend(backend)
    _check_qkv(q, k, v, same_len=False, mapped=heads is not None)
    batch, num_heads, q_len, _ = q.shape
    seq_len = k.shape[2]
    if q_offset < 0 or q_len + q_offset != seq_len:
        raise ValueError(f"S²-Attn needs q and k of the same length, or q_offset = N_k - N_q (got {q_len} queries, "
                         f"{seq_len} keys, q_offset={q_offset}): use full_attention for decoding with a KV cache")
    _check_segments(segment_ids, batch, seq_len)
    _check_segments(positions, batch, seq_len)
    if q_offset:  # queries for the halo keys: zeros, computed and dropped (no gradient reaches them)
        q = torch.cat([q.new_zeros(batch, num_heads, q_offset, q.shape[3]), q], dim=2)
    if backend == "reference":
        allowed = s2_mask(batch, num_heads, seq_len, group_size, segment_ids, q.device, positions, heads, shift)
        out = reference_attention(q, k, v, allowed, scale, heads)
    else:
        halves = split_halves(num_heads, k.shape[1], heads)
        if not shift:  # short attention: the second half keeps its kv heads but not its shift
            halves = tuple(replace(h, shifted=False) for h in halves)
        if backend == "flash":
            out = s2_flash(q, k, v, group_size, segment_ids, scale, positions, halves, deterministic)
        else:
            out = s2_sdpa(q, k, v, group_size, segment_ids, scale, positions, halves)
        out = out.transpose(1, 2)
    return out[:, :, q_offset:] if q_offset else out


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Causal attention for evaluation and generation, documents respected.

    Args:
        q: (B, H, Q, D) queries: the last Q positions of the K keys (Q < K with a KV cache).
        k: (B, H_kv, K, D) keys.
        v: (B, H_kv, K, D_v) values.
        backend: "sdpa", "flash" or "reference".
        segment_ids: optional (B, K) ints over the key positions; documents never see each other.
        scale: softmax scale, default 1/sqrt(D).
        window: a sliding window (Mistral's ``sliding_window``): the query at key position i sees
            keys i - window < j ≤ i only. None (or ≥ K): no window.
        deterministic: flash backend: flash-attn's deterministic backward.

    Returns:
        (B, H, Q, D_v) attention output.
    """
    _check_backend(backend)
    _check_qkv(q, k, v, same_len=False)
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    _check_segments(segment_ids, batch, kv_len)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive int (the model's sliding_window) or None")
    if window is not None and window >= kv_len:
        window = None  # every query's keys fit in the window
    if backend == "reference":
        allowed = full_mask(batch, q_len, kv_len, segment_ids, q.device)
        if window is not None:
            allowed = allowed & window_mask(q_len, kv_len, window, q.device)
        return reference_attention(q, k, v, allowed, scale)
    if backend == "flash":
        out = full_flash(q, k, v, segment_ids, scale, window, deterministic)
        if out is not None:
            return out.transpose(1, 2)
    if window is not None:
        return windowed_sdpa(q, k, v, segment_ids, scale, window).transpose(1, 2)
    return full_sdpa(q, k, v, segment_ids, scale).transpose(1, 2)
