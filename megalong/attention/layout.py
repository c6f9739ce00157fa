"""Chunk layouts: where S²-Attn (and segment-aware full attention) cuts a row into causal chunks.

Every megalong attention pattern is *block-diagonal causal over contiguous chunks*: a query sees
exactly the keys at or before it inside its own chunk. A chunk boundary falls at every document
start and, for S²-Attn, at every group boundary of the head-half, counted from the document
start (x = position inside the document):

    half 0 cuts where  x      % G == 0      |0 . . . . . . .|8 . . . . . . .|16 . . .|   G = 8
    half 1 cuts where (x+G/2) % G == 0      |0 . . .|4 . . . . . . .|12 . . . . . . .|
    documents (segment_ids)                 [ doc A . . . . . . . . . . . ][ doc B . ...
                                             positions restart at 0 in doc B

Padding (an HF 2D ``attention_mask``) is folded into the segments: every maximal run of valid
tokens and every run of pad tokens becomes its own document, so valid queries never see pad
keys, groups start at the first valid token (left padding), and pad queries still see at least
themselves (finite outputs and gradients).

This module computes those layouts once on the host (NumPy) and turns them into device index
tensors: SDPA batches (chunks of similar length gathered and padded at the end, which is safe
under ``is_causal``) and flash-attn ``cu_seqlens``. Layouts are cached per segment tensor, so the
host sync happens once per forward pass, not once per layer.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ChunkLayout",
    "IdentityCache",
    "SdpaPlan",
    "chunk_layout",
    "combine_segments_and_padding",
    "segments_from_position_ids",
    "doc_starts",
    "positions_in_doc",
]

# Chunks whose lengths differ by less than this ratio share one padded SDPA call.
_BUCKET_RATIO = 1.25


def doc_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, N) flags: True where a new document (a maximal run of equal ids) starts."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def positions_in_doc(starts: torch.Tensor) -> torch.Tensor:
    """Position x of every token inside its document, from the (B, N) document-start flags."""
    n = starts.shape[-1]
    ar = torch.arange(n, device=starts.device).expand_as(starts)
    last_start = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=-1).values
    return ar - last_start


def combine_segments_and_padding(
    segment_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Merge optional ``segment_ids`` (B, N) and an HF 2D padding mask (1 valid, 0 pad) into one
    (B, N) id tensor whose runs are the documents attention must respect.

    Returns None when there is neither (plain causal rows).
    """
    if attention_mask is None:
        return segment_ids
    valid = attention_mask.to(torch.bool)
    if segment_ids is None:
        return valid.to(torch.long)
    if segment_ids.shape != valid.shape:
        raise ValueError(
            f"segment_ids has shape {tuple(segment_ids.shape)} but attention_mask has "
            f"{tuple(valid.shape)}; pass both as (batch, seq_len) for the same tokens"
        )
    # A new run starts where either the document or the validity changes.
    change = doc_starts(segment_ids) | doc_starts(valid)
    return change.to(torch.long).cumsum(dim=-1)


