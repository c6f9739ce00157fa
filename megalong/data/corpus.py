"""The embedded default corpus: Python's standard-library sources, gathered at run time.

Nothing is downloaded or copied into the repository: every machine that runs megalong has a
Python standard library, and its ``.py`` files are long, real documents (a few thousand to tens
of thousands of tokens each), which is what context-extension runs need. The corpus is
deterministic for a given Python installation: files in sorted order, whole files as documents,
every ``valid_every``-th file to the validation split, an optional size cap.

    build_corpus(out_dir) ─► out_dir/train.jsonl, out_dir/valid.jsonl   {"text": ..., "path": "json/decoder.py"}
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_dir() -> Path:
    """The standard-library source directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """All ``.py`` files under the standard library (no site-packages), in sorted relative-path order."""
    base = Path(root) if root is not None else stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def iter_documents(max_mb: float | None = None, root: str | os.PathLike | None = None, min_chars: int = 200):
    """Yield (relative path, text) for stdlib files of at least ``min_chars``, up to ``max_mb`` of text."""
    base = Path(root) if root is not None else stdlib_dir()
    budget = None if max_mb is None else int(max_mb * 1_000_000)
    used = 0
    for f in stdlib_files(base):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < min_chars:
            continue
        if budget is not None and used + len(text) > budget and used > 0:
            break
        used += len(text)
        yield f.relative_to(base).as_posix(), text


def build_corpus(out_dir: str | os.PathLike, max_mb: float | None = 8.0, valid_every: int = 50,
                 root: str | os.PathLike | None = None) -> dict:
    """Write ``train.jsonl`` and ``valid.jsonl`` under ``out_dir`` (atomically) and return a summary.

    Args:
        out_dir: output directory.
        max_mb: cap on characters of text (millions); None for the whole standard library.
        valid_every: every this many-th file goes to the validation split.
        root: source directory (default: this Python's standard library).
    """
    if valid_every < 2:
        raise ValueError(f"valid_every={valid_every} must be >= 2 (1 would leave no training data)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl"}
    tmp = {k: p.with_name(p.name + f".tmp-{os.getpid()}") for k, p in paths.items()}
    counts = {"train": 0, "valid": 0}
    chars = {"train": 0, "valid": 0}
    handles = {k: open(p, "w", encoding="utf-8") for k, p in tmp.items()}
    try:
        for k, (rel, text) in enumerate(iter_documents(max_mb, root)):
            split = "valid" if k % valid_every == valid_every - 1 else "train"
            handles[split].write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
            counts[split] += 1
            chars[split] += len(text)
    except BaseException:
        for k, h in handles.items():
            h.close()
            tmp[k].unlink(missing_ok=True)
        raise
    for k, h in handles.items():
        h.close()
        os.replace(tmp[k], paths[k])
    if counts["train"] == 0:
        raise ValueError(f"no standard-library sources found under {root or stdlib_dir()}")
    return {"train": str(paths["train"]), "valid": str(paths["valid"]), "documents": counts, "chars": chars,
            "source": str(Path(root) if root is not None else stdlib_dir())}
