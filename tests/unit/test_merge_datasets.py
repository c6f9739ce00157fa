"""Sharded preprocessing + merge on real text: the merge of shards 0..N-1 is the single run, byte for byte."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalong.data.corpus import iter_documents
from megalong.data.indexed import DataFileError, IndexedDataset, bin_path, idx_path, meta_path, read_data_meta
from megalong.data.merge import list_prefixes, merge_datasets
from megalong.data.preprocess import parse_shard, preprocess, shard_range
from megalong.data.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
NOT_LIKE_SINGLE = {"created", "merged_from"}  # the only sidecar fields a merge cannot reproduce


def _write_inputs(src: Path, docs: list[str]) -> None:
    """Six files of every text kind and very different sizes (sorted order: a, b, c, d, e, sub/f)."""
    (src / "sub").mkdir(parents=True)
    jl = lambda texts: "".join(json.dumps({"text": t}) + "\n" for t in texts)  # noqa: E731
    (src / "a.jsonl").write_text(jl(docs[:14]) + "\n")  # a trailing blank line: a skipped document
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write(jl(docs[14:18]))
    (src / "c.txt").write_text(docs[18])
    (src / "d.txt").write_text(docs[19])
    (src / "e.jsonl").write_text(jl(docs[20:-1]))
    (src / "sub" / "f.jsonl").write_text(jl(docs[-1:]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    docs = [text[:6000] for _, text in itertools.islice(iter_documents(), 32)]  # ~190 kB of real source
    _write_inputs(root / "in", docs)
    (root / "sft").mkdir()
    with open(root / "sft" / "x.jsonl", "w") as f, open(root / "sft" / "y.jsonl", "w") as g:
        for k, t in enumerate(docs[:12]):
            rec = {"instruction": f"Explain this code ({k}).", "input": t[:300] if k % 2 else "", "output": t[300:900]}
            (f if k < 7 else g).write(json.dumps(rec) + "\n")
    tok = train_sentencepiece([root / "in" / "e.jsonl"], root / "tok" / "sp", vocab_size=500,
                              input_sentence_size=5000, num_threads=1)
    preprocess([root / "in"], root / "single", tok, workers=0, append_eod=True, progress=False)
    preprocess([root / "sft"], root / "sft_single", tok, workers=0, sft_template="alpaca", progress=False)
    return {"root": root, "tok": tok, "docs": docs}


def _shards(corpus: dict, out: Path, n: int, workers: int = 0, src: str = "in", **kw) -> list[Path]:
    prefixes = []
    kw.setdefault("append_eod", src == "in")  # as the single runs
    for i in range(n):
        p = out / f"part_{i:05d}"
        preprocess([corpus["root"] / src], p, corpus["tok"], workers=workers, progress=False, shard=(i, n), **kw)
        prefixes.append(p)
    return prefixes


def _same_files(a: Path, b: Path) -> None:
    for ext in (".bin", ".idx"):
        assert Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes(), ext


def _same_meta(merged: Path, single: Path) -> None:
    m, s = read_data_meta(merged), read_data_meta(single)
    assert {k: v for k, v in m.items() if k not in NOT_LIKE_SINGLE} == {k: v for k, v in s.items() if k != "created"}


@pytest.mark.parametrize("n", [3, 8])  # 8 shards over 6 files: some shards are empty datasets
def test_merged_shards_equal_single_run(tmp_path, corpus, n):
    root = corpus["root"]
    parts = _shards(corpus, tmp_path, n)
    metas = [read_data_meta(p)["shard"] for p in parts]
    assert [m["file_range"][0] for m in metas[1:]] == [m["file_range"][1] for m in metas[:-1]]
    assert metas[-1]["file_range"][1] == metas[0]["files_total"] == 6
    assert (n == 8) == any(len(IndexedDataset(p)) == 0 for p in parts)
    s = merge_datasets(list(reversed(parts)), tmp_path / "merged", progress=False)  # shard records fix the order
    _same_files(tmp_path / "merged", root / "single")
    _same_meta(tmp_path / "merged", root / "single")
    assert [Path(x).name for x in s["inputs"]] == [p.name for p in parts]
    single, merged = IndexedDataset(root / "single"), IndexedDataset(tmp_path / "merged")
    assert len(single) == len(merged) == s["documents"] == len(corpus["docs"])
    for i in range(len(single)):
        np.testing.assert_array_equal(single[i], merged[i])


def test_directory_input_and_workers(tmp_path, corpus):
    """Shards tokenized with worker processes; merged from a directory (the output lives there too)."""
    _shards(corpus, tmp_path / "shards", 2, workers=1)
    (tmp_path / "shards" / "notes.txt").write_text("not a dataset")
    merge_datasets(list_prefixes(tmp_path / "shards", "part_*"), tmp_path / "shards" / "all", progress=False)
    _same_files(tmp_path / "shards" / "all", corpus["root"] / "single")
    assert [Path(p).name for p in list_prefixes(tmp_path / "shards")] == ["all", "part_00000", "part_00001"]
    names = [Path(p).name for p in list_prefixes(tmp_path / "shards", exclude=tmp_path / "shards" / "all")]
    assert names == ["part_00000", "part_00001"]  # merging again into the same directory


def test_sft_merges_masks(tmp_path, corpus):
    root = corpus["root"]
    parts = _shards(corpus, tmp_path, 2, src="sft", sft_template="alpaca")
    assert all(len(IndexedDataset(p)) for p in parts)
    assert [Path(p).name for p in list_prefixes(tmp_path)] == ["part_00000", "part_00001"]  # masks go along
    s = merge_datasets(parts, tmp_path / "merged", progress=False)
    assert s["sft"]
    _same_files(tmp_path / "merged", root / "sft_single")
    _same_files(tmp_path / "merged_mask", root / "sft_single_mask")
    _same_meta(tmp_path / "merged", root / "sft_single")
    _same_meta(tmp_path / "merged_mask", root / "sft_single_mask")
    for ext in (".bin", ".idx", ".json"):
        Path(f"{parts[1]}_mask{ext}").unlink()
    with pytest.raises(DataFileError, match=r"part_00001: SFT dataset without its loss mask .*part_00001_mask"):
        merge_datasets(parts, tmp_path / "again", progress=False)
    assert not list(tmp_path.glob("again*"))


def test_shard_range_is_contiguous_and_balanced():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([0, 1, 10, 1000, 10**6]) for _ in range(rng.randint(1, 30))]
        n = rng.randint(1, 12)
        ranges = [shard_range(sizes, i, n) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert [shard_range([100] * 9, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 9)]
    # bytes, not file counts: the big file gets a shard of its own
    assert [shard_range([10**6, 1, 1, 1, 1], i, 2) for i in range(2)] == [(0, 1), (1, 5)]
    # one file cannot be split: every other shard is empty
    assert [shard_range([5000], i, 3) for i in range(3)] == [(0, 0), (0, 1), (1, 1)]


@pytest.mark.parametrize("spec, pattern", [("3/3", r"in 0\.\.2"), ("0/0", "at least 1"), ("-1/2", r"in 0\.\.1"),
                                           ("1of2", "expected I/N"), ("a/b", "expected I/N")])
def test_bad_shard_spec(spec, pattern):
    with pytest.raises(DataFileError, match=pattern):
        parse_shard(spec)


def _copy(prefix: Path, to: Path) -> Path:
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{prefix}{ext}", f"{to}{ext}")
    return to


def _edit_meta(prefix: Path, **changes) -> None:
    m = read_data_meta(prefix)
    for key, value in changes.items():
        m[key] = value
    meta_path(prefix).write_text(json.dumps(m))


def test_errors_name_the_file_and_the_fix(tmp_path, corpus):
    root = corpus["root"]
    parts = _shards(corpus, tmp_path, 3)
    other = _shards(corpus, tmp_path / "other", 2)
    out = tmp_path / "out"

    def fails(prefixes, pattern, output=out):
        with pytest.raises(DataFileError, match=pattern):
            merge_datasets(prefixes, output, progress=False)
        assert not list(tmp_path.glob("out*"))

    fails([parts[0], parts[2]], r"shards 1 of 3 are missing .*--shard I/3")
    fails([parts[0], parts[1], parts[1], parts[2]], r"shard 1/3 given twice")
    fails([*parts, other[0]], r"part_00000.json: shard 0/2 of another run")
    fails([*parts, root / "single"], r"single: not a shard, but .*part_00000 is one")
    fails(parts, r"would overwrite the input", output=parts[1])
    fails([], "no input datasets")
    # tokenizer and options recorded in the sidecar
    b = _copy(root / "single", tmp_path / "b")
    _edit_meta(b, tokenizer={**read_data_meta(b)["tokenizer"], "fingerprint": "f" * 64})
    fails([root / "single", b], r"b.json: tokenized with a different tokenizer")
    _edit_meta(b, tokenizer=read_data_meta(root / "single")["tokenizer"], append_eod=False)
    fails([root / "single", b], r"b.json: append_eod=False but .*single.json has append_eod=True")
    meta_path(b).unlink()
    fails([root / "single", b], r"b.json: missing, but .*single.json exists")
    # dtype: int32 tokens next to uint16 ones
    from megalong.data.indexed import IndexedDatasetBuilder

    with IndexedDatasetBuilder(tmp_path / "wide", np.int32) as w:
        w.add_document([1, 2, 3])
        w.finalize()
    fails([root / "single", tmp_path / "wide"], r"wide.idx: holds int32 tokens but .*single.idx holds uint16")
    # missing and corrupt files (indexed.py's validation)
    c = _copy(parts[2], tmp_path / "c")
    idx_path(c).unlink()
    fails([root / "single", c], r"c.idx: no such file")
    c = _copy(parts[2], tmp_path / "c")
    with open(bin_path(c), "r+b") as f:
        f.truncate(bin_path(c).stat().st_size - 2)
    fails([root / "single", c], r"c.bin: .*truncated")
    # without the shard check, the given order and any subset are merged
    s = merge_datasets([parts[0], parts[2]], out, progress=False, check_shards=False)
    assert s["documents"] == len(IndexedDataset(parts[0])) + len(IndexedDataset(parts[2]))


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_cli_exit_codes(tmp_path, corpus, capsys):
    root, tok = corpus["root"], str(corpus["tok"])
    r = _cli("preprocess_data.py", "--input", str(root / "in"), "--output-prefix", str(tmp_path / "x"),
             "--tokenizer", tok, "--shard", "3/3", "--no-progress")
    assert r.returncode == 2 and "shard 3/3: the shard index I must be in 0..2" in r.stderr
    from tools.merge_datasets import main as merge_main
    from tools.preprocess_data import main as preprocess_main

    for i in range(2):
        assert preprocess_main(["--input", str(root / "in"), "--output-prefix", str(tmp_path / "s" / f"rp_{i}"),
                                "--tokenizer", tok, "--shard", f"{i}/2", "--workers", "0", "--append-eod",
                                "--no-progress"]) == 0
    assert merge_main(["--input", str(tmp_path / "nothing"), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "nothing.idx: no such file; the merge input" in capsys.readouterr().err
    r = _cli("merge_datasets.py", "--input", str(tmp_path / "s" / "rp_0"), "--output-prefix", str(tmp_path / "m"))
    assert r.returncode == 2 and "shards 1 of 2 are missing" in r.stderr and not r.stdout
    r = _cli("merge_datasets.py", "--input", str(tmp_path / "s"), "--pattern", "rp_*", "--output-prefix",
             str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "merging 1/1 (100%)" in r.stderr  # progress lines in a log (no terminal)
    assert f"merged 2 datasets into {tmp_path / 'm'}.bin/.idx/.json: {len(corpus['docs'])} documents" in r.stdout
    _same_files(tmp_path / "m", root / "single")
