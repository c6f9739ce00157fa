#!/usr/bin/env python
"""Tokenize raw text into Megatron-compatible PREFIX.bin/.idx (+ PREFIX.json metadata).

    python tools/preprocess_data.py --input data/ corpus.jsonl.gz --output-prefix out/corpus \
        --tokenizer path/to/tokenizer.model --workers 2 --append-eod

Inputs: JSONL (optionally .gz), JSON arrays, .txt (one document per file), parquet, and
directories of those (recursively). ``--sft alpaca`` tokenizes LongAlpaca-style
instruction/input/output records and also writes PREFIX_mask.bin/.idx (loss mask).
``--sft chat`` tokenizes conversations (OpenAI ``messages`` role/content, or ShareGPT
``conversations`` from/value) with the tokenizer's chat template (or ``--chat-template FILE``);
the mask marks every assistant turn's text and end-of-turn token.

Many machines: ``--shard I/N`` (I = 0..N-1) tokenizes only block I of the ordered input files
(contiguous blocks of about equal bytes), each machine with its own --output-prefix; then
``tools/merge_datasets.py`` joins the N outputs into exactly the files one run would write.
Files are never split: one huge file goes to one shard, and a shard that gets no file writes an
empty dataset (merge accepts it). Split big files before tokenizing for better balance.
"""

from __future__ import annotations

import argparse
import sys

from megalong.data.indexed import DataFileError
from megalong.data.preprocess import parse_shard, preprocess
from megalong.data.sft import SFT_FORMATS
from megalong.data.tokenizer import TokenizerError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or directories")
    p.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or SentencePiece .model")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (0: in this process)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOS token")
    p.add_argument("--prepend-bos", action="store_true", help="start every document with the BOS token")
    p.add_argument("--json-key", default="text", help="JSON field / parquet column with the text")
    p.add_argument("--batch-size", type=int, default=128, help="documents per batch sent to a worker")
    p.add_argument("--sft", choices=sorted(SFT_FORMATS), default=None,
                   help="instruction data (instruction/input/output) with this prompt template, or chat: "
                        "conversations with the tokenizer's chat template (loss on assistant turns); writes a loss mask")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="--sft chat: a Jinja chat template to use instead of the tokenizer's own")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="tokenize only block I of N (0 <= I < N) of the ordered input files; merge the N outputs "
                        "with tools/merge_datasets.py. Whole files only: a single big file is not split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        shard = parse_shard(a.shard) if a.shard is not None else None
        s = preprocess(a.input, a.output_prefix, a.tokenizer, workers=a.workers, append_eod=a.append_eod,
                       prepend_bos=a.prepend_bos, json_key=a.json_key, batch_size=a.batch_size,
                       sft_template=a.sft, progress=not a.no_progress, shard=shard, chat_template=a.chat_template)
    except (DataFileError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if shard is not None:
        m = s["meta"]["shard"]
        files = f"files {m['file_range'][0]}..{m['file_range'][1] - 1}" if s["files"] else "no files"
        print(f"shard {shard[0]}/{shard[1]}: {files} of {m['files_total']}"
              + ("" if s["files"] else " (more shards than files, or big files; an empty dataset is written "
                 "and merges as nothing)"))
    if s["open_turns"]:
        print(f"warning: {s['open_turns']} assistant turns end without an end-of-turn token (ids "
              f"{s['meta']['chat']['end_token_ids']}: the tokenizer's EOS and generation_config.json's eos_token_id); "
              "their whole turn carries loss and the model may not learn to stop", file=sys.stderr)
    skipped = "empty or without an assistant reply" if a.sft == "chat" else "empty"
    print(f"wrote {s['prefix']}.bin/.idx/.json: {s['documents']} documents ({s['skipped']} {skipped} skipped), "
          f"{s['tokens']} tokens ({s['meta']['dtype']}) in {s['seconds']:.2f} s = {s['tokens_per_s']:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
