"""How many threads a run computes with: one number for every pool it uses.

Pools: torch's intra-op pool (OpenMP/MKL: convolutions, matrix products) and inter-op
pool, every onnxruntime session (``apply_to_ort``) and the image-decoding pool of the
image-folder datasets (``decode_workers``).

Default (``default_threads``): ``OMP_NUM_THREADS`` when the user set it, else half the
cores this process may use, at least 1 and at most 8. Not all of them: an OpenMP pool
meets at a barrier after every operation, so when another process takes one of its cores
every operation waits for the thread that was descheduled. Measured with the demo on 2
cores beside one busy process, all cores made it about 10 times slower, one thread made it
barely slower than on an idle machine (docs/cli.md, "Threads"). The cap: the networks this
tool hardens are small, and their operations stop scaling well before 8 threads.

torch accepts the inter-op count only once per process and only before its first parallel
work; a later ``configure`` keeps the first inter-op count (the intra-op count, the one that
matters here, changes every time).
"""

from __future__ import annotations

import os

#: Most threads the default picks (an explicit ``--threads`` may ask for more).
MAX_DEFAULT = 8

_configured: int | None = None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` if it is a positive integer, else ``min(8, max(1, cores // 2))``."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return min(MAX_DEFAULT, max(1, usable_cores() // 2))


def configure(threads: int | None = None) -> int:
    """Use ``threads`` (None: ``default_threads()``) in every pool from now on; returns the count."""
    global _configured
    import torch

    count = default_threads() if threads is None else int(threads)
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {count}")
    _configured = count
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:  # set before, or parallel work already ran: torch keeps the first value
        pass
    return count


def current() -> int:
    """The configured count, or the default when ``configure`` was not called."""
    return _configured if _configured is not None else default_threads()


def decode_workers() -> int:
    """Workers of the image-decoding thread pool."""
    return current()


def apply_to_ort(session_options) -> None:
    """Set an ``onnxruntime.SessionOptions`` to this run's thread count, without spin-waiting
    (a spinning pool takes cores from everything else on a shared machine)."""
    session_options.intra_op_num_threads = current()
    session_options.inter_op_num_threads = 1
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
