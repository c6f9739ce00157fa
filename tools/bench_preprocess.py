#!/usr/bin/env python
"""Preprocessing throughput: megalong's batched pipeline vs a Megatron-LM-style baseline, same run.

    flock /tmp/megalong_bench.lock python tools/bench_preprocess.py --mb 6 --workers 1 2

Corpus: the first MB of Python standard-library sources (real text, whole files = long documents,
and the same text cut into ~2 KB pieces = short documents). Tokenizers: mistral-common's 32k
SentencePiece model (``tokenizer.model.v1``) and the HF fast tokenizer converted from it.

Baseline (what Megatron-LM's tools/preprocess_data.py does): a multiprocessing Pool (fork) whose
workers each parse ONE JSON line and tokenize it (SentencePiece ``encode_as_ids``; for an HF
directory ``AutoTokenizer(text).input_ids``, as Megatron's HuggingFaceTokenizer does), ``imap``
with chunksize 32, a Python list of ids back per document, ``np.array`` + write per document.
Both sides append EOD (and the HF side prepends BOS, as AutoTokenizer does), and the script
checks that both write byte-identical .bin files.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from megalong.data.corpus import iter_documents
from megalong.data.indexed import IndexedDatasetBuilder, dtype_for_vocab
from megalong.data.preprocess import preprocess
from megalong.data.tokenizer import load_tokenizer, save_hf_tokenizer

_ENC: dict = {}


def _baseline_init(kind: str, spec: str) -> None:
    if kind == "sp":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=spec)
        _ENC["tokenize"], _ENC["eod"] = sp.encode_as_ids, sp.eos_id()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
        _ENC["tokenize"], _ENC["eod"] = (lambda t: tok(t).input_ids), tok.eos_token_id


def _baseline_encode(line: str) -> tuple[list[int], list[int], int]:
    text = json.loads(line)["text"]
    ids = _ENC["tokenize"](text)
    if ids:
        ids.append(_ENC["eod"])
    return ids, [len(ids)] if ids else [], len(line)


def run_baseline(corpus: Path, kind: str, spec: str, vocab: int, workers: int, prefix: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix, dtype_for_vocab(vocab))
    with open(corpus, encoding="utf-8") as f, mp.get_context("fork").Pool(
            workers, initializer=_baseline_init, initargs=(kind, spec)) as pool:
        for ids, lens, _ in pool.imap(_baseline_encode, f, 32):
            if lens:
                builder.add_document(np.array(ids, dtype=builder.dtype), lens)
    builder.finalize()
    return builder.num_tokens, time.perf_counter() - t0


def run_megalong(corpus: Path, spec: str, workers: int, prefix: Path, bos: bool) -> tuple[int, float]:
    t0 = time.perf_counter()
    s = preprocess([corpus], prefix, spec, workers=workers, append_eod=True, prepend_bos=bos, progress=False)
    return s["tokens"], time.perf_counter() - t0


def write_corpora(out: Path, mb: float) -> dict[str, Path]:
    long_p, short_p = out / "long.jsonl", out / "short.jsonl"
    with open(long_p, "w", encoding="utf-8") as fl, open(short_p, "w", encoding="utf-8") as fs:
        for _, text in iter_documents(max_mb=mb):
            fl.write(json.dumps({"text": text}) + "\n")
            buf = ""
            for para in text.split("\n\n"):
                buf += para + "\n\n"
                if len(buf) >= 2000:
                    fs.write(json.dumps({"text": buf}) + "\n")
                    buf = ""
            if buf.strip():
                fs.write(json.dumps({"text": buf}) + "\n")
    return {"long": long_p, "short": short_p}


def best_of(fn, repeats: int) -> tuple[int, float]:
    runs = [fn() for _ in range(repeats)]
    return runs[0][0], min(r[1] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=6.0, help="MB of stdlib text")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest is reported")
    p.add_argument("--tokenizers", nargs="+", choices=("sp", "hf"), default=["sp", "hf"])
    p.add_argument("--corpora", nargs="+", choices=("long", "short"), default=["long", "short"])
    a = p.parse_args(argv)
    import mistral_common

    sp_model = str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        corpora = write_corpora(out, a.mb)
        specs = {"sp": sp_model, "hf": str(save_hf_tokenizer(sp_model, out / "hf"))}
        vocab = load_tokenizer(sp_model).vocab_size
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}; corpus {a.mb} MB of stdlib sources")
        print("| documents | tokenizer | workers | tokens | Megatron-style tok/s | megalong tok/s | speed-up | same .bin |")
        print("|---|---|---|---|---|---|---|---|")
        for cname in a.corpora:
            corpus = corpora[cname]
            ndocs = sum(1 for _ in open(corpus, encoding="utf-8"))
            for kind in a.tokenizers:
                for w in a.workers:
                    pb, pm = out / f"b_{cname}_{kind}_{w}", out / f"m_{cname}_{kind}_{w}"
                    nb, tb = best_of(partial(run_baseline, corpus, kind, specs[kind], vocab, w, pb), a.repeats)
                    nm, tm = best_of(partial(run_megalong, corpus, specs[kind], w, pm, kind == "hf"), a.repeats)
                    same = filecmp.cmp(f"{pb}.bin", f"{pm}.bin", shallow=False)
                    name = "SentencePiece .model" if kind == "sp" else "HF fast (tokenizer.json)"
                    print(f"| {cname} ({ndocs}) | {name} | {w} | {nm:,} | {nb / tb:,.0f} | {nm / tm:,.0f} | "
                          f"{(nm / tm) / (nb / tb):.2f}x | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
