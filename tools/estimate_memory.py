#!/usr/bin/env python
"""Per-GPU and per-host memory of a LongLoRA (or full fine-tuning) run, and whether it fits.

    python tools/estimate_memory.py --model llama2-70b --seq-len 32768 --gpus 8 --zero 3 \\
        --offload-optimizer --offload-param --activation-checkpointing layer
    python tools/estimate_memory.py --model /models/Llama-2-7b-hf --seq-len 100000 --json
    python tools/estimate_memory.py --model llama3-8b --seq-len 1048576 --sp 8 --sp-mode ulysses \
        --tiled-mlp --offload-activations --host-memory-gb 2048
    python tools/estimate_memory.py --recipe launch/configs/tiny_cpu.yaml --gpus 2 --accelerator cpu \
        --host-memory-gb 24 [--section.key=value ...]

--model takes a known architecture (llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b,
mistral-7b, qwen2-7b), a local HF model directory or a config.json file; nothing is downloaded.
--recipe takes everything from a megalong recipe and runs the dry run (megalong.engine.dryrun),
which also counts parameters exactly on the meta device and renders the DeepSpeed JSON.
GB means GiB (2^30 bytes). Exit status: 0 fits, 1 does not fit, 2 bad arguments.
See megalong/utils/memory.py for what each row holds and the assumptions behind it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="known architecture name, HF model directory, or config.json")
    src.add_argument("--recipe", help="a megalong recipe YAML (dry run); extra --section.key=value override it")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (required with --model)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--gpus", "--gpus-per-node", dest="gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--zero", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-param", action="store_true")
    p.add_argument("--activation-checkpointing", default="layer", choices=("none", "layer"))
    p.add_argument("--cpu-checkpointing", action="store_true", help="DeepSpeed cpu_checkpointing")
    p.add_argument("--offload-activations", action="store_true",
                   help="ALST's checkpoint offload (train.offload_activations): layer inputs in host memory")
    p.add_argument("--offload-keeps-restored", action="store_true",
                   help="plan DeepSpeed 0.19.8's own activation offload, which keeps every restored input on the GPU "
                        "until the backward ends (no GPU saved); megalong's offload frees each one after its layer")
    p.add_argument("--tiled-mlp", action="store_true", help="DeepSpeed's TiledMLP (train.tiled_mlp)")
    p.add_argument("--tiled-mlp-shards", type=int, default=0, help="tiles per MLP call (0: ceil(tokens / hidden))")
    p.add_argument("--attention", default="s2", choices=("s2", "full"))
    p.add_argument("--group-size", type=int, default=None, help="S²-Attn group size (default seq_len/4)")
    p.add_argument("--attention-kernel", default="flash", choices=("flash", "eager"),
                   help="flash: flash-attn / SDPA (O(N) memory); eager: materialised softmax")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel degree")
    p.add_argument("--sp-mode", default="s2_halo", choices=("s2_halo", "ulysses"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True, help="LoRA+ (default)")
    mode.add_argument("--full-finetune", dest="lora", action="store_false")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--host-memory-gb", type=float, default=1024.0, help="per node")
    p.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: plan --gpus CPU ranks per node (DeepSpeed's CPU accelerator; host memory is the device)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_known_args(argv)


def load_shape(spec: str):
    """ModelShape from a known name, an HF directory or a config.json file."""
    from megalong.utils.memory import KNOWN_ARCHS, ModelShape, hf_config_from_dict

    if spec.lower() in KNOWN_ARCHS:
        return ModelShape.known(spec)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {spec!r} is neither a known architecture ({', '.join(KNOWN_ARCHS)}) nor an HF "
                         "model directory / config.json on this machine")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return ModelShape.from_hf_config(hf_config_from_dict(data), name=str(spec))


def from_flags(args: argparse.Namespace):
    from megalong.utils.memory import MemoryInputs, estimate_memory

    if args.seq_len is None:
        raise ValueError("--seq-len is required with --model")
    inputs = MemoryInputs(
        model=load_shape(args.model), seq_len=args.seq_len, micro_batch=args.micro_batch,
        gpus_per_node=args.gpus, nodes=args.nodes, sp=args.sp, sp_mode=args.sp_mode, zero_stage=args.zero,
        offload_optimizer=args.offload_optimizer, offload_param=args.offload_param,
        activation_checkpointing=args.activation_checkpointing, cpu_checkpointing=args.cpu_checkpointing,
        offload_activations=args.offload_activations, offload_keeps_restored=args.offload_keeps_restored,
        tiled_mlp=args.tiled_mlp, tiled_mlp_shards=args.tiled_mlp_shards,
        attention=args.attention, group_size=args.group_size, attention_kernel=args.attention_kernel,
        dtype=args.dtype, lora=args.lora, lora_r=args.lora_r, loss_chunk=args.loss_chunk,
        gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb, accelerator=args.accelerator,
    )
    return estimate_memory(inputs)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(argv)
    from megalong.config import ConfigError

    try:
        if args.recipe is not None:
            from megalong.config import load_config
            from megalong.engine.dryrun import dry_run

            report = dry_run(load_config(args.recipe, extra), nodes=args.nodes, gpus_per_node=args.gpus,
                             gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                             accelerator=args.accelerator)
            print(json.dumps(report.summary(), indent=1) if args.json else report.render())
            return 0 if report.fits else 1
        if extra:
            raise ValueError(f"unknown arguments {extra} (section.key overrides need --recipe)")
        est = from_flags(args)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=1) if args.json else est.render())
    return 0 if est.fits else 1


if __name__ == "__main__":
    sys.exit(main())
