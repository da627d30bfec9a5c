"""Progress of the long commands (simulate, preprocess, download, train, embed), for people and logs.

The science functions take an optional `progress(done, total)` callback and call it after each unit
of work (a chunk of detections, an observation, a batch of spectra); they know nothing else about
it. `Progress` is the callback the command line passes: on a terminal one line redrawn in place
with a bar, the rate and the time left; elsewhere (CI logs, files) a plain line every `every_s`
seconds and one when the work is done, so a log shows the job is alive without a flood of lines.
It writes to stderr, keeping stdout for results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressCallback = Callable[[int, int], None]
BAR_WIDTH = 24
TERMINAL_EVERY_S = 0.2
LOG_EVERY_S = 10.0


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(per_second: float, unit: str) -> str:
    if per_second >= 100:
        return f"{per_second:.0f} {unit}/s"
    if per_second >= 1:
        return f"{per_second:.1f} {unit}/s"
    return f"{1 / per_second:.1f} s per {unit.removesuffix('s')}" if per_second > 0 else f"0 {unit}/s"


class Progress:
    """`progress(done, total)` that reports `label: done/total unit (pct), rate, time left`."""

    def __init__(self, label: str, unit: str = "items", stream: TextIO | None = None,
                 every_s: float | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.every_s = every_s if every_s is not None else (TERMINAL_EVERY_S if self.tty else LOG_EVERY_S)
        self.clock = clock
        self.started = clock()
        self._last_emit = -float("inf")
        self._bar_shown = False
        self._finished = False
        self._last: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        self._last = (done, total)
        now = self.clock()
        finished = total > 0 and done >= total
        if finished and self._finished:
            return
        if not finished and now - self._last_emit < self.every_s:
            return
        self._last_emit = now
        self._finished = finished
        self._emit(self.line(done, total, now - self.started), finished)

    def line(self, done: int, total: int, elapsed_s: float) -> str:
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        if total <= 0:
            return f"{self.label}: {done} {self.unit}, {format_rate(rate, self.unit)}"
        share = min(done / total, 1.0)
        bar = ""
        if self.tty:
            filled = round(BAR_WIDTH * share)
            bar = f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"
        head = f"{self.label}:{bar} {done}/{total} {self.unit} ({100 * share:.0f}%)"
        if done >= total:
            return f"{head} in {format_duration(elapsed_s)}, {format_rate(rate, self.unit)}"
        if rate <= 0:
            return head
        return f"{head}, {format_rate(rate, self.unit)}, {format_duration((total - done) / rate)} left"

    def note(self, text: str, stream: TextIO | None = None) -> None:
        """A line of results (a training epoch) printed above the bar without garbling it."""
        out = stream if stream is not None else sys.stdout
        if self.tty and self._bar_shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._bar_shown = False
        out.write(text + "\n")
        out.flush()
        if self.tty and self._last is not None and not self._finished:
            self._emit(self.line(*self._last, self.clock() - self.started), False)

    def close(self) -> None:
        """End the bar's line on a terminal (after an early stop the bar is left where it stopped)."""
        if self.tty and self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _emit(self, text: str, finished: bool) -> None:
        if self.tty:
            self.stream.write(f"\r{text}\033[K" + ("\n" if finished else ""))
            self._bar_shown = not finished
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
