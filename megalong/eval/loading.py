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
