"""Sequence-tiled MLP and activation offload (megalong.engine.tiling) against the plain model.

Tiled equals untiled in outputs and in every gradient (input, LoRA on the MLP projections, the
rest of the model) for tile counts that do and do not divide the rows; the "last tile" flag DeepSpeed's
ZeRO waits for is raised exactly once per backward, on the last accumulation (the "gradient
computed twice" / never-reduced pitfalls); masked tiles give no NaN. The offload context is wired
to the checkpointed layers (on CPU it passes tensors through) and changes nothing.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megalong.config.schema import ConfigError, LoraConfig, TrainConfig
from megalong.data.batch import IGNORE_INDEX
from megalong.engine.model import TrainModule
from megalong.engine.tiling import (
    activation_offload,
    apply_tiled_mlp,
    attach_activation_offload,
    mlp_modules,
    tile_count,
    tiled_mlp_call,
)
from megalong.lora import apply_lora_plus
from tests.conftest import tiny_config

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {
    "llama": {},
    "qwen2": {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48, "intermediate_size": 80},
}


def _model(family: str, seed: int = 0, targets=ALL_PROJ, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **{**FAMILIES[family], **overrides}),
                                             attn_implementation="sdpa")
    model = apply_lora_plus(model, LoraConfig(r=4, alpha=8, targets=list(targets)))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every adapter a real gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_tile_count_is_what_torch_chunk_returns():
    for rows in range(1, 41):
        for shards in range(1, 46):
            n = tile_count(rows, shards)
            assert 1 <= n <= min(shards, rows)
            assert len(torch.chunk(torch.empty(rows), n)) == n, (rows, shards)
    assert tile_count(6, 4) == 3 and tile_count(10, 4) == 4 and tile_count(256, 3) == 3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiled_mlp_equals_untiled_with_lora_on_mlp(family):
    model = _model(family)
    mlp = mlp_modules(model)[0]
    h = model.config.hidden_size
    x0 = torch.randn(2, 13, h, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(2, 13, h, generator=torch.Generator().manual_seed(2))
    params = [p for p in mlp.parameters() if p.requires_grad]
    assert len(params) == 6  # lora_A/B of gate, up, down

    def run(shards):
        x = x0.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        y = mlp(x) if shards is None else tiled_mlp_call(mlp.forward, mlp, x, shards)
        y.backward(dy)
        return y.detach(), x.grad, [p.grad.clone() for p in params]

    want_y, want_dx, want_dp = run(None)
    for shards in (2, 3, 5, 7, 26, 100):  # 26 rows: 3, 5, 7 leave a short last tile; 100 is more than rows
        y, dx, dp = run(shards)
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
        for got, want in zip(dp, want_dp):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, batch):
    module = TrainModule(model, loss_chunk_size=7)
    model.zero_grad(set_to_none=True)
    loss_sum, count = module(**batch)
    loss_sum.backward()
    return loss_sum.detach(), count, _grads(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shards", [0, 3, 4])
def test_tiled_model_equals_untiled_and_masked_tiles_are_finite(family, shards):
    """Whole model through megalong's training module (shards 0: auto, 2 tiles of the 80 rows here): loss
    and every trainable gradient; the first half of each row has no valid label (whole tiles without a loss
    term), the second row none at all."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 40), generator=gen)
    labels = torch.randint(0, 96, (2, 40), generator=gen)
    labels[:, :20] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(40).expand(2, 40)}
    want = _loss_and_grads(_model(family), batch)
    tiled = _model(family)
    assert apply_tiled_mlp(tiled, shards) == 2 and apply_tiled_mlp(tiled, shards) == 2  # idempotent
    got = _loss_and_grads(tiled, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1] == want[1] == 20
    assert sorted(got[2]) == sorted(want[2])
    assert any("mlp" in n and "lora" in n for n in got[2])
    for name, g in want[2].items():
        assert torch.isfinite(got[2][name]).all(), name
        torch.testing.assert_close(got[2][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("rows, shards", [(26, 4), (6, 4)])  # 6 rows into 4 chunks: torch gives 3
def test_zero_release_flag_raised_once_on_the_last_tile(rows, shards):
    """ZeRO-1/2/3 reduce a parameter's gradient on an accumulation hook unless ``ds_grad_is_ready`` is
    False: over a tiled backward every adapter of the MLP must see exactly one release, the last."""
    model = _model("llama")
    mlp = mlp_modules(model)[0]
    seen: dict[str, list[bool]] = {}
    for name, p in mlp.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: seen.setdefault(name, []).append(getattr(p, "ds_grad_is_ready", True)))
    x = torch.randn(1, rows, model.config.hidden_size, requires_grad=True)
    tiled_mlp_call(mlp.forward, mlp, x, shards).sum().backward()
    assert len(seen) == 6
    for name, flags in seen.items():
        assert flags[-1] is True and flags.count(True) == 1 and len(flags) == tile_count(rows, shards), (name, flags)


def test_mlp_adapters_get_gradients_when_the_input_needs_none():
    model = _model("llama")
    mlp = mlp_modules(model)[0]
    x = torch.randn(1, 10, model.config.hidden_size)  # requires_grad=False
    params = [p for p in mlp.parameters() if p.requires_grad]
    mlp(x).square().sum().backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    tiled_mlp_call(mlp.forward, mlp, x, 3).square().sum().backward()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)


