"""Tokenize raw text (JSONL[.gz], JSON arrays, .txt, parquet; directories of those) into mmap datasets.

    main process                       worker processes (tokenizer loaded once each)
    read files ─► batches of raw lines ─► parse JSON, pick the text, encode_batch ─► flat numpy tokens
         ▲                                                                              │
         └──── in order, at most 2 × workers batches in flight ◄────────────────────────┘
    builder.add_documents(tokens, lengths) ─► PREFIX.bin / .idx / .json (atomic, on success only)

Compared with Megatron-LM's preprocess_data.py (one JSON line per task, a Python list of ids back),
work moves in batches (one tokenizer call and one numpy buffer per batch) and the number of
batches in flight is bounded, so memory stays flat on any input size. Any error (missing file,
bad JSON line, missing key) aborts the run and removes the temporary files: nothing partial is left.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megalong.data.indexed import DataFileError, IndexedDatasetBuilder, dtype_for_vocab
from megalong.data.tokenizer import BaseTokenizer, load_tokenizer, to_array

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz", ".parquet")


def _has_known_ext(p: Path) -> bool:
    return p.name.endswith(EXTENSIONS)


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Resolve files and directories (searched recursively, sorted) into the list of input files."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _has_known_ext(f))
            if not found:
                raise DataFileError(f"{p}: directory holds no input files ({', '.join(EXTENSIONS)}); "
                                    "point --input at the right directory")
            files += found
        elif p.is_file():
            if not _has_known_ext(p):
                raise DataFileError(f"{p}: unsupported input type; use one of {', '.join(EXTENSIONS)}")
            files.append(p)
        else:
            raise DataFileError(f"{p}: no such file or directory; check --input")
    return files


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, validated (N >= 1, 0 <= I < N)."""
    parts = spec.split("/")
    try:
        index, count = (int(x) for x in parts)
    except ValueError:
        raise DataFileError(f"--shard {spec!r}: expected I/N with whole numbers, e.g. --shard 3/16 "
                            "(shard 3 of 16, counting from 0)") from None
    check_shard(index, count)
    return index, count


def check_shard(index: int, count: int) -> None:
    if count < 1:
        raise DataFileError(f"shard {index}/{count}: the shard count N must be at least 1")
    if not 0 <= index < count:
        raise DataFileError(f"shard {index}/{count}: the shard index I must be in 0..{count - 1} (counting from 0)")


def shard_range(sizes: list[int], index: int, count: int) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of files that shard ``index`` of ``count`` tokenizes.

    Blocks are balanced by bytes: a file belongs to the shard whose equal-bytes slice of the
    ordered input holds the middle byte of the file (by file count when all files are empty).
    A file is never split, so a shard may be empty (more shards than files, or one huge file).
    Shards 0..count-1 in order cover every file exactly once, in input order.
    """
    check_shard(index, count)
    total = sum(sizes)
    owner = []
    before = 0
    for k, size in enumerate(sizes):
        if total > 0:
            owner.append(min(count - 1, (2 * before + size) * count // (2 * total)))
        else:
            owner.append(k * count // max(len(sizes), 1))
        before += size
    start = sum(1 for o in owner if o < index)
    return start, start + sum(1 for o in owner if o == index)


def inputs_sha256(files: list[Path]) -> str:
    """Identity of an ordered input list (file names and sizes; mount points do not matter)."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


@dataclass
class Batch:
    """A unit of work: raw JSON lines (parsed in the worker) or records/texts (parsed in main)."""

    source: str
    first_line: int
    kind: str  # "lines" (raw JSONL), "records" (dicts) or "texts" (strings)
    items: list[Any] = field(default_factory=list)


def _open_text(p: Path) -> io.TextIOBase:
    if p.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
    return open(p, encoding="utf-8")


def _is_json_array(p: Path) -> bool:
    with _open_text(p) as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def _chunks(source: str, kind: str, items: Iterator[Any], batch_size: int, max_bytes: int,
            first: int = 1) -> Iterator[Batch]:
    batch, size, line = Batch(source, first, kind), 0, first
    for item in items:
        batch.items.append(item)
        size += len(item) if isinstance(item, str) else 1
        line += 1
        if len(batch.items) >= batch_size or size >= max_bytes:
            yield batch
            batch, size = Batch(source, line, kind), 0
    if batch.items:
        yield batch


