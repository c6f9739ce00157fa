"""Megatron-compatible memory-mapped token datasets: ``PREFIX.bin`` + ``PREFIX.idx`` (+ ``PREFIX.json``).

Layout (little endian), byte-identical to what Megatron-LM's ``IndexedDatasetBuilder`` writes::

    PREFIX.idx                                    PREFIX.bin
    ┌──────────────────────────────┐              ┌─────────────────────────────────┐
    │ magic  b"MMIDIDX\\x00\\x00" 9B │              │ seq 0 tokens │ seq 1 tokens │ … │
    │ version          u64 = 1     │              └─────────────────────────────────┘
    │ dtype code       u8          │  1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16
    │ sequence count S u64         │
    │ document count D u64         │  D = number of documents + 1
    │ lengths          i32[S]      │  tokens per sequence
    │ pointers         i64[S]      │  byte offset of each sequence in .bin
    │ document indices i64[D]      │  0, then the sequence count after each document
    └──────────────────────────────┘

megalong writes one sequence per document (Megatron's ``add_document(tokens, [len(tokens)])``),
so sequences and documents coincide; Megatron files with several sequences per document (split
sentences) are read too: ``ds[i]`` always returns the whole document i.

Unlike Megatron, opening validates everything (magic, version, dtype code, counts, pointers
against lengths, the .bin size, and, when the ``PREFIX.json`` sidecar exists, that .idx/.bin/.json
come from the same run) and raises :class:`DataFileError` naming the file, the problem and the fix.

Writes are atomic: tokens go to a temporary file; ``finalize`` removes any old ``PREFIX.idx``
first, renames the new .bin, then the .json, and renames the .idx last, so a killed writer leaves
either the old complete pair, or a .bin without .idx (an error on open), never a wrong valid pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
META_FORMAT = "megalong-indexed-meta"
REBUILD_HINT = "re-run tools/preprocess_data.py to rebuild it"


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file, what is wrong and the fix."""


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.json")


def dtype_for_vocab(vocab_size: int) -> type[np.generic]:
    """Megatron's rule: uint16 when the vocabulary has fewer than 65,500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bin_fingerprint(path: str | os.PathLike, window: int = 1 << 16) -> str:
    """Cheap identity of a .bin: its size plus a hash of its first and last ``window`` bytes."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(window))
        if size > window:
            f.seek(max(window, size - window))
            h.update(f.read(window))
    return h.hexdigest()


def index_header(dtype: np.dtype, seq_count: int, doc_count: int) -> bytes:
    """The 34-byte .idx header: magic, version, dtype code, sequence count, document-index entries."""
    return MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[np.dtype(dtype)], seq_count, doc_count)


def dataset_info(dtype: np.dtype, num_documents: int, num_sequences: int, num_tokens: int, max_token_id: int,
                 bin_file: str | os.PathLike, idx_file: str | os.PathLike) -> dict:
    """The sidecar fields that describe the files themselves (counts, sizes, hashes)."""
    return {
        "format": META_FORMAT,
        "format_version": 1,
        "dtype": np.dtype(dtype).name,
        "num_documents": int(num_documents),
        "num_sequences": int(num_sequences),
        "num_tokens": int(num_tokens),
        "max_token_id": int(max_token_id),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bin_bytes": os.path.getsize(bin_file),
        "bin_fingerprint": bin_fingerprint(bin_file),
        "idx_sha256": file_sha256(idx_file),
    }


def commit_dataset(prefix: str | os.PathLike, tmp_bin: str | os.PathLike, tmp_idx: str | os.PathLike,
                   info: dict | None, tmp_meta: str | os.PathLike) -> None:
    """Write ``info`` as the sidecar (None: no sidecar) and move temporary files into place, .idx last."""
    if info is not None:
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
    # The .idx is the commit marker: drop the old one first, move it in last.
    for old in (idx_path(prefix), meta_path(prefix)):
        old.unlink(missing_ok=True)
    os.replace(tmp_bin, bin_path(prefix))
    if info is not None:
        os.replace(tmp_meta, meta_path(prefix))
    os.replace(tmp_idx, idx_path(prefix))


