"""Memory for very long rows: sequence-tiled MLPs and host offload of checkpointed activations.

Both come from DeepSpeed's ALST recipe (Arctic Long Sequence Training; DeepSpeed 0.19's
``runtime/sequence_parallel/ulysses_sp.py`` and ``runtime/activation_checkpointing/
offload_activations.py``); megalong uses them as a library and adds only what they lack.

Tiled MLP (``train.tiled_mlp``). An MLP is token-wise, so it can run over the row in tiles:

    x (B, N, h) ─ chunk rows ─► tile 0 ─► MLP ─┐
                            ├─► tile 1 ─► MLP ─┼─ cat ─► y (B, N, h)      forward: no_grad per tile
                            └─► ...            ┘
    backward: per tile, recompute MLP(tile) with grad, backward it, write dx of the tile in place

so the (B·N, intermediate) activations (3 of them for a gated MLP: 3·N·i·bytes, the largest
tensors of a layer at long N) exist for one tile at a time. Cost: one more MLP forward per layer.

What DeepSpeed's ``TiledMLP`` lacks, handled here:
- it must be told the *trainable* parameters a tile touches (``compute_params``), so that
  ZeRO-1/2/3 reduce their gradient once, after the last tile (else ZeRO-1/2 assert "gradient
  computed twice"); ``None`` raises: frozen MLPs pass ``[]``; LoRA on MLP projections passes the
  adapter weights.
- it marks "last tile" as ``i + 1 == shards``, but ``torch.chunk`` may return *fewer* chunks
  than asked (6 rows into 4 chunks gives 3): the gradient would then never be released. The
  tile count is rounded to one ``torch.chunk`` honours exactly (``tile_count``).
- its output requires grad only when ``x`` does; with LoRA on the MLP and an ``x`` that needs no
  grad, the adapters would silently get none, so ``x`` is made to require grad then.
- every rank must run the same number of tiles (ZeRO-3 gathers the MLP weights per tile: a
  different count is a hang). The count is derived from the local row shape, which megalong
  keeps equal on all ranks (fixed-length rows, equal sequence-parallel slices).

Activation offload (``train.offload_activations``): DeepSpeed's ``CheckpointHiddenStatesOffload``
is a saved-tensors hook that moves the input of every checkpointed (transformers) decoder layer
to pinned host memory during forward and brings it back for backward. Forward *and* backward of
a micro-batch must run inside it (its bookkeeping is cleared on exit). On CPU it passes every
tensor through (host memory is the device memory).

What it lacks, handled here: DeepSpeed 0.19.8 unpacks with ``cache=True`` (for a second backward
through one graph, ``retain_graph``) and keeps every input it brought back until the context exits;
forward and backward run inside the context, so by the first layer's backward every layer input is
on the device again and the peak is the one without offload. megalong runs one backward per
forward (its loss refuses a second), so ``FreeingOffload`` unpacks with ``cache=False``: a
restored input is dropped by the engine once its layer has recomputed, and the device holds only
the inputs still in flight.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from megalong.config.schema import Config, ConfigError
from megalong.models.loading import decoder_of

TILED_ATTR = "_megalong_tiled_mlp"
OFFLOAD_ATTR = "_megalong_activation_offload"


def tile_count(rows: int, shards: int) -> int:
    """The tile count nearest below ``shards`` for which ``torch.chunk(rows, count)`` returns exactly
    ``count`` chunks (chunk size ceil(rows / shards), the last one possibly shorter)."""
    shards = max(1, min(shards, rows))
    return math.ceil(rows / math.ceil(rows / shards))


def auto_shards(tokens: int, hidden_size: int) -> int:
    """ALST's default: tiles of about ``hidden_size`` tokens (a tile's MLP activations are then no
    larger than the layer's weights' activations at hidden_size tokens)."""
    return max(1, math.ceil(tokens / hidden_size))


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder layer (``layers[i].mlp`` in Llama, Mistral, Qwen2 and most HF decoders)."""
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise ConfigError(
            f"train.tiled_mlp: {type(decoder_of(model)).__name__} has no .layers; set train.tiled_mlp=false"
        )
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if any(m is None for m in mlps):
        raise ConfigError(
            f"train.tiled_mlp: the decoder layers of {type(decoder_of(model)).__name__} have no .mlp module; "
            "set train.tiled_mlp=false"
        )
    return mlps


