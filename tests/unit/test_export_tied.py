"""Export of tied-embedding models (Llama 3.2 / small Qwen2.5 / SmolLM style), without a launcher.

DeepSpeed's zero_to_fp32 reader names a shared parameter under every name the model gives it:
``model.embed_tokens.weight`` *and* ``lm_head.weight``. The checkpoint is stood in for by exactly
that: ``named_parameters(remove_duplicate=False)`` of a LoRA+ model whose trainable tensors were
changed as training would change them.
"""

from __future__ import annotations

import json

import pytest
import torch

from megalong.config.loader import config_from_dict
from megalong.engine import export
from megalong.engine.export import ExportError, RunCheckpoint, fold_tied, tied_aliases
from tests.assets import build_megalong_model, safetensors_of, tiny_run_config

VOCAB = 96
FAKE_ASSETS = {"tokenizer": None, "vocab_size": VOCAB, "train": "unused", "valid": "unused"}


def _fake_run(tmp_path, monkeypatch, family="llama", trainable=("embed", "norm"), tie=True, lora=True, **init):
    """A base model dir + a stand-in checkpoint; export's checkpoint readers are pointed at them."""
    from megalong.config.schema import ModelConfig
    from megalong.engine.setup import base_hf_config
    from megalong.lora import apply_lora_plus
    from megalong.models import build_hf_config, create_model, save_hf_model

    init_config = dict(model_type=family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=tie, **init)
    cfg = config_from_dict(tiny_run_config(FAKE_ASSETS, tmp_path / "run", model={"init_config": init_config},
                                           lora={"trainable": list(trainable), "enabled": lora}))
    base = tmp_path / "base"
    torch.manual_seed(0)
    save_hf_model(create_model(build_hf_config(ModelConfig(init_config=init_config))), base)
    hf_cfg, _ = base_hf_config(cfg, base)
    model = apply_lora_plus(create_model(hf_cfg, path=str(base)), cfg.lora)
    torch.manual_seed(1)
    with torch.no_grad():  # what two training steps do: B leaves zero, embed/norms move
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = {n.removeprefix("base_model.model."): p.detach().clone()
               for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    rc = RunCheckpoint(tmp_path / "run", "step_00000002", {"base_model_dir": str(base), "step": 2}, cfg)
    monkeypatch.setattr(export, "open_checkpoint", lambda run_dir, tag="latest": rc)
    monkeypatch.setattr(export, "trained_tensors", lambda _rc: dict(trained))
    return rc, trained


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tied_model_exports_once_and_reloads_tied_with_equal_logits(tmp_path, monkeypatch, family):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    rc, trained = _fake_run(tmp_path, monkeypatch, family)
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])  # as the reader gives it
    want_model = build_megalong_model(rc.cfg, rc.base_dir, trained)
    x = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))  # past the base's 64
    want = _logits(want_model, x)

    out = export.export_hf(rc.run_dir, tmp_path / "hf")
    sd = safetensors_of(out)
    assert "lm_head.weight" not in sd
    torch.testing.assert_close(sd["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    stock = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert stock.lm_head.weight is stock.get_input_embeddings().weight
    torch.testing.assert_close(stock.lm_head.weight, trained["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(_logits(stock, x), want, rtol=1e-4, atol=1e-5)

    adapter = export.export_adapter(rc.run_dir, tmp_path / "adapter")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(acfg["modules_to_save"])
    base = AutoModelForCausalLM.from_pretrained(rc.base_dir, config=AutoConfig.from_pretrained(adapter),
                                                local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(_logits(peft_model, x), want, rtol=1e-4, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert merged.lm_head.weight is merged.get_input_embeddings().weight  # ensure_weight_tying kept them tied


def test_base_that_also_stores_the_tied_head_exports_it_once(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    rc, trained = _fake_run(tmp_path, monkeypatch)
    f = rc.base_dir / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # some checkpoints keep both
    save_file(sd, str(f), metadata={"format": "pt"})
    out = safetensors_of(export.export_hf(rc.run_dir, tmp_path / "hf"))
    assert "lm_head.weight" not in out
    torch.testing.assert_close(out["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_tied_copies_that_differ_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    rc, trained = _fake_run(tmp_path, monkeypatch)
    trained["lm_head.weight"] = trained["lm_head.weight"] + 1e-3
    monkeypatch.setattr(export, "trained_tensors", lambda _rc: dict(trained))
    for fn, name in ((export.export_hf, "hf"), (export.export_adapter, "adapter")):
        with pytest.raises(ExportError, match="ties lm_head.weight to model.embed_tokens.weight"):
            fn(rc.run_dir, tmp_path / name)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}*"))


def test_tied_head_trained_alone_still_exports_the_shared_tensor(tmp_path, monkeypatch):
    """lora.trainable=[lm_head] on a tied model trains the embedding too: both peft copies get it."""
    from megalong.lora import modules_to_save_for

    rc, trained = _fake_run(tmp_path, monkeypatch, trainable=("lm_head", "norm"))
    only_head = {k: v for k, v in trained.items() if k != "model.embed_tokens.weight"}
    monkeypatch.setattr(export, "trained_tensors", lambda _rc: dict(only_head))
    out = safetensors_of(export.export_hf(rc.run_dir, tmp_path / "hf"))
    assert "lm_head.weight" not in out
    torch.testing.assert_close(out["model.embed_tokens.weight"], trained["lm_head.weight"])
    adapter = export.export_adapter(rc.run_dir, tmp_path / "adapter")
    sd = safetensors_of(adapter)
    assert torch.equal(sd["base_model.model.lm_head.weight"], sd["base_model.model.model.embed_tokens.weight"])
    model = build_megalong_model(rc.cfg, rc.base_dir, trained)
    assert set(modules_to_save_for(model, ["lm_head"])) == {"embed_tokens", "lm_head"}


def test_tying_is_read_from_the_structure_not_from_names():
    from megalong.config.schema import ModelConfig
    from megalong.models import build_hf_config

    def cfg(tie):
        return build_hf_config(ModelConfig(init_config=dict(
            model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)))

    assert tied_aliases(cfg(True)) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_aliases(cfg(False)) == {}  # qwen2 declares _tied_weights_keys either way
    untied = {"lm_head.weight": torch.ones(2), "model.embed_tokens.weight": torch.zeros(2)}
    assert fold_tied(untied, {}) == untied


def test_tied_full_fine_tune_exports_the_shared_tensor_once(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    rc, trained = _fake_run(tmp_path, monkeypatch, lora=False)
    assert "lm_head.weight" in trained and "model.layers.0.self_attn.q_proj.weight" in trained
    out = export.export_hf(rc.run_dir, tmp_path / "hf")
    sd = safetensors_of(out)
    assert "lm_head.weight" not in sd and sorted(sd) == sorted(k for k in trained if k != "lm_head.weight")
    stock = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert stock.lm_head.weight is stock.get_input_embeddings().weight
    for k, v in stock.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0, msg=k)
