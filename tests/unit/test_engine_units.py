"""Pieces of the engine that need no processes: layout, LR schedule, checkpoint bookkeeping, metrics."""

from __future__ import annotations

import json

import pytest

from megalong.config.schema import ConfigError, TrainConfig
from megalong.engine import checkpoint as ckpt
from megalong.engine.schedule import lr_multiplier
from megalong.parallel.dims import ParallelDims


def test_parallel_layout():
    d = ParallelDims(world=8, sp=2, rank=5)
    assert (d.dp, d.sp_rank, d.dp_rank) == (4, 1, 2)
    assert d.sp_group_ranks() == [4, 5] and d.dp_group_ranks() == [1, 3, 5, 7]
    groups = {tuple(d.sp_group_ranks(r)) for r in range(8)}
    assert groups == {(0, 1), (2, 3), (4, 5), (6, 7)}
    with pytest.raises(ConfigError, match="does not divide the world size 8; use one of"):
        ParallelDims(world=8, sp=3)


def test_lr_schedules():
    const = lr_multiplier(TrainConfig(max_steps=100, warmup_steps=10, schedule="constant", lr=1e-3))
    assert [round(const(s), 3) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = lr_multiplier(TrainConfig(max_steps=110, warmup_steps=10, schedule="cosine", lr=1e-3, min_lr=1e-4))
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)


def _fake_ckpt(d, step, complete=True):
    tag = ckpt.tag_for_step(step)
    (d / tag).mkdir(parents=True)
    (d / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 100 + bytes([step]))
    (d / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"y" * 50)
    if complete:
        meta = {"step": step, "fingerprint": {"max_seq_len": 128}, "manifest": ckpt.build_manifest(d / tag)}
        ckpt.mark_complete(d, tag, meta)
    return tag


def test_resume_tag_selection_and_pruning(tmp_path):
    assert ckpt.find_resume_tag(tmp_path, "auto") is None
    for s in (10, 20, 30):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 40, complete=False)  # killed during save
    assert (tmp_path / "latest").read_text() == "step_00000030"
    assert ckpt.find_resume_tag(tmp_path, "auto") == "step_00000030"
    (tmp_path / "latest").write_text("step_00000040")  # a pointer to an incomplete one is not trusted
    assert ckpt.find_resume_tag(tmp_path, "auto") == "step_00000030"
    assert ckpt.find_resume_tag(tmp_path, "step_00000010") == "step_00000010"
    with pytest.raises(ckpt.CheckpointError, match="not a complete megalong checkpoint"):
        ckpt.find_resume_tag(tmp_path, "step_00000040")
    assert ckpt.find_resume_tag(tmp_path, "none") is None
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(removed) == ["step_00000010"]
    assert [t for _, t in ckpt.complete_tags(tmp_path)] == ["step_00000020", "step_00000030"]
    assert (tmp_path / "step_00000040").is_dir()  # newer than the newest complete: may be in progress


def test_compatibility_check_names_the_difference(tmp_path):
    _fake_ckpt(tmp_path, 5)
    meta = ckpt.read_meta(tmp_path, "step_00000005")
    ckpt.check_compatible(meta, {"max_seq_len": 128})
    with pytest.raises(ckpt.CheckpointError, match="max_seq_len: checkpoint 128 vs now 256"):
        ckpt.check_compatible(meta, {"max_seq_len": 256})


