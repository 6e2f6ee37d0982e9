"""``image-folder``: layouts, seeded split, messy real-world folders, bad input and the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from dataset_helpers import make_tree, write_image

from robnet_svc.datasets.image_folder import ImageFolder
from robnet_svc.errors import RobnetError
from robnet_svc.progress import SILENT, Reporter, console_reporter


def load(root, shape=(3, 16, 20), reporter=SILENT, **options):
    return ImageFolder(root, **options).load(shape, reporter=reporter)


@pytest.mark.parametrize("names", [("train", "test"), ("Training", "Testing")])
def test_train_and_test_folders(tmp_path, names):
    make_tree(tmp_path / names[0], {"cat": 3, "ant": 2})
    make_tree(tmp_path / names[1], {"cat": 1, "ant": 2}, seed=1)
    splits = load(tmp_path)
    assert splits.class_names == ["ant", "cat"]  # sorted folder order
    assert splits.train_labels.tolist() == [0, 0, 1, 1, 1]
    assert splits.test_labels.tolist() == [0, 0, 1]
    assert splits.train_images.shape == (5, 3, 16, 20) and splits.train_images.dtype == torch.float32
    assert splits.test_images.shape == (3, 3, 16, 20)
    assert splits.source == str(tmp_path.resolve())


def test_pixels_are_the_files_scaled_to_unit_range(tmp_path):
    make_tree(tmp_path, {"a": 5, "b": 5})
    pixels = write_image(tmp_path / "a" / "img_000.png", 7)  # native size (20 x 16): no resize
    splits = load(tmp_path, test_fraction=0.5)
    images = torch.cat([splits.train_images, splits.test_images])
    expected = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 255
    assert any(torch.equal(image, expected) for image in images)
    assert images.min() >= 0 and images.max() <= 1


def test_single_tree_split_is_seeded_and_stratified(tmp_path):
    make_tree(tmp_path, {"a": 10, "b": 20, "c": 30})
    first = load(tmp_path, (1, 8, 8))
    again = load(tmp_path, (1, 8, 8))
    other = load(tmp_path, (1, 8, 8), seed=1)
    assert torch.equal(first.test_images, again.test_images)
    assert not torch.equal(first.test_images, other.test_images)
    assert first.test_labels.bincount().tolist() == [2, 4, 6]  # 20 % of each class
    assert first.train_labels.bincount().tolist() == [8, 16, 24]
    half = load(tmp_path, (1, 8, 8), test_fraction="0.5", seed="3")  # command-line strings
    assert half.test_labels.bincount().tolist() == [5, 10, 15]


def test_messy_folder(tmp_path, capsys):
    make_tree(tmp_path / "Training", {"glioma": 2, "notumor": 2})
    make_tree(tmp_path / "Testing", {"glioma": 1, "notumor": 1}, seed=2)
    cls = tmp_path / "Testing" / "glioma"
    write_image(cls / ".ipynb_checkpoints" / "x-checkpoint.jpg", 1)  # hidden folder: ignored
    (cls / ".DS_Store").write_bytes(b"\0\1")  # hidden file: ignored, not counted
    (cls / "notes.txt").write_text("not an image")  # skipped and counted
    (tmp_path / "Training" / "README.md").write_text("loose file")  # skipped and counted
    write_image(cls / "Te-gl_0010 (copy).JPG", 2)  # any name, any case
    write_image(cls / "scan.Jpeg", 3, mode="L", size=(50, 40))
    write_image(cls / "sub" / "deeper.PNG", 4)  # sub-folder of a class folder
    (tmp_path / "Testing" / ".hidden_class").mkdir()  # hidden class folder: ignored
    lines = []
    splits = load(tmp_path, (1, 12, 12), reporter=Reporter(log=lines.append))
    assert splits.class_names == ["glioma", "notumor"]
    assert splits.test_labels.tolist() == [0, 0, 0, 0, 1]
    assert len(lines) == 1 and lines[0].startswith("skipped 2 file(s)") and str(tmp_path) in lines[0]
    with console_reporter() as reporter:  # the command line's reporter: one line on stderr
        load(tmp_path, (1, 12, 12), reporter=reporter)
    err = capsys.readouterr().err
    assert err.count("robnet-svc: skipped 2 file(s)") == 1 and str(tmp_path) in err


class _Sink:
    """A progress sink that records what it is told."""

    def __init__(self):
        self.tasks = {}

    def add_task(self, description, total=None, **fields):
        self.tasks[description] = [0, total, False]
        return description

    def update(self, task, advance=0, **fields):
        self.tasks[task][0] += advance

    def remove_task(self, task):
        self.tasks[task][2] = True


def test_decoding_progress_is_a_task_of_the_reporter_and_stdout_stays_clean(tmp_path, capsys):
    make_tree(tmp_path, {"a": 5, "b": 5})
    sink = _Sink()
    ImageFolder(tmp_path, cache=False).load((1, 8, 8), reporter=Reporter(sink))
    assert list(sink.tasks.values()) == [[10, 10, True]]  # every file counted, the task closed
    assert next(iter(sink.tasks)).startswith("decoding 10 images in ")
    with console_reporter() as reporter:  # the command line's bars or lines on stderr
        ImageFolder(tmp_path, cache=False).load((1, 8, 8), reporter=reporter)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "holds no class folders"),
        (lambda root: (make_tree(root, {"a": 2}), (root / "b").mkdir()), r"class folder .*b holds no"),
        (lambda root: (make_tree(root, {"a": 2}), (root / "b").mkdir(), (root / "b" / "x.txt").write_text("")),
         r"class folder .*b holds no"),
        (lambda root: make_tree(root / "train", {"a": 2}), "has train/ but no test/"),
        (lambda root: (make_tree(root / "train", {"a": 2, "b": 2}), make_tree(root / "test", {"a": 1, "c": 1})),
         "only in train/: b; only in test/: c"),
    ],
    ids=["missing", "empty", "empty-class", "class-without-images", "no-test", "class-mismatch"],
)
def test_bad_folders_are_one_line_errors(tmp_path, build, message):
    root = tmp_path / "data"
    build(root)
    with pytest.raises(RobnetError, match=message) as info:
        load(root)
    assert "\n" not in str(info.value)


def test_corrupt_image_is_named(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(RobnetError, match=r"cannot read image .*b/broken\.png"):
        load(tmp_path)


def test_every_corrupt_image_is_reported_in_one_error(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 3})
    bad = [tmp_path / "a" / f"cut_{i}.jpg" for i in range(3)] + [tmp_path / "b" / f"junk_{i}.png" for i in range(4)]
    for path in bad:
        path.write_bytes(b"\xff\xd8\xff not an image")
    with pytest.raises(RobnetError) as info:
        load(tmp_path, cache=False)
    message = str(info.value)
    assert message.startswith("7 of 13 image file(s) cannot be read") and "\n" not in message
    assert sum(path.name in message for path in bad) == 5 and message.endswith("and 2 more")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"colour": 1}, "has no option 'colour'; known: cache, seed, test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction=1.5"),
        ({"test_fraction": "lots"}, "test_fraction='lots'.*not a valid float"),
        ({"test_fraction": 0.01}, "cannot split"),
    ],
)
def test_bad_options(tmp_path, options, message):
    make_tree(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(RobnetError, match=message):
        load(tmp_path, **options)


def test_needs_data_dir():
    with pytest.raises(RobnetError, match="needs --data-dir"):
        ImageFolder(None)


def test_cache_is_used_and_keyed_by_the_files(tmp_path, private_cache):
    root = tmp_path / "data"
    make_tree(root, {"a": 4, "b": 4})
    first = load(root)
    entries = list(private_cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".npz"  # no temporary files left

    # Same size and mtime, unreadable content: the cache answers, nothing is decoded.
    victim = root / "a" / "img_001.png"
    stat = victim.stat()
    victim.write_bytes(b"x" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cached = load(root)
    assert torch.equal(cached.train_images, first.train_images) and torch.equal(cached.test_images, first.test_images)

    # A new mtime is a new key: decoded again, so the broken file is found.
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(RobnetError, match="img_001.png"):
        load(root)

    # Another target shape is another entry.
    victim.unlink()
    load(root, (1, 8, 8))
    assert len(list(private_cache.glob("*.npz"))) == 2


def test_cache_can_be_off_or_unwritable(tmp_path, private_cache, monkeypatch):
    make_tree(tmp_path / "data", {"a": 2, "b": 2})
    load(tmp_path / "data", test_fraction=0.5, cache="false")
    assert list(private_cache.iterdir()) == []
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("ROBNET_SVC_CACHE", str(blocker))
    assert load(tmp_path / "data", test_fraction=0.5).train_images.shape[0] == 2
