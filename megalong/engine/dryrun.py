"""Dry run: validate a recipe for a given cluster without allocating a single weight.

    recipe ──► base model config (local dir, model.init_config, or the model.arch fallback)
           ──► RoPE scaling ──► model + LoRA+ on the meta device (exact trainable / frozen counts)
           ──► run checks for world = nodes × gpus_per_node (megalong.engine.checks: exactly the
               checks Trainer.setup raises on) ──► DeepSpeed JSON (for the accelerator) + batch
           ──► memory plan (megalong.utils.memory) ──► DryRunReport: render() / summary() / fits

Every problem found is collected as a check (``ok`` / ``warn`` / ``error``) instead of stopping at
the first one, so a user sees all of them in one go. Any error means the trainer would refuse the
recipe at start-up (verdict INVALID, exit 1). ``fits`` is true only with no errors and a memory plan
that fits both the GPUs and the hosts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megalong.config.deepspeed import BatchArithmetic, batch_arithmetic, render_deepspeed_config
from megalong.config.schema import Config, ConfigError
from megalong.utils.memory import (
    MemoryEstimate,
    MemoryInputs,
    ModelShape,
    ParamCounts,
    estimate_memory,
    suggest,
)
from megalong.utils.model_shapes import known_arch_config


@dataclass(frozen=True)
class Check:
    level: str
    """``ok``, ``warn`` or ``error``."""
    what: str
    message: str


@dataclass
class DryRunReport:
    """What a dry run found: the resolved model, counts, layout, DeepSpeed JSON, checks and memory plan."""

    nodes: int
    gpus_per_node: int
    sp: int
    model_source: str = ""
    hf_summary: dict = field(default_factory=dict)
    rope: dict | None = None
    counts: ParamCounts | None = None
    batch: BatchArithmetic | None = None
    seq_len: int = 0
    ds_config: dict | None = None
    estimate: MemoryEstimate | None = None
    suggestions: list[tuple[str, MemoryEstimate]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    accelerator: str = "cuda"
    lora_targets: list[str] | None = None
    """The modules LoRA adapts in this model (``lora.targets`` resolved; None without LoRA)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def errors(self) -> list[str]:
        return [f"{c.what}: {c.message}" for c in self.checks if c.level == "error"]

    @property
    def fits(self) -> bool:
        return not self.errors and self.estimate is not None and self.estimate.fits

    def add(self, level: str, what: str, message: str) -> None:
        self.checks.append(Check(level, what, message))

    def summary(self) -> dict:
        """A JSON-able dict of everything in the report."""
        est = self.estimate
        return {
            "nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "world": self.world, "sp": self.sp,
            "dp": self.world // self.sp if self.world % self.sp == 0 else None,
            "model_source": self.model_source, "model": self.hf_summary, "rope": self.rope,
            "lora_targets": self.lora_targets,
            "params": None if self.counts is None else {
                "total": self.counts.total, "trainable": self.counts.trainable,
                "frozen": self.counts.total - self.counts.trainable,
            },
            "batch": None if self.batch is None else {
                "micro_batch": self.batch.micro_batch, "grad_accum": self.batch.grad_accum, "dp": self.batch.dp,
                "train_batch": self.batch.train_batch, "tokens_per_step": self.batch.train_batch * self.seq_len,
            },
            "deepspeed": self.ds_config,
            "checks": [{"level": c.level, "what": c.what, "message": c.message} for c in self.checks],
            "errors": self.errors,
            "memory": None if est is None else est.to_dict(),
            "suggestions": [{"change": name, "gpu_peak_gib": round(e.gpu_peak / 2**30, 2),
                             "host_per_node_gib": round(e.host_per_node / 2**30, 2)} for name, e in self.suggestions],
            "fits": self.fits,
        }

    def render(self) -> str:
        """The report as text: model, parameters, batch, DeepSpeed JSON, checks, memory plan, verdict."""
        lines = [f"megalong dry run on {self.nodes} node(s) × {self.gpus_per_node} GPUs "
                 f"(world {self.world}, sp {self.sp})", ""]
        if self.model_source:
            lines.append(f"model: {self.model_source}")
        if self.hf_summary:
            s = self.hf_summary
            lines.append(f"  {s['model_type']}: hidden {s['hidden_size']}, {s['layers']} layers, {s['heads']} heads "
                         f"({s['kv_heads']} KV), vocab {s['vocab_size']}, context {s['max_position_embeddings']}")
        if self.rope:
            lines.append(f"  RoPE {self.rope['type']} ×{self.rope['factor']:g}: {self.rope['original_length']} -> "
                         f"{self.rope['target_length']} tokens, θ {self.rope['theta']:g}")
        if self.counts:
            c = self.counts
            lines.append(f"parameters (meta device): {c.total:,} total, {c.trainable:,} trainable "
                         f"({100 * c.trainable / c.total:.2f}%), {c.total - c.trainable:,} frozen")
        if self.batch:
            b = self.batch
            lines.append(f"batch: micro {b.micro_batch} × grad_accum {b.grad_accum} × dp {b.dp} = {b.train_batch} rows "
                         f"of {self.seq_len} tokens = {b.train_batch * self.seq_len:,} tokens per step")
        if self.ds_config is not None:
            lines += ["", f"DeepSpeed JSON (accelerator {self.accelerator}):",
                      json.dumps(self.ds_config, indent=2, sort_keys=True)]
        lines += ["", "checks:"] + [f"  {c.level:<5} {c.what}: {c.message}" for c in self.checks]
        if self.estimate is not None:
            lines += ["", "memory plan:", self.estimate.render()]
        if self.suggestions:
            lines += ["", "would fit with:"] + [
                f"  {name}: GPU {e.gpu_peak / 2**30:.1f} GiB, host {e.host_per_node / 2**30:.0f} GiB per node"
                for name, e in self.suggestions]
        verdict = "FITS" if self.fits else (f"INVALID ({len(self.errors)} error(s))" if self.errors else "DOES NOT FIT")
        lines += ["", f"dry run verdict: {verdict}"]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ steps
