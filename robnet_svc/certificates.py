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
    certified ``[N]`` bool; margin_lower ``[N, K-1]`` float64; rounding_allowance ``[N, K-1]``
    float64; attack_success ``[N]`` bool; attack_margin ``[N]`` float32 (``robnet_svc.certify``
    computes them; docs/report-format.md describes each).
    """

    index: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    certified: np.ndarray
    margin_lower: np.ndarray
    attack_success: np.ndarray
    attack_margin: np.ndarray
    rounding_allowance: np.ndarray
    attack_coeffs: np.ndarray | None = None
    radius: np.ndarray | None = None
    attack_radius: np.ndarray | None = None

    FIELDS = ("index", "label", "prediction", "certified", "margin_lower", "attack_success", "attack_margin",
              "rounding_allowance")
    #: Fields that may be missing (None): ``attack_coeffs [N, k]`` float32, the coefficients of
    #: the attack's best point; ``radius [N]`` and ``attack_radius [N]`` float64 (exactly the ε used), see
    #: ``certified_radius`` and ``attack_radius`` (only with ``--radius``). Files of format 1
    #: have none of them.
    OPTIONAL_FIELDS = ("attack_coeffs", "radius", "attack_radius")

    @classmethod
    def concat(cls, parts: "list[Certificates]") -> "Certificates":
        """The parts one after the other (e.g. the shards of every rank, in rank order); empty parts
        are skipped (an empty shard does not know the number of classes)."""
        parts = [p for p in parts if p.num_samples] or parts[:1]
        optional = {f: np.concatenate([getattr(p, f) for p in parts])
                    for f in cls.OPTIONAL_FIELDS if all(getattr(p, f) is not None for p in parts)}
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS), **optional)

    def subset(self, mask: np.ndarray) -> "Certificates":
        """The samples selected by ``mask`` (bool ``[N]`` or positions)."""
        optional = {f: getattr(self, f)[mask] for f in self.OPTIONAL_FIELDS if getattr(self, f) is not None}
        return Certificates(*(getattr(self, f)[mask] for f in self.FIELDS), **optional)

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

    def accuracy_at(self, eps_values) -> dict[str, list[float]]:
        """Certified and empirical robust accuracy at each ε of ``eps_values`` (needs ``radius``):
        certified = the certified radius is ≥ ε; empirical = correct and the attack's smallest
        successful radius is > ε (an upper estimate of the true robust accuracy)."""
        eps = np.asarray(eps_values, dtype=np.float64)
        n = max(self.num_samples, 1)
        correct = self.prediction == self.label
        certified = (correct[None, :] & (self.radius[None, :] >= eps[:, None])).sum(1) / n
        empirical = (correct[None, :] & (self.attack_radius[None, :] > eps[:, None])).sum(1) / n
        return {"eps": eps.tolist(), "certified_accuracy": certified.tolist(),
                "empirical_robust_accuracy": empirical.tolist()}

    def per_class(self, num_classes: int) -> list[dict[str, float | int]]:
        """``summary()`` restricted to each label ``0..num_classes-1``."""
        rows = []
        for cls in range(num_classes):
            part = self.subset(self.label == cls)
            rows.append({"label": cls, **part.summary()})
        return rows
