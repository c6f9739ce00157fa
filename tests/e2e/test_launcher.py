"""The real `deepspeed` launcher on the tiny recipe: 2 local ranks, and once with a localhost hostfile."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from megalong.engine import checkpoint as ckpt
from tests.assets import run_launcher, tiny_run_config

pytestmark = pytest.mark.e2e


def _launch(args: list[str], cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    cfg_path = tmp_path / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = run_launcher(args, ["--config", str(cfg_path), "--train.max_steps=4", "--checkpoint.save_interval=2"])
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
        assert (run / "checkpoints" / tag / f"rng_rank{r}.safetensors").is_file()
    assert (run / "base_model" / "config.json").is_file()  # the tiny recipe's base saved as an HF dir


def test_launcher_two_local_ranks(assets, tmp_path):
    run = tmp_path / "run"
    res = _launch(["--num_gpus", "2"], tiny_run_config(assets, run), tmp_path)
    assert "run directory:" in res.stdout
    out = res.stdout + res.stderr  # not a terminal: a progress line per log interval (1 step here), rank 0 only
    lines = [ln for ln in out.splitlines() if "| loss " in ln and " train " in ln]
    assert [ln.split(" train ")[1].split(" ")[0] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"], lines
    assert "ETA" in lines[0] and "tok s" in lines[0] and "elapsed" in lines[-1] and "rank0" in lines[0]
    _check_run(run, 2)


def test_launcher_localhost_hostfile(assets, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    _launch(["--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1"],
            tiny_run_config(assets, run, zero={"stage": 2}), tmp_path)
    _check_run(run, 2)