def resolve_hf_config(cfg: Config, report: DryRunReport) -> Any | None:
    """The base model's HF config: init_config, a local directory, or the model.arch fallback."""
    from megalong.models import build_hf_config

    m = cfg.model
    if m.init_config is not None:
        report.model_source = f"built from model.init_config ({m.init_config.get('model_type')})"
        return build_hf_config(m)
    path = Path(m.name_or_path)
    if (path / "config.json").is_file():
        hf = build_hf_config(m)
        report.model_source = f"{path} (config.json)"
        if m.arch is not None:
            _compare_arch(hf, m.arch, report)
        return hf
    if m.arch is None:
        report.add("error", "model", f"model.name_or_path={m.name_or_path!r} is not a model directory on this machine "
                   "and model.arch is unset; set model.arch (e.g. llama2-70b) so the dry run can use the published "
                   "architecture, or run it where the directory exists")
        return None
    report.model_source = f"{m.arch} architecture (model.arch; {m.name_or_path} is not on this machine)"
    report.add("ok", "model", f"{m.name_or_path} not found here: planning with the published {m.arch} architecture")
    return known_arch_config(m.arch)


def _compare_arch(hf: Any, arch: str, report: DryRunReport) -> None:
    ref = known_arch_config(arch)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    diff = [f"{k} {getattr(hf, k)} vs {getattr(ref, k)}" for k in keys if getattr(hf, k) != getattr(ref, k)]
    if diff:
        report.add("warn", "model.arch", f"the directory's config differs from {arch}: {', '.join(diff)}; "
                   "the directory wins (fix or drop model.arch)")


def meta_training_model(hf_config: Any, cfg: Config) -> Any:
    """The training model (base + LoRA+) on the meta device: structure and counts, no memory."""
    import torch

    from megalong.lora import apply_lora_plus
    from megalong.models import DTYPES, create_model

    with torch.device("meta"):
        model = create_model(hf_config, dtype=DTYPES[cfg.train.dtype], seed=cfg.train.seed)
        return apply_lora_plus(model, cfg.lora)


def meta_param_counts(hf_config: Any, cfg: Config, persistence_threshold: int, model: Any = None) -> ParamCounts:
    """Exact counts of the training model (base + LoRA+), built on the meta device: no memory used."""
    from megalong.lora import count_parameters

    model = model if model is not None else meta_training_model(hf_config, cfg)
    trainable, total = count_parameters(model)
    largest = largest_train = persistent = 0
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        largest = max(largest, sum(p.numel() for p in own))
        largest_train = max(largest_train, sum(p.numel() for p in own if p.requires_grad))
        persistent += sum(p.numel() for p in own if p.numel() < persistence_threshold)
    return ParamCounts(total, trainable, largest, largest_train, persistent)


