#!/usr/bin/env python
"""The longest context that trains on one 8-GPU node, by the memory planner, and what binds there.

    python tools/max_context.py                 # the markdown tables of docs/BENCHMARKS.md
    python tools/max_context.py --json out.json # every cell: N, the plan at N, what fails at N + step

For each model (Llama-2-7B/13B/70B, Llama-3-8B), node (8×A100-80G, 8×H100-80G), sequence-parallel
layout (LongLoRA's sp=1 — one row per GPU, dp=8 —, s2_halo sp=8, ulysses sp=8) and ALST feature set
(none; tiled MLP; tiled MLP + activation offload as DeepSpeed 0.19.8 runs it, whose restored inputs stay
on the GPU until the backward ends; offload with and without tiling as it would be if each restored
input were freed after its layer — ``MemoryInputs.offload_keeps_restored``; and tiling with DeepSpeed's
own activation checkpointing and ``cpu_checkpointing``, whose restore frees), a binary search over N (multiples of sp, so every rank
holds N/sp tokens; S²-Attn's G = N/4 rounded down to even needs nothing more) finds the largest N whose
plan fits both the GPUs and the host (``megalong.utils.memory.estimate_memory``). The run is what
megalong trains: LoRA+ (r=8 on q, k, v, o, embeddings and norms trained), S²-Attn, flash kernels,
bf16, ZeRO-3 with zero.Init, per-layer activation checkpointing, micro-batch 1, chunked loss.
Model-state offload is chosen per model, not per cell: optimizer (then parameter) offload is used
when, in LongLoRA's layout without ALST features on the A100 node, it raises the longest N by more
than ``--offload-gain`` (10 %); the table says which.

"Binds" names, at N + step (the first length that does not fit), the side that overflows (GPU or
host) and its largest term with its share of that side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalong.utils.memory import GiB, MemoryEstimate, MemoryInputs, ModelShape, estimate_memory  # noqa: E402

MODELS = {"Llama-2-7B": "llama2-7b", "Llama-2-13B": "llama2-13b", "Llama-2-70B": "llama2-70b",
          "Llama-3-8B": "llama3-8b"}
# (GPU memory GiB as the driver reports it: 81920 MiB / 81559 MiB; host memory per node GiB: a common
# 8×A100 server's 1 TiB, a DGX H100's 2 TiB)
NODES = {"8×A100-80G": (80.0, 1024.0), "8×H100-80G": (79.65, 2048.0)}
LAYOUTS = [("s2_halo", 1), ("s2_halo", 8), ("ulysses", 8)]
# (tiled MLP, activation offload, offloaded inputs stay cached on the GPU once restored as DeepSpeed 0.19.8 does,
#  DeepSpeed's own checkpointing with cpu_checkpointing: its restore does not cache)
FEATURES = {"none": (False, False, True, False), "tiled MLP": (True, False, True, False),
            "tiled + offload (DS 0.19.8)": (True, True, True, False),
            "offload, restored freed": (False, True, False, False),
            "tiled + offload, restored freed": (True, True, False, False),
            "tiled + cpu_checkpointing": (True, False, True, True)}
OFFLOADS = [("none", {}), ("optimizer", {"offload_optimizer": True}),
            ("optimizer + params", {"offload_optimizer": True, "offload_param": True})]
SHORT = {"activations: checkpoints": "checkpoints", "activations: layers": "recomputed layer",
         "activations: other": "other activations", "backward temporaries": "backward temporaries",
         "attention workspace": "attention workspace", "logits/loss": "loss", "weights": "weights",
         "gathered params (ZeRO-3)": "gathered params", "framework overhead": "overhead"}
CAP = 1 << 27  # 134M tokens: no search goes past this


def base_inputs(model: str, node: str, sp_mode: str = "s2_halo", sp: int = 1, tiled: bool = False,
                offload_acts: bool = False, keeps_restored: bool = True, cpu_ckpt: bool = False, lora: bool = True,
                **over) -> MemoryInputs:
    """The planner's inputs of one cell at a placeholder length (the search replaces seq_len)."""
    gpu_gb, host_gb = NODES[node]
    shape = ModelShape.known(model)
    i = MemoryInputs(shape, seq_len=sp, gpus_per_node=8, sp=sp, sp_mode=sp_mode, zero_stage=3,
                     activation_checkpointing="layer", offload_activations=offload_acts, tiled_mlp=tiled,
                     offload_keeps_restored=keeps_restored, cpu_checkpointing=cpu_ckpt,
                     attention="s2", attention_kernel="flash", dtype="bf16", lora=lora,
                     gpu_memory_gb=gpu_gb, host_memory_gb=host_gb, **over)
    return replace(i, counts=i.param_counts())  # count once: the search evaluates many lengths


