"""``image-folder``: any class-per-folder tree of images (SPEC §8).

Layouts (under ``--data-dir``)::

    train/<class>/*.png  +  test/<class>/*.png      (also Training/ + Testing/)
    <class>/*.png                                   (one tree: seeded stratified split)

Labels are the class folders in sorted order. Every ``*.jpg``, ``*.jpeg`` and ``*.png``
(any case, any name, also in sub-folders of a class folder) is an image; hidden files and
folders (name starting with '.', e.g. ``.ipynb_checkpoints``) are ignored; other files are
skipped and counted (one log line to the reporter ``load`` is given). Images of any size and mode are adapted to the
model input (see ``adapt.decode_image``) and returned as float32 in ``[0, 1]``.

Options: ``test_fraction`` (0.2) and ``seed`` (0) for the one-tree layout; ``cache`` (true):
keep decoded images in the on-disk cache (``cache.py``). Decoding runs in a thread pool, its
progress a task of the reporter (a bar or plain lines on the command line), with as many workers as the
run's thread count (``robnet_svc.threads``). Every file that cannot be decoded is reported
in one error (a count and the first few), not one per run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from robnet_svc import threads
from robnet_svc.datasets import cache
from robnet_svc.datasets.adapt import check_shape, decode_image
from robnet_svc.datasets.base import Dataset, Splits
from robnet_svc.datasets.split import stratified_split
from robnet_svc.errors import RobnetError
from robnet_svc.plugin_options import Option
from robnet_svc.progress import SILENT, Reporter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: Files per task of the decoding pool: big enough that scheduling costs little, small enough
#: that the progress bar moves. Threads, not processes: Pillow decodes and resizes without the
#: GIL. Measured on the 7019 MRI JPEGs, 2 cores: 32x32 grey serial 0.9 s, threads 0.75-0.95 s,
#: fork processes 0.5 s; 128x128 serial 1.7 s, threads 1.15-1.25 s, fork 1.05 s. Processes win
#: by fractions of a second (and the cache removes even that on the next run), but fork is
#: unsafe in a multi-threaded (torch) process and absent on macOS/Windows, and spawn re-imports
#: torch in every worker (1-2 s).
_CHUNK = 64

#: Unreadable files named in the error (the rest are counted).
_SHOWN_BAD = 5


@dataclass
class Tree:
    """One scanned class-per-folder tree: ``files[i]`` has label ``labels[i]`` (``[N]`` int64)."""

    root: Path
    class_names: list[str]
    files: list[Path]
    labels: np.ndarray
    skipped: int  # non-hidden files that are not images in a class folder


def scan_tree(root: Path) -> Tree:
    """The classes (sorted non-hidden sub-folders) and images of ``root``; RobnetError if a
    class folder holds no image or there is no class folder."""
    require_folder(root)
    class_dirs, skipped = [], 0
    for entry in sorted(_entries(root)):
        if entry.is_dir():
            class_dirs.append(entry)
        else:
            skipped += 1
    if not class_dirs:
        raise RobnetError(f"{root} holds no class folders with images (expected <class>/<image>.jpg|.png)")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images, others = _images_under(class_dir)
        if not images:
            raise RobnetError(f"class folder {class_dir} holds no .jpg/.jpeg/.png images; add images or remove it")
        files += images
        labels += [label] * len(images)
        skipped += others
    return Tree(root, [d.name for d in class_dirs], files, np.asarray(labels, dtype=np.int64), skipped)


def require_folder(path: Path) -> Path:
    """``path`` if it is a folder, else a RobnetError saying what it is instead."""
    if not path.is_dir():
        raise RobnetError(f"data folder {path} does not exist" if not path.exists() else f"{path} is not a folder")
    return path


def _entries(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise RobnetError(f"cannot list folder {folder}: {exc.strerror or exc}") from None


def _images_under(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` (sorted, hidden ones and hidden folders left out) and how
    many other files there are."""
    images, others = [], 0

    def fail(exc: OSError) -> None:
        raise RobnetError(f"cannot list folder {exc.filename}: {exc.strerror or exc}")

    for parent, dirs, names in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                images.append(Path(parent, name))
            else:
                others += 1
    return sorted(images), others


def load_images(
    root: Path, files: list[Path], mode: str, size: tuple[int, int], reporter: Reporter, use_cache: bool
) -> np.ndarray:
    """Decoded images ``[N, C, H, W]`` uint8 of ``files`` (all below ``root``), from the cache
    when it holds them, else decoded in parallel (and cached)."""
    key = cache.folder_key(root, files, mode, size) if use_cache else None
    if key is not None and (images := cache.load(key, len(files))) is not None:
        return images
    images = decode_files(files, mode, size, reporter, f"decoding {len(files)} images in {root}")
    if key is not None:
        cache.save(key, images)
    return images


