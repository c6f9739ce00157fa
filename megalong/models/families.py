"""Per-family notes: which HF decoders megalong has tested, and what differs between them.

| family      | GQA | notes                                                                          |
|-------------|-----|--------------------------------------------------------------------------------|
| llama       | yes | Llama 2 (MHA, 4k, untied) / Llama 3 (GQA, rope_theta 5e5, llama3 rope type;   |
|             |     | 3.2-1B/3B tie lm_head to embed) / SmolLM (9 query over 3 KV heads, tied)      |
| mistral     | yes | sliding_window in config: S²-Attn groups must fit inside it                   |
| qwen2       | yes | q/k/v biases (LoRA targets unchanged); small sizes tie lm_head/embed          |
| qwen3       | yes | per-head q_norm/k_norm inside attention: norms, so LoRA+ trains them;         |
|             |     | head_dim is its own (H·D != hidden); small sizes tied                          |
| gemma3_text | yes | Gemma3ForCausalLM: sliding layers (window; G must fit inside it) between      |
|             |     | global ones; RoPE per layer type (PI scales the global layers' only); scale   |
|             |     | query_pre_attn_scalar^-0.5 (passed to the kernels); embedding × sqrt(hidden)  |
|             |     | and (1 + w) norms are the model's own (trained and exported as stored);       |
|             |     | q/k norms; tied; 262k vocabulary (memory plan: gemma3-4b); final logit cap    |
|             |     | applied by the chunked loss; attention soft-capping and bidirectional refused |
| phi3        | yes | fused qkv_proj / gate_up_proj: LoRA targets q,k,v -> qkv_proj (--dry-run shows |
|             |     | them); its config takes only default/longrope RoPE: linear PI refused         |

All of them route attention through transformers' AttentionInterface, which is how S²-Attn is
plugged in (megalong.attention). Other decoders that do the same usually work; they get a warning.
What megalong cannot reproduce is refused by the run checks (``unsupported_features``: attention logit
soft-capping as in Gemma 2, bidirectional attention, logit scales; and any config the family's own
validation rejects once the run's RoPE is applied).

Tied embeddings (``tie_word_embeddings``): the output head's weight *is* the input embedding, so
LoRA+ trains one tensor. DeepSpeed's checkpoint reader names it twice; the exports write it once
(merged dir: no ``lm_head.weight``, config keeps the tie; adapter: both modules in
``modules_to_save`` with ``ensure_weight_tying``). Every row above — Llama 2, Llama 3 (tied, 9/3
heads), Mistral (window), Qwen2 (biases, tied), Qwen3 (q/k norms, tied), Gemma 3 (sliding + global
layers, tied), Phi-3 (fused projections) — is trained through the ``deepspeed`` launcher, exported
both ways and reloaded in stock transformers/peft with equal logits in tests/e2e/test_families.py;
Qwen3, Gemma 3 and Phi-3 also train one step under sp=2 (halo and Ulysses) equal to one process
(tests/dist/test_sp_attention.py).
"""

from __future__ import annotations

import logging
from typing import Any

from megalong.config.schema import ConfigError

log = logging.getLogger(__name__)

TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")

# Fused projections some families use (Phi-3: one qkv_proj, one gate_up_proj): a LoRA target named
# after a part (q_proj) means the fused module that computes it (qkv_proj) when the model has no
# module of the part's name (megalong.lora.plus.resolve_lora_targets).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_family(hf_config: Any) -> None:
    """Warn on untested families; reject configs S²-Attn cannot run on."""
    model_type = getattr(hf_config, "model_type", None)
    if getattr(hf_config, "text_config", None) is not None and getattr(hf_config, "num_attention_heads", None) is None:
        raise ConfigError(
            f"model_type={model_type!r} is a multimodal model (its decoder is under text_config, "
            f"{getattr(hf_config.text_config, 'model_type', '?')}); megalong extends text decoders: use a text "
            "checkpoint of the family (Gemma 3: model_type gemma3_text / Gemma3ForCausalLM, e.g. gemma-3-1b), or "
            "save this model's language model on its own (text_config + its weights) and point model.name_or_path "
            "there"
        )
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
    """The sliding window, if the config enables one: on every layer (Mistral, Phi-3) or on the layers
    ``layer_types`` marks ``sliding_attention`` (Gemma 3, Qwen2/3 with ``use_sliding_window``)."""
    if getattr(hf_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and "sliding_attention" not in layer_types:
        return None
    return getattr(hf_config, "sliding_window", None)


_LOGIT_SCALES = ("logit_scale", "logits_scaling")  # Cohere multiplies the logits, Granite divides them


def unsupported_features(hf_config: Any) -> list[tuple[str, str]]:
    """(level, message) for each part of this model megalong's attention or loss would not reproduce.

    megalong's attention (S²-Attn and full, every backend) is causal softmax attention with the scale
    the model passes; its chunked loss computes ``lm_head(hidden)`` and Gemma's final logit softcapping
    (megalong.engine.loss), nothing else.
    """
    model_type = getattr(hf_config, "model_type", None)
    out = []
    cap = getattr(hf_config, "attn_logit_softcapping", None)
    if cap is not None and model_type == "gemma3_text":
        out.append(("warn", f"attn_logit_softcapping={cap} is set, but transformers' Gemma 3 attention never "
                            "applies it (it is a Gemma 2 field) and neither does megalong: results equal stock "
                            "transformers; set it to null in config.json to silence this"))
    elif cap is not None:
        out.append(("error", f"{model_type} caps attention logits (attn_logit_softcapping={cap}, tanh before the "
                             "softmax); megalong's S²-Attn and full-attention kernels (sdpa, flash) compute plain "
                             "softmax attention, so training and evaluation would silently change the model. "
                             "Not supported: use a family without attention soft-capping (Gemma 3 replaced it by "
                             "q/k norms)"))
    if getattr(hf_config, "use_bidirectional_attention", False):
        out.append(("error", f"{model_type} has use_bidirectional_attention=true; megalong's attention is causal "
                             "only (S²-Attn groups are causal). Set it to false for a decoder LM"))
    for name in _LOGIT_SCALES:
        value = getattr(hf_config, name, None)
        if value not in (None, 1, 1.0):
            out.append(("error", f"{model_type} rescales its logits ({name}={value}); megalong's chunked loss "
                                 "computes lm_head(hidden) without it, so the trained loss would not be the model's. "
                                 "Not supported yet"))
    return out


def rope_hint(hf_config: Any) -> str:
    """What to do when transformers rejects a family's config with the run's RoPE scaling."""
    if getattr(hf_config, "model_type", None) == "phi3":
        return ("Phi-3 configs take only rope_type default or longrope, so a linear/dynamic/yarn Phi-3 would train "
                "but its export could not be saved or loaded: set rope.type=none (keeps the base's RoPE; "
                "Phi-3-*-128k ship longrope) or rope.type=longrope")
    return "choose a rope.type this family's config accepts, or rope.type=none"
