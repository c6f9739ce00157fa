"""Text rendering of a memory estimate: one table of terms, the totals and the verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megalong.utils.memory import MemoryEstimate

GiB = float(2**30)


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def describe_inputs(est: MemoryEstimate) -> str:
    """One paragraph: model, length, layout and the memory-relevant switches."""
    i, c = est.inputs, est.counts
    mode = f"LoRA+ r={i.lora_r}" if i.lora else "full fine-tune"
    ckpt = i.activation_checkpointing + (" (cpu_checkpointing)" if i.cpu_checkpointing else "") + (
        " (offload_activations)" if i.offload_activations else "")
    offload = [n for n, on in (("optimizer", i.offload_optimizer), ("params", i.offload_param)) if on]
    attn = f"S²-Attn G={i.group}" if i.attention == "s2" else "full"
    return (
        f"model {i.model.name}: {_params(c.total)} params, {_params(c.trainable)} trainable ({mode})\n"
        f"seq_len {i.seq_len} × micro_batch {i.micro_batch}, {i.nodes} node(s) × {i.gpus_per_node} GPUs "
        f"(world {i.world}, dp {i.dp}, sp {i.sp}: {i.tokens_per_rank} tokens per GPU)\n"
        f"ZeRO-{i.zero_stage}, offload: {', '.join(offload) or 'none'}, activation checkpointing: {ckpt}, "
        f"attention: {attn} ({i.attention_kernel} kernel), sp_mode {i.sp_mode}, "
        f"MLP: {f'tiled ({i.mlp_shards} tiles)' if i.tiled_mlp else 'whole'}, dtype {i.dtype}, accelerator {i.accelerator}"
    )


def render_estimate(est: MemoryEstimate) -> str:
    """The table (GiB per GPU, GiB per rank on the host), totals and verdict."""
    i = est.inputs
    lines = [describe_inputs(est), ""]
    device = "rank GiB" if i.accelerator == "cpu" else "GPU GiB"
    lines.append(f"{'term':<28} {device:>8} {'host GiB':>8}  {'phase':<10} note")
    lines.append("-" * 100)
    for t in est.terms:
        if t.gpu == 0 and t.host == 0:
            continue
        mark = " " if t.at_peak or t.gpu == 0 else "*"
        lines.append(f"{t.name:<28} {_gib(t.gpu)}{mark}{_gib(t.host)}  {t.phase:<10} {t.note}")
    lines.append("-" * 100)
    peak_name = "per-rank peak (RSS)" if i.accelerator == "cpu" else "per-GPU peak"
    lines.append(f"{peak_name:<28} {_gib(est.gpu_peak)}           (peak during the {est.peak_phase}; "
                 f"* = not at the same moment)")
    lines.append(f"{'host per node':<28} {'':>8} {_gib(est.host_per_node)}  "
                 f"(while loading: {est.host_load_peak / GiB:.1f} GiB)")
    gpu_ok = "fits" if est.fits_gpu else "DOES NOT FIT"
    host_ok = "fits" if est.fits_host else "DOES NOT FIT"
    if i.accelerator == "cpu":
        lines.append(f"verdict: {i.gpus_per_node} CPU rank(s) × {est.gpu_peak / GiB:.1f} GiB (host memory is the "
                     f"device) -> host {max(est.host_per_node, est.host_load_peak) / GiB:.1f} / "
                     f"{i.host_memory_gb:g} GiB -> {'FITS' if est.fits else 'DOES NOT FIT'}")
    else:
        lines.append(f"verdict: GPU {est.gpu_peak / GiB:.1f} / {i.gpu_memory_gb:g} GiB {gpu_ok}; host "
                     f"{max(est.host_per_node, est.host_load_peak) / GiB:.1f} / {i.host_memory_gb:g} GiB {host_ok} "
                     f"-> {'FITS' if est.fits else 'DOES NOT FIT'}")
    for note in est.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
