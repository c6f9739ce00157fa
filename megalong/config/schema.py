"""The typed config tree: one dataclass per component, validated on construction.

    Config
    ├── model       which base model (an HF directory, or an HF config to build a tiny one from)
    ├── rope        position interpolation / other HF rope types for the target length
    ├── attention   S²-Attn for training (group size, backend), full attention for eval
    ├── lora        LoRA+ (r, alpha, targets, trainable embed/norm)
    ├── parallel    sequence-parallel degree (data-parallel degree is derived from the world size)
    ├── zero        ZeRO stage, CPU offload, DeepSpeed JSON template
    ├── data        mmap datasets, blend weights, packing, document masking
    ├── train       steps, batch, optimiser, schedule, dtype, activation checkpointing
    ├── checkpoint  save interval, resume
    └── logging     progress bar, metrics, TensorBoard

Each ``__post_init__`` rejects values that cannot work and says what to use instead.
Checks that need two components (e.g. group size vs sequence length) live in
``Config.__post_init__``; checks that need the world size live in ``megalong.parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{key}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Local HF model directory to extend (no hub downloads at run time)."""
    init_config: dict | None = None
    """HF config dict (with ``model_type``) to build a randomly initialised base model instead of loading one."""
    tokenizer: str | None = None
    """HF tokenizer directory or SentencePiece ``.model`` file; defaults to ``name_or_path``."""
    zero_init: bool | None = None
    """Build/load under ``deepspeed.zero.Init`` (no rank holds the whole model); default: on with ZeRO-3."""
    trust_remote_code: bool = False
    """Passed to transformers when loading; off by default."""
    arch: str | None = None
    """Published architecture of ``name_or_path`` (``llama2-70b``, ...; see megalong.utils.model_shapes):
    dry runs and memory plans use it on machines where the model directory does not exist."""

    def __post_init__(self) -> None:
        if self.arch is not None:
            from megalong.utils.model_shapes import KNOWN_ARCHS

            _one_of("model.arch", self.arch, tuple(KNOWN_ARCHS))
        _check(
            (self.name_or_path is None) != (self.init_config is None),
            "set exactly one of model.name_or_path (a local HF model directory) and model.init_config "
            "(an HF config dict to build a new model from)",
        )
        if self.init_config is not None:
            _check(
                isinstance(self.init_config, dict) and "model_type" in self.init_config,
                "model.init_config must be a mapping with a 'model_type' key (llama, mistral, qwen2, ...)",
            )


ROPE_TYPES = ("none", "linear", "dynamic", "yarn", "llama3", "longrope", "theta")


@dataclass
class RopeConfig:
    type: str = "linear"
    """``linear`` (position interpolation, LongLoRA), ``dynamic`` (NTK), ``yarn``, ``llama3``, ``longrope``
    (Phi-3 style: ``short_factor``/``long_factor`` lists in ``extra``), ``theta`` (only a new RoPE base
    ``rope.theta``, "ABF") or ``none`` (keep the base's RoPE as it is)."""
    target_length: int | None = None
    """Context length to extend to; default ``data.max_seq_len``."""
    original_length: int | None = None
    """The context the base model was pretrained on, before any RoPE scaling; default its config's
    ``max_position_embeddings``. Required when the base is already linearly scaled and was not written by
    megalong (its config does not say which context it was pretrained on)."""
    factor: float | None = None
    """Explicit scaling factor, applied to unscaled positions; default ``target_length / original_length``
    (exact)."""
    theta: float | None = None
    """New RoPE base θ (``rope_theta``), alone (``type: theta``) or with another type; written into exported
    configs. Default: the base model's θ."""
    extra: dict = field(default_factory=dict)
    """Further HF rope parameters (``beta_fast``, ``low_freq_factor``, ``short_factor``, ...)."""

    def __post_init__(self) -> None:
        _one_of("rope.type", self.type, ROPE_TYPES)
        if self.factor is not None:
            _check(self.factor >= 1.0, f"rope.factor={self.factor} shrinks the context; use a factor >= 1")
        for key in ("target_length", "original_length"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"rope.{key}={v} must be a positive number of tokens")
        self._check_theta()

    def _check_theta(self) -> None:
        if self.theta is not None:
            _check(self.theta > 0, f"rope.theta={self.theta} must be a positive RoPE base (Llama 2: 10000)")
            _check(self.type != "none", f"rope.type=none keeps the base's RoPE unchanged, so rope.theta={self.theta} "
                                        "would be ignored; use rope.type=theta to change only θ")
        if self.type == "theta":
            _check(self.theta is not None, "rope.type=theta needs the new base: set rope.theta (e.g. 1.0e+6; "
                                           "Llama-3-8B-Instruct-80K: 2.0e+8)")
            _check(self.factor is None, f"rope.type=theta changes only θ, so rope.factor={self.factor} would be "
                                        "ignored; drop rope.factor or use rope.type=linear with rope.theta")
        _check("rope_theta" not in self.extra, "rope.extra.rope_theta is not read; set rope.theta instead")


