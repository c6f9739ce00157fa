"""Load or build an HF causal LM (offline), apply RoPE scaling, save it back as an HF directory.

No hub access: ``name_or_path`` must be a local directory. Distributed concerns (ZeRO-3's
``zero.Init``) are applied by the caller through ``init_context`` so this module stays free of them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megalong.config.schema import ConfigError, ModelConfig
from megalong.models.families import check_family
from megalong.models.rope import legacy_rope_fields

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _require_local_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(
            f"{what} {path!r} is not a local HF model directory (no config.json there); megalong never downloads "
            "at run time: download the model first (e.g. `huggingface-cli download ... --local-dir DIR`) "
            "and point model.name_or_path at DIR"
        )
    return p


def build_hf_config(model_cfg: ModelConfig) -> Any:
    """The base model's HF config: read from the directory, or built from ``model.init_config``."""
    from transformers import AutoConfig

    if model_cfg.name_or_path is not None:
        path = _require_local_dir(model_cfg.name_or_path, "model.name_or_path")
        cfg = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=model_cfg.trust_remote_code
        )
    else:
        kwargs = dict(model_cfg.init_config)
        model_type = kwargs.pop("model_type")
        try:
            cfg = AutoConfig.for_model(model_type, **kwargs)
        except ValueError as e:
            raise ConfigError(f"model.init_config: {e}") from None
    check_family(cfg)
    return cfg


def create_model(
    hf_config: Any,
    *,
    path: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load weights from ``path`` (local) or build a randomly initialised model from ``hf_config``.

    ``hf_config`` may carry RoPE scaling already (see ``megalong.models.rope``); it wins over the
    directory's config.json. ``init_context`` (e.g. ``deepspeed.zero.Init``) wraps construction.
    """
    from transformers import AutoModelForCausalLM

    ctx = init_context() if init_context is not None else contextlib.nullcontext()
    with ctx:
        if path is not None:
            _require_local_dir(path, "model.name_or_path")
            model = AutoModelForCausalLM.from_pretrained(
                path,
                config=hf_config,
                dtype=dtype,
                local_files_only=True,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=dtype, attn_implementation=attn_implementation
            )
    return model


def write_config_json(hf_config: Any, out_dir: str | Path) -> None:
    """Save the config and add the legacy rope fields (``rope_scaling``, ``rope_theta``) older readers need."""
    out_dir = Path(out_dir)
    hf_config.save_pretrained(str(out_dir))
    path = out_dir / "config.json"
    data = json.loads(path.read_text())
    data.update(legacy_rope_fields(hf_config))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_hf_model(model: nn.Module, out_dir: str | Path, *, max_shard_size: str = "2GB") -> None:
    """``save_pretrained`` (safetensors) plus the rope fields; for unwrapped, non-partitioned models."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=max_shard_size)
    write_config_json(model.config, out_dir)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel`` etc.) that returns last hidden states."""
    base = unwrap_peft(model)
    decoder = getattr(base, base.base_model_prefix, None)
    if decoder is None:
        raise TypeError(f"{type(base).__name__} has no decoder at .{base.base_model_prefix}")
    return decoder


def lm_head_of(model: nn.Module) -> nn.Module:
    head = unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(unwrap_peft(model)).__name__} has no output embedding (lm_head)")
    return head
