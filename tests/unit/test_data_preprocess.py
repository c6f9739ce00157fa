"""Preprocessing: inputs of every kind, errors that leave nothing behind, real tokenizers, the CLI."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalong.data.corpus import build_corpus, stdlib_dir, stdlib_files
from megalong.data.indexed import DataFileError, IndexedDataset, read_data_meta
from megalong.data.preprocess import preprocess
from megalong.data.tokenizer import load_tokenizer, save_hf_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
STDLIB_SAMPLES = ["json/decoder.py", "json/encoder.py", "email/quoprimime.py", "textwrap.py", "colorsys.py"]


def mistral_model() -> Path | None:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return p if p.is_file() else None


def stdlib_texts() -> list[str]:
    return [(stdlib_dir() / rel).read_text(encoding="utf-8") for rel in STDLIB_SAMPLES]


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    return train_sentencepiece([stdlib_dir() / rel for rel in STDLIB_SAMPLES], d / "sp", vocab_size=600)


def no_outputs(prefix: Path) -> bool:
    return not list(prefix.parent.glob(prefix.name + "*"))


def test_all_input_kinds(tmp_path, small_tok):
    texts = stdlib_texts()
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    with open(src / "a.jsonl", "w") as f:
        f.write(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"text": ""}) + "\n")  # one empty: skipped
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": texts[1]}) + "\n")
    (src / "sub" / "c.txt").write_text(texts[2])
    (src / "d.json").write_text(json.dumps([{"text": texts[3]}]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [texts[4], "   \n"]}), src / "sub" / "e.parquet")
    s = preprocess([src], tmp_path / "out", small_tok, workers=0, append_eod=True, progress=False)
    assert s["documents"] == 5 and s["skipped"] == 2
    ds, tok = IndexedDataset(tmp_path / "out"), load_tokenizer(small_tok)
    # sorted file order: a.jsonl, b.jsonl.gz, d.json, sub/c.txt, sub/e.parquet
    expected = [texts[0], texts[1], texts[3], texts[2], texts[4]]
    for i, text in enumerate(expected):
        assert int(ds[i][-1]) == tok.eos_id
        assert tok.decode(ds[i][:-1].tolist()) == text
    meta = read_data_meta(tmp_path / "out")
    assert meta["vocab_size"] == 600 and meta["dtype"] == "uint16" and meta["append_eod"] is True
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["max_token_id"] < 600
    assert len(meta["input_files"]) == 5 and meta["skipped_documents"] == 2


def test_workers_give_identical_output(tmp_path, small_tok):
    lines = [json.dumps({"text": t[: 500 + 37 * k]}) for k, t in enumerate(stdlib_texts() * 20)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    preprocess([tmp_path / "x.jsonl"], tmp_path / "w0", small_tok, workers=0, batch_size=7, progress=False)
    preprocess([tmp_path / "x.jsonl"], tmp_path / "w2", small_tok, workers=2, batch_size=7, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w0{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


@pytest.mark.parametrize("content, pattern", [
    ('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', r"x\.jsonl:3: invalid JSON"),
    ('{"text": "fine"}\n{"body": "no text key"}\n', r"x\.jsonl:2: no key 'text' \(keys: body\)"),
    ('{"text": ["a", "list"]}\n', "not a string"),
    ('["not", "an", "object"]\n', "not an object"),
])
def test_bad_input_leaves_nothing(tmp_path, small_tok, content, pattern):
    (tmp_path / "x.jsonl").write_text(content)
    for workers in (0, 1):
        with pytest.raises(DataFileError, match=pattern):
            preprocess([tmp_path / "x.jsonl"], tmp_path / "o" / "out", small_tok, workers=workers, progress=False)
        assert no_outputs(tmp_path / "o" / "out")


def test_missing_and_unsupported_inputs(tmp_path, small_tok):
    with pytest.raises(DataFileError, match="no such file"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "out", small_tok, progress=False)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataFileError, match="unsupported input type"):
        preprocess([tmp_path / "a.csv"], tmp_path / "out", small_tok, progress=False)
    assert no_outputs(tmp_path / "out")


def test_default_corpus_is_deterministic(tmp_path):
    a = build_corpus(tmp_path / "a", max_mb=0.3, valid_every=3)
    b = build_corpus(tmp_path / "b", max_mb=0.3, valid_every=3)
    assert Path(a["train"]).read_bytes() == Path(b["train"]).read_bytes()
    train = [json.loads(x) for x in Path(a["train"]).read_text().splitlines()]
    valid = [json.loads(x) for x in Path(a["valid"]).read_text().splitlines()]
    assert a["documents"] == {"train": len(train), "valid": len(valid)} and len(valid) >= 1
    assert len(train) == 2 * len(valid) or len(train) == 2 * len(valid) + 1 or len(train) == 2 * len(valid) + 2
    files = stdlib_files()
    assert not any("site-packages" in str(f) for f in files)
    first = train[0]["path"]
    assert (stdlib_dir() / first).read_text(encoding="utf-8") == train[0]["text"]  # whole files, unchanged
    assert sum(a["chars"].values()) <= 300_000


def test_hf_directory_from_sentencepiece(tmp_path, small_tok):
    out = save_hf_tokenizer(small_tok, tmp_path / "hf")
    sp, hf = load_tokenizer(small_tok), load_tokenizer(out)
    assert hf.fingerprint == sp.fingerprint and hf.eos_id == sp.eos_id and hf.vocab_size == sp.vocab_size
    texts = stdlib_texts()
    assert hf.encode_batch(texts) == sp.encode_batch(texts)
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(out)
    assert at.eos_token_id == sp.eos_id and at(texts[0], add_special_tokens=False).input_ids == sp.encode(texts[0])


@pytest.mark.skipif(mistral_model() is None, reason="mistral-common (its tokenizer.model.v1) is not installed")
def test_real_tokenizer_cli_round_trip(tmp_path):
    """The CLI with mistral-common's 32k Llama-style SentencePiece model: decode(encode(x)) == x."""
    model = mistral_model()
    texts = stdlib_texts()
    with open(tmp_path / "real.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "real.jsonl"),
                        "--output-prefix", str(tmp_path / "real"), "--tokenizer", str(model), "--workers", "2",
                        "--append-eod", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 documents" in r.stdout and "tokens/s" in r.stdout
    ds, tok = IndexedDataset(tmp_path / "real"), load_tokenizer(model)
    assert tok.vocab_size == 32000 and ds.dtype == np.uint16
    for i, t in enumerate(texts):
        assert ds[i][-1] == tok.eos_id == 2
        assert tok.decode(ds[i][:-1].tolist()) == t
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_data.py"), str(tmp_path / "real"), "--doc", "1",
                        "--tokens", "12"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 documents" in r.stdout and texts[1][:20] in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "none.jsonl"),
                        "--output-prefix", str(tmp_path / "x"), "--tokenizer", str(model)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr
