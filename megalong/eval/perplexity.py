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

Both report the tokens and windows they used, so numbers can be compared honestly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict:
        return asdict(self)


def longlora_windows(doc_len: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) token spans of ``seq_len + 1`` tokens every ``stride`` tokens."""
    return [(s, s + seq_len + 1) for s in range(0, doc_len - seq_len, stride)]


def standard_windows(doc_len: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping spans: window k covers tokens [k·N, (k+1)·N + 1) clipped to the document."""
    return [(s, min(doc_len, s + seq_len + 1)) for s in range(0, doc_len - 1, seq_len)]


@torch.no_grad()
def window_losses(model, windows: list[np.ndarray], device: torch.device, batch_size: int = 1) -> Iterator[
        tuple[float, int]]:
    """(sum of token losses, token count) per window, batching windows of equal length."""
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        by_len: dict[int, list[int]] = {}
        for j, w in enumerate(group):
            by_len.setdefault(len(w), []).append(j)
        results: dict[int, tuple[float, int]] = {}
        for _, idxs in by_len.items():
            x = torch.as_tensor(np.stack([group[j] for j in idxs]).astype(np.int64), device=device)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()  # (b, n, V)
            loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (b, n)
            for k, j in enumerate(idxs):
                results[j] = (float(loss[k].sum()), int(loss.shape[1]))
        for j in range(len(group)):
            yield results[j]


def evaluate_perplexity(
    model,
    documents: Iterable[np.ndarray],
    seq_len: int,
    protocol: str = "longlora",
    *,
    stride: int = 256,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` (an HF causal LM in eval mode) over token documents.

    ``progress``: report windows scored (a bar on a terminal, else a line at least every 20 s)."""
    from megalong.utils.progress import Progress

    if protocol not in ("longlora", "standard"):
        raise ValueError(f"protocol={protocol!r}: use 'longlora' or 'standard'")
    windows: list[np.ndarray] = []
    docs = 0
    for doc in documents:
        spans = longlora_windows(len(doc), seq_len, stride) if protocol == "longlora" else standard_windows(
            len(doc), seq_len)
        if not spans:
            continue
        docs += 1
        windows.extend(np.asarray(doc[s:e]) for s, e in spans)
        if max_windows is not None and len(windows) >= max_windows:
            windows = windows[:max_windows]
            break
    if not windows:
        raise ValueError(
            f"no document has the {seq_len + 1} tokens a {protocol} window needs; use a shorter --seq-len "
            "or data with longer documents"
        )
    device = torch.device(device)
    total = count = 0.0
    window_means = []
    bar = Progress(len(windows), f"ppl@{seq_len}", every=max(1, len(windows) // 10), enabled=progress,
                   unit="window")
    for s, c in window_losses(model, windows, device, batch_size):
        total += s
        count += c
        window_means.append(s / c)
        bar.update(1, ppl=math.exp(min(50.0, total / count)))
    bar.close()
    loss = float(np.mean(window_means)) if protocol == "longlora" else total / count
    return PerplexityResult(protocol, seq_len, math.exp(loss), loss, int(count), len(windows), docs)
