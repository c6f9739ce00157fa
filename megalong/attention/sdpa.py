"""The ``sdpa`` backend: S²-Attn as a handful of causal ``scaled_dot_product_attention`` calls.

Without documents (one per row) the groups are *views* of the token-major (B, N, H, D) tensors,
so nothing is padded and, for B = 1 with transformers' layout, nothing is copied:

    unshifted half   [ G | G | G | G ][tail]      one call on (B·N/G, H/2, G, D), one for the tail
    shifted half     [G/2][ G | G | G ][tail]     the middle groups batched; the leading half-group
                                                  and the trailing partial group as their own calls

Every call uses ``is_causal=True`` inside its group, so the kernel skips the masked blocks.
With documents (``segment_ids``) the chunks sit at arbitrary offsets: they are gathered into
buckets of similar length, padded at the end (harmless under ``is_causal``: padding comes after
every real query of the chunk) and scattered back (see ``layout.py``).

All functions here take q (B, H, N, D), k/v (B, H_kv, N, D) and return token-major (B, N, H, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import HalfHeads, split_halves
from .layout import chunk_layout, doc_starts

Piece = tuple[int, int, int]  # (start, length, count): `count` back-to-back chunks of `length`


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal SDPA on token-major chunks: (C, L, Hq, D) x (C, L, Hk, D) -> (C, L, Hq, Dv)."""
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=gqa
    )  # (C, Hq, L, Dv)
    return out.transpose(1, 2)


