"""Seeded, stratified train/test split of one labelled set (scikit-learn's ``train_test_split``)."""

from __future__ import annotations

import numpy as np

from robnet_svc.errors import RobnetError


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` into ``labels [N]``, each sorted; every class keeps its share.

    ``what`` names the data in errors (a folder, a dataset).
    """
    if not 0.0 < test_fraction < 1.0:
        raise RobnetError(f"test_fraction={test_fraction} for {what} must be strictly between 0 and 1")
    from sklearn.model_selection import train_test_split  # slow import, needed only here

    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as exc:  # too few images per class for this fraction
        raise RobnetError(
            f"cannot split {what} into train and test with test_fraction={test_fraction}: {exc}; "
            "add images or use separate train/ and test/ folders"
        ) from None
    return np.sort(train), np.sort(test)
