"""Errors the command line turns into one clear line.

`RobnetError` is bad input or usage: the CLI prints its message on one line and exits 2
(no traceback unless `--debug`). Its message must say what was wrong, with which file,
node or option, and what to do.

`SoundnessError` is a bug in robnet-svc itself: a certificate contradicted by a concrete
counterexample. It is never caught silently; the CLI exits 3.

A run that does not fit in memory at its batch sizes is a usage problem, not a bug:
`out_of_memory` turns the allocator's failure into a `RobnetError` that says so.
"""

import re


class RobnetError(Exception):
    """Bad input or usage (exit code 2)."""

    exit_code = 2


class SoundnessError(Exception):
    """A certified sample was broken by a concrete attack: a bug, reported loudly (exit 3)."""

    exit_code = 3


def allocation_failure(exc: BaseException) -> str | None:
    """The allocator's line when ``exc`` is a failed allocation, None for any other exception:
    a ``MemoryError``, torch's CPU allocator (``DefaultCPUAllocator: can't allocate memory: you
    tried to allocate N bytes``, which TorchScript buries under a first line of its own) or
    CUDA's ``torch.OutOfMemoryError`` (``CUDA out of memory. Tried to allocate ...``). The line
    comes without an exception name or the allocator's ``[enforce fail at ...]`` prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    hits = [line for line in lines if "can't allocate memory" in line or "out of memory" in line.lower()]
    if hits:
        line = hits[-1]
    elif isinstance(exc, MemoryError):
        line = lines[0] if lines else type(exc).__name__
    else:
        return None
    line = re.sub(r"^\w+Error: ", "", line)  # TorchScript repeats the inner exception's name
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", line)


#: What to change when a run does not fit in memory (the options of ``harden`` and ``certify``).
OUT_OF_MEMORY_HINT = ("lower --batch-size (training) or --cert-batch-size (certification), pick a cheaper "
                      "--method / --cert-method (rsip needs the most), or run on a machine with more memory")


def out_of_memory(exc: BaseException) -> RobnetError | None:
    """A one-line ``RobnetError`` (exit code 2) for a failed allocation (``allocation_failure``),
    naming the allocator's line and what to change; None for any other exception."""
    line = allocation_failure(exc)
    if line is None:
        return None
    return RobnetError(f"out of memory ({line[:200]}); {OUT_OF_MEMORY_HINT}")
