"""A run that is killed, signalled, fed bad input or hits a NaN loses nothing already saved."""

from __future__ import annotations

import json
import shutil
import signal
import time

import numpy as np
import pytest
import yaml

from megalong.engine import checkpoint as ckpt
from tests.assets import (
    clean_shm,
    read_logs,
    run_ranks,
    start_ranks,
    step_losses,
    tiny_run_config,
    wait_ranks,
)

pytestmark = pytest.mark.dist


def test_kill_during_save_leaves_previous_checkpoint_loadable(assets, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run)
    codes = run_ranks(cfg, 1, tmp_path / "logs", worker_args=["--die-during-save-at", "6"], expect=None)
    assert codes == [9]
    ckpt_dir = run / "checkpoints"
    assert (ckpt_dir / "step_00000006").is_dir()  # DeepSpeed's files were written...
    assert ckpt.read_meta(ckpt_dir, "step_00000006") is None  # ...but the checkpoint is not complete
    assert (ckpt_dir / "latest").read_text() == "step_00000003"
    assert ckpt.find_resume_tag(ckpt_dir, "auto") == "step_00000003"

    run_ranks(cfg, 1, tmp_path / "logs2", overrides=["--checkpoint.resume=auto"])
    assert sorted(step_losses(run))[-3:] == [4, 5, 6]
    assert (ckpt_dir / "latest").read_text() == "step_00000006"
    assert ckpt.read_meta(ckpt_dir, "step_00000006")["step"] == 6
    clean_shm()


def test_sigterm_finishes_the_step_saves_and_exits_zero(assets, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run, train={"max_steps": 1000}, checkpoint={"save_interval": 0})
    procs = start_ranks(cfg, 2, tmp_path / "logs", worker_args=["--sleep-per-step", "0.3"])
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
    assert metrics.exists(), read_logs(tmp_path / "logs")
    for p in procs:  # what a cluster scheduler does: SIGTERM to every rank
        p.send_signal(signal.SIGTERM)
    codes = wait_ranks(procs, tmp_path / "logs", timeout=120)
    assert codes == [0, 0], read_logs(tmp_path / "logs")
    tag = (run / "checkpoints" / "latest").read_text()
    meta = ckpt.read_meta(run / "checkpoints", tag)
    last_step = max(step_losses(run))
    assert meta["step"] == last_step and 2 <= last_step < 1000
    clean_shm()


def _corrupt_copy(assets, tmp_path, how):
    d = tmp_path / "bad"
    d.mkdir()
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(assets["train"] + ext, d / ("train" + ext))
    prefix = str(d / "train")
    if how == "truncated":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 10)
    elif how == "vocab":
        meta = json.loads((d / "train.json").read_text())
        meta["max_token_id"] = assets["vocab_size"] + 100
        meta["vocab_size"] = assets["vocab_size"] + 101
        (d / "train.json").write_text(json.dumps(meta))
    return prefix


@pytest.mark.parametrize("case,expect_code,needle", [
    ("truncated", 4, "train.bin"),
    ("vocab", 4, "vocabulary has only"),
    ("config", 2, "does not divide"),
    ("group", 2, "attention.group_size"),
    ("window", 2, "set attention.group_size <= 16"),
])
def test_bad_input_fails_before_training(assets, tmp_path, case, expect_code, needle):
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run)
    overrides = []
    if case in ("truncated", "vocab"):
        cfg["data"]["prefixes"] = [_corrupt_copy(assets, tmp_path, case)]
    elif case == "config":
        overrides = ["--parallel.sp=3"]
    elif case == "group":
        overrides = ["--attention.group_size=33"]
    elif case == "window":  # a Mistral whose sliding window is smaller than the S²-Attn group (32)
        cfg["model"]["init_config"].update(model_type="mistral", sliding_window=16)
    codes = run_ranks(cfg, 1, tmp_path / "logs", overrides=overrides, expect=None)
    log = read_logs(tmp_path / "logs")
    assert codes == [expect_code], log
    assert needle in log
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()
    clean_shm()


def test_nan_loss_stops_with_diagnostic_and_keeps_weights(assets, tmp_path):
    """Policy stop: a NaN loss at step 5 stops the run (exit 3) with a diagnostic; the step-3
    checkpoint stays the latest and its weights were never touched by the NaN gradients."""
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run)
    codes = run_ranks(cfg, 1, tmp_path / "logs", expect=None, worker_args=["--nan-at-micro-steps", "5"])
    log = read_logs(tmp_path / "logs")
    assert codes == [3], log
    assert "non-finite loss/gradients at step 5" in log and "train.nan_policy=skip" in log
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    assert sorted(step_losses(run)) == [1, 2, 3, 4]
    clean_shm()


