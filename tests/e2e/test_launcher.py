"""The real `deepspeed` launcher on the tiny recipe: 2 local ranks, and once with a localhost hostfile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megalong.engine import checkpoint as ckpt
from tests.assets import REPO, clean_shm, free_port, rank_env, tiny_run_config

pytestmark = pytest.mark.e2e

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def _launch(args: list[str], cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    cfg_path = tmp_path / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = rank_env(0, 1, 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [DEEPSPEED, *args, "--master_port", str(free_port()), "launch/pretrain_extend.py",
           "--config", str(cfg_path), "--train.max_steps=4", "--checkpoint.save_interval=2"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    clean_shm()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def _check_run(run: Path, world: int) -> None:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb"):
            assert key in r, key
        assert r["tokens"] == 2 * world * 128 and r["loss"] > 0 and r["tokens_per_s"] > 0
    tag = (run / "checkpoints" / "latest").read_text()
    meta = ckpt.read_meta(run / "checkpoints", tag)
    assert tag == "step_00000004" and meta["world_size"] == world and meta["consumed_samples"] == 4 * 2 * world
    assert (run / "config.yaml").is_file() and json.loads((run / "ds_config.json").read_text())[
        "train_batch_size"] == 2 * world
    for r in range(world):
        assert (run / "checkpoints" / tag / f"rng_rank{r}.pt").is_file()
    assert (run / "base_model" / "config.json").is_file()  # the tiny recipe's base saved as an HF dir


def test_launcher_two_local_ranks(assets, tmp_path):
    run = tmp_path / "run"
    res = _launch(["--num_gpus", "2"], tiny_run_config(assets, run), tmp_path)
    assert "run directory:" in res.stdout
    _check_run(run, 2)


def test_launcher_localhost_hostfile(assets, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    _launch(["--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1"],
            tiny_run_config(assets, run, zero={"stage": 2}), tmp_path)
    _check_run(run, 2)
