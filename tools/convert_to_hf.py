#!/usr/bin/env python
"""Turn a megalong training checkpoint into a merged Hugging Face model (or a PEFT adapter).

    python tools/convert_to_hf.py --run runs/x --output out/x-hf            # merged, safetensors
    python tools/convert_to_hf.py --run runs/x --output out/x-adapter --adapter-only

Reads the ZeRO-2/3 partitions of any rank count itself (no zero_to_fp32 step), merges LoRA into
the base weights recorded in the run, writes rope_scaling / max_position_embeddings and the
tokenizer. Writes nothing into --output unless the whole export succeeds.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # conversion never needs an accelerator

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    p.add_argument("--output", required=True, help="new directory to write")
    p.add_argument("--tag", default="latest", help="checkpoint tag (default: newest complete)")
    p.add_argument("--base", default=None, help="base model directory (default: the one recorded in the run)")
    p.add_argument("--adapter-only", action="store_true", help="write a PEFT adapter instead of a merged model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="output dtype (auto: the base's)")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size")
    args = p.parse_args(argv)

    import torch

    from megalong.config import ConfigError
    from megalong.engine.export import ExportError, export_adapter, export_hf

    try:
        if args.adapter_only:
            out = export_adapter(args.run, args.output, tag=args.tag, base=args.base)
        else:
            dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
            out = export_hf(args.run, args.output, tag=args.tag, base=args.base, dtype=dtype,
                            max_shard_bytes=int(args.max_shard_size_gb * 2**30))
    except (ExportError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
