"""One rank of a test run: the real entry point (launch/_entry.py), optionally with a fault injected.

    python -m tests.dist.worker [--die-during-save-at STEP] -- --config cfg.yaml [--a.b=c ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--die-during-save-at", type=int, default=None,
                   help="os._exit(9) after DeepSpeed wrote the checkpoint files of this step, before it is complete")
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="slow training down (signal tests)")
    p.add_argument("--nan-at-micro-steps", type=int, nargs="*", default=(),
                   help="make the loss NaN (through the graph: hidden states x NaN) at these training forwards")
    args, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]

    if args.die_during_save_at is not None:
        from megalong.engine import checkpoint

        real = checkpoint.mark_complete

        def dying(ckpt_dir, tag, meta):
            if meta["step"] == args.die_during_save_at:
                os._exit(9)
            return real(ckpt_dir, tag, meta)

        checkpoint.mark_complete = dying
    if args.sleep_per_step:
        import time

        from megalong.engine.trainer import Trainer

        real_step = Trainer.train_step

        def slow(self):
            time.sleep(args.sleep_per_step)
            return real_step(self)

        Trainer.train_step = slow

    if args.nan_at_micro_steps:
        from megalong.engine.model import TrainModule

        real_forward = TrainModule.forward
        calls = {"n": 0}

        def poisoned(self, input_ids, labels, position_ids=None, segment_ids=None):
            if self.training:
                calls["n"] += 1
                if calls["n"] in args.nan_at_micro_steps:
                    out = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                    hidden = out.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
                    return self.loss_head(hidden * float("nan"), labels)
            return real_forward(self, input_ids, labels, position_ids, segment_ids)

        TrainModule.forward = poisoned

    from _entry import run

    return run(rest, "test worker")


if __name__ == "__main__":
    sys.exit(main())
