"""ZeRO-2/3 (with and without offload) on 2 gloo ranks == the single-process run; exact resume.

Every run is the real entry point in real processes (tests/dist/worker.py), fp32, on a tiny Llama
with S²-Attn + LoRA+ + PI. One global batch of 4 rows per step: 1 rank × micro 2 × grad-accum 2
versus 2 ranks × micro 2, so the optimizer sees the same rows and the same normalisation.
"""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch

from tests.assets import (
    assert_adapter_logits,
    clean_shm,
    megalong_model,
    real_rows,
    run_ranks,
    safetensors_of,
    step_losses,
    step_metric,
    tiny_run_config,
    trained_weights,
)

pytestmark = pytest.mark.dist


FIRST_STEP = ["--dump-first-step"]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """Single process, ZeRO-3, micro 2 × grad-accum 2, 6 steps (checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = tiny_run_config(assets, root / "run", train={"grad_accum": 2})
    run_ranks(cfg, 1, root / "logs", worker_args=FIRST_STEP + [str(root / "first_step.pt")])
    yield Run(root / "run", root / "first_step.pt")
    clean_shm()


LAYOUTS = {
    "zero3": {"stage": 3},
    "zero3_offload": {"stage": 3, "offload_optimizer": True, "offload_param": True},
    "zero2": {"stage": 2},
}


@pytest.fixture(scope="module")
def two_rank_runs(assets, tmp_path_factory):
    """The same recipe on 2 ranks under each ZeRO layout (run once, shared by the tests below)."""
    runs = {}
    for name, zero in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        run_ranks(tiny_run_config(assets, root / "run", zero=zero), 2, root / "logs",
                  worker_args=FIRST_STEP + [str(root / "first_step.pt")])
        runs[name] = Run(root / "run", root / "first_step.pt")
        clean_shm()
    return runs


class Run:
    """A finished test run: its directory and the first optimizer step's dump (tests/dist/worker.py)."""

    def __init__(self, run_dir, first_step):
        self.dir, self.first_step_path = run_dir, first_step

    @functools.cached_property
    def losses(self):
        return step_losses(self.dir)

    @functools.cached_property
    def weights(self):
        return trained_weights(self.dir)

    @functools.cached_property
    def first(self):
        return torch.load(self.first_step_path, weights_only=True)

    def metric(self, key):
        return step_metric(self.dir, key)


# Tolerances. Every layout runs the same fp32 arithmetic on the same rows; only the order of
# summations differs (gloo's reduction, reduce-scatter partitions, ZeRO-3's own linear backward),
# which moves a sum by a few float32 ulps of its largest terms.
RTOL = 1e-5  # losses, grad norms, validation losses: sums over many terms, no amplification
GRAD_ATOL = 1e-6  # first-step gradients, relative to the tensor's largest element (the scale of its terms)


def adam_first_update_bound(g_a: torch.Tensor, g_b: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """How far apart two first AdamW updates can be, per element, given the two gradients.

    At step 1, m̂ = g and v̂ = g², so the update is lr·f(g) with f(g) = g / (|g| + ε) (no weight
    decay). f'(g) = ε / (|g| + ε)² is largest (1/ε) at g = 0: a gradient that is ~0 up to summation
    noise turns that noise into an update of order lr. By the mean-value theorem
    |f(a) − f(b)| ≤ |a − b| · ε / (m + ε)², m = min(|a|, |b|) when a and b share a sign, else 0.
    """
    same_sign = torch.sign(g_a) == torch.sign(g_b)
    m = torch.where(same_sign, torch.minimum(g_a.abs(), g_b.abs()), torch.zeros_like(g_a))
    return lr * (g_a - g_b).abs() * eps / (m + eps) ** 2


def adam_trajectory_bound(lrs: list[float], beta1: float, beta2: float) -> float:
    """An upper bound on how far two AdamW runs (weight decay 0) from the same start can drift, per element.

    Each update is lr_t · m̂_t / (√v̂_t + ε). By Cauchy–Schwarz over the gradient history,
    |m_t| ≤ (1−β1)/√(1−β2) · √(Σ_{j<t} (β1²/β2)^j) · √v_t, so with the bias corrections
    |m̂_t / √v̂_t| ≤ c_t = (1−β1)/(1−β1^t) · √((1−β2^t)/(1−β2)) · √(Σ_{j<t} (β1²/β2)^j)   (c_1 = 1).
    Two trajectories differ by at most Σ_t 2·lr_t·c_t, whatever their gradients.
    """
    total = 0.0
    for t, lr in enumerate(lrs, start=1):
        geo = sum((beta1 ** 2 / beta2) ** j for j in range(t))
        c = (1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2)) * math.sqrt(geo)
        total += 2 * lr * c
    return total


def _clip_coef(norm: float, clip: float) -> float:
    return clip / norm if clip and norm > clip else 1.0


