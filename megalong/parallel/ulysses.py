"""Ulysses sequence parallelism: DeepSpeed's all-to-all (``UlyssesSPAttentionHF``) around megalong's kernels.

    rank r holds tokens [rL, (r+1)L) of a row, all H heads          q (B, H, L, D), k/v (B, H_kv, L, D)
      └─ all-to-all (DeepSpeed) ─►  the whole row, heads [r·H/sp, (r+1)·H/sp)     q (B, H/sp, N, D)
            └─ megalong's S²-Attn / full-attention kernel on the whole row, documents and padding
               from this context (the shifted half follows the GLOBAL head index: HeadLayout q_start)
      └─ all-to-all back (DeepSpeed) ─►  (B, L, H·D) for this rank's tokens

What DeepSpeed 0.19.8's ``UlyssesSPAttentionHF`` does and megalong deals with (read from its source,
measured on gloo):
- it drops any attention mask: documents and padding reach the kernel through this context (the
  whole row's document ids and in-document positions, the same layout the halo mode uses);
- it all-gathers ``position_ids`` from the call's kwargs and asserts they are there: megalong always
  passes the rank's global position ids (``megalong.parallel.sharding``), never HF's local 0..L-1;
- with fewer KV heads than sp it repeats K/V to one head per rank and sets the attention module's
  ``num_key_value_groups`` for good, which breaks a later non-parallel evaluation (stock SDPA reads
  it): megalong restores the attribute after every call;
- ``register_with_transformers`` registers a process-global wrapper and builds its own process
  groups (``parallel_state_sp``): megalong does not call it. The module is built directly on the
  sp group of megalong's ``ParallelDims`` (one owner of the groups: ``DeepSpeedMPU``), once per
  (group, micro-batch, head shape), and called from megalong's registered attention functions;
- it asserts a fixed micro-batch size: one instance per batch size (evaluation may differ).

``UlyssesSPDataLoaderAdapter`` is not used either: megalong's loader already gives every rank of a
row the same row and ``shard_batch`` cuts it, with labels shifted before the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalong.attention.heads import HeadLayout

_INSTANCES: dict[tuple, object] = {}


def _ulysses(group, batch: int, heads: int, kv_heads: int, head_dim: int):
    """DeepSpeed's all-to-all attention wrapper for one (group, batch, head shape), built once."""
    key = (id(group), batch, heads, kv_heads, head_dim)
    inst = _INSTANCES.get(key)
    if inst is None:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        inst = UlyssesSPAttentionHF(attn=_core, batch_size=batch, attn_head_count=heads, attn_head_size=head_dim,
                                    kv_head_count=kv_heads, num_hidden_layers=1, process_group=group,
                                    seq_length_is_variable=True)
        _INSTANCES[key] = inst
    return inst


def _core(module, query, key, value, attention_mask, *args, megalong_core=None, **kwargs):
    """The core attention DeepSpeed calls between its two all-to-alls: (B, H/sp, N, D) -> (B, N, H/sp, D)."""
    return megalong_core(query, key, value).transpose(1, 2), None


@dataclass
class UlyssesContext:
    """What the attention layers of one forward pass need for Ulysses (``sp_context`` in the kwargs).

    Attributes:
        rank, sp, group: this rank's index in its sequence-parallel group, the group size, the group.
        pos_in_doc: (B, N) position of every token of the whole row inside its document.
        doc_ids: (B, N) document index of every token of the whole row (padding runs are documents).
        position_ids: (B, L) this rank's global position ids (DeepSpeed all-gathers them).
    """

    rank: int
    sp: int
    group: object
    pos_in_doc: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int | None,
               backend: str, scale: float | None, module: torch.nn.Module | None = None,
               window: int | None = None, deterministic: bool = False) -> torch.Tensor:
        """This rank's (B, H, L, D) attention output; q (B, H, L, D), k/v (B, H_kv, L, D) local slices.
        ``window``: full attention's sliding window over the whole row (None: none)."""
        from megalong.attention.s2attn import full_attention, s2_attention

        b, h, length, d = query.shape
        h_kv = key.shape[1]
        if h % self.sp or (h_kv % self.sp and self.sp % h_kv):
            raise ValueError(f"Ulysses with sp={self.sp} needs the {h} query heads divisible by sp and the {h_kv} "
                             "KV heads divisible by sp (or sp by them); use parallel.sp_mode=s2_halo")
        if value.shape[-1] != d:
            raise ValueError(f"Ulysses needs equal query and value head sizes (got {d} and {value.shape[-1]})")
        device = query.device
        docs, pos = self.doc_ids.to(device), self.pos_in_doc.to(device)
        heads = HeadLayout(h, h_kv, self.rank * (h // self.sp))

        def core(q, k, v):
            if group_size is None:
                return full_attention(q, k, v, backend=backend, segment_ids=docs, scale=scale, window=window,
                                      deterministic=deterministic)
            return s2_attention(q, k, v, group_size, backend=backend, segment_ids=docs, scale=scale,
                                positions=pos, heads=heads, deterministic=deterministic)

        holder = module if module is not None else torch.nn.Module()
        saved = holder.__dict__.get("num_key_value_groups", None)
        try:
            out, _ = _ulysses(self.group, b, h, h_kv, d)(holder, query, key, value, None,
                                                         position_ids=self.position_ids.to(device),
                                                         megalong_core=core)
        finally:  # DeepSpeed rewrites it when it repeats K/V (KV heads < sp); later non-SP calls need the model's
            if saved is None:
                holder.__dict__.pop("num_key_value_groups", None)
            else:
                holder.num_key_value_groups = saved
        return out.view(b, length, h, d).transpose(1, 2)


def build_ulysses_context(position_ids_full: torch.Tensor, segment_ids_full: torch.Tensor | None, dims,
                          local: slice) -> UlyssesContext:
    """The per-batch Ulysses context from the whole row's position ids (B, N) and optional segment ids."""
    from megalong.parallel.s2_halo import row_documents

    pos_in_doc, doc_ids = row_documents(position_ids_full, segment_ids_full)
    return UlyssesContext(dims.sp_rank, dims.sp, dims.groups.get("sp"), pos_in_doc, doc_ids,
                          position_ids_full[:, local].contiguous())
