"""``mri``: the Brain Tumor MRI layout, on generated folders and on the real copy when present."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from dataset_helpers import make_tree, write_image

from robnet_svc.datasets.mri import BrainTumorMri
from robnet_svc.errors import RobnetError

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "brain-tumor-mri"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def make_mri(root: Path) -> Path:
    make_tree(root / "Training", {c: 3 for c in CLASSES}, suffix=".jpg", size=(40, 40))
    make_tree(root / "Testing", {c: 2 for c in CLASSES}, suffix=".jpg", seed=1, mode="L", size=(37, 29))
    write_image(root / "Testing" / "meningioma" / ".ipynb_checkpoints" / "Te-me_0011-checkpoint.jpg", 9)
    return root


def test_generated_mri_folder(tmp_path):
    splits = BrainTumorMri(make_mri(tmp_path)).load((1, 16, 16))
    assert splits.class_names == CLASSES
    assert splits.train_images.shape == (12, 1, 16, 16) and splits.test_images.shape == (8, 1, 16, 16)
    assert splits.train_labels.bincount().tolist() == [3, 3, 3, 3]
    assert splits.test_labels.bincount().tolist() == [2, 2, 2, 2]


def test_rgb_model_gets_the_grey_channel_repeated(tmp_path):
    splits = BrainTumorMri(make_mri(tmp_path)).load((3, 16, 16))
    grey = BrainTumorMri(tmp_path).load((1, 16, 16))
    # Colour files are read as grey (one channel), then repeated for the RGB model.
    assert torch.equal(splits.train_images, grey.train_images.expand(-1, 3, -1, -1))


@pytest.mark.parametrize(
    "layout, message",
    [
        ("nothing", "has no Training/ and Testing/ folders"),
        ("train-only", "has Training/ but no Testing/"),
        ("lowercase", "has no Training/ and Testing/ folders"),
    ],
)
def test_layout_errors(tmp_path, layout, message):
    if layout == "train-only":
        make_tree(tmp_path / "Training", {"a": 1})
    elif layout == "lowercase":
        make_tree(tmp_path / "train", {"a": 1})
        make_tree(tmp_path / "test", {"a": 1})
    else:
        make_tree(tmp_path, {"a": 1})
    with pytest.raises(RobnetError, match=message):
        BrainTumorMri(tmp_path).load((1, 8, 8))


def test_mri_options():
    with pytest.raises(RobnetError, match="has no option 'test_fraction'; known: cache"):
        BrainTumorMri("x", test_fraction=0.1)
    with pytest.raises(RobnetError, match="needs --data-dir"):
        BrainTumorMri()


def test_real_brain_tumor_mri_folder():
    if not (REAL / "Training").is_dir():
        pytest.skip(f"{REAL} not present")
    start = time.perf_counter()
    cold = BrainTumorMri(REAL).load((1, 32, 32))
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = BrainTumorMri(REAL).load((1, 32, 32))
    warm_s = time.perf_counter() - start
    print(f"real MRI 1x32x32: cold {cold_s:.2f} s, warm {warm_s:.2f} s")

    assert cold.class_names == CLASSES
    assert cold.train_images.shape == (5708, 1, 32, 32) and cold.test_images.shape == (1311, 1, 32, 32)
    assert cold.train_labels.bincount().tolist() == [1321, 1339, 1591, 1457]
    assert cold.test_labels.bincount().tolist() == [300, 306, 405, 300]  # checkpoint copy not counted
    assert 0 <= cold.train_images.min() and cold.train_images.max() <= 1 and cold.train_images.std() > 0.1
    assert torch.equal(cold.train_images, warm.train_images) and torch.equal(cold.test_labels, warm.test_labels)
    assert warm_s < cold_s
