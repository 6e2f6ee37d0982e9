"""Adapting images to the model input ``(C, H, W)`` (SPEC §8).

Two entry points, one convention:

- ``adapt_batch``: in-memory images ``[N, C0, h, w]`` float in ``[0, 1]`` (CIFAR-10, digits),
  batched with torch;
- ``decode_image``: one image file of any size and mode, with Pillow (image folders).

Both return pixels in ``[0, 1]`` (files: uint8 ``0..255``, divided by 255 by the caller), resize
with bilinear interpolation that is antialiased when shrinking (Pillow's ``resize`` and
``torch.nn.functional.interpolate(antialias=True)`` compute the same filter), turn grey into RGB
by repeating the channel and RGB into grey by ITU-R 601 luminance ``0.299 R + 0.587 G + 0.114 B``
(Pillow's ``'L'`` conversion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from robnet_svc.errors import RobnetError

LUMA = (0.299, 0.587, 0.114)

#: Images adapted per step in ``adapt_batch``: bounds the float32 working memory (~50 MB at 3x64x64).
_CHUNK = 1024


def check_shape(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``image_shape`` as ``(C, H, W)`` with ``C`` in {1, 3} and positive sizes, else RobnetError."""
    try:
        channels, height, width = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise RobnetError(f"image shape {image_shape!r} is not (C, H, W)") from None
    if channels not in (1, 3) or height < 1 or width < 1:
        raise RobnetError(
            f"image shape {tuple(image_shape)} is not supported by the datasets: "
            "need 1 (grey) or 3 (RGB) channels and positive height and width"
        )
    return channels, height, width


def adapt_batch(images: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """``images [N, C0, h, w]`` (C0 in {1, 3}, values in [0, 1]) -> ``[N, C, H, W]`` float32 in [0, 1]."""
    channels, height, width = check_shape(image_shape)
    out = torch.empty((images.shape[0], channels, height, width), dtype=torch.float32)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float32)
        if chunk.shape[1] == 3 and channels == 1:
            chunk = torch.einsum("nchw,c->nhw", chunk, chunk.new_tensor(LUMA)).unsqueeze(1)
        if chunk.shape[-2:] != (height, width):
            chunk = F.interpolate(chunk, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        # Repeat after resizing: resizing one channel is cheaper and gives the same result.
        out[start : start + _CHUNK] = chunk.clamp(0.0, 1.0).expand(-1, channels, -1, -1)
    return out


def decode_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image file -> uint8 ``[C, H, W]`` (``mode`` 'L': C=1, 'RGB': C=3; ``size = (H, W)``).

    Any format and mode Pillow reads; EXIF orientation applied; 16-bit and float grey images
    scaled to 8 bits. A file Pillow cannot read is a RobnetError naming it.
    """
    height, width = size
    try:
        with Image.open(path) as image:
            # JPEG only: let the decoder shrink by 1/2, 1/4 or 1/8 (never below the target
            # size) before the antialiased resize. Several times faster on large photos.
            image.draft(mode, (width, height))
            ImageOps.exif_transpose(image, in_place=True)
            image = _to_8bit(image).convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except RobnetError:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise RobnetError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}; remove or replace the file"
        ) from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit integer and float grey images as 8-bit 'L' (Pillow's own conversion clips them)."""
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode in ("I", "F"):
        # 32-bit grey has no fixed range: take the smallest usual one that holds the data.
        peak = float(np.asarray(image).max(initial=0))
        scale = next(r for r in (1.0 if image.mode == "F" else 255.0, 255.0, 65535.0, max(peak, 1.0)) if peak <= r)
    else:
        return image
    values = np.asarray(image, dtype=np.float64) / scale * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
