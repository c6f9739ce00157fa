"""Building blocks of ``Trainer.setup``: tokenizer, data, base model, the LongLoRA model.

Each is a plain function of the config so the dry run, the tools and the tests reuse them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megalong.config.deepspeed import BatchArithmetic
from megalong.config.schema import Config, ConfigError
from megalong.engine.tiling import apply_memory_tiling
from megalong.lora import apply_lora_plus
from megalong.models import (
    DTYPES,
    RopeScaling,
    apply_rope_scaling,
    build_hf_config,
    create_model,
    plan_rope_scaling,
    save_hf_model,
    unwrap_peft,
)

log = logging.getLogger("megalong")


# ---------------------------------------------------------------- tokenizer
def tokenizer_spec(cfg: Config) -> str:
    spec = cfg.model.tokenizer or cfg.model.name_or_path
    if spec is None:
        raise ConfigError("model.init_config builds a new model: set model.tokenizer (an HF dir or a .model file)")
    return spec


def load_run_tokenizer(cfg: Config):
    from megalong.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_spec(cfg))


def eod_id(cfg: Config, tokenizer) -> int:
    eid = cfg.data.eod_token_id if cfg.data.eod_token_id is not None else tokenizer.eos_id
    if eid is None or eid < 0:
        raise ConfigError(f"tokenizer {tokenizer.name} has no EOS token: set data.eod_token_id")
    return int(eid)


# ---------------------------------------------------------------- data
@dataclass
class DataBundle:
    """Training and validation datasets plus the resumable loader for this rank."""

    cfg: Config
    batch: BatchArithmetic
    dp_rank: int
    train: Any
    valid: Any | None

    @property
    def has_valid(self) -> bool:
        return self.valid is not None

    def train_loader(self, consumed_samples: int) -> Iterator[dict]:
        from megalong.data.loader import ResumableLoader

        return iter(
            ResumableLoader(
                self.train, self.batch.micro_batch, self.dp_rank, self.batch.dp,
                consumed_samples=consumed_samples, num_workers=self.cfg.data.num_workers,
            )
        )

    def valid_batches(self) -> Iterator[dict]:
        """This rank's share of ``eval_batches`` global batches of validation rows (the same rows for
        any rank count, so validation loss does not depend on the layout)."""
        from megalong.data.loader import ResumableLoader

        it = iter(ResumableLoader(self.valid, self.batch.micro_batch, self.dp_rank, self.batch.dp, consumed_samples=0))
        for _ in range(self.cfg.train.eval_batches * self.batch.grad_accum):
            yield next(it)

    def probe_batch(self) -> dict:
        from megalong.data.samples import collate

        return collate([self.train[0]])


def validate_data_files(cfg: Config, tokenizer, vocab_size: int) -> None:
    """Every data file opens cleanly and was written with a tokenizer that fits this model.

    Runs on every rank before the rank-0-first index build, so bad data stops all ranks at once
    instead of leaving the others waiting at a barrier."""
    from megalong.data.indexed import IndexedDataset, check_tokenizer_matches

    for prefix in list(cfg.data.prefixes) + list(cfg.data.valid_prefixes):
        IndexedDataset(prefix)  # validates header, counts and .bin size
        check_tokenizer_matches(prefix, vocab_size, tokenizer.fingerprint)


def build_data(cfg: Config, tokenizer, batch: BatchArithmetic, dims, barrier: Callable[[], None],
               vocab_size: int | None = None) -> DataBundle:
    """Open and check the data, then build sample indices on rank 0 first (cached), the others after."""
    from megalong.data import build_dataset

    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes is empty: preprocess a corpus with tools/preprocess_data.py and list it")
    validate_data_files(cfg, tokenizer, vocab_size or tokenizer.vocab_size)
    eod = eod_id(cfg, tokenizer)
    n_train = max(1, cfg.train.max_steps) * batch.train_batch
    n_valid = cfg.train.eval_batches * batch.train_batch
    datasets: dict[str, Any] = {}
    for turn in (0, 1):  # rank 0 builds the cached indices, everyone else then loads them
        if (dims.rank == 0) == (turn == 0):
            datasets["train"] = build_dataset(cfg.data, n_train, eod, split="train")
            datasets["valid"] = (
                build_dataset(cfg.data, n_valid, eod, split="valid") if cfg.data.valid_prefixes else None
            )
        barrier()
    return DataBundle(cfg, batch, dims.dp_rank, datasets["train"], datasets["valid"])


# ---------------------------------------------------------------- models
def materialize_base_model(cfg: Config, run_dir: Path, tokenizer, is_main: bool,
                           barrier: Callable[[], None]) -> Path:
    """The base model's HF directory. A recipe that builds its base from a config gets it written
    once into RUN_DIR/base_model (weights from train.seed, plus the tokenizer), so conversion,
    evaluation and adapter export always have a real base directory."""
    if cfg.model.name_or_path is not None:
        return Path(cfg.model.name_or_path)
    base_dir = run_dir / "base_model"
    if is_main and not (base_dir / "config.json").is_file():
        from megalong.data.tokenizer import save_hf_tokenizer

        hf_cfg = build_hf_config(cfg.model)
        if tokenizer.eos_id is not None:
            hf_cfg.eos_token_id = tokenizer.eos_id
        if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
            hf_cfg.bos_token_id = tokenizer.bos_id
        model = create_model(hf_cfg, dtype=torch.float32, seed=cfg.train.seed)
        tmp = base_dir.with_name(".base_model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        save_hf_model(model, tmp)
        save_hf_tokenizer(tokenizer_spec(cfg), tmp)
        tmp.rename(base_dir)
        log.info("built the base model from model.init_config into %s", base_dir)
    barrier()
    return base_dir


def set_attention(cfg: Config, model: nn.Module, mode: str) -> None:
    """Switch the model to the training (S²-Attn, short or full), evaluation, or ``full`` attention."""
    from megalong.attention import use_full_attention, use_s2_attention

    kind = {"train": cfg.attention.train, "eval": cfg.attention.eval}.get(mode, mode)
    if kind in ("s2", "short"):  # short: the same groups and kernel, no shifted heads
        use_s2_attention(model, cfg.group_size, backend=cfg.attention.backend, shift=kind == "s2",
                         deterministic=cfg.attention.deterministic)
    else:
        use_full_attention(model, backend=cfg.attention.backend, deterministic=cfg.attention.deterministic)


def base_hf_config(cfg: Config, base_dir: Path | None = None) -> tuple[Any, RopeScaling | None]:
    """The config of the base model in ``base_dir`` with the run's RoPE scaling applied.

    Without ``base_dir``: the recipe's own model (its directory, or ``model.init_config``), as the
    start-up checks see it before any base directory has been written."""
    model_cfg = cfg.model if base_dir is None else replace(cfg.model, name_or_path=str(base_dir), init_config=None)
    hf_cfg = build_hf_config(model_cfg)
    scaling = plan_rope_scaling(hf_cfg, cfg.rope, cfg.rope_target_length)
    apply_rope_scaling(hf_cfg, scaling)
    return hf_cfg, scaling


def build_model(cfg: Config, base_dir: Path, ds_config: dict, dims, tokenizer=None,
                base: tuple[Any, RopeScaling | None] | None = None) -> tuple[nn.Module, Any]:
    """Base model (under zero.Init with ZeRO-3) + RoPE scaling + attention + LoRA+ + tiled MLP /
    activation offload (megalong.engine.tiling) + activation ckpt.

    ``base``: the ``base_hf_config(cfg, base_dir)`` result when the caller already has it.
    """
    hf_cfg, scaling = base if base is not None else base_hf_config(cfg, base_dir)
    hf_ds = None
    if cfg.zero.stage == 3 and cfg.model.zero_init is not False:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # from_pretrained sees ZeRO-3 and loads under zero.Init
    torch.manual_seed(cfg.train.seed)
    model = create_model(hf_cfg, path=str(base_dir), dtype=DTYPES[cfg.train.dtype],
                         trust_remote_code=cfg.model.trust_remote_code)
    model._megalong_hf_ds_config = hf_ds  # keep transformers' ZeRO-3 switch alive with the model
    torch.manual_seed(cfg.train.seed + 1)
    model = apply_lora_plus(model, cfg.lora)
    _cast_trainable(model, DTYPES[cfg.train.dtype])
    set_attention(cfg, model, "train")
    apply_memory_tiling(cfg, model)
    enable_activation_checkpointing(cfg, model, ds_config, dims)
    model.train()
    return model, scaling


def _cast_trainable(model: nn.Module, dtype: torch.dtype) -> None:
    """peft creates adapters in fp32 beside a bf16 base; DeepSpeed wants one dtype (it keeps its own
    fp32 master copy of every trainable parameter), so the adapters follow the training dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


def enable_activation_checkpointing(cfg: Config, model: nn.Module, ds_config: dict, dims) -> None:
    mode = cfg.train.activation_checkpointing
    if mode == "none":
        return
    base = unwrap_peft(model)
    embed = base.get_input_embeddings()
    if not any(p.requires_grad for p in embed.parameters()):
        base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    if mode == "hf":
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return
    import deepspeed

    from megalong.parallel.dims import DeepSpeedMPU

    deepspeed.checkpointing.configure(DeepSpeedMPU(dims), deepspeed_config=ds_config)
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
