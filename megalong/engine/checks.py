"""Run checks: every check that needs the config *and* the model, in one place.

    recipe (validated tree) + base HF config (RoPE applied) + world size + accelerator (+ tokenizer)
        └─ run_checks() ─► [Finding(level, what, message), ...]
              ├─ Trainer.setup:  raise_on_errors(findings)   (before any weight is built)
              └─ --dry-run:      the same findings in the report; any error -> verdict INVALID, exit 1

Checks that need one config section only live in that section's ``__post_init__``
(megalong.config.schema); checks that need data files or checkpoints live where those are read.
Whatever depends on the recipe together with the model, the cluster layout or the accelerator
is here, so the dry run and the trainer can never disagree about a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megalong.config.deepspeed import batch_arithmetic, render_deepspeed_config
from megalong.config.schema import Config, ConfigError

LEVELS = ("ok", "warn", "error")


@dataclass(frozen=True)
class Finding:
    """One result of a run check."""

    level: str
    """``ok``, ``warn`` or ``error``."""
    what: str
    """The area: ``parallel``, ``batch``, ``attention``, ``rope``, ``model``, ``tokenizer``."""
    message: str
    """What was found and, for warnings and errors, what to do."""


def _heads(hf: Any) -> tuple[int, int]:
    heads = int(hf.num_attention_heads)
    return heads, int(getattr(hf, "num_key_value_heads", None) or heads)


def check_layout(cfg: Config, world: int) -> list[Finding]:
    """world = dp × sp, and the sequence length splits over sp."""
    sp = cfg.parallel.sp
    if world < 1:
        return [Finding("error", "parallel", f"world size {world} must be >= 1")]
    if world % sp:
        options = [d for d in range(1, world + 1) if world % d == 0]
        return [Finding("error", "parallel", f"parallel.sp={sp} does not divide the world size {world}; "
                                             f"use one of {options}")]
    out = []
    if sp > 1:
        if cfg.attention.train == "short":
            out.append(Finding("error", "parallel", "attention.train=short (the pilot-study baseline) is not built "
                                                    "for sequence parallelism; use parallel.sp=1"))
        n = cfg.data.max_seq_len
        if n % sp:
            out.append(Finding("error", "parallel", f"parallel.sp={sp} does not divide data.max_seq_len={n}; use a "
                                                    f"length that is a multiple of {sp} (e.g. {n - n % sp})"))
    if not any(f.level == "error" for f in out):
        out.append(Finding("ok", "parallel", f"world {world} = dp {world // sp} × sp {sp}"
                                             + (f" ({cfg.parallel.sp_mode}, {cfg.data.max_seq_len // sp} tokens "
                                                "per rank)" if sp > 1 else "")))
    return out


def check_heads(cfg: Config, hf: Any) -> list[Finding]:
    """Heads against Ulysses' head split (H % H_kv itself is checked when the config is read).

    Ulysses gives every rank H/sp query heads; KV heads are split the same way, or, with fewer KV
    heads than ranks, DeepSpeed repeats each to sp/H_kv ranks (sp must then be a multiple of H_kv)."""
    heads, kv = _heads(hf)
    sp = cfg.parallel.sp
    if sp <= 1 or cfg.parallel.sp_mode != "ulysses":
        return []
    out = []
    if heads % sp:
        ok = [d for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        out.append(Finding("error", "parallel", f"parallel.sp={sp} does not divide the {heads} attention heads "
                                                f"(Ulysses gives each rank H/sp heads); use parallel.sp in {ok} or "
                                                "parallel.sp_mode=s2_halo"))
    elif kv % sp and sp % kv:
        ok = [d for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        out.append(Finding("error", "parallel", f"parallel.sp={sp} and the {kv} KV heads do not divide one another "
                                                f"(Ulysses splits or repeats KV heads); use parallel.sp in {ok} or "
                                                "parallel.sp_mode=s2_halo"))
    return out


def check_batch(cfg: Config, world: int) -> list[Finding]:
    """The batch arithmetic and the DeepSpeed JSON it is rendered into (template found and valid)."""
    if world % cfg.parallel.sp:
        return []  # reported by check_layout
    dp = world // cfg.parallel.sp
    try:
        b = batch_arithmetic(cfg, dp)
        render_deepspeed_config(cfg, dp, accelerator="cuda")
    except ConfigError as e:
        return [Finding("error", "deepspeed", str(e))]
    return [Finding("ok", "batch", f"train_batch {b.train_batch} = micro {b.micro_batch} × "
                                   f"accum {b.grad_accum} × dp {dp}")]


def check_attention(cfg: Config, hf: Any, accelerator: str) -> list[Finding]:
    """S²-Attn groups against the model's sliding window; kernels against the accelerator."""
    from megalong.models.families import sliding_window_of

    out = []
    window = sliding_window_of(hf)
    grouped = cfg.attention.train in ("s2", "short") or cfg.attention.eval == "s2"
    if window is not None and grouped and cfg.group_size > window:
        out.append(Finding("error", "attention",
                           f"{hf.model_type} has sliding_window={window} but the S²-Attn group size is "
                           f"{cfg.group_size}: a group would reach past the window; set attention.group_size <= "
                           f"{window} (or a smaller attention.group_size_ratio)"))
    if cfg.attention.backend == "flash":
        if accelerator == "cpu":
            out.append(Finding("error", "attention", "attention.backend=flash needs CUDA GPUs (flash-attn); on CPU "
                                                     "use attention.backend=sdpa"))
        else:
            out.append(Finding("ok", "attention", "backend=flash: the GPU nodes need flash-attn installed"))
    if cfg.attention.backend == "reference":
        out.append(Finding("warn", "attention", "backend=reference materialises N×N masks (tests only); "
                                                "use sdpa or flash"))
    return out