def _hf_summary(hf: Any) -> dict:
    heads = int(hf.num_attention_heads)
    return {
        "model_type": hf.model_type, "hidden_size": int(hf.hidden_size), "layers": int(hf.num_hidden_layers),
        "heads": heads, "kv_heads": int(getattr(hf, "num_key_value_heads", None) or heads),
        "intermediate_size": int(hf.intermediate_size), "vocab_size": int(hf.vocab_size),
        "max_position_embeddings": int(hf.max_position_embeddings),
    }


def run_recipe_checks(cfg: Config, report: DryRunReport, hf: Any | None, accelerator: str) -> int | None:
    """The trainer's own start-up checks (megalong.engine.checks) for this cluster, plus the batch and
    DeepSpeed JSON the memory plan needs; returns the data-parallel size, or None if the layout is invalid."""
    from megalong.engine import checks

    world, sp = report.world, cfg.parallel.sp
    if hf is None:  # the model could not be resolved (already reported): the checks that need no model
        findings = checks.check_layout(cfg, world) + checks.check_batch(cfg, world)
    else:
        vocab, name = _tokenizer_vocab(cfg)
        findings = checks.run_checks(cfg, hf, world, accelerator, vocab, name)
    for f in findings:
        msg = f.message
        if f.what == "parallel" and f.level == "error" and "world size" in msg:
            msg += f" (world = {report.nodes} node(s) × {report.gpus_per_node} GPUs)"
        report.add(f.level, f.what, msg)
    if world % sp:
        return None
    dp = world // sp
    try:
        report.batch = batch_arithmetic(cfg, dp)
        report.ds_config = render_deepspeed_config(cfg, dp, accelerator=accelerator)
        report.accelerator = accelerator
    except ConfigError:
        pass  # reported by checks.check_batch
    missing = [p for p in cfg.data.prefixes if not Path(p + ".idx").is_file()]
    if missing:
        report.add("warn", "data", f"{len(missing)} data prefix(es) not on this machine (e.g. {missing[0]}); "
                   "fine for a dry run elsewhere, the run itself checks them")
    return dp


def _tokenizer_vocab(cfg: Config) -> tuple[int | None, str]:
    """The run's tokenizer vocabulary size when the tokenizer is on this machine (else None)."""
    spec = cfg.model.tokenizer or cfg.model.name_or_path
    if spec is None or not Path(spec).exists():
        return None, str(spec)
    from megalong.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except Exception:  # not a tokenizer (e.g. a model dir without one): the run itself will say so
        return None, str(spec)
    return tok.vocab_size, tok.name


def memory_inputs(cfg: Config, report: DryRunReport, hf: Any, gpu_memory_gb: float,
                  host_memory_gb: float, accelerator: str = "cuda") -> MemoryInputs:
    """The estimator's inputs for this recipe on this cluster (bucket sizes from the rendered JSON).

    ``accelerator="cpu"`` plans DeepSpeed's CPU accelerator: ``gpus_per_node`` ranks per node, whose
    memory is the host's (no CUDA context, torch AdamW, the process itself counted per rank).
    """
    zo = (report.ds_config or {}).get("zero_optimization", {})
    t = cfg.train
    return MemoryInputs(
        model=ModelShape.from_hf_config(hf, name=cfg.model.arch or hf.model_type),
        seq_len=cfg.data.max_seq_len, micro_batch=t.micro_batch_size,
        gpus_per_node=report.gpus_per_node, nodes=report.nodes, sp=cfg.parallel.sp, sp_mode=cfg.parallel.sp_mode,
        zero_stage=cfg.zero.stage, offload_optimizer=cfg.zero.offload_optimizer, offload_param=cfg.zero.offload_param,
        zero_init=cfg.model.zero_init,
        activation_checkpointing="none" if t.activation_checkpointing == "none" else "layer",
        cpu_checkpointing=t.cpu_checkpointing, offload_activations=t.offload_activations,
        tiled_mlp=t.tiled_mlp, tiled_mlp_shards=t.tiled_mlp_shards,
        # short attention holds the same groups as S²-Attn: the same memory
        attention="full" if (cfg.attention.backend == "reference" or cfg.attention.train == "full"
                             or cfg.attention.full_last_steps) else "s2",  # full_last_steps: the peak is full's
        group_size=cfg.group_size,
        attention_kernel="eager" if cfg.attention.backend == "reference" else "flash",
        dtype=t.dtype, lora=cfg.lora.enabled, lora_r=cfg.lora.r, lora_targets=tuple(cfg.lora.targets),
        lora_trainable=tuple(cfg.lora.trainable), loss_chunk=t.loss_chunk_size,
        reduce_bucket_size=int(zo.get("reduce_bucket_size", 200_000_000)),
        prefetch_bucket_size=int(zo.get("stage3_prefetch_bucket_size", 50_000_000)),
        param_persistence_threshold=int(zo.get("stage3_param_persistence_threshold", 100_000)),
        max_reuse_distance=int(zo.get("stage3_max_reuse_distance", 1_000_000_000)),
        max_live_parameters=int(zo.get("stage3_max_live_parameters", 1_000_000_000)),
        overlap_comm=bool(zo.get("overlap_comm", True)),
        accelerator=accelerator, gpu_memory_gb=gpu_memory_gb, host_memory_gb=host_memory_gb, counts=report.counts,
    )


