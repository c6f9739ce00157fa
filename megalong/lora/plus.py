"""LoRA+ (LongLoRA): low-rank adapters on the attention projections, plus trainable
embeddings and normalisation layers — without those, LoRA does not learn long context.

    W x  ──────────────────────────────►(+)──► y        W frozen (d_out × d_in)
    x ──► A (r × d_in) ──► B (d_out × r) ─┘ × α/r      A, B trained; B starts at 0
    embed_tokens, *norm (and optionally lm_head): trained in full, in place

Training marks the embed/norm parameters of the base model trainable directly (no
``modules_to_save`` copies, so a 70B embedding is not duplicated). Exports restate them in
peft's terms: the adapter directory lists them in ``modules_to_save`` so stock peft loads it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megalong.config.schema import ConfigError, LoraConfig
from megalong.models.families import FUSED_PROJECTIONS
from megalong.models.loading import unwrap_peft

ADAPTER_NAME = "default"
log = logging.getLogger("megalong")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def trainable_module_names(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Qualified names (in ``model``) of the modules trained in full: embed, norms, lm_head."""
    base = unwrap_peft(model)
    wanted: list[nn.Module] = []
    parts = set(parts)
    if "embed" in parts:
        wanted.append(base.get_input_embeddings())
    if "lm_head" in parts:
        head = base.get_output_embeddings()
        if head is not None:
            wanted.append(head)
    ids = {id(m) for m in wanted}
    names = []
    for name, module in model.named_modules():
        if id(module) in ids or ("norm" in parts and _is_norm(module)):
            names.append(name)
    return names


@dataclass(frozen=True)
class LoraTargets:
    """``lora.targets`` as asked, and the module names of this model they resolve to."""

    asked: tuple[str, ...]
    resolved: tuple[str, ...]
    notes: tuple[str, ...] = ()
    """How a fused projection was chosen, and what it adapts beyond what was asked."""
    also_covers: tuple[str, ...] = ()
    """Projections not asked for that a fused adapter adapts too (q_proj alone -> qkv_proj covers k, v)."""

    def describe(self) -> str:
        text = ", ".join(self.resolved)
        if self.resolved != self.asked:
            text = f"{', '.join(self.asked)} -> {text}"
        return text + (f" ({'; '.join(self.notes)})" if self.notes else "")


