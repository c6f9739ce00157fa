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
    p.add_argument("--dump-first-step", default=None,
                   help="write the full fp32 gradients of the first optimizer step and the fp32 weights before and "
                        "after it to this .pt file (rank 0; every rank takes part in gathering them)")
    p.add_argument("--mutate-grad-scale", type=float, default=None,
                   help="MUTATION for checking the parity tests: scale the last rank's loss (so its gradient) by this")
    args, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.dump_first_step:
        dump_first_step(args.dump_first_step)
    if args.mutate_grad_scale is not None:
        mutate_grad_scale(args.mutate_grad_scale)

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


def dump_first_step(path: str) -> None:
    """Wrap the engine's step: at the first gradient-accumulation boundary save the full gradients
    (before clipping and the update) and the fp32 weights before and after the optimizer step."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from megalong.engine.trainer import Trainer

    real_build = Trainer._build_engine

    def build(self):
        real_build(self)
        engine, real_step, done = self.engine, self.engine.step, []

        def full(fn):
            return {n: fn(p).detach().float().cpu().clone() for n, p in engine.module.named_parameters()
                    if p.requires_grad}

        def step(*a, **k):
            if done or not engine.is_gradient_accumulation_boundary():
                return real_step(*a, **k)
            done.append(True)
            grads, before = full(safe_get_full_grad), full(safe_get_full_fp32_param)
            lr = float(self.scheduler.get_last_lr()[0])  # the LR this update uses
            out = real_step(*a, **k)
            after = full(safe_get_full_fp32_param)
            if self.is_main:
                torch.save({"grads": grads, "before": before, "after": after, "lr": lr}, path)
            return out

        engine.step = step

    Trainer._build_engine = build


def mutate_grad_scale(factor: float) -> None:
    """A deliberate bug for checking that the parity tests catch it: the last rank's gradients x factor."""
    import torch.distributed as dist

    from megalong.engine.trainer import Trainer

    real_build = Trainer._build_engine

    def build(self):
        real_build(self)
        engine, real_backward = self.engine, self.engine.backward
        last = dist.get_world_size() - 1 if dist.is_initialized() else 0

        def backward(loss, *a, **k):
            return real_backward(loss * factor if self.rank == last else loss, *a, **k)

        engine.backward = backward

    Trainer._build_engine = build


if __name__ == "__main__":
    sys.exit(main())