def test_nan_policy_skip_skips_the_step_and_matches_a_run_without_it(assets, tmp_path):
    """Policy skip: the poisoned step changes no weight (DeepSpeed skips the update), training goes on."""
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run, train={"nan_policy": "skip"})
    run_ranks(cfg, 1, tmp_path / "logs", worker_args=["--nan-at-micro-steps", "2"])
    log = read_logs(tmp_path / "logs")
    recs = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert recs[2]["skipped"] and not recs[1]["skipped"] and not recs[3]["skipped"], log
    assert "step skipped" in log
    assert all(np.isfinite(recs[s]["loss"]) for s in (1, 3, 4, 5, 6))
    assert ckpt.read_meta(run / "checkpoints", "step_00000006") is not None
    clean_shm()


ZERO_INIT_PROBE = r"""
import json, sys
from pathlib import Path
from megalong.config import config_from_dict
from megalong.config.deepspeed import render_deepspeed_config
from megalong.engine.setup import build_model, materialize_base_model
from megalong.data.tokenizer import load_tokenizer
from megalong.parallel.dims import ParallelDims, init_distributed
cfg = config_from_dict(json.loads(sys.argv[1]))
init_distributed(60)
dims = ParallelDims.from_env(1).build()
base = materialize_base_model(cfg, Path(cfg.train.run_dir), load_tokenizer(cfg.model.tokenizer), True, lambda: None)
model, _ = build_model(cfg, base, render_deepspeed_config(cfg, 1, "cpu"), dims)
frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
print(json.dumps({"frozen": len(frozen), "partitioned": sum(hasattr(p, "ds_id") for p in frozen),
                  "local_numel": sum(p.numel() for p in frozen), "full_numel": sum(p.ds_numel for p in frozen)}))
"""


def test_zero3_loads_the_base_partitioned(assets, tmp_path):
    """Under ZeRO-3 the base model is built inside zero.Init: no rank ever holds the whole of it."""
    import subprocess
    import sys

    from tests.assets import REPO, free_port, port_was_taken, rank_env

    cfg = tiny_run_config(assets, tmp_path / "run")
    for _attempt in range(3):  # a new port if the one picked was taken before the store bound it
        res = subprocess.run([sys.executable, "-c", ZERO_INIT_PROBE, json.dumps(cfg)], cwd=REPO,
                             env=rank_env(0, 1, free_port()), capture_output=True, text=True, timeout=300)
        clean_shm()
        if res.returncode == 0 or not port_was_taken(res.stderr):
            break
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["frozen"] > 0 and out["partitioned"] == out["frozen"]
    assert out["local_numel"] == 0 and out["full_numel"] > 100_000


