"""The ``flash`` backend: flash-attn's varlen kernel with ``cu_seqlens`` at every chunk boundary.

Each head-half becomes one ``flash_attn_varlen_func`` call over the flattened (B·N, h, D) tokens;
its "sequences" are the chunks of ``layout.py`` (group cuts of that half, document starts, row
starts), so the kernel never computes a masked block and nothing is padded:

    row 0                      row 1
    |0 . . .|4 . . . . . . .|  |0 . . .|4 . .|            shifted half, G = 8, N = 11
    cu_seqlens = [0, 4, 11, 15, 22]   (flattened offsets)

flash-attn is optional and CUDA-only; it is imported lazily, only when this backend is used.
``deterministic=True`` asks for flash-attn's deterministic backward (its default accumulates dq in
an order that varies from run to run); every call passes it explicitly.
GQA is native (query head h uses kv head h // (h_q / h_kv)); a half whose kv heads do not repeat
uniformly gets its kv heads gathered first (see ``heads.py``).
"""

from __future__ import annotations

import torch

from .heads import HalfHeads, split_halves
from .layout import chunk_layout

_INSTALL_HINT = (
    "backend='flash' needs the flash-attn package (CUDA only): `pip install flash-attn "
    "--no-build-isolation` (or `pip install megalong[flash]`); otherwise use backend='sdpa'"
)


def import_flash_attn():
    """Import flash-attn's two entry points lazily, with an install hint when it is missing."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return flash_attn_func, flash_attn_varlen_func


FLASH_DEVICES = ("cuda",)
"""Device types flash-attn's kernels run on (ROCm builds report ``cuda`` too)."""


def check_flash_inputs(q: torch.Tensor) -> None:
    """flash-attn runs fp16/bf16 CUDA tensors only; say so before the kernel does, less clearly."""
    if q.device.type not in FLASH_DEVICES or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"backend='flash' needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}; "
            "cast the model to bf16 on a GPU, or use backend='sdpa' (any dtype, CPU or GPU)"
        )


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, D) -> token-major flattened (B·N, h, D)."""
    batch, heads, seq_len, dim = x.shape
    return x.transpose(1, 2).reshape(batch * seq_len, heads, dim)


def s2_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    segment_ids: torch.Tensor | None,
    scale: float | None,
    positions: torch.Tensor | None = None,
    halves: tuple[HalfHeads, ...] | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """S²-Attn with flash_attn_varlen_func; returns token-major (B, N, H, Dv). ``positions`` /
    ``halves`` / ``deterministic``: see s2_attention."""
    check_flash_inputs(q)
    _, varlen = import_flash_attn()
    batch, _, seq_len, _ = q.shape
    q_f, k_f, v_f = _flat(q), _flat(k), _flat(v)  # (B·N, h, D)
    outs = []
    for half in halves if halves is not None else split_halves(q.shape[1], k.shape[1]):
        offset = group_size // 2 if half.shifted else 0
        cu, max_len = chunk_layout(batch, seq_len, segment_ids, group_size, offset, "flash", q.device, positions)
        q_h = q_f[:, half.q_start : half.q_end].contiguous()  # (B·N, Hh, D)
        k_h = half.select_kv(k_f, 1).contiguous()
        v_h = half.select_kv(v_f, 1).contiguous()
        outs.append(
            varlen(q_h, k_h, v_h, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=True,
                   deterministic=deterministic)
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B·N, H, Dv)
    return out.view(batch, seq_len, out.shape[1], out.shape[2])


def full_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None, scale: float | None,
    window: int | None = None, deterministic: bool = False,
) -> torch.Tensor | None:
    """Causal flash attention; returns token-major (B, Q, H, Dv).

    ``window``: query i sees only keys j > i - window (flash-attn's ``window_size=(window - 1, 0)``).
    Returns None for the one case it leaves to SDPA: documents together with a KV cache
    (q shorter than k), which only happens while decoding packed rows.
    """
    check_flash_inputs(q)
    dense, varlen = import_flash_attn()
    batch, _, q_len, _ = q.shape
    kwargs = {"softmax_scale": scale, "causal": True, "deterministic": deterministic}
    if window is not None:
        kwargs["window_size"] = (window - 1, 0)
    if segment_ids is None:
        # flash-attn aligns the causal mask bottom-right, so q shorter than k (a KV cache) is right.
        return dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, **kwargs)
    if q_len != k.shape[2]:
        return None
    cu, max_len = chunk_layout(batch, q_len, segment_ids, None, 0, "flash", q.device)
    q_f, k_f, v_f = _flat(q).contiguous(), _flat(k).contiguous(), _flat(v).contiguous()
    out = varlen(q_f, k_f, v_f, cu, cu, max_len, max_len, dropout_p=0.0, **kwargs)
    return out.view(batch, q_len, out.shape[1], out.shape[2])
