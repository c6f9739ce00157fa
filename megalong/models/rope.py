"""RoPE scaling for the target context: position interpolation and the other HF rope types.

Position interpolation (LongLoRA, Chen et al. 2023) divides every position by
``factor = target / original`` so a model trained on ``original`` tokens sees rotary angles
it knows at ``target`` tokens:

    angle(pos, i) = (pos / factor) · θ^(-2i/d)        (linear)

The factor is exact (a float ratio of two integers, never rounded) and recorded in a
``RopeScaling`` that travels with checkpoints and exported configs. Exported configs carry
``rope_scaling`` + ``rope_theta`` (read by transformers 4.x, vLLM, llama.cpp converters) beside
transformers 5's ``rope_parameters``, and ``max_position_embeddings = target``: LongLoRA's first
released configs lacked these, and users got garbage past 4k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from megalong.config.schema import ConfigError, RopeConfig


@dataclass(frozen=True)
class RopeScaling:
    """What was applied: enough to reproduce and to export."""

    type: str
    factor: float
    original_length: int
    target_length: int
    theta: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# Families with one RoPE per layer type (Gemma 3: local theta on the sliding layers, global theta on the
# full-attention layers) keep ``rope_parameters = {layer_type: params}``; interpolation scales the
# full-attention layers only: a sliding layer never sees a distance past its window (< the base context),
# which is also how Gemma 3 itself was extended (linear x8 on its global layers only).
SCALED_LAYER_TYPE = "full_attention"
_KEPT_BASE_KEYS = ("partial_rotary_factor",)  # part of the model, not of the scaling (Phi-3/4 keep it here)


def _layer_typed_key(hf_config: Any) -> str | None:
    """The ``rope_parameters`` entry interpolation applies to when RoPE is set per layer type, else None."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    types = set(getattr(hf_config, "layer_types", None) or ())
    if not (types and params and set(params) <= types and all(isinstance(v, dict) for v in params.values())):
        return None
    if SCALED_LAYER_TYPE not in params:
        raise ConfigError(f"{getattr(hf_config, 'model_type', 'the model')} sets RoPE per layer type {sorted(params)} "
                          f"without {SCALED_LAYER_TYPE!r} layers: there is no global-attention RoPE to interpolate; "
                          "set rope.type=none")
    return SCALED_LAYER_TYPE


def _base_rope_params(hf_config: Any) -> dict:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    typed = _layer_typed_key(hf_config)
    if typed is not None:
        params = dict(params[typed])
    if "rope_theta" not in params:
        params["rope_theta"] = float(getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _hf_rope_parameters(scaling: RopeScaling) -> dict:
    """The ``rope_parameters`` dict transformers 5 expects for this scaling."""
    p: dict = {"rope_type": scaling.type, "rope_theta": scaling.theta, "factor": scaling.factor}
    if scaling.type in ("yarn", "llama3"):
        p["original_max_position_embeddings"] = scaling.original_length
    if scaling.type == "llama3":
        p.setdefault("low_freq_factor", 1.0)
        p.setdefault("high_freq_factor", 4.0)
    p.update(scaling.extra)
    return p


def plan_rope_scaling(hf_config: Any, rope: RopeConfig, target_length: int) -> RopeScaling | None:
    """Decide the scaling for ``target_length`` from the base model's config; None for ``rope.type=none``."""
    base = _base_rope_params(hf_config)
    if rope.type == "none":
        return None
    base_type = base.get("rope_type", "default")
    current = int(rope.original_length or hf_config.max_position_embeddings)
    prior = 1.0
    if base_type != "default":
        if base_type != rope.type or rope.type != "linear":
            raise ConfigError(
                f"the base model already uses rope_type={base_type!r} (factor {base.get('factor')}); megalong can "
                f"only stack linear interpolation on linear. Set rope.type={base_type!r} with an explicit "
                "rope.factor, or rope.type=none to keep the base's scaling"
            )
        prior = float(base.get("factor", 1.0))
    factor = float(rope.factor) if rope.factor is not None else prior * target_length / current
    if factor < 1.0:
        raise ConfigError(
            f"rope target length {target_length} is shorter than the base context {current}; "
            "nothing to extend (set rope.type=none)"
        )
    original = int(round(current / prior)) if rope.original_length is None else current
    return RopeScaling(rope.type, factor, original, int(target_length), float(base["rope_theta"]), dict(rope.extra))


def apply_rope_scaling(hf_config: Any, scaling: RopeScaling | None) -> Any:
    """Write the scaling into an HF config in place (before the model is built) and return it.

    ``dynamic`` NTK is defined relative to ``max_position_embeddings`` (it rescales only past it),
    so for that type ``max_position_embeddings`` stays the original length.
    """
    if scaling is None:
        return hf_config
    base = _base_rope_params(hf_config)
    params = {**{k: base[k] for k in _KEPT_BASE_KEYS if k in base}, **_hf_rope_parameters(scaling)}
    typed = _layer_typed_key(hf_config)
    hf_config.rope_parameters = params if typed is None else {**hf_config.rope_parameters, typed: params}
    if scaling.type != "dynamic":
        hf_config.max_position_embeddings = scaling.target_length
    else:
        hf_config.max_position_embeddings = scaling.original_length
    hf_config.megalong_rope = scaling.to_dict()
    return hf_config


def legacy_rope_fields(hf_config: Any) -> dict:
    """``rope_scaling`` / ``rope_theta`` as older readers expect them, for writing into config.json."""
    params = _base_rope_params(hf_config)
    out: dict = {"rope_theta": params["rope_theta"]}
    if params.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    out.update(_layer_typed_legacy_fields(hf_config))
    return out


def _layer_typed_legacy_fields(hf_config: Any) -> dict:
    """Gemma 3 in transformers 4.x: ``rope_theta``/``rope_scaling`` are the global layers', the sliding
    layers' theta is ``rope_local_base_freq``."""
    if _layer_typed_key(hf_config) is None:
        return {}
    local = hf_config.rope_parameters.get("sliding_attention") or {}
    return {"rope_local_base_freq": local["rope_theta"]} if "rope_theta" in local else {}