def read_batches(files: list[Path], batch_size: int = 128, max_bytes: int = 1 << 18,
                 columns: list[str] | None = None) -> Iterator[Batch]:
    """Yield batches of work from the input files, in file order."""
    txt_batch = Batch("(text files)", 0, "texts")
    for p in files:
        name = p.name
        if txt_batch.items and not name.endswith((".txt", ".txt.gz")):  # keep file order
            yield txt_batch
            txt_batch = Batch("(text files)", 0, "texts")
        try:
            if name.endswith((".txt", ".txt.gz")):
                with _open_text(p) as f:
                    txt_batch.items.append(f.read())
                if len(txt_batch.items) >= batch_size:
                    yield txt_batch
                    txt_batch = Batch("(text files)", 0, "texts")
            elif name.endswith(".parquet"):
                yield from _parquet_batches(p, batch_size, columns)
            elif name.endswith((".json", ".json.gz")) and _is_json_array(p):
                with _open_text(p) as f:
                    records = json.load(f)
                yield from _chunks(str(p), "records", iter(records), batch_size, 1 << 62)
            else:
                with _open_text(p) as f:
                    yield from _chunks(str(p), "lines", iter(f), batch_size, max_bytes)
        except UnicodeDecodeError as e:
            raise DataFileError(f"{p}: not UTF-8 text ({e}); convert it to UTF-8 or leave it out") from e
        except json.JSONDecodeError as e:
            raise DataFileError(f"{p}: invalid JSON ({e}); fix the file or leave it out") from e
        except OSError as e:
            raise DataFileError(f"{p}: cannot be read ({e})") from e
    if txt_batch.items:
        yield txt_batch


