"""Averaging and padding: ``AvgPool``, ``AdaptiveAvgPool``, onnx2torch ``GlobalAveragePool``,
``Pad`` (onnx2torch ``OnnxPadStatic`` and ``nn.*Pad2d``).

All are linear maps with non-negative weights (averages, selections), so ``|L| = L`` and
``|L|(rad)`` is the op itself without its constant part; ``Lᵀ`` is the generic VJP.
"""

from __future__ import annotations

from torch import Tensor

from robnet_svc.bounds.ops.base import AffineRule


class AveragePoolRule(AffineRule):
    """Average pooling of any kind: the op itself is linear with weights >= 0."""

    has_bias = False

    def abs_linear(self, rad: Tensor) -> Tensor:
        return self.forward(rad)


class PadRule(AffineRule):
    """Padding: a selection (constant, reflect, replicate, circular) plus the pad value, so
    ``|L| = L = f - f(0)`` whatever the mode."""

    def abs_linear(self, rad: Tensor) -> Tensor:
        return self.linear(rad)
