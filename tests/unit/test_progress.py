"""Progress reporting: plain lines off a terminal (per interval and by time), a bar on one."""

from __future__ import annotations

import io
import logging

from megalong.utils import progress as progress_mod
from megalong.utils.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_interval_with_eta(caplog):
    caplog.set_level(logging.INFO, logger="megalong")
    p = Progress(10, "train", every=5, interval_s=1e9, stream=io.StringIO())
    assert not p.uses_bar
    for i in range(10):
        p.update(1, loss=2.0 - 0.1 * i, tok_s=1234)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("train 5/10 (50%) | loss 1.6000 | tok s 1234 | elapsed 0:00:00")
    assert "ETA" in lines[0] and "ETA" not in lines[1] and lines[1].startswith("train 10/10 (100%)")


def test_a_slow_job_still_reports_by_time(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="megalong")
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    p = Progress(1000, "train", initial=400, every=100, interval_s=20.0, stream=io.StringIO())
    for _ in range(3):
        now[0] += 25.0  # 25 s per step: never a multiple of 100 steps, but a line every step
        p.update(1, loss=1.0)
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(" ")[1] for ln in lines] == ["401/1000", "402/1000", "403/1000"]
    assert "elapsed 0:01:15" in lines[-1] and "ETA 4:08:45" in lines[-1]  # 597 steps at 25 s (resumed pace)


def test_bar_on_a_terminal_and_nothing_when_disabled(caplog):
    caplog.set_level(logging.INFO, logger="megalong")
    tty = _Tty()
    p = Progress(4, "eval", stream=tty)
    assert p.uses_bar
    for _ in range(4):
        p.update(1, ppl=12.5)
    p.close()
    assert "eval" in tty.getvalue() and "4/4" in tty.getvalue() and not caplog.records
    off = Progress(4, "eval", enabled=False, stream=_Tty())
    off.update(4)
    assert not off.uses_bar and not caplog.records
    no_bar = Progress(4, "eval", bar=False, every=4, stream=_Tty())  # logging.progress_bar=false: lines
    no_bar.update(4)
    assert not no_bar.uses_bar and len(caplog.records) == 1


def test_step_progress_reports_the_layer_inside_a_long_step(caplog):
    """A step longer than the interval writes lines naming micro-batch, phase and layer; a short step
    writes none; disabled (ranks > 0) registers no hooks."""
    import time

    import torch

    from megalong.utils.progress import StepProgress

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.12)
            return x

    layers = torch.nn.ModuleList([Slow() for _ in range(3)])
    sp = StepProgress(layers, total_steps=5, interval_s=0.1)
    with caplog.at_level(logging.INFO, logger="megalong"):
        sp.begin(2, micros=1)
        sp.mark("forward", 1)
        x = torch.zeros(1)
        for layer in layers:
            x = layer(x)
        sp.mark("backward", 1)
        time.sleep(0.25)
        sp.end()
        n = len(sp.lines)
        time.sleep(0.3)  # between steps: nothing
        assert len(sp.lines) == n
        sp.begin(3, micros=1)  # a short step: nothing
        sp.end()
        time.sleep(0.15)
    sp.close()
    assert len(sp.lines) == n
    assert any(line.startswith("step 2/5: micro 1/1 forward, layer ") and line.endswith("s into the step")
               for line in sp.lines), sp.lines
    assert any(line.startswith("step 2/5: micro 1/1 backward") for line in sp.lines), sp.lines
    assert all(line in caplog.text for line in sp.lines)
    assert not layers[0]._forward_pre_hooks  # close() removed the hooks
    off = StepProgress(layers, 5, 0.1, enabled=False)
    assert not layers[0]._forward_pre_hooks and off._thread is None
