"""Affine perturbation sets (SPEC §2) and the plugin base class for perturbations.

A perturbation turns a batch of clean images ``x`` ``[B, C, H, W]`` and a radius ``eps``
into an ``AffineSet``: for every sample ``b`` the set

    { clip(W_b a + c_b) : lower_b <= a <= upper_b },   a in R^k

The bound engine only ever sees the ``AffineSet``; it never needs to know which
perturbation produced it. Two implementations cover every family:

- ``DenseAffineSet``: ``W`` stored as a tensor ``[B, k, C, H, W]`` (bias fields,
  brightness, contrast, third-party families with small ``k``);
- ``IdentityAffineSet``: ``W = I`` (``linf`` white noise), never materialised.

Glossary (paper symbols): ``weights`` = W_{T_B,x} (Def. 7), ``coeffs`` = a = [a^m, a^a],
``lower``/``upper`` = the coefficient box A, ``nominal`` = the coefficients of the
identity transform (clean image), ``clip`` = the data range of the clipping layer (§5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from robnet_svc.errors import RobnetError
from robnet_svc.plugin_options import Option, resolve
from robnet_svc.plugins import PluginKind


class AffineSet(ABC):
    """The per-sample affine perturbation set ``{clip(W a + c) : a in [lower, upper]}``.

    Attributes (B samples, k coefficients, image shape ``(C, H, W)``):
      lower, upper: ``[B, k]`` coefficient box (``lower <= upper``).
      nominal:      ``[B, k]`` coefficients that reproduce the clean image (inside the box).
      clip:         ``(lo, hi)`` data range pixels are clipped to after the transform, or None.
    """

    lower: Tensor
    upper: Tensor
    nominal: Tensor
    clip: tuple[float, float] | None
    image_shape: tuple[int, ...]

    #: True when ``dense()`` is affordable (forward symbolic methods need it).
    supports_dense: ClassVar[bool] = True

    @property
    def batch_size(self) -> int:
        return self.lower.shape[0]

    @property
    def num_coeffs(self) -> int:
        return self.lower.shape[1]

    @abstractmethod
    def images(self, coeffs: Tensor) -> Tensor:
        """``W a + c`` before clipping: coeffs ``[B, *S, k]`` -> images ``[B, *S, C, H, W]``."""

    @abstractmethod
    def center_radius(self) -> tuple[Tensor, Tensor]:
        """Interval of ``W a + c`` over the box as (centre, radius), each ``[B, C, H, W]``."""

    @abstractmethod
    def dense(self) -> tuple[Tensor, Tensor]:
        """``(weights [B, k, C, H, W], offset [B, C, H, W])``; RobnetError if too large."""

    def dense_channels_last(self) -> tuple[Tensor, Tensor]:
        """``dense()`` for a channels-last bound pass (``propagate._layout``): the same shapes and
        values, the weights ideally with the channel axis innermost in memory already. The
        default returns ``dense()``'s as they are and the pass copies the weights into that layout;
        a set that can build them so for less than that copy overrides it."""
        return self.dense()

    @abstractmethod
    def transpose(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """Back-substitute through the transform: ``lam [B, S, C, H, W]`` ->
        ``(lam·W [B, S, k], lam·c [B, S])``."""

    def concretize(self, coef: Tensor, const: Tensor, upper: bool = False) -> Tensor:
        """min (or max) over the box of ``coef·a + const``: coef ``[B, S, k]``, const ``[B, S]`` -> ``[B, S]``."""
        mid = ((self.lower + self.upper) / 2).unsqueeze(1)
        rad = ((self.upper - self.lower) / 2).unsqueeze(1)
        centre = (coef * mid).sum(-1) + const
        spread = (coef.abs() * rad).sum(-1)
        return centre + spread if upper else centre - spread

    def clipped(self, images: Tensor) -> Tensor:
        """Apply the clipping layer's function (plain clamp; same values as the ReLU form)."""
        if self.clip is None:
            return images
        return images.clamp(self.clip[0], self.clip[1])

    def sample(self, num: int, generator: torch.Generator | None = None, corners: bool = True) -> Tensor:
        """``[B, num, k]`` coefficient vectors in the box: random corners first (when
        ``corners``), then uniform samples; used by tests and the attack's random starts."""
        b, k = self.lower.shape
        u = torch.rand(b, num, k, generator=generator, dtype=self.lower.dtype, device=self.lower.device)
        if corners:
            n_corner = num // 4
            u[:, :n_corner] = (u[:, :n_corner] > 0.5).to(u.dtype)
        lo, hi = self.lower.unsqueeze(1), self.upper.unsqueeze(1)
        return lo + u * (hi - lo)