def tiled_mlp_call(forward: Callable[[torch.Tensor], torch.Tensor], mlp: nn.Module, x: torch.Tensor,
                   shards: int = 0) -> torch.Tensor:
    """``forward(x)`` (an MLP's own forward, (..., N, h) -> (..., N, h)) computed in sequence tiles by
    DeepSpeed's ``TiledMLP``; ``shards`` 0 means ``auto_shards``. Equal to ``forward(x)`` in output and
    in every gradient (of ``x`` and of ``mlp``'s trainable parameters)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    rows = x.shape[:-1].numel()  # backward tiles the flattened (B·N, h) rows
    n = tile_count(rows, shards or auto_shards(rows, x.shape[-1]))
    if n <= 1:
        return forward(x)
    params = [p for p in mlp.parameters() if p.requires_grad]  # released to ZeRO after the last tile only
    if params and torch.is_grad_enabled() and not x.requires_grad:
        x = x.detach().requires_grad_(True)  # else TiledMLP's output needs no grad and the params get none
    return TiledMLP.apply(lambda _module, tile: forward(tile), mlp, x, n, params)


def apply_tiled_mlp(model: nn.Module, shards: int = 0) -> int:
    """Make every decoder layer's MLP run tiled (see the module docstring); returns how many.

    The MLP module itself stays in place (state-dict names, LoRA wrappers and ZeRO-3 hooks are
    untouched): only its instance ``forward`` is replaced, and calling this twice is harmless."""
    mlps = mlp_modules(model)
    for mlp in mlps:
        if getattr(mlp, TILED_ATTR, False):
            continue
        own_forward = mlp.forward  # the class forward, bound (LoRA layers inside it stay wrapped)

        def forward(x: torch.Tensor, _mlp=mlp, _fwd=own_forward) -> torch.Tensor:
            return tiled_mlp_call(_fwd, _mlp, x, shards)

        mlp.forward = forward
        setattr(mlp, TILED_ATTR, True)
    return len(mlps)


# ---------------------------------------------------------------- activation offload
def freeing_offload(**kwargs):
    """DeepSpeed's ``CheckpointHiddenStatesOffload`` that hands each restored layer input out once and
    keeps no reference to it (see the module docstring); ``kwargs`` as DeepSpeed's constructor."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        CheckpointHiddenStatesOffload,
        _OffloadedTensorRef,
    )

    class FreeingOffload(CheckpointHiddenStatesOffload):
        def _unpack_tensor(self, maybe_ref):
            if isinstance(maybe_ref, _OffloadedTensorRef):
                return self._restore_tensor(maybe_ref.tensor_id, cache=False)
            return maybe_ref

    return FreeingOffload(**kwargs)


def attach_activation_offload(model: nn.Module) -> None:
    """Create the offload context once (its pinned host buffers are reused every step) and keep it on
    ``model`` for ``activation_offload``."""
    setattr(model, OFFLOAD_ATTR, freeing_offload())


def activation_offload(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context one micro-batch's forward and backward run in: DeepSpeed's offload of
    checkpointed layer inputs when ``train.offload_activations`` attached it, else a no-op."""
    return getattr(model, OFFLOAD_ATTR, None) or contextlib.nullcontext()


def apply_memory_tiling(cfg: Config, model: nn.Module) -> None:
    """The ``train.tiled_mlp`` / ``train.offload_activations`` part of building the training model."""
    if cfg.train.tiled_mlp:
        apply_tiled_mlp(model, cfg.train.tiled_mlp_shards)
    if cfg.train.offload_activations:
        attach_activation_offload(model)
