"""Progress of the long steps outside the training loop: data checks, feature extraction,
evaluation, re-ranking, index building.

One reporter, two faces. On a terminal (stderr is a TTY) it is a rich progress bar that
disappears when the step ends. Otherwise (piped, redirected, CI logs) it prints a plain
line every ``every_items`` items or every ``every_seconds`` seconds, whichever comes
first, with the rate and an ETA, the way torchreid's ``print_freq`` lines do. Short
steps print nothing when piped: the first plain line waits ``min_seconds``, so a run
that finishes quickly (tests, tiny sets) leaves its output as it was.

Everything goes to stderr: stdout carries the results (and ``--json`` output).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

EVERY_SECONDS = 30.0
MIN_SECONDS = 5.0


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class ProgressReporter:
    """Progress of ``total`` items labelled ``label``; call :meth:`advance` as items finish.

    ``total=None``: an open-ended step (e.g. re-ranking), shown as a spinner on a
    terminal and, when piped, as one line at its end if it took ``min_seconds`` or more.
    ``enabled=False`` turns it off (``--json``, quiet runs). Use as a context manager.
    """

    def __init__(self, label: str, total: Optional[int] = None, unit: str = "images", enabled: bool = True,
                 stream: Optional[TextIO] = None, every_items: Optional[int] = None,
                 every_seconds: Optional[float] = None, min_seconds: Optional[float] = None,
                 clock: Any = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_items = every_items if every_items is not None else max(1, (total or 0) // 10)
        # Read at run time, not bound at import, so a caller (or a test) may change the module's defaults.
        self.every_seconds = EVERY_SECONDS if every_seconds is None else every_seconds
        self.min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
        self.clock = clock
        self.done = 0
        self.t_start = clock()
        self.t_last_line = self.t_start
        self.done_last_line = 0
        self.lines = 0
        self.enabled = enabled and (total is None or total > 0)
        self._bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            columns = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()] if total is None else \
                [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
            self._bar = Progress(*columns, console=Console(file=self.stream), transient=True)
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        now = self.clock()
        if now - self.t_start < self.min_seconds:
            return
        if self.done - self.done_last_line >= self.every_items or now - self.t_last_line >= self.every_seconds:
            self._line(now)

    def status_line(self, now: Optional[float] = None) -> str:
        """The plain line: ``label: 1200/5000 images (24%), 41.3 images/s, ETA 1m32s``."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.t_start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.label}: running for {format_duration(elapsed)}"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = format_duration(eta) if eta != float("inf") else "?"
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {eta_text}")

    def _line(self, now: float) -> None:
        print(self.status_line(now), file=self.stream, flush=True)
        self.t_last_line, self.done_last_line = now, self.done
        self.lines += 1

    def close(self, ok: bool = True) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            return
        if not self.enabled:
            return
        now = self.clock()
        # An open-ended step that took a while gets its line; a counted one that printed
        # progress gets a closing line, so the log shows how long the step took.
        if ok and (self.lines or (self.total is None and now - self.t_start >= self.min_seconds)):
            what = f"{self.done} {self.unit} " if self.total is not None else ""
            print(f"{self.label}: done, {what}in {format_duration(now - self.t_start)}", file=self.stream, flush=True)
        self.enabled = False


__all__ = ["ProgressReporter", "format_duration"]
