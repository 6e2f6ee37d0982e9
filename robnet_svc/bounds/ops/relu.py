"""ReLU: the one relaxation every method uses (SPEC §3).

On ``[l, u]``: stable neurons are exact (``l >= 0``: y = x; ``u <= 0``: y = 0); an unstable
neuron (``l < 0 < u``) is bounded above by the chord through ``(l, 0)`` and ``(u, u)`` and
below by ``α·x`` with ``α = 1`` if ``u >= -l`` else ``0`` (CROWN's adaptive choice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from robnet_svc.bounds.ops.base import ActivationRule
from robnet_svc.bounds.types import Relaxation


class ReluRule(ActivationRule):
    """``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()``."""

    nonneg_slopes = True

    @staticmethod
    def fused_relaxation(lower: Tensor, upper: Tensor) -> Relaxation:
        """``relax`` as the fused kernels trace it (robnet_svc/bounds/kernels.py)."""
        return relu_relaxation(lower, upper)

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return torch.relu(lower), torch.relu(upper)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        return relu_relaxation(lower, upper)

    def identity_on(self, lower: Tensor, upper: Tensor) -> bool:
        """``l >= 0`` everywhere (``relax`` then gives slopes 1 and biases 0, ``interval`` the box)."""
        return bool((lower >= 0).all())

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """``l < 0 <= u``: otherwise the relaxation (identity or zero) is the same on any sub-box.
        ``u = 0`` counts as unstable because ``relax`` tests ``l >= 0`` first: a tighter lower
        bound of exactly 0 would turn the zero line into the identity."""
        return (lower < 0) & (upper >= 0)


#: ``ReluRule.relax`` as defined here (a subclass or a patch that replaces it is another relaxation)
_RELU_RELAX = ReluRule.relax


def uses_relu_relaxation(rule) -> bool:
    """Whether ``rule`` relaxes with ``relu_relaxation`` (``ReluRule`` or a subclass that keeps
    its ``relax``): the engine may then run the whole SSIP step at the node as the native
    kernel ``relu_step`` (robnet_svc/bounds/native.py), which computes this relaxation itself."""
    return getattr(type(rule), "relax", None) is _RELU_RELAX


def relu_relaxation(lower: Tensor, upper: Tensor) -> Relaxation:
    """The ReLU relaxation on ``[lower, upper]`` (elementwise, any shape).

    Written with ``relu``/``sign`` arithmetic on ``l⁻ = min(l, 0)`` and ``u⁺ = max(u, 0)``
    instead of masks and ``where`` (on the CPU a ``where``, a boolean op or ``clamp``'s
    backward costs as much as ten arithmetic ops, and this runs at every ReLU of every bound
    pass, under autograd in training); the values are those of the case-by-case definition
    (up to the sign of a zero):

    - upper slope ``u⁺ / (u⁺ − l⁻)``: the chord ``u / (u − l)`` when ``l < 0 < u``, ``u / u = 1``
      when ``l >= 0``, ``0 / −l = 0`` when ``u <= 0``; the one 0/0 (``l = u = 0``) gets a
      denominator of 1 and the slope 1 (an active neuron), so no NaN reaches values or gradients;
    - upper bias ``−chord · l⁻`` (0 unless unstable);
    - lower slope ``α = [u⁺ + l⁻ >= 0]``: 1 when ``l >= 0``, 0 when ``u <= 0`` and ``l < 0``, CROWN's
      adaptive ``[u >= −l]`` when unstable (the sign of a float sum is the sign of the exact sum).

    Gradients are those of the case-by-case definition up to rounding (an active neuron's
    ``u / u`` has derivative 0, computed as ``1/u − u/u²``).
    """
    neg, pos = -torch.relu(-lower), torch.relu(upper)
    width = pos - neg
    degenerate = (width == 0).to(width.dtype)  # l = u = 0
    chord = pos / (width + degenerate)
    upper_bias = -chord * neg
    lower_slope = torch.sign(pos + neg).add_(1).clamp_(max=1)
    return Relaxation(lower_slope, torch.zeros_like(upper), chord + degenerate, upper_bias)
