"""ZeRO-2/3 (with and without offload) on 2 gloo ranks == the single-process run; exact resume.

Every run is the real entry point in real processes (tests/dist/worker.py), fp32, on a tiny Llama
with S²-Attn + LoRA+ + PI. One global batch of 4 rows per step: 1 rank × micro 2 × grad-accum 2
versus 2 ranks × micro 2, so the optimizer sees the same rows and the same normalisation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.assets import clean_shm, run_ranks, step_losses, step_metric, tiny_run_config, trained_weights

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """Single process, ZeRO-3, micro 2 × grad-accum 2, 6 steps (checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = tiny_run_config(assets, root / "run", train={"grad_accum": 2})
    run_ranks(cfg, 1, root / "logs")
    yield root / "run", step_losses(root / "run"), trained_weights(root / "run")
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
        run_ranks(tiny_run_config(assets, root / "run", zero=zero), 2, root / "logs")
        runs[name] = root / "run"
        clean_shm()
    return runs


def _assert_same_run(run_dir, reference, rtol=1e-5, atol=1e-6):
    ref_dir, ref_losses, ref_weights = reference
    losses = step_losses(run_dir)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([losses[s] for s in sorted(losses)]),
                               torch.tensor([ref_losses[s] for s in sorted(ref_losses)]), rtol=rtol, atol=atol)
    val, ref_val = step_metric(run_dir, "val_loss"), step_metric(ref_dir, "val_loss")
    assert sorted(val) == sorted(ref_val) == [3, 6]
    for s in val:  # validation: the same rows for any layout, full attention
        assert val[s] == pytest.approx(ref_val[s], rel=rtol, abs=atol)
    weights = trained_weights(run_dir)
    assert sorted(weights) == sorted(ref_weights)
    assert any("lora_B" in k for k in weights) and any("embed_tokens" in k for k in weights)
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=rtol, atol=atol, msg=k)
    # training moved the weights: LoRA B starts at zero
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_match_single_process(two_rank_runs, reference, layout):
    _assert_same_run(two_rank_runs[layout], reference)


def test_resume_reproduces_uninterrupted_losses_exactly(assets, tmp_path, two_rank_runs):
    """Cut a (moved) 2-rank run back to its step-3 checkpoint, resume: steps 4-6 equal the uninterrupted run."""
    cfg = tiny_run_config(assets, tmp_path / "run")
    shutil.copytree(two_rank_runs["zero3"], tmp_path / "run")
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


def test_bf16_zero3_lora_plus_trains_close_to_fp32(assets, tmp_path, reference):
    """bf16 (peft makes fp32 adapters beside a bf16 base: they must be cast for DeepSpeed) on 2 ranks."""
    run_ranks(tiny_run_config(assets, tmp_path / "run", train={"dtype": "bf16"}), 2, tmp_path / "logs")
    losses, ref = step_losses(tmp_path / "run"), reference[1]
    assert sorted(losses) == list(range(1, 7))
    for s in losses:
        assert abs(losses[s] - ref[s]) < 0.05 * ref[s], (s, losses[s], ref[s])
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["bf16"]["enabled"]
    clean_shm()


# ---------------------------------------------------------------- conversion of these runs
def _safetensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_checkpoints_of_every_layout_convert_to_the_same_weights(reference, two_rank_runs, tmp_path):
    from megalong.engine.export import export_hf

    runs = {"1rank_zero3": reference[0], **two_rank_runs}
    outs = {name: _safetensors(export_hf(run, tmp_path / name)) for name, run in runs.items()}
    ref = outs.pop("1rank_zero3")
    assert "model.layers.0.self_attn.q_proj.weight" in ref and not any("lora" in k for k in ref)
    for name, sd in outs.items():
        assert sorted(sd) == sorted(ref), name
        for k in ref:
            torch.testing.assert_close(sd[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    cfg = json.loads((tmp_path / "zero2" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["max_position_embeddings"] == 128


def _megalong_model(run):
    """The trained model as megalong holds it: base + LoRA+ adapters + trained tensors, full attention."""
    from megalong.attention import use_full_attention
    from megalong.engine.export import open_checkpoint, trained_tensors
    from megalong.engine.setup import base_hf_config
    from megalong.lora import apply_lora_plus
    from megalong.models import create_model

    rc = open_checkpoint(run)
    hf_cfg, _ = base_hf_config(rc.cfg, rc.base_dir)
    model = apply_lora_plus(create_model(hf_cfg, path=str(rc.base_dir)), rc.cfg.lora)
    missing, unexpected = model.load_state_dict(
        {"base_model.model." + k: v for k, v in trained_tensors(rc).items()}, strict=False)
    assert not unexpected
    use_full_attention(model)
    return model.eval(), rc


def _real_rows(assets, n=100):
    from megalong.data import IndexedDataset

    ds = IndexedDataset(assets["valid"])
    doc = next(ds[i] for i in range(len(ds)) if len(ds[i]) > 2 * n)
    return torch.as_tensor(np.stack([doc[:n], doc[n:2 * n]]).astype(np.int64))


def test_converted_model_and_adapter_load_in_stock_libraries_with_equal_logits(assets, reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from megalong.engine.export import export_adapter, export_hf

    run = reference[0]
    model, rc = _megalong_model(run)
    x = _real_rows(assets)  # 100 tokens: past the base's 64, so PI is exercised
    with torch.no_grad():
        want = model(x).logits

    hf = export_hf(run, tmp_path / "hf")
    stock = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    assert stock.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, want, rtol=1e-4, atol=1e-5)

    adapter = export_adapter(run, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(rc.base_dir, config=AutoConfig.from_pretrained(adapter),
                                                local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, want, rtol=1e-4, atol=1e-5)


def test_conversion_refuses_bad_inputs_and_writes_nothing(reference, tmp_path, assets):
    from megalong.engine.export import ExportError, export_hf

    run = reference[0]
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
