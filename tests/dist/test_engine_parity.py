"""ZeRO-2/3 (with and without offload) on 2 gloo ranks == the single-process run; exact resume.

Every run is the real entry point in real processes (tests/dist/worker.py), fp32, on a tiny Llama
with S²-Attn + LoRA+ + PI. One global batch of 4 rows per step: 1 rank × micro 2 × grad-accum 2
versus 2 ranks × micro 2, so the optimizer sees the same rows and the same normalisation.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.assets import clean_shm, run_ranks, step_losses, tiny_run_config, trained_weights

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """Single process, ZeRO-3, micro 2 × grad-accum 2, 6 steps (checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = tiny_run_config(assets, root / "run", train={"grad_accum": 2})
    run_ranks(cfg, 1, root / "logs")
    yield root / "run", step_losses(root / "run"), trained_weights(root / "run")
    clean_shm()


def _assert_same_run(run_dir, reference, rtol=1e-5, atol=1e-6):
    ref_dir, ref_losses, ref_weights = reference
    losses = step_losses(run_dir)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([losses[s] for s in sorted(losses)]),
                               torch.tensor([ref_losses[s] for s in sorted(ref_losses)]), rtol=rtol, atol=atol)
    weights = trained_weights(run_dir)
    assert sorted(weights) == sorted(ref_weights)
    assert any("lora_B" in k for k in weights) and any("embed_tokens" in k for k in weights)
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=rtol, atol=atol, msg=k)
    # training moved the weights: LoRA B starts at zero
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("zero", [
    {"stage": 3},
    {"stage": 3, "offload_optimizer": True, "offload_param": True},
    {"stage": 2},
], ids=["zero3", "zero3_offload", "zero2"])
def test_two_ranks_match_single_process(assets, tmp_path, reference, zero):
    cfg = tiny_run_config(assets, tmp_path / "run", zero=zero)
    run_ranks(cfg, 2, tmp_path / "logs")
    _assert_same_run(tmp_path / "run", reference)
    clean_shm()


def test_resume_reproduces_uninterrupted_losses_exactly(assets, tmp_path, reference):
    """Cut a 2-rank run back to its step-3 checkpoint, resume: steps 4-6 equal the uninterrupted run."""
    cfg = tiny_run_config(assets, tmp_path / "run")
    run_ranks(cfg, 2, tmp_path / "logs")
    full = step_losses(tmp_path / "run")
    final_weights = trained_weights(tmp_path / "run")

    ckpt_dir = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpt_dir / "step_00000006")
    (ckpt_dir / "latest").write_text("step_00000003")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    run_ranks(cfg, 2, tmp_path / "logs2", overrides=["--checkpoint.resume=auto"])
    resumed = step_losses(tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]
    for s in (4, 5, 6):
        assert resumed[s] == full[s], (s, resumed[s], full[s])
    for k, w in trained_weights(tmp_path / "run").items():
        assert torch.equal(w, final_weights[k]), k
    log = (tmp_path / "logs2" / "rank0.log").read_text()
    assert "probe loss after resume" in log and "resumed from step_00000003" in log
    clean_shm()
