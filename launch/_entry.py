"""Shared command-line handling of the launch/ entry points (argument parsing, environment, exit codes)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_CONFIG, EXIT_NONFINITE, EXIT_DATA, EXIT_LOST_RANK = 2, 3, 4, 5


def cpu_defaults() -> list[str]:
    """Sane environment for CPU-only machines; explicit settings always win. Returns lines to log."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    log = []
    if not has_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return log


def cpu_allocator(cfg=None) -> str:
    """The CPU rank's allocator policy (megalong.utils.cpu_runtime), from the run's activation size when
    ``cfg`` is given; the user's choice wins."""
    from megalong.utils.cpu_runtime import configure_cpu_allocator

    try:
        return configure_cpu_allocator(os.environ, activation_block(cfg) if cfg is not None else None)
    except ValueError as e:
        return f"allocator: {e}; left as it is"


def activation_block(cfg) -> int | None:
    """The run's activations per rank and micro-block in bytes (tokens × MLP width × bytes × layers) (None when the model's config is unreadable)."""
    from megalong.utils.cpu_runtime import activation_block_bytes

    try:
        from megalong.engine.setup import base_hf_config

        hf, _ = base_hf_config(cfg)
        width = max(int(getattr(hf, "intermediate_size", 0) or 0), int(hf.hidden_size))
        layers = int(hf.num_hidden_layers)
    except Exception:  # noqa: BLE001 - the trainer reports a bad model itself; the allocator stays memory-safe
        return None
    return activation_block_bytes(cfg.train.micro_batch_size, cfg.data.max_seq_len, cfg.parallel.sp, width,
                                  4 if cfg.train.dtype == "fp32" else 2, layers)


def single_process_env() -> list[str]:
    """Started without a launcher (no RANK, WORLD_SIZE, MASTER_ADDR, ...): run as a world of one."""
    from megalong.utils.cpu_runtime import single_process_rendezvous

    missing = single_process_rendezvous(os.environ)
    if not missing:
        return []
    os.environ.update(missing)
    return [f"no launcher environment: running as a single process "
            f"(RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT={missing['MASTER_PORT']})"]


def parse(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Any --section.key=value after the options overrides the recipe (e.g. --train.max_steps=100).",
    )
    p.add_argument("--config", required=True, help="recipe YAML under launch/configs/")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe for --nodes x --gpus-per-node without allocating weights")
    p.add_argument("--nodes", type=int, default=1, help="dry run: number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="dry run: GPUs per node")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="dry run: memory per GPU")
    p.add_argument("--host-memory-gb", type=float, default=1024.0, help="dry run: host memory per node")
    p.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda",
                   help="dry run: plan for GPUs (cuda) or CPU ranks (cpu: --gpus-per-node ranks per node, "
                        "host memory is the device)")
    return p.parse_known_args(argv)


def run(argv: list[str] | None, description: str, force_kind: str | None = None) -> int:
    setup_log = cpu_defaults()
    args, overrides = parse(argv, description)
    from megalong.config import ConfigError, load_config
    from megalong.utils.logging import setup_logging

    try:
        cfg = load_config(args.config, overrides)
        if force_kind is not None and cfg.data.kind != force_kind:
            raise ConfigError(f"{Path(sys.argv[0]).name} trains data.kind={force_kind}; the recipe says "
                              f"{cfg.data.kind!r}: use the other entry point or set --data.kind={force_kind}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.logging.level)
    if not args.dry_run:
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            setup_log.append(cpu_allocator(cfg))
        setup_log += single_process_env()
    for line in setup_log:
        logging.getLogger("megalong.launch").info(line)
    if args.dry_run:
        from megalong.engine.dryrun import dry_run

        report = dry_run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                         accelerator=args.accelerator)
        print(report.render())
        print(json.dumps(report.summary(), sort_keys=True))
        return 0 if report.fits else 1
    return train(cfg)


def train(cfg) -> int:
    from megalong.config import ConfigError
    from megalong.data.indexed import DataFileError
    from megalong.engine.checkpoint import CheckpointError
    from megalong.engine.liveness import LostRankError
    from megalong.engine.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(cfg)
    code, finished = 0, False
    try:
        trainer.setup()
        trainer.train()
        finished = True
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except DataFileError as e:
        print(f"data error: {e}", file=sys.stderr)
        code = EXIT_DATA
    except NonFiniteLossError as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = EXIT_NONFINITE
    except LostRankError as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        code = EXIT_LOST_RANK
    finally:
        trainer.close(clean=finished)  # no barrier after an error: another rank may never get there
    if code == 0 and trainer.is_main:
        print(f"run directory: {trainer.run_dir} (metrics.jsonl, checkpoints/, config.yaml, ds_config.json)")
    return code
