#!/usr/bin/env python
"""Check megalong.utils.memory against measured peak memory of real DeepSpeed training steps on CPU.

    flock /tmp/megalong_heavy.lock python tools/bench_memory.py [--quick] [--markdown]

Each configuration runs in a fresh process (DS_ACCELERATOR=cpu, one rank): build the model the way
the trainer does (megalong.engine.setup.build_model: zero.Init with ZeRO-3, LoRA+, S²-Attn,
activation checkpointing), wrap it in the chunked-loss TrainModule, deepspeed.initialize with the
rendered JSON (torch AdamW on CPU), then two steps of forward, backward and optimizer step.

Measured = the kernel's peak resident set of the whole process (VmHWM, reset through
/proc/self/clear_refs once the engine is built, so the one-off loading peak is excluded) during the
two training steps; "above base" subtracts the resident set just before the model is built (the
interpreter, torch, DeepSpeed, transformers). The worker applies the allocator policy the launch
path applies to every CPU rank (megalong.utils.cpu_runtime.configure_cpu_allocator from the run's
activation block size, called from launch/_entry.py), so the figures are what a real run sees.
Estimated = estimate_memory(accelerator="cpu") per-rank peak: the whole process, its base included.

    flock /tmp/megalong_heavy.lock python tools/bench_memory.py --only smol-z3-ckpt-s2 --seq-len 4096 \
        --allocators glibc launch env-mmap jemalloc tcmalloc      # the allocator table

--allocators runs each configuration once per allocator: ``launch`` (what launch/_entry.py does),
``glibc`` (glibc's dynamic mmap threshold, MEGALONG_CPU_MALLOC=glibc), ``env-mmap`` (the same fixed
threshold through MALLOC_MMAP_THRESHOLD_=131072, set before the process starts) and ``jemalloc`` /
``tcmalloc`` (LD_PRELOAD, where the Debian libraries are installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_MODEL = dict(
    model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SMOL_MODEL = dict(  # SmolLM-135M's shape: 24 layers, 9 query / 3 KV heads, tied 49k vocabulary
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
MODELS = {
    "v32k": BENCH_MODEL,  # 58M params: Llama-2's vocabulary, so the loss buffers are realistic
    "v4k": {**BENCH_MODEL, "vocab_size": 4096},  # 29M: small loss buffers, the recomputed layer shows
    "smol": SMOL_MODEL,  # 135M, tied embeddings (the trained embedding is the output head)
    "l24v32k": {**SMOL_MODEL, "vocab_size": 32000, "tie_word_embeddings": False},  # 24 layers, Llama-2's vocab
}
TINY_MODEL = {**BENCH_MODEL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 64}

KEYS = ("name", "model", "seq_len", "lora", "stage", "ckpt", "attention", "dtype")
CONFIGS = [dict(zip(KEYS, c)) for c in [
    ("lora-z3-ckpt-s2", "v32k", 2048, True, 3, "layer", "s2", "bf16"),
    ("lora-z3-ckpt-s2", "v32k", 8192, True, 3, "layer", "s2", "bf16"),
    ("lora-z3-none-s2", "v32k", 2048, True, 3, "none", "s2", "bf16"),
    ("lora-z3-none-s2", "v32k", 4096, True, 3, "none", "s2", "bf16"),
    ("lora-z3-ckpt-full", "v32k", 4096, True, 3, "layer", "full", "bf16"),
    ("lora-z2-none-s2", "v32k", 4096, True, 2, "none", "s2", "bf16"),
    ("full-z2-ckpt-s2", "v32k", 4096, False, 2, "layer", "s2", "bf16"),
    ("full-z2-none-s2", "v32k", 2048, False, 2, "none", "s2", "bf16"),
    ("full-z3-ckpt-s2", "v32k", 4096, False, 3, "layer", "s2", "bf16"),
    ("lora-z3-ckpt-s2-fp32", "v32k", 4096, True, 3, "layer", "s2", "fp32"),
    ("full-z2-none-s2-fp32", "v32k", 2048, False, 2, "none", "s2", "fp32"),
    ("v4k-lora-z3-ckpt-s2", "v4k", 8192, True, 3, "layer", "s2", "bf16"),
    ("v4k-lora-z3-ckpt-s2", "v4k", 16384, True, 3, "layer", "s2", "bf16"),
    ("v4k-lora-z3-none-s2", "v4k", 8192, True, 3, "none", "s2", "bf16"),
    ("v4k-full-z3-ckpt-full", "v4k", 16384, False, 3, "layer", "full", "bf16"),
    # realistic depth and vocabulary, where the allocator matters (fp32: no bf16 matmul units on most CPUs)
    ("smol-z3-ckpt-s2", "smol", 1024, True, 3, "layer", "s2", "fp32"),  # --dtypes fp32 bf16: the CPU dtype table
    ("smol-z3-ckpt-s2", "smol", 4096, True, 3, "layer", "s2", "fp32"),
    ("l24v32k-z3-ckpt-s2", "l24v32k", 8192, True, 3, "layer", "s2", "fp32"),
    ("smol-z3-ckpt-s2", "smol", 8192, True, 3, "layer", "s2", "fp32"),
]]
ALLOCATORS = {  # environment of the worker process, on top of the caller's
    "launch": {},
    "glibc": {"MEGALONG_CPU_MALLOC": "glibc"},
    "env-mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "jemalloc": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
}
QUICK = [CONFIGS[0], CONFIGS[2], CONFIGS[11]]


def run_config(cfg: dict, base_dir: Path, tiny_dir: Path, threads: int, allocator: str = "launch") -> dict:
    """Run one configuration in a fresh process and return its measurements."""
    from megalong.utils.cpu_runtime import single_process_rendezvous

    preload = ALLOCATORS[allocator].get("LD_PRELOAD")
    if preload and not Path(preload).is_file():
        raise FileNotFoundError(f"--allocators {allocator}: {preload} is not installed "
                                "(apt-get install libjemalloc2 / libtcmalloc-minimal4)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEGALONG_CPU_MALLOC"}
    env = dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", **single_process_rendezvous({}), **ALLOCATORS[allocator])
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg), "--base-dir", str(base_dir), "--tiny-dir", str(tiny_dir),
           "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed for {cfg} ({allocator}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def estimate_for(cfg: dict):
    """The estimator's result for a CPU configuration."""
    from megalong.utils.memory import MemoryInputs, ModelShape, estimate_memory, hf_config_from_dict

    shape = ModelShape.from_hf_config(hf_config_from_dict(MODELS[cfg["model"]]), name=f"bench-{cfg['model']}")
    est = estimate_memory(MemoryInputs(
        shape, cfg["seq_len"], micro_batch=1, gpus_per_node=1, zero_stage=cfg["stage"],
        activation_checkpointing=cfg["ckpt"], attention=cfg["attention"], attention_kernel="flash",
        dtype=cfg["dtype"], lora=cfg["lora"], accelerator="cpu", loss_chunk=1024,
    ))
    return est


