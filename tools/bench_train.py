#!/usr/bin/env python
"""Training throughput and memory of the tiny model, measured on this machine in one run.

    python tools/bench_train.py --part engine        # tokens/s + peak memory per rank: S²-Attn vs full
                                                     # at several lengths; ZeRO-2 vs ZeRO-3 vs ZeRO-3 offload
    python tools/bench_train.py --part loss-memory   # one training step's peak memory vs N, with and
                                                     # without the chunked cross-entropy
    python tools/bench_train.py --part overhead      # megalong's step against a minimal hand-written
                                                     # DeepSpeed + transformers + peft loop (same DS JSON,
                                                     # model, LoRA, row shape), per CPU allocator policy
Both print a Markdown table and write JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {
    "model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def _engine_run(assets: dict, n: int, att: str, zero: dict, steps: int, ranks: int, run: Path) -> dict:
    from tests.assets import clean_shm, run_ranks, tiny_run_config

    cfg = tiny_run_config(
        assets, run, zero=zero,
        model={"tokenizer": assets["tokenizer"], "init_config": dict(MODEL, vocab_size=assets["vocab_size"])},
        attention={"train": att, "group_size": n // 4},
        data={"max_seq_len": n},
        train={"max_steps": steps, "micro_batch_size": 1, "lr": 1e-3},
        checkpoint={"save_interval": 0, "save_at_end": False},
    )
    run_ranks(cfg, ranks, run.with_name(run.name + "_logs"), timeout=1800)
    clean_shm()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady = recs[2:] or recs
    return {
        "seq_len": n, "attention": att, "zero": zero["stage"], "offload": bool(zero.get("offload_param")),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_s": statistics.median(r["step_time_s"] for r in steady),
        "peak_gb_per_rank": recs[-1]["mem_gb_ranks"],
    }


def engine_runs(assets: dict, lengths: list[int], steps: int, ranks: int, work: Path, pairs: int) -> list[dict]:
    """Full and S²-Attn runs back to back (``pairs`` times per length, the host drifts over minutes),
    then ZeRO-2 and ZeRO-3 + offload at the middle length."""
    rows = []
    k = 0
    for n in lengths:
        for p in range(pairs):
            for att in ("full", "s2"):
                k += 1
                rows.append(dict(_engine_run(assets, n, att, {"stage": 3}, steps, ranks, work / f"r{k}"), pair=p))
                print(json.dumps(rows[-1]), flush=True)
    mid = lengths[len(lengths) // 2]
    for zero in ({"stage": 2}, {"stage": 3, "offload_optimizer": True, "offload_param": True}):
        k += 1
        rows.append(dict(_engine_run(assets, mid, "s2", zero, steps, ranks, work / f"r{k}"), pair=None))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def overhead_runs(assets: dict, n: int, micro: int, steps: int, ranks: int, work: Path, pairs: int) -> list[dict]:
    """Per pair, back to back: megalong (allocator auto), the plain loop on that run's config, megalong with
    the fixed mmap threshold forced. Full attention in both (the plain loop has no S²-Attn), LoRA+ r 8."""
    from tests.assets import clean_shm, free_port, run_ranks, tiny_run_config

    rows = []
    for p in range(pairs):
        for policy in ("auto", "plain", "fixed"):
            run = work / f"p{p}_{'auto' if policy == 'plain' else policy}"
            if policy == "plain":
                out = work / f"p{p}_plain.json"
                env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                           PYTHONPATH=str(REPO))
                env = {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "MEGALONG_CPU_MALLOC"}
                res = subprocess.run(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                                      "tools/bench_plain_loop.py", "--run", str(run), "--steps", str(steps),
                                      "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                                     timeout=1800)
                clean_shm()
                if res.returncode != 0:
                    raise SystemExit(f"plain loop failed:\n{(res.stdout + res.stderr)[-3000:]}")
                times = json.loads(out.read_text())["step_s"][2:]
                rows.append({"pair": p, "policy": "plain loop (glibc default)", "step_s": statistics.median(times)})
            else:
                cfg = tiny_run_config(
                    assets, run, model={"tokenizer": assets["tokenizer"],
                                        "init_config": dict(MODEL, vocab_size=assets["vocab_size"])},
                    attention={"train": "full"}, data={"max_seq_len": n},
                    lora={"enabled": True, "r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                          "trainable": ["embed", "norm"]},
                    train={"max_steps": steps, "micro_batch_size": micro, "lr": 1e-3, "eval_interval": 0},
                    checkpoint={"save_interval": 0, "save_at_end": False})
                saved = os.environ.get("MEGALONG_CPU_MALLOC")
                os.environ["MEGALONG_CPU_MALLOC"] = policy
                try:
                    run_ranks(cfg, ranks, run.with_name(run.name + "_logs"), timeout=1800)
                finally:
                    os.environ.pop("MEGALONG_CPU_MALLOC") if saved is None else os.environ.update(
                        MEGALONG_CPU_MALLOC=saved)
                clean_shm()
                recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                rows.append({"pair": p, "policy": f"megalong ({policy})",
                             "step_s": statistics.median(r["step_time_s"] for r in recs[2:]),
                             "peak_gb_per_rank": recs[-1]["mem_gb_ranks"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def overhead_table(rows: list[dict], n: int, micro: int, ranks: int) -> str:
    plain = {r["pair"]: r["step_s"] for r in rows if r["policy"].startswith("plain")}
    out = [f"| {ranks} ranks, micro {micro} × {n} tokens | s/step (median of steps 3+, per pair) | × plain loop "
           "(per pair) | peak RSS per rank (GB, last pair) |", "|---|---|---|---|"]
    for policy in dict.fromkeys(r["policy"] for r in rows):
        group = [r for r in rows if r["policy"] == policy]
        ratios = [r["step_s"] / plain[r["pair"]] for r in group]
        mem = ", ".join(f"{m:.2f}" for m in group[-1].get("peak_gb_per_rank", []))
        steps = ", ".join(f"{r['step_s']:.3f}" for r in group)
        out.append(f"| {policy} | {steps} | "
                   f"{statistics.median(ratios):.2f}× ({', '.join(f'{x:.2f}' for x in ratios)}) | {mem or '—'} |")
    return "\n".join(out)


def engine_table(rows: list[dict], ranks: int) -> str:
    out = [f"| N | attention | ZeRO | tokens/s ({ranks} ranks, median of pairs) | S²/full (per-pair ratios) "
           "| peak RSS per rank (GB) |", "|---|---|---|---|---|---|"]
    z3 = [r for r in rows if r["pair"] is not None]
    for n in sorted({r["seq_len"] for r in z3}):
        full = [r for r in z3 if r["seq_len"] == n and r["attention"] == "full"]
        s2 = [r for r in z3 if r["seq_len"] == n and r["attention"] == "s2"]
        ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(full, s2)]
        for att, group in (("full", full), ("s2", s2)):
            tps = statistics.median(r["tokens_per_s"] for r in group)
            mem = ", ".join(f"{m:.2f}" for m in group[-1]["peak_gb_per_rank"])
            ratio = (f"{statistics.median(ratios):.2f}× ({', '.join(f'{x:.2f}' for x in ratios)})"
                     if att == "s2" else "")
            out.append(f"| {n} | {att} | 3 | {tps:.0f} | {ratio} | {mem} |")
    for r in rows:
        if r["pair"] is None:
            z = f"{r['zero']}{' + offload' if r['offload'] else ''}"
            mem = ", ".join(f"{m:.2f}" for m in r["peak_gb_per_rank"])
            out.append(f"| {r['seq_len']} | {r['attention']} | {z} | {r['tokens_per_s']:.0f} |  | {mem} |")
    return "\n".join(out)


LOSS_CHILD = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from megalong.engine.loss import chunked_cross_entropy
n, mode, vocab = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=n, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg)
x = torch.randint(0, vocab, (1, n + 1))
def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30
base = rss_gb()
if mode == "chunked":
    h = model.model(input_ids=x[:, :-1]).last_hidden_state
    loss, cnt = chunked_cross_entropy(h, model.lm_head.weight, x[:, 1:], chunk_size=1024)
    (loss / cnt).backward()
else:
    out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF: full (N, V) logits, upcast, shifted CE
    out.loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seq_len": n, "mode": mode, "peak_gb": peak, "step_gb": peak - base}))
"""


