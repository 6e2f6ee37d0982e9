"""Bound containers and the glossary that maps the engine's names to the paper's symbols.

Glossary (paper §2, Zhang et al. 2018 for CROWN/RSIP):

  ``a``, ``coeffs``   the perturbation coefficients: the input of the bias-field transform
                      network (k of them; 16 for an order-3 multiplicative field).
  ``lower``/``upper`` concrete bounds ``l``/``u`` of a node's value over the whole box.
  ``mid``/``rad``     the same interval as centre ``(u+l)/2`` and radius ``(u-l)/2``
                      (IBP: ``W⁺l + W⁻u + b = W·mid − |W|·rad + b``).
  ``centre``/``radius`` of a ``SymbolicBounds``: forward symbolic (SSIP) bounds written as
                      equations in ``a``: ``Lo(a) = centre(a) − radius(a)`` and
                      ``Up(a) = centre(a) + radius(a)``. An ``Equation`` is stored as its
                      coefficient rows ``coef [B, k, *node_shape]`` (row ``j`` multiplies
                      ``a_j``) and its constant term ``const [B, *node_shape]``, kept apart
                      so that biases never update a full-size tensor in place.
  ``lam``             Λ of back-substitution (RSIP/CROWN): ``[B, S, *node_shape]``, one row per
                      specification row ``S`` (or per neuron when bounding a hidden layer).
  ``abs_linear``      ``|L|``: the linear part of an affine op with absolute-valued weights;
                      it replaces the ``W⁺/W⁻`` split (``W⁺x + W⁻y = W(x+y)/2 + |W|(x−y)/2``).
  ``transpose``       ``Lᵀ``: maps Λ at an op's output to Λ at its input.
  ``spec``            ``C``: rows ``e_label − e_i`` (i ≠ label), ``[B, K-1, K]``.
  ``Relaxation``      the linear bounds ``s_lo·x + b_lo ≤ σ(x) ≤ s_up·x + b_up`` of an activation
                      on ``[l, u]`` (ReLU: chord above, ``α·x`` below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class Interval:
    """Concrete bounds of one node as centre and radius, each ``[B, *node_shape]``.

    ``bounds``: the ``(lower, upper)`` the interval was built from, when it was (activations,
    the clipping layer): kept as they are, because ``mid ± rad`` rounds at the scale of the
    radius and would lose every detail below it (with a field range of 1e7 in float32, the
    whole ``[0, 1]`` clip range). Such an interval forms ``mid`` and ``rad`` when first asked
    (many are only read as bounds: the clipping layer's, and every activation's input).
    """

    __slots__ = ("_mid", "_rad", "bounds")

    def __init__(self, mid: Tensor | None, rad: Tensor | None, bounds: tuple[Tensor, Tensor] | None = None):
        if (mid is None or rad is None) and bounds is None:
            raise ValueError("an Interval needs its centre and radius, or its bounds")
        self._mid, self._rad, self.bounds = mid, rad, bounds

    @property
    def mid(self) -> Tensor:
        if self._mid is None:
            self._mid = (self.bounds[1] + self.bounds[0]) / 2
        return self._mid

    @property
    def rad(self) -> Tensor:
        if self._rad is None:
            self._rad = (self.bounds[1] - self.bounds[0]) / 2
        return self._rad

    @property
    def lower(self) -> Tensor:
        return self.mid - self.rad if self.bounds is None else self.bounds[0]

    @property
    def upper(self) -> Tensor:
        return self.mid + self.rad if self.bounds is None else self.bounds[1]

    @staticmethod
    def from_bounds(lower: Tensor, upper: Tensor) -> "Interval":
        return Interval(None, None, (lower, upper))

    def __repr__(self) -> str:
        return f"Interval(lower={self.lower!r}, upper={self.upper!r})"


@dataclass
class Equation:
    """Affine functions of the coefficients, one per neuron: ``coef·a + const`` with
    ``coef [B, k, *node_shape]`` and ``const [B, *node_shape]``."""

    coef: Tensor
    const: Tensor

    def __add__(self, other: "Equation") -> "Equation":
        return Equation(self.coef + other.coef, self.const + other.const)

    def __sub__(self, other: "Equation") -> "Equation":
        return Equation(self.coef - other.coef, self.const - other.const)


@dataclass
class SymbolicBounds:
    """Forward symbolic bounds of one node: equations in ``a`` (``Lo = centre − radius``,
    ``Up = centre + radius``, formed by ``propagate._lower_upper``).

    ``radius`` is None while it is exactly zero (the node is an affine function of ``a``),
    which skips half the work before the first unstable activation.
    """

    centre: Equation
    radius: Equation | None


@dataclass
class Relaxation:
    """Elementwise linear bounds of an activation over ``[l, u]``, each ``[B, *node_shape]``:
    ``lower_slope·x + lower_bias <= σ(x) <= upper_slope·x + upper_bias``."""

    lower_slope: Tensor
    lower_bias: Tensor
    upper_slope: Tensor
    upper_bias: Tensor


@dataclass
class PreActivationBounds:
    """Concrete bounds ``l <= x <= u`` of an activation's input, per activation node name."""

    lower: Tensor
    upper: Tensor

    def intersect(self, other: "PreActivationBounds") -> "PreActivationBounds":
        return PreActivationBounds(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))
