"""Which rank is gone when a collective fails: per-rank heartbeats in the run directory.

    RUN_DIR/heartbeats/rank00000.json   {rank, host, pid, started, session, step, beat, time, state}
                       rank00001.json   rewritten (atomically) by a daemon thread every interval_s
                       ...              and when the step changes

A failed collective does not say which peer is gone: gloo raises "Connection closed by peer
[addr]:port" at once when a peer process dies, and any backend raises after the process-group
timeout (parallel.init_timeout_s) when a peer hangs or its host vanishes. The survivor then reads
the heartbeats of the other ranks of this run (same ``session``):

    state "error"                              -> that rank stopped on its own error (the cause)
    same host, pid gone / zombie / stopped     -> lost (killed, crashed, SIGSTOP)
    beat counter stands still for ~3 intervals -> lost (another host died, or the process hangs)
    state "peer-lost" / "done"                 -> a survivor like us, not the cause

The heartbeat thread keeps beating while the main thread waits inside a collective (the
collectives release the GIL), so a live rank's counter always advances.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("megalong")

INTERVAL_S = 2.0
"""How often a rank rewrites its heartbeat (also on every step). The survivor of an unexplained
failure watches for ~3 intervals before it calls a silent peer lost."""


class LostRankError(RuntimeError):
    """A collective failed because a peer rank is gone; the message names it and how to resume."""


def session_id() -> str:
    """What every rank of one launch shares (the rendezvous address): heartbeats of older runs differ."""
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def beat_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank:05d}.json"


class Heartbeat:
    """This rank's heartbeat file, rewritten by a daemon thread. ``update(step)`` from the train loop."""

    def __init__(self, directory: Path, rank: int, step: int = 0, interval_s: float = INTERVAL_S) -> None:
        self.path = beat_path(directory, rank)
        self.interval_s = interval_s
        me = psutil.Process()
        self.rec = {"rank": rank, "host": socket.gethostname(), "pid": me.pid, "started": me.create_time(),
                    "session": session_id(), "step": step, "beat": 0, "time": time.time(), "state": "running"}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._warned = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"megalong-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def update(self, step: int) -> None:
        """The last completed optimizer step (written by the thread, at once)."""
        with self._lock:
            self.rec["step"] = step
        self._wake.set()

    def set_state(self, state: str, reason: str | None = None) -> None:
        with self._lock:
            self.rec["state"] = state
            if reason:
                self.rec["reason"] = reason
        self._write()

    def stop(self, state: str = "done", reason: str | None = None) -> None:
        """Stop the thread and leave a last heartbeat saying how this rank ended."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.set_state(state, reason)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if not self._stop.is_set():
                self._write()

    def _write(self) -> None:
        with self._lock:
            self.rec["beat"] += 1
            self.rec["time"] = time.time()
            text = json.dumps(self.rec)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as e:  # a heartbeat must never stop training
            if not self._warned:
                log.warning("cannot write heartbeat %s: %s", self.path, e)
                self._warned = True


def read_beats(directory: Path, world: int, session: str | None = None) -> dict[int, dict]:
    """{rank: heartbeat} of the ranks < world that wrote one in this session (unreadable ones skipped)."""
    session = session_id() if session is None else session
    out = {}
    for r in range(world):
        try:
            rec = json.loads(beat_path(directory, r).read_text())
        except (OSError, ValueError):
            continue
        if rec.get("session") == session:
            out[r] = rec
    return out


@dataclass
class Lost:
    """A peer that is gone (or stopped on its own error), and how we know."""

    rank: int
    host: str
    pid: int
    step: int
    why: str
    beat_time: float

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.beat_time)
        return (f"rank {self.rank} (pid {self.pid} on host {self.host}: {self.why}; "
                f"last seen at step {self.step}, {age:.1f} s ago)")


def local_process_state(rec: dict) -> str | None:
    """Why the process of a heartbeat written on this host is not running, or None if it runs."""
    if rec.get("host") != socket.gethostname():
        return None
    try:
        p = psutil.Process(int(rec["pid"]))
        if abs(p.create_time() - float(rec["started"])) > 1.0:
            return "the process is gone"  # its pid was reused
        status = p.status()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError):
        return "the process is gone"
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "the process is gone"
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "the process is stopped"
    return None


def find_lost(directory: Path, me: int, world: int, watch_s: float = 3 * INTERVAL_S,
              poll_s: float = 0.25) -> tuple[list[Lost], list[int]]:
    """(lost peers, ranks without a heartbeat of this run). Definitive evidence (a peer's own error, a
    dead or stopped process on this host) answers at once; otherwise peers whose heartbeat does not
    advance for ``watch_s`` are lost (every live rank beats each interval, even inside a collective)."""
    beats = read_beats(directory, world)
    silent = [r for r in range(world) if r != me and r not in beats]
    peers = {r: b for r, b in beats.items() if r != me}

    def lost(r, b, why):
        return Lost(r, str(b.get("host")), int(b.get("pid", -1)), int(b.get("step", -1)), why,
                    float(b.get("time", 0.0)))

    found = [lost(r, b, f"it stopped on its own error: {b.get('reason', '?')}")
             for r, b in peers.items() if b.get("state") == "error"]
    for r, b in peers.items():
        why = local_process_state(b) if b.get("state") == "running" else None
        if why:
            found.append(lost(r, b, why))
    if found or not peers:
        return sorted(found, key=lambda x: x.rank), silent
    first = {r: b.get("beat") for r, b in peers.items() if b.get("state") == "running"}
    deadline = time.monotonic() + watch_s
    while first and time.monotonic() < deadline:
        time.sleep(poll_s)
        now = read_beats(directory, world)
        first = {r: n for r, n in first.items() if now.get(r, {}).get("beat") == n
                 and now.get(r, {}).get("state") == "running"}
    return [lost(r, peers[r], f"no heartbeat for {watch_s:.0f} s") for r in sorted(first)], silent


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from (a save may wrap a failed collective in its own error)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _in_torch_distributed(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return any("torch/distributed/" in f.filename.replace(os.sep, "/")
               for f in traceback.extract_tb(exc.__traceback__))


def collective_cause(exc: BaseException) -> BaseException | None:
    """The exception raised inside torch.distributed (gloo/NCCL error, timeout) that ``exc`` is or
    was raised from, or None when ``exc`` is an error of our own."""
    return next((e for e in _chain(exc) if _in_torch_distributed(e)), None)


def is_collective_failure(exc: BaseException) -> bool:
    return collective_cause(exc) is not None


def collective_of(exc: BaseException) -> str:
    """'all_reduce in train_step': the torch.distributed call that failed and the megalong function
    that was running (from the traceback)."""
    op, where = "a collective", None
    for f in traceback.extract_tb(exc.__traceback__):
        path = f.filename.replace(os.sep, "/")
        if path.endswith("distributed_c10d.py") and not f.name.startswith("_") and f.name != "wrapper":
            op = f.name
        if "/megalong/" in path and not f.name.startswith("_"):
            where = f.name
    return f"{op} in {where}" if where else op


def lost_rank_error(exc: BaseException, directory: Path, me: int, world: int, step: int,
                    resume_from: str | None, watch_s: float = 3 * INTERVAL_S) -> LostRankError | None:
    """The error to stop with when ``exc`` is a collective that failed because a peer is gone; None
    when ``exc`` is something else or no peer can be shown to be gone (then ``exc`` stands).
    ``step`` is this rank's last completed step, ``resume_from`` the newest complete checkpoint."""
    exc = collective_cause(exc)
    if exc is None:
        return None
    lost, silent = find_lost(directory, me, world, watch_s)
    if not lost:
        if silent:
            log.warning("rank %d: collective failed; ranks %s left no heartbeat in %s (is the run directory "
                        "shared by all nodes?)", me, silent, directory)
        return None
    first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    timed_out = "timed out" in first_line.lower() or "timeout" in first_line.lower()
    resume = (f"resume with --checkpoint.resume=auto from {resume_from}" if resume_from else
              "there is no complete checkpoint yet: a rerun starts from step 0")
    return LostRankError(
        f"rank {me}: lost contact with {', '.join(x.describe() for x in lost)} during {collective_of(exc)} "
        f"after step {step}{' (process-group timeout)' if timed_out else ''}; the run stops, nothing was saved "
        f"after the last checkpoint; {resume}. [{type(exc).__name__}: {first_line}]"
    )
