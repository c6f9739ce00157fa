"""`python launch/finetune_sft.py --config ...` as one plain process, without the deepspeed launcher,
on chat data (``tools/preprocess_data.py --sft chat``): the loss counts exactly the assistant tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from megalong.engine import checkpoint as ckpt
from tests.assets import REPO, build_chat_tokenizer, clean_shm, tiny_run_config

pytestmark = pytest.mark.e2e

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _chat_dataset(assets, d) -> tuple[str, str, list[str]]:
    """A SmolLM2-Instruct-style tokenizer and a small multi-turn chat set (messages + ShareGPT)."""
    from megalong.data.preprocess import preprocess

    tok = build_chat_tokenizer(assets["spm"], d / "tok")
    replies, lines = [], []
    for k in range(6):
        a, b = k + 2, 3 * k + 1
        turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
                 {"role": "assistant", "content": f"It is {a + b}."},
                 {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"{2 * (a + b)}."}]
        replies += [t["content"] for t in turns if t["role"] == "assistant"]
        if k % 2:
            lines.append({"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]],
                                             "value": t["content"]} for t in turns]})
        else:
            lines.append({"messages": [{"role": "system", "content": "Answer with a number."}, *turns]})
    (d / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    preprocess([d / "chat.jsonl"], d / "chat", tok, workers=0, sft_template="chat", progress=False)
    return tok, str(d / "chat"), replies


def test_plain_python_trains_chat_sft_and_saves(assets, tmp_path):
    tok, prefix, replies = _chat_dataset(assets, tmp_path)
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run, data={"kind": "sft", "prefixes": [prefix], "valid_prefixes": [],
                                             "packing": True, "doc_mask": True, "reset_position_ids": True,
                                             "seed": 7})
    cfg["model"]["tokenizer"] = tok
    cfg["model"]["init_config"]["vocab_size"] = assets["vocab_size"] + 2  # + <|im_start|>, <|im_end|>
    cfg_path = tmp_path / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("MALLOC_")}
    for key in ("MEGALONG_CPU_MALLOC", "LD_PRELOAD"):  # the launch path's default allocator policy
        env.pop(key, None)
    cmd = [sys.executable, "launch/finetune_sft.py", "--config", str(cfg_path), "--train.max_steps=2",
           "--checkpoint.save_interval=2", "--train.eval_interval=0",
           "--attention.full_last_steps=1"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    clean_shm()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "running as a single process" in out and "RANK=0 WORLD_SIZE=1" in out
    if not torch.cuda.is_available():  # CPU ranks get the launch path's allocator policy: a tiny model's is glibc's
        assert "allocator: glibc's default policy (auto: activations of" in out, out[-4000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] > 0 for r in recs)
    assert [r["attention"] for r in recs] == ["s2", "full"]  # attention.full_last_steps=1 switched the last step
    assert "steps 2..2 train with full attention (before: s2)" in out
    tag = (run / "checkpoints" / "latest").read_text()
    assert tag == "step_00000002" and ckpt.read_meta(run / "checkpoints", tag)["world_size"] == 1
    assert (run / "base_model" / "chat_template.jinja").is_file()  # an export keeps the template

    # the loss is normalised by the assistant tokens of the step's rows: reply text + <|im_end|>, nothing else
    from megalong.data import IndexedDataset, SFTDataset
    from megalong.data.sft import mask_prefix
    from megalong.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    mask = IndexedDataset(mask_prefix(prefix))
    ds = SFTDataset(prefix, 128, num_samples=4, seed=7, pad_id=t.eos_id,
                    packing=True, reset_position_ids=True)  # the run's index (same cache key)
    assert ds.truncated_examples == 0
    for r, step in zip(recs, (0, 2)):
        rows = [ds[i] for i in (step, step + 1)]
        examples = ds.order[int(ds.row_bounds[step]): int(ds.row_bounds[step + 2])]
        assert r["valid_tokens"] == sum(int(mask[int(e)].sum()) for e in examples) < r["tokens"]
        for row in rows:
            valid = np.concatenate([[0], (row["labels"] != -100).astype(int), [0]])
            edges = np.flatnonzero(np.diff(valid))
            for a, b in zip(edges[::2], edges[1::2]):
                text = t.decode(row["labels"][a:b].tolist())
                assert text.endswith("<|im_end|>") and text[:-len("<|im_end|>")] in replies, text
