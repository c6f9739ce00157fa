"""Shared test fixtures: tiny HF models built from configs (no downloads), tidy /dev/shm."""

from __future__ import annotations

import glob
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(family: str = "llama", **over):
    """A tiny random config of a real HF family (fp32, 2 layers, GQA by default)."""
    from transformers import AutoConfig

    base = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        base["sliding_window"] = None
    base.update(over)
    return AutoConfig.for_model(family, **base)


@pytest.fixture(autouse=True, scope="session")
def _clean_dev_shm():
    """DeepSpeed CPU runs leave ~66 MiB allreduce buffers in /dev/shm; remove ours at the end.
    Also drop stale JIT-build locks (a killed build leaves one, and the next load would hang)."""
    from pathlib import Path

    for lock in (Path(__file__).resolve().parents[1] / ".torch_extensions").glob("**/lock"):
        lock.unlink(missing_ok=True)
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
        try:
            os.remove(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tokenizer + train/valid datasets built from the standard library (shared by the session)."""
    from tests.assets import build_assets

    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def flash_standin(monkeypatch):
    """flash-attn's interface on CPU (tests/flash_standin.py), so megalong's flash code path runs without a GPU.
    Returns the list of recorded kernel calls."""
    from tests import flash_standin as standin

    return standin.install(monkeypatch)
