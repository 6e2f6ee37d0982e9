"""Dataset plugins: base class and the split container (SPEC §8).

Pixel range: every dataset returns float32 images in ``[0, 1]``, shaped to the model input
``(C, H, W)`` (resized; grey -> RGB by repetition, RGB -> grey by ITU-R 601 luminance).

Options: ``Dataset(data_dir, **options)``. A dataset declares the options it accepts in
``options`` (``robnet_svc.plugin_options.Option``, as perturbations do); unknown names and
values its types cannot read are a RobnetError (one line), and every option is stored as an
attribute ``self.<name>`` (the given value converted, else the default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from robnet_svc.errors import RobnetError
from robnet_svc.plugin_options import Option, resolve
from robnet_svc.plugins import PluginKind
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

    ``options``: the options this dataset accepts (name -> ``Option``), stored as attributes.
    ``native_shape``: the images' own ``(C, H, W)`` when every image has it (e.g. 8x8 digits),
    so a caller without a model yet (``robnet-svc demo``) can pick an input shape; else None.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_data_dir: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {}
    native_shape: ClassVar[tuple[int, int, int] | None] = None

    def __init__(self, data_dir: Path | None = None, **options: Any):
        if data_dir is None and self.needs_data_dir:
            raise RobnetError(f"dataset {self.name!r} needs --data-dir: the folder that holds its files")
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        for key, value in resolve("dataset", self.name, self.options, options).items():
            setattr(self, key, value)

    @abstractmethod
    def load(self, image_shape: tuple[int, int, int], reporter: Reporter = SILENT) -> Splits:
        """Load and adapt the images to ``image_shape = (C, H, W)``; ``reporter``: where to report
        progress and notes (``robnet_svc.progress.Reporter``; the default reports nothing)."""


#: Datasets as a kind of plugin (``robnet_svc.plugins``): registered by ``robnet_register_datasets``,
#: chosen with ``--dataset``.
PLUGIN_KIND = PluginKind("datasets", "robnet_register_datasets", "dataset", Dataset, options=True,
                         reserved=frozenset({"data_dir"}))
