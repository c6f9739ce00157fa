"""Heartbeats and the lost-rank diagnosis (megalong.engine.liveness) with real processes, no process group."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch.distributed as dist

from megalong.engine import liveness


@pytest.fixture
def session(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    return liveness.session_id()


def _fake_beat(directory, rank, pid, started, host=None, state="running", session="127.0.0.1:29999", step=7):
    rec = {"rank": rank, "host": host or liveness.socket.gethostname(), "pid": pid, "started": started,
           "session": session, "step": step, "beat": 3, "time": time.time() - 1.0, "state": state}
    liveness.beat_path(directory, rank).parent.mkdir(parents=True, exist_ok=True)
    liveness.beat_path(directory, rank).write_text(json.dumps(rec))


@pytest.fixture
def child():
    """A real process we can stop and kill, standing for a peer rank on this host."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _collective_error() -> BaseException:
    try:  # raises from inside torch/distributed: no default process group
        dist.all_reduce(__import__("torch").zeros(1))
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("all_reduce without a process group did not raise")


def test_heartbeat_beats_records_steps_and_its_end(tmp_path, session):
    hb = liveness.Heartbeat(tmp_path, rank=3, step=5, interval_s=0.05)
    first = json.loads(liveness.beat_path(tmp_path, 3).read_text())
    assert first["rank"] == 3 and first["pid"] == psutil.Process().pid and first["step"] == 5
    assert first["session"] == session and first["state"] == "running"
    hb.update(6)
    time.sleep(0.3)
    now = liveness.read_beats(tmp_path, 4)[3]
    assert now["step"] == 6 and now["beat"] >= first["beat"] + 3  # the thread beats on its own
    hb.stop("done")
    last = liveness.read_beats(tmp_path, 4)[3]
    time.sleep(0.15)
    assert liveness.read_beats(tmp_path, 4)[3]["beat"] == last["beat"] and last["state"] == "done"
    assert liveness.read_beats(tmp_path, 4, session="other:1") == {}  # older runs' heartbeats are ignored


def test_dead_and_stopped_peers_on_this_host_are_found_at_once(tmp_path, session, child):
    started = psutil.Process(child.pid).create_time()
    _fake_beat(tmp_path, 1, child.pid, started)
    me = liveness.Heartbeat(tmp_path, rank=0, interval_s=0.05)
    try:
        lost, silent = liveness.find_lost(tmp_path, 0, 3, watch_s=0.3)
        assert [x.rank for x in lost] == [1] and "no heartbeat" in lost[0].why  # alive but silent
        assert silent == [2]

        child.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        t0 = time.monotonic()
        lost, _ = liveness.find_lost(tmp_path, 0, 2, watch_s=30)
        assert lost[0].why == "the process is stopped" and time.monotonic() - t0 < 1

        child.kill()
        time.sleep(0.1)  # not reaped yet: a zombie counts as gone
        lost, _ = liveness.find_lost(tmp_path, 0, 2, watch_s=30)
        assert (lost[0].rank, lost[0].pid, lost[0].step, lost[0].why) == (1, child.pid, 7, "the process is gone")
        child.wait()
        _fake_beat(tmp_path, 1, child.pid, started - 100)  # same pid, another process: gone
        assert liveness.find_lost(tmp_path, 0, 2, watch_s=30)[0][0].why == "the process is gone"
    finally:
        me.stop()


def test_remote_peers_are_judged_by_their_beat(tmp_path, session):
    _fake_beat(tmp_path, 2, 12345, 0.0, host="node-b")  # another host: only its beat counter can tell
    live = liveness.Heartbeat(tmp_path, rank=1, interval_s=0.05)
    try:
        t0 = time.monotonic()
        lost, silent = liveness.find_lost(tmp_path, 0, 3, watch_s=0.5)
        assert [x.rank for x in lost] == [2] and lost[0].host == "node-b" and silent == []
        assert time.monotonic() - t0 >= 0.5
    finally:
        live.stop()
    _fake_beat(tmp_path, 2, 12345, 0.0, host="node-b", state="peer-lost")  # a survivor like us
    assert liveness.find_lost(tmp_path, 0, 3, watch_s=0.2)[0] == []


def test_a_peer_that_stopped_on_its_own_error_is_named_as_the_cause(tmp_path, session):
    _fake_beat(tmp_path, 1, 1, 0.0, state="error")
    liveness.beat_path(tmp_path, 1).write_text(json.dumps(
        dict(json.loads(liveness.beat_path(tmp_path, 1).read_text()), reason="OutOfMemoryError: ...")))
    lost, _ = liveness.find_lost(tmp_path, 0, 2, watch_s=30)
    assert lost[0].why == "it stopped on its own error: OutOfMemoryError: ..."


def test_lost_rank_error_names_the_rank_the_collective_and_the_resume_point(tmp_path, session, child):
    exc = _collective_error()
    assert liveness.is_collective_failure(exc) and liveness.collective_of(exc) == "all_reduce"
    assert not liveness.is_collective_failure(ValueError("a bug of ours"))
    try:  # a save that wraps the failed collective in its own error is still a collective failure
        raise RuntimeError("saving checkpoint step_00000006 failed") from exc
    except RuntimeError as wrapped:
        assert liveness.collective_cause(wrapped) is exc
    assert liveness.lost_rank_error(ValueError("x"), tmp_path, 0, 2, 4, None) is None

    _fake_beat(tmp_path, 1, child.pid, psutil.Process(child.pid).create_time())
    child.kill()
    child.wait()
    err = liveness.lost_rank_error(exc, tmp_path, 0, 2, 4, "/runs/x/checkpoints/step_00000003")
    msg = str(err)
    assert isinstance(err, liveness.LostRankError)
    assert msg.startswith(f"rank 0: lost contact with rank 1 (pid {child.pid} on host ")
    assert "the process is gone; last seen at step 7" in msg and "during all_reduce after step 4" in msg
    assert "resume with --checkpoint.resume=auto from /runs/x/checkpoints/step_00000003" in msg
    assert "no complete checkpoint yet" in str(liveness.lost_rank_error(exc, tmp_path, 0, 2, 4, None))

    liveness.beat_path(tmp_path, 1).unlink()  # nobody can be shown to be gone: the original error stands
    assert liveness.lost_rank_error(exc, tmp_path, 0, 2, 4, None, watch_s=0.1) is None
