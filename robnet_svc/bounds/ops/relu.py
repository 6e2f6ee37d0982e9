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

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return lower.clamp(min=0), upper.clamp(min=0)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        return relu_relaxation(lower, upper)

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """``l < 0 <= u``: otherwise the relaxation (identity or zero) is the same on any sub-box.
        ``u = 0`` counts as unstable because ``relax`` tests ``l >= 0`` first: a tighter lower
        bound of exactly 0 would turn the zero line into the identity."""
        return (lower < 0) & (upper >= 0)


def relu_relaxation(lower: Tensor, upper: Tensor) -> Relaxation:
    """The ReLU relaxation on ``[lower, upper]`` (elementwise, any shape)."""
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    # Division only where l < 0 < u, so the denominator is > 0 there.
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = torch.where(unstable, upper / width, torch.zeros_like(upper))
    upper_slope = torch.where(active, torch.ones_like(upper), chord)
    upper_bias = -chord * lower.clamp(max=0)
    alpha = (upper >= -lower).to(upper.dtype)
    lower_slope = torch.where(active, torch.ones_like(upper), torch.where(unstable, alpha, torch.zeros_like(upper)))
    return Relaxation(lower_slope, torch.zeros_like(upper), upper_slope, upper_bias)
