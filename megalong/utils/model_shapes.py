"""Model shapes for memory planning: published architectures, HF-config shapes, parameter counts.

``analytic_param_counts`` counts the parameters of an HF Llama-style model with peft LoRA (or full
fine-tuning) without building it; the dry run counts a meta-device model instead, and the tests
check that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Published architecture numbers (the models' config.json), as HF config dicts.
KNOWN_ARCHS: dict[str, dict] = {
    "llama2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "llama2-13b": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "llama2-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    ),
    "mistral-7b": dict(  # v0.1
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
    ),
    "qwen2-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False,
        max_window_layers=28, tie_word_embeddings=False,
    ),
    "qwen3-8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "gemma3-4b": dict(  # the text decoder of gemma-3-4b (Gemma3ForCausalLM); the vision tower is not planned
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
        max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=1024,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_word_embeddings=True,
    ),
    "phi3-mini": dict(  # Phi-3-mini-4k: fused qkv_proj and gate_up_proj
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
    ),
}

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_QK_NORM_FAMILIES = ("qwen3", "gemma3_text")  # per-head RMSNorm on q and k inside attention
_FOUR_NORM_FAMILIES = ("gemma3_text",)  # norms before and after both attention and MLP
_FUSED_FAMILIES = ("phi3",)  # one qkv_proj, one gate_up_proj
_FP32_NORM_FAMILIES = ("gemma3_text",)  # RMSNorm output · (1 + w) computed in fp32


def known_arch_config(name: str) -> Any:
    """An HF config object for a known architecture name (built locally, no download)."""
    key = name.lower()
    if key not in KNOWN_ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(KNOWN_ARCHS)} (or give an HF config)")
    return hf_config_from_dict(KNOWN_ARCHS[key])


def hf_config_from_dict(data: dict) -> Any:
    """An HF config object from a config dict with ``model_type`` (e.g. a config.json's contents)."""
    from transformers import AutoConfig

    kwargs = dict(data)
    if "model_type" not in kwargs:
        raise ValueError("an HF config dict needs a 'model_type' key (llama, mistral, qwen2, ...)")
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


# ---------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the estimate needs (a Llama-style decoder)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    """Hidden-size norms per decoder layer (Gemma 3: 4)."""
    qk_norm: bool = False
    """Per-head q_norm and k_norm inside attention (Qwen3, Gemma 3)."""
    fused: bool = False
    """Fused qkv_proj and gate_up_proj (Phi-3)."""
    fp32_norms: bool = False
    """Norms that scale in fp32 (Gemma's ``x̂ · (1 + w)``): the x̂ kept for the weight's gradient is fp32."""

    @classmethod
    def from_hf_config(cls, cfg: Any, name: str | None = None) -> ModelShape:
        heads = int(cfg.num_attention_heads)
        model_type = getattr(cfg, "model_type", "")
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            name=name or getattr(cfg, "_name_or_path", "") or model_type or "model",
            hidden=int(cfg.hidden_size),
            intermediate=int(cfg.intermediate_size),
            layers=int(cfg.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            vocab=int(cfg.vocab_size),
            tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=attn_bias or model_type == "qwen2",
            o_bias=attn_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            norms_per_layer=4 if model_type in _FOUR_NORM_FAMILIES else 2,
            qk_norm=model_type in _QK_NORM_FAMILIES,
            fused=model_type in _FUSED_FAMILIES,
            fp32_norms=model_type in _FP32_NORM_FAMILIES,
        )

    @classmethod
    def known(cls, name: str) -> ModelShape:
        return cls.from_hf_config(known_arch_config(name), name=name.lower())

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int, bool]]:
        """name -> (in_features, out_features, has_bias) of each linear in one layer."""
        h, i = self.hidden, self.intermediate
        if self.fused:
            return {
                "qkv_proj": (h, self.q_dim + 2 * self.kv_dim, self.qkv_bias), "o_proj": (self.q_dim, h, self.o_bias),
                "gate_up_proj": (h, 2 * i, self.mlp_bias), "down_proj": (i, h, self.mlp_bias),
            }
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias), "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias), "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias), "down_proj": (i, h, self.mlp_bias),
        }


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts that decide model-state memory (exact, from a meta-device model, or analytic)."""

    total: int
    trainable: int
    largest_module: int
    """Most parameters owned directly by one module: ZeRO-3 gathers one module at a time."""
    largest_trainable_module: int
    persistent: int = 0
    """Parameters below ZeRO-3's persistence threshold, kept whole on every GPU."""


def _tensor_sizes(shape: ModelShape, lora: bool, r: int, targets: tuple[str, ...],
                  trainable_parts: tuple[str, ...]) -> list[tuple[str, int, bool]]:
    """(module, numel, trainable) of every parameter tensor of the model (LoRA adapters included)."""
    embed_train = not lora or "embed" in trainable_parts
    norm_train = not lora or "norm" in trainable_parts
    head_train = not lora or "lm_head" in trainable_parts or (shape.tied_embeddings and embed_train)
    out = [("embed", shape.vocab * shape.hidden, embed_train)]
    for layer in range(shape.layers):
        for name, (fin, fout, bias) in shape.projections().items():
            mod = f"{layer}.{name}"
            out.append((mod, fin * fout, not lora))
            if bias:
                out.append((mod, fout, not lora))
            if lora and (name in targets or any(t in targets for t in _FUSED.get(name, ()))):
                out.append((f"{mod}.lora_A", r * fin, True))
                out.append((f"{mod}.lora_B", fout * r, True))
        out += [(f"{layer}.norm{k}", shape.hidden, norm_train) for k in range(shape.norms_per_layer)]
        if shape.qk_norm:
            out += [(f"{layer}.q_norm", shape.head_dim, norm_train), (f"{layer}.k_norm", shape.head_dim, norm_train)]
    out.append(("norm", shape.hidden, norm_train))
    if not shape.tied_embeddings:
        out.append(("lm_head", shape.vocab * shape.hidden, head_train))
    return out


def analytic_param_counts(shape: ModelShape, *, lora: bool = True, r: int = 8,
                          targets: tuple[str, ...] = ATTN_PROJ, trainable_parts: tuple[str, ...] = ("embed", "norm"),
                          persistence_threshold: int = 100_000) -> ParamCounts:
    """Counts of the HF model with peft LoRA (or full fine-tuning), without building it."""
    tensors = _tensor_sizes(shape, lora, r, tuple(targets), tuple(trainable_parts))
    per_module: dict[str, list[int]] = {}
    for mod, n, train in tensors:
        acc = per_module.setdefault(mod, [0, 0])
        acc[0] += n
        acc[1] += n if train else 0
    return ParamCounts(
        total=sum(n for _, n, _ in tensors),
        trainable=sum(n for _, n, t in tensors if t),
        largest_module=max(v[0] for v in per_module.values()),
        largest_trainable_module=max(v[1] for v in per_module.values()),
        persistent=sum(n for _, n, _ in tensors if n < persistence_threshold),
    )
