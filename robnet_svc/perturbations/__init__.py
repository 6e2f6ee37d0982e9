"""Perturbation families (SPEC §2): each returns the affine description of its set."""

from robnet_svc.perturbations.base import AffineSet, DenseAffineSet, IdentityAffineSet, Option, Perturbation

__all__ = ["AffineSet", "DenseAffineSet", "IdentityAffineSet", "Option", "Perturbation"]
