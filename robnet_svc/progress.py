"""Progress on stderr: rich bars on a terminal, plain lines at a steady interval elsewhere.

Piped to a log (CI, a service, ``nohup``) a bar shows nothing, and a phase can last many
minutes; ``LineProgress`` then prints one line per task every ``interval`` seconds::

    robnet-svc: epoch 2/10: 120/400 (30%), 3.1/s, ETA 1m30s, loss 0.123 acc 0.912 cert 0.804 eps 0.1

Both offer the part of ``rich.progress.Progress`` the pipeline uses: ``add_task``,
``update``, ``advance``, ``remove_task``, ``start``, ``stop``. ``ENV_INTERVAL``
(``ROBNET_SVC_PROGRESS_INTERVAL``, seconds, default 30) sets the interval; 0 prints every update.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

ENV_INTERVAL = "ROBNET_SVC_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def interval_from_env() -> float:
    """Seconds between plain progress lines (``ROBNET_SVC_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    fields: dict[str, Any] = field(default_factory=dict)


class LineProgress:
    """``rich.progress.Progress``-like sink that prints plain lines at a steady interval."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = interval_from_env() if interval is None else interval
        self.clock = clock
        self.tasks: dict[int, _Task] = {}
        self._next_id = 0
        self._last_line = clock()

    def start(self) -> None:
        self._last_line = self.clock()

    def stop(self) -> None:
        self.tasks.clear()

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task_id, self._next_id = self._next_id, self._next_id + 1
        self.tasks[task_id] = _Task(description, total, started=self.clock(), fields=fields)
        return task_id

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               **fields: Any) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        task.fields.update(fields)
        now = self.clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            print(f"robnet-svc: {self.line(task, now)}", file=self.stream or sys.stderr, flush=True)

    def line(self, task: _Task, now: float) -> str:
        """``description: done/total (pct), rate/s, ETA, stats``."""
        elapsed = max(now - task.started, 1e-9)
        rate = task.completed / elapsed
        parts = [f"{task.description}: {task.completed:g}"
                 + (f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)" if task.total else "")]
        parts.append(f"{rate:.3g}/s")
        if task.total and rate > 0:
            parts.append(f"ETA {duration((task.total - task.completed) / rate)}")
        stats = str(task.fields.get("stats") or "").strip()
        return ", ".join(parts + ([stats] if stats else []))


def rich_progress(console):
    """A rich ``Progress`` on ``console`` whose line fits 80 columns (bar, count, ETA, short stats)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                    TimeRemainingColumn(compact=True), TextColumn("{task.fields[stats]}"),
                    console=console, transient=True)


def for_stderr(quiet: bool = False):
    """The progress sink of a run: None when ``quiet``, rich bars on a terminal, else plain lines."""
    if quiet:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return rich_progress(console) if console.is_terminal else LineProgress()


@contextmanager
def task(label: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A progress task of its own on stderr (rich bar or plain lines), yielding ``advance(n)``.

    Used where no run-wide progress is at hand (dataset decoding). Inside the command line's
    own live display rich nests the bar (rich >= 14); where it cannot, no bar rather than an error.
    """
    from rich.errors import LiveError

    bar = for_stderr(quiet=not enabled)
    if bar is not None:
        try:
            bar.start()
        except LiveError:
            bar = None
    if bar is None:
        yield lambda _n: None
        return
    task_id = bar.add_task(label, total=total, stats="")
    try:
        yield lambda n: bar.update(task_id, advance=n)
    finally:
        bar.stop()
