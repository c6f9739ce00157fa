"""Checkpoints that cannot be trusted are never loaded, and a failed save loses nothing saved before.

Each case runs the real entry point (tests/dist/worker.py) on one rank: a checkpoint damaged after
the fact (truncated file) makes ``resume=auto`` fall back to the newest one that verifies and
continue with the uninterrupted run's losses; data changed under a run (same name, other content)
is refused with the file named; a disk that fills during a save (a tmpfs too small for a second
checkpoint) fails the run loudly while ``latest`` stays on the previous, intact checkpoint.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from megalong.engine import checkpoint as ckpt
from tests.assets import clean_shm, read_logs, run_ranks, step_losses, tiny_run_config

pytestmark = pytest.mark.dist


def _data_copy(assets, dest, split="train"):
    dest.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(assets[split] + ext, dest / ("train" + ext))
    return str(dest / "train")


def test_damaged_checkpoint_falls_back_and_changed_data_is_refused(assets, tmp_path):
    run = tmp_path / "run"
    prefix = _data_copy(assets, tmp_path / "data")
    cfg = tiny_run_config(assets, run, data={"prefixes": [prefix]})
    run_ranks(cfg, 1, tmp_path / "logs1")
    full = step_losses(run)
    ckpt_dir = run / "checkpoints"
    meta = ckpt.read_meta(ckpt_dir, "step_00000006")
    assert set(meta["fingerprint"]["data_files"]) == {prefix}
    assert any(k.endswith("optim_states.pt") for k in meta["manifest"])
    assert set(meta["manifest"]) >= {"rng_rank0.safetensors"} and not list(ckpt_dir.rglob("rng_rank*.pt"))

    # the newest checkpoint loses its tail after the fact (a copy cut short, a disk error)
    optim = next((ckpt_dir / "step_00000006").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    (run / "metrics.jsonl").write_text("")
    run_ranks(cfg, 1, tmp_path / "logs2", overrides=["--checkpoint.resume=auto"])
    log = read_logs(tmp_path / "logs2")
    assert "checkpoint step_00000006 is damaged, skipped" in log and optim.name in log
    assert "resumed from step_00000003" in log
    resumed = step_losses(run)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in (4, 5, 6)), (resumed, full)
    assert ckpt.verify(ckpt_dir, "step_00000006") is None  # saved again, whole

    # the data file is replaced by other content under the same name
    shutil.rmtree(tmp_path / "data")
    _data_copy(assets, tmp_path / "data", split="valid")
    codes = run_ranks(cfg, 1, tmp_path / "logs3", overrides=["--checkpoint.resume=auto", "--train.max_steps=9"],
                      expect=None)
    log = read_logs(tmp_path / "logs3")
    assert codes == [2], log
    assert f"data changed under the run: {prefix}.bin/.idx now hold other content" in log
    assert ckpt.find_resume_tag(ckpt_dir, "auto") == "step_00000006"  # nothing lost
    clean_shm()


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KiB tmpfs: room for one checkpoint of the tiny run (~0.5 MB + DeepSpeed's scripts), not two."""
    mnt = tmp_path / "run" / "checkpoints"
    mnt.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_save_fails_loudly_and_keeps_the_previous_checkpoint(assets, tmp_path, small_disk):
    run = tmp_path / "run"
    cfg = tiny_run_config(assets, run, checkpoint={"save_interval": 3})
    codes = run_ranks(cfg, 1, tmp_path / "logs", expect=None)
    log = read_logs(tmp_path / "logs")
    assert codes == [2], log
    assert "saving checkpoint step_00000006 failed" in log and "`latest` still names step_00000003" in log
    assert (small_disk / "latest").read_text() == "step_00000003"
    assert ckpt.read_meta(small_disk, "step_00000006") is None  # the partial save is not a checkpoint
    assert ckpt.find_resume_tag(small_disk, "auto") == "step_00000003"
    assert ckpt.verify(small_disk, "step_00000003") is None
    assert sorted(step_losses(run)) == [1, 2, 3, 4, 5, 6]
    clean_shm()