class DenseAffineSet(AffineSet):
    """``W`` held as a tensor ``[B, k, C, H, W]`` (small k: bias fields and friends)."""

    def __init__(self, weights: Tensor, offset: Tensor, lower: Tensor, upper: Tensor,
                 nominal: Tensor, clip: tuple[float, float] | None = (0.0, 1.0)):
        b, k = weights.shape[:2]
        if lower.shape != (b, k) or upper.shape != (b, k) or nominal.shape != (b, k):
            raise ValueError(f"box shapes {tuple(lower.shape)}, {tuple(upper.shape)}, {tuple(nominal.shape)} "
                             f"do not match weights {tuple(weights.shape)}")
        if offset.shape != (b, *weights.shape[2:]):
            raise ValueError(f"offset shape {tuple(offset.shape)} does not match weights {tuple(weights.shape)}")
        self.weights, self.offset = weights, offset
        self.lower, self.upper, self.nominal, self.clip = lower, upper, nominal, clip
        self.image_shape = tuple(weights.shape[2:])

    def images(self, coeffs: Tensor) -> Tensor:
        b, k = self.lower.shape
        extra = coeffs.shape[1:-1]
        flat = coeffs.reshape(b, -1, k)
        out = torch.bmm(flat, self.weights.reshape(b, k, -1)).reshape(b, *extra, *self.image_shape)
        return out + self.offset.reshape(b, *([1] * len(extra)), *self.image_shape)

    def center_radius(self) -> tuple[Tensor, Tensor]:
        b, k = self.lower.shape
        w = self.weights.reshape(b, k, -1)
        mid = ((self.lower + self.upper) / 2).unsqueeze(1)
        rad = ((self.upper - self.lower) / 2).unsqueeze(1)
        centre = torch.bmm(mid, w).reshape(b, *self.image_shape) + self.offset
        radius = torch.bmm(rad, w.abs()).reshape(b, *self.image_shape)
        return centre, radius

    def dense(self) -> tuple[Tensor, Tensor]:
        return self.weights, self.offset

    def transpose(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        b, s = lam.shape[:2]
        flat = lam.reshape(b, s, -1)
        coef = torch.bmm(flat, self.weights.reshape(b, self.num_coeffs, -1).transpose(1, 2))
        const = torch.bmm(flat, self.offset.reshape(b, -1, 1)).squeeze(-1)
        return coef, const


class IdentityAffineSet(AffineSet):
    """``W = I``, ``c = x``: coefficients are per-pixel offsets (``linf``). Never materialised."""

    supports_dense = False

    def __init__(self, images: Tensor, lower: Tensor, upper: Tensor,
                 clip: tuple[float, float] | None = (0.0, 1.0)):
        self.offset = images
        self.image_shape = tuple(images.shape[1:])
        b = images.shape[0]
        self.lower, self.upper = lower.reshape(b, -1), upper.reshape(b, -1)
        self.nominal = torch.zeros_like(self.lower)
        self.clip = clip

    def images(self, coeffs: Tensor) -> Tensor:
        b = self.offset.shape[0]
        extra = coeffs.shape[1:-1]
        return coeffs.reshape(b, *extra, *self.image_shape) + self.offset.reshape(
            b, *([1] * len(extra)), *self.image_shape)

    def center_radius(self) -> tuple[Tensor, Tensor]:
        shape = self.offset.shape
        mid = ((self.lower + self.upper) / 2).reshape(shape)
        rad = ((self.upper - self.lower) / 2).reshape(shape)
        return self.offset + mid, rad

    def dense(self) -> tuple[Tensor, Tensor]:
        raise RobnetError(
            f"the linf perturbation has {self.num_coeffs} coefficients (one per pixel); forward "
            "symbolic bounds (ssip, rsip-ssip) would need that many forward passes: use ibp, rsip-ibp or rsip"
        )

    def transpose(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        b, s = lam.shape[:2]
        flat = lam.reshape(b, s, -1)
        return flat, (flat * self.offset.reshape(b, 1, -1)).sum(-1)


#: The largest pixel magnitude a perturbed image may reach before clipping, in widths of the
#: clip range. float32 (the deployed model's precision) spaces numbers of magnitude M about
#: M·2^-23 apart; at M = 2^15 widths that spacing is 1/256 of the range, an 8-bit grey level:
#: beyond it the perturbed images, computed in float32 before clipping, no longer resolve
#: pixel values and the set is not represented meaningfully.
MAX_FIELD_RANGE = 2.0 ** 15


def check_field_range(perturbation: "Perturbation", image_shape: tuple[int, ...]) -> None:
    """RobnetError when ``perturbation`` takes images of ``image_shape`` beyond ``MAX_FIELD_RANGE``
    (probed with flat images at both ends of the clip range, in float64; no clip: no limit)."""
    if perturbation.clip is None:
        return
    lo, hi = perturbation.clip
    probes = torch.stack([torch.full(tuple(image_shape), v, dtype=torch.float64) for v in (lo, hi)])
    centre, radius = perturbation.affine_set(probes).center_radius()
    reach = float((centre.abs() + radius).max())
    limit = MAX_FIELD_RANGE * (hi - lo)
    if not reach <= limit:
        raise RobnetError(
            f"perturbation {perturbation.name!r} at --eps {perturbation.eps:g}"
            + (f" with coef_scale {perturbation.coef_scale:g}" if getattr(perturbation, "coef_scale", None) else "")
            + f" reaches pixel values of {reach:.3g} before clipping to [{lo:g}, {hi:g}]; the limit is "
            f"{limit:g} (2^15 clip-range widths: beyond it float32, the model's precision, cannot resolve "
            "an 8-bit grey level of the perturbed image); use a smaller --eps or a larger --coef-scale")


def _checked_clip(clip, name: str) -> tuple[float, float] | None:
    """``clip`` as a ``(lo, hi)`` float pair (or None); RobnetError unless ``lo < hi``."""
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise RobnetError(f"clip range of perturbation {name!r} must be two numbers (lo, hi), got {clip!r}") from None
    if not lo < hi:
        raise RobnetError(f"clip range of perturbation {name!r} must have lo < hi, got ({lo}, {hi})")
    return lo, hi


class Perturbation(ABC):
    """Base class of perturbation plugins.

    Subclasses set ``name`` (CLI name), ``description`` (one line) and ``options``
    (name -> ``robnet_svc.plugin_options.Option``), and implement ``affine_set``. The
    constructor validates ``eps`` and the options (``plugin_options.resolve``: unknown names,
    types, choices) and stores them as attributes ``self.eps`` and ``self.<option>``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    #: The ``supports_dense`` of the sets ``affine_set`` returns: False when ``dense()`` is
    #: unaffordable (large k), so bound methods that need it refuse this perturbation up front.
    supports_dense: ClassVar[bool] = True

    def __init__(self, eps: float, clip: tuple[float, float] | None = (0.0, 1.0), **options: Any):
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise RobnetError(f"--eps must be a number, got {eps!r}") from None
        if not eps > 0:
            raise RobnetError(f"--eps must be > 0, got {eps}")
        self.eps = eps
        self.clip = _checked_clip(clip, self.name)
        for key, value in resolve("perturbation", self.name, self.options, options).items():
            setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        """Check option combinations; raise RobnetError with a clear message."""

    @abstractmethod
    def affine_set(self, images: Tensor, eps: float | None = None) -> AffineSet:
        """The perturbation set of each image: images ``[B, C, H, W]`` in the data range;
        ``eps`` overrides ``self.eps`` (the training ramp uses it; 0 gives a point box)."""

    def coeff_names(self, image_shape: tuple[int, ...]) -> list[str]:
        """Human-readable names of the k coefficients (stored in the certificate)."""
        return [f"a{i}" for i in range(self.num_coeffs(image_shape))]

    @abstractmethod
    def num_coeffs(self, image_shape: tuple[int, ...]) -> int:
        """k for images of shape ``(C, H, W)``."""

    def describe(self) -> dict[str, Any]:
        """Provenance: name, eps, clip and every option value."""
        return {"name": self.name, "eps": self.eps, "clip": list(self.clip) if self.clip else None,
                **{k: getattr(self, k) for k in self.options}}


#: Perturbations as a kind of plugin (``robnet_svc.plugins``): registered by
#: ``robnet_register_perturbations``, chosen with ``--perturbation``.
PLUGIN_KIND = PluginKind("perturbations", "robnet_register_perturbations", "perturbation", Perturbation,
                         options=True, reserved=frozenset({"eps", "clip"}))
