"""transformers integration: S²-Attn and segment-aware full attention as registered implementations.

No monkey-patching: two names are registered in transformers' ``AttentionInterface`` and, with
matching mask functions, in ``AttentionMaskInterface`` (an implementation without a mask function
gets ``attention_mask=None`` from ``create_causal_mask``, i.e. padding silently dropped):

    "megalong_s2"    training: S²-Attn with the group size stored on each attention module
    "megalong_full"  eval/generation: causal attention that also honours ``segment_ids``;
                     exactly stock ``sdpa`` whenever there are no documents

    model(input_ids, attention_mask=?, position_ids=?, segment_ids=?)
      └─ create_causal_mask ─► mask fn ─► 2D padding mask or None (4D only in stock-only cases)
      └─ decoder layer ─► attention module ─► AttentionInterface[name](module, q, k, v, mask,
                                                   position_ids=…, segment_ids=…)   (**kwargs)

``segment_ids`` travels from ``model(...)`` through transformers' ``**kwargs`` to the attention
function (checked for Llama, Mistral and Qwen2 on transformers 5.24). Without ``segment_ids``,
position ids that restart (packed rows) define the documents, as transformers does for its own
packed-sequence detection. A padding mask is folded into the documents (pad runs are their own
documents). Switch with ``use_s2_attention`` / ``use_full_attention`` (these unwrap peft,
DeepSpeed and DDP wrappers), and back with ``model.set_attn_implementation("sdpa")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .layout import IdentityCache, combine_segments_and_padding, doc_starts, segments_from_position_ids
from .s2attn import BACKENDS, check_group_size, full_attention, s2_attention

__all__ = [
    "S2_IMPLEMENTATION",
    "FULL_IMPLEMENTATION",
    "register_attention",
    "use_s2_attention",
    "use_full_attention",
    "unwrap_model",
    "attention_modules",
]

S2_IMPLEMENTATION = "megalong_s2"
FULL_IMPLEMENTATION = "megalong_full"
SPEC_ATTR = "megalong_attention"


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention module runs: set once per switch (``use_s2_attention`` / ``use_full_attention``)."""

    group_size: int | None
    """S²-Attn group size G; None for full attention."""
    backend: str = "sdpa"
    """Kernel: ``sdpa``, ``flash`` or ``reference``."""
    shift: bool = True
    """False: short attention (the S²-Attn groups, no shifted heads; LongLoRA's pilot baseline)."""
    deterministic: bool = False
    """flash backend: flash-attn's deterministic backward (``attention.deterministic``)."""


def _spec(module: nn.Module) -> AttentionSpec:
    return getattr(module, SPEC_ATTR, None) or AttentionSpec(None)

_SEGMENTS = IdentityCache()


# ---------------------------------------------------------------------------------------------
# Mask functions (called once per forward by create_causal_mask)
# ---------------------------------------------------------------------------------------------


