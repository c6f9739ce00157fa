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
