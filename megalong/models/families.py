"""Per-family notes: which HF decoders megalong has tested, and what differs between them.

| family  | GQA | notes                                                                        |
|---------|-----|------------------------------------------------------------------------------|
| llama   | yes | Llama 2 (MHA, 4k, untied) / Llama 3 (GQA, rope_theta 5e5, llama3 rope type; |
|         |     | 3.2-1B/3B tie lm_head to embed) / SmolLM (9 query over 3 KV heads, tied)    |
| mistral | yes | sliding_window in config: S²-Attn groups must fit inside it                 |
| qwen2   | yes | q/k/v biases (LoRA targets unchanged); small sizes tie lm_head/embed        |

All three route attention through transformers' AttentionInterface, which is how S²-Attn is
plugged in (megalong.attention). Other decoders that do the same usually work; they get a warning.

Tied embeddings (``tie_word_embeddings``): the output head's weight *is* the input embedding, so
LoRA+ trains one tensor. DeepSpeed's checkpoint reader names it twice; the exports write it once
(merged dir: no ``lm_head.weight``, config keeps the tie; adapter: both modules in
``modules_to_save`` with ``ensure_weight_tying``). Every row above — Llama 2, Llama 3 (tied),
Mistral (window), Qwen2 (biases, tied), 9/3 heads (tied) — is trained through the ``deepspeed``
launcher, exported both ways and reloaded in stock transformers/peft with equal logits in
tests/e2e/test_families.py.
"""

from __future__ import annotations

import logging
from typing import Any

from megalong.config.schema import ConfigError

log = logging.getLogger(__name__)

TESTED_FAMILIES = ("llama", "mistral", "qwen2")

# Fused projections some families use (Phi-3: one qkv_proj, one gate_up_proj): a LoRA target named
# after a part (q_proj) means the fused module that computes it (qkv_proj) when the model has no
# module of the part's name (megalong.lora.plus.resolve_lora_targets).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_family(hf_config: Any) -> None:
    """Warn on untested families; reject configs S²-Attn cannot run on."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in TESTED_FAMILIES:
        log.warning(
            "model_type=%r is not among the tested families %s; it will work if its attention goes "
            "through transformers' AttentionInterface", model_type, TESTED_FAMILIES,
        )
    heads = getattr(hf_config, "num_attention_heads", None)
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads is not None and kv is not None and heads % kv != 0:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")


def sliding_window_of(hf_config: Any) -> int | None:
    """Mistral-style sliding window, if the config enables one."""
    if getattr(hf_config, "use_sliding_window", True) is False:
        return None
    return getattr(hf_config, "sliding_window", None)
