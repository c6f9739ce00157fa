#!/usr/bin/env python
"""Passkey retrieval accuracy per length and depth (LongLoRA's protocol), JSON + heat-map PNG.

    python tools/passkey.py --model out/x-hf --lengths 512 1024 --trials 10 --out runs/q/passkey
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (with tokenizer files)")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    p.add_argument("--trials", type=int, default=10, help="trials per length (per depth with --depths)")
    p.add_argument("--depths", type=float, nargs="*", default=None,
                   help="fixed key depths in [0,1] for a heat-map (default: uniform random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines on stderr")
    args = p.parse_args(argv)

    from megalong.config import ConfigError
    from megalong.eval import run_passkey
    from megalong.eval.loading import load_model_and_tokenizer
    from megalong.eval.passkey import plot_heatmap
    from megalong.utils.logging import setup_logging
    from megalong.utils.optional import MissingOptional

    setup_logging("INFO", rank=0)

    try:
        model, tok, device = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_passkey(
        model, lambda s: tok.encode(s, add_special_tokens=False), lambda ids: tok.decode(ids),
        args.lengths, trials=args.trials, depths=args.depths, seed=args.seed, device=device,
        progress=not args.no_progress,
    )
    summary = {"model": args.model, **report.to_dict()}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        try:
            plot_heatmap(report, str(out.with_suffix(".png")))
        except MissingOptional as e:  # the JSON holds every result; only the picture is missing
            print(f"warning: {out.with_suffix('.png')} not written: {e}", file=sys.stderr)
    print(json.dumps({"model": args.model, "accuracy_by_length": summary["accuracy_by_length"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
