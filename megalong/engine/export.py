"""From a training checkpoint to a usable model: a merged HF directory or a PEFT adapter.

    RUN_DIR/checkpoints/<tag>/  (ZeRO-2/3 partitions, any rank count; megalong.json says it is complete)
        │  DeepSpeed's zero_to_fp32 readers (lazy: one tensor at a time)
        ▼
    trained fp32 tensors: LoRA A/B, embeddings, norms (LoRA+)  |  every parameter (full fine-tune)
        │                                   base model dir (recorded in the run), streamed shard by shard
        ▼                                                  ▼
    W' = W + (α/r)·B·A for LoRA targets, trained tensor for embed/norm, base tensor otherwise
    (tied embeddings: the reader names the one shared tensor twice, embed_tokens and lm_head;
     it is written once, as the base model stores it, and config.json keeps tie_word_embeddings)
        ▼
    OUT_DIR.tmp/  model-0000k-of-0000n.safetensors + index, config.json (rope_scaling,
                  max_position_embeddings), generation_config.json, tokenizer  ──rename──►  OUT_DIR

Host memory stays near one output shard plus the trained tensors. Nothing is written into
OUT_DIR unless the whole export succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megalong.config.loader import config_from_dict
from megalong.config.schema import Config, ConfigError
from megalong.engine import checkpoint as ckpt
from megalong.engine.setup import base_hf_config
from megalong.lora.plus import ADAPTER_NAME, lora_scale, merge_lora_weight
from megalong.models import build_hf_config, write_config_json

log = logging.getLogger("megalong")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
_TRAIN_PREFIX = "model."  # TrainModule holds the (peft) model at .model
_PEFT_PREFIX = "base_model.model."


class ExportError(RuntimeError):
    """A checkpoint or base model that cannot be exported; says which and what to do."""


@dataclass
class RunCheckpoint:
    run_dir: Path
    tag: str
    meta: dict
    cfg: Config

    @property
    def tag_dir(self) -> Path:
        return self.run_dir / "checkpoints" / self.tag

    @property
    def base_dir(self) -> Path:
        """Recorded base model directory (relative paths are inside the run directory)."""
        p = Path(self.meta["base_model_dir"])
        return p if p.is_absolute() else self.run_dir / p


def open_checkpoint(run_dir: str | Path, tag: str = "latest") -> RunCheckpoint:
    """Find a complete checkpoint of a run (``latest`` = newest complete)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ExportError(f"{run_dir} has no checkpoints/ directory: is it a megalong run directory?")
    resolved = ckpt.find_resume_tag(ckpt_dir, "auto" if tag == "latest" else tag)
    if resolved is None:
        raise ExportError(
            f"{ckpt_dir} holds no complete checkpoint (a checkpoint is complete once megalong.json is written); "
            "train further or resume the run so it saves one"
        )
    meta = ckpt.read_meta(ckpt_dir, resolved)
    return RunCheckpoint(run_dir, resolved, meta, config_from_dict(meta["config"]))


def _hf_name(train_name: str) -> str:
    name = train_name[len(_TRAIN_PREFIX):] if train_name.startswith(_TRAIN_PREFIX) else train_name
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def trained_tensors(rc: RunCheckpoint) -> dict[str, torch.Tensor]:
    """fp32 trained tensors keyed by HF-side names (LoRA keys keep ``.lora_A.default.weight``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(
        str(rc.run_dir / "checkpoints"), tag=rc.tag, exclude_frozen_parameters=rc.cfg.lora.enabled, lazy_mode=True
    )
    out = {}
    for name, t in sd.items():
        if name.startswith("loss_head."):
            continue  # shares lm_head's parameter
        out[_hf_name(name)] = t.contiguous().detach().float()
    return out


def tied_aliases(hf_cfg, trust_remote_code: bool = False, model=None) -> dict[str, str]:
    """``{alias: canonical}`` for parameters the model holds under two names (tied embeddings).

    Read from the model's structure (a skeleton on the meta device, or ``model`` when the caller
    already built one, peft-wrapped or not), not from a list of names: with
    ``tie_word_embeddings`` the output head's weight *is* the input embedding's, and
    ``named_parameters()`` names it once, first as ``model.embed_tokens.weight``.
    """
    from megalong.models import create_model

    if model is None:
        with torch.device("meta"):
            model = create_model(hf_cfg, trust_remote_code=trust_remote_code)
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def fold_tied(trained: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """One entry per shared parameter: DeepSpeed's zero_to_fp32 reader names a tied tensor under
    both names (``model.embed_tokens.weight`` and ``lm_head.weight``); keep the canonical name.

    Raises ExportError when the two copies differ: then the checkpoint did not come from a model
    that ties them, and writing either would silently drop trained values.
    """
    out = dict(trained)
    for alias, canonical in aliases.items():
        if alias not in out:
            continue
        t = out.pop(alias)
        if canonical not in out:
            out[canonical] = t
        elif out[canonical].shape != t.shape or not torch.equal(out[canonical], t):
            same_shape = out[canonical].shape == t.shape
            diff = f"max |diff| {(out[canonical] - t).abs().max().item():.3g}" if same_shape else "shapes differ"
            raise ExportError(
                f"the base model ties {alias} to {canonical} (tie_word_embeddings), but the checkpoint holds "
                f"different tensors for them ({diff}): the run was trained on a model that does not tie them; "
                "pass its base model with --base"
            )
    return out


@dataclass
class MergePlan:
    """What to do to each base tensor: add a LoRA delta, replace it, or copy it."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    replace: dict[str, torch.Tensor]
    scale: float


