#!/usr/bin/env python
"""Benchmark S²-Attn (sdpa backend) against full causal SDPA, forward + backward, on this machine.

Sections (run with ``--sections``; each returns a JSON-able dict and may add a plot):

    attention    fwd+bwd seconds of full causal SDPA and S²-Attn at each N and dtype, G = N/4,
                 the speedup beside the ideal N/G (and the exact causal-pair ratio)
    diagnostics  why the speedup is what it is: does the CPU kernel skip masked blocks for
                 is_causal, kernel cost per attended pair vs sequence length, megalong's overhead
                 over the bare kernel calls, enable_gqa vs expanded kv, token-major vs contiguous

To add a section (e.g. the engine's training-step memory vs N), write ``def my_section(args) ->
dict``, register it in ``SECTIONS`` and, optionally, a plot function in ``PLOTS``.

Timings: ``--repeats`` interleaved runs (full, S²-Attn, full, …) after one warm-up. The speedup
is the median over adjacent (full, S²-Attn) pairs of full/S², because the shared host's speed
drifts by tens of percent over minutes and a pair sees the same speed; seconds are minima. Each
run starts only once other processes use < 10% of the CPUs (waiting up to 2 min), and the share
others took during the fastest run is recorded ("contention"). Run it alone:
``flock /tmp/megalong_bench.lock python tools/bench_attention.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from megalong.attention import s2_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RATIO = 4  # G = N / RATIO (LongLoRA's default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=["attention", "diagnostics"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--heads", type=int, default=8, help="query heads H (kv heads = H)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument("--diag-length", type=int, default=8192, help="N for the diagnostics section")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--plot-from", type=Path, default=None, help="only redraw the plots from this results JSON"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def make_qkv(batch: int, heads: int, kv_heads: int, n: int, dim: int, dtype: torch.dtype, token_major=True):
    """Random leaf q, k, v (B, h, N, D); token-major memory as transformers hands them over."""
    gen = torch.Generator().manual_seed(0)

    def one(h: int) -> torch.Tensor:
        shape = (batch, n, h, dim) if token_major else (batch, h, n, dim)
        x = torch.randn(shape, generator=gen).to(dtype)
        return (x.transpose(1, 2) if token_major else x).requires_grad_(True)

    return one(heads), one(kv_heads), one(kv_heads)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def wait_for_quiet(max_wait: float = 120.0, threshold: float = 0.1, window: float = 0.5) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the CPUs.

    Returns the last measured share of the machine used by others (0 when unmeasurable).
    """
    share, deadline = 0.0, time.monotonic() + max_wait
    while True:
        busy0, own0, t0 = _machine_busy_seconds(), time.process_time(), time.monotonic()
        if busy0 is None:
            return 0.0
        time.sleep(window)
        busy1, own1, t1 = _machine_busy_seconds(), time.process_time(), time.monotonic()
        share = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() > deadline:
            return share


def fwd_bwd(fn: Callable[[], list[torch.Tensor]], leaves: list[torch.Tensor]) -> tuple[float, float]:
    """One forward + backward (grad of the sum of the outputs): (wall seconds, share of the
    machine's CPUs that other processes used meanwhile)."""
    for x in leaves:
        x.grad = None
    busy0, own0 = _machine_busy_seconds(), time.process_time()
    start = time.perf_counter()
    outs = fn()
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    wall = time.perf_counter() - start
    busy1, own1 = _machine_busy_seconds(), time.process_time()
    if busy0 is None:
        return wall, 0.0
    others = max(0.0, (busy1 - busy0) - (own1 - own0))
    return wall, others / (wall * (os.cpu_count() or 1))


def compare(cases: dict[str, tuple[Callable, list[torch.Tensor]]], repeats: int) -> dict[str, dict]:
    """Interleaved timing of several cases after one warm-up each, each run started in a quiet
    moment: {name: {"min": s, "median": s, "contention": share of CPUs others used in the
    fastest run}}."""
    for fn, leaves in cases.values():
        fwd_bwd(fn, leaves)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, leaves) in cases.items():
            wait_for_quiet()
            runs[name].append(fwd_bwd(fn, leaves))
    out = {}
    for name, r in runs.items():
        best = min(r)
        walls = [w for w, _ in r]
        out[name] = {"min": best[0], "median": statistics.median(walls), "contention": best[1], "runs": walls}
    return out


