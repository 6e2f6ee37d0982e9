"""Bias fields (SPEC §2, paper Def. 3-4): smooth polynomial intensity fields, plus the
0-order special cases ``brightness`` (additive) and ``contrast`` (multiplicative).

A bias field of order ``n`` is ``Σ_{t,g ≤ n} a_{tg} b^{tg}`` with the tensor-product basis

    b^{t,g}_{i,j} = (i/(H-1))^t (j/(W-1))^g        (coordinates in [0, 1], both ends included)

shared by every channel. As an ``AffineSet`` (k coefficients, image ``x`` ``[C, H, W]``):

- ``mult``: columns ``x ⊙ b^{tg}``, offset 0; box: constant term ``[1-ε, 1+ε]``, others
  ``[-ε/s, ε/s]``; nominal ``(1, 0, ..., 0)``;
- ``add``:  columns ``b^{tg}``, offset ``x``; box: constant term ``[-ε, ε]``, others
  ``[-ε/s, ε/s]``; nominal 0;
- ``both``: the columns of ``mult`` then those of ``add`` (k = 2(n+1)^2), offset 0.

``s`` is ``coef_scale`` (default: number of terms − 1, so the field stays in ``1 ± 2ε``).
Term order: ``t`` outer, ``g`` inner, so index 0 is always the constant term.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from robnet_svc.errors import RobnetError
from robnet_svc.perturbations.base import DenseAffineSet, Option, Perturbation

MODES = ("mult", "add", "both")
MAX_ORDER = 4


def axis_coordinates(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[size]`` coordinates ``0, 1/(size-1), ..., 1`` (a single pixel sits at 0)."""
    if size == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.arange(size, device=device, dtype=dtype) / (size - 1)


