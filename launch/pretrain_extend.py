#!/usr/bin/env python
"""Extend a pretrained model's context with LongLoRA (S²-Attn + LoRA+ + RoPE scaling) on DeepSpeed.

    deepspeed --num_gpus 8 launch/pretrain_extend.py --config launch/configs/llama2_7b_100k.yaml
    deepspeed --hostfile hostfile launch/pretrain_extend.py --config ... --train.run_dir=runs/x
    python launch/pretrain_extend.py --config launch/configs/llama2_70b_32k.yaml --dry-run --nodes 1

On a CPU-only machine: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 ... (see README).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], __doc__.splitlines()[0]))
