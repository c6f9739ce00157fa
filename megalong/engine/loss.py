"""Chunked cross-entropy: the loss from last hidden states and the lm_head weight, without
ever materialising the (tokens × vocab) logits.

    hidden (T, d) ──chunk──► h_c (C, d) @ Wᵀ ──► logits_c (C, V) fp32 ──► lse_c, loss_c
                                                   (freed before the next chunk)
    with autograd, in the same pass: dlogits = softmax − onehot (in place in logits_c);
              dh_c = dlogits @ W ; dW += dlogitsᵀ @ h_c          backward: (dh, dW) · g

At 32k tokens and a 32k vocabulary, full fp32 logits are 4 GiB (plus as much again for their
gradient); chunks of 1024 tokens need 128 MiB. The result is a *sum* over valid tokens and their
count, so the caller can normalise by a global token count (over grad-accumulation steps and
data-parallel ranks) rather than averaging averages. Evaluation runs the same chunks without
autograd (``chunked_token_losses``: per-token losses, for perplexity).

Final logit soft-capping (Gemma 2; Gemma 3 configs may set it): logits_c = c·tanh(z/c) per chunk, and
dz = dlogits ⊙ (1 − (logits_c/c)²) — exact, one more (C, V) buffer while a chunk is alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megalong.data.batch import IGNORE_INDEX


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None = None) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()  # (C, V) fp32
    if softcap is not None:  # as the model's forward: c · tanh(z / c)
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _chunk_losses(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk_size: int,
    on_logits: Callable | None = None, softcap: float | None = None,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, end, lse_c, loss_c) per chunk of ``chunk_size`` tokens; loss_c is 0 where the label is ignored.

    The one chunking loop: the training forward and the no-grad evaluation both run it.
    ``on_logits(start, end, logits_c, lse_c)`` sees each chunk's logits last (it may overwrite them).
    """
    T = hidden.shape[0]  # hidden (T, d), labels (T,)
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        logits = _chunk_logits(hidden[s:e], weight, bias, softcap)  # (C, V)
        lab = labels[s:e]
        lse_c = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
        if on_logits is not None:
            on_logits(s, e, logits, lse_c)
        del logits  # one (C, V) buffer alive at a time
        yield s, e, lse_c, torch.where(lab != IGNORE_INDEX, lse_c - target, torch.zeros_like(lse_c))


class _ChunkedCE(torch.autograd.Function):
    """Forward computes the loss *and*, when autograd needs them, the gradients (the loss is a sum and
    the last operation, so its incoming gradient is a scalar that only scales them): each chunk's
    logits are built once, turned into dlogits in place, and freed. Backward multiplies by the scalar.
    (Recomputing the logits in backward instead costs one more (N × d × V) matmul: ~25% of the loss
    time on CPU, docs/BENCHMARKS.md "Tiled loss".)"""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, with_grad: bool,  # noqa: D102
                softcap: float | None = None):
        # hidden (T, d), weight (V, d), labels (T,)
        need_h, need_w, need_b = (with_grad and ctx.needs_input_grad[i] for i in range(3))
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

        def chunk_grads(s: int, e: int, logits: torch.Tensor, lse: torch.Tensor) -> None:
            lab = labels[s:e]
            # d tanh: 1 - (capped / c)², before the capped logits are overwritten
            dcap = None if softcap is None else (logits / softcap).square_().neg_().add_(1.0)
            # in place, one (C, V) buffer: softmax - onehot, 0 on ignored rows
            dlogits = logits.sub_(lse.unsqueeze(1)).exp_()
            dlogits.scatter_add_(1, lab.clamp(min=0).unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
            dlogits.mul_((lab != IGNORE_INDEX).to(dlogits.dtype).unsqueeze(1))
            if dcap is not None:
                dlogits.mul_(dcap)
            d = dlogits.to(hidden.dtype)
            if need_h:
                grad_h[s:e] = d @ weight
            if need_w:
                grad_w.add_((d.t() @ hidden[s:e]).float())
            if need_b:
                grad_b.add_(dlogits.sum(0))

        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        on_logits = chunk_grads if (need_h or need_w or need_b) else None
        for _, _, _, loss_c in _chunk_losses(hidden, weight, bias, labels, chunk_size, on_logits, softcap):
            total += loss_c.sum()
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("chunked_cross_entropy: backward ran twice through one forward (retain_graph); "
                               "its gradients are computed in forward and handed out once")
        ctx.grads = None  # scaled in place, handed out once
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads)
        return grad_h, grad_w, grad_b, None, None, None, None


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
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies and the number of valid tokens.

    Args:
        hidden: (..., d) last hidden states (any leading dims, e.g. (B, N, d)).
        weight: (V, d) output-embedding weight.
        labels: (...) target ids aligned with ``hidden`` (already shifted); -100 is ignored.
        bias: optional (V,) output bias.
        chunk_size: tokens per chunk.
        softcap: the model's final logit soft-cap c (logits = c·tanh(z/c)), or None.

    Returns:
        (loss_sum fp32 scalar with grad, count int64 scalar)
    """
    h, lab = _flat_tokens(hidden, labels, chunk_size)
    count = (lab != IGNORE_INDEX).sum()
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedCE.apply(h, weight, bias, lab, int(chunk_size), with_grad, _softcap(softcap)), count


@torch.no_grad()
def chunked_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token cross-entropies without gradients (evaluation), chunk by chunk like the training loss.

    Args:
        hidden: (..., d) last hidden states.
        weight: (V, d) output-embedding weight.
        labels: (...) target ids aligned with ``hidden`` (already shifted); -100 is ignored.
        bias: optional (V,) output bias.
        chunk_size: tokens per chunk; at most one (chunk_size, V) fp32 logits buffer is alive.
        softcap: the model's final logit soft-cap, or None.

    Returns:
        fp32 losses shaped like ``labels``, 0 at ignored positions.
    """
    h, lab = _flat_tokens(hidden, labels, chunk_size)
    out = torch.empty(lab.shape[0], dtype=torch.float32, device=h.device)
    for s, e, _, loss_c in _chunk_losses(h, weight, bias, lab, int(chunk_size), softcap=_softcap(softcap)):
        out[s:e] = loss_c
    return out.view(labels.shape)


def _softcap(value: float | None) -> float | None:
    if value is None:
        return None
    if not value > 0:
        raise ValueError(f"final logit softcap {value} must be positive (or None)")
    return float(value)


def logit_softcap_of(model: nn.Module) -> float | None:
    """The final logit soft-cap the model's forward applies (``config.final_logit_softcapping``), or None."""
    from megalong.models.loading import unwrap_peft

    return getattr(getattr(unwrap_peft(model), "config", None), "final_logit_softcapping", None)


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

    def __init__(self, lm_head: nn.Module, chunk_size: int = 1024, softcap: float | None = None) -> None:
        super().__init__()
        self.weight = lm_head.weight
        self.bias = getattr(lm_head, "bias", None)
        self.chunk_size = chunk_size
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunked_cross_entropy(hidden, self.weight, labels, bias=self.bias, chunk_size=self.chunk_size,
                                     softcap=self.softcap)
