"""Per-sample certificates as plain numpy: what a certification produced and a certificate
file holds. Kept apart from ``certify`` (which needs torch) so that reading a certificate
(``robnet-svc report show``) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Certificates:
    """Per-sample results of one model on one test set (numpy arrays, N samples, K classes).

    index ``[N]`` int64 position in the test split; label, prediction ``[N]`` int64;
    certified ``[N]`` bool; margin_lower ``[N, K-1]`` float32; attack_success ``[N]`` bool;
    attack_margin ``[N]`` float32.
    """

    index: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    certified: np.ndarray
    margin_lower: np.ndarray
    attack_success: np.ndarray
    attack_margin: np.ndarray

    FIELDS = ("index", "label", "prediction", "certified", "margin_lower", "attack_success", "attack_margin")

    @classmethod
    def concat(cls, parts: "list[Certificates]") -> "Certificates":
        """The parts one after the other (e.g. the shards of every rank, in rank order); empty parts
        are skipped (an empty shard does not know the number of classes)."""
        parts = [p for p in parts if p.num_samples] or parts[:1]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))

    @property
    def num_samples(self) -> int:
        return int(self.index.shape[0])

    def summary(self) -> dict[str, float | int]:
        """Clean, certified and empirical robust accuracy (fractions in [0, 1])."""
        n = max(self.num_samples, 1)
        correct = self.prediction == self.label
        return {
            "num_samples": self.num_samples,
            "clean_accuracy": float(correct.sum() / n),
            "certified_accuracy": float(self.certified.sum() / n),
            "empirical_robust_accuracy": float((correct & ~self.attack_success).sum() / n),
        }

    def per_class(self, num_classes: int) -> list[dict[str, float | int]]:
        """``summary()`` restricted to each label ``0..num_classes-1``."""
        rows = []
        for cls in range(num_classes):
            mask = self.label == cls
            part = Certificates(*(getattr(self, f)[mask] for f in self.FIELDS))
            rows.append({"label": cls, **part.summary()})
        return rows