def resolve_lora_targets(model: nn.Module, targets: Iterable[str]) -> LoraTargets:
    """Map ``lora.targets`` onto the modules of ``model``.

    A name the model has is kept. A name it lacks that is part of a fused projection the model has
    (Phi-3: q_proj, k_proj, v_proj -> qkv_proj; gate_proj, up_proj -> gate_up_proj) becomes the fused
    module, once; if not every part was asked, the note says which parts the fused adapter also covers.
    Any other name is an error that lists the projections the model does have.
    """
    asked = tuple(targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    resolved: list[str] = []
    notes: list[str] = []
    also: list[str] = []
    missing = []
    for t in asked:
        fused = next((f for f, parts in FUSED_PROJECTIONS.items() if t in parts and f in present), None)
        if t in present:
            name = t
        elif fused is not None:
            name = fused
        else:
            missing.append(t)
            continue
        if name not in resolved:
            resolved.append(name)
    for fused in resolved:
        parts = FUSED_PROJECTIONS.get(fused, ())
        mapped = [t for t in asked if t in parts and t not in present]
        if mapped:
            extra = [p for p in parts if p not in asked]
            also += extra
            notes.append(f"{type(unwrap_peft(model)).__name__} fuses {'/'.join(parts)} into {fused}"
                         + (f": its adapter also covers {', '.join(extra)}" if extra else ""))
    if missing:
        raise ConfigError(
            f"lora.targets {missing} match no module of {type(model).__name__}; "
            f"projections here are named {sorted(n for n in present if n.endswith('_proj'))}"
        )
    return LoraTargets(asked, tuple(resolved), tuple(notes), tuple(also))


def apply_lora_plus(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA and make embeddings/norms trainable; returns the peft model.

    With ``cfg.enabled`` false, every parameter is trained (full fine-tuning) and ``model`` is returned.
    """
    if not cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = resolve_lora_targets(model, cfg.targets)
    if targets.resolved != targets.asked:
        log.info("LoRA targets: %s", targets.describe())
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets.resolved), bias="none"
    )
    pmodel = get_peft_model(model, peft_cfg, adapter_name=ADAPTER_NAME)
    names = set(trainable_module_names(pmodel, cfg.trainable))
    for name, module in pmodel.named_modules():
        if name in names:
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    return pmodel


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; counts ZeRO-3 partitioned parameters by their full size."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_state_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


_LORA_KEY = re.compile(r"\.(lora_[AB]|lora_embedding_[AB])\." + ADAPTER_NAME + r"(\.weight)?$")


def to_peft_adapter_key(name: str) -> str:
    """Training name -> the key peft writes in adapter_model.safetensors (adapter name dropped)."""
    return _LORA_KEY.sub(lambda m: "." + m.group(1) + (m.group(2) or ""), name)


def embeddings_tied(model: nn.Module) -> bool:
    """True when the output head's weight *is* the input embedding's (``tie_word_embeddings``)."""
    base = unwrap_peft(model)
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _short_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def modules_to_save_for(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Short module names for peft's ``modules_to_save`` (matched by suffix of the module path).

    With tied embeddings, training either one trains both: peft keeps a copy per listed module,
    so both the embedding and the head are listed (and loaded with the same tensor).
    """
    parts = set(parts)
    names = trainable_module_names(model, parts)
    short = {n.rsplit(".", 1)[-1] for n in names}
    if parts & {"embed", "lm_head"} and embeddings_tied(model):
        base = unwrap_peft(model)
        short |= {_short_name(model, base.get_input_embeddings()), _short_name(model, base.get_output_embeddings())}
    return sorted(short)


def export_peft_adapter(
    model: nn.Module,
    trainable_state: dict[str, torch.Tensor],
    cfg: LoraConfig,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT adapter directory that stock ``PeftModel.from_pretrained`` loads.

    Args:
        model: the training model (peft-wrapped); used for structure only (may be on the meta device).
        trainable_state: full tensors of the trainable parameters, keyed by their names in ``model``.
        cfg: the LoRA config used for training.
        out_dir: where adapter_config.json and adapter_model.safetensors go.
        base_model_name_or_path: recorded in the adapter config.
    """
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    if not cfg.enabled:
        raise ConfigError("lora.enabled is false (full fine-tune): there is no adapter to export; export a model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules_to_save = modules_to_save_for(model, cfg.trainable)
    tied = embeddings_tied(model) and bool(set(cfg.trainable) & {"embed", "lm_head"})
    extra = {}
    if tied and "ensure_weight_tying" in getattr(PeftLoraConfig, "__dataclass_fields__", {}):
        extra["ensure_weight_tying"] = True  # peft keeps its two copies tied (merge_and_unload stays tied)
    targets = resolve_lora_targets(model, cfg.targets).resolved  # the names stock peft must find (fused ones)
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets), bias="none",
        modules_to_save=modules_to_save or None, base_model_name_or_path=base_model_name_or_path, **extra,
    )
    peft_cfg.save_pretrained(str(out_dir))
    tensors = {to_peft_adapter_key(k): v.detach().to("cpu").contiguous().clone() for k, v in trainable_state.items()}
    if tied:  # one trained tensor, stored under both names: peft loads each module's copy by its own name
        embed_key, head_key = _tied_state_keys(model)
        present = [k for k in (embed_key, head_key) if k in tensors]
        if not present:
            raise ValueError(f"trainable_state holds neither {embed_key} nor {head_key} of the tied embedding")
        for k in (embed_key, head_key):
            tensors.setdefault(k, tensors[present[0]].clone())
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _tied_state_keys(model: nn.Module) -> tuple[str, str]:
    """State keys of the input embedding's and the output head's weight, as names in ``model``."""
    base = unwrap_peft(model)
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    mods = {id(m): n for n, m in model.named_modules()}
    return mods[id(embed)] + ".weight", mods[id(head)] + ".weight"


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def lora_scale(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.r


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale · B @ A in fp32, returned in W's dtype (for streaming conversion shard by shard)."""
    merged = weight.float() + scale * (lora_b.float() @ lora_a.float())
    return merged.to(weight.dtype)
