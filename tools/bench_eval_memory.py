#!/usr/bin/env python
"""Peak memory and time of one perplexity window: full logits vs the chunked lm_head.

    python tools/bench_eval_memory.py --lengths 4096 8192 16384 --max-gb 10

Each (length, path) runs in its own subprocess, which builds a random SmolLM-135M-like model from a
config (no download), records its RSS, scores one ``standard`` window of N predictions through
``megalong.eval.evaluate_perplexity`` and reports its peak RSS (``ru_maxrss``) and the time. The
full-logits path holds about 3 × N × V fp32 values (logits, log-softmax, the transposed copy); a
run whose estimate (those, the weights and ~0.5 GB) exceeds ``--max-gb`` is skipped and listed as
such. Ratios are from this one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.lengths) + 1, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )


def child(args) -> None:
    """One configuration: build, score one window, print a JSON line."""
    import resource

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from megalong.eval import evaluate_perplexity

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.lengths[0]
    model = AutoModelForCausalLM.from_config(model_config(args), dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    doc = np.random.default_rng(0).integers(0, args.vocab, n + 1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    t0 = time.perf_counter()
    res = evaluate_perplexity(model, [doc], n, "standard", loss_chunk_size=args.chunk)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"n": n, "chunk": args.chunk, "loss": res.loss, "tokens": res.tokens, "seconds": seconds,
                      "base_rss": base, "peak_rss": peak}))


def full_logits_estimate(args, n: int) -> float:
    """Bytes: three (N, V) fp32 buffers, the fp32 weights and ~0.5 GB of torch itself."""
    d, f, kv = args.hidden, args.intermediate, args.hidden * args.kv_heads // args.heads
    params = args.vocab * d + args.layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    return 3 * n * args.vocab * 4 + 4 * params + 0.5 * GB


def run_one(args, n: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--lengths", str(n), "--chunk", str(chunk),
           "--threads", str(args.threads), "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--intermediate", str(args.intermediate), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
           "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise SystemExit(f"child {n=} {chunk=} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--chunk", type=int, default=1024, help="loss chunk size of the chunked path")
    p.add_argument("--max-gb", type=float, default=10.0, help="skip full-logits runs estimated above this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    print(f"model: llama {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab}, tied, fp32; {args.threads} threads; chunk {args.chunk}", flush=True)
    print("| N | path | RSS after build (GB) | peak RSS (GB) | eval increment (GB) | time (s) | loss |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for n in args.lengths:
        for chunk in (0, args.chunk):
            name = "full logits" if chunk == 0 else f"chunked ({chunk})"
            if chunk == 0 and full_logits_estimate(args, n) > args.max_gb * GB:
                print(f"| {n} | {name} | – | skipped (estimated {full_logits_estimate(args, n) / GB:.1f} GB "
                      f"> --max-gb {args.max_gb:g}) | – | – | – |", flush=True)
                continue
            r = run_one(args, n, chunk)
            rows[n, chunk] = r
            print(f"| {n} | {name} | {r['base_rss'] / GB:.2f} | {r['peak_rss'] / GB:.2f} | "
                  f"{(r['peak_rss'] - r['base_rss']) / GB:.2f} | {r['seconds']:.1f} | {r['loss']:.5f} |", flush=True)
    print("\nratios, full logits / chunked (same run):")
    for n in args.lengths:
        full, ch = rows.get((n, 0)), rows.get((n, args.chunk))
        if full and ch:
            inc = (full["peak_rss"] - full["base_rss"]) / max(1, ch["peak_rss"] - ch["base_rss"])
            print(f"  N={n}: peak RSS {full['peak_rss'] / ch['peak_rss']:.2f}x, eval increment {inc:.1f}x, "
                  f"time {full['seconds'] / ch['seconds']:.2f}x, |loss diff| {abs(full['loss'] - ch['loss']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