def test_metrics_writer_appends_json_lines(tmp_path):
    from megalong.utils.metrics import MetricsWriter, read_metrics

    w = MetricsWriter(tmp_path)
    w.write({"step": 1, "loss": 2.0})
    w.write({"step": 2, "loss": 1.5})
    w.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.0, 1.5]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_damaged_checkpoints_are_skipped_by_auto_and_refused_by_name(tmp_path):
    for s in (10, 20, 30):
        _fake_ckpt(tmp_path, s)
    assert set(ckpt.read_meta(tmp_path, "step_00000030")["manifest"]) == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    newest = tmp_path / "step_00000030" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(newest, "r+b") as f:  # truncated after the fact
        f.truncate(20)
    assert "has 20 bytes, 50 were saved" in ckpt.verify(tmp_path, "step_00000030")
    assert ckpt.find_resume_tag(tmp_path, "auto") == "step_00000020"
    with pytest.raises(ckpt.CheckpointError, match="optim_states.pt has 20 bytes, 50 were saved"):
        ckpt.find_resume_tag(tmp_path, "step_00000030")
    # same size, other bytes: only the hash sees it
    p = tmp_path / "step_00000020" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    p.write_bytes(b"z" + p.read_bytes()[1:])
    assert "does not match the sha256" in ckpt.verify(tmp_path, "step_00000020")
    (tmp_path / "step_00000010" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    assert "model_states.pt is missing" in ckpt.verify(tmp_path, "step_00000010")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* verifies"):
        ckpt.find_resume_tag(tmp_path, "auto")


def test_manifest_without_hashes_still_checks_sizes(tmp_path):
    tag = _fake_ckpt(tmp_path, 5, complete=False)
    meta = {"step": 5, "manifest": ckpt.build_manifest(tmp_path / tag, hash_files=False)}
    assert all("sha256" not in v for v in meta["manifest"].values())
    ckpt.mark_complete(tmp_path, tag, meta)
    (tmp_path / tag / "universal").mkdir()  # derived form: not part of the manifest
    (tmp_path / tag / "universal" / "x.pt").write_bytes(b"1")
    assert ckpt.verify(tmp_path, tag) is None
    (tmp_path / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"short")
    assert "5 bytes" in ckpt.verify(tmp_path, tag)


def test_rng_state_round_trips_through_safetensors_without_pickle(tmp_path):
    import random

    import numpy as np
    import torch

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # numpy keeps a cached gaussian: part of the state
    ckpt.save_rng(tmp_path, 1)
    assert (tmp_path / "rng_rank1.safetensors").is_file() and not list(tmp_path.glob("*.pt"))
    want = (random.random(), float(np.random.standard_normal()), float(np.random.rand()), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert ckpt.load_rng(tmp_path, 1)
    got = (random.random(), float(np.random.standard_normal()), float(np.random.rand()), torch.rand(3).tolist())
    assert got == want
    assert not ckpt.load_rng(tmp_path, 0)  # a rank the checkpoint has no state for (another layout)
    torch.save({"python": random.getstate()}, tmp_path / "rng_rank2.pt")  # older pickled form: never unpickled
    assert not ckpt.load_rng(tmp_path, 2)


def test_changed_data_file_is_refused_with_its_name(tmp_path):
    _fake_ckpt(tmp_path, 5)
    meta = ckpt.read_meta(tmp_path, "step_00000005")
    meta["fingerprint"]["data_files"] = {"/data/a": "aaaa" * 16, "/data/b": "bbbb" * 16}
    ckpt.check_compatible(meta, {"data_files": {"/data/a": "aaaa" * 16, "/data/b": "bbbb" * 16}})
    with pytest.raises(ckpt.CheckpointError, match=r"data changed under the run: /data/b.bin/.idx now hold other"):
        ckpt.check_compatible(meta, {"data_files": {"/data/a": "aaaa" * 16, "/data/b": "cccc" * 16}})
    with pytest.raises(ckpt.CheckpointError, match="micro × accum × dp equals the checkpoint's train_batch"):
        meta["fingerprint"]["train_batch"] = 4
        ckpt.check_compatible(meta, {"train_batch": 2})


def test_attention_deterministic_reaches_every_layer():
    """attention.deterministic (flash-attn's deterministic backward) is set on every attention module, for the
    training and the evaluation attention alike."""
    from megalong.attention.hf import SPEC_ATTR, attention_modules
    from megalong.config import config_from_dict
    from megalong.engine.setup import set_attention
    from megalong.models import create_model
    from tests.conftest import tiny_config

    model = create_model(tiny_config("llama"))
    for det in (True, False):
        cfg = config_from_dict({"model": {"init_config": {"model_type": "llama"}}, "data": {"max_seq_len": 64},
                                "attention": {"deterministic": det}})
        for mode in ("train", "eval"):
            set_attention(cfg, model, mode)
            specs = [getattr(m, SPEC_ATTR) for m in attention_modules(model)]
            assert len(specs) == 2 and all(s.deterministic is det for s in specs)