def full_causal(q, k, v) -> list[torch.Tensor]:
    gqa = q.shape[1] != k.shape[1]
    return [F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)]


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def s2_pairs(n: int, g: int) -> int:
    """Attended (query, key) pairs per head, averaged over the two halves."""
    unshifted = (n // g) * causal_pairs(g) + causal_pairs(n % g)
    head = min(g // 2, n)
    rest = n - head
    shifted = causal_pairs(head) + (rest // g) * causal_pairs(g) + causal_pairs(rest % g)
    return (unshifted + shifted) // 2


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def attention_section(args: argparse.Namespace) -> dict:
    """Full causal SDPA vs S²-Attn (sdpa backend), fwd+bwd, G = N/4."""
    rows = []
    for n in args.lengths:
        for name in args.dtypes:
            g = n // RATIO
            q, k, v = make_qkv(args.batch, args.heads, args.heads, n, args.head_dim, DTYPES[name])
            leaves = [q, k, v]
            t = compare(
                {
                    "full": (lambda q=q, k=k, v=v: full_causal(q, k, v), leaves),
                    "s2": (lambda q=q, k=k, v=v, g=g: [s2_attention(q, k, v, g)], leaves),
                },
                args.repeats,
            )
            # Machine speed drifts (shared host): the ratio of each adjacent (full, S²) pair of
            # runs is robust to that; report their median, and the ratio of the minima beside it.
            ratios = [f / s for f, s in zip(t["full"]["runs"], t["s2"]["runs"])]
            speedup = statistics.median(ratios)
            row = dict(
                n=n,
                dtype=name,
                group_size=g,
                full_s=t["full"]["min"],
                s2_s=t["s2"]["min"],
                full_median_s=t["full"]["median"],
                s2_median_s=t["s2"]["median"],
                speedup=speedup,
                speedup_of_minima=t["full"]["min"] / t["s2"]["min"],
                pair_ratios=ratios,
                ideal=n / g,
                pair_ratio=causal_pairs(n) / s2_pairs(n, g),
                pct_of_ideal=100 * speedup / (n / g),
                contention=max(t["full"]["contention"], t["s2"]["contention"]),
            )
            rows.append(row)
            print(_format_row(row), flush=True)
    return {
        "config": dict(heads=args.heads, head_dim=args.head_dim, batch=args.batch, ratio=RATIO),
        "rows": rows,
    }


def _format_row(r: dict) -> str:
    return (
        f"N={r['n']:>6} {r['dtype']:>4} G={r['group_size']:>5}  full {r['full_s']:8.3f}s  "
        f"s2 {r['s2_s']:7.3f}s  speedup {r['speedup']:4.2f}x [minima {r['speedup_of_minima']:4.2f}x]  "
        f"(ideal {r['ideal']:.0f}x, "
        f"{r['pct_of_ideal']:5.1f}% of ideal; causal-pair ratio {r['pair_ratio']:.2f}x; "
        f"others used {100 * r['contention']:.0f}% CPU)"
    )


def _kernel_only_cases(q, k, v, g: int) -> Callable[[], list[torch.Tensor]]:
    """The same SDPA calls S²-Attn makes for N % G == 0, on pre-grouped contiguous tensors."""
    b, h, n, d = q.shape
    dtype = q.dtype

    def leaf(batch: int, length: int) -> list[torch.Tensor]:
        return [torch.randn(batch, h // 2, length, d, dtype=dtype, requires_grad=True) for _ in range(3)]

    groups0, groups1 = leaf(b * (n // g), g), leaf(b * (n // g - 1), g)
    head, tail = leaf(b, g // 2), leaf(b, g // 2)
    parts = [groups0, groups1, head, tail]

    def run() -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(*p, is_causal=True) for p in parts]

    return run, [x for p in parts for x in p]


def diagnostics_section(args: argparse.Namespace) -> dict:
    """Measurements that explain the attention section's speedups."""
    n, name = args.diag_length, args.dtypes[0]
    dtype, d, h, g = DTYPES[name], args.head_dim, args.heads, args.diag_length // RATIO
    out: dict = {"n": n, "dtype": name}

    q, k, v = make_qkv(1, h, h, n, d, dtype)
    t = compare(
        {
            "causal": (lambda: full_causal(q, k, v), [q, k, v]),
            "non_causal": (lambda: [F.scaled_dot_product_attention(q, k, v)], [q, k, v]),
        },
        args.repeats,
    )
    out["causal_over_non_causal"] = t["causal"]["min"] / t["non_causal"]["min"]
    print(
        f"[diag] full SDPA causal / non-causal time at N={n}: {out['causal_over_non_causal']:.2f} (0.5 = skips)"
    )

    per_pair = {}
    for length in sorted({n // 8, n // 4, n // 2, n}):
        qq, kk, vv = (
            torch.randn(n // length, h, length, d, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        secs = compare(
            {"x": (lambda qq=qq, kk=kk, vv=vv: full_causal(qq, kk, vv), [qq, kk, vv])}, args.repeats
        )
        per_pair[length] = secs["x"]["min"] * 1e9 / ((n // length) * h * causal_pairs(length))
        print(f"[diag] causal SDPA fwd+bwd cost per attended pair, L={length:>6}: {per_pair[length]:.2f} ns")
    out["ns_per_pair_by_length"] = per_pair
    # Unshifted half: N/G groups of G; shifted half: N/G - 1 groups of G and two half-groups.
    groups = (2 * (n // g) - 1) * causal_pairs(g) * per_pair[g]
    edges = 2 * causal_pairs(g // 2) * per_pair[n // 8]
    modelled = (h // 2) * (groups + edges)
    out["kernel_bound_speedup"] = h * causal_pairs(n) * per_pair[n] / modelled
    print(f"[diag] speedup the kernel allows (per-pair costs above): {out['kernel_bound_speedup']:.2f}x")

    kernel_fn, kernel_leaves = _kernel_only_cases(q, k, v, g)
    t = compare(
        {
            "s2": (lambda: [s2_attention(q, k, v, g)], [q, k, v]),
            "kernel_only": (kernel_fn, kernel_leaves),
        },
        args.repeats,
    )
    out["s2_over_kernel_only"] = t["s2"]["min"] / t["kernel_only"]["min"]
    print(
        f"[diag] megalong S²-Attn / bare kernel calls: {out['s2_over_kernel_only']:.3f} (1.0 = no overhead)"
    )

    qc, kc, vc = make_qkv(1, h, h, n, d, dtype, token_major=False)
    t = compare(
        {
            "token_major": (lambda: [s2_attention(q, k, v, g)], [q, k, v]),
            "contiguous": (lambda: [s2_attention(qc, kc, vc, g)], [qc, kc, vc]),
        },
        args.repeats,
    )
    out["contiguous_over_token_major"] = t["contiguous"]["min"] / t["token_major"]["min"]
    print(
        f"[diag] S²-Attn contiguous (B,H,N,D) / token-major inputs: {out['contiguous_over_token_major']:.3f}"
    )

    qg, kg, vg = make_qkv(1, h, 2, n, d, dtype)

    def expanded() -> list[torch.Tensor]:
        rep = h // 2
        return [s2_attention(qg, kg.repeat_interleave(rep, 1), vg.repeat_interleave(rep, 1), g)]

    def full_expanded() -> list[torch.Tensor]:
        rep = h // 2
        return full_causal(qg, kg.repeat_interleave(rep, 1), vg.repeat_interleave(rep, 1))

    leaves = [qg, kg, vg]
    t = compare(
        {
            "s2_gqa": (lambda: [s2_attention(qg, kg, vg, g)], leaves),
            "s2_expand": (expanded, leaves),
            "full_gqa": (lambda: full_causal(qg, kg, vg), leaves),
            "full_expand": (full_expanded, leaves),
        },
        args.repeats,
    )
    out["gqa_h_kv"] = 2
    out["s2_enable_gqa_over_expand"] = t["s2_gqa"]["min"] / t["s2_expand"]["min"]
    out["full_enable_gqa_over_expand"] = t["full_gqa"]["min"] / t["full_expand"]["min"]
    print(
        f"[diag] enable_gqa / expanded kv (H_kv=2): S²-Attn {out['s2_enable_gqa_over_expand']:.3f}, "
        f"full {out['full_enable_gqa_over_expand']:.3f}"
    )
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "attention": attention_section,
    "diagnostics": diagnostics_section,
}


def plot_attention(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["dtype"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["dtype"] == name]
        speed = [r["speedup"] for r in rows]
        spread = [  # min..max of the per-pair ratios, to show the machine's noise
            [s - min(r.get("pair_ratios", [s])) for s, r in zip(speed, rows)],
            [max(r.get("pair_ratios", [s])) - s for s, r in zip(speed, rows)],
        ]
        ax.errorbar(
            [r["n"] for r in rows],
            speed,
            yerr=spread,
            marker="o",
            capsize=3,
            label=f"S²-Attn {name} (median, min–max)",
        )
    ns = sorted({r["n"] for r in result["rows"]})
    ax.axhline(RATIO, color="gray", linestyle="--", label=f"ideal N/G = {RATIO}x")
    ax.axhline(0.85 * RATIO, color="gray", linestyle=":", label="85% of ideal")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [f"{n // 1024}k" for n in ns])
    ax.set_xlabel("sequence length N (G = N/4)")
    ax.set_ylabel("speedup over full causal SDPA (fwd+bwd)")
    ax.set_ylim(0, RATIO + 1.5)
    ax.legend(loc="lower right")
    ax.set_title("S²-Attn vs full attention, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS: dict[str, Callable[[dict, Path], None]] = {"attention": plot_attention}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
        python=platform.python_version(),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {sorted(SECTIONS)}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot_from is not None:
        saved = json.loads(args.plot_from.read_text())
        for section, plot in PLOTS.items():
            if section in saved:
                plot(saved[section], args.out_dir / f"{section}.png")
        return 0
    report = {"machine": machine_info(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(json.dumps(report["machine"]))
    for section in args.sections:
        print(f"== {section} ==", flush=True)
        report[section] = SECTIONS[section](args)
        if section in PLOTS and not args.no_plot:
            path = args.out_dir / f"{section}.png"
            PLOTS[section](report[section], path)
            print(f"plot: {path}")
    out = args.out_dir / "bench_attention.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
