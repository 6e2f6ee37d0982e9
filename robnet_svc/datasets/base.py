"""Dataset plugins: base class and the split container (SPEC §8).

Pixel range: every dataset returns float32 images in ``[0, 1]``, shaped to the model input
``(C, H, W)`` (resized; grey -> RGB by repetition, RGB -> grey by ITU-R 601 luminance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor


@dataclass
class Splits:
    """Train and test images of a dataset, adapted to the model input.

    train_images ``[N, C, H, W]`` float32 in [0, 1]; train_labels ``[N]`` int64 in [0, K);
    same for test; ``class_names[i]`` names label i; ``source`` describes where the data came
    from (path, or package) for the certificate's provenance.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Dataset(ABC):
    """Base class of dataset plugins.

    ``name``: the ``--dataset`` name; ``description``: one line; ``needs_data_dir``: whether
    ``--data-dir`` is required. ``load`` returns ``Splits`` or raises RobnetError (missing
    folder, empty class, corrupt image: naming the path).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_data_dir: ClassVar[bool] = True

    def __init__(self, data_dir: Path | None = None, **options: Any):
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.options = options

    @abstractmethod
    def load(self, image_shape: tuple[int, int, int], progress: bool = True) -> Splits:
        """Load and adapt the images to ``image_shape = (C, H, W)``."""
