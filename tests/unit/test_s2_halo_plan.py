"""The halo plan and the kernel arguments it relies on, without processes: for every rank r of a
simulated sequence-parallel group, attention of its queries over [its halo ‖ its keys] (q_offset,
in-document positions, global head offsets) equals rows [rL, (r+1)L) of single-process S²-Attn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megalong.attention import full_attention, s2_attention
from megalong.attention.heads import HeadLayout, split_halves
from megalong.attention.layout import doc_starts, positions_in_doc
from megalong.parallel.s2_halo import chunk_starts, make_plan


def _docs(b, n, cuts):
    seg = torch.zeros(b, n, dtype=torch.long)
    for row, row_cuts in enumerate(cuts):
        for c in row_cuts:
            seg[row, c:] += 1
    return seg


def _pos(seg):
    return positions_in_doc(doc_starts(seg))


def test_plan_without_documents_matches_the_design():
    n, g, sp = 64, 16, 2  # L = 32 = 2G: unshifted half needs nothing, shifted half G/2 of the previous rank
    pos = np.tile(np.arange(n), (1, 1))
    plan = make_plan(pos, sp, g, (0, g // 2))
    assert plan.halo_start == ((0, 32), (0, 24))
    assert plan.pieces[0] == () and [(p.owner, p.receiver, p.start, p.end) for p in plan.pieces[1]] == [(0, 1, 24, 32)]
    plan4 = make_plan(np.tile(np.arange(128), (1, 1)), 4, 64, (0, 32))  # L = 32 < G = 64: groups span ranks
    assert plan4.halo_start == ((0, 0, 64, 64), (0, 32, 32, 96))
    got = [(p.owner, p.receiver, p.start, p.end) for p in plan4.pieces[1]]
    assert got == [(1, 2, 32, 64)]  # rank 3 starts a shifted group at 96: nothing to fetch
    assert [(p.owner, p.receiver) for p in plan4.pieces[0]] == [(0, 1), (2, 3)]


def test_chunk_starts_follow_the_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, g = int(rng.integers(5, 60)), int(rng.integers(1, 8)) * 2
        cuts = sorted(set(rng.integers(1, n, size=int(rng.integers(0, 4))).tolist()))
        pos = _pos(_docs(1, n, [cuts])).numpy()
        for off in (0, g // 2):
            cs = chunk_starts(pos, g, off)[0]
            for x in range(n):
                grp = (pos[0] + off) // g
                same = [j for j in range(x + 1) if grp[j] == grp[x] and x - pos[0, x] <= j]
                assert cs[x] == same[0], (n, g, cuts, off, x)


CASES = [  # b, heads, kv heads, n, G, sp, document cuts per row
    (1, 4, 2, 64, 16, 2, [[]]),  # L = 2G
    (1, 4, 4, 60, 16, 2, [[]]),  # L = 30 not a multiple of G
    (1, 4, 1, 48, 32, 3, [[]]),  # MQA, L = 16 < G: a group over 2 and 3 ranks
    (2, 9, 3, 64, 16, 4, [[5, 33], [16, 40]]),  # 9/3 heads (halves 4 and 5), documents, one at a rank boundary
    (1, 6, 3, 40, 8, 4, [[10, 13]]),  # a document starting inside another rank's halo
    (1, 1, 1, 32, 8, 2, [[]]),  # a single (shifted) head
]


@pytest.mark.parametrize("b,h,hk,n,g,sp,cuts", CASES)
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_ranks_over_their_halo_equal_the_whole_row(b, h, hk, n, g, sp, cuts, backend):
    gen = torch.Generator().manual_seed(n + h)
    q, k, v = (torch.randn(b, x, n, 8, generator=gen, dtype=torch.float64) for x in (h, hk, hk))
    seg = _docs(b, n, cuts)
    want = s2_attention(q, k, v, g, backend="reference", segment_ids=seg)
    pos = _pos(seg)
    plan = make_plan(pos.numpy(), sp, g, (0, g // 2))
    length = n // sp
    rep = h // hk
    for r in range(sp):
        outs = []
        for half in split_halves(h, hk):
            idx = 1 if half.shifted else 0
            ks = slice(plan.halo_start[idx][r], (r + 1) * length)
            k0, k1 = half.q_start // rep, (half.q_end - 1) // rep + 1
            outs.append(s2_attention(
                q[:, half.q_start:half.q_end, r * length:(r + 1) * length], k[:, k0:k1, ks], v[:, k0:k1, ks], g,
                backend=backend, q_offset=plan.halo_len(idx, r), positions=pos[:, ks], segment_ids=seg[:, ks],
                heads=HeadLayout(h, hk, half.q_start)))
        got = torch.cat(outs, dim=1)
        torch.testing.assert_close(got, want[:, :, r * length:(r + 1) * length], rtol=1e-10, atol=1e-10)


def test_full_attention_over_the_whole_prefix_plan():
    b, h, hk, n, sp = 2, 4, 2, 48, 3
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, x, n, 8, generator=gen, dtype=torch.float64) for x in (h, hk, hk))
    seg = _docs(b, n, [[20], [7, 30]])
    want = full_attention(q, k, v, segment_ids=seg, backend="reference")
    plan = make_plan(_pos(seg).numpy(), sp, None, (0,))
    for r in range(sp):
        ks = slice(plan.halo_start[0][r], (r + 1) * 16)
        got = full_attention(q[:, :, r * 16:(r + 1) * 16], k[:, :, ks], v[:, :, ks], segment_ids=seg[:, ks])
        torch.testing.assert_close(got, want[:, :, r * 16:(r + 1) * 16], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [5, 13, 40])
def test_full_attention_with_a_sliding_window_needs_window_minus_one_keys(window):
    """A sliding window W bounds full attention's halo by W - 1 keys (and by the document start); each
    simulated rank's queries over its halo ‖ keys, with the window, equal one process's rows."""
    b, h, hk, n, sp, length = 2, 4, 2, 48, 3, 16
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(b, x, n, 8, generator=gen, dtype=torch.float64) for x in (h, hk, hk))
    seg = _docs(b, n, [[20], [7, 30]])
    want = full_attention(q, k, v, segment_ids=seg, backend="reference", window=window)
    plan = make_plan(_pos(seg).numpy(), sp, None, (0,), window=window)
    starts = chunk_starts(_pos(seg).numpy(), None, 0)  # document starts: the plan without a window
    for r in range(sp):
        first = int(starts[:, r * length].min())
        assert plan.halo_start[0][r] == max(first, r * length - (window - 1))
        ks = slice(plan.halo_start[0][r], (r + 1) * length)
        halo = plan.halo_len(0, r)
        qz = torch.cat([q.new_zeros(b, h, halo, 8), q[:, :, r * length:(r + 1) * length]], dim=2)
        got = full_attention(qz, k[:, :, ks], v[:, :, ks], segment_ids=seg[:, ks], window=window)[:, :, halo:]
        torch.testing.assert_close(got, want[:, :, r * length:(r + 1) * length], rtol=1e-10, atol=1e-10)
