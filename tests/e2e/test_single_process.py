"""`python launch/pretrain_extend.py --config ...` as one plain process, without the deepspeed launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from megalong.engine import checkpoint as ckpt
from tests.assets import REPO, clean_shm, tiny_run_config

pytestmark = pytest.mark.e2e

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def test_plain_python_trains_and_saves(assets, tmp_path):
    run = tmp_path / "run"
    cfg_path = tmp_path / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_run_config(assets, run)))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("MALLOC_")}
    for key in ("MEGALONG_CPU_MALLOC", "LD_PRELOAD"):  # the launch path's default allocator policy
        env.pop(key, None)
    cmd = [sys.executable, "launch/pretrain_extend.py", "--config", str(cfg_path), "--train.max_steps=2",
           "--checkpoint.save_interval=2", "--train.eval_interval=0", "--attention.full_last_steps=1"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    clean_shm()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "running as a single process" in out and "RANK=0 WORLD_SIZE=1" in out
    if not torch.cuda.is_available():  # CPU ranks get the launch path's allocator policy
        assert "allocator: glibc with a fixed mmap threshold" in out, out[-4000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] > 0 for r in recs)
    assert [r["attention"] for r in recs] == ["s2", "full"]  # attention.full_last_steps=1 switched the last step
    assert "steps 2..2 train with full attention (before: s2)" in out
    tag = (run / "checkpoints" / "latest").read_text()
    assert tag == "step_00000002" and ckpt.read_meta(run / "checkpoints", tag)["world_size"] == 1
