"""Training checkpoints that describe themselves and survive a kill during save.

    RUN_DIR/checkpoints/
      step_00000040/                  DeepSpeed's files (model/optimizer partitions)
        rng_rank{r}.pt                per-rank RNG states (python, numpy, torch)
        megalong.json                 written last, by rank 0: step, consumed samples, config,
                                      code version, probe loss  ==> "this checkpoint is complete"
      latest                          tag of the newest complete checkpoint (DeepSpeed's format),
                                      replaced atomically only after megalong.json exists

A process killed during save leaves a tag directory without ``megalong.json``; ``latest`` still
names the previous checkpoint, and ``find_resume_tag`` never picks an incomplete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import megalong

COMPLETE_MARKER = "megalong.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def code_version() -> str:
    """megalong version plus the git commit of the source tree, if it is a checkout."""
    here = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{megalong.__version__}+{sha}" if sha else megalong.__version__


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(tag_dir: Path, rank: int) -> None:
    tmp = tag_dir / f".rng_rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, tag_dir / f"rng_rank{rank}.pt")


def load_rng(tag_dir: Path, rank: int) -> bool:
    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_complete(ckpt_dir: Path, tag: str, meta: dict) -> None:
    """Rank 0, after every rank finished writing: the marker, then the ``latest`` pointer."""
    meta = dict(meta, tag=tag, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_atomic(ckpt_dir / tag / COMPLETE_MARKER, json.dumps(meta, indent=2, sort_keys=True, default=str))
    _write_atomic(ckpt_dir / LATEST, tag)


def read_meta(ckpt_dir: Path, tag: str) -> dict | None:
    path = Path(ckpt_dir) / tag / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    out = []
    if not Path(ckpt_dir).is_dir():
        return out
    for d in Path(ckpt_dir).iterdir():
        meta = read_meta(ckpt_dir, d.name) if d.is_dir() else None
        if meta is not None:
            out.append((int(meta["step"]), d.name))
    return sorted(out)


def find_resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    """The tag to resume from: ``none`` -> None; ``auto`` -> newest complete (None if there is none);
    anything else must name a complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "none":
        return None
    if resume == "auto":
        latest = ckpt_dir / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if read_meta(ckpt_dir, tag) is not None:
                return tag
        tags = complete_tags(ckpt_dir)
        return tags[-1][1] if tags else None
    tag = Path(resume).name if Path(resume).is_dir() else resume
    if read_meta(ckpt_dir, tag) is None:
        have = [t for _, t in complete_tags(ckpt_dir)]
        raise CheckpointError(
            f"checkpoint.resume={resume!r}: {ckpt_dir / tag} is not a complete megalong checkpoint "
            f"(no {COMPLETE_MARKER}); complete ones: {have or 'none'}. Use checkpoint.resume=auto"
        )
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and any incomplete older ones)."""
    if keep_last <= 0:
        return []
    tags = complete_tags(ckpt_dir)
    keep = {t for _, t in tags[-keep_last:]}
    newest_step = tags[-1][0] if tags else -1
    removed = []
    for d in Path(ckpt_dir).iterdir():
        if not d.is_dir() or d.name in keep:
            continue
        meta = read_meta(ckpt_dir, d.name)
        step = int(meta["step"]) if meta else _step_of(d.name)
        if step is not None and step < newest_step:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def _step_of(tag: str) -> int | None:
    try:
        return int(tag.rsplit("_", 1)[-1])
    except ValueError:
        return None


def check_compatible(meta: dict, current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose run shaped the model or data differently."""
    saved = meta.get("fingerprint", {})
    diffs = {k: (saved.get(k), v) for k, v in current.items() if k in saved and saved.get(k) != v}
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(
            f"checkpoint {meta.get('tag')} was written by a different run setup ({lines}); "
            "resume with the same settings or start a new run directory"
        )
