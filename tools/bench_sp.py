#!/usr/bin/env python
"""Sequence-parallel S²-Attn on CPU, both modes: bytes per layer (counted by the exchange), attention time
per layer at sp = 1, 2, 4, and a training step's peak memory per rank at sp = 1 and 2.

    flock /tmp/megalong_bench.lock python tools/bench_sp.py [--quick] [--markdown] [--json OUT]

1. Bytes: one attention layer's forward + backward on P gloo ranks; every rank's HaloStats counts the
   bytes it sent. Beside it: the design's N·H_kv·D/8 elements per rank boundary (K and V of the shifted
   half's kv heads, G/2 tokens, G = N/4) and Ulysses' all-to-all 4·L·H·D·(P−1)/P elements per rank
   (q, k, v, out with H_kv = H), for the same shapes; and the bytes Ulysses (parallel.sp_mode=ulysses,
   DeepSpeed's all-to-all) really sends, counted at DeepSpeed's all-to-all operator.
2. Time: wall time of that layer (median of repeats) per sp and mode; sp ranks share this machine's cores,
   so the figure is the cost of the exchange and the split, not a speed-up.
3. Memory: the real entry point (deepspeed launcher, DS_ACCELERATOR=cpu) trains 2 steps of a small
   Llama at one N with sp = 1 and sp = 2 (both modes); metrics.jsonl's per-rank peak RSS (mem_gb_ranks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ 1 + 2: attention layer
def _count_all_to_all(counter: dict) -> None:
    """Count the bytes this rank sends through DeepSpeed's Ulysses all-to-all (forward and backward)."""
    import deepspeed.sequence.layer as layer

    original = layer._dim_zero_all_to_all_op

    def counted(tensor, group_name):
        world = tensor.shape[0]  # dim 0 is the world: every slice but this rank's own leaves it
        counter["bytes"] += tensor.numel() * tensor.element_size() * (world - 1) // world
        return original(tensor, group_name)

    layer._dim_zero_all_to_all_op = counted


