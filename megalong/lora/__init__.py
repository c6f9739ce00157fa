"""LoRA+ via peft: adapters on attention projections, trainable embeddings and norms, merge, export."""

from megalong.lora.plus import (
    LoraTargets,
    apply_lora_plus,
    count_parameters,
    embeddings_tied,
    export_peft_adapter,
    lora_scale,
    merge_lora,
    merge_lora_weight,
    modules_to_save_for,
    resolve_lora_targets,
    to_peft_adapter_key,
    trainable_module_names,
    trainable_state_names,
)

__all__ = [
    "LoraTargets", "resolve_lora_targets", "apply_lora_plus", "count_parameters", "embeddings_tied", "export_peft_adapter", "lora_scale", "merge_lora",
    "merge_lora_weight", "modules_to_save_for", "to_peft_adapter_key", "trainable_module_names", "trainable_state_names",
]
