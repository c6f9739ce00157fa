"""Packing contract, EOD rule, the index cache (reuse and invalidation), collate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megalong.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalong.data.samples import BUILD_COUNT, PackedDataset, build_packed_arrays, collate

EOD = 3


def make_docs(rng: np.random.Generator, n: int = 30) -> list[np.ndarray]:
    """Documents of tokens >= 10 (never EOD inside); every third one already ends with EOD; one empty."""
    docs = []
    for k in range(n):
        d = rng.integers(10, 500, size=int(rng.integers(1, 40)))
        if k % 3 == 0:
            d = np.append(d, EOD)
        docs.append(d if k != 5 else np.zeros(0, np.int64))
    return docs


def write(prefix: Path, docs: list[np.ndarray]) -> IndexedDataset:
    b = IndexedDatasetBuilder(prefix, np.uint16)
    for d in docs:
        b.add_document(d)
    b.finalize()
    return IndexedDataset(prefix)


def stream(docs: list[np.ndarray], doc_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected token stream (EOD rule applied) and the stream position where each document starts."""
    parts, starts, pos = [], [], 0
    for d in doc_idx:
        doc = docs[int(d)]
        doc = doc if len(doc) and doc[-1] == EOD else np.append(doc, EOD)
        parts.append(doc)
        starts.append(pos)
        pos += len(doc)
    return np.concatenate(parts), np.asarray(starts)


@pytest.mark.parametrize("reset", [False, True])
def test_packing_contract(tmp_path, reset):
    rng = np.random.default_rng(0)
    docs = make_docs(rng)
    n = 16
    ds = PackedDataset(write(tmp_path / "d", docs), n, num_samples=50, seed=7, eod_id=EOD, reset_position_ids=reset)
    assert len(ds) >= 50
    assert 5 not in set(np.asarray(ds.doc_idx).tolist())  # the empty document is left out
    toks, doc_starts = stream(docs, np.asarray(ds.doc_idx))
    assert np.sum(toks == EOD) == len(ds.doc_idx)  # exactly one EOD per document
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        j = int(ds.shuffle_idx[i])
        seen.add(j)
        row = toks[j * n: j * n + n + 1]
        assert {k: v.shape for k, v in item.items()} == {k: (n,) for k in item}
        assert item["input_ids"].dtype == np.int64 and item["segment_ids"].dtype == np.int32
        np.testing.assert_array_equal(item["input_ids"], row[:n])
        np.testing.assert_array_equal(item["labels"], row[1:])  # labels are the shift
        # a fresh segment right after each EOD; the EOD belongs to the document it ends
        expected_seg = np.concatenate([[0], np.cumsum(row[:n] == EOD)[:-1]])
        np.testing.assert_array_equal(item["segment_ids"], expected_seg)
        if reset:
            boundaries = np.flatnonzero(np.diff(expected_seg)) + 1
            first = np.zeros(n, np.int64)
            first[boundaries] = boundaries
            np.testing.assert_array_equal(item["position_ids"], np.arange(n) - np.maximum.accumulate(first))
        else:
            np.testing.assert_array_equal(item["position_ids"], np.arange(n))
    assert seen == set(range(len(ds)))  # shuffle is a permutation


def test_index_arrays_vectorised_against_loop():
    rng = np.random.default_rng(3)
    eff = rng.integers(0, 50, size=200)
    n = 13
    a = build_packed_arrays(eff, n, 1000, seed=1)
    cum, pos = np.concatenate([[0], np.cumsum(eff[a["doc_idx"]])]), 0
    for r, (d, off) in enumerate(a["sample_idx"]):
        pos = r * n
        d_loop = int(np.searchsorted(cum, pos, side="right") - 1)
        while eff[a["doc_idx"][d_loop]] == 0:  # skip empty docs the same way
            d_loop += 1
        assert (d, off) == (d_loop, pos - cum[d_loop])
    # whole epochs first: rows inside complete epochs come before the rest in shuffle order
    per_epoch = int(eff.sum())
    epochs = len(a["doc_idx"]) // int((eff > 0).sum())
    full = (per_epoch * (epochs - 1) - 1) // n
    assert epochs >= 2 and sorted(a["shuffle_idx"][:full]) == list(range(full))


def test_cache_reused_and_invalidated(tmp_path):
    rng = np.random.default_rng(1)
    docs = make_docs(rng)
    ind = write(tmp_path / "d", docs)
    before = BUILD_COUNT.get("packed", 0)
    a = PackedDataset(ind, 16, 40, seed=1, eod_id=EOD)
    assert a.index.built and BUILD_COUNT["packed"] == before + 1
    files = sorted((tmp_path / "index_cache").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    b = PackedDataset(IndexedDataset(tmp_path / "d"), 16, 40, seed=1, eod_id=EOD)
    assert not b.index.built and BUILD_COUNT["packed"] == before + 1 and b.key == a.key
    assert isinstance(b.shuffle_idx, np.memmap)  # memory-mapped on load
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "index_cache").iterdir())] == mtimes
    np.testing.assert_array_equal(a[3]["input_ids"], b[3]["input_ids"])
    keys = {a.key}
    for kwargs in ({"max_seq_len": 17}, {"seed": 2}, {"num_samples": 41}, {"eod_id": 4}):
        args = {"max_seq_len": 16, "num_samples": 40, "seed": 1, "eod_id": EOD, **kwargs}
        c = PackedDataset(ind, args["max_seq_len"], args["num_samples"], args["seed"], args["eod_id"])
        assert c.index.built and c.key not in keys
        keys.add(c.key)
    docs[4] = docs[4] + 1  # the data changes: a new index
    d = PackedDataset(write(tmp_path / "d", docs), 16, 40, seed=1, eod_id=EOD)
    assert d.index.built and d.key not in keys
    e = PackedDataset(ind, 16, 40, seed=1, eod_id=EOD, cache_dir=tmp_path / "elsewhere")
    assert e.index.built and (tmp_path / "elsewhere").is_dir()


def test_collate():
    items = [{"input_ids": np.arange(5) + k, "labels": np.arange(5), "position_ids": np.arange(5),
              "segment_ids": np.zeros(5, np.int32)} for k in range(3)]
    b = collate(items)
    assert b["input_ids"].shape == (3, 5) and b["input_ids"].dtype == torch.int64
    assert b["segment_ids"].dtype == torch.int32 and b["labels"].dtype == torch.int64
    assert b["input_ids"][2, 0].item() == 2