def _write_index(path: str | os.PathLike, dtype: np.dtype, lengths: np.ndarray, doc_indices: np.ndarray) -> None:
    """Write an .idx file exactly as Megatron's ``_IndexWriter`` lays it out."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(index_header(dtype, len(lengths), len(doc_indices)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_indices, dtype=np.int64).tobytes(order="C"))
        f.flush()
        os.fsync(f.fileno())


class IndexedDatasetBuilder:
    """Write documents into ``PREFIX.bin``/``PREFIX.idx`` (Megatron format), atomically on ``finalize``.

    Args:
        prefix: output path without extension.
        dtype: token dtype (one of the Megatron dtype codes; uint16 or int32 for tokens).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: Any = np.int32) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataFileError(
                f"dtype {self.dtype} cannot be stored in the Megatron format for {self.prefix}; "
                f"use one of {sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}"
            )
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        self._tmp_bin = f"{self.prefix}.bin{tag}"
        self._tmp_idx = f"{self.prefix}.idx{tag}"
        self._tmp_meta = f"{self.prefix}.json{tag}"
        self._file = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = []  # per batch: sequence counts after each document
        self._num_sequences = 0
        self._num_tokens = 0
        self.max_token_id = -1
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    @property
    def num_documents(self) -> int:
        return int(sum(len(d) for d in self._doc_ends))

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def _cast(self, tokens: Any) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if self._info is not None and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(
                    f"token ids in [{lo}, {hi}] do not fit {self.dtype} for {self.prefix}; "
                    "build with dtype=np.int32 (vocabularies of 65,500 or more need int32)"
                )
            self.max_token_id = max(self.max_token_id, hi)
        return arr.astype(self.dtype, copy=False)

    def add_document(self, tokens: Any, lengths: Sequence[int] | None = None) -> None:
        """Append one document; ``lengths`` splits it into sequences (default: one sequence)."""
        arr = self._cast(tokens)
        lens = np.asarray([arr.size] if lengths is None else lengths, dtype=np.int64)
        if int(lens.sum()) != arr.size:
            raise ValueError(f"sequence lengths {lens.tolist()} do not add up to the document's {arr.size} tokens")
        self._file.write(arr.tobytes(order="C"))
        self._lengths.append(lens.astype(np.int32))
        self._num_sequences += len(lens)
        self._num_tokens += arr.size
        self._doc_ends.append(np.array([self._num_sequences], dtype=np.int64))

    def add_documents(self, flat_tokens: Any, doc_lengths: Any) -> None:
        """Append many single-sequence documents at once: ``flat_tokens`` split by ``doc_lengths``."""
        arr = self._cast(flat_tokens)
        lens = np.asarray(doc_lengths, dtype=np.int64)
        if int(lens.sum()) != arr.size:
            raise ValueError(f"document lengths add up to {int(lens.sum())} but {arr.size} tokens were given")
        self._file.write(arr.tobytes(order="C"))
        self._lengths.append(lens.astype(np.int32))
        self._doc_ends.append(self._num_sequences + np.arange(1, len(lens) + 1, dtype=np.int64))
        self._num_sequences += len(lens)
        self._num_tokens += arr.size

    def finalize(self, meta: dict | None = None) -> dict:
        """Write the index (and the ``PREFIX.json`` sidecar) and move everything into place.

        Args:
            meta: extra fields for the sidecar (tokenizer identity, vocab size, inputs, ...).

        Returns:
            The metadata written to ``PREFIX.json``.
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_indices = np.concatenate([np.zeros(1, np.int64), *self._doc_ends])
        _write_index(self._tmp_idx, self.dtype, lengths, doc_indices)
        info = dataset_info(self.dtype, len(doc_indices) - 1, len(lengths), self._num_tokens, self.max_token_id,
                            self._tmp_bin, self._tmp_idx)
        info.update(meta or {})
        commit_dataset(self.prefix, self._tmp_bin, self._tmp_idx, info, self._tmp_meta)
        return info

    def abort(self) -> None:
        """Remove the temporary files (call on error; nothing partial is left behind)."""
        if not self._file.closed:
            self._file.close()
        for p in (self._tmp_bin, self._tmp_idx, self._tmp_meta):
            Path(p).unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


def _fail(path: Path | str, what: str, fix: str = REBUILD_HINT) -> DataFileError:
    return DataFileError(f"{path}: {what}; {fix}")


def _read_header(path: Path) -> tuple[np.dtype, int, int]:
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise _fail(path, f"index file is {size} bytes, shorter than the {HEADER_BYTES}-byte header (truncated?)")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[: len(MAGIC)] != MAGIC:
        raise _fail(path, f"bad magic {head[:len(MAGIC)]!r} (expected {MAGIC!r}): not a Megatron/megalong .idx file")
    (version,) = struct.unpack_from("<Q", head, 9)
    if version != VERSION:
        raise _fail(path, f"unsupported index version {version} (only version {VERSION} exists)")
    code = head[17]
    if code not in DTYPE_CODES:
        raise _fail(path, f"unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
    seq_count, doc_count = struct.unpack_from("<QQ", head, 18)
    expected = HEADER_BYTES + seq_count * 12 + doc_count * 8
    # Megatron's multimodal files append one int8 mode per sequence.
    if size not in (expected, expected + seq_count):
        raise _fail(
            path,
            f"index is {size} bytes but its header ({seq_count} sequences, {doc_count} document entries) "
            f"implies {expected}: truncated, or the counts are inconsistent",
        )
    if doc_count < 1:
        raise _fail(path, "document index is empty (a valid index starts with 0)")
    return np.dtype(DTYPE_CODES[code]), int(seq_count), int(doc_count)


def _validate_arrays(path: Path, itemsize: int, lengths: np.ndarray, pointers: np.ndarray,
                     doc_indices: np.ndarray) -> int:
    """Check pointers against lengths and the document index; return the implied .bin size in bytes."""
    n = len(lengths)
    if n and int(lengths.min()) < 0:
        raise _fail(path, f"negative sequence length {int(lengths.min())}")
    nbytes = lengths.astype(np.int64) * itemsize
    expected_ptr = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(nbytes[:-1], out=expected_ptr[1:])
    if n and not np.array_equal(pointers, expected_ptr):
        bad = int(np.flatnonzero(pointers != expected_ptr)[0])
        raise _fail(path, f"sequence {bad} points at byte {int(pointers[bad])}, but the lengths before it "
                          f"put it at {int(expected_ptr[bad])} (corrupt index)")
    if doc_indices[0] != 0 or doc_indices[-1] != n or (len(doc_indices) > 1 and np.any(np.diff(doc_indices) < 0)):
        raise _fail(path, f"document index must rise from 0 to the sequence count {n}; "
                          f"got first={int(doc_indices[0])} last={int(doc_indices[-1])}")
    return int(expected_ptr[-1] + nbytes[-1]) if n else 0


class IndexedDataset:
    """Read-only, memory-mapped view of a ``PREFIX.bin``/``PREFIX.idx`` pair (megalong's or Megatron's).

    ``len(ds)`` is the number of documents and ``ds[i]`` the tokens of document i (a read-only
    numpy view into the mapped .bin, dtype ``ds.dtype``).

    Args:
        prefix: path without extension.
        verify_meta: when ``PREFIX.json`` exists, check that it, the .idx and the .bin come from
            the same run (hashes the .idx; cheap next to reading the data).
    """

    def __init__(self, prefix: str | os.PathLike, verify_meta: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        ip, bp = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise DataFileError(
                    f"{p}: no such file (a dataset needs both {bp.name} and {ip.name}); "
                    "check data.prefixes (a path without .bin/.idx) or run tools/preprocess_data.py"
                )
        self.dtype, seq_count, doc_count = _read_header(ip)
        self._idx = np.memmap(ip, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, seq_count, off)
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, seq_count, off + 4 * seq_count)
        self.document_indices = np.frombuffer(self._idx, np.int64, doc_count, off + 12 * seq_count)
        need = _validate_arrays(ip, self.dtype.itemsize, self.sequence_lengths, self.sequence_pointers,
                                self.document_indices)
        have = bp.stat().st_size
        if have != need:
            raise _fail(bp, f"data file is {have} bytes but {ip.name} describes {need} bytes "
                            f"({'truncated' if have < need else 'too long'}, or .bin and .idx come from different runs)")
        self.meta = read_data_meta(self.prefix)
        if verify_meta and self.meta is not None:
            self._check_meta(ip, bp)
        self.tokens = (np.memmap(bp, dtype=self.dtype, mode="r") if need else np.zeros(0, self.dtype))
        starts = np.zeros(seq_count + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, out=starts[1:])
        self.doc_starts = starts[self.document_indices[:-1]]  # token offset of each document
        self.doc_lengths = starts[self.document_indices[1:]] - self.doc_starts

    def _check_meta(self, ip: Path, bp: Path) -> None:
        m = self.meta or {}
        if "idx_sha256" in m and m["idx_sha256"] != file_sha256(ip):
            raise _fail(meta_path(self.prefix), f"sidecar does not describe {ip.name} (index hash differs): "
                                                "the files come from different runs")
        if "bin_fingerprint" in m and m["bin_fingerprint"] != bin_fingerprint(bp):
            raise _fail(bp, f"data file does not match {ip.name}/{meta_path(self.prefix).name} "
                            "(content hash differs): the files come from different runs")
        if m.get("dtype") not in (None, self.dtype.name):
            raise _fail(meta_path(self.prefix), f"sidecar says dtype {m['dtype']} but the index says {self.dtype.name}")

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {self.prefix} ({n} documents)")
        i %= n
        start = int(self.doc_starts[i])
        return self.tokens[start: start + int(self.doc_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document i (to the end when length is None)."""
        doc = self[i]
        return doc[offset:] if length is None else doc[offset: offset + length]

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    @property
    def identity(self) -> str:
        """Content identity for cache keys: hash of the .idx plus the .bin fingerprint."""
        if not hasattr(self, "_identity"):
            m = self.meta or {}
            idx_hash = m.get("idx_sha256") or file_sha256(idx_path(self.prefix))
            self._identity = f"{idx_hash}:{m.get('bin_fingerprint') or bin_fingerprint(bin_path(self.prefix))}"
        return self._identity


