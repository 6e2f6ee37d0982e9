"""Helpers for the dataset tests: small generated image trees in real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size=(20, 16), mode="RGB") -> np.ndarray:
    """Write a random image (format from the suffix) and return its pixels as saved."""
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)
    return pixels


def make_tree(root: Path, counts: dict[str, int], suffix=".png", seed=0, **kwargs) -> Path:
    """A class-per-folder tree: ``counts[class]`` images per class folder."""
    for k, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            write_image(root / name / f"img_{i:03d}{suffix}", seed * 1000 + k * 100 + i, **kwargs)
    return root