def check_flash_dtype(cfg: Config) -> list[Finding]:
    """flash-attn has fp16/bf16 kernels only: an fp32 run would fail at its first forward."""
    if cfg.attention.backend != "flash" or cfg.train.dtype != "fp32":
        return []
    return [Finding("error", "attention", "attention.backend=flash runs in fp16/bf16 only (flash-attn has no fp32 "
                                          "kernels) but train.dtype=fp32: set train.dtype=bf16, or "
                                          "attention.backend=sdpa to train in fp32")]


BF16_EMULATED_SLOWDOWN = 11.7
"""bf16 step time / fp32 step time measured on a CPU without bf16 units (docs/BENCHMARKS.md, "CPU
training: fp32 vs bf16"; tools/bench_memory.py --dtypes fp32 bf16)."""


def check_cpu_dtype(cfg: Config, accelerator: str, cpuinfo: str | None = None) -> list[Finding]:
    """bf16/fp16 on a CPU without bf16 matrix units is emulated: slower than fp32, say so with the fix."""
    from megalong.utils.cpu_runtime import cpu_bf16_native

    if accelerator != "cpu" or cfg.train.dtype == "fp32" or cpu_bf16_native(cpuinfo):
        return []
    factor = f" (measured: a bf16 step took {BF16_EMULATED_SLOWDOWN:.1f}× the fp32 step on a 2-core AVX2 box)" \
        if BF16_EMULATED_SLOWDOWN else ""
    return [Finding("warn", "train.dtype", f"train.dtype={cfg.train.dtype} on this CPU, which has no bf16 matrix "
                                           f"instructions (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): PyTorch "
                                           f"emulates it{factor}. Set train.dtype=fp32 (faster here; the memory "
                                           "plan grows by the activations' and weights' second 2 bytes)")]


def _rope_types(hf: Any) -> set[str]:
    """The rope types of a (RoPE-applied) HF config; per layer type where the config nests them."""
    params = getattr(hf, "rope_parameters", None) or {}
    if "rope_type" in params or "type" in params:
        return {params.get("rope_type", params.get("type"))}
    return {v.get("rope_type", v.get("type", "default")) for v in params.values() if isinstance(v, dict)}