def loss_memory_runs(lengths: list[int], vocab: int) -> list[dict]:
    rows = []
    for n in lengths:
        for mode in ("chunked", "plain"):
            env = dict(os.environ, OMP_NUM_THREADS="2")
            res = subprocess.run([sys.executable, "-c", LOSS_CHILD, str(n), mode, str(vocab)], env=env,
                                 capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                rows.append({"seq_len": n, "mode": mode, "error": res.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def loss_table(rows: list[dict], vocab: int) -> str:
    by = {(r["seq_len"], r["mode"]): r for r in rows}
    out = [f"| N | step memory, chunked CE (GB) | step memory, HF logits + CE (GB) | ratio | (V = {vocab}) |",
           "|---|---|---|---|---|"]
    for n in sorted({r["seq_len"] for r in rows}):
        c, p = by.get((n, "chunked"), {}), by.get((n, "plain"), {})
        cs = f"{c['step_gb']:.2f}" if "step_gb" in c else c.get("error", "")
        ps = f"{p['step_gb']:.2f}" if "step_gb" in p else p.get("error", "")
        ratio = f"{p['step_gb'] / c['step_gb']:.1f}×" if "step_gb" in c and "step_gb" in p else ""
        out.append(f"| {n} | {cs} | {ps} | {ratio} | |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["engine", "loss-memory", "overhead"], required=True)
    p.add_argument("--micro", type=int, default=2, help="overhead: rows per micro-batch (the quickstart's 2)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2, help="engine: back-to-back (full, S²) pairs per length")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default="docs/benchmarks/train")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.part == "overhead":
        from tests.assets import build_assets

        n = (args.lengths or [1024])[0]
        with tempfile.TemporaryDirectory() as tmp:
            assets = build_assets(Path(tmp) / "assets", max_mb=2.0, vocab_size=4096)
            rows = overhead_runs(assets, n, args.micro, args.steps, args.ranks, Path(tmp) / "runs", args.pairs)
        table = overhead_table(rows, n, args.micro, args.ranks)
    elif args.part == "engine":
        from tests.assets import build_assets

        with tempfile.TemporaryDirectory() as tmp:
            assets = build_assets(Path(tmp) / "assets", max_mb=2.0, vocab_size=4096)
            rows = engine_runs(assets, args.lengths or [1024, 2048, 4096], args.steps, args.ranks,
                               Path(tmp) / "runs", args.pairs)
        table = engine_table(rows, args.ranks)
    else:
        rows = loss_memory_runs(args.lengths or [2048, 4096, 8192, 16384], args.vocab)
        table = loss_table(rows, args.vocab)
    Path(f"{out}_{args.part}.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
