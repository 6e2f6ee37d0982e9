"""Dataset plugins: base class and the split container (SPEC §8).

Pixel range: every dataset returns float32 images in ``[0, 1]``, shaped to the model input
``(C, H, W)`` (resized; grey -> RGB by repetition, RGB -> grey by ITU-R 601 luminance).

Options: ``Dataset(data_dir, **options)``. A dataset that declares ``option_defaults``
accepts exactly those names (unknown ones are a RobnetError listing the known ones); values
given as strings (command line) are converted to the type of the default. A dataset that
leaves ``option_defaults`` as ``None`` receives its options unchecked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from robnet_svc.errors import RobnetError
from robnet_svc.progress import SILENT, Reporter


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

    ``option_defaults``: the options this dataset accepts and their defaults (``None``: any).
    ``native_shape``: the images' own ``(C, H, W)`` when every image has it (e.g. 8x8 digits),
    so a caller without a model yet (``robnet-svc demo``) can pick an input shape; else None.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_data_dir: ClassVar[bool] = True
    option_defaults: ClassVar[dict[str, Any] | None] = None
    native_shape: ClassVar[tuple[int, int, int] | None] = None

    def __init__(self, data_dir: Path | None = None, **options: Any):
        if data_dir is None and self.needs_data_dir:
            raise RobnetError(f"dataset {self.name!r} needs --data-dir: the folder that holds its files")
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.options = self._resolve_options(options)

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if self.option_defaults is None:
            return dict(options)
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(sorted(self.option_defaults)) or "none"
            raise RobnetError(f"unknown option(s) {', '.join(unknown)} for dataset {self.name!r}; known: {known}")
        resolved = dict(self.option_defaults)
        for key, value in options.items():
            resolved[key] = _coerce(self.name, key, value, self.option_defaults[key])
        return resolved

    @abstractmethod
    def load(self, image_shape: tuple[int, int, int], reporter: Reporter = SILENT) -> Splits:
        """Load and adapt the images to ``image_shape = (C, H, W)``; ``reporter``: where to report
        progress and notes (``robnet_svc.progress.Reporter``; the default reports nothing)."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(dataset: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` (strings come from the command line)."""
    kind = type(default)
    if default is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise RobnetError(
            f"option {key}={value!r} of dataset {dataset!r} is not a valid {kind.__name__} (default {default!r})"
        ) from None