@lru_cache(maxsize=32)
def bias_field_basis(height: int, width: int, order: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[(order+1)^2, H, W]`` basis images ``b^{t,g}`` (t outer, g inner); cached per size.

    ``0^0 = 1``, so the constant term is 1 everywhere, corners included.
    """
    # A cached tensor made under inference mode could not be used in training later.
    with torch.inference_mode(False):
        powers = torch.arange(order + 1, device=device, dtype=dtype).unsqueeze(1)
        rows = axis_coordinates(height, device, dtype).unsqueeze(0) ** powers  # [T1, H]
        cols = axis_coordinates(width, device, dtype).unsqueeze(0) ** powers  # [T1, W]
        basis = rows[:, None, :, None] * cols[None, :, None, :]  # [t, g, H, W]
        return basis.reshape((order + 1) ** 2, height, width)


class BiasField(Perturbation):
    """Smooth polynomial bias field (multiplicative, additive or both), per SPEC §2."""

    name = "bias-field"
    description = "Polynomial bias field x*Σa·b (+Σa·b): smooth lighting / coil inhomogeneity (paper Def. 3-4)."
    options = {
        "order": Option(int, 3, "polynomial order of the field (3 gives the paper's 16 terms)",
                        choices=tuple(range(MAX_ORDER + 1))),
        "mode": Option(str, "mult", "multiplicative, additive or both fields", choices=MODES),
        "coef_scale": Option(float, None,
                             "non-constant terms get the box [-eps/s, eps/s]; default s = number of terms - 1"),
    }

    order: int
    mode: str
    coef_scale: float | None

    def validate(self) -> None:
        if self.coef_scale is not None and not self.coef_scale > 0:
            raise RobnetError(f"option 'coef_scale' of perturbation {self.name!r} must be > 0, got {self.coef_scale}")

    @property
    def num_terms(self) -> int:
        """Terms of one field: ``(order+1)^2``."""
        return (self.order + 1) ** 2

    def num_coeffs(self, image_shape: tuple[int, ...]) -> int:
        return self.num_terms * (2 if self.mode == "both" else 1)

    def coeff_names(self, image_shape: tuple[int, ...]) -> list[str]:
        terms = [f"t{t}_g{g}" for t in range(self.order + 1) for g in range(self.order + 1)]
        prefixes = {"mult": ("m",), "add": ("a",), "both": ("m", "a")}[self.mode]
        return [f"{p}_{term}" for p in prefixes for term in terms]

    @property
    def effective_coef_scale(self) -> float:
        """``s`` as bounded: the option, or its default (number of terms − 1, at least 1)."""
        return float(self.coef_scale) if self.coef_scale is not None else float(max(self.num_terms - 1, 1))

    def describe(self) -> dict:
        """As the base class, with the ``coef_scale`` actually used (its default resolved), so the
        declared set is the box that was bounded."""
        described = super().describe()
        if "coef_scale" in self.options:
            described["coef_scale"] = self.effective_coef_scale
        return described

    def _field_box(self, eps: float, constant: float, ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Box and nominal ``[T]`` of one field whose constant term is centred on ``constant``."""
        half = torch.full((self.num_terms,), eps / self.effective_coef_scale, device=ref.device, dtype=ref.dtype)
        half[0] = eps
        nominal = torch.zeros(self.num_terms, device=ref.device, dtype=ref.dtype)
        nominal[0] = constant
        return nominal - half, nominal + half, nominal

    def affine_set(self, images: Tensor, eps: float | None = None) -> DenseAffineSet:
        """images ``[B, C, H, W]`` -> ``DenseAffineSet`` with weights ``[B, k, C, H, W]``."""
        eps = self.eps if eps is None else float(eps)
        if not eps >= 0:
            raise RobnetError(f"perturbation {self.name!r}: eps must be >= 0, got {eps}")
        if images.dim() != 4:
            raise RobnetError(f"perturbation {self.name!r} needs images [B, C, H, W], got shape {tuple(images.shape)}")
        b, _, height, width = images.shape
        basis = bias_field_basis(height, width, self.order, images.device, images.dtype)[None, :, None]  # [1,T,1,H,W]

        if self.mode == "mult":  # W = x ⊙ φ_k, nominal x ⊙ 1
            lower, upper, nominal = (t.repeat(b, 1) for t in self._field_box(eps, 1.0, images))
            return _ImageTimesFields(images, basis[0, :, 0], lower, upper, nominal, clip=self.clip)
        parts = []  # (weights [B, T, C, H, W], lower, upper, nominal [T])
        if self.mode == "both":
            parts.append((images.unsqueeze(1) * basis, *self._field_box(eps, 1.0, images)))
        if self.mode in ("add", "both"):
            parts.append((basis.expand(b, -1, *images.shape[1:]), *self._field_box(eps, 0.0, images)))
        weights = torch.cat([p[0] for p in parts], dim=1)
        lower, upper, nominal = (torch.cat([p[i] for p in parts]).repeat(b, 1) for i in (1, 2, 3))
        # Add-only: the clean image is the offset. Both: it is the nominal x ⊙ 1.
        offset = images if self.mode == "add" else torch.zeros_like(images)
        return DenseAffineSet(weights, offset, lower, upper, nominal, clip=self.clip)


class _ImageTimesFields(DenseAffineSet):
    """The multiplicative field's set: ``W[b, k] = x_b ⊙ φ_k`` (each image times each basis field,
    ``fields [k, H, W]``), offset 0. The ``[B, k, C, H, W]`` weights are formed only when asked
    (``weights``; attacks, back-substitution), never for the image's interval, which factors the
    pixel out. For a channels-last pass it builds them channels-last directly: the product of the
    image and the fields with the channel axis innermost (both operands contiguous, so one flat
    loop) instead of a copy of the NCHW weights into that layout, whose inner loop runs over the
    C = 1 or 3 channels at a time (2 ms for DM-small's 64 x 16 x 3 x 32 x 32 weights, a sixth of
    that for the product)."""

    def __init__(self, images: Tensor, fields: Tensor, lower: Tensor, upper: Tensor, nominal: Tensor,
                 clip: tuple[float, float] | None):
        self._images, self._fields, self._weights = images, fields, None
        self.offset = torch.zeros_like(images)
        self.lower, self.upper, self.nominal, self.clip = lower, upper, nominal, clip
        self.image_shape = tuple(images.shape[1:])

    @property
    def weights(self) -> Tensor:
        if self._weights is None:
            self._weights = self._images.unsqueeze(1) * self._fields[None, :, None]
        return self._weights

    def center_radius(self) -> tuple[Tensor, Tensor]:
        """``x ⊙ (Σ_k mid_k φ_k)`` and ``|x| ⊙ (Σ_k rad_k |φ_k|)``: the dense set's sums over ``k`` with the
        pixel factored out (equal up to rounding), from ``[B, k] x [k, H·W]`` products instead of
        products with the ``[B, k, C, H, W]`` weights and their magnitude."""
        b, _, h, w = self._images.shape
        fields = self._fields.reshape(self._fields.shape[0], h * w)
        mid, rad = (self.lower + self.upper) / 2, (self.upper - self.lower) / 2
        centre = (mid @ fields).reshape(b, 1, h, w)
        radius = (rad @ fields.abs()).reshape(b, 1, h, w)
        return self._images * centre, self._images.abs() * radius

    def dense_channels_last(self) -> tuple[Tensor, Tensor]:
        b, c, h, w = self._images.shape
        k = self._fields.shape[0]
        x = self._images.permute(0, 2, 3, 1).reshape(b, 1, h * w * c)  # pixels (h, w, c) flat
        fields = self._fields.unsqueeze(-1).expand(k, h, w, c).reshape(1, k, h * w * c)
        return (x * fields).view(b, k, h, w, c).permute(0, 1, 4, 2, 3), self.offset


class Brightness(BiasField):
    """Brightness shift ``x + a``, ``a ∈ [-ε, ε]`` (a 0-order additive bias field)."""

    name = "brightness"
    description = "Global brightness shift x + a, a in [-eps, eps] (0-order additive bias field)."
    options = {}
    order, mode, coef_scale = 0, "add", None


class Contrast(BiasField):
    """Contrast change ``x · a``, ``a ∈ [1-ε, 1+ε]`` (a 0-order multiplicative bias field)."""

    name = "contrast"
    description = "Global contrast change x * a, a in [1-eps, 1+eps] (0-order multiplicative bias field)."
    options = {}
    order, mode, coef_scale = 0, "mult", None
