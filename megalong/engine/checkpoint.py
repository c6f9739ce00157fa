"""Training checkpoints that describe themselves and survive a kill during save.

    RUN_DIR/checkpoints/
      step_00000040/                  DeepSpeed's files (model/optimizer partitions)
        rng_rank{r}.safetensors       per-rank RNG states (python, numpy, torch, cuda) as tensors
        universal/                    only after a resume on another layout: DeepSpeed's
                                      universal (layout-free) form of this checkpoint
        megalong.json                 written last, by rank 0: step, consumed samples, layout,
                                      config, code version, probe loss, and a manifest (size and
                                      sha256 of every file)  ==> "this checkpoint is complete"
      latest                          tag of the newest complete checkpoint (DeepSpeed's format),
                                      replaced atomically only after megalong.json exists

A process killed during save (or a disk that fills) leaves a tag directory without
``megalong.json``; ``latest`` still names the previous checkpoint, and ``find_resume_tag`` never
picks an incomplete one. A complete checkpoint whose files were truncated, deleted or changed
afterwards fails its manifest: ``resume=auto`` falls back to the newest one that verifies, an
explicitly named one is refused with the file named.

megalong's own files are read without unpickling (JSON and safetensors). DeepSpeed's
``*_model_states.pt`` / ``*_optim_states.pt`` are pickles that DeepSpeed itself loads with
``torch.load(weights_only=False)``: resume and convert only run directories you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
UNIVERSAL = "universal"

log = logging.getLogger("megalong")


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


def rng_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An ``rng_state()`` as plain tensors plus string metadata (what safetensors stores)."""
    version, mt, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
        "numpy_cached_gaussian": torch.tensor([cached], dtype=torch.float64),
        "torch": state["torch"].clone(),
    }
    for i, s in enumerate(state.get("cuda") or []):
        tensors[f"cuda_{i}"] = s.clone()
    meta = {"python_version": str(version), "python_gauss": json.dumps(gauss), "numpy_kind": kind,
            "numpy_pos": str(pos), "numpy_has_gauss": str(has_gauss), "cuda_devices": str(len(state.get("cuda") or []))}
    return tensors, meta


def rng_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    n_cuda = int(meta.get("cuda_devices", "0"))
    return {
        "python": (int(meta["python_version"]), tuple(int(x) for x in tensors["python_mt"].tolist()),
                   json.loads(meta["python_gauss"])),
        "numpy": (meta["numpy_kind"], tensors["numpy_keys"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                  int(meta["numpy_has_gauss"]), float(tensors["numpy_cached_gaussian"][0])),
        "torch": tensors["torch"],
        "cuda": [tensors[f"cuda_{i}"] for i in range(n_cuda)] or None,
    }


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank}.safetensors"


