#!/usr/bin/env python
"""Turn a GGUF model file (llama.cpp) into a plain Hugging Face directory megalong can train and evaluate.

    pip install gguf
    python tools/import_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m-instruct

Weights are dequantized (fp32 by default), the config loses its quantization fields, the tokenizer
keeps its chat template; the written directory is reloaded with stock transformers and must give
the same logits as the GGUF-loaded model, else nothing is kept.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="path of the .gguf file")
    p.add_argument("--out", required=True, help="new HF model directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the dequantized weights (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)

    from megalong.config import ConfigError
    from megalong.models.gguf import import_gguf

    try:
        summary = import_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
