"""One job in its own process: ``python -m robnet_svc.service.worker STATE_DIR JOB_ID ATTEMPT ROOTS_JSON``.

The scheduler starts it with the job's GPU in ``CUDA_VISIBLE_DEVICES``. It runs the very
``pipeline.harden`` / ``pipeline.certify`` of the command line in the job's folder
(``STATE/jobs/ID/out``), resuming from ``checkpoint.pt`` when an earlier attempt left one
(harden's ``--resume``: bit-identical to an uninterrupted run), and writes the live
progress and then the result into the job store: one transaction each, and only while the
job is still running under this attempt.

The process ends by itself when its server dies: its stdin is a pipe from the server, and
end-of-file there means the server is gone (``kill -9`` included). A lock on the job's
folder keeps a worker that has not noticed yet and its successor from running together.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from robnet_svc.errors import RobnetError, SoundnessError, out_of_memory
from robnet_svc.progress import Reporter
from robnet_svc.service.jobs import ARTIFACTS, INPUT_FILE, OUT_DIR, build_options, recorded_config, resolve_data_dir
from robnet_svc.service.store import JobStore

#: Exit status of a worker whose server went away (nothing recorded: the job is resumed).
SERVER_GONE = 75
LOG_LINES = 20


class JobProgress:
    """The progress sink (``add_task``, ``update``, ``remove_task``) and the log of the job's
    ``Reporter`` (robnet_svc/progress.py), keeping the job's live progress in the store: phase,
    epoch, step, running loss and certified accuracy, and an ETA.

    ETA: in training, the remaining steps at this attempt's mean step time plus the time the
    ``before`` certification took (the ``after`` one certifies the same samples); while
    certifying, the remaining samples at the current rate; unknown (None) before training.
    """

    def __init__(self, store: JobStore, job_id: str, attempt: int, command: str, interval: float = 0.5):
        self.store, self.job_id, self.attempt, self.command = store, job_id, attempt, command
        self.interval = interval
        self.state: dict[str, Any] = {"phase": "preparing", "attempt": attempt, "log": [], "log_count": 0,
                                      "eta_seconds": None}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.certify_seconds: float | None = None  # how long "certify before" took in this attempt
        self.train_started: float | None = None
        self.train_steps_done = 0
        self.last_write = 0.0

    # the progress sink's interface (the part of rich.Progress a Reporter uses)
    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task_id = len(self.tasks) + 1
        now = time.monotonic()
        self.tasks[task_id] = {"description": description, "total": total or 0, "completed": 0, "started": now}
        if "epoch" in fields:
            if self.train_started is None:
                self.train_started = now
            self.state.update(phase="train", epoch=fields["epoch"], epochs=fields["epochs"], step=0,
                              steps=total)
        else:
            self.state.update(phase=description, done=0, total=total)
        self._write(force=True)
        return task_id

    def update(self, task_id: int, advance: float = 0, **fields: Any) -> None:
        task = self.tasks[task_id]
        task["completed"] += advance
        if self.state["phase"] == "train":
            self.train_steps_done += advance
            self.state["step"] = task["completed"]
            for key in ("loss", "train_accuracy", "certified_accuracy", "eps"):
                if key in fields:
                    self.state[key] = fields[key]
        else:
            self.state["done"] = task["completed"]
        self.state["eta_seconds"] = self._eta(task)
        self._write()

    def remove_task(self, task_id: int) -> None:
        task = self.tasks[task_id]
        if task["description"] == "certify before":
            self.certify_seconds = time.monotonic() - task["started"]
        self._write(force=True)

    def _eta(self, task: dict[str, Any]) -> float | None:
        now = time.monotonic()
        if self.state["phase"] == "train":
            if not self.train_steps_done or self.train_started is None:
                return None
            per_step = (now - self.train_started) / self.train_steps_done
            steps = self.state["steps"] or 0
            left = (steps - self.state["step"]) + steps * (self.state["epochs"] - self.state["epoch"])
            return left * per_step + (self.certify_seconds or 0.0)
        if self.state["phase"] == "certify before" and self.command == "harden":
            return None  # training time unknown yet
        if task["completed"] <= 0:
            return None
        return (task["total"] - task["completed"]) * (now - task["started"]) / task["completed"]

    # the reporter's log lines and warnings
    def log(self, message: str) -> None:
        print(f"robnet-svc: {message}", file=sys.stderr, flush=True)
        resumed = re.search(r"^resuming from .* after epoch (\d+)$", message)
        if resumed:
            self.state["resumed_from_epoch"] = int(resumed.group(1))
        lines = self.state["log"] + [message]
        self.state["log"] = lines[-LOG_LINES:]
        self.state["log_count"] += 1
        self._write(force=True)

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}")

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_write >= self.interval:
            self.last_write = now
            self.state["updated"] = time.time()
            self.store.set_progress(self.job_id, self.attempt, self.state)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_job(store: JobStore, job_dir: Path, job: dict[str, Any], attempt: int, data_roots: dict[str, str]) -> None:
    """Run ``job`` (attempt ``attempt``) and record its result, exactly as the CLI would end."""
    from robnet_svc import pipeline

    command, params = job["command"], job["settings"]
    out = job_dir / OUT_DIR
    resume = command == "harden" and (out / pipeline.CHECKPOINT_FILE).exists()
    progress = JobProgress(store, job["id"], attempt, command)
    progress.state["resumed"] = resume
    state, error, code, summary, artifacts = "failed", None, 3, None, None
    try:
        data_dir = resolve_data_dir(params, data_roots)
        options = build_options(params, job_dir / INPUT_FILE, out, data_dir, force=not resume, resume=resume)
        story = pipeline.harden if command == "harden" else pipeline.certify
        report = story(options, recorded_config(params, data_dir),
                       f"robnet-svc {command} (service job {job['id']}, attempt {attempt})",
                       Reporter(progress, log=progress.log, warn=progress.warn))
        summary = report.summary()
        artifacts = {name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
                     for name in ARTIFACTS[command]}
        state, code = "succeeded", 0
        progress.state.update(phase="done", eta_seconds=0.0)
    except RobnetError as exc:
        error, code = f"error: {_one_line(str(exc))}", exc.exit_code
    except SoundnessError as exc:
        error, code = f"soundness error: {_one_line(str(exc))}", exc.exit_code
    except Exception as exc:  # a bug: one line in the store, the traceback in the job's worker.log
        traceback.print_exc()
        oom = out_of_memory(exc)  # not a bug: the job does not fit at its batch sizes
        if oom is not None:
            error, code = f"error: {_one_line(str(oom))}", oom.exit_code
        else:
            error = f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"
    if error:
        progress.log(error)
    recorded = store.finish(job["id"], attempt, state, summary=summary, artifacts=artifacts, error=error,
                            exit_code=code, progress=progress.state)
    if recorded and state == "succeeded":
        (out / pipeline.CHECKPOINT_FILE).unlink(missing_ok=True)  # not needed any more


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _exit_with_server() -> None:
    """End this process as soon as the server's end of our stdin closes (the server died)."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(1 << 10):
                pass
        finally:
            os._exit(SERVER_GONE)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    from robnet_svc.bounds.alloc import keep_freed_memory

    state_dir, job_id, attempt, roots = Path(argv[0]), argv[1], int(argv[2]), json.loads(argv[3])
    _exit_with_server()
    keep_freed_memory()  # the job's own process, like the command line's (bounds/alloc.py)
    store = JobStore(state_dir)
    job_dir = state_dir / "jobs" / job_id
    with (job_dir / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a previous attempt's worker to be gone
        job = store.get(job_id)
        if job is None or job["state"] != "running" or job["attempt"] != attempt:
            return 0  # cancelled or taken over meanwhile
        run_job(store, job_dir, job, attempt, roots)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
