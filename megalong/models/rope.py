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

``rope.theta`` raises the base instead of (or as well as) scaling positions ("ABF", as Code Llama,
EasyContext and Llama-3-8B-Instruct-80K do), ``angle(pos, i) = pos · θ'^(-2i/d)``; ``rope.type=theta``
does only that. The new θ is what the exported config says. A base that already carries linear
scaling gets the total factor target / pretrained context; which context that was comes from
megalong's own record or from ``rope.original_length`` (checkpoints disagree on
``max_position_embeddings``; see ``_stacked_original``).
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
    if scaling.type == "theta":  # ABF: plain RoPE with another base
        return {"rope_type": "default", "rope_theta": scaling.theta, **scaling.extra}
    p: dict = {"rope_type": scaling.type, "rope_theta": scaling.theta, "factor": scaling.factor}
    if scaling.type in ("yarn", "llama3", "longrope"):
        p["original_max_position_embeddings"] = scaling.original_length
    if scaling.type == "llama3":
        p.setdefault("low_freq_factor", 1.0)
        p.setdefault("high_freq_factor", 4.0)
    p.update(scaling.extra)
    return p


def _stacked_original(hf_config: Any, rope: RopeConfig, prior: float, target_length: int) -> int:
    """The pretrained context of a base that already carries linear scaling by ``prior``.

    A linear factor says how far positions are divided, not which context the model was pretrained on,
    and checkpoints disagree about ``max_position_embeddings``: LongLoRA's releases keep the pretrained
    length there (Llama-2 4096 with factor 8 for 32k), others store the extended length. megalong's own
    exports record the answer (``megalong_rope``); anything else must say it.
    """
    if rope.original_length is not None:
        return int(rope.original_length)
    record = getattr(hf_config, "megalong_rope", None)
    if isinstance(record, dict) and record.get("type") == "linear" and float(record.get("factor", 0)) == prior:
        return int(record["original_length"])
    if rope.factor is not None:
        return max(1, int(round(target_length / float(rope.factor))))
    mpe = int(hf_config.max_position_embeddings)
    short = max(1, int(round(mpe / prior)))
    raise ConfigError(
        f"the base model already uses linear RoPE scaling (factor {prior:g}) with max_position_embeddings={mpe}, "
        "and its config does not say which context it was pretrained on. If max_position_embeddings is the "
        f"pretrained length (LongLoRA's releases, e.g. Llama-2 4096 with factor 8), set rope.original_length={mpe} "
        f"(factor {target_length / mpe:g} for {target_length} tokens); if it is the extended length, set "
        f"rope.original_length={short} (factor {target_length / short:g}); or give rope.factor explicitly"
    )


def _check_longrope(hf_config: Any, rope: RopeConfig) -> None:
    """longrope needs per-frequency factor lists (LongRoPE's search result); say what is missing."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    partial = float(getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    half = int(head_dim * partial) // 2
    for key in ("short_factor", "long_factor"):
        value = rope.extra.get(key)
        ok = isinstance(value, list) and len(value) == half and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value)
        if not ok:
            got = "missing" if value is None else f"{type(value).__name__} of length {len(value) if isinstance(value, list) else '-'}"
            raise ConfigError(
                f"rope.type=longrope needs rope.extra.{key}: a list of {half} positive numbers (one per rotary "
                f"frequency: head_dim {head_dim} × partial_rotary_factor {partial:g} / 2), got {got}. Take both "
                "lists from a LongRoPE search or a Phi-3 *-128k config.json (rope_scaling.short_factor/long_factor)"
            )


def plan_rope_scaling(hf_config: Any, rope: RopeConfig, target_length: int) -> RopeScaling | None:
    """Decide the scaling for ``target_length`` from the base model's config; None for ``rope.type=none``."""
    base = _base_rope_params(hf_config)
    if rope.type == "none":
        return None
    base_type = base.get("rope_type", "default")
    prior = 1.0
    if base_type != "default":
        if base_type != rope.type or rope.type != "linear":
            raise ConfigError(
                f"the base model already uses rope_type={base_type!r} (factor {base.get('factor')}); megalong can "
                f"only stack linear interpolation on linear. Set rope.type={base_type!r} with an explicit "
                "rope.factor, or rope.type=none to keep the base's scaling"
            )
        prior = float(base.get("factor", 1.0))
        original = _stacked_original(hf_config, rope, prior, target_length)
    else:
        original = int(rope.original_length or hf_config.max_position_embeddings)
    if rope.type == "longrope":
        _check_longrope(hf_config, rope)
    if rope.factor is None and target_length < original:
        raise ConfigError(
            f"rope target length {target_length} is shorter than the base context {original}; "
            "nothing to extend (set rope.type=none)"
        )
    if rope.type == "theta":
        factor = 1.0
    else:
        factor = float(rope.factor) if rope.factor is not None else target_length / original
    theta = float(rope.theta) if rope.theta is not None else float(base["rope_theta"])
    return RopeScaling(rope.type, factor, original, int(target_length), theta, dict(rope.extra))


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
    if params.get("rope_type") == "longrope":  # Phi-3's configs keep it at the top level
        out["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    out.update(_layer_typed_legacy_fields(hf_config))
    return out


def _layer_typed_legacy_fields(hf_config: Any) -> dict:
    """Gemma 3 in transformers 4.x: ``rope_theta``/``rope_scaling`` are the global layers', the sliding
    layers' theta is ``rope_local_base_freq``."""
    if _layer_typed_key(hf_config) is None:
        return {}
    local = hf_config.rope_parameters.get("sliding_attention") or {}
    return {"rope_local_base_freq": local["rope_theta"]} if "rope_theta" in local else {}
