"""The one reporting channel (``Reporter``), and progress on stderr: rich bars on a terminal,
plain lines at a steady interval elsewhere.

Everything the library tells its user goes through a ``Reporter`` passed down the call:
log lines, warnings, and the progress of tasks (``with reporter.task(...) as task:
task.advance(n)``): the pipeline, certification, training, the datasets' decoding, the
VNN-LIB commands. The base ``Reporter()`` (``SILENT``) reports nothing, which is what a
library call gets by default; the command line's is ``console_reporter()`` (stderr), the
service's writes its job's live progress to the job store (robnet_svc/service/worker.py).
A reporter's progress sink is anything with the part of ``rich.progress.Progress`` used
here (``add_task``, ``update``, ``remove_task``).

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


class Task:
    """One task of a ``Reporter``: ``advance(n, **fields)`` after ``n`` more units of work,
    ``update(completed=..., **fields)``. The fields reach the progress sink (``stats``: the short
    text a bar or line shows; the service reads training's numbers from the others)."""

    def __init__(self, sink, task_id: Any):
        self._sink, self._id = sink, task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self._sink is not None:
            self._sink.update(self._id, advance=n, **fields)

    def update(self, **fields: Any) -> None:
        if self._sink is not None:
            self._sink.update(self._id, **fields)


class Reporter:
    """Log lines, warnings and task progress for the user; the base class (``SILENT``) reports nothing.

    ``progress``: a progress sink (``rich.progress.Progress``-like) or None; ``log(line)`` and
    ``warn(line)``: where log lines and warnings go (None: nowhere; a warning without ``warn``
    goes to ``log`` as ``warning: ...``).
    """

    def __init__(self, progress=None, log: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None):
        self._progress, self._log, self._warn = progress, log, warn

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def warn(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
        else:
            self.log(f"warning: {message}")

    @contextmanager
    def task(self, description: str, total: float | None = None, **fields: Any) -> Iterator[Task]:
        """A task shown while the block runs (``total`` units of work; ``fields`` as in ``Task``)."""
        if self._progress is None:
            yield Task(None, None)
            return
        task_id = self._progress.add_task(description, total=total, **{"stats": "", **fields})
        try:
            yield Task(self._progress, task_id)
        finally:
            self._progress.remove_task(task_id)


#: The reporter of a library call that was given none: it reports nothing.
SILENT = Reporter()


@contextmanager
def console_reporter(quiet: bool = False) -> Iterator[Reporter]:
    """The command line's reporter: log lines and warnings on stderr, progress as rich bars on a
    terminal or plain lines in a log (``for_stderr``); ``quiet``: nothing at all (the ranks other
    than 0 of a distributed run)."""
    if quiet:
        yield SILENT
        return
    from rich.console import Console

    console = Console(stderr=True)
    bars = for_stderr()
    bars.start()
    try:
        yield Reporter(bars, log=lambda line: console.print(f"robnet-svc: {line}", highlight=False, soft_wrap=True),
                       warn=lambda line: print(f"robnet-svc: warning: {line}", file=sys.stderr, flush=True))
    finally:
        bars.stop()


def rich_progress(console):
    """A rich ``Progress`` on ``console`` whose line fits 80 columns (bar, count, ETA, short stats)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                    TimeRemainingColumn(compact=True), TextColumn("{task.fields[stats]}"),
                    console=console, transient=True)


def for_stderr():
    """The progress sink of a run: rich bars on a terminal, else plain lines."""
    from rich.console import Console

    console = Console(stderr=True)
    return rich_progress(console) if console.is_terminal else LineProgress()
