#!/usr/bin/env python
"""megalong's chunked cross-entropy against DeepSpeed's TiledFusedLogitsLoss (ALST), on CPU.

    flock /tmp/megalong_heavy.lock python tools/bench_tiled_loss.py [--quick] [--json OUT]

The loss head alone: hidden states (N, d) fp32 (requires grad), an lm_head weight (V, d) fp32
(requires grad), labels with 10% ignored tokens and one whole tile ignored; forward + backward of
the *summed* token cross-entropy, gradients for both. Two methods, the same tile size (``--tile``
tokens, megalong's ``train.loss_chunk_size`` default):

- ``chunked``: megalong.engine.loss.chunked_cross_entropy (custom autograd: forward builds one
  (C, V) fp32 logits buffer per chunk, takes the loss, turns the buffer into dlogits in place and
  accumulates dh and dW; backward scales them by the incoming scalar);
- ``ds-tiled``: deepspeed's TiledFusedLogitsLoss with ``fn = cross_entropy(lm_head(x).float(),
  y, reduction="sum")`` and ``output_reduction="sum"`` (it runs forward and backward of each tile
  inside its forward, under autograd; "mean" is not used: a tile whose labels are all ignored
  gives NaN there);
- ``ds-tiled-alst``: the same with ALST's shard count, ceil(N·V·4 bytes / 1 GiB) tiles (as the
  ArcticTraining recipe sizes them), where that differs.

Each cell runs in a fresh process (one thread): "memory" is the peak resident set during forward
+ backward (VmHWM, reset through /proc/self/clear_refs) above the resident set once the inputs
exist; "time" is the faster of two forward+backward passes (one pass above 16k tokens). Before timing, the two methods are
checked to agree (loss and both gradients) on a small case. Ratios are ds / megalong, measured in
one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IGNORE = -100


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _inputs(n: int, d: int, v: int, tile: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.5).requires_grad_(True)  # (N, d)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).requires_grad_(True)  # (V, d)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = IGNORE
    labels[tile: 2 * tile] = IGNORE  # one whole tile without a valid label
    return hidden, weight, labels


def _loss_fn(method: str, tile: int):
    import torch.nn.functional as F

    from megalong.engine.loss import chunked_cross_entropy

    if method == "chunked":
        return lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=tile)[0]
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    class Head:  # the "self" TiledFusedLogitsLoss hands to fn (an lm_head owner)
        pass

    def fn(head, x, y):  # one tile: (t, d), (t,)
        return F.cross_entropy(F.linear(x, head.weight).float(), y, ignore_index=IGNORE, reduction="sum")

    def loss(h, w, y):
        head = Head()
        head.weight = w
        n, v = h.shape[0], w.shape[0]
        shards = math.ceil(n / tile) if method == "ds-tiled" else alst_shards(n, v)
        # (1, N, d) and (1, N): it wants [batch, seq, ...]
        return TiledFusedLogitsLoss.apply(fn, head, h.unsqueeze(0), y.unsqueeze(0), None, shards, [w], "sum")

    return loss


def alst_shards(n: int, v: int) -> int:
    """ArcticTraining's tiled-loss sizing: tiles of about 1 GiB of fp32 logits."""
    return max(1, math.ceil(n * v * 4 / 2**30))


def worker(method: str, n: int, d: int, v: int, tile: int) -> dict:
    import gc

    import torch

    from megalong.utils.cpu_runtime import configure_cpu_allocator

    configure_cpu_allocator(os.environ)  # what every CPU rank of a real run uses
    torch.set_num_threads(1)
    hidden, weight, labels = _inputs(n, d, v, tile)
    loss_fn = _loss_fn(method, tile)
    times, mem = [], None
    for it in range(2 if n <= 16384 else 1):
        hidden.grad = weight.grad = None
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
        base = _status_kib("VmRSS")
        t0 = time.perf_counter()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        times.append(time.perf_counter() - t0)
        if it == 0:
            mem = (_status_kib("VmHWM") - base) / 2**20
        assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
        del loss
    return {"method": method, "n": n, "d": d, "v": v, "tile": tile, "mem_gb": mem, "time_s": min(times)}


def check_agreement(tile: int) -> str:
    """Both methods give the same loss and gradients (N = 3·tile + 5, d 64, V 1000)."""
    import torch

    out = {}
    for method in ("chunked", "ds-tiled"):
        h, w, y = _inputs(3 * tile + 5, 64, 1000, tile, seed=1)
        loss = _loss_fn(method, tile)(h, w, y)
        loss.backward()
        out[method] = (loss.detach(), h.grad, w.grad)
    for a, b in zip(out["chunked"], out["ds-tiled"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return f"agreement check: loss {float(out['chunked'][0]):.4f} and both gradients equal (rtol 1e-5)"


def run_cell(method: str, n: int, d: int, v: int, tile: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(d), str(v), str(tile)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{method} N={n}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 4k only (smoke test)")
    p.add_argument("--tokens", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tile", type=int, default=1024, help="tokens per chunk / tile for both methods")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        method, *nums = a.worker
        print(json.dumps(worker(method, *map(int, nums))))
        return
    import torch

    torch.set_num_threads(1)
    print(check_agreement(a.tile))
    tokens = [4096] if a.quick else a.tokens
    rows = []
    print(f"hidden {a.hidden}, vocab {a.vocab}, tile {a.tile} tokens, fp32, 1 thread; memory above inputs")
    print("| N | method | tiles | memory (GB) | time (s) | memory / chunked | time / chunked |")
    print("|---|---|---|---|---|---|---|")
    for n in tokens:
        methods = ["chunked", "ds-tiled"]
        if alst_shards(n, a.vocab) != math.ceil(n / a.tile):
            methods.append("ds-tiled-alst")
        ref = None
        for m in methods:
            r = run_cell(m, n, a.hidden, a.vocab, a.tile)
            r["tiles"] = alst_shards(n, a.vocab) if m == "ds-tiled-alst" else math.ceil(n / a.tile)
            ref = ref or r
            r["mem_ratio"], r["time_ratio"] = r["mem_gb"] / ref["mem_gb"], r["time_s"] / ref["time_s"]
            rows.append(r)
            print(f"| {n} | {m} | {r['tiles']} | {r['mem_gb']:.3f} | {r['time_s']:.2f} | "
                  f"{r['mem_ratio']:.2f}× | {r['time_ratio']:.2f}× |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
