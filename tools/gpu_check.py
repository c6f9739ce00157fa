#!/usr/bin/env python
"""GPU checks for megalong attention: parity of the fast backends with the reference, and speed.

Run through ``tools/gpu_check.sh`` on a CUDA machine (designed for < 5 minutes on one H100/H200):

    1. environment   torch / CUDA / device, and whether flash-attn imports (flash parts are
                     skipped, with a message, when it does not)
    2. parity        sdpa and flash backends vs the fp32 dense reference, bf16 inputs, outputs
                     and q/k/v gradients; awkward sizes, partial groups, N < G, segments,
                     left/right padding, GQA / MQA, odd H; full attention incl. a KV cache
    3. causality     perturbing tokens after position i never changes outputs at or before i
    4. speed         fwd+bwd of S²-Attn (sdpa, flash) vs full causal attention at 16k–64k, G = N/4
    5. train step    ``training_step_check``: a short bf16 LongLoRA run through the real entry point
                     (``--train-step``)

Results: a compact table on stdout; with ``$OUT`` set, ``$OUT/gpu_check.json`` and
``$OUT/gpu_check.txt``. ``--device cpu --quick`` smoke-tests the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from megalong.attention import combine_segments_and_padding, full_attention, s2_attention  # noqa: E402

# (name, B, H, H_kv, N, G, D, documents)
PARITY_CASES = [
    ("odd N, partial groups", 2, 8, 8, 1001, 256, 64, None),
    ("GQA 4:1, G does not divide N", 2, 32, 8, 1500, 512, 128, None),
    ("MQA", 1, 8, 1, 777, 128, 64, None),
    ("H=12 H_kv=3 (uneven halves)", 1, 12, 3, 640, 128, 64, None),
    ("N < G", 2, 8, 2, 100, 256, 64, None),
    ("odd H", 1, 5, 5, 333, 64, 64, None),
    ("packed documents", 2, 16, 4, 1024, 256, 128, "segments"),
    ("left + right padding", 3, 8, 2, 700, 128, 64, "padding"),
]
QUICK_CASES = [c for c in PARITY_CASES if c[4] <= 1024]
REL_TOL = 2e-2  # relative L2 error vs the fp32 reference; bf16 itself is ~4e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small parity cases, small lengths")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--train-step", action="store_true", help="run training_step_check (engine hook)")
    return parser.parse_args(argv)


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "device": device, "cuda": torch.version.cuda}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        import flash_attn

        env["flash_attn"] = flash_attn.__version__
    except ImportError as err:
        env["flash_attn"] = None
        env["flash_attn_error"] = str(err)
    return env


def _documents(kind: str | None, b: int, n: int, device: str) -> torch.Tensor | None:
    """Packed documents (one shorter than G/2, others crossing group boundaries) or padding."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(7)
    if kind == "segments":
        rows = []
        for _ in range(b):
            cuts = sorted(torch.randint(1, n, (5,), generator=gen).tolist() + [n // 2, n // 2 + 20])
            ids = torch.zeros(n, dtype=torch.long)
            for c in cuts:
                ids[c:] += 1
            rows.append(ids)
        return torch.stack(rows).to(device)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, : n // 3] = 0  # left padding
    if b > 1:
        mask[1, n - n // 4 :] = 0  # right padding
    return combine_segments_and_padding(None, mask).to(device)


def _qkv(b, h, hk, n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def one(heads):  # token-major memory, as transformers hands them over
        x = torch.randn(b, n, heads, d, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        return x.requires_grad_(True)

    return one(h), one(hk), one(hk)


def _out_and_grads(fn: Callable, q, k, v) -> list[torch.Tensor]:
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


def _rel_err(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.detach().float() - r.detach()).norm() / r.detach().norm().clamp_min(1e-12))


def _compare(name: str, backend: str, fast_fn: Callable, ref_fn: Callable, q, k, v) -> dict:
    fast = _out_and_grads(fast_fn, q, k, v)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = _out_and_grads(ref_fn, q32, k32, v32)
    errs = {key: _rel_err(a, r) for key, a, r in zip(("out", "dq", "dk", "dv"), fast, ref)}
    finite = all(bool(torch.isfinite(a).all()) for a in fast)
    ok = finite and max(errs.values()) < REL_TOL
    return {"check": name, "backend": backend, "ok": ok, "finite": finite, **errs}


def parity(backends: list[str], device: str, quick: bool) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for name, b, h, hk, n, g, d, kind in QUICK_CASES if quick else PARITY_CASES:
        docs = _documents(kind, b, n, device)
        q, k, v = _qkv(b, h, hk, n, d, dtype, device)
        for backend in backends:
            rows.append(
                _compare(
                    f"s2: {name} (B{b} H{h}/{hk} N{n} G{g} D{d})",
                    backend,
                    lambda q, k, v, be=backend, g=g, docs=docs: s2_attention(
                        q, k, v, g, backend=be, segment_ids=docs
                    ),
                    lambda q, k, v, g=g, docs=docs: s2_attention(
                        q, k, v, g, backend="reference", segment_ids=docs
                    ),
                    q,
                    k,
                    v,
                )
            )
    for kind, q_len in ((None, None), ("segments", None), (None, 1), ("segments", 17)):
        b, h, hk, n, d = 2, 16, 4, 900, 128
        docs = _documents(kind, b, n, device)
        q, k, v = _qkv(b, h, hk, n, d, dtype, device, seed=3)
        if q_len is not None:
            q = q.detach()[:, :, -q_len:].requires_grad_(True)
        label = f"full: {'documents' if kind else 'causal'}{f', KV cache q={q_len}' if q_len else ''}"
        for backend in backends:
            rows.append(
                _compare(
                    label,
                    backend,
                    lambda q, k, v, be=backend, docs=docs: full_attention(
                        q, k, v, backend=be, segment_ids=docs
                    ),
                    lambda q, k, v, docs=docs: full_attention(q, k, v, backend="reference", segment_ids=docs),
                    q,
                    k,
                    v,
                )
            )
    return rows


def causality(backends: list[str], device: str) -> list[dict]:
    rows = []
    n, g = 777, 128
    q, k, v = (x.detach() for x in _qkv(2, 8, 2, n, 64, torch.bfloat16, device))
    for backend in backends:
        base = s2_attention(q, k, v, g, backend=backend)
        worst = 0.0
        for i in (0, 5, g // 2 - 1, g // 2, g, 400, n - 2):
            q2, k2, v2 = (x.clone() for x in (q, k, v))
            for x in (q2, k2, v2):
                x[:, :, i + 1 :] = torch.randn_like(x[:, :, i + 1 :]) * 10
            out = s2_attention(q2, k2, v2, g, backend=backend)
            worst = max(worst, float((out[:, :, : i + 1] - base[:, :, : i + 1]).abs().max()))
        rows.append(
            {"check": "causality probe (first group included)", "backend": backend, "ok": worst < 1e-3}
        )
        rows[-1]["max_change"] = worst
    return rows


def _time(fn: Callable, leaves: list[torch.Tensor], repeats: int, device: str) -> tuple[float, float]:
    """Median fwd+bwd seconds and peak memory (GiB) over ``repeats`` runs after two warm-ups."""
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 2):
        for x in leaves:
            x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        out.backward(torch.ones_like(out))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def speed(backends: list[str], args: argparse.Namespace, flash_ok: bool) -> list[dict]:
    rows = []
    lengths = [2048, 4096] if args.quick else args.lengths
    for n in lengths:
        g = n // 4
        q, k, v = _qkv(1, args.heads, args.kv_heads, n, args.head_dim, torch.bfloat16, args.device)
        leaves = [q, k, v]
        cases = {
            "full sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
        }
        if flash_ok:
            cases["full flash"] = lambda q=q, k=k, v=v: full_attention(q, k, v, backend="flash")
        for backend in backends:
            cases[f"s2 {backend}"] = lambda q=q, k=k, v=v, g=g, be=backend: s2_attention(
                q, k, v, g, backend=be
            )
        timings = {name: _time(fn, leaves, args.repeats, args.device) for name, fn in cases.items()}
        base = timings["full flash" if flash_ok else "full sdpa"][0]
        for name, (secs, peak) in timings.items():
            rows.append(
                {"n": n, "case": name, "seconds": secs, "speedup_vs_full": base / secs, "peak_gib": peak}
            )
    return rows


def training_step_check(args: argparse.Namespace) -> dict:
    """A short bf16 LongLoRA training run on this device through the real entry point.

    A ~40M-parameter Llama (hidden 512, 8 layers, GQA 8:2) built from a config, the embedded corpus
    and tokenizer, S²-Attn (flash if it imports, else sdpa) + LoRA+ + PI, ZeRO-3, one rank, bf16,
    N = 16384 (512 with --device cpu), 6 optimizer steps, then a checkpoint. Passes when every loss is
    finite, the loss falls from the first step to the last, and the checkpoint is complete.
    """
    import tempfile

    from megalong.engine import checkpoint as ckpt
    from tests.assets import build_assets, read_logs, run_ranks, tiny_run_config

    on_gpu = args.device.startswith("cuda") and torch.cuda.is_available()
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    backend = "sdpa"
    if on_gpu:
        try:
            import flash_attn  # noqa: F401

            backend = "flash"
        except ImportError:
            pass
    n = 16384 if on_gpu else 512
    root = Path(__file__).resolve().parents[1] / ".cache"
    root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        assets = build_assets(Path(tmp) / "assets", max_mb=2.0, vocab_size=4096)
        model = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1408,
                 "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
                 "max_position_embeddings": n // 4, "tie_word_embeddings": False}
        run = Path(tmp) / "run"
        cfg = tiny_run_config(
            assets, run, model={"tokenizer": assets["tokenizer"], "init_config": model},
            attention={"train": "s2", "group_size": n // 4, "backend": backend},
            data={"max_seq_len": n}, zero={"stage": 3},
            train={"dtype": "bf16", "max_steps": 6, "micro_batch_size": 1, "lr": 2e-3, "warmup_steps": 1},
            checkpoint={"save_interval": 0, "save_at_end": True},
        )
        t0 = time.perf_counter()
        try:
            run_ranks(cfg, 1, Path(tmp) / "logs", timeout=420)
        except AssertionError as e:
            return {"check": "train step", "ok": False, "backend": backend, "error": str(e)[-2000:]}
        seconds = time.perf_counter() - t0
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs]
        complete = ckpt.read_meta(run / "checkpoints", "step_00000006") is not None
        ok = all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0] and complete
        return {
            "check": "train step", "ok": bool(ok), "backend": backend, "seq_len": n, "dtype": "bf16",
            "losses": [round(x, 4) for x in losses], "tokens_per_s": round(recs[-1]["tokens_per_s"]),
            "mem_gb": recs[-1]["mem_gb"], "mfu": recs[-1]["mfu"], "checkpoint_complete": complete,
            "seconds_total": round(seconds, 1), "log_tail": "" if ok else read_logs(Path(tmp) / "logs")[-1500:],
        }


def format_tables(report: dict) -> str:
    lines = [
        f"environment: {json.dumps(report['environment'])}",
        "",
        "parity / causality (relative L2 error):",
    ]
    for r in report.get("parity", []) + report.get("causality", []):
        errs = " ".join(f"{k}={r[k]:.1e}" for k in ("out", "dq", "dk", "dv") if k in r)
        extra = f"max_change={r['max_change']:.1e}" if "max_change" in r else errs
        lines.append(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['backend']:<9} {r['check']:<62} {extra}")
    if report.get("speed"):
        lines += [
            "",
            "speed (bf16 fwd+bwd, median):",
            f"  {'N':>7} {'case':<11} {'seconds':>9} {'x full':>7} {'GiB':>6}",
        ]
        for r in report["speed"]:
            lines.append(
                f"  {r['n']:>7} {r['case']:<11} {r['seconds']:9.4f} {r['speedup_vs_full']:7.2f} {r['peak_gib']:6.1f}"
            )
    if "train_step" in report:
        lines += ["", f"train step: {json.dumps(report['train_step'])}"]
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to check here (use --device cpu for a smoke test)")
        return 0
    report: dict = {"environment": environment(args.device), "notes": []}
    flash_ok = args.device == "cuda" and report["environment"]["flash_attn"] is not None
    backends = ["sdpa"] + (["flash"] if flash_ok else [])
    if not flash_ok:
        report["notes"].append("flash-attn not importable on this machine: flash checks skipped")
    start = time.perf_counter()
    report["parity"] = parity(backends, args.device, args.quick)
    report["causality"] = causality(backends, args.device)
    if not args.skip_speed:
        report["speed"] = speed(backends, args, flash_ok)
    if args.train_step:
        report["train_step"] = training_step_check(args)
    report["seconds"] = time.perf_counter() - start
    text = format_tables(report)
    print(text)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(out_dir, "gpu_check.txt").write_text(text + "\n")
    failed = [r for r in report["parity"] + report["causality"] if r["ok"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
