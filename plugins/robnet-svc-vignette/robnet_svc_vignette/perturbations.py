"""Two perturbation families that the built-ins do not cover, both affine in their coefficients.

``vignette`` — a radial multiplicative field (lens vignetting, uneven illumination centred
on the optical axis), the same for every channel:

    x ⊙ (a_0 + a_1 r^2 + a_2 r^4 + ... + a_n r^{2n})

with ``r`` the distance from the image centre normalised so that ``r = 1`` at the corners
(``r^2 = (u^2 + v^2) / 2`` with ``u, v ∈ [-1, 1]`` the centred pixel coordinates, both ends
included), ``n`` the option ``terms``. ``k = terms + 1``. Box for radius ``ε``: ``a_0 ∈ [1-ε, 1+ε]``,
every other term ``[-ε/s, ε/s]`` with ``s`` the option ``radial_scale`` (default: ``terms``);
since every ``r^{2t}`` lies in ``[0, 1]`` the field stays within ``1 ± 2ε`` by default. Nominal
(clean image): ``(1, 0, ..., 0)``.

Options are declared with ``robnet_svc.plugin_options.Option`` under names of the plugin's own
choosing; ``robnet-svc harden ... --perturbation vignette --perturbation-option terms=3`` (or a
config file's ``[perturbation_options]`` table) sets them.

``colour-gain`` — a gain per channel (white balance, sensor gain): ``x_c · g_c`` with
``g_c ∈ [1-ε, 1+ε]``; ``k = C``; nominal ``(1, ..., 1)``. On one-channel images it is the
built-in ``contrast``.

Both are multiplicative, so the affine set has weights ``W = x ⊙ basis`` and offset 0;
``k`` is small, so every bound method (the forward symbolic ones included) handles them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robnet_svc.errors import RobnetError
from robnet_svc.perturbations import DenseAffineSet, Perturbation
from robnet_svc.plugin_options import Option

MAX_TERMS = 4


def _centred_coordinates(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[size]`` coordinates from -1 to 1, both ends included (a single pixel sits at 0)."""
    if size == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)


def radial_basis(height: int, width: int, terms: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[terms+1, H, W]`` basis images ``r^{2t}``, ``t = 0..terms`` (values in [0, 1])."""
    v = _centred_coordinates(height, device, dtype)[:, None]
    u = _centred_coordinates(width, device, dtype)[None, :]
    r2 = (u**2 + v**2) / 2  # [H, W], 0 at the centre, 1 at the corners
    powers = torch.arange(terms + 1, device=device, dtype=dtype)[:, None, None]
    return r2.unsqueeze(0) ** powers  # 0^0 = 1: the constant term is 1 everywhere


def _check_images(name: str, images: Tensor, eps: float) -> None:
    if not eps >= 0:
        raise RobnetError(f"perturbation {name!r}: eps must be >= 0, got {eps}")
    if images.dim() != 4:
        raise RobnetError(f"perturbation {name!r} needs images [B, C, H, W], got shape {tuple(images.shape)}")


class Vignette(Perturbation):
    """Radial vignetting ``x ⊙ (a_0 + a_1 r^2 + a_2 r^4 + ...)`` (r: distance from the centre)."""

    name = "vignette"
    description = "Radial vignetting x*(a0 + a1 r^2 + a2 r^4 ...), r = distance from the image centre."
    options = {
        "terms": Option(int, 2, "radial terms after the constant (r^2 ... r^(2*terms))",
                        choices=tuple(range(1, MAX_TERMS + 1))),
        "radial_scale": Option(float, None, "radial terms get the box [-eps/s, eps/s]; default s = terms"),
    }

    terms: int
    radial_scale: float | None

    def validate(self) -> None:
        if self.radial_scale is not None and not self.radial_scale > 0:
            raise RobnetError(f"option 'radial_scale' of perturbation {self.name!r} must be > 0, "
                              f"got {self.radial_scale}")

    def num_coeffs(self, image_shape: tuple[int, ...]) -> int:
        return self.terms + 1

    def coeff_names(self, image_shape: tuple[int, ...]) -> list[str]:
        return ["a_const"] + [f"a_r{2 * t}" for t in range(1, self.terms + 1)]

    def affine_set(self, images: Tensor, eps: float | None = None) -> DenseAffineSet:
        """images ``[B, C, H, W]`` -> weights ``[B, terms+1, C, H, W]``, offset 0."""
        eps = self.eps if eps is None else float(eps)
        _check_images(self.name, images, eps)
        b, _, height, width = images.shape
        k = self.terms + 1
        basis = radial_basis(height, width, self.terms, images.device, images.dtype)  # [k, H, W]
        weights = images.unsqueeze(1) * basis[None, :, None]  # [B, k, C, H, W]
        scale = self.radial_scale if self.radial_scale is not None else float(self.terms)
        half = torch.full((k,), eps / scale, device=images.device, dtype=images.dtype)
        half[0] = eps
        nominal = torch.zeros(k, device=images.device, dtype=images.dtype)
        nominal[0] = 1.0
        lower, upper, nominal = ((nominal + s * half).expand(b, k).clone() for s in (-1, 1, 0))
        return DenseAffineSet(weights, torch.zeros_like(images), lower, upper, nominal, clip=self.clip)


class ColourGain(Perturbation):
    """Per-channel gain ``x_c · g_c``, ``g_c ∈ [1-ε, 1+ε]`` (white balance, sensor gain)."""

    name = "colour-gain"
    description = "Per-channel colour gain x_c * g_c, g_c in [1-eps, 1+eps] (white balance)."
    options = {}

    def num_coeffs(self, image_shape: tuple[int, ...]) -> int:
        return image_shape[0]

    def coeff_names(self, image_shape: tuple[int, ...]) -> list[str]:
        return [f"gain_c{c}" for c in range(image_shape[0])]

    def affine_set(self, images: Tensor, eps: float | None = None) -> DenseAffineSet:
        """images ``[B, C, H, W]`` -> weights ``[B, C, C, H, W]`` (column c: channel c only), offset 0."""
        eps = self.eps if eps is None else float(eps)
        _check_images(self.name, images, eps)
        b, c = images.shape[:2]
        eye = torch.eye(c, device=images.device, dtype=images.dtype)[None, :, :, None, None]  # [1, C, C, 1, 1]
        weights = eye * images.unsqueeze(1)  # [B, C(coeff), C(channel), H, W]
        nominal = torch.ones(b, c, device=images.device, dtype=images.dtype)
        return DenseAffineSet(weights, torch.zeros_like(images), nominal - eps, nominal + eps, nominal,
                              clip=self.clip)
