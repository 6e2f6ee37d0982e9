"""Atomic file writes: nothing half-written ever appears under the final name, and what appears
has the permissions of a file created the ordinary way (``0o666`` less the umask)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask (read from /proc where it is shown, else set and restored at once)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` when the block
    completes, remove it when the block raises (same folder, so the rename is atomic).

    ``mkstemp`` creates the file with mode 0600 whatever the umask (teammates could not read
    the results): it gets ``0o666 & ~umask`` before the rename."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder next to ``path``; rename it onto ``path`` when the block
    completes, remove it when the block raises. An existing ``path`` is refused unless it is an
    empty folder or ``replace``: then it is moved aside, the new folder renamed in, the old one
    deleted (``path`` is never a half-written folder, only briefly absent)."""
    import shutil

    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.is_dir() and any(path.iterdir()):
            if not replace:
                raise FileExistsError(f"{path} exists and is not empty")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        elif path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
