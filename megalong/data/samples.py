"""Pack documents into training rows of ``max_seq_len + 1`` tokens, with cached numpy index arrays.

EOD rule (one rule, for megalong's and Megatron's files alike): every document in a packed row ends
with exactly one EOD token. A document whose last token already is ``eod_id`` (preprocessed with
``--append-eod``) is used as it is; any other document gets one EOD appended by the packer.
Empty documents are left out.

The token stream is the documents of epoch 0 (shuffled), then of epoch 1 (reshuffled), ...
Row i covers stream tokens ``[i·N, i·N + N]`` (N + 1 tokens; consecutive rows share one token,
as in Megatron), so labels are the inputs shifted by one::

    stream   … d7 d7 d7 EOD │ d2 d2 d2 d2 d2 EOD │ d9 d9 …
    row i         [ d7 d7 EOD  d2 d2 d2 d2 d2 EOD  d9 ]          N + 1 tokens
    input_ids       d7 d7 EOD  d2 d2 d2 d2 d2 EOD            (N)
    labels             d7 EOD  d2 d2 d2 d2 d2 EOD  d9        (N, the shift)
    segment_ids      0  0  0    1  1  1  1  1  1              a new id right after each EOD
    position_ids     0  1  2    0  1  2  3  4  5              (reset_position_ids; else 0..N-1)

Index arrays (built with numpy, vectorised; cached as .npy, memory-mapped on load):
``doc_idx`` (document order over all epochs), ``sample_idx`` ((rows+1, 2): position in doc_idx
and token offset where each row starts), ``shuffle_idx`` (row order; the rows of all complete
epochs are shuffled together, those that reach into the last epoch separately, so a run sees whole
epochs first), and ``needs_eod`` (per document). The cache key hashes everything that shapes them.

Cache protocol for distributed training: files are written to temporary names and renamed, with
a ``.json`` description written last, so ranks may race safely; the cheap way is to build on one
rank (call :func:`build_sample_index`, or construct the dataset), barrier, then construct the
dataset on every rank (a cache hit, memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megalong.data.batch import ITEM_DTYPES
from megalong.data.indexed import DataFileError, IndexedDataset

CACHE_VERSION = 1
BUILD_COUNT: dict[str, int] = {}
"""How many times each kind of index was built (not loaded) in this process; for tests and logs."""


def default_cache_dir(prefix: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` if set, else ``index_cache/`` next to the data."""
    return Path(cache_dir) if cache_dir is not None else Path(os.fspath(prefix)).parent / "index_cache"


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@dataclass
class CachedIndex:
    """Index arrays loaded from (or just written to) the cache."""

    arrays: dict[str, np.ndarray]
    info: dict
    key: str
    built: bool