def test_frozen_mlp_passes_no_params_and_eval_is_unchanged():
    model = _model("llama", targets=["q_proj", "v_proj"])
    mlp = mlp_modules(model)[0]
    assert not any(p.requires_grad for p in mlp.parameters())  # compute_params=[] (None raises in DeepSpeed)
    x = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    want = mlp(x)
    apply_tiled_mlp(model, 4)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want.detach(), rtol=1e-5, atol=1e-6)
    dx_want = torch.autograd.grad(want.sum(), x)[0]
    torch.testing.assert_close(torch.autograd.grad(mlp(x).sum(), x)[0], dx_want, rtol=1e-5, atol=1e-6)


def test_activation_offload_wraps_the_checkpointed_layers_and_changes_nothing():
    batch = {"input_ids": torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(4))}
    batch["labels"] = batch["input_ids"]

    def run(offload: bool):
        model = _model("llama")
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_tiled_mlp(model, 3)
        if offload:
            attach_activation_offload(model)
        ctx = activation_offload(model)
        with ctx:
            out = _loss_and_grads(model, batch)
        return out, ctx

    (want_loss, _, want), plain = run(False)
    (loss, _, got), ctx = run(True)
    assert not hasattr(plain, "stats")
    # every decoder layer's checkpointed input reached DeepSpeed's hook; on CPU none is moved
    assert ctx.stats.marked_tensors == 2 and ctx.stats.skipped_marked_tensors == 2
    assert ctx.stats.offloaded_tensors == 0
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=0, msg=name)


def test_offload_frees_each_restored_input_and_keeps_the_gradients():
    """megalong's offload (DeepSpeed's, unpacking once), forced to move tensors on CPU as it would from a
    GPU: the same loss and gradients as without offload, and after the backward it holds none of the
    layer inputs it brought back (DeepSpeed 0.19.8's own keeps all of them until the context exits:
    tests/unit/test_memory.py)."""
    from megalong.engine.tiling import freeing_offload

    batch = {"input_ids": torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(5))}
    batch["labels"] = batch["input_ids"]

    def run(ctx):
        model = _model("llama", num_hidden_layers=4)
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with ctx:
            return _loss_and_grads(model, batch)

    want_loss, _, want = run(contextlib.nullcontext())
    ctx = freeing_offload(use_pin_memory=False, use_streams=False, min_offload_bytes=0)
    ctx._should_skip = lambda tensor: False  # offload from the CPU "device" as from a GPU
    loss, _, got = run(ctx)
    assert ctx.stats.offloaded_tensors == 3 and ctx.stats.kept_last_tensors == 1  # 4 layers: newest kept
    assert ctx.stats.restored_tensors == 3 and len(ctx._restored) == 0
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kw, fix", [
    ({"tiled_mlp_shards": -1}, "must be >= 0"),
    ({"tiled_mlp_shards": 4}, "set train.tiled_mlp=true"),
    ({"offload_activations": True}, "set train.activation_checkpointing=hf"),
    ({"offload_activations": True, "activation_checkpointing": "deepspeed"}, "use train.cpu_checkpointing=true"),
])
def test_config_names_the_fix(kw, fix):
    with pytest.raises(ConfigError, match=fix.replace(".", r"\.")):
        TrainConfig(**kw)


def test_config_accepts_the_new_keys():
    t = TrainConfig(tiled_mlp=True, tiled_mlp_shards=3, offload_activations=True, activation_checkpointing="hf")
    assert (t.tiled_mlp, t.tiled_mlp_shards, t.offload_activations) == (True, 3, True)
    assert (TrainConfig().tiled_mlp, TrainConfig().tiled_mlp_shards, TrainConfig().offload_activations) == (
        False, 0, False)