def read_data_meta(prefix: str | os.PathLike) -> dict | None:
    """The ``PREFIX.json`` sidecar as a dict, or None when absent (e.g. files written by Megatron-LM)."""
    p = meta_path(prefix)
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(p, f"unreadable sidecar ({e})", f"delete it (optional) or {REBUILD_HINT}") from e
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise _fail(p, f"not a megalong data sidecar (format={meta.get('format') if isinstance(meta, dict) else None!r})",
                    f"move it away (PREFIX.json is reserved for megalong's metadata) or {REBUILD_HINT}")
    return meta


def _scan_max_token(ds: IndexedDataset, chunk: int = 1 << 24) -> int:
    best = -1
    for s in range(0, len(ds.tokens), chunk):
        best = max(best, int(ds.tokens[s: s + chunk].max()))
    return best


def check_tokenizer_matches(prefix: str | os.PathLike, vocab_size: int, tokenizer_hash: str | None = None,
                            scan_limit_bytes: int = 1 << 31) -> dict | None:
    """Raise :class:`DataFileError` when a dataset's tokens cannot belong to a model's vocabulary.

    Checks, from the sidecar: max token id < ``vocab_size``; and when both sides know it, that the
    tokenizer fingerprint (a hash of the vocabulary, see ``megalong.data.tokenizer``) is the same.
    Without a sidecar (Megatron's files) the max token id is found by scanning the .bin when it is
    at most ``scan_limit_bytes`` (otherwise that check is skipped).

    Returns:
        The sidecar metadata (None for files without one).
    """
    meta = read_data_meta(prefix)
    fix = "re-run tools/preprocess_data.py with the model's tokenizer, or use the matching model"
    if meta is not None:
        max_id = int(meta.get("max_token_id", -1))
        theirs = (meta.get("tokenizer") or {}).get("fingerprint")
        if tokenizer_hash and theirs and theirs != tokenizer_hash:
            name = (meta.get("tokenizer") or {}).get("path")
            raise _fail(meta_path(prefix), f"data was tokenized with a different tokenizer ({name}, vocabulary hash "
                                           f"{theirs[:12]}…) than the model's (hash {tokenizer_hash[:12]}…)", fix)
    else:
        ds = IndexedDataset(prefix, verify_meta=False)
        if ds.dtype.itemsize * len(ds.tokens) > scan_limit_bytes or ds.dtype.kind not in "iu":
            return None
        max_id = _scan_max_token(ds) if len(ds.tokens) else -1
    if max_id >= vocab_size:
        raise _fail(bin_path(prefix), f"holds token id {max_id} but the model's vocabulary has only {vocab_size} "
                                      "entries", fix)
    return meta
