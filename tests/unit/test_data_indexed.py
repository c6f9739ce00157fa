"""Megatron-compatible .bin/.idx: round trip, byte compatibility, corrupt files, tokenizer checks."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from megalong.data.indexed import (
    DTYPE_CODES,
    DataFileError,
    IndexedDataset,
    IndexedDatasetBuilder,
    check_tokenizer_matches,
    read_data_meta,
)


def random_docs(rng: np.random.Generator, dtype, n: int = 40) -> list[np.ndarray]:
    dt = np.dtype(dtype)
    docs = []
    for k in range(n):
        length = 0 if k == 7 else int(rng.integers(1, 300))
        if dt.kind == "f":
            docs.append((rng.standard_normal(length) * 100).astype(dt))
        else:
            info = np.iinfo(dt)
            docs.append(rng.integers(info.min, int(info.max) + 1, size=length, dtype=np.int64).astype(dt))
    return docs


def build(prefix: Path, docs: list, dtype=np.uint16, meta: dict | None = None) -> dict:
    b = IndexedDatasetBuilder(prefix, dtype)
    for d in docs:
        b.add_document(d)
    return b.finalize(meta)


def megatron_bytes(docs: list[list[list[int]]], dtype) -> tuple[bytes, bytes]:
    """An independent writer of Megatron's layout: each document is a list of sequences."""
    dt = np.dtype(dtype)
    code = {np.dtype(v): k for k, v in DTYPE_CODES.items()}[dt]
    lengths, pointers, doc_idx, data, ptr = [], [], [0], b"", 0
    for doc in docs:
        for seq in doc:
            lengths.append(len(seq))
            pointers.append(ptr)
            ptr += len(seq) * dt.itemsize
            data += np.array(seq, dtype=dt).tobytes()
        doc_idx.append(len(lengths))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return idx, data


@pytest.mark.parametrize("dtype", list(DTYPE_CODES.values()), ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(np.dtype(dtype).num)
    docs = random_docs(rng, dtype)
    info = build(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    assert info["num_documents"] == len(docs) and info["num_tokens"] == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        assert ds[i].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(3, 2, 5), docs[3][2:7])
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_batch_add_equals_single_add(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, np.uint16, 25)
    build(tmp_path / "a", docs)
    b = IndexedDatasetBuilder(tmp_path / "b", np.uint16)
    b.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
    b.add_documents(np.concatenate(docs[10:]), [len(d) for d in docs[10:]])
    b.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_byte_identical_to_megatron_layout(tmp_path):
    rng = np.random.default_rng(2)
    for dtype in (np.uint16, np.int32):
        docs = [rng.integers(0, 60000, size=int(n)).tolist() for n in rng.integers(1, 100, size=17)]
        build(tmp_path / "ours", docs, dtype)
        idx, data = megatron_bytes([[d] for d in docs], dtype)
        assert (tmp_path / "ours.idx").read_bytes() == idx
        assert (tmp_path / "ours.bin").read_bytes() == data


def test_reads_megatron_files_with_split_sentences(tmp_path):
    docs = [[[5, 6, 7], [8, 9]], [[10, 11, 12, 13]], [[1], [2], [3]]]
    idx, data = megatron_bytes(docs, np.int32)
    (tmp_path / "m.idx").write_bytes(idx)
    (tmp_path / "m.bin").write_bytes(data)
    ds = IndexedDataset(tmp_path / "m")  # no sidecar: Megatron's files
    assert ds.meta is None and len(ds) == 3 and ds.dtype == np.int32
    np.testing.assert_array_equal(ds[0], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(ds[1], [10, 11, 12, 13])
    np.testing.assert_array_equal(ds[2], [1, 2, 3])
    np.testing.assert_array_equal(ds.sequence_lengths, [3, 2, 4, 1, 1, 1])
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3, 6])
    # megalong writes the same bytes when given the same sentence lengths
    b = IndexedDatasetBuilder(tmp_path / "o", np.int32)
    for doc in docs:
        b.add_document(sum(doc, []), [len(s) for s in doc])
    b.finalize()
    assert (tmp_path / "o.idx").read_bytes() == idx and (tmp_path / "o.bin").read_bytes() == data


