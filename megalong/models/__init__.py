"""Model loading (offline HF directories or configs), RoPE scaling, per-family notes. No distributed code."""

from megalong.models.loading import (
    DTYPES,
    build_hf_config,
    create_model,
    decoder_of,
    lm_head_of,
    save_hf_model,
    unwrap_peft,
    write_config_json,
)
from megalong.models.rope import RopeScaling, apply_rope_scaling, legacy_rope_fields, plan_rope_scaling

__all__ = [
    "DTYPES", "RopeScaling", "apply_rope_scaling", "build_hf_config", "create_model", "decoder_of",
    "legacy_rope_fields", "lm_head_of", "plan_rope_scaling", "save_hf_model", "unwrap_peft", "write_config_json",
]
