"""megalong.data: Megatron-compatible mmap datasets, packing, blending, SFT masks, resumable loading.

    raw text ─► tools/preprocess_data.py ─► PREFIX.bin/.idx/.json   (indexed.py, preprocess.py)
    PREFIX   ─► PackedDataset (pretrain) | SFTDataset (sft)         (samples.py, sft.py)
             ─► BlendedDataset when several prefixes                (blend.py)
             ─► ResumableLoader(dp_rank, dp_size, consumed_samples) (loader.py)

The trainer calls :func:`build_dataset` on one rank first (it writes the index caches), then on
the others after a barrier (they memory-map the cached arrays). Nothing here imports
torch.distributed; torch itself is imported only by ``collate`` and the loader's worker path.
"""

from __future__ import annotations

from typing import Any

from megalong.data.blend import BlendedDataset, samples_per_dataset
from megalong.data.indexed import (
    DataFileError,
    IndexedDataset,
    IndexedDatasetBuilder,
    check_tokenizer_matches,
    read_data_meta,
)
from megalong.data.loader import ResumableBatchSampler, ResumableLoader
from megalong.data.samples import PackedDataset, build_sample_index, collate
from megalong.data.sft import SFTDataset

__all__ = [
    "BlendedDataset", "DataFileError", "IndexedDataset", "IndexedDatasetBuilder", "PackedDataset",
    "ResumableBatchSampler", "ResumableLoader", "SFTDataset", "build_dataset", "build_sample_index",
    "check_tokenizer_matches", "collate", "read_data_meta",
]


def _prefixes(data_cfg: Any, split: str) -> list[str]:
    if split == "train":
        prefixes = list(data_cfg.prefixes)
    elif split in ("valid", "validation", "eval"):
        prefixes = list(data_cfg.valid_prefixes)
    else:
        raise ValueError(f"split={split!r} is not supported; use 'train' or 'valid'")
    if not prefixes:
        key = "data.prefixes" if split == "train" else "data.valid_prefixes"
        raise DataFileError(f"{key} is empty; set it to dataset prefixes written by tools/preprocess_data.py")
    return prefixes


def _one(data_cfg: Any, prefix: str, num_samples: int, eod_token_id: int, seed: int) -> Any:
    if data_cfg.kind == "sft":
        return SFTDataset(prefix, data_cfg.max_seq_len, num_samples, seed, pad_id=eod_token_id,
                          packing=data_cfg.packing, reset_position_ids=data_cfg.reset_position_ids,
                          cache_dir=data_cfg.cache_dir)
    return PackedDataset(IndexedDataset(prefix), data_cfg.max_seq_len, num_samples, seed, eod_token_id,
                         reset_position_ids=data_cfg.reset_position_ids, cache_dir=data_cfg.cache_dir)


def build_dataset(data_cfg: Any, num_samples: int, eod_token_id: int, split: str = "train",
                  vocab_size: int | None = None, tokenizer_fingerprint: str | None = None) -> Any:
    """Build the training (or validation) dataset described by ``data_cfg`` (a ``DataConfig``).

    Args:
        data_cfg: the ``data`` section of the config.
        num_samples: rows needed (e.g. max_steps × global batch); the dataset has at least this many.
        eod_token_id: end-of-document id for packing (``data.eod_token_id`` or the tokenizer's EOS);
            also the SFT pad id.
        split: ``train`` (data.prefixes) or ``valid`` (data.valid_prefixes).
        vocab_size: when given, every prefix is checked against it (token ids < vocab_size).
        tokenizer_fingerprint: when given, every prefix's recorded tokenizer must match it
            (``megalong.data.tokenizer.load_tokenizer(...).fingerprint``).

    Returns:
        A dataset whose items are dicts of numpy arrays (input_ids, labels, position_ids, segment_ids).
    """
    prefixes = _prefixes(data_cfg, split)
    if vocab_size is not None:
        for p in prefixes:
            check_tokenizer_matches(p, vocab_size, tokenizer_fingerprint)
    seed = data_cfg.seed + (0 if split == "train" else 1)
    if len(prefixes) == 1:
        return _one(data_cfg, prefixes[0], num_samples, eod_token_id, seed)
    weights = data_cfg.weights if split == "train" else None
    if weights is None:  # proportional to size in tokens
        weights = [float(IndexedDataset(p).num_tokens) for p in prefixes]
    need = samples_per_dataset(weights, num_samples)
    parts = [_one(data_cfg, p, max(1, n), eod_token_id, seed + k) for k, (p, n) in enumerate(zip(prefixes, need))]
    return BlendedDataset(parts, weights, num_samples, seed, cache_dir=data_cfg.cache_dir)