# ------------------------------------------------------------------------------------------ worker
def _statm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _engine(cfg: dict, base_dir: Path, dims):
    """The trainer's model (build_model) wrapped in TrainModule and deepspeed.initialize'd."""
    import deepspeed

    from megalong.config.deepspeed import render_deepspeed_config
    from megalong.config.loader import config_from_dict
    from megalong.engine.model import TrainModule
    from megalong.engine.setup import build_model
    from megalong.parallel.dims import DeepSpeedMPU

    base_context = json.loads((Path(base_dir) / "config.json").read_text())["max_position_embeddings"]
    config = config_from_dict({
        "model": {"name_or_path": str(base_dir)},
        "rope": {"type": "linear" if cfg["seq_len"] > base_context else "none"},
        "attention": {"train": cfg["attention"], "backend": "sdpa"},
        "lora": {"enabled": cfg["lora"]},
        "zero": {"stage": cfg["stage"]},
        "data": {"max_seq_len": cfg["seq_len"]},
        "train": {"dtype": cfg["dtype"], "activation_checkpointing": "hf" if cfg["ckpt"] == "layer" else "none",
                  "loss_chunk_size": 1024, "micro_batch_size": 1, "lr": 1e-4},
    })
    ds_config = render_deepspeed_config(config, 1, "cpu")
    model, _ = build_model(config, base_dir, ds_config, dims)
    module = TrainModule(model, 1024)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config, mpu=DeepSpeedMPU(dims))
    return engine


