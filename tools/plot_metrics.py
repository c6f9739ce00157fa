#!/usr/bin/env python
"""Plot a run's loss curve (and validation loss, learning rate) from RUN_DIR/metrics.jsonl to a PNG.

    python tools/plot_metrics.py --run runs/quickstart/extend_run --out loss.png [--run other_run ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="run directory (repeat to overlay runs)")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)

    from megalong.utils.optional import MissingOptional, require

    try:
        matplotlib = require("matplotlib", "plot", "plot_metrics.py")
    except MissingOptional as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megalong.utils.metrics import read_metrics

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    plotted = 0
    for run in args.run:
        recs = read_metrics(run)
        train = [r for r in recs if "loss" in r]
        if not train:
            print(f"warning: {run}/metrics.jsonl has no training steps", file=sys.stderr)
            continue
        name = Path(run).name
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
        val = [r for r in recs if "val_loss" in r]
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label=f"{name} valid")
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], label=name)
        plotted += 1
    if not plotted:
        print("error: nothing to plot", file=sys.stderr)
        return 2
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
