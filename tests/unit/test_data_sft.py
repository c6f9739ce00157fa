"""SFT: prompt masking at preprocessing, padded and packed rows, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megalong.data.corpus import stdlib_dir
from megalong.data.indexed import DataFileError, IndexedDataset
from megalong.data.preprocess import preprocess
from megalong.data.sft import TEMPLATES, SFTDataset, mask_prefix, render
from megalong.data.tokenizer import load_tokenizer, train_sentencepiece

RECORDS = [
    {"instruction": "Summarise the module below.", "input": "import os\nprint(os.sep)\n", "output": "It prints the path separator."},
    {"instruction": "Name a prime number.", "input": "", "output": "Seven."},
    {"instruction": "Write a long answer.", "output": "word " * 60},
    {"instruction": "Empty answers are skipped.", "input": "", "output": ""},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sft")
    tok = train_sentencepiece([stdlib_dir() / "json" / "decoder.py", stdlib_dir() / "textwrap.py"], d / "sp", 500)
    (d / "data.json").write_text(json.dumps(RECORDS))  # LongAlpaca ships a JSON array
    s = preprocess([d / "data.json"], d / "sft", tok, workers=0, sft_template="alpaca", prepend_bos=True,
                   progress=False)
    assert s["documents"] == 4 and s["skipped"] == 1
    return d / "sft", tok


def test_prompt_is_masked(sft_data):
    prefix, tok_path = sft_data
    tok = load_tokenizer(tok_path)
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    assert mask.dtype == np.uint8 and np.array_equal(tokens.doc_lengths, mask.doc_lengths)
    kept = [r for r in RECORDS if r["output"]]
    for i, rec in enumerate(kept):
        ids, m = tokens[i], mask[i].astype(bool)
        prompt, response = render(rec, "alpaca")
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and m[-1] and not m[0]
        assert tok.decode(ids[1:-1].tolist()) == prompt + response
        assert np.all(np.diff(m.astype(int)) >= 0)  # 0 … 0 1 … 1: prompt first, then the targets
        assert tok.decode(ids[~m][1:].tolist()) == prompt
        assert tok.decode(ids[m][:-1].tolist()).strip() == response.strip()
    assert "### Input:" in render(RECORDS[0], "alpaca")[0] and "### Input:" not in render(RECORDS[1], "alpaca")[0]
    assert render(RECORDS[1], "plain")[0] == "Name a prime number.\n\n" and set(TEMPLATES) >= {"alpaca", "plain"}
    with pytest.raises(DataFileError, match="needs a string 'output'"):
        render({"instruction": "x"}, "alpaca", "f.json:3")


def test_padded_rows(sft_data):
    prefix, tok_path = sft_data
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    lengths = sorted(tokens.doc_lengths.tolist())
    n = lengths[-2] + 3  # only the long example is longer than n + 1: it gets truncated
    assert lengths[-1] > n + 1
    ds = SFTDataset(prefix, n, num_samples=10, seed=0, pad_id=0, packing=False)
    assert ds.truncated_examples == 1 and len(ds) >= 10
    for i in range(len(ds)):
        ex = int(ds.order[i])
        ids, m = np.asarray(tokens[ex], np.int64), mask[ex].astype(bool)
        k = min(len(ids), n + 1)
        item = ds[i]
        row = np.full(n + 1, 0)
        row[:k] = ids[:k]
        np.testing.assert_array_equal(item["input_ids"], row[:n])
        want = np.where(np.append(m[1:k], np.zeros(n + 1 - k, bool)), row[1:], -100)
        np.testing.assert_array_equal(item["labels"], want)
        assert np.all(item["labels"][k - 1:] == -100)  # pads never train
        np.testing.assert_array_equal(item["segment_ids"], (np.arange(n) >= k).astype(np.int32))
        np.testing.assert_array_equal(item["position_ids"], np.arange(n))


def test_packed_rows(sft_data):
    prefix, _ = sft_data
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    n = int(tokens.doc_lengths.max() + tokens.doc_lengths.min()) + 5  # nothing truncated; some rows hold several
    ds = SFTDataset(prefix, n, num_samples=6, seed=1, pad_id=0, packing=True, reset_position_ids=True)
    assert ds.truncated_examples == 0
    multi = 0
    for i in range(len(ds)):
        exs = ds.order[int(ds.row_bounds[i]): int(ds.row_bounds[i + 1])]
        multi += len(exs) > 1
        ids = np.concatenate([np.asarray(tokens[int(e)], np.int64) for e in exs])
        tgt = np.concatenate([mask[int(e)].astype(bool) for e in exs])
        seg = np.concatenate([np.full(len(tokens[int(e)]), s) for s, e in enumerate(exs)])
        first = np.concatenate([[True], seg[1:] != seg[:-1]])
        k = len(ids)
        assert k <= n + 1
        item = ds[i]
        np.testing.assert_array_equal(item["input_ids"][:min(k, n)], ids[:n])
        want = np.full(n, -100)
        ok = tgt[1:] & ~first[1:]  # a target token of the same example
        want[:k - 1] = np.where(ok, ids[1:], -100)
        np.testing.assert_array_equal(item["labels"], want)
        np.testing.assert_array_equal(item["segment_ids"][:min(k, n)], seg[:n])
        pos = np.arange(k) - np.maximum.accumulate(np.where(first, np.arange(k), 0))
        np.testing.assert_array_equal(item["position_ids"][:min(k, n)], pos[:n])
        if k < n:
            assert np.all(item["segment_ids"][k:] == len(exs)) and np.all(item["input_ids"][k:] == 0)
    assert multi >= 1  # packing actually put several examples in one row


def test_mask_must_match(sft_data, tmp_path):
    prefix, _ = sft_data
    import shutil

    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{prefix}{ext}", tmp_path / f"x{ext}")
    with pytest.raises(DataFileError, match="no such file"):
        SFTDataset(tmp_path / "x", 16, 4, 0, 0)