def _assert_same_run(run: Run, ref: Run, cfg: dict):
    steps = list(range(1, 7))
    # 1. per-step losses, gradient norms (before clipping) and validation losses: tight
    for key in ("loss", "grad_norm"):
        got, want = run.metric(key), ref.metric(key)
        assert sorted(got) == sorted(want) == steps, key
        torch.testing.assert_close(torch.tensor([got[s] for s in steps], dtype=torch.float64),
                                   torch.tensor([want[s] for s in steps], dtype=torch.float64),
                                   rtol=RTOL, atol=0.0, msg=key)
    val, ref_val = run.metric("val_loss"), ref.metric("val_loss")
    assert sorted(val) == sorted(ref_val) == [3, 6]
    for s in val:  # validation: the same rows for any layout, full attention
        assert val[s] == pytest.approx(ref_val[s], rel=RTOL, abs=0.0)

    # 2. the first step's gradients: the same sums in another order -> tight, scaled by each tensor's largest term
    first, ref_first = run.first, ref.first
    assert sorted(first["grads"]) == sorted(ref_first["grads"]) and ref_first["grads"]
    for k, g_ref in ref_first["grads"].items():
        torch.testing.assert_close(first["grads"][k], g_ref, rtol=RTOL,
                                   atol=GRAD_ATOL * float(g_ref.abs().max()), msg=k)

    # 3. the first update: equal up to what AdamW's 1/(|g|+ε) can make of the gradients' differences
    lr, eps, clip = ref_first["lr"], cfg["train"].get("eps", 1e-8), cfg["train"]["grad_clip"]
    assert first["lr"] == lr
    coef, ref_coef = _clip_coef(run.metric("grad_norm")[1], clip), _clip_coef(ref.metric("grad_norm")[1], clip)
    for k, g_ref in ref_first["grads"].items():
        assert torch.equal(first["before"][k], ref_first["before"][k]), k  # same initial weights, bit for bit
        update = first["after"][k] - first["before"][k]
        ref_update = ref_first["after"][k] - ref_first["before"][k]
        bound = adam_first_update_bound(first["grads"][k] * coef, g_ref * ref_coef, lr, eps)
        rounding = 4 * torch.finfo(torch.float32).eps * (first["before"][k].abs() + lr)  # w + u, w' − w in fp32
        excess = (update - ref_update).abs() - (bound + rounding)
        assert float(excess.max()) <= 0, (k, float(excess.max()))

    # 4. trained weights after 6 steps: within the distance two AdamW trajectories can drift apart
    from megalong.config.loader import config_from_dict
    from megalong.engine.schedule import lr_multiplier

    tc = config_from_dict(cfg).train
    mult = lr_multiplier(tc)
    drift = adam_trajectory_bound([tc.lr * mult(t) for t in range(6)], *tc.betas)
    weights, ref_weights = run.weights, ref.weights
    assert sorted(weights) == sorted(ref_weights)
    assert any("lora_B" in k for k in weights) and any("embed_tokens" in k for k in weights)
    for k in ref_weights:
        diff = float((weights[k] - ref_weights[k]).abs().max())
        assert diff <= drift, (k, diff, drift)
    # training moved the weights: LoRA B starts at zero
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_match_single_process(assets, two_rank_runs, reference, layout, tmp_path):
    _assert_same_run(two_rank_runs[layout], reference, tiny_run_config(assets, tmp_path))


def test_resume_reproduces_uninterrupted_losses_exactly(assets, tmp_path, two_rank_runs):
    """Cut a (moved) 2-rank run back to its step-3 checkpoint, resume: steps 4-6 equal the uninterrupted run."""
    cfg = tiny_run_config(assets, tmp_path / "run")
    shutil.copytree(two_rank_runs["zero3"].dir, tmp_path / "run")
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


# A checkpoint of a 2-rank run resumed on another number of ranks, the global batch kept (4 rows):
# (ZeRO layout of the 2-rank run, ranks, micro batch, grad accum) of the resumed run.
RELAYOUTS = {
    "zero3_dp2_to_dp1": ("zero3", 1, 2, 2),
    "zero3_dp2_to_dp4": ("zero3", 4, 1, 1),
    "zero2_dp2_to_dp1": ("zero2", 1, 2, 2),
}


@pytest.mark.parametrize("case", list(RELAYOUTS))
def test_resume_on_another_layout_continues_the_run(assets, tmp_path, two_rank_runs, case):
    """dp = 2 -> dp = 1 / 4 through DeepSpeed's universal checkpoint (ZeRO partitions of the trainable
    weights and their Adam moments re-cut for the new layout). Steps 4-6 equal the uninterrupted
    2-rank run to RTOL: the same fp32 rows and normalisation, only the reduction order differs."""
    layout, world, micro, accum = RELAYOUTS[case]
    src = two_rank_runs[layout]
    shutil.copytree(src.dir, tmp_path / "run")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpt_dir / "step_00000006")
    (ckpt_dir / "latest").write_text("step_00000003")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    cfg = tiny_run_config(assets, tmp_path / "run", zero=LAYOUTS[layout],
                          train={"micro_batch_size": micro, "grad_accum": accum})
    run_ranks(cfg, world, tmp_path / "logs", overrides=["--checkpoint.resume=auto"])
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "written with dp=2 × sp=1" in log and "resuming through DeepSpeed's universal checkpoint" in log
    assert "probe loss after resume" in log
    assert (ckpt_dir / "step_00000003" / "universal").is_dir()
    got, want = step_losses(tmp_path / "run"), src.losses
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], rel=RTOL, abs=0.0), (s, got[s], want[s])
    norms, want_norms = step_metric(tmp_path / "run", "grad_norm"), src.metric("grad_norm")
    for s in (4, 5, 6):
        assert norms[s] == pytest.approx(want_norms[s], rel=RTOL, abs=0.0), (s, norms[s], want_norms[s])
    meta = ckpt_meta(ckpt_dir, "step_00000006")
    assert (meta["dp"], meta["world_size"]) == (world, world)
    clean_shm()


