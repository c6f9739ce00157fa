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


@dataclass(frozen=True)
class HeadLayout:
    """Which of a layer's heads a q/k/v tensor holds: its query heads are the model's heads
    [q_start, q_start + H_local) of ``num_heads``; its kv heads start at kv head ⌊q_start / rep⌋,
    rep = num_heads / num_kv_heads. The head-half (shifted or not) follows the *global* head index
    (Ulysses gives a rank a slice of heads; the halo exchange runs one half at a time)."""

    num_heads: int
    num_kv_heads: int
    q_start: int = 0

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} kv heads")
        if not 0 <= self.q_start < self.num_heads:
            raise ValueError(f"q_start={self.q_start} is outside the {self.num_heads} heads")

    @property
    def rep(self) -> int:
        return self.num_heads // self.num_kv_heads


def split_halves(num_heads: int, num_kv_heads: int, layout: HeadLayout | None = None) -> tuple[HalfHeads, ...]:
    """The (unshifted, shifted) head-halves of a q tensor with ``num_heads`` heads over a kv tensor with
    ``num_kv_heads`` heads, indexed locally; a single head is all 'shifted' (⌊1/2⌋ = 0).

    ``layout``: where these heads sit among the layer's (default: they are all of them)."""
    layout = layout or HeadLayout(num_heads, num_kv_heads)
    rep, q0 = layout.rep, layout.q_start
    if q0 + num_heads > layout.num_heads:
        raise ValueError(f"heads [{q0}, {q0 + num_heads}) exceed the layer's {layout.num_heads}")
    kv0, mid = q0 // rep, layout.num_heads // 2
    halves = []
    for a, b, shifted in ((0, mid, False), (mid, layout.num_heads, True)):
        lo, hi = max(a, q0), min(b, q0 + num_heads)
        if lo >= hi:
            continue
        kv = [g // rep - kv0 for g in range(lo, hi)]
        if kv[-1] >= num_kv_heads:
            raise ValueError(f"query heads [{lo}, {hi}) need kv head {kv[-1] + kv0} but the kv tensor holds "
                             f"{num_kv_heads} heads from kv head {kv0}")
        counts = [kv.count(i) for i in range(kv[0], kv[-1] + 1)]
        if len(set(counts)) == 1:
            halves.append(HalfHeads(lo - q0, hi - q0, (kv[0], kv[-1] + 1), None, shifted))
        else:
            halves.append(HalfHeads(lo - q0, hi - q0, None, tuple(kv), shifted))
    return tuple(halves)
