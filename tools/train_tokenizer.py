#!/usr/bin/env python
"""Train a small SentencePiece tokenizer (BPE or unigram, byte fallback, exact text) on a corpus.

    python tools/train_tokenizer.py --input data/default/train.jsonl --output data/default/tokenizer \
        --vocab-size 4000

Writes OUTPUT/tokenizer.model and an HF tokenizer directory OUTPUT/hf/ (AutoTokenizer loads it).
Inputs: JSONL (the --json-key field), .txt files, or directories of those.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from megalong.data.indexed import DataFileError
from megalong.data.preprocess import expand_inputs, read_batches, texts_of
from megalong.data.tokenizer import TokenizerError, save_hf_tokenizer, train_sentencepiece


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL/.txt files or directories")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def write_lines(inputs: list[str], json_key: str, out: Path) -> int:
    """Write the corpus as plain text lines (what the SentencePiece trainer reads); return chars."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for batch in read_batches(expand_inputs(inputs)):
            for text in texts_of(batch, json_key):
                f.write(text if text.endswith("\n") else text + "\n")
                n += len(text)
    return n


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(tmp) / "corpus.txt"
            chars = write_lines(a.input, a.json_key, text)
            model = train_sentencepiece([text], out / "tokenizer", a.vocab_size, a.model_type,
                                        input_sentence_size=a.max_sentences, num_threads=a.threads)
        hf = save_hf_tokenizer(model, out / "hf")
    except (DataFileError, TokenizerError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {a.model_type} vocab {a.vocab_size} on {chars:,} chars in {time.perf_counter() - t0:.1f} s: "
          f"{out / 'tokenizer.model'} and {hf}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
