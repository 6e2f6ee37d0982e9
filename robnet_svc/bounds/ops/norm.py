"""``nn.BatchNorm1d/2d`` as its eval-mode affine map.

Bounds always use the running statistics (``y = (x - mean)/sqrt(var + eps)·γ + β``), also
while the module is in training mode: a certificate must describe the network that will be
exported and deployed, whose BatchNorm is in eval mode. The plain forward ``net(x)`` keeps the
module's own semantics (batch statistics in training mode).
"""

from __future__ import annotations

import torch
from torch import Tensor

from robnet_svc.bounds.ops.base import AffineRule, OpCall


class BatchNormRule(AffineRule):
    @classmethod
    def check(cls, call: OpCall) -> str | None:
        if call.module.running_mean is None:
            return "BatchNorm without running statistics (track_running_stats=False) has no eval-mode affine map"
        return None

    def _scale_shift(self, ndim: int) -> tuple[Tensor, Tensor]:
        m = self.call.module
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        view = (1, -1) + (1,) * (ndim - 2)
        return scale.reshape(view), shift.reshape(view)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._scale_shift(x.dim())
        return x * scale + shift

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return x * self._scale_shift(x.dim())[0]

    def abs_linear(self, rad: Tensor) -> Tensor:
        return rad * self._scale_shift(rad.dim())[0].abs()

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        return (lam * self._scale_shift(lam.dim())[0],)
