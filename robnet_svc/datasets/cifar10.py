"""``cifar10``: the standard ``cifar-10-batches-py`` folder (SPEC §8), never downloaded.

``--data-dir`` is that folder or the folder that contains it. Files: ``data_batch_1`` ..
``data_batch_5`` (50000 training images), ``test_batch`` (10000), ``batches.meta`` (class
names). Each is a pickled dict with ``b"data"`` uint8 ``[N, 3072]`` (R, G and B planes of
32x32) and ``b"labels"``. Images are adapted to the model input (``adapt.adapt_batch``) and
returned as float32 in ``[0, 1]``.

Pickles can run code when loaded, so they are read with ``SafeUnpickler``, which resolves only
the few numpy names an array needs: a file that asks for anything else (``os.system``, ...) is
a RobnetError naming the file, and nothing of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from robnet_svc.datasets.adapt import adapt_batch, check_shape
from robnet_svc.datasets.base import Dataset, Splits
from robnet_svc.errors import RobnetError
from robnet_svc.progress import SILENT, Reporter

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"


def _safe_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object: all a pickled numpy array or dtype refers to (the module of
    ``_reconstruct`` moved from ``numpy.core`` to ``numpy._core`` in numpy 2; files carry either)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars (numbers)
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # pickle protocol 5
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds plain dicts, lists, bytes, strings, numbers and numpy arrays only."""

    _allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_pickle(path: Path) -> object:
    """The object pickled in ``path`` (Python 2 strings as bytes), read with ``SafeUnpickler``."""
    try:
        with open(path, "rb") as handle:
            return SafeUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise RobnetError(
            f"CIFAR-10 file {path} is missing; --data-dir must hold the complete {FOLDER} folder"
        ) from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError from numpy, ...
        raise RobnetError(f"cannot read CIFAR-10 file {path}: {type(exc).__name__}: {exc}") from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]``."""
    batch = read_pickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or labels is None or len(labels) != data.shape[0]:
        raise RobnetError(f"CIFAR-10 file {path} is not a batch: expected b'data' uint8 [N, 3072] and N b'labels'")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise RobnetError(f"CIFAR-10 file {path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def find_folder(data_dir: Path) -> Path:
    """``data_dir`` itself if it holds the batches, else its ``cifar-10-batches-py`` sub-folder."""
    if (data_dir / META_FILE).is_file():
        return data_dir
    if (data_dir / FOLDER / META_FILE).is_file():
        return data_dir / FOLDER
    if not data_dir.is_dir():
        raise RobnetError(f"data folder {data_dir} does not exist")
    raise RobnetError(
        f"{data_dir} holds neither {META_FILE} nor {FOLDER}/; point --data-dir at the extracted {FOLDER} folder"
    )


class Cifar10(Dataset):
    """CIFAR-10 from a local cifar-10-batches-py folder (50000 train, 10000 test, 32x32 RGB)."""

    name = "cifar10"
    description = "CIFAR-10 from a local cifar-10-batches-py folder (python pickle batches; no download)"
    native_shape = (3, 32, 32)

    def load(self, image_shape: tuple[int, int, int], reporter: Reporter = SILENT) -> Splits:
        shape = check_shape(image_shape)
        folder = find_folder(self.data_dir)
        meta = read_pickle(folder / META_FILE)
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or len(names) != 10:
            raise RobnetError(f"CIFAR-10 file {folder / META_FILE} has no list of 10 b'label_names'")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        train = [read_batch(folder / name) for name in TRAIN_FILES]
        test_images, test_labels = read_batch(folder / TEST_FILE)
        train_images = np.concatenate([images for images, _ in train])
        train_labels = np.concatenate([labels for _, labels in train])
        return Splits(
            train_images=_adapt(train_images, shape),
            train_labels=torch.from_numpy(train_labels),
            test_images=_adapt(test_images, shape),
            test_labels=torch.from_numpy(test_labels),
            class_names=class_names,
            source=str(folder.resolve()),
        )


def _adapt(pixels: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 ``[N, 3, 32, 32]`` -> float32 ``[N, C, H, W]`` in [0, 1]."""
    return adapt_batch(torch.from_numpy(pixels).div(255.0), shape)
