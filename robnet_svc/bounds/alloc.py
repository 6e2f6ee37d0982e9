"""CPU allocator tuning for the bound passes (glibc only; process-wide; once; opt-in).

The symbolic passes allocate and free tensors of ``B·k`` rows (tens to hundreds of MB)
every few microseconds. glibc serves such blocks with fresh ``mmap`` calls and returns them
on ``free``, so every full-size op pays a page fault per 4 KiB page before it computes
anything: on DM-small (batch 64, k = 16) that was more than half of an SSIP pass (an
``abs`` of 4.4 M floats: 9 ms instead of 0.9 ms). Keeping freed memory in the heap
(no ``mmap`` for large blocks, trim only above 1 GiB of free top memory) removes those
faults; the cost is that the process keeps its peak heap instead of giving it back.

It changes the allocator of the whole process, so the library never does it by itself: the
command line opts in at its entry point (``robnet_svc.cli.main``, every command and every
rank of ``torchrun``); a program that uses the library calls ``keep_freed_memory()`` once,
if it wants the speed for the memory. Disable the command line's with
``ROBNET_SVC_MALLOC_TUNING=0`` (e.g. to measure without it).

Memory: freed blocks of varying sizes fragment the heap, and a tuned heap keeps its
high-water mark, so resident memory creeps above one batch's working set as steps go by
(measured, 1x64x64 CNN, rsip-ssip, 12 training steps of 30-64 samples: peak +2.0 GB tuned,
+1.4 GB untuned at 1.6x the CPU time). ``release_free_memory`` hands the free heap back to
the system; the pipeline calls it between phases and epochs, so the creep is bounded by one
phase instead of growing over a whole run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Tune glibc ``malloc`` of this whole process, once (a no-op elsewhere, or with
    ``ROBNET_SVC_MALLOC_TUNING=0``); True when it is tuned. The explicit opt-in: nothing in the
    library calls it, the command line does at its entry point."""
    if "tuned" not in _state:
        _state["tuned"] = _tune()
    return _state["tuned"]


def _tune() -> bool:
    if os.environ.get("ROBNET_SVC_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mallopt(_M_TOP_PAD, 64 << 20))


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``) when the allocator is
    tuned; a no-op otherwise. Costs page faults on the next allocations: call it between phases."""
    if not _state.get("tuned"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory_above(limit_bytes: int) -> None:
    """``release_free_memory`` when the process's resident memory exceeds ``limit_bytes``: a
    loop of many large, differently shaped blocks (full CROWN's chunks) can fragment a tuned
    heap far above its working set (DM-medium at batch 8: 1.5 GiB live, 2.3-8.7 GiB resident
    in six processes); trimming after every chunk costs 60 % more time, trimming only above a
    limit costs nothing until the heap gets there."""
    rss = resident_bytes()
    if rss is not None and rss > limit_bytes:
        release_free_memory()