def fits(base: MemoryInputs, n: int) -> bool:
    return estimate_memory(replace(base, seq_len=n)).fits


def search(base: MemoryInputs, step: int | None = None, cap: int = CAP) -> int | None:
    """Largest N (a multiple of ``step``, default sp) whose plan fits; None if not even ``step`` fits.

    Binary search over k in N = k·step, between the last fitting and the first failing doubling.
    """
    step = step or base.sp
    if not fits(base, step):
        return None
    lo, hi = 1, 2
    while hi * step <= cap and fits(base, hi * step):
        lo, hi = hi, hi * 2
    if hi * step > cap:
        return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(base, mid * step) else (lo, mid)
    return lo * step


def binding(est: MemoryEstimate) -> str:
    """Which side overflows in ``est`` (a plan that does not fit) and its largest term."""
    i = est.inputs
    if not est.fits_gpu:
        terms = [t for t in est.terms if t.at_peak and t.gpu > 0]
        top = max(terms, key=lambda t: t.gpu)
        return f"GPU: {SHORT.get(top.name, top.name)} ({top.gpu / est.gpu_peak:.0%})"
    if est.host_load_peak > est.host_per_node:
        return "host: model load"
    top = max(est.terms, key=lambda t: t.host)
    share = top.host * i.gpus_per_node / est.host_per_node
    return f"host: {SHORT.get(top.name, top.name)} ({share:.0%})"


@dataclass
class Cell:
    model: str
    node: str
    layout: str
    features: str
    offload: str
    n: int | None
    gpu_gib: float | None
    host_gib: float | None
    binds: str


def model_offload(model: str, gain: float, lora: bool = True) -> tuple[str, dict]:
    """Model-state offload for a model: the next level only when it raises LongLoRA's layout's N > gain."""
    node = next(iter(NODES))
    chosen, best = OFFLOADS[0], search(base_inputs(model, node, lora=lora)) or 0
    for name, over in OFFLOADS[1:]:
        n = search(base_inputs(model, node, lora=lora, **over)) or 0
        if n > best * (1 + gain):
            chosen, best = (name, over), n
    return chosen


def run_cell(model: str, node: str, sp_mode: str, sp: int, features: str, offload: tuple[str, dict],
             lora: bool = True) -> Cell:
    base = base_inputs(MODELS.get(model, model), node, sp_mode, sp, *FEATURES[features], lora=lora, **offload[1])
    n = search(base)
    layout = "LongLoRA (sp=1)" if sp == 1 else f"{sp_mode} sp={sp}"
    if n is None:
        return Cell(model, node, layout, features, offload[0], None, None, None, binding(
            estimate_memory(replace(base, seq_len=sp))))
    at, over = estimate_memory(replace(base, seq_len=n)), estimate_memory(replace(base, seq_len=n + sp))
    return Cell(model, node, layout, features, offload[0], n, at.gpu_peak / GiB,
                max(at.host_per_node, at.host_load_peak) / GiB, binding(over))


