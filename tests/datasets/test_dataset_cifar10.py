"""``cifar10``: real pickle format (Python 2 and 3 pickles), safe unpickling, adaptation, errors."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robnet_svc.datasets.adapt import adapt_batch
from robnet_svc.datasets.cifar10 import Cifar10
from robnet_svc.errors import RobnetError

NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR-10: byte strings as STRING opcodes
    (not ``_codecs.encode``) and numpy under its old module name ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)


def dump(obj, path: Path, protocol) -> None:
    with open(path, "wb") as out:
        if protocol == "py2":
            Py2Pickler(out, protocol=2).dump(obj)
        else:
            pickle.dump(obj, out, protocol=protocol)


def make_cifar(parent: Path, protocol="py2", per_batch=4, n_test=6) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py; returns the folder and all train and test pixels [N, 3072]."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    dump({b"num_cases_per_batch": per_batch, b"label_names": NAMES, b"num_vis": 3072}, folder / "batches.meta", protocol)
    batches = []
    for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, count)]
        dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
              b"filenames": [f"{name}_{i}.png".encode() for i in range(count)]}, folder / name, protocol)
        batches.append((data, labels))
    return folder, np.concatenate([d for d, _ in batches[:5]]), batches[5][0]


@pytest.mark.parametrize("protocol", ["py2", 4, 5])
def test_reads_the_real_format(tmp_path, protocol):
    folder, train, test = make_cifar(tmp_path, protocol)
    splits = Cifar10(folder).load((3, 32, 32))
    assert splits.class_names[0] == "airplane" and splits.num_classes == 10
    assert splits.train_images.shape == (20, 3, 32, 32) and splits.test_images.shape == (6, 3, 32, 32)
    assert torch.equal(splits.train_images, torch.from_numpy(train.reshape(-1, 3, 32, 32)).float() / 255)
    assert torch.equal(splits.test_images, torch.from_numpy(test.reshape(-1, 3, 32, 32)).float() / 255)
    assert splits.train_labels.dtype == torch.int64 and splits.source == str(folder.resolve())


def test_parent_folder_and_adaptation(tmp_path):
    folder, train, _ = make_cifar(tmp_path)
    splits = Cifar10(tmp_path).load((1, 16, 16))  # the parent of the folder
    expected = adapt_batch(torch.from_numpy(train.reshape(-1, 3, 32, 32)).float() / 255, (1, 16, 16))
    assert splits.train_images.shape == (20, 1, 16, 16) and torch.equal(splits.train_images, expected)


class Exploit:
    """Pickles to a call of ``os.system`` (what a malicious batch file would hold)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("where", ["data_batch_3", "batches.meta"])
def test_malicious_pickle_does_not_run(tmp_path, where):
    folder, _, _ = make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / where, "wb") as out:
        pickle.dump({b"data": Exploit(f"touch {marker}"), b"labels": []}, out)
    with pytest.raises(RobnetError, match=rf"{where}.*refusing to load posix\.system"):
        Cifar10(folder).load((3, 32, 32))
    assert not marker.exists()


def test_non_plain_objects_are_refused(tmp_path):
    folder, _, _ = make_cifar(tmp_path)
    from collections import OrderedDict

    with open(folder / "test_batch", "wb") as out:
        pickle.dump(OrderedDict(data=1), out)
    with pytest.raises(RobnetError, match="test_batch.*refusing to load collections.OrderedDict"):
        Cifar10(folder).load((3, 32, 32))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RobnetError, match="does not exist"):
        Cifar10(tmp_path / "nowhere").load((3, 32, 32))
    with pytest.raises(RobnetError, match="neither batches.meta nor cifar-10-batches-py"):
        Cifar10(tmp_path).load((3, 32, 32))
    folder, _, _ = make_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(RobnetError, match="data_batch_4 is missing"):
        Cifar10(folder).load((3, 32, 32))
    dump({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, folder / "data_batch_4", 4)
    with pytest.raises(RobnetError, match="data_batch_4 is not a batch"):
        Cifar10(folder).load((3, 32, 32))
    (folder / "data_batch_4").write_bytes(b"\x80\x04truncated")
    with pytest.raises(RobnetError, match="cannot read CIFAR-10 file .*data_batch_4"):
        Cifar10(folder).load((3, 32, 32))


def test_options_and_data_dir():
    with pytest.raises(RobnetError, match="needs --data-dir"):
        Cifar10()
    with pytest.raises(RobnetError, match="has no option 'seed'; known: none"):
        Cifar10("x", seed=1)