def _padding_mask(attention_mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    """The 2D boolean padding mask over the kv positions, or None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def s2_attention_mask(
    batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | None:
    """Mask function for "megalong_s2": the 2D padding mask (None if no padding)."""
    return _padding_mask(attention_mask, kv_length)


def full_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for "megalong_full": None for plain causal rows, else stock ``sdpa_mask``.

    Returning None keeps documents (``segment_ids`` or restarting position ids) on the efficient
    chunked path; padding, KV caches, effective sliding windows and custom overlays get exactly
    the stock 4D mask.
    """
    plain = (
        not use_vmap
        and q_length == kv_length
        and not bool(q_offset)
        and not bool(kv_offset)
        and (local_size is None or kv_length <= local_size)
        and _padding_mask(attention_mask, kv_length) is None
    )
    if plain:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        use_vmap=use_vmap,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Attention functions (called by every attention module)
# ---------------------------------------------------------------------------------------------


def _documents(
    padding: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch: int,
) -> torch.Tensor | None:
    """(B, N) ids whose runs are the documents, from segment ids, restarting positions, padding.

    Memoised on the identity of the inputs, which are the same objects in every layer.
    """
    extra = (batch,)
    tensors = (padding, segment_ids, position_ids)
    hit = _SEGMENTS.get(tensors, extra)
    if hit is not None:
        return hit[0]
    seg = segment_ids
    if seg is None and padding is None and position_ids is not None:
        seg = segments_from_position_ids(position_ids.expand(batch, -1))
    docs = combine_segments_and_padding(seg, padding)
    _SEGMENTS.put(tensors, extra, (docs,))
    return docs


def _check_call(dropout: float, kwargs: dict) -> None:
    if dropout:
        raise ValueError(
            f"megalong attention does not implement attention dropout (got p={dropout}); "
            "set config.attention_dropout = 0.0 (LongLoRA trains without it)"
        )
    if kwargs.get("is_causal") is False:
        raise ValueError("megalong attention is causal only; use 'sdpa' for bidirectional attention")
    if kwargs.get("softcap") is not None:
        raise ValueError("megalong attention does not support logit softcapping; use 'eager'")


def _group_size(module: nn.Module) -> int:
    group_size = _spec(module).group_size
    if group_size is None:
        raise ValueError(
            f"{type(module).__name__} has no S²-Attn group size: switch with "
            "megalong.attention.use_s2_attention(model, group_size=...) rather than "
            f"set_attn_implementation({S2_IMPLEMENTATION!r}) alone"
        )
    return group_size


def s2_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry "megalong_s2": q (B, H, N, D) -> ((B, N, H, D), None)."""
    _check_call(dropout, kwargs)
    group_size = _group_size(module)
    spec = _spec(module)
    window = kwargs.get("sliding_window")
    if window is not None and group_size > window:
        raise ValueError(
            f"group_size={group_size} exceeds the model's sliding_window={window}; use a group size "
            f"<= {window} (then the window never cuts a group)"
        )
    sp = kwargs.get("sp_context")
    if sp is not None:  # sequence parallel (megalong.parallel): halo exchange or Ulysses all-to-all
        if not spec.shift:
            raise ValueError("short attention (attention.train=short) is not built for sequence parallelism; "
                             "use parallel.sp=1")
        out = sp.attend(query, key, value, group_size, spec.backend, scaling, module=module,
                        deterministic=spec.deterministic)
        return out.transpose(1, 2), None  # (B, L, H, Dv)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"S²-Attn got a {attention_mask.dim()}D attention mask it cannot honour; pass a 2D "
            "padding mask (1 = token, 0 = pad) and/or segment_ids=(batch, seq_len) instead"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"S²-Attn got {query.shape[2]} queries for {key.shape[2]} keys (a KV cache): it is a "
            "training-time attention; call megalong.attention.use_full_attention(model) before generating"
        )
    docs = _documents(attention_mask, kwargs.get("segment_ids"), kwargs.get("position_ids"), query.shape[0])
    out = s2_attention(query, key, value, group_size, backend=spec.backend, segment_ids=docs, scale=scaling,
                       shift=spec.shift, deterministic=spec.deterministic)
    return out.transpose(1, 2), None  # (B, N, H, Dv)


def _with_segments(mask: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Intersect a 4D boolean (B, 1, Q, K) mask with 'same document' from (B, K) segment ids."""
    q_len = mask.shape[-2]
    doc = doc_starts(segment_ids.to(mask.device)).cumsum(dim=-1)  # (B, K)
    return mask & (doc[:, -q_len:, None] == doc[:, None, :])[:, None]


def full_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry "megalong_full": causal attention honouring ``segment_ids``."""
    segment_ids = kwargs.get("segment_ids")
    spec = _spec(module)
    sp = kwargs.get("sp_context")
    if sp is not None:  # sequence parallel (evaluation at lengths one rank cannot hold)
        _check_call(dropout, kwargs)
        # the whole row's sliding window (Mistral v0.1: 4096): the local mask transformers built is not used
        out = sp.attend(query, key, value, None, spec.backend, scaling, module=module,
                        window=kwargs.get("sliding_window"), deterministic=spec.deterministic)
        return out.transpose(1, 2), None
    if attention_mask is not None:  # a stock 4D mask (padding, cache, window): stock sdpa
        if segment_ids is not None:
            attention_mask = _with_segments(attention_mask, segment_ids)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids") if q_len == kv_len else None
    docs = _documents(None, segment_ids, position_ids, query.shape[0])
    if docs is None and spec.backend == "sdpa":  # plain causal rows: exactly stock sdpa
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    _check_call(dropout, kwargs)
    out = full_attention(query, key, value, backend=spec.backend, segment_ids=docs, scale=scaling,
                         deterministic=spec.deterministic)
    return out.transpose(1, 2), None  # (B, N, H, Dv)


def register_attention() -> None:
    """Register both implementations and their mask functions with transformers (idempotent)."""
    AttentionInterface.register(S2_IMPLEMENTATION, s2_attention_forward)
    AttentionInterface.register(FULL_IMPLEMENTATION, full_attention_forward)
    AttentionMaskInterface.register(S2_IMPLEMENTATION, s2_attention_mask)
    AttentionMaskInterface.register(FULL_IMPLEMENTATION, full_attention_mask)


# ---------------------------------------------------------------------------------------------
# Switching a model
# ---------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside peft / DeepSpeed-engine / DDP wrappers (or any module holding one)."""
    inner = model
    for _ in range(8):
        if isinstance(inner, PreTrainedModel):
            return inner
        if hasattr(inner, "get_base_model"):  # peft.PeftModel
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), nn.Module):  # DeepSpeedEngine, DDP
            inner = inner.module
        else:
            break
    # Any other wrapper (e.g. a training module holding the HF model): the outermost HF model.
    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is not None:
        return found
    raise TypeError(
        f"no transformers PreTrainedModel found inside {type(model).__name__}; pass the HF model, "
        "its peft wrapper or the DeepSpeed engine"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The per-layer attention modules (the ``module`` argument of attention functions)."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no *Attention modules with a layer_idx; megalong supports "
            "transformers decoders built on AttentionInterface (Llama, Mistral, Qwen2, ...)"
        )
    return found


