"""Sequence-parallel S²-Attn: each rank holds L = N/P tokens of a row; a group-halo exchange brings
it the earlier keys/values its queries need, and sends their gradients back.

    row of N tokens, P = 2 ranks, G = N/4, shifted half (groups cut at x ≡ G/2 mod G):

    positions  0          G/2        3G/2       N/2=2G    5G/2       7G/2       N
    half 0     [    G     |    G     ]          [    G     |    G     ]
    half 1     [G/2][     G     ][      G       ][     G     ][  G/2 ]
    rank 0     [======== local keys 0 .. L ========]
    rank 1                           [  halo  ][======== local keys L .. N ========]
                                     3G/2 .. 2G: the shifted half's group that crosses the boundary

A query sees keys at or before it inside its chunk (its S²-Attn group cut at document starts), so a
rank needs, per head-half h, the keys from the start of the chunk holding its first token up to that
token: [c_h(rL), rL). Chunk starts never decrease along a row, so that one range is all. With L ≥ G
and no documents the unshifted half needs nothing and the shifted half G/2 tokens of the previous
rank; with L < G (a group spread over several ranks) or documents anywhere, ranges span several
predecessors. The plan follows from (N, G, P, the row's document layout) alone, so every rank
computes the whole plan without communication.

The exchange moves, per half, only that half's distinct key/value heads (never GQA repeats), as
one (B, 2·h_kv, len, D) tensor per (owner, receiver) pair through ``batch_isend_irecv`` between the
sp group's global ranks. Backward sends the halo's dK/dV back to their owners, who add them to
their own. Rank 0 has no predecessor: no wrap-around, as at sp = 1. The attention itself is the
plain kernel (``megalong.attention.s2_attention``) run on [halo ‖ local] keys with ``q_offset``.
Full attention (evaluation) is the same exchange with chunks = documents (the halo can then be the whole
prefix; the kernel still runs square and causal, with zero queries for the halo keys). A sliding window W
(Mistral v0.1) bounds it: a query sees at most W - 1 earlier keys, so the halo is at most W - 1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megalong.attention.heads import HeadLayout, split_halves
from megalong.attention.layout import doc_starts, positions_in_doc, segments_from_position_ids


# ----------------------------------------------------------------------------------- the plan
def chunk_starts(pos_in_doc: np.ndarray, group_size: int | None, offset: int, window: int | None = None) -> np.ndarray:
    """(B, N) global index of the first key each token's query can see.

    ``pos_in_doc`` (B, N): each token's position x inside its document. A chunk is the S²-Attn
    group (cut where (x + offset) % G == 0) inside the document; without G, the document, cut to the
    last ``window`` tokens when there is a sliding window (still non-decreasing along the row)."""
    idx = np.arange(pos_in_doc.shape[1])[None, :]
    if group_size is None:
        start = idx - pos_in_doc
        return start if window is None else np.maximum(start, idx - (window - 1))
    first_in_group = np.maximum(0, ((pos_in_doc + offset) // group_size) * group_size - offset)
    return idx - pos_in_doc + first_in_group


@dataclass(frozen=True)
class HaloPiece:
    """Tokens [start, end) (row coordinates) that ``owner`` sends to ``receiver`` for one head-half."""

    owner: int
    receiver: int
    start: int
    end: int


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which key/value positions to whom, per head-half, for one batch layout.

    Attributes:
        seq_len: N of the whole row; local_len: L = N / sp.
        halo_start: per half, per rank: the first key position the rank needs (= r·L without a halo).
        pieces: per half, every (owner, receiver, range) transfer, in row order per receiver.
    """

    seq_len: int
    sp: int
    local_len: int
    halo_start: tuple[tuple[int, ...], ...]
    pieces: tuple[tuple[HaloPiece, ...], ...]

    def halo_len(self, half: int, rank: int) -> int:
        return rank * self.local_len - self.halo_start[half][rank]

    def sends(self, half: int, rank: int) -> list[HaloPiece]:
        return [p for p in self.pieces[half] if p.owner == rank]

    def recvs(self, half: int, rank: int) -> list[HaloPiece]:
        return [p for p in self.pieces[half] if p.receiver == rank]

    def tokens_sent(self, half: int, rank: int) -> int:
        return sum(p.end - p.start for p in self.sends(half, rank))


