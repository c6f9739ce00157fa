import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megalong.config.schema import ConfigError, RopeConfig
from megalong.models import (
    apply_rope_scaling,
    create_model,
    plan_rope_scaling,
    save_hf_model,
    write_config_json,
)
from tests.conftest import tiny_config


def _inv_freq(model):
    return model.model.rotary_emb.inv_freq.clone()


def test_linear_factor_is_exact_ratio_and_recorded():
    cfg = tiny_config("llama", max_position_embeddings=96)
    s = plan_rope_scaling(cfg, RopeConfig(type="linear"), target_length=1000)
    assert s.factor == 1000 / 96 and s.original_length == 96 and s.target_length == 1000
    apply_rope_scaling(cfg, s)
    assert cfg.rope_parameters["factor"] == 1000 / 96
    assert cfg.max_position_embeddings == 1000 and cfg.megalong_rope["factor"] == 1000 / 96


def test_linear_interpolation_divides_positions():
    base = create_model(tiny_config("llama"), seed=0)
    cfg = tiny_config("llama")
    apply_rope_scaling(cfg, plan_rope_scaling(cfg, RopeConfig(type="linear"), 512))
    scaled = create_model(cfg, seed=0)
    torch.testing.assert_close(_inv_freq(scaled), _inv_freq(base) / 4.0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
def test_saved_config_round_trips_through_stock_transformers(tmp_path, family, rope_type):
    cfg = tiny_config(family, rope_theta=50000.0) if family != "llama" else tiny_config(family)
    s = plan_rope_scaling(cfg, RopeConfig(type=rope_type), 512)
    apply_rope_scaling(cfg, s)
    model = create_model(cfg, seed=1)
    save_hf_model(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == rope_type and raw["rope_scaling"]["factor"] == 4.0
    assert raw["rope_theta"] == s.theta
    expect_mpe = 128 if rope_type == "dynamic" else 512
    assert raw["max_position_embeddings"] == expect_mpe
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.config.rope_parameters["rope_type"] == rope_type
    assert loaded.config.rope_parameters["rope_theta"] == s.theta
    torch.testing.assert_close(_inv_freq(loaded), _inv_freq(model))
    x = torch.randint(0, 96, (1, 40))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_old_style_config_with_only_rope_scaling_loads(tmp_path):
    """A config.json as transformers 4.x readers write it (rope_scaling + rope_theta) still loads right."""
    cfg = tiny_config("qwen2", rope_theta=1e6)
    apply_rope_scaling(cfg, plan_rope_scaling(cfg, RopeConfig(type="linear"), 256))
    save_hf_model(create_model(cfg), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    back = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert back.rope_parameters["factor"] == 2.0 and back.rope_parameters["rope_theta"] == 1e6


def test_linear_on_linear_needs_the_pretrained_context():
    """A LongLoRA-style base (max_position_embeddings = pretrained 128, linear ×8, covers 1024) extended to
    1024 / 2048: the total factor is target / 128. The old plan read 128 as the extended length (factor 64
    and original 16 at 1024); without a record of the pretrained context it is now refused with both fixes."""
    cfg = tiny_config("llama", rope_scaling={"rope_type": "linear", "factor": 8.0})
    with pytest.raises(ConfigError, match=r"rope.original_length=128 \(factor 8 for 1024.*rope.original_length=16"):
        plan_rope_scaling(cfg, RopeConfig(type="linear"), 1024)
    s = plan_rope_scaling(cfg, RopeConfig(type="linear", original_length=128), 1024)
    assert (s.factor, s.original_length) == (8.0, 128)
    s = plan_rope_scaling(cfg, RopeConfig(type="linear", original_length=128), 2048)
    assert (s.factor, s.original_length) == (16.0, 128)
    s = plan_rope_scaling(cfg, RopeConfig(type="linear", factor=16.0), 2048)
    assert (s.factor, s.original_length) == (16.0, 128)
    with pytest.raises(ConfigError, match="already uses rope_type"):
        plan_rope_scaling(cfg, RopeConfig(type="yarn"), 1024)


def test_linear_on_megalong_export_reads_its_record(tmp_path):
    """megalong's own export (max_position_embeddings = extended 512, ×4) records its pretrained context."""
    cfg = tiny_config("llama")
    apply_rope_scaling(cfg, plan_rope_scaling(cfg, RopeConfig(type="linear"), 512))
    write_config_json(cfg, tmp_path)
    back = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert back.max_position_embeddings == 512 and back.rope_parameters["factor"] == 4.0
    s = plan_rope_scaling(back, RopeConfig(type="linear"), 1024)
    assert (s.factor, s.original_length) == (8.0, 128)
    apply_rope_scaling(back, s)
    torch.testing.assert_close(_inv_freq(create_model(back)), _inv_freq(create_model(tiny_config("llama"))) / 8.0)


def _plain_inv_freq(theta: float, head_dim: int = 16) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


@pytest.mark.parametrize("rope_type", ["theta", "linear"])
def test_rope_theta_is_applied_exported_and_reloaded(tmp_path, rope_type):
    """ABF: rope.theta alone (type theta) or with linear PI; the export and a stock reload use the new θ."""
    cfg = tiny_config("llama")
    s = plan_rope_scaling(cfg, RopeConfig(type=rope_type, theta=2.5e5), 512)
    assert s.theta == 2.5e5 and s.factor == (1.0 if rope_type == "theta" else 4.0)
    apply_rope_scaling(cfg, s)
    model = create_model(cfg, seed=3)
    expect = _plain_inv_freq(2.5e5) / s.factor
    torch.testing.assert_close(_inv_freq(model).double(), expect, rtol=1e-6, atol=0)
    save_hf_model(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_theta"] == 2.5e5 and raw["rope_parameters"]["rope_theta"] == 2.5e5
    assert raw["max_position_embeddings"] == 512 and raw["megalong_rope"]["theta"] == 2.5e5
    if rope_type == "theta":
        assert raw["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in raw
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    x = torch.randint(0, 96, (1, 300))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_rope_theta_config_errors():
    with pytest.raises(ConfigError, match="set rope.theta"):
        RopeConfig(type="theta")
    with pytest.raises(ConfigError, match="use rope.type=theta"):
        RopeConfig(type="none", theta=1e6)
    with pytest.raises(ConfigError, match="set rope.theta instead"):
        RopeConfig(type="linear", extra={"rope_theta": 1e6})


def test_longrope_needs_factor_lists_and_round_trips(tmp_path):
    """Phi-3-style LongRoPE through rope.extra; rows past the original context use the long factors."""
    cfg = tiny_config("llama")
    with pytest.raises(ConfigError, match=r"rope.extra.short_factor: a list of 8 positive numbers.*got missing"):
        plan_rope_scaling(cfg, RopeConfig(type="longrope"), 512)
    with pytest.raises(ConfigError, match=r"long_factor: a list of 8 .*got list of length 3"):
        plan_rope_scaling(cfg, RopeConfig(type="longrope", extra={"short_factor": [1.0] * 8, "long_factor": [2.0] * 3}),
                          512)
    short = [1.0 + 0.1 * i for i in range(8)]
    long = [1.0 + 0.9 * i for i in range(8)]
    s = plan_rope_scaling(cfg, RopeConfig(type="longrope", extra={"short_factor": short, "long_factor": long}), 512)
    apply_rope_scaling(cfg, s)
    model = create_model(cfg, seed=4)
    save_hf_model(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "longrope" and raw["original_max_position_embeddings"] == 128
    assert raw["rope_scaling"]["long_factor"] == long and raw["rope_parameters"]["factor"] == 4.0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    x = torch.randint(0, 96, (1, 200))  # > 128: the long factors
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(),
                               _plain_inv_freq(10000.0) / torch.tensor(long, dtype=torch.float64), rtol=1e-6, atol=0)


def test_none_and_shrinking_targets():
    cfg = tiny_config("llama")
    assert plan_rope_scaling(cfg, RopeConfig(type="none"), 1024) is None
    with pytest.raises(ConfigError, match="shorter than the base context"):
        plan_rope_scaling(cfg, RopeConfig(type="linear"), 64)


def _gemma3(**over):
    return tiny_config("gemma3_text", head_dim=16, sliding_window=32,
                       layer_types=["sliding_attention", "full_attention"], **over)


def test_gemma3_interpolates_only_its_global_layers_and_round_trips(tmp_path):
    """Gemma 3 keeps one RoPE per layer type: PI scales the full-attention layers' (global theta 1e6); the
    sliding layers (local theta 1e4, never a distance past their window) keep theirs. The exported config
    loads in stock transformers, new style and old style (rope_scaling, rope_theta, rope_local_base_freq)."""
    base = create_model(_gemma3(), seed=0).model.rotary_emb
    cfg = _gemma3()
    s = plan_rope_scaling(cfg, RopeConfig(type="linear"), 512)
    assert s.factor == 4.0 and s.theta == 1e6 and s.original_length == 128
    apply_rope_scaling(cfg, s)
    assert cfg.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    model = create_model(cfg, seed=0)
    rot = model.model.rotary_emb
    torch.testing.assert_close(rot.full_attention_inv_freq, base.full_attention_inv_freq / 4.0)
    torch.testing.assert_close(rot.sliding_attention_inv_freq, base.sliding_attention_inv_freq, rtol=0, atol=0)
    save_hf_model(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert raw["rope_theta"] == 1e6 and raw["rope_local_base_freq"] == 1e4 and raw["max_position_embeddings"] == 512
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.config.rope_parameters == cfg.rope_parameters
    x = torch.randint(0, 96, (1, 40))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    raw.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert AutoConfig.from_pretrained(tmp_path, local_files_only=True).rope_parameters == cfg.rope_parameters


def test_scaling_keeps_the_partial_rotary_factor_of_the_base():
    """Phi-3/4 keep partial_rotary_factor inside rope_parameters: it is the model's, not the scaling's."""
    cfg = tiny_config("llama")
    cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.5}
    apply_rope_scaling(cfg, plan_rope_scaling(cfg, RopeConfig(type="linear"), 512))
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5 and cfg.rope_parameters["factor"] == 4.0
