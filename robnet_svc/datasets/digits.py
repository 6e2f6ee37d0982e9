"""``digits``: the embedded default dataset, shipped inside scikit-learn (SPEC §8).

1797 real handwritten digits (the UCI optical recognition set bundled as
``sklearn.datasets.load_digits``): 8x8 grey images with values 0..16, scaled to float32
``[0, 1]``, 10 classes "0".."9". Nothing is downloaded, so ``robnet-svc demo`` runs on a
fresh machine. Split: seeded and stratified, ``test_fraction`` 0.2 and ``seed`` 0 by
default (1437 train, 360 test). Images are adapted to the model input (``adapt.adapt_batch``).
"""

from __future__ import annotations

import torch

from robnet_svc.datasets.adapt import adapt_batch, check_shape
from robnet_svc.datasets.base import Dataset, Splits
from robnet_svc.datasets.split import stratified_split
from robnet_svc.plugin_options import Option
from robnet_svc.progress import SILENT, Reporter


class Digits(Dataset):
    """Handwritten digits bundled with scikit-learn (1797 8x8 grey images, 10 classes; no download)."""

    name = "digits"
    description = "Handwritten digits bundled with scikit-learn (1797 8x8 grey images, 10 classes; no data needed)"
    needs_data_dir = False
    options = {
        "test_fraction": Option(float, 0.2, "share of the images in the test split (stratified by class)"),
        "seed": Option(int, 0, "seed of the train/test split"),
    }
    native_shape = (1, 8, 8)

    def load(self, image_shape: tuple[int, int, int], reporter: Reporter = SILENT) -> Splits:
        import sklearn  # imported here: it adds ~0.5 s to every start of the command line
        from sklearn.datasets import load_digits

        shape = check_shape(image_shape)
        bunch = load_digits()
        images = adapt_batch(torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1), shape)
        labels = torch.from_numpy(bunch.target).to(torch.int64)
        train, test = stratified_split(
            bunch.target, self.test_fraction, self.seed, "the digits dataset"
        )
        train, test = torch.from_numpy(train), torch.from_numpy(test)
        return Splits(
            images[train], labels[train], images[test], labels[test],
            class_names=[str(c) for c in bunch.target_names],
            source=f"scikit-learn {sklearn.__version__}: sklearn.datasets.load_digits (UCI handwritten digits)",
        )
