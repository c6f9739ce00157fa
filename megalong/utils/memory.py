"""Memory planning: per-GPU and per-host bytes of a LongLoRA / full fine-tuning run, before it runs.

A pure function of its inputs: ``estimate_memory(MemoryInputs) -> MemoryEstimate``. No torch, no
torch.distributed, no files. Shapes come from an HF config (``ModelShape.from_hf_config``) or from
the published numbers of a known architecture (``KNOWN_ARCHS``: llama2-7b … qwen2-7b, qwen3-8b, gemma3-4b,
phi3-mini).

Notation: P total / Pt trainable parameters, S = world = ZeRO shards (DeepSpeed partitions over the
sequence × data group), w = bytes per parameter and activation element (2 bf16, 4 fp32), T = tokens
per rank = micro_batch · N / sp, h hidden, kv = kv_heads · head_dim, I intermediate, H heads, r rank.

Model states (per GPU unless offloaded to the host), mixed precision as DeepSpeed 0.19 runs it:

    16-bit weights  w·P (ZeRO-1/2, every rank)  |  w·P/S + small persistent params (ZeRO-3)
    16-bit grads    ZeRO-3: a flat w·Pt/S partition buffer, allocated once (host with offload)
                    ZeRO-1/2: w·Pt (ZeRO-1) or w·Pt/S (ZeRO-2), filled during backward, freed at the step
    fp32 master + Adam m, v   12·Pt/S                                  (host with offload_optimizer)
    fp32 grads      4·Pt/S, built at the optimizer step from a flattened 16-bit copy (w·Pt/S)
                    (persistent on the host with offload_optimizer)
    ZeRO-3 working set  gathered params: the largest module + the prefetch bucket + params whose next
                    use is within stage3_max_reuse_distance (about half of it at the turn from forward
                    to backward), none on a single rank; + one module's full gradient before its
                    reduce-scatter
    reduce buckets  ZeRO-3: one reduce_bucket_size·w buffer from start-up; ZeRO-1/2: two (overlap_comm)
                    allocated for each backward, plus one module's gradient in flight

A frozen base (LoRA+) has no gradients and no optimizer state: only Pt (LoRA A/B, embeddings, norms)
pays them. DeepSpeed's own estimators (``estimate_zero{2,3}_model_states_mem_needs``) assume full
fine-tuning; tests/unit/test_memory.py checks agreement and the one deliberate difference (ZeRO-3's
16-bit gradient partition, 2 B/param, which DeepSpeed's ZeRO-3 formula leaves out).

Activations of one Llama-style decoder layer, bytes per token (w = activation bytes). These are the
tensors autograd saves for backward in transformers' LlamaDecoderLayer (checked tensor-by-tensor with
``torch.autograd.graph.saved_tensors_hooks``, see tests/unit/test_memory.py):

    input RMSNorm       4h (fp32 upcast of the input) + 4 (rsqrt) + w·h (x̂, for the trainable weight)
                        + w·h (normed output, kept by q/k/v when they train or carry LoRA)
    LoRA                w·r per adapted projection (lora_A output, kept by lora_B)
    attention (flash)   q w·h + k, v 2w·kv (after RoPE; rope saves only cos/sin) + output w·h + LSE 4·H
    S²-Attn             + w·h: the two head-halves' outputs are concatenated into a new tensor
    post-attn RMSNorm   4h + 4 + w·h (+ w·h normed output if gate/up train or keep their input)
    SwiGLU MLP          gate w·I (silu input) + silu(gate) w·I + up w·I (the product's inputs)
                        (+ w·I product, if down_proj trains or keeps its input)

    LoRA+ bf16 (q,k,v,o):  18h + 4kv + 6I + 8r + 4H + 8   (Llama-2-7B: 156 KB per token per layer)
    full fine-tune bf16:   20h + 4kv + 8I + 4H + 8

Other families (ModelShape flags, checked the same way): Qwen3 and Gemma 3 add a per-head q_norm and
k_norm (like a layer norm over H·D and H_kv·D); Gemma 3 has 4 layer norms, and its norms keep x̂ in fp32
(they scale by (1 + w) in fp32). Not modelled: Phi-3's v is a view of the fused qkv_proj output, so
attention keeps that whole (N, q + 2kv) tensor: about w·(q + kv) more per token per layer than counted.

Frozen linears keep no input (autograd saves an input only for the weight's gradient), except under
ZeRO-3's zero.Init, which replaces F.linear by a function that always saves it: then the MLP input and
product are kept even for LoRA+. With activation checkpointing (per layer) only each layer's input
(w·h per token) is kept — on the host with DeepSpeed's cpu_checkpointing, where the GPU holds just
the copy in flight — and one layer at a time is recomputed during backward. The backward of a layer
adds temporaries (its output gradient w·h, and the SwiGLU product's gradient with its two factors'
gradients, 3w·I, or 2w·I net when down_proj's saved input is freed just before); the attention backward needs dq, dk, dv w·(h + 2kv) plus flash-attn's fp32 dq
accumulator 4h (per head-half for S²-Attn). With flash / memory-efficient SDPA attention memory is
O(N): S²-Attn saves compute, not memory. Only an eager (materialised) softmax is O(N·K), K = N for
full attention and K = G for LongLoRA's grouped S²-Attn.

ALST's features (DeepSpeed 0.19.8, ``train.tiled_mlp`` / ``train.offload_activations``):

    TiledMLP            the MLP saves only its input x (w·h per token); its backward recomputes one tile
                        of C = ceil(T / shards) tokens at a time (shards = ceil(T / h) by default): it holds
                        the output gradient and a zero-filled input gradient for all T tokens (2w·h·T) plus
                        one tile's saved MLP tensors and their gradients (C·(3w·I + ... + 2..3w·I))
    activation offload  CheckpointHiddenStatesOffload moves each checkpointed layer input to pinned host
                        memory: the GPU keeps the newest one and two copies in flight (3w·h·T), the host
                        (layers − 1)·w·h·T per rank. But 0.19.8 caches every input it restores until its
                        context exits, after the backward: by the first layer's backward all layers' inputs
                        are on the GPU again, so the GPU peak equals the one without offload
                        (``offload_keeps_restored=True``). megalong's offload unpacks once and frees each
                        restored input (default ``offload_keeps_restored=False``).
                        On CPU it offloads nothing (a pass-through).

Ulysses (``sp_mode=ulysses``, DeepSpeed's UlyssesSPAttentionHF): after the all-to-all each rank runs the
attention on the whole row N with H/sp query heads, and max(kv_heads, sp)/sp KV heads (with fewer KV heads
than ranks DeepSpeed repeats each to one head per rank); everything else works on L = N/sp tokens. Per
local token that is q and output w·q as before, K/V 2w·max(kv_heads, sp)·head_dim, plus o_proj's input, a
second w·q copy that comes back through the all-to-all; in its backward the row's dq, dk, dv go back
through the all-to-all one at a time (a contiguous send copy and a received tensor each).

Loss: megalong never builds N×V logits. The chunked cross-entropy's backward (in place) holds a
chunk of C tokens' matmul output, its fp32 copy turned into softmax − onehot and its w-byte cast,
while the previous chunk's fp32 and w-byte buffers are still referenced: (8 + 2w)·C·V bytes; plus the
hidden gradient w·h·T and, with a trainable lm_head, an fp32 weight gradient 4·V·h (and, one chunk at
a time, the w-byte dW product and its fp32 copy).

Peak: persistent states + max(backward phase, optimizer-step phase). The backward phase is the
checkpoints + max(recomputed layer + max(layer temporaries, attention workspace), loss buffers)
(+ ZeRO-1/2's reduce buckets); the step phase is ZeRO-1/2's 16-bit gradients + the fp32 gradients +
max(the flattened copy, Adam's temporaries: none for fused/CPU-offload Adam, 8 B/param for torch AdamW).
Framework overhead on a GPU: CUDA context, cuBLAS/NCCL workspaces (``cuda_context_gb``, 1 GiB) plus
allocator fragmentation (``fragmentation``, 10% of the peak). Host per node: offloaded states, CPU
checkpoints and one Python/CUDA process per GPU (``host_process_gb``, 4 GiB each); loading the model
is a separate, earlier peak (every rank materialises the model without zero.Init, one shard with it).

On CPU (``accelerator="cpu"``, DeepSpeed's CPU accelerator) host memory is the device: there is no
CUDA context and no caching allocator, and the per-rank peak is the rank's resident set: the terms
above plus the process itself (``cpu_process_gb``, measured). That holds only when freed tensors go
back to the kernel, which glibc's default dynamic mmap threshold prevents; the launch path fixes it on
every CPU rank (megalong.utils.cpu_runtime). Host per node = ranks per node × the per-rank peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from megalong.utils.model_shapes import (
    ATTN_PROJ,
    KNOWN_ARCHS,
    MLP_PROJ,
    ModelShape,
    ParamCounts,
    analytic_param_counts,
    hf_config_from_dict,
    known_arch_config,
)

GiB = float(2**30)

__all__ = [
    "ATTN_PROJ", "GiB", "KNOWN_ARCHS", "MLP_PROJ", "MemoryEstimate", "MemoryInputs", "ModelShape", "ParamCounts",
    "Term", "analytic_param_counts", "estimate_memory", "hf_config_from_dict", "known_arch_config", "suggest",
]


# ---------------------------------------------------------------------------------------- inputs
_CHOICES = {
    "activation_checkpointing": ("none", "layer"),
    "attention": ("s2", "full"),
    "attention_kernel": ("flash", "eager"),
    "dtype": ("bf16", "fp32"),
    "sp_mode": ("s2_halo", "ulysses"),
    "accelerator": ("cuda", "cpu"),
}


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the estimate depends on. GB means GiB (2^30 bytes) throughout."""

    model: ModelShape
    seq_len: int
    micro_batch: int = 1
    gpus_per_node: int = 8
    nodes: int = 1
    sp: int = 1
    """Sequence-parallel degree: each rank holds seq_len / sp tokens of a row; dp = world / sp."""
    sp_mode: str = "s2_halo"
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    zero_init: bool | None = None
    """Model built under deepspeed.zero.Init (default: with ZeRO-3). Its F.linear keeps every input."""
    activation_checkpointing: str = "layer"
    """``none`` or ``layer`` (each decoder layer's input is kept, the layer recomputed in backward)."""
    cpu_checkpointing: bool = False
    """DeepSpeed cpu_checkpointing: the kept layer inputs live in host memory."""
    offload_activations: bool = False
    """ALST's checkpoint offload (DeepSpeed's ``CheckpointHiddenStatesOffload``, ``train.offload_activations``):
    the kept layer inputs live in host memory; the GPU keeps the newest one and two copies in flight.
    A pass-through on CPU (DeepSpeed offloads nothing from a CPU device)."""
    offload_keeps_restored: bool = False
    """``True`` plans DeepSpeed 0.19.8's own ``CheckpointHiddenStatesOffload``, which unpacks with ``cache=True``:
    every input it brings back stays referenced until the context exits, and forward and backward run inside
    it, so by the backward of the first layer all of them are on the GPU again (the GPU peak is not lowered;
    the host still holds the copies). ``False`` (default): what megalong runs (``megalong.engine.tiling.
    freeing_offload`` unpacks once), each restored input freed after its layer's backward."""
    tiled_mlp: bool = False
    """DeepSpeed's ``TiledMLP`` (``train.tiled_mlp``): each MLP runs in sequence tiles; it saves only its
    input, and its (tokens, intermediate) tensors exist for one tile at a time (recomputed in backward)."""
    tiled_mlp_shards: int = 0
    """Tiles per MLP call; 0: ceil(tokens per rank / hidden), as ``train.tiled_mlp_shards=0``."""
    attention: str = "s2"
    group_size: int | None = None
    """S²-Attn group size; default seq_len / 4."""
    attention_kernel: str = "flash"
    """``flash`` (flash-attn / SDPA flash or memory-efficient: O(N)) or ``eager`` (materialised softmax)."""
    dtype: str = "bf16"
    lora: bool = True
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ATTN_PROJ
    lora_trainable: tuple[str, ...] = ("embed", "norm")
    loss_chunk: int = 1024
    reduce_bucket_size: int = 200_000_000
    prefetch_bucket_size: int = 50_000_000
    max_reuse_distance: int = 1_000_000_000
    """ZeRO-3 keeps a gathered parameter whose next use is within this many parameters."""
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    overlap_comm: bool = True
    accelerator: str = "cuda"
    """``cpu`` models DeepSpeed's CPU accelerator (torch AdamW, lazily touched buffers, no CUDA context):
    each of ``gpus_per_node`` ranks is a process whose memory is the host's, so its peak is its RSS."""
    cuda_context_gb: float = 1.0
    fragmentation: float = 0.10
    host_process_gb: float = 4.0
    cpu_process_gb: float = 0.45
    """CPU ranks: resident set of a rank before its model exists (interpreter, torch, DeepSpeed, transformers,
    peft, the process group, kernels warmed up): 462 MiB measured by tools/bench_memory.py (docs/BENCHMARKS.md,
    "CPU allocator"), 378 MiB right after the imports and init_distributed."""
    gpu_memory_gb: float = 80.0
    host_memory_gb: float = 1024.0
    """Host memory per node."""
    load_bytes_per_param: int | None = None
    """Bytes per parameter while loading the model (default: the training dtype's)."""
    counts: ParamCounts | None = None
    """Exact parameter counts (e.g. from a meta-device model); default: analytic from ``model``."""

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported; use one of {allowed}")
        for key in ("seq_len", "micro_batch", "gpus_per_node", "nodes", "sp", "lora_r", "loss_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage} is not supported; use 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage=3 (ZeRO-1/2 keep full weights on every GPU)")
        if self.world % self.sp:
            ok = [d for d in range(1, self.world + 1) if self.world % d == 0]
            raise ValueError(f"sp={self.sp} does not divide the {self.world} GPUs; use one of {ok}")
        if self.seq_len % self.sp:
            raise ValueError(f"sp={self.sp} does not divide seq_len={self.seq_len}; use a multiple of {self.sp}")
        if self.cpu_checkpointing and self.activation_checkpointing == "none":
            raise ValueError("cpu_checkpointing needs activation_checkpointing='layer'")
        if self.offload_activations and self.activation_checkpointing == "none":
            raise ValueError("offload_activations needs activation_checkpointing='layer' (it offloads the "
                             "checkpointed layer inputs)")
        if self.offload_activations and self.cpu_checkpointing:
            raise ValueError("offload_activations and cpu_checkpointing both move the layer inputs to the host; "
                             "use one (offload_activations with HF checkpointing, cpu_checkpointing with DeepSpeed's)")
        if self.tiled_mlp_shards < 0:
            raise ValueError(f"tiled_mlp_shards={self.tiled_mlp_shards} must be >= 0 (0: ceil(tokens / hidden))")
        if self.ulysses:
            heads, kv = self.model.heads, self.model.kv_heads
            if heads % self.sp or (kv % self.sp and self.sp % kv):
                raise ValueError(f"sp={self.sp} with sp_mode=ulysses needs sp to divide the {heads} heads and to divide "
                                 f"or be a multiple of the {kv} KV heads; use sp_mode=s2_halo or another sp")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def tokens_per_rank(self) -> int:
        return self.micro_batch * self.seq_len // self.sp

    @property
    def ulysses(self) -> bool:
        return self.sp > 1 and self.sp_mode == "ulysses"

    @property
    def attn_kv_dim(self) -> int:
        """K/V width per token the attention kernel sees: Ulysses with fewer KV heads than ranks repeats
        each KV head to sp / kv_heads ranks, so every rank holds one KV head of the whole row."""
        if self.ulysses and self.model.kv_heads < self.sp:
            return self.sp * self.model.head_dim  # 1 head × N tokens = sp heads' worth per local token
        return self.model.kv_dim

    @property
    def mlp_shards(self) -> int:
        """TiledMLP's tiles per call (1 without tiling): as megalong.engine.tiling, the requested count
        (0: ceil(T / hidden)) rounded to one torch.chunk honours: tiles of ceil(T / requested) tokens."""
        if not self.tiled_mlp:
            return 1
        t = self.tokens_per_rank
        asked = max(1, min(t, self.tiled_mlp_shards or math.ceil(t / self.model.hidden)))
        return math.ceil(t / math.ceil(t / asked))

    @property
    def mlp_tiled(self) -> bool:
        """Whether the MLP really runs tiled (one tile is the plain MLP)."""
        return self.mlp_shards > 1

    @property
    def mlp_tile_tokens(self) -> int:
        return math.ceil(self.tokens_per_rank / self.mlp_shards)

    @property
    def group(self) -> int:
        return self.group_size or max(2, self.seq_len // 4)

    @property
    def bytes_per_elem(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    @property
    def uses_zero_init(self) -> bool:
        return self.zero_stage == 3 if self.zero_init is None else self.zero_init

    def param_counts(self) -> ParamCounts:
        if self.counts is not None:
            return self.counts
        return analytic_param_counts(
            self.model, lora=self.lora, r=self.lora_r, targets=self.lora_targets,
            trainable_parts=self.lora_trainable, persistence_threshold=self.param_persistence_threshold,
        )


# ---------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Term:
    """One row of the table: bytes per GPU and per rank on the host."""

    name: str
    gpu: float
    host: float = 0.0
    phase: str = "persistent"
    """``persistent`` (all step long), ``backward``, ``step`` (optimizer step) or ``load``."""
    at_peak: bool = True
    """Whether the GPU bytes are part of the per-GPU peak (phases that do not coincide are not)."""
    note: str = ""


@dataclass
class MemoryEstimate:
    """The table, the per-GPU and per-node totals, and the verdict."""

    inputs: MemoryInputs
    counts: ParamCounts
    terms: list[Term]
    gpu_peak: float
    host_per_node: float
    host_load_peak: float
    peak_phase: str
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> float:
        return self.gpu_peak

    @property
    def fits_gpu(self) -> bool:
        if self.inputs.accelerator == "cpu":  # the device is the host: fits_host decides
            return self.fits_host
        return self.gpu_peak <= self.inputs.gpu_memory_gb * GiB

    @property
    def fits_host(self) -> bool:
        return max(self.host_per_node, self.host_load_peak) <= self.inputs.host_memory_gb * GiB

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)

    def model_state_bytes(self) -> tuple[float, float]:
        """(per GPU, per node on the host) of parameters, gradients and optimizer states at the step."""
        names = ("weights", "gathered params (ZeRO-3)", "gradients", "optimizer states", "fp32 gradients")
        gpu = sum(self.term(n).gpu for n in names)
        host = sum(self.term(n).host for n in names) * self.inputs.gpus_per_node
        return gpu, host

    def to_dict(self) -> dict:
        i = self.inputs
        return {
            "model": i.model.name,
            "inputs": {k: v for k, v in asdict(i).items() if k not in ("model", "counts")},
            "params": asdict(self.counts),
            "world": i.world, "dp": i.dp, "sp": i.sp, "tokens_per_rank": i.tokens_per_rank,
            "terms_gib": {t.name: {"gpu": round(t.gpu / GiB, 3), "host_per_rank": round(t.host / GiB, 3),
                                   "phase": t.phase, "at_peak": t.at_peak} for t in self.terms},
            "gpu_peak_gib": round(self.gpu_peak / GiB, 3),
            "host_per_node_gib": round(self.host_per_node / GiB, 3),
            "host_load_peak_gib": round(self.host_load_peak / GiB, 3),
            "peak_phase": self.peak_phase,
            "gpu_memory_gib": i.gpu_memory_gb, "host_memory_gib": i.host_memory_gb,
            "fits_gpu": self.fits_gpu, "fits_host": self.fits_host, "fits": self.fits,
            "notes": list(self.notes),
        }

    def render(self) -> str:
        from megalong.utils.memory_table import render_estimate

        return render_estimate(self)


# ---------------------------------------------------------------------------------------- activations
def _keeps_input(i: MemoryInputs, *projs: str) -> bool:
    """Whether a linear saves its input: it trains, carries LoRA, or runs zero.Init's F.linear."""
    z3_keeps_inputs = i.zero_stage == 3 and i.uses_zero_init
    return not i.lora or z3_keeps_inputs or any(p in i.lora_targets for p in projs)


def mlp_saved_bytes(i: MemoryInputs) -> float:
    """Per token: what autograd saves inside one SwiGLU MLP (its input included when a linear keeps it)."""
    m, w = i.model, i.bytes_per_elem
    total = w * m.hidden if _keeps_input(i, "gate_proj", "up_proj") else 0
    total += w * m.intermediate if _keeps_input(i, "down_proj") else 0
    total += w * i.lora_r * len(set(i.lora_targets) & set(MLP_PROJ)) if i.lora else 0
    return float(total + 3 * w * m.intermediate)  # silu input, silu output, up (the product's inputs)


def layer_activation_bytes(i: MemoryInputs) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    m, w = i.model, i.bytes_per_elem
    h, heads = m.hidden, m.heads
    kv = i.attn_kv_dim  # Ulysses with kv_heads < sp: K/V repeated to one head per rank
    lora_targets = set(i.lora_targets) if i.lora else set()
    norms_train = not i.lora or "norm" in i.lora_trainable

    xhat = 4 if m.fp32_norms else w  # the normalised input kept for a trainable weight (Gemma: fp32)
    norm = 4 * h + 4 + (xhat * h if norms_train else 0)
    total = m.norms_per_layer * norm  # Llama: 2; Gemma 3: 4 (before and after attention and MLP)
    if m.qk_norm:  # Qwen3 / Gemma 3: per-head RMSNorm on q and k, kept like the layer norms
        qk = m.q_dim + m.kv_dim
        total += 4 * qk + 4 * (heads + m.kv_heads) + (xhat * qk if norms_train else 0)
    total += w * h if _keeps_input(i, "q_proj", "k_proj", "v_proj") else 0
    total += w * i.lora_r * len(lora_targets & set(ATTN_PROJ))
    # TiledMLP saves only its input (the normed hidden states); the rest exists one tile at a time
    total += w * h if i.mlp_tiled else mlp_saved_bytes(i)
    total += w * m.q_dim * 2 + 2 * w * kv  # q (after RoPE) and the attention output; k, v
    if i.attention_kernel == "flash":
        total += 4 * heads  # log-sum-exp per head
    else:
        total += 2 * w * (m.q_dim - kv)  # eager repeats k, v to every query head
        total += (4 + w) * heads * _eager_keys(i)  # fp32 softmax output + its cast
    if i.attention == "s2":
        total += w * m.q_dim  # the two head-halves' outputs concatenated into a new tensor
    if i.ulysses and _keeps_input(i, "o_proj"):
        # the core attention's output (N, H/sp heads, saved by the kernel) goes back through an all-to-all
        # into a new (L, all heads) tensor: o_proj's input is a second copy, w·q per local token
        total += w * m.q_dim
    if i.sp > 1 and i.sp_mode == "s2_halo":
        # megalong.parallel.s2_halo: a half with a halo runs on [halo ‖ local] keys: its K/V arrive as one
        # new (halo + L) tensor (replacing its share of k, v), its queries are zero-padded to halo + L and
        # its output has halo + L rows (both replacing the half's q and output). Per local token: f·w·(kv + q)
        # per half, f = halo / L of the rank with the longest halo.
        for frac in halo_fractions(i):
            total += frac * w * (kv + m.q_dim) / 2
    return float(total)


def halo_fractions(i: MemoryInputs) -> list[float]:
    """Per head-half: the longest halo any rank fetches, as a fraction of its L tokens (rows with no
    documents; documents only shorten halos). Full attention: one 'half', the whole prefix."""
    length = i.seq_len // i.sp
    if i.attention != "s2":
        return [2.0 * (i.seq_len - length) / length]  # counted as both halves
    g = i.group
    out = []
    for off in (0, g // 2):
        worst = 0
        for r in range(1, i.sp):
            x = r * length
            worst = max(worst, x - max(0, ((x + off) // g) * g - off))
        out.append(worst / length)
    return out


def _eager_keys(i: MemoryInputs) -> int:
    return min(i.group, i.seq_len) if i.attention == "s2" else i.seq_len


def layer_backward_temporaries(i: MemoryInputs) -> float:
    """Bytes per rank of the gradients alive at the worst moment of a layer's backward (the SwiGLU product).

    The layer's output gradient (w·h), and the product's gradient plus the gradients of its two
    factors (3·w·I) before the factors are freed; when down_proj keeps its input (it trains, or
    zero.Init's linear), that input is freed one node earlier, so the net is 2·w·I. All per token.

    TiledMLP (DeepSpeed 0.19.8's backward): the output gradient and a zero-filled input gradient for
    all tokens (2·w·h), plus, for one tile, the recomputed MLP's saved tensors and those gradients.
    """
    w, m, t = i.bytes_per_elem, i.model, i.tokens_per_rank
    keeps_product = _keeps_input(i, "down_proj")
    grads = (2 if keeps_product else 3) * w * m.intermediate
    if not i.mlp_tiled:
        return float((w * m.hidden + grads) * t)
    return float(2 * w * m.hidden * t + (mlp_saved_bytes(i) + grads) * i.mlp_tile_tokens)


def attention_workspace(i: MemoryInputs) -> float:
    """Bytes per rank the attention kernel needs beyond its saved tensors (backward)."""
    m, w, t = i.model, i.bytes_per_elem, i.tokens_per_rank
    if i.attention_kernel == "eager":
        keys = _eager_keys(i)
        # scores and masked scores (w each) and the fp32 softmax gradient, plus the additive mask
        return float((2 * w + 4) * m.heads * keys * t + w * i.micro_batch * keys * (i.seq_len // i.sp))
    kv = i.attn_kv_dim
    per_token = w * (m.q_dim + 2 * kv)  # dq, dk, dv
    if i.accelerator == "cuda":
        per_token += 4 * m.q_dim  # flash-attn's fp32 dq accumulator
    if i.attention == "s2":
        per_token /= 2  # the two head-halves run one after the other
    if i.ulysses:
        # after the kernel: the row's dq, dk, dv (B, H/sp, N, D) go back through the all-to-all one at a
        # time, each as a contiguous send copy and a received tensor; the kernel's workspace is gone by then
        per_token = max(per_token, w * (m.q_dim + 2 * kv) + 2 * w * max(m.q_dim, kv))
    return float(per_token * t)


def other_activations(i: MemoryInputs) -> float:
    """Per rank: RoPE tables, the final norm (its output is the loss input), ids, labels, positions, LSE."""
    m, w, t = i.model, i.bytes_per_elem, i.tokens_per_rank
    return float(t * (2 * w * m.head_dim + (4 + 2 * w) * m.hidden + 4 + 3 * 8))


def loss_buffers(i: MemoryInputs, counts: ParamCounts) -> float:
    """Chunked cross-entropy backward (megalong.engine.loss): chunk buffers, hidden and lm_head grads."""
    m, w, t = i.model, i.bytes_per_elem, i.tokens_per_rank
    chunk = min(i.loss_chunk, t)
    cast = w if w < 4 else 0  # a w-byte copy of an fp32 tensor (none when training in fp32)
    # A chunk: w-byte matmul output, its fp32 copy (softmax - onehot, in place), the w-byte gradient;
    # the previous chunk's fp32 logits and w-byte gradient are still referenced while it is built.
    per_chunk = (4 + cast) * chunk * m.vocab
    buffers = per_chunk * (2 if t > chunk else 1)
    head_trains = not i.lora or "lm_head" in i.lora_trainable or (m.tied_embeddings and "embed" in i.lora_trainable)
    if head_trains:  # fp32 weight gradient, plus a chunk's w-byte dW product and its fp32 copy (one chunk alive)
        buffers = 4 * m.vocab * m.hidden + max(buffers, per_chunk + (4 + cast) * m.vocab * m.hidden)
    return float(buffers + w * m.hidden * t)


# ---------------------------------------------------------------------------------------- estimate
def _model_state_terms(i: MemoryInputs, c: ParamCounts) -> list[Term]:
    """Weights, gradients, optimizer states and the optimizer step's buffers (see the module docstring)."""
    w, s = i.bytes_per_elem, i.world
    z3, off_opt = i.zero_stage == 3, i.offload_optimizer
    if not z3:
        weights = Term("weights", w * c.total, note=f"{8 * w}-bit, whole model on every GPU")
    elif i.offload_param:
        weights = Term("weights", w * c.persistent, w * c.total / s, note="partitions on the host")
    else:
        weights = Term("weights", w * (c.total / s + c.persistent), note="ZeRO-3 partition + persistent small params")
    gathered = 0.0
    if z3:
        gathered = w * c.largest_trainable_module  # a module's full gradient before its reduce-scatter
        if s > 1:  # one rank's "all-gather" is its own partition, no copy
            window = c.largest_module + i.prefetch_bucket_size + i.max_reuse_distance // 2
            gathered += w * min(c.total, window, i.max_live_parameters + c.largest_module)
    g16 = w * c.trainable * (1 if i.zero_stage == 1 else 1 / s)
    if z3:  # a flat 16-bit gradient partition, allocated once (on the host with offload_optimizer)
        grads = Term("gradients", 0.0 if off_opt else g16, g16 if off_opt else 0.0, note=f"{8 * w}-bit partition buffer")
    elif off_opt and i.zero_stage == 2:  # reduced straight into the host's fp32 buffer
        grads = Term("gradients", 0.0, note="reduced straight into the host's fp32 gradients")
    else:  # filled during backward, freed at the step; the backward peak comes before most of it exists
        grads = Term("gradients", g16, phase="step", note=f"{8 * w}-bit, from the end of backward to the step")
    opt = 12 * c.trainable / s
    fp32_grads = 4 * c.trainable / s
    step_tmp = 0.0
    if not off_opt:
        adam = (8 if i.accelerator == "cpu" else 0) * c.trainable / s  # torch AdamW: sqrt(v), then its scaled copy
        freed = g16 if i.zero_stage == 2 else 0.0  # ZeRO-2 drops its 16-bit gradients before the update
        flat = (w if w < 4 else 0) * c.trainable / s  # fp32 training: the flattened copy is the fp32 gradient
        step_tmp = max(flat, adam - freed)  # the flattened 16-bit copy, or Adam's temporaries
    return [
        weights,
        Term("gathered params (ZeRO-3)", gathered, note="gathered modules + a module's full gradient"),
        grads,
        Term("optimizer states", 0.0 if off_opt else opt, opt if off_opt else 0.0, note="fp32 master + Adam m, v"),
        Term("fp32 gradients", 0.0 if off_opt else fp32_grads, fp32_grads if off_opt else 0.0,
             phase="persistent" if off_opt else "step", note="for the optimizer"),
        Term("optimizer step temporaries", step_tmp, phase="step",
             note="flattened grads" + (" / torch AdamW's sqrt(v) copies" if i.accelerator == "cpu" else "")),
    ]


def _comm_buffers(i: MemoryInputs, c: ParamCounts) -> Term:
    """ZeRO's gradient reduce buckets: ZeRO-3 allocates one at start-up, ZeRO-1/2 two per backward."""
    w = i.bytes_per_elem
    if i.zero_stage == 3:
        elems = i.reduce_bucket_size if i.accelerator == "cuda" else min(i.reduce_bucket_size, c.trainable)
        return Term("reduce buckets", w * elems, note="ZeRO-3 gradient reduce bucket")
    n_buf = 2 if i.overlap_comm else 1
    if i.accelerator == "cuda":  # allocated whole at backward start, plus one module's gradient in flight
        total = w * (n_buf * i.reduce_bucket_size + c.largest_trainable_module)
    else:  # untouched CPU pages are never resident: at the backward peak one module's gradient is in
        total = w * min(i.reduce_bucket_size, c.largest_trainable_module)
    return Term("reduce buckets", total, phase="backward", note=f"{n_buf} ZeRO-{i.zero_stage} reduce bucket(s)")


def _activation_terms(i: MemoryInputs, c: ParamCounts) -> list[Term]:
    """Activation-side terms, each marked with whether it is part of the backward-phase peak."""
    m, w, t = i.model, i.bytes_per_elem, i.tokens_per_rank
    per_layer = layer_activation_bytes(i)
    kept_inputs = m.layers * w * m.hidden * t
    if i.activation_checkpointing == "none":
        layers = Term("activations: layers", m.layers * per_layer * t, phase="backward",
                      note=f"all {m.layers} layers, {per_layer / 1024:.1f} KiB/token/layer")
        ckpts = Term("activations: checkpoints", 0.0, phase="backward")
    else:
        recompute = per_layer - (4 * m.hidden if w == 4 else 0)  # fp32: the norm keeps the checkpoint itself
        layers = Term("activations: layers", recompute * t, phase="backward",
                      note=f"one recomputed layer, {recompute / 1024:.1f} KiB/token")
        if i.cpu_checkpointing:
            ckpts = Term("activations: checkpoints", 2 * w * m.hidden * t, kept_inputs, phase="backward",
                         note="layer inputs on the host; the GPU holds the copies in flight")
        elif i.offload_activations and i.accelerator == "cuda":
            # CheckpointHiddenStatesOffload (0.19.8 defaults): keep_last_count=1 input stays on the GPU and
            # max_fwd_stash_count=2 offloaded ones keep their GPU copy until restored; restored ones stay
            # cached on the GPU until the context exits unless that is changed (offload_keeps_restored)
            on_gpu = m.layers if i.offload_keeps_restored else min(m.layers, 3)
            why = ("all restored by the first layer's backward and kept (DeepSpeed's unpack cache)"
                   if i.offload_keeps_restored else "newest + 2 in flight")
            ckpts = Term("activations: checkpoints", on_gpu * w * m.hidden * t, (m.layers - 1) * w * m.hidden * t,
                         phase="backward", note=f"offloaded: {m.layers - 1} layer inputs on the host, "
                                                f"{on_gpu} on the GPU ({why})")
        else:
            ckpts = Term("activations: checkpoints", kept_inputs, phase="backward", note="each layer's input")
    other = Term("activations: other", other_activations(i), phase="backward", note="rope, final norm, ids")
    tmp = Term("backward temporaries", layer_backward_temporaries(i), phase="backward",
               note="a layer's output gradient + SwiGLU gradients"
                    + (f" (tiled MLP: {i.mlp_shards} tiles of {i.mlp_tile_tokens} tokens)" if i.mlp_tiled else ""))
    attn = Term("attention workspace", attention_workspace(i), phase="backward",
                note="eager softmax, O(N·K)" if i.attention_kernel == "eager" else "dq, dk, dv (+ fp32 accumulator)")
    loss = Term("logits/loss", loss_buffers(i, c), phase="backward",
                note=f"chunked CE, {min(i.loss_chunk, t)} tokens × {m.vocab} per chunk")
    # The loss backward runs before any layer is recomputed; a layer's MLP and attention backward
    # run one after the other. So the peak holds the larger of each pair, never both.
    layer_extra = tmp if tmp.gpu >= attn.gpu else attn
    if i.activation_checkpointing == "none":
        winner = max((tmp, attn, loss), key=lambda x: x.gpu)
        on_peak = {layers.name, winner.name}
    elif layers.gpu + layer_extra.gpu >= loss.gpu:
        on_peak = {layers.name, layer_extra.name}
    else:
        on_peak = {loss.name}
    on_peak |= {ckpts.name, other.name}
    return [replace(x, at_peak=x.name in on_peak) for x in (ckpts, layers, other, tmp, attn, loss)]


def estimate_memory(i: MemoryInputs) -> MemoryEstimate:
    """Per-GPU and per-node memory of one training step (see the module docstring for the model)."""
    c = i.param_counts()
    states = _model_state_terms(i, c) + [_comm_buffers(i, c)]
    acts = _activation_terms(i, c)
    persistent = sum(t.gpu for t in states if t.phase == "persistent")
    backward = sum(t.gpu for t in acts if t.at_peak) + sum(t.gpu for t in states if t.phase == "backward")
    step = sum(t.gpu for t in states if t.phase == "step")
    phase = "backward" if backward >= step else "optimizer step"
    states = [replace(t, at_peak=t.phase == "persistent" or (t.phase == "step") == (phase == "optimizer step"))
              for t in states]
    acts = [replace(t, at_peak=t.at_peak and phase == "backward") for t in acts]
    peak = persistent + max(backward, step)
    terms = states + acts
    if i.accelerator == "cuda":
        overhead = i.cuda_context_gb * GiB + i.fragmentation * peak
        terms.append(Term("framework overhead", overhead, i.host_process_gb * GiB,
                          note=f"CUDA context {i.cuda_context_gb:g} GiB + {i.fragmentation:.0%} fragmentation; "
                               f"host: {i.host_process_gb:g} GiB per rank process"))
    else:  # host memory is the device: the rank's process itself is part of its peak, and nothing else is
        overhead = i.cpu_process_gb * GiB
        terms.append(Term("framework overhead", overhead,
                          note=f"the rank's process before its model: {i.cpu_process_gb:g} GiB (measured)"))
    host_per_rank = sum(t.host for t in terms)
    if i.accelerator == "cpu":  # a rank's RSS is its "device" peak plus what is "offloaded" to the host
        host_per_rank += peak + overhead
    return MemoryEstimate(
        inputs=i, counts=c, terms=terms, gpu_peak=peak + overhead,
        host_per_node=host_per_rank * i.gpus_per_node, host_load_peak=_host_load_peak(i, c),
        peak_phase=phase, notes=_notes(i, c),
    )


def _host_load_peak(i: MemoryInputs, c: ParamCounts) -> float:
    """Host bytes per node while the model loads: every rank holds the whole model without zero.Init."""
    b = i.load_bytes_per_param or i.bytes_per_elem
    per_rank = b * (c.largest_module if i.uses_zero_init else c.total)
    process = i.host_process_gb if i.accelerator == "cuda" else i.cpu_process_gb
    return float((per_rank + process * GiB) * i.gpus_per_node)


def _notes(i: MemoryInputs, c: ParamCounts) -> list[str]:
    notes = []
    if i.sp > 1:
        if i.sp_mode == "s2_halo":
            notes.append(f"sp={i.sp} ({i.sp_mode}): {i.tokens_per_rank} tokens per rank; halos of "
                         + "/".join(f"{f:.0%}" for f in halo_fractions(i)) + " of L per head-half")
        else:
            notes.append(f"sp={i.sp} (ulysses): attention on all {i.seq_len} tokens with {i.model.heads // i.sp} of "
                         f"{i.model.heads} heads per rank"
                         + (" (KV heads repeated to 1 per rank)" if i.model.kv_heads < i.sp else "")
                         + f", everything else on {i.tokens_per_rank} tokens")
    if i.attention == "s2" and i.attention_kernel == "flash":
        notes.append("with flash/SDPA kernels S²-Attn saves compute, not memory (attention memory is O(N) either way)")
    if i.tiled_mlp:
        notes.append("tiled MLP: one tile (the plain MLP)" if not i.mlp_tiled else f"tiled MLP: {i.mlp_shards} tiles of {i.mlp_tile_tokens} tokens; the MLP saves only its input")
    if i.offload_activations and i.accelerator == "cuda" and i.offload_keeps_restored:
        notes.append("offload_activations: DeepSpeed 0.19.8 keeps every restored layer input on the GPU until the "
                     "backward ends, so the GPU peak is not lowered (only host memory grows)")
    if i.offload_activations and i.accelerator == "cpu":
        notes.append("offload_activations is a pass-through on CPU (DeepSpeed offloads nothing from a CPU device)")
    if i.zero_stage == 3 and i.uses_zero_init and i.lora:
        notes.append("zero.Init's F.linear keeps every linear's input, frozen ones too (+w·(h+I) per token per layer"
                     + ("; the MLP's only inside its tiles)" if i.mlp_tiled else ")"))
    return notes


def gib(x: float) -> float:
    """Bytes -> GiB, rounded for tables."""
    return round(x / GiB, 2) if math.isfinite(x) else x


# (recipe overrides that apply it, MemoryInputs changes), cheapest in step time first
_REMEDIES: list[tuple[str, dict]] = [
    ("--train.activation_checkpointing=deepspeed", {"activation_checkpointing": "layer"}),
    ("--zero.stage=3", {"zero_stage": 3}),
    ("--zero.offload_optimizer=true", {"offload_optimizer": True}),
    ("--train.activation_checkpointing=deepspeed --train.cpu_checkpointing=true",
     {"activation_checkpointing": "layer", "cpu_checkpointing": True}),
    ("--zero.stage=3 --zero.offload_param=true", {"zero_stage": 3, "offload_param": True}),
    ("--train.tiled_mlp=true", {"tiled_mlp": True}),
    ("--train.activation_checkpointing=hf --train.offload_activations=true",
     {"activation_checkpointing": "layer", "offload_activations": True, "cpu_checkpointing": False}),
]


def suggest(i: MemoryInputs, limit: int = 3) -> list[tuple[str, MemoryEstimate]]:
    """Up to ``limit`` combinations of one or two remedies (as recipe overrides) that make ``i`` fit."""
    import itertools

    found: list[tuple[str, MemoryEstimate]] = []
    for size in (1, 2):
        for combo in itertools.combinations(_REMEDIES, size):
            changes: dict = {}
            for _, ch in combo:
                changes.update(ch)
            if all(getattr(i, k) == v for k, v in changes.items()):
                continue
            try:
                est = estimate_memory(replace(i, **changes))
            except ValueError:
                continue
            if est.fits:
                found.append((" ".join(name for name, _ in combo), est))
        if found:
            break
    found.sort(key=lambda x: x[1].gpu_peak)
    return found[:limit]