def load_or_build(cache_dir: Path, name: str, parts: dict, build: Callable[[], tuple[dict, dict]]) -> CachedIndex:
    """Load index arrays ``name`` keyed by ``parts`` from ``cache_dir``, building them first if absent.

    Args:
        cache_dir: directory for the ``.npy`` files (created if needed).
        name: file stem (e.g. the data prefix's basename plus the index kind).
        parts: everything that shapes the arrays; hashed into the key.
        build: returns (arrays, info) when the cache misses.
    """
    key = cache_key({**parts, "cache_version": CACHE_VERSION})
    desc = cache_dir / f"{name}_{key}.json"
    built = False
    if not desc.is_file():
        arrays, info = build()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for k, a in arrays.items():
                _save_atomic(cache_dir / f"{name}_{key}_{k}.npy", np.ascontiguousarray(a))
            tmp = desc.with_name(f"{desc.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
            tmp.write_text(json.dumps({"arrays": sorted(arrays), "parts": parts, "info": info}, indent=2, default=str))
            os.replace(tmp, desc)
        except OSError as e:
            raise DataFileError(f"{cache_dir}: cannot write the sample-index cache ({e}); set data.cache_dir to a "
                                "writable directory") from e
        BUILD_COUNT[name.rsplit("_", 1)[-1]] = BUILD_COUNT.get(name.rsplit("_", 1)[-1], 0) + 1
        built = True
    meta = json.loads(desc.read_text())
    arrays = {}
    for k in meta["arrays"]:
        f = cache_dir / f"{name}_{key}_{k}.npy"
        if not f.is_file():
            raise DataFileError(f"{f}: missing from the sample-index cache (its description {desc.name} exists); "
                                f"delete {desc} and run again to rebuild")
        arrays[k] = np.load(f, mmap_mode="r")
    return CachedIndex(arrays, meta["info"], key, built)


def document_eod(ds: IndexedDataset, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document: effective length (with the packer's EOD) and whether the packer adds the EOD."""
    lens = ds.doc_lengths
    nonempty = np.flatnonzero(lens > 0)
    needs = np.zeros(len(lens), dtype=bool)
    if len(nonempty):
        last = np.asarray(ds.tokens[ds.doc_starts[nonempty] + lens[nonempty] - 1])
        needs[nonempty] = last != eod_id
    return lens + needs, needs


def _epoch_orders(doc_ids: np.ndarray, epochs: int, rng: np.random.Generator) -> np.ndarray:
    dtype = np.int32 if len(doc_ids) < 2**31 else np.int64
    return np.concatenate([rng.permutation(doc_ids).astype(dtype) for _ in range(epochs)])


def build_packed_arrays(eff_lens: np.ndarray, max_seq_len: int, num_samples: int, seed: int) -> dict:
    """The doc/sample/shuffle index arrays for rows of ``max_seq_len + 1`` tokens (pure numpy)."""
    n = max_seq_len
    doc_ids = np.flatnonzero(eff_lens > 0)
    per_epoch = int(eff_lens[doc_ids].sum())
    if per_epoch == 0:
        raise ValueError("no tokens")
    epochs = max(1, -(-(num_samples * n + 1) // per_epoch))
    rng = np.random.default_rng(seed)
    doc_idx = _epoch_orders(doc_ids, epochs, rng)
    cum = np.cumsum(eff_lens[doc_idx], dtype=np.int64)  # stream position after each document
    rows = int((cum[-1] - 1) // n)
    starts = np.arange(rows + 1, dtype=np.int64) * n  # row r starts at stream token r·N
    pos = np.searchsorted(cum, starts, side="right")  # position in doc_idx holding that token
    before = np.where(pos > 0, cum[np.maximum(pos - 1, 0)], 0)
    sample_idx = np.stack([pos, starts - before], axis=1)  # (rows + 1, 2)
    full = int((per_epoch * (epochs - 1) - 1) // n) if epochs > 1 else 0  # rows inside complete epochs
    shuffle_idx = np.concatenate([rng.permutation(full), full + rng.permutation(rows - full)]).astype(np.int64)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def build_sample_index(indexed: IndexedDataset, max_seq_len: int, num_samples: int, seed: int, eod_id: int,
                       cache_dir: str | os.PathLike | None = None) -> CachedIndex:
    """Build (or load) the packed-sample index of one dataset; safe to call from racing ranks."""
    parts = {"kind": "packed", "data": indexed.identity, "max_seq_len": int(max_seq_len),
             "num_samples": int(num_samples), "seed": int(seed), "eod_id": int(eod_id), "eod_rule": "one-per-doc"}

    def build() -> tuple[dict, dict]:
        eff, needs = document_eod(indexed, eod_id)
        if int(eff.sum()) == 0:
            raise DataFileError(f"{indexed.prefix}: dataset has no tokens; re-run tools/preprocess_data.py on "
                                "non-empty input")
        arrays = build_packed_arrays(eff, max_seq_len, num_samples, seed)
        arrays["needs_eod"] = needs
        return arrays, {"rows": len(arrays["shuffle_idx"]), "epochs_docs": len(arrays["doc_idx"]),
                        "eod_added": int(needs.sum())}

    name = f"{Path(indexed.prefix).name}_packed"
    return load_or_build(default_cache_dir(indexed.prefix, cache_dir), name, parts, build)


def row_layout(piece_lengths: np.ndarray, n: int, reset_position_ids: bool) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and position ids of the first n tokens of a row made of pieces of these lengths."""
    seg = np.repeat(np.arange(len(piece_lengths), dtype=np.int32), piece_lengths)[:n]
    if not reset_position_ids:
        return seg, np.arange(n, dtype=np.int64)
    piece_starts = np.concatenate([[0], np.cumsum(piece_lengths)[:-1]]).astype(np.int64)
    return seg, np.arange(n, dtype=np.int64) - piece_starts[seg]


class PackedDataset:
    """Pretraining rows packed from one :class:`IndexedDataset` (see the module docstring).

    Args:
        indexed: the token dataset.
        max_seq_len: N, tokens per training row (a row reads N + 1 tokens).
        num_samples: at least this many rows are available (more epochs as needed).
        seed: shuffle seed.
        eod_id: end-of-document token id.
        reset_position_ids: restart position ids at every document start.
        cache_dir: where the index arrays live (default ``index_cache/`` next to the data).
    """

    def __init__(self, indexed: IndexedDataset, max_seq_len: int, num_samples: int, seed: int, eod_id: int,
                 reset_position_ids: bool = False, cache_dir: str | os.PathLike | None = None) -> None:
        self.indexed, self.max_seq_len, self.eod_id = indexed, max_seq_len, eod_id
        self.reset_position_ids = reset_position_ids
        self.index = build_sample_index(indexed, max_seq_len, num_samples, seed, eod_id, cache_dir)
        a = self.index.arrays
        self.doc_idx, self.sample_idx, self.shuffle_idx = a["doc_idx"], a["sample_idx"], a["shuffle_idx"]
        self.needs_eod = np.asarray(a["needs_eod"])
        self.key = self.index.key

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def row_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The N + 1 tokens of row i and the lengths of its document pieces."""
        j = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        pieces, lengths = [], []
        for d in range(int(d0), int(d1) + 1):
            doc = int(self.doc_idx[d])
            start = int(o0) if d == d0 else 0
            real = int(self.indexed.doc_lengths[doc])
            end = int(o1) + 1 if d == d1 else real + int(self.needs_eod[doc])
            piece = self.indexed.get(doc, start, max(0, min(end, real) - start))
            if end > real:  # the packer's EOD
                piece = np.append(piece, self.eod_id)
            pieces.append(piece)
            lengths.append(len(piece))
        return np.concatenate(pieces).astype(np.int64), np.asarray(lengths, dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        n = self.max_seq_len
        row, lengths = self.row_tokens(i)  # (N + 1,)
        seg, pos = row_layout(lengths, n, self.reset_position_ids)
        return {"input_ids": row[:n], "labels": row[1:].copy(), "position_ids": pos, "segment_ids": seg}


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Stack items into (B, N) tensors: int64 input_ids/labels/position_ids, int32 segment_ids."""
    import torch

    return {k: torch.from_numpy(np.stack([it[k] for it in items]).astype(dt, copy=False))
            for k, dt in ITEM_DTYPES.items()}
