#!/usr/bin/env python
"""Generate text from a converted model with full attention and a KV cache, streaming the output.

    python tools/generate.py --model out/x-hf --prompt "def parse_args(" --max-new-tokens 64
    python tools/generate.py --model out/x-hf --prompt-file long_prompt.txt --temperature 0.7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (with tokenizer files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--no-stream", action="store_true", help="print only at the end")
    args = p.parse_args(argv)

    import torch
    from transformers import TextStreamer

    from megalong.config import ConfigError
    from megalong.eval.loading import load_model_and_tokenizer

    try:
        model, tok, device = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and ids.shape[1] + args.max_new_tokens > ctx:
        print(f"warning: prompt ({ids.shape[1]} tokens) + {args.max_new_tokens} new tokens exceeds the model's "
              f"max_position_embeddings={ctx}", file=sys.stderr)
    torch.manual_seed(args.seed)
    streamer = None if args.no_stream else TextStreamer(tok, skip_prompt=True)
    sample = args.temperature > 0
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=sample,
        temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
        use_cache=True, streamer=streamer, pad_token_id=tok.eos_token_id,
    )
    if streamer is None:
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