def _batch(seq_len: int, vocab: int) -> dict:
    import torch

    return {
        "input_ids": torch.randint(0, vocab, (1, seq_len)),
        "labels": torch.randint(0, vocab, (1, seq_len)),
        "position_ids": torch.arange(seq_len).unsqueeze(0),
    }


def worker(cfg: dict, base_dir: Path, tiny_dir: Path, threads: int) -> None:
    """Warm up on a tiny model (lazy imports, kernel setup), then measure ``cfg`` on the bench model."""
    import gc
    import time

    import torch

    from megalong.parallel.dims import ParallelDims, init_distributed
    from megalong.utils.cpu_runtime import activation_block_bytes, configure_cpu_allocator

    m = MODELS[cfg["model"]]
    block = activation_block_bytes(1, cfg["seq_len"], 1, max(m["intermediate_size"], m["hidden_size"]),
                                   4 if cfg["dtype"] == "fp32" else 2, m["num_hidden_layers"])
    allocator = configure_cpu_allocator(os.environ, block)  # what launch/_entry.py applies to this run
    torch.set_num_threads(threads)
    init_distributed(120)
    dims = ParallelDims(world=1, sp=1).build()
    warm = _engine({**cfg, "seq_len": 256}, tiny_dir, dims)
    loss_sum, count = warm(**_batch(256, TINY_MODEL["vocab_size"]))
    warm.backward(loss_sum / count)
    warm.step()
    del warm, loss_sum, count
    batch = _batch(cfg["seq_len"], MODELS[cfg["model"]]["vocab_size"])
    gc.collect()
    base = _statm_kib("VmRSS")
    engine = _engine(cfg, base_dir, dims)
    gc.collect()
    after_init = _statm_kib("VmRSS")
    phases: dict[str, float] = {}

    def phase(name: str, fn):
        _reset_peak()
        out = fn()
        phases[name] = max(phases.get(name, 0.0), _statm_kib("VmHWM") / 1024)
        return out

    losses, times = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        loss_sum, count = phase("forward", partial(engine, **batch))
        loss = loss_sum / count
        phase("backward", partial(engine.backward, loss))
        phase("step", engine.step)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = max(phases.values())
    result = {**cfg, "allocator": allocator, "base_mib": base / 1024, "init_mib": (after_init - base) / 1024,
              "process_peak_mib": peak, "peak_mib": peak - base / 1024,
              "phases_mib": {k: v - base / 1024 for k, v in phases.items()}, "losses": losses,
              "step_s": times[-1], "first_step_s": times[0]}
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ main
def make_base(tmp: Path, config: dict, name: str) -> Path:
    """A randomly initialised model saved as an HF directory (fp32, like a downloaded base)."""
    import torch

    from megalong.models import create_model, save_hf_model
    from megalong.utils.memory import hf_config_from_dict

    out = tmp / name
    save_hf_model(create_model(hf_config_from_dict(config), dtype=torch.float32, seed=0), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three configurations instead of all")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="run only the configurations with these names")
    p.add_argument("--seq-len", nargs="*", type=int, default=None, help="run only these lengths")
    p.add_argument("--allocators", nargs="*", default=["launch"], choices=sorted(ALLOCATORS),
                   help="run each configuration with each allocator (default: the launch path's)")
    p.add_argument("--dtypes", nargs="*", default=None, choices=["fp32", "bf16"],
                   help="run each configuration in each of these dtypes (default: its own) and print their "
                        "step times side by side (bf16 is emulated on CPUs without AVX512-BF16/AMX)")
    p.add_argument("--verbose", action="store_true", help="print each configuration's estimate table")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiny-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker), args.base_dir, args.tiny_dir, args.threads)
        return 0
    rows = []
    specs = [c for c in (QUICK if args.quick else CONFIGS) if (args.only is None or c["name"] in args.only)
             and (args.seq_len is None or c["seq_len"] in args.seq_len)]
    with tempfile.TemporaryDirectory(prefix="megalong_bench_mem_") as tmp:
        tiny_dir = make_base(Path(tmp), TINY_MODEL, "bench_tiny")
        base_dirs = {m: make_base(Path(tmp), MODELS[m], f"bench_{m}") for m in sorted({c["model"] for c in specs})}
        if args.dtypes:
            specs = [{**c, "dtype": d} for c in specs for d in args.dtypes]
        for cfg in specs:
            for allocator in args.allocators:
                res = run_config(cfg, base_dirs[cfg["model"]], tiny_dir, args.threads, allocator)
                est = estimate_for(cfg)
                process = est.term("framework overhead").gpu  # the per-rank process base on CPU
                res["estimate_process_mib"] = (est.gpu_peak + sum(t.host for t in est.terms)) / 2**20
                res["estimate_mib"] = res["estimate_process_mib"] - process / 2**20
                if args.verbose:
                    print(est.render())
                res["ratio"] = res["estimate_mib"] / res["peak_mib"]
                res["process_ratio"] = res["estimate_process_mib"] / res["process_peak_mib"]
                res["allocator_choice"] = allocator
                rows.append(res)
                print(json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(format_table(rows, args.markdown))
    if len(args.allocators) > 1:
        print(format_allocators(rows, args.markdown))
    if args.dtypes and len(args.dtypes) > 1:
        print(format_dtypes(rows, args.markdown))
    return 0


def _table(head: list[str], body: list[list[str]], markdown: bool) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else ["  ".join(head)]
    for cells in body:
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def format_table(rows: list[dict], markdown: bool) -> str:
    """Measured against estimated: above the pre-model base, and for the whole process."""
    head = ["model", "mode", "N", "ZeRO", "ckpt", "attn", "dtype", "measured MiB", "estimated MiB", "est/meas",
            "process peak MiB", "planned per rank MiB", "est/meas"]
    body = [[r["model"], "LoRA+" if r["lora"] else "full FT", str(r["seq_len"]), str(r["stage"]), r["ckpt"],
             r["attention"], r["dtype"], f"{r['peak_mib']:.0f}", f"{r['estimate_mib']:.0f}", f"{r['ratio']:.2f}",
             f"{r['process_peak_mib']:.0f}", f"{r['estimate_process_mib']:.0f}", f"{r['process_ratio']:.2f}"]
            for r in rows]
    return _table(head, body, markdown)


def format_allocators(rows: list[dict], markdown: bool) -> str:
    """Time of each of the two steps and whole-process peak RSS of the same steps under each allocator."""
    head = ["model", "N", "dtype", "allocator", "step 1 s", "step 2 s", "peak RSS MiB", "above base MiB"]
    body = [[r["model"], str(r["seq_len"]), r["dtype"], r["allocator_choice"], f"{r['first_step_s']:.1f}",
             f"{r['step_s']:.1f}", f"{r['process_peak_mib']:.0f}", f"{r['peak_mib']:.0f}"] for r in rows]
    return _table(head, body, markdown)


def format_dtypes(rows: list[dict], markdown: bool) -> str:
    """Step times of the same configuration in each dtype, and each one's ratio to fp32's (mean of its two
    steps, measured in this one run)."""
    def mean(r: dict) -> float:
        return (r["first_step_s"] + r["step_s"]) / 2

    fp32 = {(r["name"], r["seq_len"], r["allocator_choice"]): mean(r) for r in rows if r["dtype"] == "fp32"}
    head = ["model", "N", "dtype", "step 1 s", "step 2 s", "× fp32", "peak RSS MiB", "cpu bf16 units"]
    from megalong.utils.cpu_runtime import cpu_bf16_native

    native = "yes" if cpu_bf16_native() else "no (emulated)"
    body = [[r["model"], str(r["seq_len"]), r["dtype"], f"{r['first_step_s']:.1f}", f"{r['step_s']:.1f}",
             (f"{mean(r) / base:.2f}" if (base := fp32.get((r["name"], r["seq_len"], r["allocator_choice"])))
              else "—"), f"{r['process_peak_mib']:.0f}", native] for r in rows]
    return _table(head, body, markdown)


if __name__ == "__main__":
    sys.exit(main())
