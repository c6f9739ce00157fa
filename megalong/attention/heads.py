"""Head bookkeeping shared by the backends: the two head-halves and their GQA key/value heads.

    query heads   0 1 2 3 | 4 5 6 7        half 0 = heads [0, ⌊H/2⌋), half 1 = the rest
    kv heads      0 0 1 1 | 2 2 3 3        query head h uses kv head ⌊h / (H / H_kv)⌋

A half whose query heads map onto a contiguous kv-head slice with the same repeat count for every
kv head runs with the un-repeated slice (SDPA ``enable_gqa`` / flash-attn's native GQA). Otherwise
(e.g. H=6, H_kv=3: half 0 uses kv heads 0, 0, 1) the kv heads of that half are gathered per query
head, which materialises a copy for that half only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HalfHeads:
    """Query heads [q_start, q_end) and how to fetch their key/value heads.

    Attributes:
        q_start, q_end: the query-head range of this half.
        kv_slice: (start, end) of the kv heads to use as-is (uniform repeat), or None.
        kv_index: per-query-head kv head ids (used when the repeat is not uniform), or None.
        shifted: whether these heads use the shifted groups (half 1).
    """

    q_start: int
    q_end: int
    kv_slice: tuple[int, int] | None
    kv_index: tuple[int, ...] | None
    shifted: bool = False

    @property
    def num_q(self) -> int:
        return self.q_end - self.q_start

    def select_kv(self, kv: torch.Tensor, dim: int) -> torch.Tensor:
        """The kv heads this half needs, taken along ``dim`` of ``kv``."""
        if self.kv_slice is not None:
            start, end = self.kv_slice
            return kv.narrow(dim, start, end - start)
        index = torch.tensor(self.kv_index, device=kv.device)
        return kv.index_select(dim, index)


def half_heads(
    q_start: int, q_end: int, num_heads: int, num_kv_heads: int, shifted: bool = False
) -> HalfHeads:
    """Map query heads [q_start, q_end) onto kv heads as transformers' ``repeat_kv`` does."""
    rep = num_heads // num_kv_heads
    kv = [h // rep for h in range(q_start, q_end)]
    first, last = kv[0], kv[-1]
    counts = [kv.count(i) for i in range(first, last + 1)]
    if len(set(counts)) == 1:
        return HalfHeads(q_start, q_end, (first, last + 1), None, shifted)
    return HalfHeads(q_start, q_end, None, tuple(kv), shifted)


def split_halves(num_heads: int, num_kv_heads: int) -> tuple[HalfHeads, ...]:
    """The (unshifted, shifted) head-halves; a single head is all 'shifted' (⌊1/2⌋ = 0)."""
    mid = num_heads // 2
    halves = []
    if mid > 0:
        halves.append(half_heads(0, mid, num_heads, num_kv_heads))
    halves.append(half_heads(mid, num_heads, num_heads, num_kv_heads, shifted=True))
    return tuple(halves)
