#!/usr/bin/env python
"""Perplexity of an HF model on a megalong/Megatron dataset at a context length (full attention).

    python tools/eval_ppl.py --model out/x-hf --data runs/q/data/valid --seq-len 1024 --protocol longlora
    deepspeed --num_gpus 4 tools/eval_ppl.py --model out/x-hf --data D --seq-len 65536 --sp 4 \
        --protocol longlora standard          # each window split over 4 ranks (sequence parallelism)

Prints one JSON line per protocol: ppl, loss, tokens, windows, documents, protocol, seq_len, model,
data, seconds, every rank's peak memory (peak_mem_gb), and how much of the text had long context
(long_context_fraction: scored tokens with >= seq_len/2 tokens of context in their window;
short_documents: documents with fewer than seq_len + 1 tokens). On stderr, the same in words. ``--require-full-context`` scores only documents that fill a window.
With ``--sp K`` (K processes from the launcher, one sequence-parallel group) every window is split
into K contiguous slices, one per rank; the scores equal one process's (megalong.eval.sp). Only
rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megalong.config.schema import TrainConfig
from megalong.eval.sp import add_sp_arguments


def context_summary(res) -> str:
    """How much of the scored text had long context, in words (stderr)."""
    line = (f"ppl@{res.seq_len} ({res.protocol}) = {res.ppl:.4g} over {res.tokens} tokens of {res.documents} "
            f"documents; {res.long_context_fraction:.1%} of them had >= {(res.seq_len + 1) // 2} tokens of context")
    if res.short_documents:
        line += (f"; {res.short_documents} of {res.documents} documents are shorter than {res.seq_len + 1} tokens "
                 "(never a full window; --require-full-context leaves them out)")
    if res.skipped_documents:
        line += f"; {res.skipped_documents} documents too short, not scored"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--data", required=True, help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--protocol", choices=["longlora", "standard"], nargs="+", default=["longlora"],
                   help="one or both (one JSON line each, the model loaded once)")
    p.add_argument("--stride", type=int, default=256, help="longlora: window start every STRIDE tokens")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first K documents")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--max-windows-per-doc", type=int, default=None,
                   help="only each document's first K windows (spreads --max-windows over more documents)")
    p.add_argument("--min-doc-len", type=int, default=0,
                   help="score only documents of at least this many tokens (default: all)")
    p.add_argument("--require-full-context", action="store_true",
                   help="score only documents of at least SEQ_LEN + 1 tokens (--min-doc-len SEQ_LEN+1)")
    p.add_argument("--loss-chunk-size", type=int, default=TrainConfig.loss_chunk_size,
                   help="tokens per lm_head chunk, as train.loss_chunk_size (0: full logits, N x V memory)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--attention", choices=["full", "s2"], default="full")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines on stderr")
    add_sp_arguments(p)
    args = p.parse_args(argv)
    min_doc_len = max(args.min_doc_len, args.seq_len + 1) if args.require_full_context else args.min_doc_len

    from megalong.config import ConfigError
    from megalong.data.indexed import DataFileError, IndexedDataset
    from megalong.eval import evaluate_perplexity, load_eval_model
    from megalong.eval.loading import check_data_fits_model
    from megalong.eval.sp import finish_eval_parallel, start_eval_parallel
    from megalong.utils.logging import setup_logging
    from megalong.utils.metrics import gather_peak_memory_gb

    rank = int(os.environ.get("RANK", 0))
    setup_logging("INFO", rank=rank)
    results = []
    try:
        parallel, rank, device = start_eval_parallel(args.sp, args.sp_mode, env=os.environ, device=args.device,
                                                     timeout_s=args.timeout_s, tool="tools/eval_ppl.py")
        model, device = load_eval_model(args.model, dtype=args.dtype, device=str(device),
                                        attention=args.attention, group_size=args.group_size)
        if parallel is not None and args.attention == "full":
            from megalong.attention import use_full_attention

            use_full_attention(model)  # the registered attention that reads sp_context
        check_data_fits_model(args.data, model.config.vocab_size)
        ds = IndexedDataset(args.data)
        n = len(ds) if args.max_docs is None else min(len(ds), args.max_docs)
        scored = {} if len(args.protocol) > 1 else None  # windows both protocols share are run once
        for protocol in args.protocol:
            t0 = time.perf_counter()
            res = evaluate_perplexity(
                model, (ds[i] for i in range(n)), args.seq_len, protocol, stride=args.stride,
                batch_size=args.batch_size, max_windows=args.max_windows,
                max_windows_per_doc=args.max_windows_per_doc, min_doc_len=min_doc_len,
                loss_chunk_size=args.loss_chunk_size, device=device, progress=not args.no_progress and rank == 0,
                parallel=parallel, scored=scored)
            results.append((res, time.perf_counter() - t0, gather_peak_memory_gb()))
    except (ConfigError, DataFileError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        finish_eval_parallel(barrier=False)
        return 2
    finish_eval_parallel()
    if rank == 0:
        for res, seconds, peak in results:
            print(context_summary(res), file=sys.stderr)
            print(json.dumps({**res.to_dict(), "model": args.model, "data": args.data, "attention": args.attention,
                              "sp": args.sp, "sp_mode": args.sp_mode, "seconds": round(seconds, 3),
                              "peak_mem_gb": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