def segments_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Documents implied by position ids that restart (transformers' packed-sequence rule).

    A document starts wherever a position is not its predecessor + 1. Returns None when every
    row is a single document.
    """
    first = position_ids[:, :1] - 1
    restart = torch.diff(position_ids, prepend=first, dim=-1) != 1
    restart[:, 0] = False
    if not bool(restart.any()):
        return None
    return restart.to(torch.long).cumsum(dim=-1)


@dataclass(frozen=True)
class SdpaPlan:
    """How to run one head-half's chunks as a few batched causal SDPA calls.

    Attributes:
        batches: per call, (token index (C, L) into the flattened B·N tokens, chunk length L).
            Chunks shorter than L are padded at the end with their own last token.
        gather_back: (B·N,) row of the concatenated (ΣC·L) outputs that holds each token.
    """

    batches: tuple[tuple[torch.Tensor, int], ...]
    gather_back: torch.Tensor


@dataclass(frozen=True)
class ChunkLayout:
    """Chunk starts and lengths in the flattened (B·N) token order, for one head-half."""

    starts: np.ndarray
    lengths: np.ndarray
    total: int

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """flash-attn style cumulative offsets (int32), one entry per chunk plus the end."""
        cu = np.append(self.starts, self.total).astype(np.int32)
        return torch.from_numpy(cu).to(device)

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())

    def sdpa_plan(self, device: torch.device) -> SdpaPlan:
        """Bucket chunks by length (ratio ≤ 1.25 inside a bucket) into padded SDPA batches."""
        keys = np.floor(np.log(self.lengths) / math.log(_BUCKET_RATIO)).astype(np.int64)
        batches, rows, tokens, base = [], [], [], 0
        for key in np.unique(keys):
            sel = np.flatnonzero(keys == key)
            starts, lens = self.starts[sel], self.lengths[sel]
            width = int(lens.max())
            t = np.arange(width)
            idx = starts[:, None] + np.minimum(t[None, :], lens[:, None] - 1)  # (C, L)
            valid = t[None, :] < lens[:, None]
            rows.append((base + np.arange(sel.size)[:, None] * width + t[None, :])[valid])
            tokens.append((starts[:, None] + t[None, :])[valid])
            batches.append((torch.from_numpy(idx).to(device), width))
            base += sel.size * width
        gather_back = np.empty(self.total, dtype=np.int64)
        gather_back[np.concatenate(tokens)] = np.concatenate(rows)
        return SdpaPlan(tuple(batches), torch.from_numpy(gather_back).to(device))


def _chunk_flags(starts: np.ndarray, group_size: int | None, offset: int, pos: np.ndarray | None = None) -> np.ndarray:
    """(B, N) flags of chunk starts: document starts plus group cuts at (x + offset) % G == 0.

    ``pos``: each token's position x inside its document, for rows that do not begin at a document
    start (a sequence-parallel rank's halo + local keys); by default x counts from each row start."""
    flags = starts.copy()
    flags[:, 0] = True
    if pos is not None:
        flags |= pos == 0
    if group_size is not None:
        if pos is None:
            n = starts.shape[1]
            ar = np.broadcast_to(np.arange(n), starts.shape)
            pos = ar - np.maximum.accumulate(np.where(flags, ar, 0), axis=1)
        flags |= (pos + offset) % group_size == 0
    return flags


def _build_layout(starts: np.ndarray, group_size: int | None, offset: int, pos: np.ndarray | None = None) -> ChunkLayout:
    flat = _chunk_flags(starts, group_size, offset, pos).reshape(-1)
    chunk_starts = np.flatnonzero(flat).astype(np.int64)
    lengths = np.diff(np.append(chunk_starts, flat.size))
    return ChunkLayout(chunk_starts, lengths, int(flat.size))


class IdentityCache:
    """A small LRU keyed by the identity (and version) of some tensors plus plain values.

    The same ``segment_ids`` / mask / position-id tensors reach every layer of a forward pass
    (and the gradient-checkpointing recompute), so whatever is derived from them on the host is
    computed by the first layer only. Entries die with their tensors (checked by weak reference).
    """

    def __init__(self, capacity: int = 16):
        self._items: OrderedDict = OrderedDict()
        self._capacity = capacity

    @staticmethod
    def _key(tensors: tuple, extra: tuple) -> tuple:
        ids = tuple(None if t is None else (id(t), t._version) for t in tensors)
        return ids + extra

    def get(self, tensors: tuple, extra: tuple):
        """The cached value, or None."""
        hit = self._items.get(self._key(tensors, extra))
        if hit is None:
            return None
        refs, value = hit
        if any(ref() is not t for ref, t in zip(refs, tensors) if t is not None):
            return None
        self._items.move_to_end(self._key(tensors, extra))
        return value

    def put(self, tensors: tuple, extra: tuple, value) -> None:
        """Store ``value`` for these tensors (weakly referenced) and extra key values."""
        refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        key = self._key(tensors, extra)
        self._items[key] = (refs, value)
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)


_CACHE = IdentityCache()


def chunk_layout(
    batch: int,
    seq_len: int,
    segment_ids: torch.Tensor | None,
    group_size: int | None,
    offset: int,
    kind: str,
    device: torch.device,
    positions: torch.Tensor | None = None,
):
    """Cached layout for one head-half.

    Args:
        batch, seq_len: B and N of the rows.
        segment_ids: (B, N) document ids (runs), or None for one document per row.
        group_size: G, or None for no group cuts (full attention within documents).
        offset: 0 for the unshifted half, G/2 for the shifted half.
        kind: "layout" (the ChunkLayout), "sdpa" (an SdpaPlan) or "flash" ((cu_seqlens, max_len)).
        device: where index tensors live.
        positions: (B, N) position of each token inside its document, for rows that start inside
            a document; by default positions count from each row's start (and document starts).
    """
    extra = (batch, seq_len, group_size, offset, kind, str(device))
    hit = _CACHE.get((segment_ids, positions), extra)
    if hit is not None:
        return hit
    if segment_ids is None:
        starts = np.zeros((batch, seq_len), dtype=bool)
    else:
        starts = doc_starts(segment_ids).cpu().numpy()
    pos = None if positions is None else positions.cpu().numpy()
    layout = _build_layout(starts, group_size, offset, pos)
    if kind == "sdpa":
        value = layout.sdpa_plan(device)
    elif kind == "flash":
        value = (layout.cu_seqlens(device), layout.max_len)
    else:
        value = layout
    _CACHE.put((segment_ids, positions), extra, value)
    return value