def decode_files(files: list[Path], mode: str, size: tuple[int, int], reporter: Reporter, label: str) -> np.ndarray:
    """Decode ``files`` with a thread pool: uint8 ``[N, C, H, W]`` (C=1 for 'L', 3 for 'RGB').

    Every file is tried; those that cannot be read are reported together in one RobnetError."""
    images = np.empty((len(files), 1 if mode == "L" else 3, *size), dtype=np.uint8)

    def decode_chunk(start: int) -> tuple[int, list[str]]:
        stop, bad = min(start + _CHUNK, len(files)), []
        for i in range(start, stop):
            try:
                images[i] = decode_image(files[i], mode, size)
            except RobnetError as exc:
                bad.append(str(exc))
        return stop - start, bad

    failures: list[str] = []
    with reporter.task(label, total=len(files)) as task:
        pool = ThreadPoolExecutor(max_workers=threads.decode_workers(), thread_name_prefix="robnet-decode")
        try:
            for count, bad in pool.map(decode_chunk, range(0, len(files), _CHUNK)):
                failures += bad
                task.advance(count)
        finally:  # an interrupt: do not decode the rest
            pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        shown = "; ".join(failures[:_SHOWN_BAD]) + (f"; and {len(failures) - _SHOWN_BAD} more"
                                                    if len(failures) > _SHOWN_BAD else "")
        raise RobnetError(f"{len(failures)} of {len(files)} image file(s) cannot be read; remove or replace "
                          f"them: {shown}")
    return images


class ImageFolder(Dataset):
    """Any class-per-folder image tree: train/ + test/ folders, or one tree split by a seeded fraction."""

    name = "image-folder"
    description = "Any class-per-folder image tree: train/ + test/, Training/ + Testing/, or one tree split in two"
    options = {
        "test_fraction": Option(float, 0.2, "one tree: share of the images in the test split (stratified by class)"),
        "seed": Option(int, 0, "one tree: seed of the train/test split"),
        "cache": Option(bool, True, "keep the decoded images in the on-disk cache (ROBNET_SVC_CACHE) for the next run"),
    }

    #: (train, test) folder names recognised under --data-dir, in order of preference.
    split_folders: ClassVar[tuple[tuple[str, str], ...]] = (("train", "test"), ("Training", "Testing"))
    #: Whether a tree without split folders is split by ``test_fraction``.
    single_tree: ClassVar[bool] = True
    #: Decode to one channel whatever the model (grey data stored as RGB); repeated for RGB models.
    grey_source: ClassVar[bool] = False

    def load(self, image_shape: tuple[int, int, int], reporter: Reporter = SILENT) -> Splits:
        channels, height, width = check_shape(image_shape)
        root = require_folder(self.data_dir)
        trees = self._trees(root)
        class_names = trees[0].class_names
        files = [f for tree in trees for f in tree.files]
        skipped = sum(tree.skipped for tree in trees)
        if skipped:
            reporter.log(f"skipped {skipped} file(s) under {root} that are not "
                         f"{'/'.join(IMAGE_SUFFIXES)} images in a class folder")

        mode = "L" if channels == 1 or self.grey_source else "RGB"
        pixels = load_images(root, files, mode, (height, width), reporter, self.cache)
        labels = np.concatenate([tree.labels for tree in trees])
        if len(trees) == 2:
            n_train = len(trees[0].files)
            train, test = slice(0, n_train), slice(n_train, len(files))
        else:
            train, test = stratified_split(
                labels, self.test_fraction, self.seed, str(root)
            )
        return Splits(
            train_images=_to_float(pixels[train], channels),
            train_labels=torch.from_numpy(labels[train]),
            test_images=_to_float(pixels[test], channels),
            test_labels=torch.from_numpy(labels[test]),
            class_names=class_names,
            source=str(root.resolve()),
        )

    def _trees(self, root: Path) -> list[Tree]:
        """``[train, test]`` trees for a split layout, or ``[whole]`` for one tree."""
        for train_name, test_name in self.split_folders:
            train_dir, test_dir = root / train_name, root / test_name
            if train_dir.is_dir() and test_dir.is_dir():
                train, test = scan_tree(train_dir), scan_tree(test_dir)
                if train.class_names != test.class_names:
                    only_train = sorted(set(train.class_names) - set(test.class_names))
                    only_test = sorted(set(test.class_names) - set(train.class_names))
                    raise RobnetError(
                        f"{train_dir} and {test_dir} need the same class folders: only in {train_name}/: "
                        f"{', '.join(only_train) or 'none'}; only in {test_name}/: {', '.join(only_test) or 'none'}"
                    )
                return [train, test]
            if train_dir.is_dir() or test_dir.is_dir():
                present, missing = (train_name, test_name) if train_dir.is_dir() else (test_name, train_name)
                raise RobnetError(f"{root} has {present}/ but no {missing}/; add it, or use one class-per-folder tree")
        if not self.single_tree:
            layouts = " or ".join(f"{a}/ and {b}/" for a, b in self.split_folders)
            raise RobnetError(
                f"{root} has no {layouts} folders; point --data-dir at the folder that holds them "
                "(--dataset image-folder reads other class-per-folder layouts)"
            )
        return [scan_tree(root)]


def _to_float(pixels: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 ``[N, c, H, W]`` -> float32 ``[N, channels, H, W]`` in [0, 1], a grey channel repeated
    for RGB; one allocation and one pass (the float images are the largest thing we hold)."""
    out = torch.empty((pixels.shape[0], channels, *pixels.shape[2:]), dtype=torch.float32)
    out.copy_(torch.from_numpy(pixels).expand(-1, channels, -1, -1))
    return out.div_(255.0)
