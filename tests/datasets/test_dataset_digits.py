"""``digits``: the embedded default (scikit-learn's handwritten digits), and registration."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from robnet_svc.datasets.digits import Digits
from robnet_svc.plugins import load_registry


def test_native_shape_split_and_range():
    splits = Digits().load(Digits.native_shape)
    assert splits.train_images.shape == (1437, 1, 8, 8) and splits.test_images.shape == (360, 1, 8, 8)
    assert splits.train_images.dtype == torch.float32
    assert splits.train_images.min() == 0 and splits.train_images.max() == 1
    assert splits.class_names == [str(d) for d in range(10)]
    counts = np.bincount(load_digits().target)
    assert np.abs(splits.test_labels.bincount().numpy() - 0.2 * counts).max() <= 1  # stratified
    reference = {img.tobytes(): int(lbl) for img, lbl in zip((load_digits().images / 16).astype(np.float32), load_digits().target)}
    for image, label in zip(splits.test_images[:20], splits.test_labels[:20]):
        assert reference[image[0].numpy().tobytes()] == int(label)  # real images, real labels


def test_seeded_and_adapted():
    first = Digits().load((3, 16, 16))
    again = Digits(None, seed=0).load((3, 16, 16))
    other = Digits(seed=1, test_fraction=0.5).load((1, 8, 8))
    assert torch.equal(first.test_images, again.test_images)
    assert first.train_images.shape == (1437, 3, 16, 16) and torch.equal(first.train_images[:, 0], first.train_images[:, 2])
    assert other.test_images.shape[0] == 899


def test_builtin_datasets_are_registered():
    registry = load_registry()
    for name in ("digits", "cifar10", "mri", "image-folder"):
        assert registry.datasets[name].dist == "robnet-svc"
    assert not registry.dataset("digits").needs_data_dir