def _parquet_batches(p: Path, batch_size: int, columns: list[str] | None) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataFileError(f"{p}: reading parquet needs pyarrow; pip install pyarrow") from e
    pf = pq.ParquetFile(p)
    missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
    if missing:
        raise DataFileError(f"{p}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            "pass --json-key with the text column")
    row = 1
    for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
        yield Batch(str(p), row, "records", rb.to_pylist())
        row += rb.num_rows


def records_of(batch: Batch) -> list[dict]:
    """Parse a batch into dicts; errors name the file and line."""
    if batch.kind == "records":
        out = batch.items
        for k, rec in enumerate(out):
            if not isinstance(rec, dict):
                raise DataFileError(f"{batch.source}: record {batch.first_line + k} is {type(rec).__name__}, "
                                    "not an object; each record must be a JSON object")
        return out
    out = []
    for k, line in enumerate(batch.items):
        if not line.strip():
            out.append({})  # blank line: an empty document
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{batch.source}:{batch.first_line + k}: invalid JSON ({e.msg} at column "
                                f"{e.colno}); fix or remove that line") from e
        if not isinstance(rec, dict):
            raise DataFileError(f"{batch.source}:{batch.first_line + k}: a JSON {type(rec).__name__}, "
                                "not an object; each line must be a JSON object")
        out.append(rec)
    return out


def texts_of(batch: Batch, json_key: str) -> list[str]:
    """The document texts of a pretraining batch (``json_key`` of each record)."""
    if batch.kind == "texts":
        return batch.items
    texts = []
    for k, rec in enumerate(records_of(batch)):
        if not rec:
            texts.append("")
            continue
        where = f"{batch.source}:{batch.first_line + k}"
        if json_key not in rec:
            raise DataFileError(f"{where}: no key {json_key!r} (keys: {', '.join(map(str, rec))}); "
                                "pass --json-key with the text field")
        text = rec[json_key]
        if not isinstance(text, str):
            raise DataFileError(f"{where}: {json_key!r} is {type(text).__name__}, not a string")
        texts.append(text)
    return texts


@dataclass
class Encoded:
    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None = None
    skipped: int = 0
    open_turns: int = 0  # chat: assistant turns without an end-of-turn token


@dataclass
class Task:
    """What a worker does with a batch: pretraining text, or SFT examples with a template."""

    tokenizer: str
    dtype: str
    json_key: str = "text"
    append_eod: bool = False
    prepend_bos: bool = False
    sft_template: str | None = None
    chat_template: str | None = None  # chat: the template text (None: the tokenizer's own)
    chat_source: str | None = None


_STATE: dict[str, Any] = {}


def _worker_init(task: Task) -> None:
    _STATE["task"] = task
    _STATE["tok"] = load_tokenizer(task.tokenizer)
    if task.sft_template == "chat":
        from megalong.data.chat import ChatEncoder

        _STATE["chat"] = ChatEncoder(task.tokenizer, task.chat_template, task.chat_source)


def encode_pretrain(tok: BaseTokenizer, texts: list[str], task: Task) -> Encoded:
    """Encode documents, skipping empty/whitespace-only ones, with optional BOS/EOD."""
    keep = [t for t in texts if t.strip()]
    ids = tok.encode_batch(keep) if keep else []
    if task.prepend_bos or task.append_eod:
        pre = [tok.bos_id] if task.prepend_bos else []
        post = [tok.eos_id] if task.append_eod else []
        ids = [pre + x + post for x in ids]
    tokens, lengths = to_array(ids, np.dtype(task.dtype))
    nonempty = lengths > 0
    return Encoded(tokens, lengths[nonempty], None, len(texts) - int(nonempty.sum()))


def _encode_in_worker(batch: Batch) -> Encoded:
    task: Task = _STATE["task"]
    tok: BaseTokenizer = _STATE["tok"]
    if task.sft_template == "chat":
        from megalong.data.chat import encode_chat_records

        return encode_chat_records(_STATE["chat"], records_of(batch), np.dtype(task.dtype), batch.source,
                                   batch.first_line)
    if task.sft_template is not None:
        from megalong.data.sft import encode_sft_records

        return encode_sft_records(tok, records_of(batch), task.sft_template, np.dtype(task.dtype),
                                  batch.source, batch.first_line, prepend_bos=task.prepend_bos)
    return encode_pretrain(tok, texts_of(batch, task.json_key), task)


def _ordered_map(fn: Callable[[Batch], Encoded], batches: Iterator[Batch], workers: int,
                 task: Task) -> Iterator[Encoded]:
    """Map ``fn`` over batches in worker processes, in order, with a bounded number in flight."""
    if workers == 0:
        _worker_init(task)
        for b in batches:
            yield fn(b)
        return
    # fork starts in milliseconds; it is safe here because the parent never encoded with the tokenizer
    # (so no tokenizer thread pool exists yet). Elsewhere (macOS, Windows) spawn.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() and sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(task,)) as pool:
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(fn, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _input_record(files: list[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files]


def preprocess(inputs: list[str | os.PathLike], output_prefix: str | os.PathLike, tokenizer: str | os.PathLike,
               workers: int = 1, append_eod: bool = False, prepend_bos: bool = False, json_key: str = "text",
               batch_size: int = 128, sft_template: str | None = None, progress: bool = True,
               shard: tuple[int, int] | None = None, chat_template: str | os.PathLike | None = None) -> dict:
    """Tokenize ``inputs`` into ``OUTPUT_PREFIX.{bin,idx,json}`` (and ``_mask`` files for SFT).

    Args:
        inputs: files or directories (JSONL[.gz], JSON arrays, .txt one document per file, parquet).
        output_prefix: output path without extension.
        tokenizer: HF tokenizer directory or SentencePiece ``.model``.
        workers: tokenizer processes (0: tokenize in this process).
        append_eod: end every document with the tokenizer's EOS (SFT examples always end with it).
        prepend_bos: start every document with the tokenizer's BOS.
        json_key: field (JSON) or column (parquet) holding the text.
        batch_size: documents per batch sent to a worker.
        sft_template: tokenize LongAlpaca-style instruction data with this prompt template
            (see ``megalong.data.sft.TEMPLATES``), or ``"chat"``: conversations (``messages`` or
            ShareGPT ``conversations``) with the tokenizer's chat template, loss on assistant turns
            (``megalong.data.chat``); also write the loss mask.
        progress: show a tqdm bar (tokens/s) on stderr.
        shard: ``(I, N)``: tokenize only block I of N of the ordered input files (see
            :func:`shard_range`); ``megalong.data.merge.merge_datasets`` joins the N outputs into
            the files one run over all inputs writes. A shard without files writes an empty dataset.
        chat_template: ``sft_template="chat"``: a Jinja chat template file to use instead of the
            tokenizer's own.

    Returns:
        Summary: documents, skipped, tokens, seconds, tokens_per_s, output prefix, and the metadata.
    """
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    files = expand_inputs(inputs)
    shard_meta = None
    if shard is not None:
        index, count = shard
        start, stop = shard_range([p.stat().st_size for p in files], index, count)
        shard_meta = {"index": index, "count": count, "file_range": [start, stop], "files_total": len(files),
                      "inputs_sha256": inputs_sha256(files)}
        files = files[start:stop]
    tok = load_tokenizer(tokenizer)
    chat = _chat_encoder(tokenizer, sft_template, chat_template, append_eod, prepend_bos)
    needs_eos = append_eod or (sft_template and chat is None)
    for flag, tid, what in ((needs_eos, tok.eos_id, "EOS"), (prepend_bos, tok.bos_id, "BOS")):
        if flag and tid is None:
            raise DataFileError(f"{tokenizer}: tokenizer has no {what} token, needed by the requested options")
    if sft_template is not None:
        from megalong.data.sft import SFT_FORMATS, mask_prefix

        if sft_template not in SFT_FORMATS:
            raise ValueError(f"sft template {sft_template!r} is unknown; use one of {', '.join(SFT_FORMATS)}")
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    task = Task(os.fspath(tokenizer), dtype.name, json_key, append_eod, prepend_bos, sft_template,
                chat.template if chat else None, chat.source if chat else None)
    builder = IndexedDatasetBuilder(output_prefix, dtype)
    mask_builder = IndexedDatasetBuilder(mask_prefix(output_prefix), np.uint8) if sft_template else None
    columns = None if sft_template else [json_key]
    stats = {"documents": 0, "skipped": 0, "open_turns": 0}
    bar = _progress_bar(progress)
    start = time.perf_counter()
    try:
        for enc in _ordered_map(_encode_in_worker, read_batches(files, batch_size, columns=columns), workers, task):
            builder.add_documents(enc.tokens, enc.lengths)
            if mask_builder is not None:
                mask_builder.add_documents(enc.mask, enc.lengths)
            stats["documents"] += len(enc.lengths)
            stats["skipped"] += enc.skipped
            stats["open_turns"] += enc.open_turns
            if bar is not None:
                bar.update(len(enc.tokens))
                bar.set_postfix(docs=stats["documents"], skipped=stats["skipped"], refresh=False)
    except BaseException:
        builder.abort()
        if mask_builder is not None:
            mask_builder.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    meta = {
        "kind": "sft" if sft_template else "pretrain", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "bos_id": tok.bos_id, "tokenizer": tok.identity(), "append_eod": bool(needs_eos),
        "prepend_bos": prepend_bos, "json_key": json_key, "sft_template": sft_template,
        "input_files": _input_record(files), "skipped_documents": stats["skipped"],
    }
    if shard_meta is not None:
        meta["shard"] = shard_meta
    if chat is not None:
        meta["chat"] = chat.describe()
        meta["chat_template_source"] = chat.source
    if mask_builder is not None:
        mask_builder.finalize({**meta, "kind": "sft_mask"})
    info = builder.finalize(meta)
    return {**stats, "files": len(files), "tokens": info["num_tokens"], "seconds": seconds,
            "tokens_per_s": info["num_tokens"] / max(seconds, 1e-9), "prefix": os.fspath(output_prefix), "meta": info}


def _chat_encoder(tokenizer: str | os.PathLike, sft_template: str | None, chat_template: str | os.PathLike | None,
                  append_eod: bool, prepend_bos: bool) -> Any:
    """The chat renderer for ``--sft chat`` (template checked here, before any data is read), else None."""
    if sft_template != "chat":
        if chat_template is not None:
            raise DataFileError(f"--chat-template {chat_template} applies only with --sft chat")
        return None
    if append_eod or prepend_bos:
        raise DataFileError("--sft chat: the chat template decides BOS and end-of-turn tokens; drop --append-eod "
                            "and --prepend-bos (or edit the template with --chat-template FILE)")
    from megalong.data.chat import ChatEncoder

    text = None
    if chat_template is not None:
        try:
            text = Path(chat_template).read_text(encoding="utf-8")
            if os.fspath(chat_template).endswith(".json"):  # chat_template.json / tokenizer_config.json
                text = json.loads(text)["chat_template"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise DataFileError(f"--chat-template {chat_template}: cannot be read ({type(e).__name__}: {e}); pass a "
                                "Jinja template file, or a JSON file with a 'chat_template' string") from e
    chat = ChatEncoder(tokenizer, text, os.fspath(chat_template) if chat_template is not None else None)
    chat.check_template()
    return chat


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="tok", unit_scale=True, desc="tokenizing", file=sys.stderr, dynamic_ncols=True)