@pytest.fixture
def good(tmp_path) -> Path:
    build(tmp_path / "g", [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    return tmp_path / "g"


def patch(path: Path, offset: int, raw: bytes) -> None:
    b = bytearray(path.read_bytes())
    b[offset: offset + len(raw)] = raw
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("case, pattern", [
    ("truncated_bin", "truncated"),
    ("long_bin", "too long"),
    ("magic", "bad magic"),
    ("version", "unsupported index version 2"),
    ("dtype", "unknown dtype code 42"),
    ("seq_count", "counts are inconsistent"),
    ("doc_count", "counts are inconsistent"),
    ("pointer", "points at byte"),
    ("doc_index", "document index must rise"),
    ("truncated_idx", "shorter than"),
])
def test_corrupt_files_raise_clear_errors(good, case, pattern):
    idx, bin_ = Path(f"{good}.idx"), Path(f"{good}.bin")
    Path(f"{good}.json").unlink()  # the structural checks alone must catch these
    if case == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif case == "long_bin":
        bin_.write_bytes(bin_.read_bytes() + b"\x00\x00")
    elif case == "magic":
        patch(idx, 0, b"XXIDIDX\x00\x00")
    elif case == "version":
        patch(idx, 9, struct.pack("<Q", 2))
    elif case == "dtype":
        patch(idx, 17, bytes([42]))
    elif case == "seq_count":
        patch(idx, 18, struct.pack("<Q", 4))
    elif case == "doc_count":
        patch(idx, 26, struct.pack("<Q", 3))
    elif case == "pointer":
        patch(idx, 34 + 3 * 4 + 8, struct.pack("<q", 2))  # second pointer
    elif case == "doc_index":
        patch(idx, 34 + 3 * 12 + 3 * 8, struct.pack("<q", 2))  # last document index != 3
    elif case == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(DataFileError, match=pattern) as e:
        IndexedDataset(good)
    assert str(good) in str(e.value) and "preprocess_data.py" in str(e.value)


def test_files_from_different_runs(tmp_path):
    build(tmp_path / "a", [[1, 2, 3], [4, 5]])
    build(tmp_path / "b", [[9, 9], [9, 9, 9]])  # same .bin size, other content and lengths
    shutil.copy(tmp_path / "b.bin", tmp_path / "a.bin")
    with pytest.raises(DataFileError, match="different runs"):
        IndexedDataset(tmp_path / "a")
    build(tmp_path / "a", [[1, 2, 3], [4, 5]])
    shutil.copy(tmp_path / "b.idx", tmp_path / "a.idx")
    with pytest.raises(DataFileError, match="different runs"):
        IndexedDataset(tmp_path / "a")
    build(tmp_path / "c", [[1, 2, 3, 4, 5, 6]])  # different size: caught without the sidecar too
    shutil.copy(tmp_path / "c.bin", tmp_path / "b.bin")
    (tmp_path / "b.json").unlink()
    with pytest.raises(DataFileError, match="too long"):
        IndexedDataset(tmp_path / "b")


def test_missing_file_and_atomic_writes(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        IndexedDataset(tmp_path / "nothing")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # aborted: nothing left
    b = IndexedDatasetBuilder(tmp_path / "y", np.uint16)
    b.add_document([1, 2, 3])  # never finalized (a killed writer): no valid-looking pair
    assert not (tmp_path / "y.bin").exists() and not (tmp_path / "y.idx").exists()
    b.abort()
    build(tmp_path / "z", [[1, 2]])
    build(tmp_path / "z", [[3, 4, 5]])  # overwrite in place
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "z")[0], [3, 4, 5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.bin", "z.idx", "z.json"]


def test_builder_rejects_ids_that_do_not_fit(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "w", np.uint16)
    with pytest.raises(ValueError, match="int32"):
        b.add_document([1, 70000])
    b.abort()


def test_tokenizer_checks(tmp_path):
    meta = {"vocab_size": 100, "tokenizer": {"fingerprint": "abc123", "path": "tok.model"}}
    build(tmp_path / "t", [[1, 2, 99], [5]], meta=meta)
    assert read_data_meta(tmp_path / "t")["max_token_id"] == 99
    assert check_tokenizer_matches(tmp_path / "t", 100, "abc123")["vocab_size"] == 100
    with pytest.raises(DataFileError, match="token id 99 but the model's vocabulary has only 99"):
        check_tokenizer_matches(tmp_path / "t", 99)
    with pytest.raises(DataFileError, match="different tokenizer"):
        check_tokenizer_matches(tmp_path / "t", 100, "zzz999")
    (tmp_path / "t.json").unlink()  # Megatron-style file: the .bin is scanned
    assert check_tokenizer_matches(tmp_path / "t", 100) is None
    with pytest.raises(DataFileError, match="token id 99"):
        check_tokenizer_matches(tmp_path / "t", 50)
    (tmp_path / "t.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataFileError, match="not a megalong data sidecar"):
        read_data_meta(tmp_path / "t")
