#!/usr/bin/env python
"""Build the embedded default dataset from Python's standard-library sources (no download).

    python tools/build_default_corpus.py --out data/default            # corpus only (JSONL)
    python tools/build_default_corpus.py --out data/default --all      # + tokenizer + preprocessed data

Writes OUT/train.jsonl and OUT/valid.jsonl (every 50th file); with --all also trains a small
SentencePiece tokenizer (OUT/tokenizer/tokenizer.model, OUT/tokenizer/hf/) and preprocesses both
splits into OUT/train and OUT/valid (.bin/.idx/.json, EOD appended). ``--tokenizer DIR`` uses a real
model's tokenizer instead of training one (``python tools/build_default_corpus.py --out D --all
--tokenizer models/smollm2``: the data a study of that model trains and evaluates on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megalong.data.corpus import build_corpus
from megalong.data.indexed import DataFileError
from megalong.data.preprocess import preprocess
from megalong.data.tokenizer import TokenizerError, save_hf_tokenizer, train_sentencepiece


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=float, default=8.0, help="cap on text size in MB (0: whole stdlib)")
    p.add_argument("--valid-every", type=int, default=50, help="every N-th file goes to the validation split")
    p.add_argument("--all", action="store_true", help="also train the tokenizer and preprocess both splits")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default=None,
                   help="with --all: tokenize with this tokenizer (an HF model directory or .model) instead of "
                        "training one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    s = build_corpus(out, a.max_mb or None, a.valid_every)
    print(f"corpus from {s['source']}: train {s['documents']['train']} files ({s['chars']['train']:,} chars), "
          f"valid {s['documents']['valid']} files -> {out}/{{train,valid}}.jsonl")
    if not a.all:
        return 0
    try:
        if a.tokenizer:
            model = save_hf_tokenizer(a.tokenizer, out / "tokenizer" / "hf")
        else:
            model = train_sentencepiece([s["train"]], out / "tokenizer" / "tokenizer", a.vocab_size,
                                        input_sentence_size=2_000_000)
            save_hf_tokenizer(model, out / "tokenizer" / "hf")
        for split in ("train", "valid"):
            r = preprocess([s[split]], out / split, model, workers=a.workers, append_eod=True, progress=False)
            print(f"{split}: {r['documents']} documents, {r['tokens']:,} tokens -> {r['prefix']}.bin/.idx")
    except (DataFileError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {model} (HF: {out / 'tokenizer' / 'hf'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
