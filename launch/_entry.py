"""Shared command-line handling of the launch/ entry points (argument parsing, environment, exit codes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_CONFIG, EXIT_NONFINITE, EXIT_DATA = 2, 3, 4


def cpu_defaults() -> None:
    """Sane environment for CPU-only machines; explicit settings always win."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    return p.parse_known_args(argv)


def run(argv: list[str] | None, description: str, force_kind: str | None = None) -> int:
    cpu_defaults()
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
    if args.dry_run:
        from megalong.engine.dryrun import dry_run

        report = dry_run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb)
        print(report.render())
        print(json.dumps(report.summary(), sort_keys=True))
        return 0 if report.fits else 1
    return train(cfg)


def train(cfg) -> int:
    from megalong.config import ConfigError
    from megalong.data.indexed import DataFileError
    from megalong.engine.checkpoint import CheckpointError
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
    finally:
        trainer.close(clean=finished)  # no barrier after an error: another rank may never get there
    if code == 0 and trainer.is_main:
        print(f"run directory: {trainer.run_dir} (metrics.jsonl, checkpoints/, config.yaml, ds_config.json)")
    return code