def ckpt_meta(ckpt_dir, tag):
    from megalong.engine import checkpoint as ckpt

    return ckpt.read_meta(ckpt_dir, tag)


def test_bf16_zero3_lora_plus_trains_close_to_fp32(assets, tmp_path, reference):
    """bf16 (peft makes fp32 adapters beside a bf16 base: they must be cast for DeepSpeed) on 2 ranks."""
    run_ranks(tiny_run_config(assets, tmp_path / "run", train={"dtype": "bf16"}), 2, tmp_path / "logs")
    losses, ref = step_losses(tmp_path / "run"), reference.losses
    assert sorted(losses) == list(range(1, 7))
    for s in losses:
        assert abs(losses[s] - ref[s]) < 0.05 * ref[s], (s, losses[s], ref[s])
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["bf16"]["enabled"]
    clean_shm()


# ---------------------------------------------------------------- conversion of these runs
def test_checkpoints_of_every_layout_convert_to_their_trained_weights(reference, two_rank_runs, tmp_path):
    """Each layout's checkpoint (1 rank ZeRO-3; 2 ranks ZeRO-3, ZeRO-3 + offload, ZeRO-2) exports exactly
    base + (α/r)·B·A and the trained embed/norm tensors of that checkpoint; that the trained tensors
    themselves agree across layouts is test_two_ranks_match_single_process's business."""
    from megalong.engine.export import export_hf, iter_base_tensors

    runs = {"1rank_zero3": reference, **two_rank_runs}
    base = dict(iter_base_tensors(reference.dir / "base_model"))
    scale = 8 / 4  # lora alpha / r of tiny_run_config
    for name, run in runs.items():
        sd = safetensors_of(export_hf(run.dir, tmp_path / name))
        assert sorted(sd) == sorted(base) and not any("lora" in k for k in sd), name
        trained = run.weights
        for k, w in base.items():
            stem = k[: -len(".weight")]
            a, b = trained.get(f"{stem}.lora_A.default.weight"), trained.get(f"{stem}.lora_B.default.weight")
            if a is not None:
                want = w + scale * (b @ a)
            else:
                want = trained.get(k, trained.get(k.replace(".weight", ".base_layer.weight"), w))
            torch.testing.assert_close(sd[k], want, rtol=1e-6, atol=1e-7, msg=f"{name}: {k}")
        assert any(not torch.equal(sd[k], base[k]) for k in base if "q_proj" in k), name  # the merge happened
    cfg = json.loads((tmp_path / "zero2" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["max_position_embeddings"] == 128


def test_converted_model_and_adapter_load_in_stock_libraries_with_equal_logits(assets, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from megalong.engine.export import export_adapter, export_hf

    run = reference.dir
    model, rc = megalong_model(run)
    x = real_rows(assets)  # 100 tokens: past the base's 64, so PI is exercised
    with torch.no_grad():
        want = model(x).logits

    hf = export_hf(run, tmp_path / "hf")
    stock = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    assert stock.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, want, rtol=1e-4, atol=1e-5)

    adapter = export_adapter(run, tmp_path / "adapter")
    assert_adapter_logits(run, rc.base_dir, adapter, x, want)


def test_conversion_refuses_bad_inputs_and_writes_nothing(reference, tmp_path, assets):
    from megalong.engine.export import ExportError, export_hf

    run = reference.dir
    empty = tmp_path / "empty_run"
    (empty / "checkpoints" / "step_00000001").mkdir(parents=True)  # a checkpoint that never completed
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_hf(empty, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()

    moved = tmp_path / "moved_base"  # --base: the named directory is used (its config too), not the recorded one
    shutil.copytree(run / "base_model", moved)
    out = export_hf(run, tmp_path / "out_moved", base=str(moved))
    assert json.loads((out / "megalong_export.json").read_text())["base_model_dir"] == str(moved)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["factor"] == 2.0

    other = tmp_path / "other_base"
    from megalong.models import create_model, save_hf_model
    from tests.conftest import tiny_config

    save_hf_model(create_model(tiny_config("llama", hidden_size=32, vocab_size=assets["vocab_size"])), other)
    with pytest.raises(ExportError, match="does not match the run"):
        export_hf(run, tmp_path / "out2", base=str(other))
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))

    (tmp_path / "out3").mkdir()
    (tmp_path / "out3" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(run, tmp_path / "out3")
    assert (tmp_path / "out3" / "keep.txt").read_text() == "mine"
