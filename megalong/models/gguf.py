"""GGUF in: a llama.cpp model file turned into an ordinary Hugging Face directory.

    MODEL.gguf ──transformers' GGUF reader (needs `pip install gguf`)──► dequantized torch weights
        │   config without quantization fields, tokenizer (+ chat template), generation config
        ▼
    OUT.partial/  model.safetensors, config.json, generation_config.json, tokenizer files ──rename──► OUT

The directory loads with stock ``AutoModelForCausalLM.from_pretrained(OUT)`` and trains like any
other base (``model.name_or_path=OUT``). Quantized weights are dequantized once (Q4_1 → fp32 by
default): the result is the quantized model's function, not the original full-precision one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megalong.config.schema import ConfigError
from megalong.models.loading import DTYPES

_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def _load(gguf_path: Path, dtype: torch.dtype):
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError:
        raise ConfigError(f"reading {gguf_path} needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype, **kwargs)
    return model, tokenizer


def _as_plain_model(model) -> None:
    """Forget that the weights came from a quantized file (they are dequantized tensors now)."""
    model.hf_quantizer = None
    model.is_quantized = False
    for key in _DROP_CONFIG_KEYS:
        if hasattr(model.config, key):
            delattr(model.config, key)


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """Write ``gguf_path`` as an HF directory ``out_dir``; returns a summary (architecture, sizes, check).

    The check reloads the written directory with stock transformers and compares its logits on a
    short text with the GGUF-loaded model (they must be equal: same tensors)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConfigError(f"{gguf_path} does not exist (give the path of a .gguf file)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} exists; choose a new directory or pass --overwrite")
    model, tokenizer = _load(gguf_path, DTYPES[dtype])
    _as_plain_model(model)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context:
        tokenizer.model_max_length = context
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    config = json.loads((tmp / "config.json").read_text())
    for key in _DROP_CONFIG_KEYS:
        config.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    max_diff = _reload_check(model, tokenizer, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return {
        "gguf": str(gguf_path), "out": str(out_dir), "architecture": config.get("architectures"),
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype, "context": context,
        "vocab_size": config.get("vocab_size"), "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "reload_max_abs_logit_diff": max_diff,
    }


@torch.no_grad()
def _reload_check(model, tokenizer, out_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = tokenizer("The river runs to the sea. def main(): return 0", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=model.dtype, local_files_only=True)
    want = model.eval()(ids).logits.float()
    got = reloaded.eval()(ids).logits.float()
    diff = float((want - got).abs().max())
    if diff > 0:
        raise ConfigError(f"the HF directory written from the GGUF file does not reproduce its logits "
                          f"(max |diff| {diff:.3g}); not kept")
    return diff
