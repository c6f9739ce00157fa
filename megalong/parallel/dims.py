"""The process layout: world = data-parallel × sequence-parallel, built once, passed explicitly.

    world = 8, sp = 2  ->  dp = 4
    sequence-parallel groups (share one row):   [0 1] [2 3] [4 5] [6 7]
    data-parallel groups (same slice of rows):  [0 2 4 6] [1 3 5 7]
    sequence×data group (ZeRO partitions):      [0 1 2 3 4 5 6 7]

Consecutive ranks share a row so that, on a multi-GPU node, sequence-parallel traffic (every
layer) stays inside the node while data-parallel traffic (once per step) may cross nodes.
``DeepSpeedMPU`` is the thin adapter ``deepspeed.initialize(mpu=...)`` reads its groups from; there
is no tensor or pipeline parallelism here, so those groups are the rank itself.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from megalong.config.schema import ConfigError


def init_distributed(timeout_s: int, backend: str | None = None) -> None:
    """Start (or join) the default process group through DeepSpeed, with a timeout so hangs fail."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )


def world_timeout() -> datetime.timedelta | None:
    """The default process group's timeout (``parallel.init_timeout_s``), or None if unreadable.

    ``dist.new_group`` does not inherit it: without an explicit timeout a new group waits torch's
    default (30 min for gloo, 10 min for NCCL) for a peer that hangs."""
    import torch

    pg = dist.group.WORLD
    for device in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - private API, or no backend for this device
            continue
    return None


@dataclass
class ParallelDims:
    """Validated layout of ranks. ``build()`` creates every process group (collective, all ranks)."""

    world: int
    sp: int = 1
    rank: int = 0
    groups: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.world < 1 or self.sp < 1:
            raise ConfigError(f"world size {self.world} and parallel.sp={self.sp} must be >= 1")
        if self.world % self.sp != 0:
            options = [d for d in range(1, self.world + 1) if self.world % d == 0]
            raise ConfigError(
                f"parallel.sp={self.sp} does not divide the world size {self.world}; use one of {options}"
            )

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    def sp_group_ranks(self, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        start = (r // self.sp) * self.sp
        return list(range(start, start + self.sp))

    def dp_group_ranks(self, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        return list(range(r % self.sp, self.world, self.sp))

    def build(self) -> ParallelDims:
        """Create the sp, dp and model-parallel (self) groups, with the default group's timeout;
        every rank must call this."""
        if not dist.is_initialized():
            self.groups = {"sp": None, "dp": None, "mp": None, "world": None}
            return self
        timeout = world_timeout()
        for name, fn in (("sp", self.sp_group_ranks), ("dp", self.dp_group_ranks)):
            starts = sorted({tuple(fn(r)) for r in range(self.world)})
            for ranks in starts:
                g = dist.new_group(list(ranks), timeout=timeout)
                if self.rank in ranks:
                    self.groups[name] = g
        for r in range(self.world):
            g = dist.new_group([r], timeout=timeout)
            if r == self.rank:
                self.groups["mp"] = g
        self.groups["world"] = dist.group.WORLD
        return self

    @classmethod
    def from_env(cls, sp: int) -> ParallelDims:
        """Layout for the current process group (or a single process)."""
        if dist.is_available() and dist.is_initialized():
            return cls(world=dist.get_world_size(), sp=sp, rank=dist.get_rank())
        return cls(world=1, sp=sp, rank=0)


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed expects, over a built ``ParallelDims``.

    DeepSpeed partitions ZeRO state over the sequence×data group and averages gradients over
    ``seq_dp_world / sp`` (i.e. sums over the sp ranks of one row, averages over data-parallel ranks).
    """

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    # data parallel
    def get_data_parallel_group(self):
        return self.dims.groups["dp"]

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    # model / tensor parallel: none (the rank alone)
    def get_model_parallel_group(self):
        return self.dims.groups["mp"]

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims.rank

    # sequence parallel
    def get_sequence_parallel_group(self):
        return self.dims.groups["sp"]

    def get_sequence_parallel_world_size(self) -> int:
        return self.dims.sp

    def get_sequence_parallel_rank(self) -> int:
        return self.dims.sp_rank

    # sequence × data (ZeRO partition group)
    def get_sequence_data_parallel_group(self):
        return self.dims.groups["world"]

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dims.world

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dims.rank
