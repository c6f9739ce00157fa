import pytest
import torch
from peft import PeftModel

from megalong.config.schema import ConfigError, LoraConfig
from megalong.lora import (
    apply_lora_plus,
    count_parameters,
    export_peft_adapter,
    merge_lora,
    trainable_state_names,
)
from megalong.models import create_model
from tests.conftest import tiny_config


def _trained(family="llama", seed=0, **over):
    """A LoRA+ model whose adapters, embeddings and norms have moved away from their init."""
    torch.manual_seed(seed)
    base = create_model(tiny_config(family, **over), seed=seed)
    model = apply_lora_plus(base, LoraConfig())
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_trainable_set_is_exactly_lora_embed_norm():
    model = _trained()
    names = trainable_state_names(model)
    expected = []
    for name, _ in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert any(t in name for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
            expected.append(name)
        elif "embed_tokens" in name or name.endswith("norm.weight"):
            expected.append(name)
    assert sorted(names) == sorted(expected)
    assert not any("lm_head" in n or "mlp" in n for n in names)
    assert any("embed_tokens" in n for n in names) and sum("norm" in n for n in names) == 2 * 2 + 1
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_lm_head_option_and_bad_target():
    base = create_model(tiny_config("llama"))
    model = apply_lora_plus(base, LoraConfig(trainable=["embed", "norm", "lm_head"]))
    assert any(n.endswith("lm_head.weight") for n in trainable_state_names(model))
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora_plus(create_model(tiny_config("llama")), LoraConfig(targets=["query_key_value"]))


def test_full_finetune_when_disabled():
    model = apply_lora_plus(create_model(tiny_config("llama")), LoraConfig(enabled=False))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family,over", [("llama", {}), ("mistral", {}), ("qwen2", {"tie_word_embeddings": True})])
def test_merged_equals_adapter_and_stock_peft_loads_export(tmp_path, family, over):
    model = _trained(family, **over)
    model.eval()
    x = torch.randint(0, 96, (2, 33))
    with torch.no_grad():
        adapter_logits = model(x).logits
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    export_peft_adapter(model, state, LoraConfig(), tmp_path / "adapter", base_model_name_or_path="base")

    fresh_base = create_model(tiny_config(family, **over), seed=0)  # the untouched base weights
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, adapter_logits, rtol=1e-5, atol=1e-5)

    merged = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapter_logits, rtol=1e-4, atol=1e-5)