def group_pieces(seq_len: int, group_size: int, shifted: bool) -> list[Piece]:
    """The runs of equal-length chunks of one head-half of a row without documents."""
    pieces: list[Piece] = []
    pos = 0
    if shifted:
        pos = min(group_size // 2, seq_len)
        pieces.append((0, pos, 1))  # the leading half-group [0, G/2)
    count = (seq_len - pos) // group_size
    if count:
        pieces.append((pos, group_size, count))
        pos += count * group_size
    if pos < seq_len:
        pieces.append((pos, seq_len - pos, 1))  # the trailing partial group
    return pieces


def _run_piece(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, piece: Piece, scale: float | None
) -> torch.Tensor:
    """One run of equal chunks, token-major (B, count·length, h, D) -> (B, count·length, Hq, Dv)."""
    _, length, count = piece
    batch = q.shape[0]

    def chunks(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch * count, length, x.shape[2], x.shape[3])  # (B·count, L, h, D)

    out = causal_sdpa(chunks(q), chunks(k), chunks(v), scale)  # (B·count, L, Hq, Dv)
    return out.reshape(batch, count * length, out.shape[2], out.shape[3])


def split_heads(q_tok: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor, halves: tuple[HalfHeads, ...]):
    """Per-half token-major q/k/v (B, N, h, D), kv heads un-repeated where possible.

    ``split`` rather than one slice per half: its backward is a single concatenation, where
    every slice's backward would allocate and add a full-size zero gradient.
    """
    q_parts = q_tok.split([h.num_q for h in halves], dim=2)
    slices = [h.kv_slice for h in halves]
    if all(s is not None for s in slices):
        bounds = [slices[0][0]] + [end for _, end in slices]
        contiguous = all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        if contiguous and bounds[0] == 0 and bounds[-1] == k_tok.shape[2]:
            sizes = [end - start for start, end in slices]
            return q_parts, k_tok.split(sizes, dim=2), v_tok.split(sizes, dim=2)
    return q_parts, [h.select_kv(k_tok, 2) for h in halves], [h.select_kv(v_tok, 2) for h in halves]


def _half_no_segments(q_h, k_h, v_h, group_size: int, shifted: bool, scale: float | None) -> torch.Tensor:
    pieces = group_pieces(q_h.shape[1], group_size, shifted)
    if len(pieces) == 1:  # N a multiple of G (unshifted half): no split, no concatenation
        return _run_piece(q_h, k_h, v_h, pieces[0], scale)
    sizes = [length * count for _, length, count in pieces]
    parts = zip(q_h.split(sizes, dim=1), k_h.split(sizes, dim=1), v_h.split(sizes, dim=1), pieces)
    outs = [_run_piece(q, k, v, piece, scale) for q, k, v, piece in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, N, Hh, Dv)


def _chunks_with_plan(q_h, k_h, v_h, plan, scale: float | None) -> torch.Tensor:
    """Run the bucketed chunks of an SdpaPlan and scatter them back to (B, N, Hh, Dv)."""
    batch, seq_len = q_h.shape[:2]
    flat = [x.reshape(batch * seq_len, x.shape[2], x.shape[3]) for x in (q_h, k_h, v_h)]  # (B·N, h, D)
    outs = []
    for idx, width in plan.batches:
        rows = idx.reshape(-1)
        qc, kc, vc = (x.index_select(0, rows).view(idx.shape[0], width, x.shape[1], x.shape[2]) for x in flat)
        out = causal_sdpa(qc, kc, vc, scale)  # (C, L, Hh, Dv)
        outs.append(out.reshape(-1, out.shape[2], out.shape[3]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (ΣC·L, Hh, Dv)
    out = out.index_select(0, plan.gather_back)  # (B·N, Hh, Dv)
    return out.view(batch, seq_len, out.shape[1], out.shape[2])


def s2_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    segment_ids: torch.Tensor | None,
    scale: float | None,
    positions: torch.Tensor | None = None,
    halves: tuple[HalfHeads, ...] | None = None,
) -> torch.Tensor:
    """S²-Attn with SDPA; returns token-major (B, N, H, Dv). ``positions`` / ``halves``: see s2_attention."""
    q_tok, k_tok, v_tok = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, N, h, D)
    batch, seq_len = q_tok.shape[:2]
    halves = halves if halves is not None else split_halves(q.shape[1], k.shape[1])
    outs = []
    for half, q_h, k_h, v_h in zip(halves, *split_heads(q_tok, k_tok, v_tok, halves)):
        if segment_ids is None and positions is None:
            outs.append(_half_no_segments(q_h, k_h, v_h, group_size, half.shifted, scale))
            continue
        offset = group_size // 2 if half.shifted else 0
        plan = chunk_layout(batch, seq_len, segment_ids, group_size, offset, "sdpa", q.device, positions)
        outs.append(_chunks_with_plan(q_h, k_h, v_h, plan, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, N, H, Dv)


def decode_mask(
    segment_ids: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device
) -> torch.Tensor:
    """(B, 1, Q, K) boolean mask for queries at the last Q of K positions (bottom-right causal)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # (Q, K)
    allowed = allowed.expand(batch, q_len, kv_len)
    if segment_ids is not None:
        doc = doc_starts(segment_ids).cumsum(dim=-1)  # (B, K)
        allowed = allowed & (doc[:, kv_len - q_len :, None] == doc[:, None, :])
    return allowed[:, None]


def full_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """Causal attention (documents respected); queries are the last Q of the K positions.

    Returns token-major (B, Q, H, Dv).
    """
    batch, num_heads, q_len = q.shape[:3]
    kv_len = k.shape[2]
    gqa = num_heads != k.shape[1]
    if q_len == kv_len and segment_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if q_len != kv_len:
        mask = decode_mask(segment_ids, batch, q_len, kv_len, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    q_tok, k_tok, v_tok = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    plan = chunk_layout(batch, q_len, segment_ids, None, 0, "sdpa", q.device)
    return _chunks_with_plan(q_tok, k_tok, v_tok, plan, scale)  # all heads: enable_gqa maps them


def windowed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None, scale: float | None,
    window: int,
) -> torch.Tensor:
    """Causal sliding-window attention (Mistral's): query i sees keys j with i - window < j ≤ i (same document).

    Queries are the last Q of the K keys. They run in blocks of ``window`` rows; a block's keys are the
    ``window - 1`` before it and its own, so each call holds a (window × (2·window - 1)) mask, never Q × K:

        keys   . . . . [ k0 ............................ k1 )
        block            [ i0 ........... i1 )           (i0 - window + 1 = k0, i1 = k1)

    Returns token-major (B, Q, H, Dv).
    """
    batch, num_heads, q_len = q.shape[:3]
    kv_len = k.shape[2]
    gqa = num_heads != k.shape[1]
    first = kv_len - q_len  # key index of the first query
    docs = None if segment_ids is None else doc_starts(segment_ids).cumsum(dim=-1)  # (B, K)
    outs = []
    for start in range(0, q_len, window):
        stop = min(q_len, start + window)
        k0, k1 = max(0, first + start - window + 1), first + stop
        qi = torch.arange(first + start, first + stop, device=q.device)[:, None]  # (Qb, 1) key-space positions
        kj = torch.arange(k0, k1, device=q.device)[None, :]  # (1, Kb)
        allowed = ((kj <= qi) & (kj > qi - window)).expand(batch, -1, -1)  # (B, Qb, Kb)
        if docs is not None:
            allowed = allowed & (docs[:, first + start:first + stop, None] == docs[:, None, k0:k1])
        out = F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, k0:k1], v[:, :, k0:k1],
                                             attn_mask=allowed[:, None], scale=scale, enable_gqa=gqa)
        outs.append(out)  # (B, H, Qb, Dv)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)