def _n(n: int | None) -> str:
    if n is None:
        return "does not fit"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def table(cells: list[Cell]) -> str:
    """Rows model × node × layout, one column per feature set: 'N — what binds'."""
    cols = list(FEATURES)
    lines = ["| model | node | layout | model-state offload | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    rows: dict[tuple, dict[str, Cell]] = {}
    for c in cells:
        rows.setdefault((c.model, c.node, c.layout, c.offload), {})[c.features] = c
    for (model, node, layout, offload), by in rows.items():
        lines.append(f"| {model} | {node} | {layout} | {offload} | " + " | ".join(
            f"**{_n(by[f].n)}** — {by[f].binds}" for f in cols) + " |")
    return "\n".join(lines)


REFERENCES = [  # (source, model, node, sp_mode, sp, features, LoRA+, published length)
    ("LongLoRA", "Llama-2-7B", "8×A100-80G", "s2_halo", 1, "none", True, 100_000),
    ("LongLoRA", "Llama-2-13B", "8×A100-80G", "s2_halo", 1, "none", True, 65_536),
    ("LongLoRA", "Llama-2-70B", "8×A100-80G", "s2_halo", 1, "none", True, 32_768),
    ("ALST", "Llama-3-8B", "8×H100-80G", "ulysses", 8, "tiled + offload (DS 0.19.8)", True, 3_700_000),
    ("ALST", "Llama-3-8B", "8×H100-80G", "ulysses", 8, "tiled + offload, restored freed", True, 3_700_000),
    ("ALST", "Llama-3-8B", "8×H100-80G", "ulysses", 8, "tiled + offload, restored freed", False, 3_700_000),
    ("ALST", "Llama-3-8B", "8×H100-80G", "ulysses", 8, "tiled + cpu_checkpointing", True, 3_700_000),
]


def references(gain: float) -> tuple[str, list[dict]]:
    lines = ["| reference | model | node | megalong layout | trains | published N | planner: longest N | "
             "planner at the published N: GPU GiB, host GiB/node | binds at the planner's limit | "
             "longest N without the 10 % fragmentation allowance | longest N with an unchunked loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for src, model, node, mode, sp, feats, lora, pub in REFERENCES:
        off = model_offload(MODELS[model], gain, lora)
        cell = run_cell(model, node, mode, sp, feats, off, lora=lora)
        base = base_inputs(MODELS[model], node, mode, sp, *FEATURES[feats], lora=lora, **off[1])
        at = estimate_memory(replace(base, seq_len=pub - pub % sp))
        # the planner's allowances that no measurement has fixed on a GPU: 10 % fragmentation
        lean = search(replace(base, fragmentation=0.0))
        unchunked = search(replace(base, loss_chunk=CAP))  # one N-token loss chunk: N x V logits at once
        trains = ("LoRA+" if lora else "all weights") + ("" if off[0] == "none" else f", {off[0]} offload")
        layout = f"{mode} sp={sp}" + ("" if feats == "none" else f", {feats}")
        lines.append(f"| {src} | {model} | {node} | {layout} | {trains} | {pub:,} | {cell.n:,} | "
                     f"{at.gpu_peak / GiB:.1f}, {max(at.host_per_node, at.host_load_peak) / GiB:.0f} "
                     f"({'fits' if at.fits else 'does not fit'}) | {cell.binds} | {lean:,} | {unchunked:,} |")
        out.append({"source": src, "model": model, "node": node, "layout": layout, "trains": trains,
                    "published": pub, "planner_max": cell.n, "gpu_gib_at_published": round(at.gpu_peak / GiB, 2),
                    "host_gib_at_published": round(at.host_per_node / GiB, 1), "fits_at_published": at.fits,
                    "binds": cell.binds, "planner_max_no_fragmentation": lean, "planner_max_unchunked_loss": unchunked})
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--offload-gain", type=float, default=0.10,
                   help="use model-state offload when it lengthens LongLoRA's layout's N by more than this")
    p.add_argument("--json", help="write every cell here")
    args = p.parse_args(argv)
    cells = []
    for model in args.models:
        off = model_offload(MODELS[model], args.offload_gain)
        for node in NODES:
            for mode, sp in LAYOUTS:
                for feats in FEATURES:
                    cells.append(run_cell(model, node, mode, sp, feats, off))
    print(table(cells))
    ref_table, refs = references(args.offload_gain)
    print()
    print(ref_table)
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": [c.__dict__ for c in cells], "references": refs},
                                              indent=1, default=lambda x: round(x, 2) if isinstance(x, float)
                                              and math.isfinite(x) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