def plan_merge(trained: dict[str, torch.Tensor], cfg: Config) -> MergePlan:
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    for name, t in trained.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{ADAPTER_NAME}.weight"
            if name.endswith(marker):
                lora.setdefault(name[: -len(marker)] + ".weight", {})[part] = t
                break
        else:
            replace[name.replace(".base_layer.", ".")] = t
    pairs = {}
    for key, ab in lora.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExportError(f"checkpoint has only {sorted(ab)} for {key}; the checkpoint is damaged")
        pairs[key] = (ab["lora_A"], ab["lora_B"])
    return MergePlan(pairs, replace, lora_scale(cfg.lora) if cfg.lora.enabled else 1.0)


def iter_base_tensors(base_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a local HF model directory, one at a time (safetensors; legacy .bin whole)."""
    from safetensors import safe_open

    files = sorted(base_dir.glob("*.safetensors"))
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        return
    bins = sorted(base_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise ExportError(f"base model {base_dir} has no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
        for key, t in torch.load(f, map_location="cpu", weights_only=True).items():
            yield key, t


def merged_tensors(base_dir: Path, plan: MergePlan, dtype: torch.dtype | None,
                   aliases: dict[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Base tensors with the plan applied, checking that every trained tensor found its base tensor.

    ``aliases`` (from ``tied_aliases``): base tensors stored under a tied alias (some checkpoints keep
    ``lm_head.weight`` beside a tied embedding) are left out; the model reloads them tied.
    """
    pending = set(plan.lora) | set(plan.replace)
    aliases = aliases or {}
    for key, t in iter_base_tensors(base_dir):
        if key in aliases:
            continue
        out_dtype = dtype or t.dtype
        if key in plan.lora:
            a, b = plan.lora[key]
            if t.shape != (b.shape[0], a.shape[1]):
                raise ExportError(f"base tensor {key} has shape {tuple(t.shape)} but the LoRA delta is "
                                  f"{(b.shape[0], a.shape[1])}: the base model does not match the run")
            t = merge_lora_weight(t.float(), a, b, plan.scale)
        elif key in plan.replace:
            new = plan.replace[key]
            if new.shape != t.shape:
                raise ExportError(f"base tensor {key} has shape {tuple(t.shape)}, trained {tuple(new.shape)}: "
                                  "the base model does not match the run")
            t = new
        pending.discard(key)
        yield key, t.to(out_dtype).contiguous()
    if pending:
        raise ExportError(f"trained tensors {sorted(pending)[:5]} have no counterpart in the base model {base_dir}: "
                          "the base model does not match the run (pass the right one with --base)")


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> None:
    """Stream tensors into safetensors shards of at most ``max_shard_bytes`` plus the HF index."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            shards.append(list(buf))
            save_file(buf, str(out_dir / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            buf, size = {}, 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
        buf[key] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    if n == 1:
        os.replace(out_dir / "shard-00001.tmp", out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / f"shard-{i:05d}.tmp", out_dir / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _copy_tokenizer(rc: RunCheckpoint, base_dir: Path, out_dir: Path) -> None:
    found = [f for f in TOKENIZER_FILES if (base_dir / f).is_file()]
    for f in found:
        shutil.copy2(base_dir / f, out_dir / f)
    if not found and rc.cfg.model.tokenizer:
        from megalong.data.tokenizer import save_hf_tokenizer

        save_hf_tokenizer(rc.cfg.model.tokenizer, out_dir)


def export_config(rc: RunCheckpoint, base_dir: Path, out_dir: Path, dtype: torch.dtype | None,
                  hf_cfg=None) -> None:
    """config.json (the base's, tie_word_embeddings included, with the run's RoPE) + generation config."""
    from transformers import GenerationConfig

    if hf_cfg is None:
        hf_cfg, _ = base_hf_config(rc.cfg, base_dir)
    if dtype is not None:
        hf_cfg.dtype = dtype
    write_config_json(hf_cfg, out_dir)
    try:
        GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(out_dir))
    except Exception as e:  # a missing generation config must not sink an otherwise good export
        log.warning("could not write generation_config.json: %s", e)


def _staging(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new --output or remove it")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def export_hf(run_dir: str | Path, out_dir: str | Path, *, tag: str = "latest", base: str | None = None,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write a merged HF model directory for a run's checkpoint (see module docstring)."""
    rc = open_checkpoint(run_dir, tag)
    base_dir = Path(base) if base else rc.base_dir
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"base model directory {base_dir} (recorded in the run) is missing; pass --base DIR")
    out_dir = Path(out_dir)
    tmp = _staging(out_dir)
    try:
        hf_cfg, _ = base_hf_config(rc.cfg, base_dir)
        aliases = tied_aliases(hf_cfg, rc.cfg.model.trust_remote_code)
        plan = plan_merge(fold_tied(trained_tensors(rc), aliases), rc.cfg)
        write_shards(merged_tensors(base_dir, plan, dtype, aliases), tmp, max_shard_bytes)
        export_config(rc, base_dir, tmp, dtype, hf_cfg)
        _copy_tokenizer(rc, base_dir, tmp)
        (tmp / "megalong_export.json").write_text(json.dumps(
            {"run_dir": str(rc.run_dir), "tag": rc.tag, "step": rc.meta["step"], "base_model_dir": str(base_dir),
             "code_version": ckpt.code_version()}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out_dir)
    return out_dir


def export_adapter(run_dir: str | Path, out_dir: str | Path, *, tag: str = "latest", base: str | None = None) -> Path:
    """Write a PEFT adapter directory (LoRA + embed/norm as modules_to_save) for a LoRA+ run.

    The adapter alone does not change RoPE, so the directory also holds ``config.json``: the base's
    config with the run's scaling. Load the base with it, then the adapter::

        cfg = AutoConfig.from_pretrained(adapter_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, config=cfg)
        model = PeftModel.from_pretrained(base, adapter_dir)
    """
    from megalong.lora import apply_lora_plus, export_peft_adapter
    from megalong.models import create_model

    rc = open_checkpoint(run_dir, tag)
    if not rc.cfg.lora.enabled:
        raise ConfigError("this run is a full fine-tune (lora.enabled=false): export a model, not an adapter")
    base_dir = Path(base) if base else rc.base_dir
    out_dir = Path(out_dir)
    tmp = _staging(out_dir)
    try:
        hf_cfg = build_hf_config(type(rc.cfg.model)(name_or_path=str(base_dir)))
        with torch.device("meta"):
            skeleton = apply_lora_plus(create_model(hf_cfg), rc.cfg.lora)
        aliases = tied_aliases(hf_cfg, model=skeleton)
        known = {n for n, p in skeleton.named_parameters()}
        state = {}
        for name, t in fold_tied(trained_tensors(rc), aliases).items():
            key = _PEFT_PREFIX + name
            if key not in known:
                raise ExportError(f"trained tensor {name} has no place in a LoRA+ model of {base_dir}: "
                                  "the base model does not match the run")
            state[key] = t
        export_peft_adapter(skeleton, state, rc.cfg.lora, tmp, base_model_name_or_path=str(base_dir))
        export_config(rc, base_dir, tmp, None)  # the base's config with the run's RoPE scaling
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out_dir)
    return out_dir