@dataclass
class AttentionConfig:
    train: str = "s2"
    """Attention used for training: ``s2`` (shifted sparse, LongLoRA), ``full``, or ``short`` (the S²-Attn
    groups without the shifted heads: LongLoRA's pilot-study baseline, not a method to train with)."""
    backend: str = "sdpa"
    """Kernel: ``sdpa`` (CPU/GPU, no extra install), ``flash`` (flash-attn, GPU) or ``reference`` (slow, exact)."""
    group_size: int | None = None
    """S²-Attn group size G (even); default ``data.max_seq_len * group_size_ratio``."""
    group_size_ratio: float = 0.25
    """G as a fraction of ``data.max_seq_len`` when ``group_size`` is unset (LongLoRA: 1/4)."""
    eval: str = "full"
    """Attention used for evaluation: ``full`` or ``s2``."""
    full_last_steps: int = 0
    """Train the last this many steps with full attention instead of ``train`` (0: never). With S²-Attn
    before it, the model meets the full attention it is evaluated with before training ends (aimed at S²-Attn
    models that do not use context beyond a group, docs/BENCHMARKS.md)."""
    deterministic: bool = False
    """``backend=flash``: ask flash-attn for its deterministic backward (slower; its default accumulates dq in
    a varying order, so the same seed gives slightly different gradients). SDPA on GPUs: set
    ``torch.use_deterministic_algorithms`` yourself."""

    def __post_init__(self) -> None:
        _one_of("attention.train", self.train, ("s2", "full", "short"))
        _one_of("attention.eval", self.eval, ("s2", "full"))
        _one_of("attention.backend", self.backend, ("sdpa", "flash", "reference"))
        if self.group_size is not None:
            _check(
                self.group_size >= 2 and self.group_size % 2 == 0,
                f"attention.group_size={self.group_size} must be even and >= 2 (the shifted half moves by G/2); "
                f"use {max(2, self.group_size + self.group_size % 2)}",
            )
        _check(0 < self.group_size_ratio <= 1, "attention.group_size_ratio must be in (0, 1]")
        _check(self.full_last_steps >= 0, "attention.full_last_steps must be >= 0 (0: never switch)")


LORA_TRAINABLE = ("embed", "norm", "lm_head")
GROUPED_ATTENTION = ("s2", "short")
"""Training attentions that split rows into groups of ``Config.group_size`` tokens."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """LoRA+ on; off means full fine-tuning of every parameter."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters."""
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])
    """Extra fully trainable parts: ``embed``, ``norm``, ``lm_head`` (LongLoRA needs embed and norm)."""

    def __post_init__(self) -> None:
        _check(self.r > 0, f"lora.r={self.r} must be positive (typical: 8)")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout={self.dropout} must be in [0, 1)")
        _check(len(self.targets) > 0, "lora.targets is empty; use e.g. [q_proj, k_proj, v_proj, o_proj]")
        for t in self.trainable:
            _one_of("lora.trainable entry", t, LORA_TRAINABLE)


@dataclass
class ParallelConfig:
    sp: int = 1
    """Sequence-parallel degree (ranks that share one row); data-parallel degree = world / sp."""
    sp_mode: str = "s2_halo"
    """Sequence-parallel attention: ``s2_halo`` (S²-Attn with halo exchange) or ``ulysses`` (all-to-all)."""
    init_timeout_s: int = 300
    """Timeout for process-group creation and collectives, so a hang fails instead of waiting forever."""

    def __post_init__(self) -> None:
        _check(self.sp >= 1, f"parallel.sp={self.sp} must be >= 1")
        _one_of("parallel.sp_mode", self.sp_mode, ("s2_halo", "ulysses"))
        _check(self.init_timeout_s > 0, "parallel.init_timeout_s must be positive")


