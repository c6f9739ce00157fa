#!/usr/bin/env python
"""Show what a preprocessed dataset holds: counts, a document-length histogram, decoded tokens.

    python tools/inspect_data.py data/default/train --doc 3 --tokens 200 [--tokenizer T]

The tokenizer defaults to the one recorded in PREFIX.json (when it still exists there). For SFT
data (a PREFIX_mask beside it) it also prints the document's training targets, run by run: the
tokens that carry loss (alpaca: the response and EOS; chat: each assistant reply and its end of turn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from megalong.data.indexed import DataFileError, IndexedDataset
from megalong.data.tokenizer import TokenizerError, load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--doc", type=int, default=0, help="document to decode")
    p.add_argument("--tokens", type=int, default=64, help="how many of its first tokens to decode")
    p.add_argument("--tokenizer", default=None, help="HF directory or .model (default: from PREFIX.json)")
    return p.parse_args(argv)


def histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Power-of-two buckets of document lengths as text bars."""
    if not len(lengths):
        return ["(no documents)"]
    edges = 2 ** np.arange(0, int(np.ceil(np.log2(max(2, int(lengths.max()) + 1)))) + 1)
    counts, _ = np.histogram(lengths, bins=np.concatenate([[0], edges]))
    top = max(1, counts.max())
    lo = np.concatenate([[0], edges[:-1]])
    return [f"{int(a):>9}-{int(b) - 1:<9} {c:>8} {'#' * int(round(width * c / top))}"
            for a, b, c in zip(lo, edges, counts) if c]


def print_targets(prefix: str, doc: int, ids: np.ndarray, tok, most: int = 20) -> None:
    """SFT data: the decoded runs of loss-carrying tokens (mask 1) of one whole document."""
    from megalong.data.sft import mask_prefix

    if not Path(f"{mask_prefix(prefix)}.idx").is_file():
        return
    m = IndexedDataset(mask_prefix(prefix))[doc].astype(np.int64)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
    runs = list(zip(edges[::2], edges[1::2]))
    print(f"loss on {int(m.sum())} of {len(m)} tokens, {len(runs)} runs:")
    for a, b in runs[:most]:
        print(f"  [{a}:{b}] {tok.decode(ids[a:b].tolist())!r}")
    if len(runs) > most:
        print(f"  … {len(runs) - most} more")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        ds = IndexedDataset(a.prefix)
    except DataFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lens = ds.doc_lengths
    meta = ds.meta or {}
    print(f"{a.prefix}: {len(ds)} documents, {len(ds.sequence_lengths)} sequences, {ds.num_tokens:,} tokens, "
          f"dtype {ds.dtype.name}")
    if len(lens):
        print(f"document length: min {lens.min()}, median {int(np.median(lens))}, mean {lens.mean():.1f}, "
              f"max {lens.max()}")
    if meta:
        tok = meta.get("tokenizer") or {}
        print(f"tokenizer: {tok.get('path')} (vocab {meta.get('vocab_size')}, eos {meta.get('eos_id')}), "
              f"max token id {meta.get('max_token_id')}, append_eod {meta.get('append_eod')}, "
              f"kind {meta.get('kind')}, created {meta.get('created')}")
    else:
        print("no PREFIX.json sidecar (a file written by Megatron-LM?)")
    print("document lengths (tokens):")
    print("\n".join(histogram(lens)))
    if not len(ds):
        return 0
    if not 0 <= a.doc < len(ds):
        print(f"error: --doc {a.doc} out of range (0..{len(ds) - 1})", file=sys.stderr)
        return 2
    ids = np.asarray(ds[a.doc][: a.tokens])
    print(f"document {a.doc}: {int(lens[a.doc])} tokens; first {len(ids)} ids: {ids.tolist()}")
    spec = a.tokenizer or (meta.get("tokenizer") or {}).get("path")
    if spec and Path(spec).exists():
        try:
            tok = load_tokenizer(spec)
            print("decoded:\n" + tok.decode(ids.tolist()))
            print_targets(a.prefix, a.doc, np.asarray(ds[a.doc]), tok)
        except TokenizerError as e:
            print(f"(cannot decode: {e})")
    else:
        print("(pass --tokenizer to decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
