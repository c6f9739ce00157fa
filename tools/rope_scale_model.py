#!/usr/bin/env python
"""Copy an HF model with RoPE scaling set for a longer context and no training: the
"interpolated but untrained" baseline every context-extension result should be compared with.

    python tools/rope_scale_model.py --model base_hf --target-length 1024 --output base_pi_hf [--type linear]
    python tools/rope_scale_model.py ... --type theta --theta 1e6     (a new RoPE base only, "ABF")
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--target-length", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--type", default="linear", choices=["linear", "dynamic", "yarn", "llama3", "theta"])
    p.add_argument("--theta", type=float, default=None, help="new RoPE base (rope.theta); needed for --type theta")
    args = p.parse_args(argv)

    from megalong.config import ConfigError, ModelConfig, RopeConfig
    from megalong.models import apply_rope_scaling, build_hf_config, plan_rope_scaling, write_config_json

    src, out = Path(args.model), Path(args.output)
    try:
        cfg = build_hf_config(ModelConfig(name_or_path=str(src)))
        scaling = plan_rope_scaling(cfg, RopeConfig(type=args.type, theta=args.theta), args.target_length)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    apply_rope_scaling(cfg, scaling)
    write_config_json(cfg, tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"wrote {out} (rope {scaling.type}, factor {scaling.factor:g}, θ {scaling.theta:g}, "
          f"context {scaling.target_length})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
