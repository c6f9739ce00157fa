"""megalong.attention: leak-free S²-Attn and segment-aware full attention, plus their
registration in transformers' AttentionInterface ("megalong_s2", "megalong_full").

Importing this package registers both implementations with transformers. The kernels
(``s2_attention``, ``full_attention``) need only torch, so they also import where transformers is
absent (e.g. ``tools/gpu_check.py`` on a bare GPU box); the HF helpers then raise the ImportError.
"""

from .layout import combine_segments_and_padding, segments_from_position_ids
from .s2attn import BACKENDS, check_group_size, full_attention, s2_attention

_HF_API = (
    "FULL_IMPLEMENTATION",
    "S2_IMPLEMENTATION",
    "attention_modules",
    "register_attention",
    "unwrap_model",
    "use_full_attention",
    "use_s2_attention",
)

try:
    from .hf import (  # noqa: F401  (importing registers the implementations)
        FULL_IMPLEMENTATION,
        S2_IMPLEMENTATION,
        attention_modules,
        register_attention,
        unwrap_model,
        use_full_attention,
        use_s2_attention,
    )
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("transformers"):
        raise

    def __getattr__(name: str):
        if name in _HF_API:
            from . import hf  # raises the real ImportError, naming transformers

            return getattr(hf, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "check_group_size",
    "combine_segments_and_padding",
    "full_attention",
    "s2_attention",
    "segments_from_position_ids",
    *_HF_API,
]
