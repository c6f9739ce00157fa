"""Load an exported HF model directory for evaluation or generation (offline, full attention)."""

from __future__ import annotations

from pathlib import Path

import torch

from megalong.config.schema import ConfigError
from megalong.models.loading import DTYPES


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_eval_model(model_dir: str | Path, *, dtype: str = "auto", device: str | None = None,
                    attention: str = "full", group_size: int | None = None):
    """An HF causal LM in eval mode with full (or S²) attention, on ``device``."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {model_dir} is not an HF model directory (no config.json); "
                          "convert a run first with tools/convert_to_hf.py")
    dev = pick_device(device)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True,
                                                 attn_implementation="sdpa")
    if attention == "s2":
        from megalong.attention import use_s2_attention

        if not group_size:
            raise ConfigError("--attention s2 needs --group-size")
        use_s2_attention(model, group_size)
    model.to(dev).eval()
    return model, dev


def load_model_and_tokenizer(model_dir: str | Path, *, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer, device) from an exported HF directory that holds tokenizer files too."""
    from transformers import AutoTokenizer

    model, dev = load_eval_model(model_dir, dtype=dtype, device=device)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model_dir} has no loadable tokenizer ({e}); tools/convert_to_hf.py copies the "
                          "base model's tokenizer files into its output") from None
    return model, tok, dev


def check_data_fits_model(prefix: str, vocab_size: int) -> None:
    """A data file whose token ids exceed the model's vocabulary cannot be evaluated with it."""
    from megalong.data.indexed import check_tokenizer_matches

    check_tokenizer_matches(prefix, vocab_size)


def base_context(hf_config) -> int | None:
    """The context a model was trained at before any extension: the original length of its RoPE
    scaling (megalong's record, ``original_max_position_embeddings``, or max/factor for linear PI),
    else ``max_position_embeddings``."""
    rec = getattr(hf_config, "megalong_rope", None)
    if isinstance(rec, dict) and rec.get("original_length"):
        return int(rec["original_length"])
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    if params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    n = getattr(hf_config, "max_position_embeddings", None)
    if n and params.get("rope_type", params.get("type")) == "linear" and params.get("factor"):
        return int(round(n / float(params["factor"])))
    return int(n) if n else None


def model_identity(model_dir: str | Path, tokenizer) -> dict:
    """What identifies an evaluated model and its tokenizer in stored results: the directory, a hash of
    its config.json and of its weight files' names and sizes, and a hash of the tokenizer's behaviour
    (vocabulary size, chat template, the ids of a probe text)."""
    import hashlib

    path = Path(model_dir)
    weights = sorted((f.name, f.stat().st_size) for f in path.iterdir()
                     if f.suffix in (".safetensors", ".bin") and f.is_file())
    model_sha = hashlib.sha256((path / "config.json").read_bytes() + repr(weights).encode()).hexdigest()[:16]
    probe = "The grass is green. VAR ABCDE = 12345 One of the special magic numbers for x-y is: 1234567."
    tok = repr((len(tokenizer), getattr(tokenizer, "chat_template", None),
                tokenizer(probe, add_special_tokens=True)["input_ids"]))
    return {"model": str(model_dir), "model_sha": model_sha,
            "tokenizer_sha": hashlib.sha256(tok.encode()).hexdigest()[:16]}