def make_plan(pos_in_doc: np.ndarray, sp: int, group_size: int | None, offsets: tuple[int, ...],
              window: int | None = None) -> HaloPlan:
    """The halo plan for rows with the given in-document positions (B, N), per head-half offset
    (``window``: full attention's sliding window, see ``chunk_starts``).

    Rows of a micro-batch share one plan (tensors need one halo length): a rank takes the earliest
    start any row needs; extra keys are harmless, the chunk layout never lets a query reach them.
    """
    n = pos_in_doc.shape[1]
    if n % sp:
        raise ValueError(f"sp={sp} does not divide the row length {n}")
    length = n // sp
    starts_all, pieces_all = [], []
    for off in offsets:
        cs = chunk_starts(pos_in_doc, group_size, off, window)  # (B, N)
        starts = tuple(int(cs[:, r * length].min()) for r in range(sp))
        pieces = []
        for r in range(1, sp):
            a, b = starts[r], r * length
            for o in range(a // length, r):
                s, e = max(a, o * length), min(b, (o + 1) * length)
                if s < e:
                    pieces.append(HaloPiece(o, r, s, e))
        starts_all.append(starts)
        pieces_all.append(tuple(pieces))
    return HaloPlan(n, sp, length, tuple(starts_all), tuple(pieces_all))


# ----------------------------------------------------------------------------------- the exchange
@dataclass
class HaloStats:
    """Bytes this rank sent in halo exchanges (forward keys/values, backward their gradients)."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    calls: int = 0


def _p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group, tag: int) -> None:
    """Post every send and receive at once, wait for all (peers are global ranks)."""
    ops = [dist.P2POp(dist.isend, t, peer, group, tag) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group, tag) for t, peer in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _HaloExchange(torch.autograd.Function):
    """(B, C, L, D) local keys/values -> (B, C, halo + L, D) with the halo from the predecessors."""

    @staticmethod
    def forward(ctx, kv, plan: HaloPlan, half: int, rank: int, group, peers: tuple[int, ...], stats):  # noqa: D102
        length = plan.local_len
        base = rank * length
        sends = [(kv[:, :, p.start - base:p.end - base].contiguous(), peers[p.receiver])
                 for p in plan.sends(half, rank)]
        recv_pieces = plan.recvs(half, rank)
        recvs = [(kv.new_empty(kv.shape[0], kv.shape[1], p.end - p.start, kv.shape[3]), peers[p.owner])
                 for p in recv_pieces]
        _p2p(sends, recvs, group, tag=half)
        if stats is not None:
            stats.forward_bytes += sum(t.numel() * t.element_size() for t, _ in sends)
            stats.calls += 1
        ctx.plan, ctx.half, ctx.rank, ctx.group, ctx.peers, ctx.stats = plan, half, rank, group, peers, stats
        return torch.cat([t for t, _ in recvs] + [kv], dim=2) if recvs else kv.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        plan, half, rank = ctx.plan, ctx.half, ctx.rank
        base, halo = rank * plan.local_len, plan.halo_len(half, rank)
        grad_local = grad[:, :, halo:].clone()  # (B, C, L, D)
        back, at = [], 0
        for p in plan.recvs(half, rank):  # the halo's gradients go back to their owners
            back.append((grad[:, :, at:at + p.end - p.start].contiguous(), ctx.peers[p.owner]))
            at += p.end - p.start
        mine = [(grad.new_empty(grad.shape[0], grad.shape[1], p.end - p.start, grad.shape[3]), p)
                for p in plan.sends(half, rank)]
        _p2p(back, [(t, ctx.peers[p.receiver]) for t, p in mine], ctx.group, tag=2 + half)
        for t, p in mine:
            grad_local[:, :, p.start - base:p.end - base] += t
        if ctx.stats is not None:
            ctx.stats.backward_bytes += sum(t.numel() * t.element_size() for t, _ in back)
        return grad_local, None, None, None, None, None, None


# ----------------------------------------------------------------------------------- per batch
@dataclass
class SequenceParallelContext:
    """What the attention layers of one forward pass need to run sequence-parallel.

    Built once per micro-batch by ``megalong.parallel.sharding``; travels to every attention call
    through transformers' ``**kwargs`` (as ``sp_context``).

    Attributes:
        rank, sp, group, peers: this rank's index in its sequence-parallel group, the group's size,
            the process group and its members' global ranks.
        pos_in_doc: (B, N) position of every token of the whole row inside its document.
        doc_ids: (B, N) document index of every token of the whole row.
    """

    rank: int
    sp: int
    group: object
    peers: tuple[int, ...]
    pos_in_doc: torch.Tensor
    doc_ids: torch.Tensor
    stats: HaloStats | None = None
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def local_len(self) -> int:
        return self.pos_in_doc.shape[1] // self.sp

    def plan(self, group_size: int | None, window: int | None = None) -> HaloPlan:
        """The plan for S²-Attn with ``group_size`` (None: full attention, with an optional sliding
        ``window``), computed once per batch."""
        key = (group_size, window if group_size is None else None)
        if key not in self._plans:
            offsets = (0, group_size // 2) if group_size is not None else (0,)
            self._plans[key] = make_plan(self.pos_in_doc.cpu().numpy(), self.sp, group_size, offsets, key[1])
        return self._plans[key]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int | None,
               backend: str, scale: float | None, module: torch.nn.Module | None = None,
               window: int | None = None, deterministic: bool = False) -> torch.Tensor:
        """What megalong's registered attention functions call under sequence parallelism
        (``megalong.attention`` stays free of distributed code): see ``halo_attention``."""
        return halo_attention(query, key, value, self, group_size, backend, scale, window, deterministic)

    def key_slice(self, plan: HaloPlan, half: int) -> slice:
        end = (self.rank + 1) * self.local_len
        return slice(plan.halo_start[half][self.rank], end)


def row_documents(position_ids_full: torch.Tensor, segment_ids_full: torch.Tensor | None,
                  use_position_restarts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(position inside its document, document index) of every token of the whole rows (B, N), on the host.

    Documents follow megalong's attention rules: segment runs when given, else restarting position
    ids (a packed row with ``reset_position_ids``), else one document per row. Both sequence-parallel
    modes (halo and Ulysses) take the row's layout from here."""
    seg = segment_ids_full
    if seg is None and use_position_restarts:
        seg = segments_from_position_ids(position_ids_full.cpu())
    if seg is None:
        starts = torch.zeros(position_ids_full.shape, dtype=torch.bool)
        starts[:, 0] = True
    else:
        starts = doc_starts(seg.cpu())
    return positions_in_doc(starts), starts.long().cumsum(dim=-1)


def build_context(position_ids_full: torch.Tensor, segment_ids_full: torch.Tensor | None, dims,
                  use_position_restarts: bool = True, stats: HaloStats | None = None) -> SequenceParallelContext:
    """The per-batch halo context from the whole row's position ids (B, N) and optional segment ids (B, N)."""
    pos_in_doc, doc_ids = row_documents(position_ids_full, segment_ids_full, use_position_restarts)
    return SequenceParallelContext(dims.sp_rank, dims.sp, dims.groups.get("sp"), tuple(dims.sp_group_ranks()),
                                   pos_in_doc, doc_ids, stats)


def halo_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: SequenceParallelContext,
                   group_size: int | None, backend: str, scale: float | None, window: int | None = None,
                   deterministic: bool = False) -> torch.Tensor:
    """Sequence-parallel S²-Attn (or, with ``group_size`` None, full attention) of this rank's queries.

    Args:
        query: (B, H, L, D) local queries; key/value: (B, H_kv, L, D) local keys/values.
        ctx: the batch's SequenceParallelContext.
        group_size: S²-Attn G; None for full causal attention.
        backend: the local kernel ("sdpa", "flash", "reference").
        scale: softmax scale.
        window: full attention's sliding window (the model's ``sliding_window``; None: none). S²-Attn
            groups never exceed it (checked before training), so it only matters for full attention.
        deterministic: flash backend: flash-attn's deterministic backward.

    Returns:
        (B, H, L, D_v), equal to the rows [rL, (r+1)L) of single-process attention over the whole row.
    """
    from megalong.attention.s2attn import full_attention, s2_attention

    num_heads, num_kv = query.shape[1], key.shape[1]
    plan = ctx.plan(group_size, window)
    if group_size is None:
        halves = [(0, num_heads, 0, num_kv, 0)]  # (q_start, q_end, kv_start, kv_end, plan half)
    else:
        halves = []
        for h in split_halves(num_heads, num_kv):
            kv = h.kv_slice or (min(h.kv_index), max(h.kv_index) + 1)
            halves.append((h.q_start, h.q_end, kv[0], kv[1], 1 if h.shifted else 0))
    outs = []
    for q0, q1, k0, k1, half in halves:
        if plan.pieces[half]:
            kv = torch.cat([key[:, k0:k1], value[:, k0:k1]], dim=1)  # (B, 2·h_kv, L, D): one message per peer
            kv_ext = _HaloExchange.apply(kv, plan, half, ctx.rank, ctx.group, ctx.peers, ctx.stats)
            k_ext, v_ext = kv_ext.split([k1 - k0, k1 - k0], dim=1)  # (B, h_kv, halo + L, D)
        else:  # no rank needs anything for this half (e.g. the unshifted half with L a multiple of G)
            k_ext, v_ext = key[:, k0:k1], value[:, k0:k1]
        keys = ctx.key_slice(plan, half)
        halo = plan.halo_len(half, ctx.rank)
        if group_size is None:
            # Queries for the halo keys as zeros, computed and dropped (as s2_attention's q_offset does): the
            # kernel then runs square and causal (documents chunked) instead of L queries over halo + L keys
            # with a dense (L × (halo + L)) mask — the halo of full attention can be the whole prefix.
            seg = ctx.doc_ids[:, keys].to(query.device)
            q = query[:, q0:q1]
            if halo:
                q = torch.cat([q.new_zeros(q.shape[0], q.shape[1], halo, q.shape[3]), q], dim=2)
            out = full_attention(q, k_ext, v_ext, backend=backend, segment_ids=seg, scale=scale, window=window,
                                 deterministic=deterministic)[:, :, halo:]
        else:
            out = s2_attention(query[:, q0:q1], k_ext, v_ext, group_size, backend=backend, scale=scale,
                               q_offset=halo, positions=ctx.pos_in_doc[:, keys].to(query.device),
                               segment_ids=ctx.doc_ids[:, keys].to(query.device),
                               heads=HeadLayout(num_heads, num_kv, q0), deterministic=deterministic)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
