#!/usr/bin/env python
"""Passkey retrieval accuracy per length and depth (LongLoRA's protocol), JSON + heat-map PNG.

    python tools/passkey.py --model out/x-hf --lengths 512 1024 --trials 10 --out runs/q/passkey
    deepspeed --num_gpus 4 tools/passkey.py --model out/x-hf --lengths 131072 --sp 4 --out runs/q/passkey

With ``--sp K`` (K processes from the launcher) every prompt is split over K ranks and each answer
token re-runs the sharded forward (greedy argmax, megalong.eval.sp); only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megalong.eval.sp import add_sp_arguments


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
    add_sp_arguments(p)
    args = p.parse_args(argv)

    from megalong.config import ConfigError
    from megalong.eval import run_passkey
    from megalong.eval.loading import load_model_and_tokenizer
    from megalong.eval.passkey import plot_heatmap, unapplied_processors
    from megalong.eval.sp import finish_eval_parallel, start_eval_parallel
    from megalong.utils.logging import setup_logging
    from megalong.utils.optional import MissingOptional

    rank = int(os.environ.get("RANK", 0))
    setup_logging("INFO", rank=rank)

    try:
        parallel, rank, device = start_eval_parallel(args.sp, args.sp_mode, env=os.environ, device=args.device,
                                                     timeout_s=args.timeout_s, tool="tools/passkey.py")
        model, tok, device = load_model_and_tokenizer(args.model, dtype=args.dtype, device=str(device))
        if parallel is not None:
            from megalong.attention import use_full_attention

            use_full_attention(model)  # the registered attention that reads sp_context
            if rank == 0 and unapplied_processors(model):
                print(f"warning: --sp decodes by plain argmax; the model's generation_config sets "
                      f"{', '.join(unapplied_processors(model))}, which --sp 1 (generate) applies and --sp "
                      f"{args.sp} does not", file=sys.stderr)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        finish_eval_parallel(barrier=False)
        return 2
    report = run_passkey(
        model, lambda s: tok.encode(s, add_special_tokens=False), lambda ids: tok.decode(ids),
        args.lengths, trials=args.trials, depths=args.depths, seed=args.seed, device=device,
        progress=not args.no_progress and rank == 0, parallel=parallel,
    )
    finish_eval_parallel()
    if rank != 0:
        return 0
    summary = {"model": args.model, "sp": args.sp, "sp_mode": args.sp_mode, **report.to_dict()}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        try:
            plot_heatmap(report, str(out.with_suffix(".png")))
        except MissingOptional as e:  # the JSON holds every result; only the picture is missing
            print(f"warning: {out.with_suffix('.png')} not written: {e}", file=sys.stderr)
    print(json.dumps({"model": args.model, "accuracy_by_length": summary["accuracy_by_length"], "sp": args.sp,
                      "sp_mode": args.sp_mode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
