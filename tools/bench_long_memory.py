#!/usr/bin/env python
"""Long rows on CPU: measured peak memory per rank of one training step against the planner's.

    python tools/bench_long_memory.py [--lengths 16384 32768 65536] [--sp 1 2] [--markdown] [--json OUT]

Each configuration is one training step of the real entry point (``deepspeed --num_gpus SP
launch/pretrain_extend.py``, DS_ACCELERATOR=cpu, one process per rank, sp ranks = the world, so dp = 1)
on a small Llama built from a config — hidden 256, intermediate 1024, 4 layers, 4 heads (2 KV heads),
the test tokenizer's 512-token vocabulary, fp32, LoRA+ (r=4), S²-Attn (sdpa, G = 2048: attention time
grows as N·G, and with N/4 a 64k step would take ~10 min on one core; memory does not depend on G with
an O(N) kernel, the planner's view, checked here), ZeRO-3, HF
activation checkpointing, micro-batch 1 — with and without ``train.tiled_mlp`` and
``train.offload_activations``. The tiny test model (hidden 64, 2 layers) is too small for the MLP to
show beside the 0.45 GiB process; at hidden 256 with I = 4h the SwiGLU tensors are the largest term.

Measured: metrics.jsonl's ``mem_gb_ranks`` — each rank's peak resident set (ru_maxrss, the whole
process, model build included), as the trainer records it; the launch path's CPU allocator policy is in
force (megalong.utils.cpu_runtime). Planned: the dry run of the same recipe for ``SP`` CPU ranks
(``megalong.engine.dryrun.dry_run(accelerator="cpu")``): its per-rank peak, process included.
Activation offload moves nothing on CPU (DeepSpeed's offload engine skips tensors of a CPU device):
those rows check that it costs nothing, not that it saves anything.

Every launcher run goes under ``flock /tmp/megalong_heavy.lock nice -n 5`` (one heavy job at a time on a
shared box) with one thread per rank.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
FEATURES = {"none": {}, "tiled MLP": {"tiled_mlp": True}, "act. offload": {"offload_activations": True},
            "tiled + offload": {"tiled_mlp": True, "offload_activations": True}}
LOCK = "/tmp/megalong_heavy.lock"


def features_available() -> dict[str, bool]:
    """Whether the trainer applies each key (the config may carry a key before the mechanism lands)."""
    try:
        import megalong.engine.setup as setup
        import megalong.engine.trainer as trainer

        src = inspect.getsource(setup) + inspect.getsource(trainer)
    except Exception:  # noqa: BLE001 - a broken import means nothing is available
        return {"tiled_mlp": False, "offload_activations": False}
    return {"tiled_mlp": "apply_memory_tiling" in src or "apply_tiled_mlp" in src,
            "offload_activations": "activation_offload" in src}


def assets(workdir: Path) -> dict:
    from tests.assets import build_assets

    root = workdir / "assets"
    if (root / "data" / "train.idx").exists():
        return {"tokenizer": str(root / "tok" / "hf"), "train": str(root / "data" / "train"),
                "valid": str(root / "data" / "valid"), "vocab_size": 512, "spm": ""}
    return build_assets(root)


def recipe(a: dict, run: Path, seq_len: int, sp: int, feature: str, group: int = 2048,
           sp_mode: str = "s2_halo") -> dict:
    from tests.assets import tiny_run_config

    cfg = tiny_run_config(a, run, zero={"stage": 3}, parallel={"sp": sp, "sp_mode": sp_mode},
                          data={"max_seq_len": seq_len, "valid_prefixes": []},
                          attention={"train": "s2", "group_size": group},
                          train={"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "eval_interval": 0,
                                 "activation_checkpointing": "hf", **FEATURES[feature]},
                          checkpoint={"save_interval": 0, "save_at_end": False})
    cfg["model"]["init_config"].update(MODEL)
    return cfg


def planned(path: Path, sp: int) -> dict:
    from megalong.config import load_config
    from megalong.engine.dryrun import dry_run

    report = dry_run(load_config(str(path), []), nodes=1, gpus_per_node=sp, host_memory_gb=1024, accelerator="cpu")
    if report.errors or report.estimate is None:
        raise RuntimeError(f"dry run of {path}: {report.errors}")
    est = report.estimate
    return {"planned_gib": est.gpu_peak / 2**30, "peak_phase": est.peak_phase,
            "terms_gib": {t.name: round(t.gpu / 2**30, 4) for t in est.terms if t.at_peak and t.gpu}}


def measure(path: Path, run: Path, sp: int, timeout: float) -> dict:
    from tests.assets import clean_shm, free_port, launcher_env

    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = ["flock", LOCK, "nice", "-n", "5", deepspeed, "--num_gpus", str(sp), "--master_port", str(free_port()),
           "launch/pretrain_extend.py", "--config", str(path)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    clean_shm()
    if res.returncode:
        raise RuntimeError(f"{path.name} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return {"measured_gib_ranks": last["mem_gb_ranks"], "step_time_s": round(last["step_time_s"], 1),
            "wall_s": round(time.monotonic() - t0, 1), "loss": round(last["loss"], 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--features", nargs="+", default=["none", "tiled MLP"], choices=list(FEATURES))
    p.add_argument("--offload-lengths", type=int, nargs="*", default=None,
                   help="lengths that also run --offload-features (default: the middle one)")
    p.add_argument("--offload-features", nargs="*", default=["act. offload"], choices=list(FEATURES))
    p.add_argument("--group-size", type=int, default=2048)
    p.add_argument("--sp-mode", default="s2_halo", choices=("s2_halo", "ulysses"), help="for sp > 1")
    p.add_argument("--workdir", default="runs/bench_long_memory")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    import yaml

    workdir = (REPO / args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    avail = features_available()
    a = assets(workdir)
    offload_at = set(args.offload_lengths if args.offload_lengths is not None
                     else [sorted(args.lengths)[len(args.lengths) // 2]])
    rows = []
    print(f"features the trainer applies: {avail}", flush=True)
    print("| N | sp | tokens/rank | feature | measured GiB/rank (max) | planned GiB/rank | error | "
          "planned peak phase | step s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in args.lengths:
        for sp in args.sp:
            feats = list(args.features) + (list(args.offload_features) if n in offload_at else [])
            for feat in feats:
                keys = FEATURES[feat]
                missing = [k for k in keys if not avail.get(k, False)]
                name = f"n{n}_sp{sp}{'_' + args.sp_mode if sp > 1 else ''}_{feat.replace(' ', '').replace('.', '').replace('+', '_')}"
                run, path = workdir / name, workdir / f"{name}.yaml"
                if missing:
                    print(f"| {n} | {sp} | {n // sp} | {feat} | not available ({', '.join(missing)}) | | | | |")
                    rows.append({"seq_len": n, "sp": sp, "feature": feat, "available": False})
                    continue
                if run.exists():
                    subprocess.run(["rm", "-rf", str(run)], check=True)
                path.write_text(yaml.safe_dump(recipe(a, run, n, sp, feat, args.group_size, args.sp_mode)))
                plan = planned(path, sp)
                got = measure(path, run, sp, args.timeout)
                meas = max(got["measured_gib_ranks"])
                err = plan["planned_gib"] / meas - 1
                row = {"seq_len": n, "sp": sp, "sp_mode": args.sp_mode if sp > 1 else "-", "feature": feat,
                       "available": True, **plan, **got,
                       "measured_gib": meas, "rel_error": round(err, 4)}
                rows.append(row)
                print(f"| {n} | {sp} | {n // sp} | {feat} | {meas:.3f} | {plan['planned_gib']:.3f} | {err:+.0%} | "
                      f"{plan['peak_phase']} | {got['step_time_s']} |", flush=True)
                if args.json:  # after every row: a long run stopped early keeps what it measured
                    write_json(Path(args.json), args, avail, rows)
    return 0


def write_json(path: Path, args: argparse.Namespace, avail: dict, rows: list[dict]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    path.write_text(json.dumps({"model": MODEL, "group_size": args.group_size, "available": avail,
                                "commit": commit.stdout.strip(), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
