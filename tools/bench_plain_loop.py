#!/usr/bin/env python
"""The baseline of the engine-overhead benchmark: a minimal hand-written DeepSpeed + transformers + peft
training loop, one rank of it (start with ``deepspeed --num_gpus K``).

    deepspeed --num_gpus 2 tools/bench_plain_loop.py --run RUN_DIR --steps 10 --out plain.json

It trains what megalong's run in RUN_DIR trained, with none of megalong: the same base model
(RUN_DIR/base_model), the same DeepSpeed JSON (RUN_DIR/ds_config.json: ZeRO stage, optimizer, clipping),
LoRA on the same projections with the same rank/alpha plus the embedding and norms trainable (LoRA+),
rows of the same shape (random tokens), stock SDPA attention, the loss transformers computes from full
logits. Rank 0 writes each step's wall time. tools/bench_train.py --part overhead compares the two.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a megalong run directory (its config and base)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args()

    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    ds = json.loads((args.run / "ds_config.json").read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    hf = AutoConfig.from_pretrained(args.run / "base_model")
    hf._attn_implementation = "sdpa"
    torch.manual_seed(cfg["train"]["seed"])
    model = AutoModelForCausalLM.from_pretrained(args.run / "base_model", config=hf, torch_dtype=torch.float32)
    lora = cfg["lora"]
    if lora["enabled"]:
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=list(lora["targets"]), task_type="CAUSAL_LM"))
        for name, param in model.named_parameters():
            if ("embed" in lora["trainable"] and "embed_tokens" in name) or ("norm" in lora["trainable"]
                                                                              and "norm" in name):
                param.requires_grad_(True)
    if cfg["train"].get("activation_checkpointing", "none") != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[q for q in model.parameters() if q.requires_grad])
    micro, n, vocab = cfg["train"]["micro_batch_size"], cfg["data"]["max_seq_len"], hf.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (micro, n), generator=gen)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        dist.all_reduce(torch.zeros(1))  # megalong's step ends with an all-reduce of its metrics too
        times.append(time.perf_counter() - t0)
    if rank == 0:
        args.out.write_text(json.dumps({"world": world, "micro": micro, "seq_len": n, "step_s": times}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
