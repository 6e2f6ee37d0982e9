"""White noise in an L∞ ball (SPEC §2): ``W = I``, one coefficient per pixel.

A baseline: with ``k = C·H·W`` coefficients the forward symbolic methods (``ssip``,
``rsip-ssip``) are infeasible and refuse it (``IdentityAffineSet.dense`` raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from robnet_svc.errors import RobnetError
from robnet_svc.perturbations.base import IdentityAffineSet, Perturbation


class Linf(Perturbation):
    """Per-pixel noise ``x + a``, ``a ∈ [-ε, ε]^{C·H·W}``."""

    name = "linf"
    description = "White noise x + a, |a| <= eps per pixel (L-infinity ball; baseline, no ssip)."
    options = {}
    supports_dense = False  # IdentityAffineSet: one coefficient per pixel

    def num_coeffs(self, image_shape: tuple[int, ...]) -> int:
        c, h, w = image_shape
        return c * h * w

    def coeff_names(self, image_shape: tuple[int, ...]) -> list[str]:
        c, h, w = image_shape
        return [f"c{ci}_i{i}_j{j}" for ci in range(c) for i in range(h) for j in range(w)]

    def affine_set(self, images: Tensor, eps: float | None = None) -> IdentityAffineSet:
        """images ``[B, C, H, W]`` -> ``IdentityAffineSet`` with box ``[B, C·H·W]``."""
        eps = self.eps if eps is None else float(eps)
        if not eps >= 0:
            raise RobnetError(f"perturbation {self.name!r}: eps must be >= 0, got {eps}")
        half = torch.full_like(images, eps)
        return IdentityAffineSet(images, -half, half, clip=self.clip)
