"""Progress of long commands, on stderr: a rich progress bar on a terminal, and plain
timestamped lines every few seconds anywhere else (a CI log), so that converting a
100M-parameter checkpoint is never silent and a log never fills with bar redraws.

Library code reports through a :class:`Progress` callable, ``progress(stage, done, total)``:
a call naming a new stage starts it, ``done`` of ``total`` counts its steps (``total=None``
when no count is known). Functions take ``progress=no_progress`` by default.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

from repconv.errors import InputError

INTERVAL_ENV = "REPCONV_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 5.0  # seconds between plain lines; a command shorter than this prints none


class Progress(Protocol):
    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None: ...


def no_progress(stage: str, done: int = 0, total: int | None = None) -> None:
    """Progress that nobody watches."""


class _Bar:
    """One bar per stage; finished stages stay ticked until the command ends, then the whole
    display goes (transient), leaving the command's own output."""

    def __init__(self, console: Console) -> None:
        self.display = RichProgress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self.stage = ""
        self.task: TaskID | None = None

    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None:
        if stage != self.stage or self.task is None:
            self._finish()
            self.stage, self.task = stage, self.display.add_task(stage, total=total)
        self.display.update(self.task, completed=done, total=total)

    def _finish(self) -> None:
        if self.task is not None:
            total = next(t.total for t in self.display.tasks if t.id == self.task) or 1
            self.display.update(self.task, total=total, completed=total)


class _Lines:
    """'repconv [  12.0s] verifying 2/3' on ``stream`` every ``interval`` seconds while a stage
    runs (``interval`` 0: one line per update, written at once)."""

    def __init__(self, stream: TextIO, interval: float) -> None:
        self.stream, self.interval = stream, interval
        self.start = time.monotonic()
        self.state: tuple[str, int, int | None] | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None:
        with self.lock:
            self.state = (stage, done, total)
        if self.interval == 0:
            self._write()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self._write()

    def _write(self) -> None:
        with self.lock:
            if self.state is None:
                return
            stage, done, total = self.state
            count = f" {done}/{total}" if total else ""
            self.stream.write(f"repconv [{time.monotonic() - self.start:7.1f}s] {stage}{count}\n")
            self.stream.flush()


def line_interval() -> float:
    """Seconds between plain progress lines: $REPCONV_PROGRESS_SECONDS, else 5."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InputError(f"{INTERVAL_ENV}={text!r} is not a number of seconds >= 0; unset it or "
                         "set it like 5")
    return seconds


@contextmanager
def progress_display(console: Console) -> Iterator[Progress]:
    """The progress callable for a command whose human output goes to ``console`` (stderr):
    a bar when it is a terminal, plain lines otherwise."""
    if console.is_terminal:
        bar = _Bar(console)
        with bar.display:
            yield bar
        return
    lines = _Lines(console.file, line_interval())
    if lines.interval > 0:
        lines.thread.start()
    try:
        yield lines
    finally:
        lines.stop.set()
        if lines.thread.is_alive():
            lines.thread.join()
