"""Blend several datasets by weight: a deterministic, cached map from global sample i to (dataset, sample).

Dataset d's k-th sample is placed at the "ideal time" (k + φ_d) / w_d (φ_d a seeded phase in
[0, 1)); all placements are merged in time order. After any prefix of n samples, dataset d has
been used ⌊n·w_d⌋ ± 1 times, the same guarantee as Megatron's greedy "most behind its target"
rule, computed with one numpy sort instead of a loop::

    w = (0.5, 0.3, 0.2)    time →  0    1    2    3    4    5    6    7    8    9
    dataset 0 (every 2)            ●         ●         ●         ●         ●
    dataset 1 (every 3.3)               ●              ●             ●
    dataset 2 (every 5)                           ●                       ●
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from megalong.data.samples import load_or_build


def blend_indices(weights: list[float], size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index), each of length ``size``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)} must be non-negative with a positive sum")
    w = w / w.sum()
    phase = np.random.default_rng(seed).random(len(w))
    times, ds_ids, sample_ids = [], [], []
    for d, wd in enumerate(w):
        if wd == 0:
            continue
        k = np.arange(int(np.ceil(size * wd)) + 2, dtype=np.int64)
        times.append((k + phase[d]) / wd)
        ds_ids.append(np.full(len(k), d, dtype=np.int16))
        sample_ids.append(k)
    order = np.argsort(np.concatenate(times), kind="stable")[:size]
    return np.concatenate(ds_ids)[order], np.concatenate(sample_ids)[order]


def samples_per_dataset(weights: list[float], size: int) -> list[int]:
    """How many samples each part must provide for a blend of ``size`` (an upper bound of its use)."""
    w = np.asarray(weights, dtype=np.float64)
    return [int(np.ceil(size * x)) + 2 if x > 0 else 0 for x in w / w.sum()]


class BlendedDataset:
    """Samples drawn from ``datasets`` in proportion to ``weights`` (see the module docstring).

    Args:
        datasets: the parts; each needs ``__len__``/``__getitem__`` and a ``key`` string (cache identity).
        weights: one non-negative weight per dataset (normalised here).
        size: number of samples of the blend.
        seed: phase seed.
        cache_dir: where the blend index is cached (default: ``index_cache/`` next to the first dataset's data).
    """

    def __init__(self, datasets: list[Any], weights: list[float], size: int, seed: int,
                 cache_dir: str | os.PathLike | None = None) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights; give one weight per dataset")
        self.datasets, self.size = datasets, size
        keys = [getattr(d, "key", None) or f"{type(d).__name__}:{len(d)}" for d in datasets]
        parts = {"kind": "blend", "datasets": keys, "weights": [float(x) for x in weights], "size": int(size),
                 "seed": int(seed)}
        if cache_dir is None:
            first = getattr(getattr(datasets[0], "indexed", None) or getattr(datasets[0], "tokens", None), "prefix", ".")
            cache_dir = Path(os.fspath(first)).parent / "index_cache"

        def build() -> tuple[dict, dict]:
            di, si = blend_indices(weights, size, seed)
            return {"dataset_index": di, "dataset_sample_index": si}, {"counts": np.bincount(di, minlength=len(datasets)).tolist()}

        self.index = load_or_build(Path(cache_dir), "blend", parts, build)
        self.dataset_index = self.index.arrays["dataset_index"]
        self.dataset_sample_index = self.index.arrays["dataset_sample_index"]
        self.key = self.index.key
        for d, ds in enumerate(datasets):
            sel = self.dataset_sample_index[self.dataset_index == d]
            if len(sel) and int(sel.max()) >= len(ds):
                raise ValueError(f"blend needs {int(sel.max()) + 1} samples from dataset {d} ({keys[d]}) but it has "
                                 f"{len(ds)}; build it with num_samples >= ceil(size * weight) + 2")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range ({self.size} samples)")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
