"""Adapting images to the model input: batched torch path and Pillow file path agree with Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from robnet_svc.datasets.adapt import adapt_batch, check_shape, decode_image
from robnet_svc.errors import RobnetError

# Pillow works in uint8: its results are rounded to 1/255.
ROUNDING = 1.5 / 255


def random_rgb(seed=0, size=(24, 18)) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_batch(pixels: np.ndarray) -> torch.Tensor:
    """HWC or HW uint8 -> [1, C, H, W] float in [0, 1]."""
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(chw.copy()).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("size", [(12, 9), (24, 18), (40, 30)])
def test_rgb_to_grey_and_resize_match_pillow(size):
    pixels = random_rgb()
    expected = np.asarray(Image.fromarray(pixels).convert("L").resize(size, Image.BILINEAR)) / 255
    got = adapt_batch(as_batch(pixels), (1, size[1], size[0]))
    assert got.shape == (1, 1, size[1], size[0]) and got.dtype == torch.float32
    assert np.abs(got[0, 0].numpy() - expected).max() <= ROUNDING


def test_rgb_resize_matches_pillow():
    pixels = random_rgb(1)
    expected = np.asarray(Image.fromarray(pixels).resize((10, 7), Image.BILINEAR)).transpose(2, 0, 1) / 255
    got = adapt_batch(as_batch(pixels), (3, 7, 10))
    assert np.abs(got[0].numpy() - expected).max() <= ROUNDING


def test_grey_to_rgb_repeats_the_channel_and_keeps_the_range():
    grey = torch.rand(5, 1, 8, 8)
    got = adapt_batch(grey, (3, 16, 16))
    assert got.shape == (5, 3, 16, 16)
    assert torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 0], got[:, 2])
    assert got.min() >= 0 and got.max() <= 1
    assert torch.equal(adapt_batch(grey, (1, 8, 8)), grey)  # same shape: unchanged


@pytest.mark.parametrize("shape", [(2, 8, 8), (4, 8, 8), (1, 0, 8), (3, 8)])
def test_unsupported_shapes_are_rejected(shape):
    with pytest.raises(RobnetError, match="shape"):
        check_shape(shape)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "I;16"])
def test_decode_any_mode(tmp_path, mode):
    pixels = random_rgb(2, size=(30, 20))
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(image.convert("L")).astype(np.uint16) * 257)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    for target in ("L", "RGB"):
        got = decode_image(path, target, (10, 15))
        assert got.dtype == np.uint8 and got.shape == ((1 if target == "L" else 3), 10, 15)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / "deep.png")
    got = decode_image(tmp_path / "deep.png", "L", (4, 4))
    assert got[0, 0].tolist() == [0, 128, 255, 255]


def test_native_size_png_is_exact(tmp_path):
    pixels = random_rgb(3)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    assert np.array_equal(decode_image(tmp_path / "x.png", "RGB", (18, 24)), pixels.transpose(2, 0, 1))


def test_exif_orientation_is_applied(tmp_path):
    # 20 wide x 10 high, left half black; orientation 6 = shown rotated 90 degrees clockwise,
    # so the displayed image is 10 wide x 20 high with the black half on top.
    pixels = np.full((10, 20), 255, np.uint8)
    pixels[:, :10] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    got = decode_image(tmp_path / "rotated.jpg", "L", (20, 10))[0]
    assert got[:8].mean() < 30 and got[12:].mean() > 225


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(RobnetError, match="garbage.png"):
        decode_image(tmp_path / "garbage.png", "L", (8, 8))
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(4, size=(64, 64))).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(RobnetError, match="cut.jpg"):
        decode_image(tmp_path / "cut.jpg", "L", (64, 64))