@dataclass
class ZeroConfig:
    stage: int = 3
    """ZeRO stage: 1 (optimizer states partitioned), 2 (+ gradients) or 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the Adam step) on the CPU."""
    offload_param: bool = False
    """Keep parameters on the CPU (ZeRO-3 only)."""
    template: str | None = None
    """DeepSpeed JSON template under ds_configs/ (or a path); default picked from stage and offload."""

    def __post_init__(self) -> None:
        _one_of("zero.stage", self.stage, (1, 2, 3))
        _check(
            not self.offload_param or self.stage == 3,
            "zero.offload_param needs zero.stage=3 (ZeRO-2 keeps full parameters on every rank); "
            "set zero.stage=3 or zero.offload_param=false",
        )


@dataclass
class DataConfig:
    prefixes: list[str] = field(default_factory=list)
    """Training datasets: ``.bin/.idx`` prefixes written by tools/preprocess_data.py."""
    weights: list[float] | None = None
    """Blend weights, one per prefix; default proportional to dataset size."""
    valid_prefixes: list[str] = field(default_factory=list)
    """Validation datasets (used by evaluate); empty: no validation during training."""
    max_seq_len: int = 4096
    """Tokens per training row (the row holds max_seq_len + 1 tokens for the label shift)."""
    kind: str = "pretrain"
    """``pretrain`` (packed raw text) or ``sft`` (prompt/response with masked prompt labels)."""
    packing: bool = True
    """SFT: pack several examples per row (else pad each to max_seq_len)."""
    doc_mask: bool = False
    """Stop attention across packed documents (segment ids per row)."""
    reset_position_ids: bool = False
    """Restart position ids at each packed document."""
    seed: int = 1234
    """Shuffle seed for the sample index."""
    cache_dir: str | None = None
    """Where sample-index .npy files are cached; default next to the data."""
    eod_token_id: int | None = None
    """End-of-document token used for packing; default the tokenizer's EOS."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        _check(self.max_seq_len >= 2, f"data.max_seq_len={self.max_seq_len} must be >= 2")
        _one_of("data.kind", self.kind, ("pretrain", "sft"))
        if self.weights is not None:
            _check(
                len(self.weights) == len(self.prefixes),
                f"data.weights has {len(self.weights)} entries but data.prefixes has {len(self.prefixes)}; "
                "give one weight per prefix or drop data.weights",
            )
            _check(all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                   "data.weights must be non-negative with a positive sum")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Everything a run writes goes here (config, DeepSpeed JSON, metrics, checkpoints, HF base)."""
    max_steps: int = 1000
    """Optimizer steps to train for (in total, across resumes)."""
    micro_batch_size: int = 1
    """Rows per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    schedule: str = "constant"
    """``constant`` (after warm-up, LongLoRA's default) or ``cosine``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    dtype: str = "bf16"
    """Training precision: ``fp32`` or ``bf16``."""
    seed: int = 42
    """Seed for weights built from a config, LoRA init and dropout."""
    activation_checkpointing: str = "none"
    """``none``, ``hf`` (transformers' gradient checkpointing) or ``deepspeed`` (DeepSpeed's API)."""
    cpu_checkpointing: bool = False
    """DeepSpeed activation checkpointing: keep checkpointed activations in host memory."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the cross-entropy (never materialise N × V logits)."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP in sequence tiles (DeepSpeed's ``TiledMLP``, ALST): the (N, intermediate)
    activations exist for one tile at a time, in forward and backward; costs one extra MLP forward per layer."""
    tiled_mlp_shards: int = 0
    """Tiles per MLP call with ``tiled_mlp``; 0: ceil(tokens per rank / hidden size), as DeepSpeed's ALST does."""
    offload_activations: bool = False
    """Keep each decoder layer's checkpointed input (hidden states) in host memory between forward and backward
    (DeepSpeed's ``CheckpointHiddenStatesOffload``, ALST); needs ``activation_checkpointing=hf``."""
    nan_policy: str = "stop"
    """On a NaN/inf loss: ``stop`` with a diagnostic (nothing saved is touched) or ``skip`` the step."""
    eval_interval: int = 0
    """Evaluate every this many steps (0: never during training)."""
    eval_batches: int = 4
    """Validation size per evaluation, in global batches (train_batch rows each)."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, f"train.max_steps={self.max_steps} must be >= 0")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _check(self.lr >= 0 and self.min_lr >= 0, "train.lr and train.min_lr must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _one_of("train.schedule", self.schedule, ("constant", "cosine"))
        _one_of("train.dtype", self.dtype, ("fp32", "bf16"))
        _one_of("train.activation_checkpointing", self.activation_checkpointing, ("none", "hf", "deepspeed"))
        _one_of("train.nan_policy", self.nan_policy, ("stop", "skip"))
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas must be two values in [0, 1)")
        _check(self.loss_chunk_size >= 1, "train.loss_chunk_size must be >= 1")
        _check(
            not self.cpu_checkpointing or self.activation_checkpointing == "deepspeed",
            "train.cpu_checkpointing needs train.activation_checkpointing=deepspeed",
        )
        _check(self.tiled_mlp_shards >= 0,
               f"train.tiled_mlp_shards={self.tiled_mlp_shards} must be >= 0 (0: one tile per hidden-size tokens)")
        _check(
            self.tiled_mlp or self.tiled_mlp_shards == 0,
            f"train.tiled_mlp_shards={self.tiled_mlp_shards} has no effect without train.tiled_mlp=true; "
            "set train.tiled_mlp=true or drop train.tiled_mlp_shards",
        )
        if self.offload_activations:
            _check(
                self.activation_checkpointing != "none",
                "train.offload_activations moves checkpointed activations to host memory, so it needs activation "
                "checkpointing: set train.activation_checkpointing=hf",
            )
            _check(
                self.activation_checkpointing == "hf",
                "train.offload_activations works with transformers' checkpointing (train.activation_checkpointing=hf); "
                "with activation_checkpointing=deepspeed use train.cpu_checkpointing=true instead (DeepSpeed's own "
                "offload of checkpointed activations) and set train.offload_activations=false",
            )


@dataclass
class CheckpointConfig:
    save_interval: int = 0
    """Save every this many steps (0: only at the end and on SIGTERM/SIGINT)."""
    resume: str = "none"
    """``none``, ``auto`` (newest complete checkpoint in the run dir) or a checkpoint tag/path."""
    keep_last: int = 0
    """Keep only this many newest checkpoints (0: keep all)."""
    save_at_end: bool = True
    """Save when max_steps is reached."""
    hash_files: bool = True
    """Record the sha256 of every checkpoint file (verified on resume, like the sizes, which are always
    recorded). Off for very large full fine-tuning checkpoints, where hashing reads them once more."""

    def __post_init__(self) -> None:
        _check(self.save_interval >= 0, "checkpoint.save_interval must be >= 0")
        _check(self.keep_last >= 0, "checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    """Write metrics every this many optimizer steps."""
    progress_bar: bool = True
    """tqdm bar on rank 0 when stderr is a terminal; otherwise (or when false) plain progress lines."""
    progress_interval_s: float = 20.0
    """Progress lines: one per ``log_interval`` steps, and at least one every this many seconds."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs the tensorboard package)."""
    level: str = "INFO"
    """Python logging level."""

    def __post_init__(self) -> None:
        _check(self.log_interval >= 1, "logging.log_interval must be >= 1")
        _check(self.progress_interval_s > 0, "logging.progress_interval_s must be > 0 (seconds)")
        _one_of("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class Config:
    model: ModelConfig
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        g = self.group_size
        n = self.data.max_seq_len
        if self.attention.train in GROUPED_ATTENTION or self.attention.eval == "s2":
            _check(
                g % 2 == 0 and g >= 2,
                f"S²-Attn group size {g} (data.max_seq_len={n} × attention.group_size_ratio="
                f"{self.attention.group_size_ratio}) must be even; set attention.group_size explicitly",
            )
            _check(
                g <= n,
                f"attention.group_size={g} is larger than data.max_seq_len={n}: S²-Attn would be full attention; "
                f"use a group size <= {n} (LongLoRA: {n // 4}) or attention.train=full",
            )
        if self.rope.type != "none" and self.rope.target_length is not None:
            _check(
                self.rope.target_length >= n,
                f"rope.target_length={self.rope.target_length} is shorter than data.max_seq_len={n}; "
                f"set rope.target_length >= {n} or leave it unset",
            )

    @property
    def group_size(self) -> int:
        """S²-Attn group size G: explicit, or max_seq_len × ratio rounded down to even."""
        if self.attention.group_size is not None:
            return self.attention.group_size
        g = int(self.data.max_seq_len * self.attention.group_size_ratio)
        return max(2, g - g % 2)

    @property
    def rope_target_length(self) -> int:
        return self.rope.target_length or self.data.max_seq_len