def attention_worker(shape: dict, repeats: int) -> None:
    """One rank: time fwd+bwd of the sequence-parallel attention layer; print bytes and times."""
    import torch
    import torch.distributed as dist

    from megalong.attention import s2_attention
    from megalong.parallel.dims import ParallelDims
    from megalong.parallel.s2_halo import HaloStats, build_context, halo_attention
    from megalong.parallel.ulysses import build_ulysses_context

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    mode = shape.get("mode", "s2_halo")
    counter = {"bytes": 0}
    if mode == "ulysses":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        _count_all_to_all(counter)
    world = dist.get_world_size()
    dims = ParallelDims(world=world, sp=world, rank=dist.get_rank()).build()
    b, h, hk, n, d, g = (shape[k] for k in ("b", "heads", "kv_heads", "seq_len", "head_dim", "group"))
    gen = torch.Generator().manual_seed(0)
    length = n // world
    q, k, v = (torch.randn(b, x, length, d, generator=gen).requires_grad_(True) for x in (h, hk, hk))
    grad = torch.randn(b, h, length, d, generator=gen)
    times, stats = [], HaloStats()
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if world == 1:
            out = s2_attention(q, k, v, g)
        elif mode == "ulysses":
            counter["bytes"] = 0
            ctx = build_ulysses_context(torch.arange(n).expand(b, n), None, dims,
                                        slice(dims.rank * length, (dims.rank + 1) * length))
            out = ctx.attend(q, k, v, g, "sdpa", None)
        else:
            ctx = build_context(torch.arange(n).expand(b, n), None, dims, stats=stats if i == 0 else None)
            out = halo_attention(q, k, v, ctx, g, "sdpa", None)
        out.backward(grad)
        dist.barrier()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    res = {"rank": dims.rank, "fwd_bytes": stats.forward_bytes, "bwd_bytes": stats.backward_bytes,
           "all_to_all_bytes": counter["bytes"], "time_s": sorted(times)[len(times) // 2]}
    print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


def run_attention(shape: dict, sp: int, repeats: int) -> list[dict]:
    port = _free_port()
    procs = []
    for r in range(sp):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(sp), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // sp)))
        procs.append(subprocess.Popen([sys.executable, __file__, "--attention-worker", json.dumps(shape),
                                       "--repeats", str(repeats)], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(outs))
    return [json.loads(next(ln for ln in o.splitlines() if ln.startswith("RESULT "))[7:]) for o in outs]


def bytes_table(shape: dict, sp: int, ranks: list[dict], ulysses_ranks: list[dict] | None = None) -> dict:
    n, hk, h, d = shape["seq_len"], shape["kv_heads"], shape["heads"], shape["head_dim"]
    el = 4  # fp32 here; bf16 halves every figure
    length = n // sp
    halo_sent = max(r["fwd_bytes"] for r in ranks)
    formula = n * hk * d // 8 * el if shape["group"] == n // 4 else None
    ulysses = 4 * length * h * d * (sp - 1) // sp * el
    return {"sp": sp, "halo_bytes_per_rank": halo_sent, "halo_grad_bytes_per_rank": max(r["bwd_bytes"] for r in ranks),
            "formula_bytes": formula, "ulysses_bytes_per_rank": ulysses,
            "ratio_ulysses_to_halo": round(ulysses / halo_sent, 2) if halo_sent else None,
            "layer_fwd_bwd_s": round(max(r["time_s"] for r in ranks), 4),
            # counted at DeepSpeed's all-to-all, forward + backward (the formula above is forward only)
            "ulysses_counted_fwd_bwd_bytes_per_rank": max(r["all_to_all_bytes"] for r in ulysses_ranks) if ulysses_ranks
            else None,
            "ulysses_layer_fwd_bwd_s": round(max(r["time_s"] for r in ulysses_ranks), 4) if ulysses_ranks else None}


# ------------------------------------------------------------------------------ 3: training memory
def run_training(seq_len: int, sp: int, workdir: Path, mode: str = "s2_halo") -> dict:
    import yaml

    from tests.assets import build_assets, tiny_run_config

    assets_dir = workdir / "assets"
    assets = build_assets(assets_dir) if not (assets_dir / "data" / "train.idx").exists() else {
        "tokenizer": str(assets_dir / "tok" / "hf"), "train": str(assets_dir / "data" / "train"),
        "valid": str(assets_dir / "data" / "valid"), "vocab_size": 512, "spm": ""}
    run = workdir / f"run_n{seq_len}_sp{sp}_{mode}"
    cfg = tiny_run_config(assets, run, zero={"stage": 3}, parallel={"sp": sp, "sp_mode": mode},
                          data={"max_seq_len": seq_len, "valid_prefixes": []},
                          attention={"train": "s2", "group_size": seq_len // 4},
                          train={"max_steps": 2, "micro_batch_size": 1, "grad_accum": 1, "eval_interval": 0},
                          checkpoint={"save_interval": 0, "save_at_end": False})
    cfg["model"]["init_config"].update(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    path = workdir / f"recipe_n{seq_len}_sp{sp}_{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(sp), "--master_port",
           str(_free_port()), "launch/pretrain_extend.py", "--config", str(path)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-3000:])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    return {"seq_len": seq_len, "sp": sp, "mode": mode if sp > 1 else "-", "tokens_per_rank": seq_len // sp, "peak_rss_gb_per_rank": last["mem_gb_ranks"],
            "step_time_s": round(last["step_time_s"], 2), "loss": round(last["loss"], 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--attention-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.attention_worker:
        attention_worker(json.loads(args.attention_worker), args.repeats)
        return 0
    n = 4096 if args.quick else 16384
    shape = {"b": 1, "heads": 8, "kv_heads": 8, "seq_len": n, "head_dim": 64, "group": n // 4}
    def both(shp, sp, repeats):
        halo = run_attention(shp, sp, repeats)
        return bytes_table(shp, sp, halo, run_attention({**shp, "mode": "ulysses"}, sp, repeats) if sp > 1 else None)

    layer = [both(shape, sp, args.repeats) for sp in (1, 2, 4)]
    gqa = {**shape, "kv_heads": 2}
    layer_gqa = [both(gqa, sp, 1) for sp in (2, 4)]
    with tempfile.TemporaryDirectory() as tmp:
        train_n = 2048 if args.quick else 8192
        memory = [run_training(train_n, 1, Path(tmp))] + [run_training(train_n, 2, Path(tmp), m)
                                                          for m in ("s2_halo", "ulysses")]
    out = {"attention_shape": shape, "layer": layer, "layer_gqa_kv2": layer_gqa, "training": memory}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.markdown:
        print(f"one attention layer, H = {shape['heads']}, D = {shape['head_dim']}, N = {n}, G = N/4, fp32")
        print("| H_kv | sp | halo bytes sent / rank (counted) | N·H_kv·D/8 formula | Ulysses formula 4·L·H·D·(P−1)/P "
              "| Ulysses / halo | Ulysses counted, fwd + bwd | halo layer fwd+bwd (s) | Ulysses layer fwd+bwd (s) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for hk, rows in ((shape["kv_heads"], layer), (2, layer_gqa)):
            for r in rows:
                formula = f"{r['formula_bytes']:,}" if r["formula_bytes"] and r["sp"] > 1 else "-"
                counted = r["ulysses_counted_fwd_bwd_bytes_per_rank"]
                print(f"| {hk} | {r['sp']} | {r['halo_bytes_per_rank']:,} | {formula} | "
                      f"{r['ulysses_bytes_per_rank']:,} | {r['ratio_ulysses_to_halo'] or '-'} | "
                      f"{f'{counted:,}' if counted is not None else '-'} | {r['layer_fwd_bwd_s']} | "
                      f"{r['ulysses_layer_fwd_bwd_s'] or '-'} |")
        print("\ntraining step (tiny Llama, 4 layers, hidden 256, ZeRO-3, S²-Attn G = N/4), peak RSS per rank")
        print("| N | sp | mode | tokens / rank | peak RSS per rank (GB) | step (s) | loss |")
        print("|---|---|---|---|---|---|---|")
        for m in memory:
            print(f"| {m['seq_len']} | {m['sp']} | {m['mode']} | {m['tokens_per_rank']} | {m['peak_rss_gb_per_rank']} | "
                  f"{m['step_time_s']} | {m['loss']} |")
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
