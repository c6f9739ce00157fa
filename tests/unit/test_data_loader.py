"""Blending proportions, exact resume of the data-parallel loader, and build_dataset wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megalong.config.schema import DataConfig
from megalong.data import BlendedDataset, DataFileError, ResumableLoader, build_dataset
from megalong.data.blend import blend_indices
from megalong.data.indexed import IndexedDatasetBuilder
from megalong.data.preprocess import preprocess
from megalong.data.samples import BUILD_COUNT
from megalong.data.sft import SFTDataset


class Numbers:
    """A dataset whose item i is recognisable: input_ids = i, i+1, ..."""

    def __init__(self, n: int, width: int = 4, offset: int = 0) -> None:
        self.n, self.width, self.offset, self.key = n, width, offset, f"numbers-{n}-{offset}"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = np.arange(i, i + self.width, dtype=np.int64) + self.offset
        return {"input_ids": ids, "labels": ids + 1, "position_ids": np.arange(self.width),
                "segment_ids": np.zeros(self.width, np.int32)}


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [0.9, 0.05, 0.05], [3, 0, 1]])
def test_blend_proportions_at_every_prefix(weights):
    size = 20_000
    di, si = blend_indices(weights, size, seed=3)
    w = np.asarray(weights, float) / sum(weights)
    for d in range(len(w)):
        counts = np.cumsum(di == d)  # uses of dataset d after each prefix
        target = np.arange(1, size + 1) * w[d]
        assert np.max(np.abs(counts - target)) <= 1.0 + 1e-9
        np.testing.assert_array_equal(si[di == d], np.arange(int(counts[-1])))  # its samples in order
    di2, si2 = blend_indices(weights, size, seed=3)
    assert np.array_equal(di, di2) and np.array_equal(si, si2)  # deterministic


def test_blended_dataset_cached_and_checked(tmp_path):
    parts = [Numbers(1000, offset=0), Numbers(1000, offset=10_000)]
    before = BUILD_COUNT.get("blend", 0)
    b = BlendedDataset(parts, [0.75, 0.25], 400, seed=0, cache_dir=tmp_path)
    assert b.index.built and BUILD_COUNT["blend"] == before + 1
    again = BlendedDataset(parts, [0.75, 0.25], 400, seed=0, cache_dir=tmp_path)
    assert not again.index.built and BUILD_COUNT["blend"] == before + 1
    from_second = sum(int(b[i]["input_ids"][0]) >= 10_000 for i in range(len(b)))
    assert from_second == 100
    with pytest.raises(ValueError, match="needs .* samples from dataset 1"):
        BlendedDataset([Numbers(1000), Numbers(50)], [0.5, 0.5], 400, seed=0, cache_dir=tmp_path)


def collect(loader: ResumableLoader, steps: int) -> list[np.ndarray]:
    out = []
    for batch in loader:
        out.append(batch["input_ids"][:, 0].numpy().copy())
        if len(out) == steps:
            break
    return out


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_resume_gives_the_same_next_batches(dp_size):
    ds, micro = Numbers(200), 2
    full = {r: collect(ResumableLoader(ds, micro, r, dp_size), 10**6) for r in range(dp_size)}
    steps = len(full[0])
    assert steps == 200 // (micro * dp_size)
    window = np.concatenate([np.concatenate([full[r][s] for r in range(dp_size)]) for s in range(steps)])
    np.testing.assert_array_equal(window, np.arange(steps * micro * dp_size))  # consecutive, no gaps or repeats
    for stop in (0, 1, 4, steps - 1):
        for r in range(dp_size):
            first = ResumableLoader(ds, micro, r, dp_size)
            collect(first, stop) if stop else None
            consumed = first.state_dict()["consumed_samples"]
            assert consumed == stop * micro * dp_size
            resumed = collect(ResumableLoader(ds, micro, r, dp_size, consumed_samples=consumed), 3)
            for a, b in zip(resumed, full[r][stop: stop + 3]):
                np.testing.assert_array_equal(a, b)


def test_resume_on_a_different_dp_size_continues_at_the_next_sample():
    ds = Numbers(100)
    a = ResumableLoader(ds, 2, 0, 2)
    collect(a, 3)  # 12 samples consumed on 2 ranks
    nxt = [collect(ResumableLoader(ds, 2, r, 4, a.consumed_samples), 1)[0] for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(nxt), np.arange(12, 20))


def test_dataloader_workers_keep_order():
    ds = Numbers(64)
    plain = collect(ResumableLoader(ds, 4, 1, 2, consumed_samples=8), 10**6)
    loader = ResumableLoader(ds, 4, 1, 2, consumed_samples=8, num_workers=2)
    workers = collect(loader, 10**6)
    assert len(plain) == len(workers) == (64 - 8) // 8
    for a, b in zip(plain, workers):
        np.testing.assert_array_equal(a, b)
    assert loader.consumed_samples == 64


def _pretrain_prefix(path: Path, docs: list[list[int]], vocab: int = 1000) -> str:
    b = IndexedDatasetBuilder(path, np.uint16)
    for d in docs:
        b.add_document(d)
    b.finalize({"vocab_size": vocab, "tokenizer": {"fingerprint": "fp1"}})
    return str(path)


def test_build_dataset(tmp_path):
    rng = np.random.default_rng(0)
    p1 = _pretrain_prefix(tmp_path / "a", [rng.integers(10, 500, int(n)).tolist() for n in rng.integers(5, 60, 40)])
    p2 = _pretrain_prefix(tmp_path / "b", [rng.integers(500, 999, int(n)).tolist() for n in rng.integers(5, 60, 40)])
    cfg = DataConfig(prefixes=[p1], valid_prefixes=[p2], max_seq_len=32, reset_position_ids=True)
    ds = build_dataset(cfg, 30, eod_token_id=3, vocab_size=1000, tokenizer_fingerprint="fp1")
    assert len(ds) >= 30 and ds[0]["input_ids"].shape == (32,)
    assert np.all(ds[0]["input_ids"] < 500)
    val = build_dataset(cfg, 5, eod_token_id=3, split="valid")
    assert np.all((val[0]["input_ids"] >= 500) | (val[0]["input_ids"] == 3))
    blend = build_dataset(DataConfig(prefixes=[p1, p2], weights=[3, 1], max_seq_len=32), 400, eod_token_id=3)
    assert isinstance(blend, BlendedDataset) and len(blend) == 400
    high = sum(bool(np.any(blend[i]["input_ids"] >= 500)) for i in range(400))
    assert 90 <= high <= 110
    with pytest.raises(DataFileError, match="vocabulary has only 400 entries"):
        build_dataset(cfg, 30, eod_token_id=3, vocab_size=400)
    with pytest.raises(DataFileError, match="different tokenizer"):
        build_dataset(cfg, 30, eod_token_id=3, vocab_size=1000, tokenizer_fingerprint="fp2")
    with pytest.raises(DataFileError, match="data.prefixes is empty"):
        build_dataset(DataConfig(), 30, eod_token_id=3)


def test_build_dataset_sft(tmp_path):
    from megalong.data.corpus import stdlib_dir
    from megalong.data.tokenizer import train_sentencepiece

    tok = train_sentencepiece([stdlib_dir() / "textwrap.py"], tmp_path / "sp", 400)
    recs = [{"instruction": f"Repeat {k}.", "input": "", "output": f"{k} " * (k + 1)} for k in range(12)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    preprocess([tmp_path / "d.jsonl"], tmp_path / "sft", tok, workers=0, sft_template="plain", progress=False)
    cfg = DataConfig(prefixes=[str(tmp_path / "sft")], kind="sft", packing=False, max_seq_len=64)
    ds = build_dataset(cfg, 20, eod_token_id=2)
    assert isinstance(ds, SFTDataset) and len(ds) >= 20
    item = ds[0]
    assert np.any(item["labels"] == -100) and np.any(item["labels"] != -100)
