"""A resumable data-parallel loader: exact continuation from a global ``consumed_samples`` count.

Each global micro-step consumes ``micro_batch × dp_size`` consecutive samples of the dataset's
order; data-parallel rank r takes its slice of that window::

    consumed = c        window = [c, c + M·D)          (M = micro_batch, D = dp_size)
    rank 0: [c,       c + M)
    rank 1: [c + M,   c + 2M)
    …
    next step starts at c + M·D

The dataset's own order is already shuffled (sample index / blend), so the loader never
shuffles: a run restarted with the ``consumed_samples`` stored in its checkpoint yields exactly
the batches the interrupted run would have produced next. The window is global, so a run resumed
on a different number of data-parallel ranks also continues at the right sample. Ranks are data-parallel ranks, not global ranks: sequence-parallel peers share
a dp rank and therefore receive the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from megalong.data.samples import collate


class ResumableBatchSampler:
    """Yields this rank's sample indices for each global micro-step, starting at ``consumed_samples``."""

    def __init__(self, total: int, micro_batch: int, dp_rank: int, dp_size: int, consumed_samples: int = 0) -> None:
        if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch >= 1 and 0 <= dp_rank < dp_size; got micro_batch={micro_batch}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        self.total, self.micro_batch, self.dp_rank, self.dp_size = total, micro_batch, dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.dp_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed_samples) // self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while start + self.global_batch <= self.total:
            first = start + self.dp_rank * self.micro_batch
            yield list(range(first, first + self.micro_batch))
            start += self.global_batch


class ResumableLoader:
    """Iterate micro-batches (dicts of (B, N) tensors) for one data-parallel rank, resumably.

    ``consumed_samples`` (global, exact) advances by ``micro_batch × dp_size`` for every batch
    handed out; store it in checkpoints and pass it back to resume. Stops when the dataset has no
    complete window left (size datasets with ``num_samples >= steps × global batch``).

    Args:
        dataset: indexable dataset returning item dicts (``megalong.data`` datasets).
        micro_batch: rows per rank per micro-step.
        dp_rank: data-parallel rank.
        dp_size: data-parallel world size.
        consumed_samples: global samples already consumed (0 for a fresh run).
        num_workers: torch DataLoader worker processes (0: load in this process). Order is preserved.
        collate_fn: batch builder (default: stack into tensors).
    """

    def __init__(self, dataset: Any, micro_batch: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 num_workers: int = 0, collate_fn: Callable[[list], Any] = collate) -> None:
        self.dataset, self.num_workers, self.collate_fn = dataset, num_workers, collate_fn
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.consumed_samples = consumed_samples
        ResumableBatchSampler(len(dataset), micro_batch, dp_rank, dp_size, consumed_samples)  # validate now

    def __len__(self) -> int:
        return len(self._sampler())

    def _sampler(self) -> ResumableBatchSampler:
        return ResumableBatchSampler(len(self.dataset), self.micro_batch, self.dp_rank, self.dp_size,
                                     self.consumed_samples)

    def __iter__(self) -> Iterator[Any]:
        sampler = self._sampler()
        if self.num_workers == 0:
            batches: Iterator[Any] = (self.collate_fn([self.dataset[i] for i in idx]) for idx in sampler)
        else:
            from torch.utils.data import DataLoader

            batches = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                      collate_fn=self.collate_fn, persistent_workers=False))
        for batch in batches:
            self.consumed_samples += sampler.global_batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
