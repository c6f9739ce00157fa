"""Perplexity at a context length, with full attention, in the two protocols people report.

``longlora`` (the LongLoRA paper's numbers): over every document of at least ``seq_len + 1``
tokens, windows of ``seq_len + 1`` tokens starting every ``stride`` (256) tokens; each window
scores its ``seq_len`` next-token predictions; the result is exp(mean over windows of the
window's mean loss). Windows overlap, so late tokens in long documents count many times.

    doc:     |-------------------------------------------------|
    windows: [0 ........ N]                                       each N+1 tokens
                 [256 ....... 256+N]
                     [512 ....... 512+N]   ...  while start + N + 1 <= len(doc)

``standard``: every document split into non-overlapping windows (the last one shorter), each
token after a window's first predicted exactly once; exp(Σ token losses / Σ tokens).

Both report the tokens and windows they used, and how much of the scored text had long context
(``long_context_fraction``: scored tokens with at least ⌈N/2⌉ tokens of context inside their window;
``short_documents``: scored documents with fewer than N + 1 tokens, which never fill a window). A
``standard`` score over short documents is a short-context score whatever ``seq_len`` says;
``min_doc_len`` (N + 1: only full windows' documents) leaves those out.

Scoring never holds (tokens × vocab) logits: the decoder body gives hidden states and the lm_head
runs chunk by chunk (``megalong.engine.loss.chunked_token_losses``, the trainer's chunking).
``loss_chunk_size=0`` is the plain ``model(x).logits`` path, kept as the reference.

Under sequence parallelism (``parallel``: a ``megalong.eval.sp.SequenceParallelEval``) every rank of
the group reads the same windows; each window is split over the ranks, each scores its slice, and
the gathered per-token losses are those of one process, so the protocols above are unchanged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    protocol: str
    seq_len: int
    ppl: float
    loss: float
    tokens: int
    windows: int
    documents: int
    long_context_tokens: int = 0
    """Scored tokens whose context inside their window is at least ⌈seq_len/2⌉ tokens."""
    long_context_fraction: float = 0.0
    """long_context_tokens / tokens (longlora windows are all full: just over 0.5)."""
    short_documents: int = 0
    """Scored documents with fewer than seq_len + 1 tokens: none of their tokens saw a full window."""
    skipped_documents: int = 0
    """Documents left out: shorter than min_doc_len, or too short for any window of the protocol."""
    min_doc_len: int = 0
    """Documents shorter than this were not scored (0: no limit beyond the protocol's)."""
    loss_chunk_size: int = 0
    """Tokens per lm_head chunk (0: full logits)."""
    window_loss: list[float] = field(default_factory=list, repr=False)
    """Mean token loss of each scored window, in order (their spread); left out of ``to_dict``."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("window_loss")
        return out


def longlora_windows(doc_len: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) token spans of ``seq_len + 1`` tokens every ``stride`` tokens."""
    return [(s, s + seq_len + 1) for s in range(0, doc_len - seq_len, stride)]


def standard_windows(doc_len: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping spans: window k covers tokens [k·N, (k+1)·N + 1) clipped to the document."""
    return [(s, min(doc_len, s + seq_len + 1)) for s in range(0, doc_len - 1, seq_len)]


def long_context_count(predictions: int, seq_len: int) -> int:
    """How many of a window's ``predictions`` have at least ⌈seq_len/2⌉ tokens of context.

    Prediction p (0-based) sees p + 1 tokens, so those with p + 1 >= ⌈N/2⌉ count."""
    return max(0, predictions - (seq_len + 1) // 2 + 1)


_LOGIT_POSTPROCESSING = ("logit_scale", "logits_scaling")


def check_plain_lm_head(model) -> None:
    """The chunked head computes ``lm_head(hidden)`` (and the final logit soft-cap); a family that rescales
    logits needs the full path."""
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} post-processes its logits ({name}={value}); the chunked "
                             "lm_head does not; evaluate it with loss_chunk_size=0 (--loss-chunk-size 0)")


@torch.no_grad()
def token_losses(model, x: torch.Tensor, loss_chunk_size: int = 1024, parallel=None) -> torch.Tensor:
    """Next-token losses (b, n) fp32 of windows ``x`` (b, n + 1).

    ``loss_chunk_size`` > 0: decoder body + chunked lm_head (plain HF or peft-wrapped models);
    0: full ``model(x).logits`` (b, n, V), the reference. ``parallel``: split each window over a
    sequence-parallel group (``SequenceParallelEval``); every rank gets the whole (b, n)."""
    if parallel is not None:
        return parallel.token_losses(model, x, loss_chunk_size)
    inputs, labels = x[:, :-1], x[:, 1:]  # (b, n), (b, n)
    if loss_chunk_size == 0:
        logits = model(input_ids=inputs, use_cache=False).logits.float()  # (b, n, V)
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (b, n)
    from megalong.engine.loss import chunked_token_losses, logit_softcap_of
    from megalong.models.loading import decoder_of, lm_head_of

    hidden = decoder_of(model)(input_ids=inputs, use_cache=False).last_hidden_state  # (b, n, d)
    head = lm_head_of(model)
    return chunked_token_losses(hidden, head.weight, labels, bias=getattr(head, "bias", None),
                                chunk_size=loss_chunk_size, softcap=logit_softcap_of(model))  # (b, n)


def window_losses(model, windows: list[np.ndarray], device: torch.device, batch_size: int = 1,
                  loss_chunk_size: int = 1024, parallel=None,
                  scored: dict | None = None) -> Iterator[tuple[float, int]]:
    """(sum of token losses, token count) per window, batching windows of equal length.

    ``scored``: {window key: (sum, count)} of windows this model already scored (``window_key``); a window
    found there is not run again, and every window run is added to it."""
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        results: dict[int, tuple[float, int]] = {}
        keys = [window_key(w) for w in group] if scored is not None else [None] * len(group)
        by_len: dict[int, list[int]] = {}
        for j, w in enumerate(group):
            if keys[j] is not None and keys[j] in scored:
                results[j] = scored[keys[j]]
            else:
                by_len.setdefault(len(w), []).append(j)
        for _, idxs in by_len.items():
            x = torch.as_tensor(np.stack([group[j] for j in idxs]).astype(np.int64), device=device)
            loss = token_losses(model, x, loss_chunk_size, parallel)  # (b, n)
            for k, j in enumerate(idxs):
                results[j] = (float(loss[k].sum()), int(loss.shape[1]))
                if scored is not None:
                    scored[keys[j]] = results[j]
        for j in range(len(group)):
            yield results[j]


def window_key(window: np.ndarray) -> tuple[int, bytes]:
    """A window's identity for ``scored``: its length and a digest of its tokens (equal tokens, equal
    losses for one model)."""
    w = np.ascontiguousarray(window, dtype=np.int64)
    return len(w), hashlib.blake2b(w.tobytes(), digest_size=16).digest()


def evaluate_perplexity(
    model,
    documents: Iterable[np.ndarray],
    seq_len: int,
    protocol: str = "longlora",
    *,
    stride: int = 256,
    batch_size: int = 1,
    max_windows: int | None = None,
    max_windows_per_doc: int | None = None,
    min_doc_len: int = 0,
    loss_chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = False,
    parallel=None,
    scored: dict | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (an HF causal LM in eval mode, or its peft wrapper) over token documents.

    ``min_doc_len``: score only documents of at least this many tokens (``seq_len + 1``: only
    documents that fill a window). ``max_windows_per_doc``: only each document's first windows, so that
    ``max_windows`` spreads over more documents. ``loss_chunk_size``: tokens per lm_head chunk (0: full logits).
    ``progress``: report windows scored (a bar on a terminal, else a line at least every 20 s).
    ``parallel``: a ``megalong.eval.sp.SequenceParallelEval`` to split every window over its ranks
    (all of them call this with the same documents; each gets the same result). ``scored``: a dict
    kept across calls for one model and its settings (chunking, ``parallel``): windows already scored
    there are reused, e.g. the first window, which both protocols share, is run once."""
    from megalong.utils.progress import Progress

    if protocol not in ("longlora", "standard"):
        raise ValueError(f"protocol={protocol!r}: use 'longlora' or 'standard'")
    if loss_chunk_size < 0:
        raise ValueError(f"loss_chunk_size={loss_chunk_size}: use a positive chunk size, or 0 for full logits")
    if parallel is not None and loss_chunk_size == 0:
        raise ValueError("loss_chunk_size=0 (full logits) is not built for sequence parallelism; pass a positive "
                         "--loss-chunk-size (the chunked lm_head gives the same scores)")
    if loss_chunk_size:
        check_plain_lm_head(model)
    windows: list[np.ndarray] = []
    docs = short = skipped = 0
    for doc in documents:
        spans = longlora_windows(len(doc), seq_len, stride) if protocol == "longlora" else standard_windows(
            len(doc), seq_len)
        if not spans or len(doc) < min_doc_len:
            skipped += 1
            continue
        docs += 1
        short += len(doc) < seq_len + 1
        windows.extend(np.asarray(doc[s:e]) for s, e in spans[:max_windows_per_doc])
        if max_windows is not None and len(windows) >= max_windows:
            windows = windows[:max_windows]
            break
    if not windows:
        protocol_need = seq_len + 1 if protocol == "longlora" else 2
        limit = (f" (min_doc_len={min_doc_len}); score shorter documents with a lower --min-doc-len or without "
                 "--require-full-context, or" if min_doc_len > protocol_need else ";")
        raise ValueError(f"no document has the {max(min_doc_len, protocol_need)} tokens a {protocol} window at "
                         f"seq_len={seq_len} needs{limit} use a shorter --seq-len or data with longer documents")
    device = torch.device(device)
    total = count = 0.0
    window_means = []
    long_tokens = sum(long_context_count(len(w) - 1, seq_len) for w in windows)
    bar = Progress(len(windows), f"ppl@{seq_len}", every=max(1, len(windows) // 10), enabled=progress,
                   unit="window")
    for s, c in window_losses(model, windows, device, batch_size, loss_chunk_size, parallel,
                                 scored):
        total += s
        count += c
        window_means.append(s / c)
        bar.update(1, ppl=math.exp(min(50.0, total / count)))
    bar.close()
    loss = float(np.mean(window_means)) if protocol == "longlora" else total / count
    return PerplexityResult(protocol, seq_len, math.exp(loss), loss, int(count), len(windows), docs,
                            long_context_tokens=long_tokens, long_context_fraction=long_tokens / count,
                            short_documents=short, skipped_documents=skipped, min_doc_len=min_doc_len,
                            loss_chunk_size=loss_chunk_size, window_loss=window_means)
