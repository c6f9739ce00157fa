"""Join datasets (the shards of one preprocessing run, or any datasets of one tokenizer) into one.

    part 0: a.bin a.idx ┐   out.bin = a.bin ‖ b.bin ‖ c.bin                 (copied in chunks)
    part 1: b.bin b.idx ├─► out.idx = header(S = ΣS_k, D = Σ(D_k - 1) + 1)
    part 2: c.bin c.idx ┘             ‖ lengths_a ‖ lengths_b ‖ lengths_c
                                      ‖ pointers_k + bytes of the parts before k
                                      ‖ 0 ‖ doc_indices_k[1:] + sequences of the parts before k

This is the layout Megatron-LM's ``merge_datasets.py`` writes. The shards of
``tools/preprocess_data.py --shard I/N`` are contiguous blocks of the ordered input files, so
merging shards 0..N-1 gives ``.bin`` and ``.idx`` files byte-identical to one run over all
inputs, and a ``PREFIX.json`` equal to that run's except ``created`` and the added
``merged_from`` (which parts, their counts and creation times). SFT datasets merge their
``PREFIX_mask`` loss masks the same way. Nothing is loaded whole: the .bin files are copied in
chunks and the index arrays are read through memory maps, a chunk at a time. Outputs are written
to temporary files and moved into place only on success.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megalong.data.indexed import (
    HEADER_BYTES,
    DataFileError,
    IndexedDataset,
    bin_path,
    commit_dataset,
    dataset_info,
    idx_path,
    index_header,
)
from megalong.utils.progress import Progress

MASK_SUFFIX = "_mask"  # megalong.data.sft.mask_prefix
# Sidecar fields every part must share: they decide what the tokens mean.
MUST_AGREE = ("kind", "vocab_size", "eos_id", "bos_id", "append_eod", "prepend_bos", "sft_template", "chat")
# Sidecar fields that describe one part's files or inputs: recomputed or combined for the merge.
PER_PART = ("format", "format_version", "dtype", "num_documents", "num_sequences", "num_tokens", "max_token_id",
            "created", "bin_bytes", "bin_fingerprint", "idx_sha256", "input_files", "skipped_documents", "shard",
            "merged_from", "json_key", "tokenizer")
CHUNK_ITEMS = 1 << 22  # index entries per read (32 MiB of int64)


@dataclass
class Part:
    """One validated input: its counts and sidecar (the index arrays are mapped again when written)."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int
    bin_bytes: int
    meta: dict | None

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memory-mapped (lengths i32[S], pointers i64[S], document indices i64[D + 1])."""
        idx, s = np.memmap(idx_path(self.prefix), dtype=np.uint8, mode="r"), self.num_sequences
        return (np.frombuffer(idx, np.int32, s, HEADER_BYTES), np.frombuffer(idx, np.int64, s, HEADER_BYTES + 4 * s),
                np.frombuffer(idx, np.int64, self.num_documents + 1, HEADER_BYTES + 12 * s))


def list_prefixes(directory: str | os.PathLike, pattern: str = "*", exclude: str | os.PathLike | None = None) -> list[str]:
    """Every dataset prefix in ``directory`` whose name matches ``pattern``, sorted by name.

    A prefix is a name with both ``NAME.idx`` and ``NAME.bin``. The loss masks of SFT datasets
    (``NAME_mask`` next to ``NAME``) are left out: they are merged together with ``NAME``; so is
    ``exclude`` (the merge's output prefix, when it is written into the same directory).
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataFileError(f"{d}: not a directory; pass --input DIR or a list of prefixes")
    names = sorted(p.name[:-4] for p in d.iterdir() if p.name.endswith(".idx") and (d / f"{p.name[:-4]}.bin").is_file())
    names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    keep = [n for n in names if not (n.endswith(MASK_SUFFIX) and n[: -len(MASK_SUFFIX)] in names)]
    if exclude is not None:
        out = bin_path(exclude).resolve()
        keep = [n for n in keep if (d / f"{n}.bin").resolve() != out]
    if not keep:
        raise DataFileError(f"{d}: no datasets (NAME.bin + NAME.idx) matching {pattern!r}; check --input/--pattern")
    return [os.fspath(d / n) for n in keep]


def _open_parts(prefixes: list[str]) -> list[Part]:
    parts = []
    for p in prefixes:
        for f in (idx_path(p), bin_path(p)):
            if not f.is_file():
                raise DataFileError(f"{f}: no such file; the merge input {p} needs both {bin_path(p).name} and "
                                    f"{idx_path(p).name}: check --input (prefixes without .bin/.idx) or re-run "
                                    "tools/preprocess_data.py for it")
        ds = IndexedDataset(p)  # validates the .idx/.bin (and the sidecar, when present)
        seqs, docs = len(ds.sequence_lengths), len(ds.document_indices) - 1
        if idx_path(p).stat().st_size != HEADER_BYTES + 12 * seqs + 8 * (docs + 1):
            raise DataFileError(f"{idx_path(p)}: multimodal index (one mode byte per sequence) cannot be merged; "
                                "merge text datasets only")
        parts.append(Part(os.fspath(p), ds.dtype, seqs, docs, int(ds.sequence_lengths.sum(dtype=np.int64)),
                          bin_path(p).stat().st_size, ds.meta))
        del ds  # its per-document arrays are not needed: keep one shard's worth in memory at a time
    return parts


def _check_compatible(parts: list[Part]) -> None:
    first = parts[0]
    for p in parts[1:]:
        if p.dtype != first.dtype:
            raise DataFileError(f"{idx_path(p.prefix)}: holds {p.dtype} tokens but {idx_path(first.prefix)} holds "
                                f"{first.dtype}: they were tokenized with different vocabularies; merge only "
                                "datasets made with one tokenizer (re-run tools/preprocess_data.py for the odd one)")
    with_meta = [p for p in parts if p.meta is not None]
    if with_meta and len(with_meta) != len(parts):
        bare = next(p for p in parts if p.meta is None)
        raise DataFileError(f"{bare.prefix}.json: missing, but {with_meta[0].prefix}.json exists, so the tokenizers "
                            "cannot be compared; re-run tools/preprocess_data.py for it, or merge only files "
                            "without sidecars (Megatron-LM's)")
    if not with_meta:
        return
    ref = first.meta
    for p in parts[1:]:
        theirs, ours = (p.meta.get("tokenizer") or {}), (ref.get("tokenizer") or {})
        if theirs.get("fingerprint") != ours.get("fingerprint") or p.meta.get("vocab_size") != ref.get("vocab_size"):
            raise DataFileError(
                f"{p.prefix}.json: tokenized with a different tokenizer ({theirs.get('path')}, vocab "
                f"{p.meta.get('vocab_size')}, hash {str(theirs.get('fingerprint'))[:12]}…) than {first.prefix} "
                f"({ours.get('path')}, vocab {ref.get('vocab_size')}, hash {str(ours.get('fingerprint'))[:12]}…); "
                "re-run tools/preprocess_data.py with one tokenizer for all parts")
        for key in MUST_AGREE:
            if p.meta.get(key) != ref.get(key):
                raise DataFileError(f"{p.prefix}.json: {key}={p.meta.get(key)!r} but {first.prefix}.json has "
                                    f"{key}={ref.get(key)!r}; re-run tools/preprocess_data.py with the same options "
                                    "for every part")


def order_shards(parts: list[Part]) -> list[Part]:
    """Parts written by ``--shard I/N``, checked complete and put in shard order; other parts as given."""
    shards = [(p.meta or {}).get("shard") for p in parts]
    if not any(shards):
        return parts
    if not all(shards):
        odd = parts[shards.index(None)]
        one = parts[next(k for k, s in enumerate(shards) if s)]
        raise DataFileError(f"{odd.prefix}: not a shard, but {one.prefix} is one (--shard); merge the N shards of "
                            "one run on their own, or pass check_shards=False (--no-shard-check) to merge in the "
                            "given order")
    ref = shards[0]
    for p, s in zip(parts, shards):
        if s["count"] != ref["count"] or s["inputs_sha256"] != ref["inputs_sha256"]:
            raise DataFileError(f"{p.prefix}.json: shard {s['index']}/{s['count']} of another run than "
                                f"{parts[0].prefix} (shard {ref['index']}/{ref['count']}: different shard count "
                                "or input file list); merge the shards of one run")
    by_index: dict[int, Part] = {}
    for p, s in zip(parts, shards):
        if s["index"] in by_index:
            raise DataFileError(f"{p.prefix}: shard {s['index']}/{s['count']} given twice (also "
                                f"{by_index[s['index']].prefix}); pass each shard once")
        by_index[s["index"]] = p
    missing = [i for i in range(ref["count"]) if i not in by_index]
    if missing:
        raise DataFileError(f"shards {', '.join(map(str, missing))} of {ref['count']} are missing (have "
                            f"{', '.join(map(str, sorted(by_index)))}); run tools/preprocess_data.py --shard I/"
                            f"{ref['count']} for them and merge all {ref['count']}")
    return [by_index[i] for i in range(ref["count"])]


def _write_chunks(f: Any, arr: np.ndarray, add: int = 0) -> None:
    for s in range(0, len(arr), CHUNK_ITEMS):
        block = np.asarray(arr[s: s + CHUNK_ITEMS])
        f.write((block + add).tobytes() if add else block.tobytes())


def _write_index(path: str, parts: list[Part]) -> None:
    seqs = sum(p.num_sequences for p in parts)
    docs = sum(p.num_documents for p in parts) + 1
    with open(path, "wb") as f:
        f.write(index_header(parts[0].dtype, seqs, docs))
        for p in parts:
            _write_chunks(f, p.index_arrays()[0])
        byte_base = 0
        for p in parts:
            _write_chunks(f, p.index_arrays()[1], byte_base)
            byte_base += p.bin_bytes
        f.write(np.zeros(1, np.int64).tobytes())
        seq_base = 0
        for p in parts:
            _write_chunks(f, p.index_arrays()[2][1:], seq_base)
            seq_base += p.num_sequences
        f.flush()
        os.fsync(f.fileno())


def _copy_bins(path: str, parts: list[Part], bar: Progress, chunk_bytes: int, done: list[int]) -> None:
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    mib = 1 << 20
    with open(path, "wb") as out:
        for p in parts:
            with open(bin_path(p.prefix), "rb") as src:
                while n := src.readinto(buf):
                    out.write(view[:n])
                    done[0] += n
                    if done[0] // mib > bar.done:
                        bar.update(done[0] // mib - bar.done)
        out.flush()
        os.fsync(out.fileno())


def _merged_meta(parts: list[Part], files: dict) -> dict | None:
    if parts[0].meta is None:
        return None
    ref = parts[0].meta
    meta = {k: v for k, v in ref.items() if k not in PER_PART}
    keys = list(dict.fromkeys(p.meta.get("json_key") for p in parts))
    max_id = max(int(p.meta.get("max_token_id", -1)) for p in parts)
    info = dataset_info(parts[0].dtype, sum(p.num_documents for p in parts), sum(p.num_sequences for p in parts),
                        sum(p.num_tokens for p in parts), max_id, files["bin"], files["idx"])
    info.update(meta)
    info["tokenizer"] = ref.get("tokenizer")
    info["json_key"] = keys[0] if len(keys) == 1 else keys
    if all("input_files" in p.meta for p in parts):
        info["input_files"] = [f for p in parts for f in p.meta["input_files"]]
    if all("skipped_documents" in p.meta for p in parts):
        info["skipped_documents"] = sum(int(p.meta["skipped_documents"]) for p in parts)
    info["merged_from"] = [
        {"prefix": str(Path(p.prefix).resolve()), "num_documents": p.num_documents, "num_tokens": p.num_tokens,
         "created": p.meta.get("created"), **({"shard": p.meta["shard"]["index"]} if "shard" in p.meta else {})}
        for p in parts]
    return info


def _check_output(prefixes: list[str], output_prefix: str) -> None:
    out = {bin_path(output_prefix).resolve(), bin_path(output_prefix + MASK_SUFFIX).resolve()}
    for p in prefixes:
        if bin_path(p).resolve() in out:
            raise DataFileError(f"--output-prefix {output_prefix} would overwrite the input {p}; "
                                "write the merged dataset to a new prefix")


def _check_space(output_prefix: str, need: int) -> None:
    parent = Path(output_prefix).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise DataFileError(f"{parent}: {free / 2**30:.1f} GiB free but the merged dataset needs "
                            f"{need / 2**30:.1f} GiB; free space or choose another --output-prefix")


def merge_datasets(prefixes: list[str | os.PathLike], output_prefix: str | os.PathLike, progress: bool = True,
                   check_shards: bool = True, chunk_bytes: int = 16 << 20) -> dict:
    """Join datasets into ``OUTPUT_PREFIX.{bin,idx,json}`` (and ``_mask`` files for SFT datasets).

    Args:
        prefixes: input prefixes, in order (see :func:`list_prefixes` for a directory).
        output_prefix: output path without extension; must differ from every input.
        progress: report bytes copied (a bar on a terminal, log lines elsewhere).
        check_shards: when the inputs are shards (``--shard I/N``), require all N of one run and
            merge them in shard order; False merges whatever is given, in the given order.
        chunk_bytes: .bin bytes copied per read.

    Returns:
        Summary: parts, documents, tokens, bytes, seconds, MB_per_s, prefix, and the sidecar (None
        when the inputs have none).
    """
    prefixes = [os.fspath(p) for p in prefixes]
    output_prefix = os.fspath(output_prefix)
    if not prefixes:
        raise DataFileError("no input datasets to merge; pass --input PREFIX [PREFIX ...] or a directory")
    _check_output(prefixes, output_prefix)
    parts = _open_parts(prefixes)
    _check_compatible(parts)
    if check_shards:
        parts = order_shards(parts)
    sft = parts[0].meta is not None and parts[0].meta.get("kind") == "sft"
    masks = _mask_parts(parts) if sft else []
    total = sum(p.bin_bytes for p in parts + masks)
    _check_space(output_prefix, total + sum(idx_path(p.prefix).stat().st_size for p in parts + masks))
    tag = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    jobs = [(output_prefix + MASK_SUFFIX, masks), (output_prefix, parts)] if sft else [(output_prefix, parts)]
    tmp = {out: {e: f"{out}.{e}{tag}" for e in ("bin", "idx", "json")} for out, _ in jobs}
    total_mib = max(1, total >> 20)
    bar = Progress(total_mib, "merging", every=max(1, total_mib // 10), enabled=progress, unit="MiB")
    done = [0]
    start = time.perf_counter()
    try:
        for out, ps in jobs:
            _copy_bins(tmp[out]["bin"], ps, bar, chunk_bytes, done)
            _write_index(tmp[out]["idx"], ps)
        if bar.done < total_mib:
            bar.update(total_mib - bar.done)
        metas = {out: _merged_meta(ps, tmp[out]) for out, ps in jobs}
        for out, _ in jobs:  # the mask first, the tokens last (as preprocess does)
            commit_dataset(out, tmp[out]["bin"], tmp[out]["idx"], metas[out], tmp[out]["json"])
    except BaseException:
        for files in tmp.values():
            for f in files.values():
                Path(f).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    meta = metas[output_prefix]
    return {"parts": len(parts), "documents": sum(p.num_documents for p in parts),
            "tokens": sum(p.num_tokens for p in parts), "bytes": total, "seconds": seconds,
            "MB_per_s": total / 1e6 / max(seconds, 1e-9), "prefix": output_prefix, "sft": sft, "meta": meta,
            "inputs": [p.prefix for p in parts]}


def _mask_parts(parts: list[Part]) -> list[Part]:
    masks = []
    for p in parts:
        mp = p.prefix + MASK_SUFFIX
        if not (bin_path(mp).is_file() and idx_path(mp).is_file()):
            raise DataFileError(f"{p.prefix}: SFT dataset without its loss mask {mp}.bin/.idx; copy the mask files "
                                "next to it or re-run tools/preprocess_data.py --sft for this part")
        m = _open_parts([mp])[0]
        a, b = m.index_arrays()[0], p.index_arrays()[0]
        if len(a) != len(b) or any(not np.array_equal(a[s: s + CHUNK_ITEMS], b[s: s + CHUNK_ITEMS])
                                   for s in range(0, len(a), CHUNK_ITEMS)):
            raise DataFileError(f"{mp}: loss mask does not match {p.prefix} (different document lengths); "
                                "re-run tools/preprocess_data.py --sft for this part")
        masks.append(m)
    return masks
