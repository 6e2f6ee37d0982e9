"""Worker slots: each runs one job at a time in its own ``robnet_svc.service.worker`` process.

Slots: one per GPU when GPUs are present (``CUDA_VISIBLE_DEVICES`` set to the slot's GPU,
so a job's ``cuda`` is its own GPU), else ``--workers`` on the CPU; with ``--workers`` and
GPUs, slots take the GPUs in turn. CPU slots share the cores (``OMP_NUM_THREADS``, unless
set). The queue is the job store; this thread only claims queued jobs for free slots,
stops the workers of cancelled jobs, and records a worker that died without a result.
Jobs left running by a dead server are queued again on start (and resume from their
checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from robnet_svc.service.store import JobStore


@dataclass
class Slot:
    name: str                       # "cpu-0", "gpu-3"
    env: dict[str, str] = field(default_factory=dict)
    job: tuple[str, int] | None = None  # (job id, attempt)
    process: subprocess.Popen | None = None


def make_slots(workers: int | None) -> list[Slot]:
    """One slot per visible GPU (``workers`` slots sharing them in turn when given), else
    ``workers`` (default 1) CPU slots."""
    gpus = _visible_gpus()
    if not gpus:
        env = {"CUDA_VISIBLE_DEVICES": ""}
        if "OMP_NUM_THREADS" not in os.environ:  # the cores shared by the jobs that run at once
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (workers or 1)))
        return [Slot(f"cpu-{i}", dict(env)) for i in range(workers or 1)]
    count = workers or len(gpus)
    return [Slot(f"gpu-{gpus[i % len(gpus)]}", {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}) for i in range(count)]


def _visible_gpus() -> list[str]:
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


class Scheduler:
    """Claims queued jobs for free slots and watches their worker processes (a daemon thread)."""

    def __init__(self, store: JobStore, state_dir: Path, slots: list[Slot], data_roots: dict[str, str],
                 poll: float = 0.2):
        self.store, self.state_dir, self.slots, self.data_roots = store, Path(state_dir), slots, data_roots
        self.poll = poll
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="robnet-scheduler", daemon=True)

    def start(self) -> None:
        self.store.requeue_running()
        self.thread.start()

    def wake(self) -> None:
        self.wakeup.set()

    def stop(self) -> None:
        """Stop the loop and the workers; their jobs stay ``running`` and resume on the next start."""
        self.stopping.set()
        self.wakeup.set()
        self.thread.join(timeout=10)
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                _kill(slot.process)
                slot.process.wait(timeout=10)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._tick()
            except Exception as exc:  # the store busy beyond its timeout, a full disk: retry, never die
                print(f"robnet-svc: scheduler: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.wakeup.wait(self.poll)
            self.wakeup.clear()

    def _tick(self) -> None:
        for slot in self.slots:  # reap
            if slot.process is not None and slot.process.poll() is not None:
                code = slot.process.returncode
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                self.store.worker_gone(*slot.job, f"internal error: the job's worker ended ({how}) without a "
                                                  "result; see the job's worker.log on the server")
                slot.process.stdin.close()
                slot.job = slot.process = None
        cancelled = self.store.cancel_requested()
        for slot in self.slots:
            if slot.job is not None and slot.job[0] in cancelled and slot.process.poll() is None:
                _kill(slot.process)  # reaped (and recorded as cancelled) on the next tick
        for slot in self.slots:
            if slot.job is None and not self.stopping.is_set():
                claimed = self.store.claim_next()
                if claimed is None:
                    break
                try:
                    self._spawn(slot, *claimed)
                except OSError as exc:  # e.g. its folder was removed: the job fails, the server goes on
                    self.store.worker_gone(*claimed, f"internal error: cannot start the job's worker: {exc}")

    def _spawn(self, slot: Slot, job_id: str, attempt: int) -> None:
        job_dir = self.state_dir / "jobs" / job_id
        env = {**os.environ, **slot.env}
        with (job_dir / "worker.log").open("ab") as log:
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "robnet_svc.service.worker", str(self.state_dir), job_id, str(attempt),
                 json.dumps(self.data_roots)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=job_dir,
                start_new_session=True)  # its own process group: a cancel kills it and its children
        slot.job = (job_id, attempt)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # checkpoints and outputs are written atomically
    except ProcessLookupError:
        pass