def test_sigkill_of_a_rank_stops_the_run_naming_it_and_resume_continues_exactly(assets, tmp_path):
    """kill -9 of rank 1 mid-training under the real launcher: rank 0 stops at once (gloo sees the
    closed connection; at the latest after parallel.init_timeout_s) naming rank 1, the launcher exits
    non-zero, nothing is saved after the failure, and --checkpoint.resume=auto reproduces an
    uninterrupted run's losses bit for bit."""
    import os

    from tests.assets import free_port, port_was_taken, run_launcher, start_launcher, step_metric

    timeout_s = 30
    paths = {}
    for name in ("run", "ref"):
        cfg = tiny_run_config(assets, tmp_path / name, train={"max_steps": 9}, parallel={"init_timeout_s": timeout_s})
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    run, log = tmp_path / "run", tmp_path / "launcher.log"
    metrics = run / "metrics.jsonl"
    for _attempt in range(3):  # slowed down so that the kill lands mid-run, after the step-3 checkpoint
        proc = start_launcher(["--num_gpus", "2"], ["--sleep-per-step", "0.5", "--", "--config", str(paths["run"])],
                              log, free_port(), script="tests/dist/worker.py")
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and (
                not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
            time.sleep(0.1)
        if proc.poll() is None or not port_was_taken(log.read_text()):
            break
    assert proc.poll() is None and len(metrics.read_text().splitlines()) >= 4, log.read_text()[-4000:]
    victim = json.loads((run / "heartbeats" / "rank00001.json").read_text())["pid"]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    code = proc.wait(timeout=90)
    stopped_after = time.monotonic() - t0
    clean_shm()
    out = log.read_text()
    print(f"kill -9 of rank 1 -> launcher exit {code} after {stopped_after:.1f} s")
    assert code != 0 and stopped_after < timeout_s, (code, stopped_after, out[-4000:])
    assert f"stopped: rank 0: lost contact with rank 1 (pid {victim} on host " in out, out[-4000:]
    before = [json.loads(x) for x in metrics.read_text().splitlines()]
    killed_at = before[-1]["step"]
    ckpt_dir = run / "checkpoints"
    tag = (ckpt_dir / "latest").read_text()
    resume_step = ckpt.read_meta(ckpt_dir, tag)["step"]
    assert f"resume with --checkpoint.resume=auto from {ckpt_dir / tag}" in out
    assert resume_step in (3, 6) and resume_step <= killed_at < 9
    assert [t for _, t in ckpt.complete_tags(ckpt_dir)][-1] == tag  # nothing completed after the failure

    res = run_launcher(["--num_gpus", "2"], ["--config", str(paths["run"]), "--checkpoint.resume=auto"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = run_launcher(["--num_gpus", "2"], ["--config", str(paths["ref"])])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = [json.loads(x) for x in metrics.read_text().splitlines()][len(before):]
    assert [r["step"] for r in after] == list(range(resume_step + 1, 10))
    for key in ("loss", "grad_norm"):
        ref = step_metric(tmp_path / "ref", key)
        assert {r["step"]: r[key] for r in after} == {s: ref[s] for s in range(resume_step + 1, 10)}, key
        assert {r["step"]: r[key] for r in before} == {s: ref[s] for s in range(1, killed_at + 1)}, key


HUNG_PEER_PROBE = r"""
import datetime, json, os, signal, sys, time
import torch, torch.distributed as dist
from megalong.engine import liveness
from megalong.parallel.dims import ParallelDims
beats, rank = sys.argv[1], int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(sys.argv[2])))
dp = ParallelDims(world=2, sp=1, rank=rank).build().groups["dp"]  # a new group: must inherit the timeout
hb = liveness.Heartbeat(beats, rank, interval_s=0.2)
t = torch.ones(1)
dist.all_reduce(t)
hb.update(1)
if rank == 1:
    time.sleep(2.0)  # rank 0 waits inside all_reduce meanwhile
    dist.all_reduce(t)
    os.kill(os.getpid(), signal.SIGSTOP)  # hung: alive, sockets open, silent
first = liveness.read_beats(beats, 2)[0]["beat"]
t0 = time.monotonic()
dist.all_reduce(t)
out = {"beats_while_waiting": liveness.read_beats(beats, 2)[0]["beat"] - first, "waited": time.monotonic() - t0}
t0 = time.monotonic()
try:
    dist.all_reduce(t, group=dp)
except Exception as e:
    out["failed_after"] = time.monotonic() - t0
    out["error"] = str(liveness.lost_rank_error(e, beats, 0, 2, 1, "CKPT"))
print(json.dumps(out), flush=True)
os._exit(0)
"""


def test_a_hung_peer_is_named_after_the_process_group_timeout(tmp_path):
    """A peer that hangs with its sockets open (SIGSTOP) gives no connection error: the survivor's
    collective (on a data-parallel group, which torch would otherwise give a 30 min default) fails at
    the process-group timeout, and the heartbeats name the peer. Also: a live
    rank keeps beating while it waits inside a collective (what the cross-host diagnosis relies on)."""
    import subprocess
    import sys

    from tests.assets import REPO, free_port, port_was_taken, rank_env

    timeout_s = 3
    for _attempt in range(3):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-c", HUNG_PEER_PROBE, str(tmp_path / "beats"), str(timeout_s)],
                                  cwd=REPO, env=rank_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for r in range(2)]
        try:
            out, err = procs[0].communicate(timeout=60)
        finally:
            for p in procs:  # stopped or not, SIGKILL ends it
                p.kill()
                p.communicate()
        if procs[0].returncode == 0 or not port_was_taken(err):
            break
    assert procs[0].returncode == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    print({k: v for k, v in res.items() if k != "error"})
    assert res["waited"] > 1.5 and res["beats_while_waiting"] >= 3, res
    assert timeout_s - 0.5 < res["failed_after"] < timeout_s + 5, res
    assert res["error"].startswith(f"rank 0: lost contact with rank 1 (pid {procs[1].pid} on host "), res
    assert "the process is stopped; last seen at step 1" in res["error"]
    assert "during all_reduce after step 1 (process-group timeout)" in res["error"] and "from CKPT" in res["error"]
