"""Rank-aware logging: rank 0 logs at the configured level, other ranks only warnings."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    lvl = getattr(logging, level) if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=lvl, format=f"[%(asctime)s rank{rank} %(name)s %(levelname)s] %(message)s", datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
