"""Progress that a person can see: a tqdm bar on a terminal, plain lines anywhere else.

    terminal:   train  40%|████      | 40/100 [00:52<01:18, loss=5.1234, tok_s=1520]
    log / pipe: [10:14:03 rank0 megalong INFO] train 40/100 (40%) | loss 5.1234 | 1520 tok/s |
                elapsed 0:00:52 | ETA 0:01:18

A line is written every ``every`` updates and, so that a slow job never looks hung, whenever
``interval_s`` seconds passed since the last one. The ETA comes from the pace of this process
(a resumed run counts from where it resumed).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("megalong")


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


class Progress:
    """Report progress of ``total`` units of work.

    Args:
        total: units in the whole job (e.g. ``train.max_steps``).
        desc: what is progressing ("train", "eval_ppl", ...).
        initial: units already done (a resumed run).
        every: write a line every this many units (lines mode).
        interval_s: also write a line when this many seconds passed since the last (lines mode).
        enabled: False: report nothing (e.g. ranks other than 0).
        bar: allow a tqdm bar; it is used only when ``stream`` is a terminal.
        stream: where a bar goes (default stderr); lines go through the "megalong" logger.
        unit: the unit's name for the bar.
    """

    def __init__(self, total: int, desc: str, *, initial: int = 0, every: int = 1, interval_s: float = 20.0,
                 enabled: bool = True, bar: bool = True, stream=None, unit: str = "step") -> None:
        self.total, self.desc, self.done, self.start_done = total, desc, initial, initial
        self.every, self.interval_s, self.enabled = max(1, every), interval_s, enabled
        self.t0 = self.last_line = time.monotonic()
        self.fields: dict[str, Any] = {}
        self._bar = None
        stream = stream if stream is not None else sys.stderr
        if enabled and bar and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)

    @property
    def uses_bar(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more units done; ``fields`` (loss=…, tok_s=…) are shown with the next report."""
        if not self.enabled:
            return
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: _fmt(v) for k, v in self.fields.items()}, refresh=False)
            return
        now = time.monotonic()
        if self.done % self.every == 0 or self.done >= self.total or now - self.last_line >= self.interval_s:
            log.info(self.line(now))
            self.last_line = now

    def line(self, now: float | None = None) -> str:
        """The progress line: done/total, fields, elapsed, ETA."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc} {self.done}/{self.total} ({pct:.0f}%)"]
        parts += [f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in self.fields.items()]
        parts.append(f"elapsed {_clock(elapsed)}")
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        if 0 < self.done < self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StepProgress:
    """Progress inside one long optimizer step, so a step of minutes is not minutes of silence.

    The trainer marks the phase (``forward`` / ``backward`` of micro-batch m of M); forward pre-hooks on
    the decoder layers count the layer being computed (during ``backward`` with activation
    checkpointing that is the recomputed layer). A daemon thread writes one line through the
    "megalong" logger whenever a step has run ``interval_s`` seconds since its start or the last line:

        step 3/10: micro 1/1 backward, layer 17/30, 142 s into the step

    Steps shorter than ``interval_s`` write nothing. ``enabled=False`` (ranks other than 0): no hooks,
    no thread."""

    def __init__(self, layers, total_steps: int, interval_s: float, enabled: bool = True) -> None:
        import threading

        self.layers, self.total, self.interval_s, self.enabled = list(layers), total_steps, interval_s, enabled
        self.step = self.micro = self.micros = self.layer = 0
        self.phase: str | None = None
        self.t0 = self.last = 0.0
        self.lines: list[str] = []
        self._handles = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if not enabled:
            return
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(lambda *_, i=i: self._at_layer(i)))
        self._thread = threading.Thread(target=self._watch, name="megalong-step-progress", daemon=True)
        self._thread.start()

    def _at_layer(self, i: int) -> None:
        self.layer = i + 1

    def begin(self, step: int, micros: int) -> None:
        """A step starts (``step`` counted from 1)."""
        with self._lock:
            self.step, self.micros, self.micro, self.layer, self.phase = step, micros, 0, 0, "start"
            self.t0 = self.last = time.monotonic()

    def mark(self, phase: str, micro: int) -> None:
        """``phase`` (forward / backward / optimizer) of micro-batch ``micro`` (from 1) begins."""
        with self._lock:
            self.phase, self.micro, self.layer = phase, micro, 0

    def end(self) -> None:
        with self._lock:
            self.phase = None

    def line(self, now: float) -> str:
        where = f"micro {self.micro}/{self.micros} {self.phase}" if self.micro else str(self.phase)
        if self.phase in ("forward", "backward") and self.layer:
            where += f", layer {self.layer}/{len(self.layers)}"
        return f"step {self.step}/{self.total}: {where}, {now - self.t0:.0f} s into the step"

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s / 4)):
            with self._lock:
                now = time.monotonic()
                if self.phase is None or now - self.last < self.interval_s:
                    continue
                self.last = now
                text = self.line(now)
            self.lines.append(text)
            log.info(text)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for h in self._handles:
            h.remove()
        self._handles = []