def check_rope_sp(cfg: Config, hf: Any) -> list[Finding]:
    """RoPE types that pick their frequencies from the largest position of the forward cannot be split over ranks.

    transformers' ``dynamic`` NTK and ``longrope`` recompute the frequencies from ``max(position_ids) + 1``
    of each forward; under sequence parallelism every rank sees only its slice, so rank 0 (positions
    below L) would rotate with other frequencies than one process over the whole row does."""
    bad = sorted(_rope_types(hf) & {"dynamic", "longrope"})
    if cfg.parallel.sp <= 1 or not bad:
        return []
    return [Finding("error", "rope", f"rope_type={bad[0]} (the run's rope.type or the base model's) derives its "
                                     "frequencies from the longest position each forward sees, and under "
                                     f"parallel.sp={cfg.parallel.sp} each rank sees only its slice of the row: "
                                     "use parallel.sp=1, or rope.type=linear, yarn, llama3 or theta")]


def check_model_features(hf: Any) -> list[Finding]:
    """What the model does that megalong's attention or loss would not reproduce (megalong.models.families),
    and the family's own validation of the config with the run's RoPE scaling (transformers runs it when
    the export saves config.json: a config it rejects would train and then fail to export or load)."""
    from megalong.models.families import rope_hint, unsupported_features

    out = [Finding(level, "model", msg) for level, msg in unsupported_features(hf)]
    validate = getattr(hf, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as e:  # transformers' strict validators raise their own classes
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            out.append(Finding("error", "rope", f"transformers' {type(hf).__name__} rejects this run's config "
                                                f"(rope_parameters={getattr(hf, 'rope_parameters', None)}): {cause}; "
                                                f"{rope_hint(hf)}"))
    return out


def check_vocab(hf: Any, tokenizer_vocab: int | None, tokenizer_name: str = "the tokenizer") -> list[Finding]:
    """Every token id the tokenizer can produce has an embedding row."""
    if tokenizer_vocab is None:
        return [Finding("warn", "tokenizer", "tokenizer not available here: its vocabulary was not checked")]
    if int(hf.vocab_size) < tokenizer_vocab:
        return [Finding("error", "tokenizer",
                        f"the model's vocab_size={hf.vocab_size} is smaller than {tokenizer_name}'s {tokenizer_vocab} "
                        "tokens: the tokenizer does not belong to this model; set model.tokenizer to the model's "
                        f"own tokenizer (or, for model.init_config, vocab_size >= {tokenizer_vocab})")]
    return []


def run_checks(cfg: Config, hf: Any, world: int, accelerator: str = "cuda",
               tokenizer_vocab: int | None = None, tokenizer_name: str = "the tokenizer") -> list[Finding]:
    """All checks of ``cfg`` against the base model's config ``hf`` on ``world`` ranks.

    Args:
        cfg: the validated config tree.
        hf: the base model's HF config (RoPE scaling applied).
        world: number of ranks (nodes × GPUs per node).
        accelerator: ``cuda`` or ``cpu`` (DeepSpeed accelerator name).
        tokenizer_vocab: the tokenizer's vocabulary size, when the tokenizer is at hand.
        tokenizer_name: how to call the tokenizer in messages.
    """
    return [
        *check_layout(cfg, world),
        *check_heads(cfg, hf),
        *check_batch(cfg, world),
        *check_attention(cfg, hf, accelerator),
        *check_flash_dtype(cfg),
        *check_cpu_dtype(cfg, accelerator),
        *check_rope_sp(cfg, hf),
        *check_model_features(hf),
        *check_vocab(hf, tokenizer_vocab, tokenizer_name),
    ]


def errors(findings: list[Finding]) -> list[str]:
    """The error findings as ``what: message`` lines."""
    return [f"{f.what}: {f.message}" for f in findings if f.level == "error"]


def raise_on_errors(findings: list[Finding]) -> None:
    """Raise one ConfigError listing every error finding (the trainer's verdict)."""
    errs = errors(findings)
    if errs:
        lines = "\n  ".join(errs)
        raise ConfigError(f"{len(errs)} problem(s) with this run (--dry-run reports the same):\n  {lines}")
