"""On-disk cache of decoded image folders, so a second run starts in seconds.

An entry is one ``.npz`` holding ``images`` uint8 ``[N, C, H, W]`` (the decoded, resized pixels of
every image of a folder, in scan order). Its name is a hash of what determines those pixels: the
files (relative path, size, modification time), the target mode and size and ``VERSION`` of the
decoding. Any change to a file, an added or removed file, another shape: another entry.

Location: ``$ROBNET_SVC_CACHE`` if set, else ``~/.cache/robnet-svc``. Entries are written to a
temporary name and renamed into place, so a reader never sees half an entry; an unreadable
entry is ignored (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from robnet_svc.atomic import atomic_path

ENV_CACHE = "ROBNET_SVC_CACHE"

#: Bump when the decoding changes (the same files would give other pixels).
VERSION = 1


def cache_dir() -> Path:
    """The cache folder (not created)."""
    configured = os.environ.get(ENV_CACHE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "robnet-svc"


def folder_key(root: Path, files: list[Path], mode: str, size: tuple[int, int]) -> str:
    """Hash of the files' relative paths, sizes and mtimes (in this order) and the target."""
    digest = hashlib.sha256(json.dumps({"version": VERSION, "mode": mode, "size": list(size)}).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def load(key: str, count: int) -> np.ndarray | None:
    """The cached ``images`` of ``key`` if present, readable and holding ``count`` images."""
    path = cache_dir() / f"images-{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as entry:
            images = entry["images"]
    except (OSError, ValueError, KeyError):  # absent, truncated or foreign: decode again
        return None
    return images if images.shape[0] == count and images.dtype == np.uint8 else None


def save(key: str, images: np.ndarray) -> Path | None:
    """Write ``images`` under ``key`` atomically; returns the path, or None if the cache is not writable."""
    folder = cache_dir()
    target = folder / f"images-{key}.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as temp, temp.open("wb") as out:
            np.savez(out, images=images)
    except OSError:  # a read-only or full cache only costs speed
        return None
    return target