def save_rng(tag_dir: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, meta = rng_to_tensors(rng_state())
    tmp = Path(tag_dir) / f".rng_rank{rank}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, rng_file(tag_dir, rank))


def load_rng(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for this rank (another
    layout) or only the pickled ``rng_rank{r}.pt`` older megalong wrote, which is not unpickled."""
    from safetensors import safe_open

    path = rng_file(tag_dir, rank)
    if not path.is_file():
        if (Path(tag_dir) / f"rng_rank{rank}.pt").is_file():
            log.warning("%s holds a pickled RNG state (older megalong); not unpickled", tag_dir)
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state(rng_from_tensors(tensors, meta))
    return True


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(tag_dir: Path, hash_files: bool = True) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file of a checkpoint (the universal form excluded:
    it is derived, and rebuilt when missing)."""
    tag_dir = Path(tag_dir)
    out = {}
    for p in sorted(tag_dir.rglob("*")):
        rel = p.relative_to(tag_dir)
        if not p.is_file() or rel.parts[0] == UNIVERSAL or rel.parts[0].startswith(".") or p.name == COMPLETE_MARKER:
            continue
        out[str(rel)] = {"size": p.stat().st_size, **({"sha256": file_digest(p)} if hash_files else {})}
    return out


def verify(ckpt_dir: Path, tag: str, meta: dict | None = None) -> str | None:
    """None when checkpoint ``tag`` is complete and every file in its manifest is there with its
    size and hash; otherwise what is wrong, naming the file."""
    meta = meta if meta is not None else read_meta(ckpt_dir, tag)
    tag_dir = Path(ckpt_dir) / tag
    if meta is None:
        return f"{tag_dir / COMPLETE_MARKER} is missing or unreadable (the save never finished)"
    manifest = meta.get("manifest")
    if manifest is None:
        return None  # written before manifests existed: nothing to check against
    for rel, want in manifest.items():
        p = tag_dir / rel
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{p} has {size} bytes, {want['size']} were saved (truncated or overwritten)"
        if "sha256" in want and file_digest(p) != want["sha256"]:
            return f"{p} does not match the sha256 recorded at save (changed or corrupted)"
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_complete(ckpt_dir: Path, tag: str, meta: dict) -> None:
    """Rank 0, after every rank finished writing: the marker, then the ``latest`` pointer."""
    meta = dict(meta, tag=tag, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_atomic(ckpt_dir / tag / COMPLETE_MARKER, json.dumps(meta, indent=2, sort_keys=True, default=str))
    _write_atomic(ckpt_dir / LATEST, tag)


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, if any."""
    latest = Path(ckpt_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


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


def layout_of(meta: dict) -> dict[str, int]:
    """How a checkpoint's DeepSpeed partitions are cut: data- and sequence-parallel size, ZeRO stage."""
    return {"dp": int(meta.get("dp", 1)), "sp": int(meta.get("sp", 1)), "zero_stage": int(meta.get("zero_stage", 0))}


def ensure_universal(ckpt_dir: Path, tag: str, is_main: bool, timeout_s: float = 3600.0) -> Path:
    """DeepSpeed's universal (layout-free) form of checkpoint ``tag`` in ``tag/universal``, made once.

    Rank 0 runs ``deepspeed.checkpoint.ds_to_universal`` into a hidden folder and renames it when
    done; the other ranks wait for the folder on the (shared) checkpoint file system, without a
    collective, so a long conversion cannot trip the process-group timeout.
    """
    tag_dir = Path(ckpt_dir) / tag
    out, tmp, failed = tag_dir / UNIVERSAL, tag_dir / f".{UNIVERSAL}.tmp", tag_dir / f".{UNIVERSAL}.failed"
    if is_main and not out.is_dir():
        import sys

        shutil.rmtree(tmp, ignore_errors=True)
        failed.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]  # megalong has no tensor parallelism: the version-only info
        log.info("converting checkpoint %s to DeepSpeed's universal format (%s)", tag, out)
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (res.stdout + res.stderr).strip().splitlines()[-12:]
            failed.write_text("\n".join(tail))
            raise CheckpointError(
                f"converting {tag_dir} to DeepSpeed's universal checkpoint failed (exit {res.returncode}):\n  "
                + "\n  ".join(tail) + "\nresume on the layout it was written with (see its megalong.json)"
            )
        os.replace(tmp, out)
        log.info("universal checkpoint written in %.1f s", time.monotonic() - t0)
    deadline = time.monotonic() + timeout_s
    while not out.is_dir():
        if failed.is_file():
            raise CheckpointError(f"rank 0 could not convert {tag_dir} to a universal checkpoint:\n"
                                  f"{failed.read_text()}")
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"waited {timeout_s:.0f} s for rank 0 to write {out}; the checkpoint directory must be on storage "
                "every node sees (see README, multi-node)"
            )
        time.sleep(0.5)
    return out


def find_resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    """The tag to resume from: ``none`` -> None; ``auto`` -> the newest complete checkpoint whose files
    verify (None if there is none; each skipped one is logged with the reason); anything else must
    name a complete checkpoint that verifies."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "none":
        return None
    if resume == "auto":
        candidates = [t for _, t in reversed(complete_tags(ckpt_dir))]
        latest = ckpt_dir / LATEST
        if latest.is_file() and latest.read_text().strip() in candidates:  # `latest` first (DeepSpeed's pointer)
            candidates.remove(tag := latest.read_text().strip())
            candidates.insert(0, tag)
        for tag in candidates:
            problem = verify(ckpt_dir, tag)
            if problem is None:
                return tag
            log.warning("checkpoint %s is damaged, skipped: %s", tag, problem)
        if candidates:
            raise CheckpointError(
                f"no checkpoint in {ckpt_dir} verifies ({len(candidates)} complete ones are damaged, see the warnings "
                "above); restore the files from a copy, or start over with --checkpoint.resume=none and a new run dir"
            )
        return None
    tag = Path(resume).name if Path(resume).is_dir() else resume
    if read_meta(ckpt_dir, tag) is None:
        have = [t for _, t in complete_tags(ckpt_dir)]
        raise CheckpointError(
            f"checkpoint.resume={resume!r}: {ckpt_dir / tag} is not a complete megalong checkpoint "
            f"(no {COMPLETE_MARKER}); complete ones: {have or 'none'}. Use checkpoint.resume=auto"
        )
    problem = verify(ckpt_dir, tag)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is damaged: {problem}. Restore it from a copy, or use "
            "checkpoint.resume=auto to take the newest checkpoint that verifies"
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
    tag = meta.get("tag")
    changed = {p: (saved["data_files"][p], now) for p, now in current.get("data_files", {}).items()
               if p in saved.get("data_files", {}) and saved["data_files"][p] != now}
    if changed:
        files = ", ".join(f"{p}.bin/.idx" for p in changed)
        raise CheckpointError(
            f"data changed under the run: {files} now hold other content than when checkpoint {tag} was written "
            f"(content fingerprint {'; '.join(f'{a[:16]}… -> {b[:16]}…' for a, b in changed.values())}). The "
            "data position of the checkpoint would point into different samples: restore the original files, or "
            "start a new run directory (optionally initialised from an export of this one)"
        )
    diffs = {k: (saved.get(k), v) for k, v in current.items()
             if k in saved and k != "data_files" and saved.get(k) != v}
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        hint = ""
        if "train_batch" in diffs:
            hint = (" (a resume on another number of ranks must keep the global batch: set train.grad_accum "
                    "and train.micro_batch_size so that micro × accum × dp equals the checkpoint's train_batch)")
        raise CheckpointError(
            f"checkpoint {tag} was written by a different run setup ({lines}){hint}; "
            "resume with the same settings or start a new run directory"
        )
