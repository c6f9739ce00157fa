"""train.tiled_mlp in 2-rank training (dp = 2, micro 2) equals the untiled run.

LoRA on every projection (attention and MLP), so the tiles touch trainable weights and ZeRO must
reduce their gradient once, after the last tile; lm_head trainable too (the chunked loss hands out
a dW computed in its forward, for the weight ZeRO-3 gathered then). One untiled reference (one
process, ZeRO-2, micro 2 × accumulation 2: the same 4 rows per step) against:
- ZeRO-2 through the real `deepspeed` launcher, tiled (auto: 256 rows / hidden 64 = 4 tiles), with
  DeepSpeed's activation checkpointing (the tiled MLP runs again inside its reentrant recompute);
- ZeRO-3 as 2 ranks of the entry point, tiled (3 uneven tiles; the frozen MLP weights are gathered
  per tile), transformers' checkpointing and train.offload_activations (on CPU DeepSpeed's offload
  passes tensors through).
Losses, pre-clip grad norms and the validation loss to rtol 1e-5.
"""

from __future__ import annotations

import pytest
import yaml

from tests.assets import clean_shm, run_launcher, run_ranks, step_metric, tiny_run_config

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

STEPS = 2
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cfg(assets, root, zero: int, **train) -> dict:
    return tiny_run_config(
        assets, root / "run", zero={"stage": zero},
        lora={"targets": ALL_PROJ, "trainable": ["embed", "norm", "lm_head"]},
        train={"max_steps": STEPS, "eval_interval": STEPS, **train},
        checkpoint={"save_interval": 0, "save_at_end": False},
    )


@pytest.fixture(scope="module")
def untiled(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("untiled")
    run_ranks(_cfg(assets, root, zero=2, grad_accum=2), 1, root / "logs")
    clean_shm()
    return root / "run"


@pytest.mark.parametrize("zero, train", [
    (2, {"tiled_mlp": True, "activation_checkpointing": "deepspeed"}),
    (3, {"tiled_mlp": True, "tiled_mlp_shards": 3, "activation_checkpointing": "hf", "offload_activations": True}),
], ids=["zero2-launcher-ds-ckpt", "zero3-ranks-hf-ckpt-offload"])
def test_tiled_mlp_equals_untiled(assets, tmp_path, untiled, zero, train):
    cfg = _cfg(assets, tmp_path, zero=zero, **train)
    if zero == 2:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(cfg))
        res = run_launcher(["--num_gpus", "2"], ["--config", str(path)], timeout=600)
        assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
    else:
        run_ranks(cfg, 2, tmp_path / "logs")
        clean_shm()
    run = tmp_path / "run"
    for key in ("loss", "grad_norm", "val_loss"):
        got, want = step_metric(run, key), step_metric(untiled, key)
        assert sorted(got) == sorted(want) and want, key
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-5, abs=0.0), (key, s, got[s], want[s])
