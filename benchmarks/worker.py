"""Run one measurement, in this process or in a fresh one.

A fresh process per configuration makes the CPU peak-memory number (RSS high-water mark)
belong to that configuration alone, and lets the runner time out a configuration that is
infeasible (full CROWN on a big network) without losing the rest of the run.

    python -m benchmarks.worker '{"kind": "train", "network": "DM-small", "method": "ssip", ...}'

prints one line ``RESULT {json}`` on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "RESULT "
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    """One measurement: ``kind`` in ``measure.KINDS``; ``method`` may end in ``measure.COMPILED``
    (``harden --compile``'s fused kernels; ``floor``: ``ssip`` or ``ssip --compile``; the
    ``peer-*`` kinds: our method whose auto_LiRPA analogue is measured)."""

    kind: str
    network: str
    method: str
    batch: int
    device: str
    warmup: int
    repeats: int
    threads: int

    def label(self) -> str:
        return f"{self.kind} {self.network} {self.method} b{self.batch}"


def run_here(job: Job) -> dict:
    """Run ``job`` in this process (threads set as the job says)."""
    import torch

    from benchmarks import measure
    from robnet_svc.bounds.alloc import keep_freed_memory

    torch.set_num_threads(job.threads)
    keep_freed_memory()  # the same allocator settings for every job, ours and the peer's
    device = torch.device(job.device)
    if job.kind == "floor":
        return measure.measure_floor(job.network, job.batch, device, job.warmup, job.repeats, job.method)
    return measure.KINDS[job.kind](job.network, job.method, job.batch, device, job.warmup, job.repeats)


def run_isolated(job: Job, timeout_s: float) -> dict:
    """Run ``job`` in a fresh Python process; ``{"error": one line}`` on failure or timeout."""
    command = [sys.executable, "-m", "benchmarks.worker", json.dumps(asdict(job))]
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads)}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    if done.returncode < 0 or done.returncode == 137:
        tail = f"killed (signal {-done.returncode}, likely out of memory): {tail}"
    return {"error": tail[:300]}


#: memory left to the rest of the machine when a CPU job's heap is capped (``cap_memory``)
RESERVE_BYTES = 2 << 30


def cap_memory() -> int | None:
    """Cap this process's data segment (``RLIMIT_DATA``: heap and private mappings, Linux)
    at physical memory less ``RESERVE_BYTES``, so a configuration that does not fit (auto_LiRPA's
    CROWN on DM-medium wants far more than 24 GB) fails with a MemoryError of its own instead of
    waking the kernel's OOM killer, which may pick another process. Returns the cap, or None."""
    import resource

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = max(total - RESERVE_BYTES, total // 2)
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
        return cap
    except (ValueError, OSError, AttributeError):  # not Linux, or not allowed
        return None


def error_line(exc: BaseException) -> str:
    """One line for a failed configuration: the exception's first line, or, when an allocation
    failed (a MemoryError, or torch's allocator message, which TorchScript buries under its
    own first line), ``out of memory`` with the allocator's line."""
    from robnet_svc.errors import allocation_failure

    oom = allocation_failure(exc)
    if oom is not None:
        return ("out of memory (heap capped a little below physical memory): " + oom)[:300]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def main(argv: list[str]) -> int:
    job = Job(**json.loads(argv[0]))
    if job.device == "cpu":
        cap_memory()
    try:
        result = run_here(job)
    except Exception as exc:  # reported as this configuration's error; the run goes on
        result = {"error": error_line(exc)}
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