# ------------------------------------------------------------------------------------------ entry
def dry_run(cfg: Config, nodes: int = 1, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0,
            host_memory_gb: float = 1024.0, accelerator: str = "cuda") -> DryRunReport:
    """Validate ``cfg`` for ``nodes`` × ``gpus_per_node`` GPUs and plan its memory, allocating no weights.

    Args:
        cfg: a validated recipe (megalong.config.load_config).
        nodes: number of nodes.
        gpus_per_node: GPUs per node (the world size is nodes × gpus_per_node).
        gpu_memory_gb: memory per GPU in GiB (an A100-80G has 80).
        host_memory_gb: host memory per node in GiB.
        accelerator: ``cuda`` (GPUs) or ``cpu`` (``gpus_per_node`` CPU ranks per node sharing the host's
            memory; ``gpu_memory_gb`` is then unused).
    """
    report = DryRunReport(nodes=nodes, gpus_per_node=gpus_per_node, sp=cfg.parallel.sp)
    if nodes < 1 or gpus_per_node < 1:
        report.add("error", "cluster", f"nodes={nodes} and gpus_per_node={gpus_per_node} must be >= 1")
        return report
    report.seq_len = cfg.data.max_seq_len
    hf = _resolve_with_rope(cfg, report)
    dp = run_recipe_checks(cfg, report, hf, accelerator)
    if hf is not None:
        _count_params(cfg, report, hf)
    if hf is None or dp is None or report.counts is None or report.ds_config is None:
        return report
    try:
        inputs = memory_inputs(cfg, report, hf, gpu_memory_gb, host_memory_gb, accelerator)
    except ValueError as e:
        if not report.errors:  # otherwise the same problem was already reported by the run checks
            report.add("error", "memory", str(e))
        return report
    report.estimate = estimate_memory(inputs)
    if not report.estimate.fits:
        report.suggestions = suggest(inputs)
    return report


def _resolve_with_rope(cfg: Config, report: DryRunReport) -> Any | None:
    """The base model's config with the recipe's RoPE scaling applied (None after an error)."""
    from megalong.models import apply_rope_scaling, plan_rope_scaling

    try:
        hf = resolve_hf_config(cfg, report)
        if hf is None:
            return None
        scaling = plan_rope_scaling(hf, cfg.rope, cfg.rope_target_length)
        apply_rope_scaling(hf, scaling)
    except ConfigError as e:
        report.add("error", "model", str(e))
        return None
    report.rope = scaling.to_dict() if scaling is not None else None
    report.hf_summary = _hf_summary(hf)
    return hf


def _count_params(cfg: Config, report: DryRunReport, hf: Any) -> None:
    """Exact trainable / frozen counts from the meta-device model (LoRA targets are checked here)."""
    from megalong.lora import resolve_lora_targets

    zo = (report.ds_config or {}).get("zero_optimization", {})
    try:
        model = meta_training_model(hf, cfg)
        report.counts = meta_param_counts(hf, cfg, int(zo.get("stage3_param_persistence_threshold", 100_000)), model)
    except ConfigError as e:
        report.add("error", "lora", str(e))
        return
    c = report.counts
    report.add("ok", "parameters", f"{c.trainable:,} of {c.total:,} train ({'LoRA+' if cfg.lora.enabled else 'full'})")
    if cfg.lora.enabled:  # the module names the adapters go on (fused projections: Phi-3's qkv_proj)
        targets = resolve_lora_targets(model, cfg.lora.targets)
        report.lora_targets = list(targets.resolved)
        report.add("warn" if targets.also_covers else "ok", "lora", f"LoRA targets: {targets.describe()}")
