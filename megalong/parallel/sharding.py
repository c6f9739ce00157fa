"""Split each row across the ranks of a sequence-parallel group (the batch contract: megalong.data.batch).

    row of N tokens, sp = 4, L = N / 4             every rank of the group loads the same row
    rank r keeps   input_ids[:, rL:(r+1)L]         (the loader slices rows by data-parallel rank)
                   labels[:, rL:(r+1)L]            already shifted in the data: nothing crosses ranks
                   position_ids[:, rL:(r+1)L]      global positions (RoPE sees where the token really is)
    and            sp_context                      the whole row's document layout (+ the halo plan), for
                                                   the attention layers: megalong.parallel.s2_halo
                                                   (parallel.sp_mode=s2_halo) or .ulysses

A length that sp does not divide is refused at start-up (megalong.engine.checks), not padded:
padding would change the number of scored tokens between layouts.
"""

from __future__ import annotations

import torch

from megalong.config.schema import ConfigError
from megalong.parallel.s2_halo import HaloStats, build_context
from megalong.parallel.ulysses import build_ulysses_context


def shard_batch(batch: dict[str, torch.Tensor], dims, doc_mask: bool,
                stats: HaloStats | None = None, sp_mode: str = "s2_halo") -> dict:
    """This rank's part of a (B, N) batch, plus ``sp_context`` for attention; unchanged when sp = 1.

    Args:
        batch: input_ids, labels and optionally position_ids, segment_ids (B, N).
        dims: the built ParallelDims.
        doc_mask: whether attention honours ``segment_ids`` (data.doc_mask).
        stats: optional counter of the halo bytes this rank sends (s2_halo).
        sp_mode: ``s2_halo`` (halo exchange) or ``ulysses`` (DeepSpeed's all-to-all): which context
            the attention layers get; the token slices are the same.
    """
    if dims.sp == 1:
        return batch
    ids = batch["input_ids"]
    b, n = ids.shape
    if n % dims.sp:
        raise ConfigError(f"parallel.sp={dims.sp} does not divide the row length {n}; use a data.max_seq_len "
                          f"that is a multiple of {dims.sp}")
    length = n // dims.sp
    local = slice(dims.sp_rank * length, (dims.sp_rank + 1) * length)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(n, device=ids.device).expand(b, n)
    segments = batch.get("segment_ids") if doc_mask else None
    segments = None if segments is None else segments.cpu()
    if sp_mode == "ulysses":
        ctx = build_ulysses_context(positions.cpu(), segments, dims, local)
    elif sp_mode == "s2_halo":
        ctx = build_context(positions.cpu(), segments, dims, stats=stats)
    else:
        raise ConfigError(f"parallel.sp_mode={sp_mode!r} is not one of s2_halo, ulysses")
    return {"input_ids": ids[:, local], "labels": batch["labels"][:, local],
            "position_ids": positions[:, local], "sp_context": ctx}