def _switch(model: nn.Module, implementation: str, group_size: int | None, backend: str,
            shift: bool = True, deterministic: bool = False) -> nn.Module:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}; 'sdpa' works everywhere")
    register_attention()
    base = unwrap_model(model)
    for module in attention_modules(base):
        setattr(module, SPEC_ATTR, AttentionSpec(group_size, backend, shift, deterministic))
    base.set_attn_implementation(implementation)
    return model


def use_s2_attention(model: nn.Module, group_size: int, backend: str = "sdpa", shift: bool = True,
                     deterministic: bool = False) -> nn.Module:
    """Switch every attention layer to S²-Attn with group size G (training).

    Args:
        model: a transformers causal LM, or its peft / DeepSpeed / DDP wrapper.
        group_size: G, even; from the run config (LongLoRA: max_seq_len // 4), not the batch.
        backend: "sdpa", "flash" or "reference".
        shift: False gives short attention: the same groups, no shifted heads.
        deterministic: flash backend: ask flash-attn for its deterministic backward.

    Returns:
        The same ``model`` (modified in place).
    """
    check_group_size(group_size)
    return _switch(model, S2_IMPLEMENTATION, group_size, backend, shift, deterministic)


def use_full_attention(model: nn.Module, backend: str = "sdpa", deterministic: bool = False) -> nn.Module:
    """Switch every attention layer to causal full attention that honours ``segment_ids``."""
    return _switch(model, FULL_IMPLEMENTATION, None, backend, deterministic=deterministic)


register_attention()
