"""Render the DeepSpeed JSON from a template under ds_configs/ plus the config tree.

Templates hold the tuning that rarely changes (bucket sizes, prefetch); everything that follows
from the run (batch sizes, precision, clipping, offload, optimizer, activation checkpointing)
is written here, so a template is never edited per run. The rendered JSON goes into the run dir.

The batch arithmetic lives in exactly one place, ``batch_arithmetic``:

    train_batch = micro_batch × grad_accum × data-parallel size
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from megalong.config.schema import Config, ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class BatchArithmetic:
    micro_batch: int
    grad_accum: int
    dp: int

    @property
    def train_batch(self) -> int:
        """Rows per optimizer step over the whole job (sequence-parallel ranks share a row)."""
        return self.micro_batch * self.grad_accum * self.dp


def batch_arithmetic(cfg: Config, dp: int) -> BatchArithmetic:
    if dp < 1:
        raise ConfigError(f"data-parallel size {dp} must be >= 1")
    return BatchArithmetic(cfg.train.micro_batch_size, cfg.train.grad_accum, dp)


def default_template(cfg: Config) -> str:
    z = cfg.zero
    if z.stage == 3:
        return "zero3_offload.json" if (z.offload_param or z.offload_optimizer) else "zero3.json"
    return "zero2.json"


def load_template(name: str) -> dict:
    path = Path(name)
    if not path.is_file():
        path = DS_CONFIG_DIR / name
    if not path.is_file():
        known = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"DeepSpeed template {name!r} not found; use a path or one of {known}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed template {path} is not valid JSON: {e}") from None


def _offload(device_on: bool, pin: bool) -> dict:
    return {"device": "cpu", "pin_memory": pin} if device_on else {"device": "none"}


def render_deepspeed_config(cfg: Config, dp: int, accelerator: str = "cuda") -> dict:
    """The full DeepSpeed JSON for this run.

    Args:
        cfg: the validated config tree.
        dp: data-parallel size (world size / sequence-parallel size).
        accelerator: DeepSpeed accelerator name ("cuda", "cpu", ...): picks the optimizer
            implementation and whether host memory is pinned.
    """
    ds = copy.deepcopy(load_template(cfg.zero.template or default_template(cfg)))
    b = batch_arithmetic(cfg, dp)
    t = cfg.train
    on_cpu = accelerator == "cpu"

    ds["train_micro_batch_size_per_gpu"] = b.micro_batch
    ds["gradient_accumulation_steps"] = b.grad_accum
    ds["train_batch_size"] = b.train_batch
    if cfg.parallel.sp > 1:
        # DeepSpeed checks train_batch = micro × accum × world / sequence_parallel_size where it has no
        # mpu (transformers' zero.Init path); deepspeed.initialize takes the groups from megalong's mpu.
        ds["sequence_parallel_size"] = cfg.parallel.sp
    else:
        ds.pop("sequence_parallel_size", None)
    ds["gradient_clipping"] = t.grad_clip
    ds["bf16"] = {"enabled": t.dtype == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": t.lr,
            "betas": list(t.betas),
            "eps": t.eps,
            "weight_decay": t.weight_decay,
            # No fused CUDA Adam on a CPU accelerator: use torch's AdamW there (offload uses DeepSpeedCPUAdam).
            "torch_adam": on_cpu,
        },
    }

    if on_cpu and (cfg.zero.offload_optimizer or cfg.zero.offload_param):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the host instead of the JIT-built CPUAdam

    zo = ds.setdefault("zero_optimization", {})
    zo["stage"] = cfg.zero.stage
    pin = not on_cpu
    zo["offload_optimizer"] = _offload(cfg.zero.offload_optimizer, pin)
    if cfg.zero.stage == 3:
        zo["offload_param"] = _offload(cfg.zero.offload_param, pin)
    else:
        zo.pop("offload_param", None)
        for key in [k for k in zo if k.startswith("stage3_")]:
            zo.pop(key)

    if t.activation_checkpointing == "deepspeed":
        ds["activation_checkpointing"] = {
            "partition_activations": False,  # partitions over model-parallel ranks; megalong has none
            "cpu_checkpointing": t.cpu_checkpointing,
            "contiguous_memory_optimization": False,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    else:
        ds.pop("activation_checkpointing", None)
    return ds


def write_deepspeed_config(ds: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")
