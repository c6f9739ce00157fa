"""One rank of the sequence-parallel attention check (tests/dist/test_sp_attention.py).

Every rank draws the same random row(s), runs single-process attention over the whole row as the
reference, then the sequence-parallel version over its own L = N/P tokens (halo exchange through
gloo), and compares its output rows and its dq, dk, dv with the reference's. Prints one JSON line.
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist

from megalong.attention import full_attention, s2_attention
from megalong.parallel.dims import ParallelDims
from megalong.parallel.s2_halo import HaloStats, build_context, halo_attention

# b, heads, kv heads, n, G (None: full attention), document cuts per row, left/right padding per row
CASES = [
    ("L=2G", 1, 4, 2, 64, 8, [[]], None),
    ("L not multiple of G, MQA", 1, 4, 1, 72, 16, [[]], None),
    ("N not multiple of G", 1, 4, 2, 60, 16, [[]], None),
    ("L<G: group over 2-3 ranks", 1, 4, 2, 48, 32, [[]], None),
    ("GQA 9/3, documents incl. at rank boundaries", 2, 9, 3, 48, 8, [[5, 24], [12, 36, 40]], None),
    ("document inside a halo", 1, 6, 3, 48, 16, [[22]], None),
    ("left and right padding", 2, 4, 2, 48, 16, [[], []], [("left", 7), ("right", 9)]),
    ("full attention, documents", 2, 4, 2, 48, None, [[20], [7, 30]], None),
    ("odd heads", 1, 3, 3, 64, 8, [[]], None),
]


def _segments(b, n, cuts, padding):
    seg = torch.zeros(b, n, dtype=torch.long)
    for row, row_cuts in enumerate(cuts):
        for c in row_cuts:
            seg[row, c:] += 1
    if padding:  # pad runs are their own documents, as combine_segments_and_padding makes them
        for row, (side, count) in enumerate(padding):
            if side == "left":
                seg[row, count:] += 1
            else:
                seg[row, n - count:] += 1
    return seg


def run_case(case, dims, stats):
    name, b, h, hk, n, g, cuts, padding = case
    gen = torch.Generator().manual_seed(n * 31 + h)
    q, k, v = (torch.randn(b, x, n, 16, generator=gen, dtype=torch.float32) for x in (h, hk, hk))
    grad_out = torch.randn(b, h, n, 16, generator=gen)
    seg = _segments(b, n, cuts, padding)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    if g is None:
        want = full_attention(qr, kr, vr, segment_ids=seg, backend="reference")
    else:
        want = s2_attention(qr, kr, vr, g, segment_ids=seg, backend="reference")
    want.backward(grad_out)

    sp, r = dims.sp, dims.sp_rank
    length = n // sp
    loc = slice(r * length, (r + 1) * length)
    ql, kl, vl = (t[:, :, loc].clone().requires_grad_(True) for t in (q, k, v))
    pos_ids = torch.arange(n).expand(b, n)
    ctx = build_context(pos_ids, seg, dims, stats=stats)
    out = halo_attention(ql, kl, vl, ctx, g, "sdpa", None)
    out.backward(grad_out[:, :, loc])
    errs = {}
    for label, got, ref in (("out", out, want[:, :, loc]), ("dq", ql.grad, qr.grad[:, :, loc]),
                            ("dk", kl.grad, kr.grad[:, :, loc]), ("dv", vl.grad, vr.grad[:, :, loc])):
        errs[label] = float((got - ref).abs().max() / (ref.abs().max() + 1e-30))
    return name, errs


def main() -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    dims = ParallelDims(world=dist.get_world_size(), sp=dist.get_world_size(), rank=dist.get_rank()).build()
    results = {}
    for case in CASES:
        if case[4] % dims.sp:
            continue
        stats = HaloStats()
        name, errs = run_case(case, dims, stats)
        results[name] = {**errs, "bytes_fwd": stats.forward_bytes, "bytes_bwd": stats.backward_bytes}
    print("RESULT " + json.dumps({"rank": dims.rank, "results": results}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
