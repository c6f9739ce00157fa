"""Metrics: one JSON object per optimizer step in RUN_DIR/metrics.jsonl (+ TensorBoard if asked),
throughput, model FLOPs utilisation and peak memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak TFLOP/s per device, for MFU. Unknown devices (and CPUs) report mfu = null.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf
    return None


def train_flops_per_token(n_params: int, n_trainable: int, n_layers: int, hidden: int, attn_span: float) -> float:
    """Model FLOPs per trained token (for MFU).

    Matmuls: forward 2·P, backward 2·P for the input gradients plus 2·P_trainable for the weight
    gradients (6·P for full fine-tuning; ~4·P with LoRA, whose frozen weights get no gradient).
    Attention: forward 2 matmuls × 2 FLOPs × hidden × span per layer, backward twice that;
    ``attn_span`` is the mean number of keys a query sees (N/2 causal full, G/2 for S²-Attn).
    """
    return 4.0 * n_params + 2.0 * n_trainable + 3.0 * n_layers * 4.0 * hidden * attn_span


def peak_memory_gb() -> float:
    """Peak accelerator memory if there is one, else peak resident host memory of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


def gather_peak_memory_gb() -> list[float]:
    """``peak_memory_gb`` of every rank of the default process group, in rank order (all ranks call it)."""
    import torch.distributed as dist

    mine = torch.tensor([peak_memory_gb()], dtype=torch.float64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [round(float(mine), 3)]
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [round(float(t), 3) for t in parts]


class MetricsWriter:
    """Appends step records to metrics.jsonl (flushed each time, so a killed run keeps them)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                    "(or set logging.tensorboard=false)"
                ) from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
