#!/usr/bin/env python
"""Long-context instruction fine-tuning (LongAlpaca-style data, prompt tokens masked) with LongLoRA.

    deepspeed --num_gpus 8 launch/finetune_sft.py --config launch/configs/llama2_7b_sft_32k.yaml

Data: tools/preprocess_data.py --sft writes the token and loss-mask files this reads (data.kind=sft).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], __doc__.splitlines()[0], force_kind="sft"))
