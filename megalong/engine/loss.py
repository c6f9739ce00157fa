"""Chunked cross-entropy: the loss from last hidden states and the lm_head weight, without
ever materialising the (tokens × vocab) logits.

    hidden (T, d) ──chunk──► h_c (C, d) @ Wᵀ ──► logits_c (C, V) fp32 ──► lse_c, loss_c
                                                   (freed before the next chunk)
    backward: logits_c recomputed per chunk; softmax = exp(logits_c − lse_c);
              dlogits = (softmax − onehot)·g ; dh_c = dlogits @ W ; dW += dlogitsᵀ @ h_c

At 32k tokens and a 32k vocabulary, full fp32 logits are 4 GiB (plus as much again for their
gradient); chunks of 1024 tokens need 128 MiB. The result is a *sum* over valid tokens and their
count, so the caller can normalise by a global token count (over grad-accumulation steps and
data-parallel ranks) rather than averaging averages. Evaluation runs the same chunks without
autograd (``chunked_token_losses``: per-token losses, for perplexity).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megalong.data.batch import IGNORE_INDEX


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()  # (C, V) fp32


def _chunk_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  chunk_size: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, end, lse_c, loss_c) per chunk of ``chunk_size`` tokens; loss_c is 0 where the label is ignored.

    The one chunking loop: the training forward and the no-grad evaluation both run it.
    """
    T = hidden.shape[0]  # hidden (T, d), labels (T,)
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        logits = _chunk_logits(hidden[s:e], weight, bias)  # (C, V)
        lab = labels[s:e]
        lse_c = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
        del logits  # one (C, V) buffer alive at a time
        yield s, e, lse_c, torch.where(lab != IGNORE_INDEX, lse_c - target, torch.zeros_like(lse_c))


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):  # noqa: D102
        # hidden (T, d), weight (V, d), labels (T,)
        T = hidden.shape[0]
        lse = torch.empty(T, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s, e, lse_c, loss_c in _chunk_losses(hidden, weight, bias, labels, chunk_size):
            total += loss_c.sum()
            lse[s:e] = lse_c
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        T = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, T, ctx.chunk_size):
            e = min(T, s + ctx.chunk_size)
            h = hidden[s:e]
            logits = _chunk_logits(h, weight, bias)  # (C, V)
            lab = labels[s:e]
            # in place, one (C, V) buffer: softmax - onehot, scaled by the incoming gradient (0 if ignored)
            dlogits = logits.sub_(lse[s:e].unsqueeze(1)).exp_()
            dlogits.scatter_add_(1, lab.clamp(min=0).unsqueeze(1), torch.full_like(lse[s:e], -1.0).unsqueeze(1))
            row_scale = torch.where(lab != IGNORE_INDEX, grad_total.to(dlogits.dtype), torch.zeros_like(lse[s:e]))
            dlogits.mul_(row_scale.unsqueeze(1))
            d = dlogits.to(h.dtype)
            if need_h:
                grad_h[s:e] = d @ weight
            if need_w:
                grad_w += (d.t() @ h).float()
            if need_b:
                grad_b += dlogits.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _flat_tokens(hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, d) hidden states and (T,) labels, checked against each other and the chunk size."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    h = hidden.reshape(-1, hidden.shape[-1])  # (T, d)
    lab = labels.reshape(-1)
    if lab.shape[0] != h.shape[0]:
        raise ValueError(f"labels have {lab.shape[0]} tokens but hidden states have {h.shape[0]}")
    return h, lab


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies and the number of valid tokens.

    Args:
        hidden: (..., d) last hidden states (any leading dims, e.g. (B, N, d)).
        weight: (V, d) output-embedding weight.
        labels: (...) target ids aligned with ``hidden`` (already shifted); -100 is ignored.
        bias: optional (V,) output bias.
        chunk_size: tokens per chunk.

    Returns:
        (loss_sum fp32 scalar with grad, count int64 scalar)
    """
    h, lab = _flat_tokens(hidden, labels, chunk_size)
    count = (lab != IGNORE_INDEX).sum()
    return _ChunkedCE.apply(h, weight, bias, lab, int(chunk_size)), count


@torch.no_grad()
def chunked_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token cross-entropies without gradients (evaluation), chunk by chunk like the training loss.

    Args:
        hidden: (..., d) last hidden states.
        weight: (V, d) output-embedding weight.
        labels: (...) target ids aligned with ``hidden`` (already shifted); -100 is ignored.
        bias: optional (V,) output bias.
        chunk_size: tokens per chunk; at most one (chunk_size, V) fp32 logits buffer is alive.

    Returns:
        fp32 losses shaped like ``labels``, 0 at ignored positions.
    """
    h, lab = _flat_tokens(hidden, labels, chunk_size)
    out = torch.empty(lab.shape[0], dtype=torch.float32, device=h.device)
    for s, e, _, loss_c in _chunk_losses(h, weight, bias, lab, int(chunk_size)):
        out[s:e] = loss_c
    return out.view(labels.shape)


def plain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: sum of token cross-entropies from full logits, and the valid-token count."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1)
    return F.cross_entropy(flat, lab, ignore_index=IGNORE_INDEX, reduction="sum"), (lab != IGNORE_INDEX).sum()


class ChunkedLMHead(nn.Module):
    """Owns (shares) the lm_head parameters and computes the chunked loss from hidden states.

    Holding the parameters directly (not the lm_head module) matters under ZeRO-3: DeepSpeed gathers
    a module's own parameters around its forward and backward, so the weight is whole exactly while
    the chunks run.
    """

    def __init__(self, lm_head: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.weight = lm_head.weight
        self.bias = getattr(lm_head, "bias", None)
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunked_cross_entropy(hidden, self.weight, labels, bias=self.bias, chunk_size=self.chunk_size)
