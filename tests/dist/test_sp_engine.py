"""Sequence-parallel training through the real `deepspeed` launcher equals sp = 1, both sp modes
(s2_halo: halo exchange; ulysses: DeepSpeed's all-to-all around megalong's kernels).

sp = 2 × dp = 1 (2 ranks) and sp = 2 × dp = 2 (4 ranks), ZeRO-2 and ZeRO-3, against one process on
the same global batches (4 rows of 128 tokens per step: 1 rank × micro 2 × accum 2, or 2 ranks of a
row × micro 2 × accum 2, or 2 dp groups × micro 2). Packed documents with attention masked per
document and position ids restarting (data.doc_mask, data.reset_position_ids), activation
checkpointing (the halo exchange runs again in the recompute), S²-Attn with G = 32 over L = 64
tokens per rank. Losses, pre-clip grad norms (DeepSpeed reduces gradients differently per ZeRO stage
under sp: the grad norm is what shows a wrong scale) and validation losses to rtol 1e-5; trained
weights within AdamW's trajectory bound (tests/dist/test_engine_parity.py); and across a save and
resume the continued losses are bit-identical.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from tests.assets import (
    clean_shm,
    run_launcher,
    run_ranks,
    step_losses,
    step_metric,
    tiny_run_config,
    trained_weights,
)
from tests.dist.test_engine_parity import adam_trajectory_bound

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

STEPS = 4
COMMON = dict(data={"doc_mask": True, "reset_position_ids": True},
              train={"max_steps": STEPS, "eval_interval": 2, "activation_checkpointing": "hf"},
              checkpoint={"save_interval": 2})


def _cfg(assets, run_dir, **sections):
    cfg = tiny_run_config(assets, run_dir)
    for name, values in {**COMMON}.items():
        cfg[name].update(values)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def sp1(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("sp1")
    run_ranks(_cfg(assets, root / "run", train={**COMMON["train"], "grad_accum": 2}), 1, root / "logs")
    clean_shm()
    return root / "run"


def _launch(assets, tmp_path, world: int, sp: int, stage: int, grad_accum: int, resume: bool = False,
            mode: str = "s2_halo"):
    run = tmp_path / "run"
    cfg = _cfg(assets, run, zero={"stage": stage}, parallel={"sp": sp, "sp_mode": mode},
               train={**COMMON["train"], "grad_accum": grad_accum})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    extra = ["--checkpoint.resume=auto"] if resume else []
    res = run_launcher(["--num_gpus", str(world)], ["--config", str(path), *extra], timeout=600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
    return run, cfg


def _assert_same_as_sp1(run, ref, cfg):
    steps = list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        got, want = step_metric(run, key), step_metric(ref, key)
        assert sorted(got) == sorted(want) == steps, key
        for s in steps:
            assert got[s] == pytest.approx(want[s], rel=1e-5, abs=0.0), (key, s, got[s], want[s])
    val, ref_val = step_metric(run, "val_loss"), step_metric(ref, "val_loss")
    assert sorted(val) == sorted(ref_val) == [2, 4]
    for s in val:
        assert val[s] == pytest.approx(ref_val[s], rel=1e-5, abs=0.0)
    from megalong.config.loader import config_from_dict
    from megalong.engine.schedule import lr_multiplier

    tc = config_from_dict(cfg).train
    drift = adam_trajectory_bound([tc.lr * lr_multiplier(tc)(t) for t in range(STEPS)], *tc.betas)
    weights, ref_weights = trained_weights(run), trained_weights(ref)
    assert sorted(weights) == sorted(ref_weights)
    for k in ref_weights:
        assert float((weights[k] - ref_weights[k]).abs().max()) <= drift, k
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-3


# Ulysses at both stages and both dp; the halo mode at ZeRO-2 × dp 1 (+ resume on another layout) and
# ZeRO-3 × dp 2 (+ exact resume). The per-stage gradient scale is the trainer's, the same for both modes.
LAYOUTS_DP1 = [(2, "s2_halo"), (2, "ulysses"), (3, "ulysses")]
LAYOUTS_DP2 = [(3, "s2_halo"), (2, "ulysses"), (3, "ulysses")]


@pytest.mark.parametrize(("stage", "mode"), LAYOUTS_DP1)
def test_sp2_dp1_equals_sp1(assets, tmp_path, sp1, stage, mode):
    run, cfg = _launch(assets, tmp_path, world=2, sp=2, stage=stage, grad_accum=2, mode=mode)
    _assert_same_as_sp1(run, sp1, cfg)
    from megalong.engine import checkpoint as ckpt

    meta = ckpt.read_meta(run / "checkpoints", "step_00000004")
    assert (meta["sp"], meta["dp"], meta["world_size"]) == (2, 1, 2)
    if stage == 2 and mode == "s2_halo":  # the same 2 ranks as sp = 1 × dp = 2 (same rows per step): another layout, continued
        shutil.rmtree(run / "checkpoints" / "step_00000004")  # back to step 2, through the universal checkpoint
        (run / "checkpoints" / "latest").write_text("step_00000002")
        (run / "metrics.jsonl").write_text("")
        cfg["parallel"]["sp"], cfg["train"]["grad_accum"] = 1, 1
        path = tmp_path / "other_layout.yaml"
        path.write_text(yaml.safe_dump(cfg))
        res = run_launcher(["--num_gpus", "2"], ["--config", str(path), "--checkpoint.resume=auto"])
        assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
        assert "written with dp=1 × sp=2, ZeRO-2, this run has dp=2 × sp=1, ZeRO-2" in res.stdout + res.stderr
        got, want = step_losses(run), step_losses(sp1)
        assert sorted(got) == [3, 4]
        for s in (3, 4):
            assert got[s] == pytest.approx(want[s], rel=1e-5, abs=0.0), (s, got[s], want[s])
        assert ckpt.read_meta(run / "checkpoints", "step_00000004")["sp"] == 1


@pytest.mark.parametrize(("stage", "mode"), LAYOUTS_DP2)
def test_sp2_dp2_equals_sp1_and_resumes_exactly(assets, tmp_path, sp1, stage, mode):
    run, cfg = _launch(assets, tmp_path, world=4, sp=2, stage=stage, grad_accum=1, mode=mode)
    _assert_same_as_sp1(run, sp1, cfg)
    if stage != 3 or mode != "s2_halo":
        return
    full, final = step_losses(run), trained_weights(run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "metrics.jsonl").write_text("")
    _launch(assets, tmp_path, world=4, sp=2, stage=stage, grad_accum=1, resume=True)
    resumed = step_losses(run)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in (3, 4)), (resumed, full)
    for k, w in trained_weights(run).items():
        assert torch.equal(w, final[k]), k
