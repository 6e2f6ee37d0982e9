"""Dense layers: ``nn.Linear`` and MatMul by a constant matrix (onnx2torch ``OnnxMatMul``,
``torch.matmul``, ``operator.matmul``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from robnet_svc.bounds.ops.base import PERTURBED, AffineRule, OpCall


class LinearRule(AffineRule):
    """``nn.Linear``: ``y = x Wᵀ + b`` over the last axis."""

    def abs_linear(self, rad: Tensor) -> Tensor:
        return F.linear(rad, self.call.module.weight.abs())

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, self.call.module.weight)

    def bias(self, like: Tensor) -> Tensor:
        b = self.call.module.bias
        shape = (1,) * len(self.call.out_shape) + (-1,)
        if b is None:
            return like.new_zeros((1, *self.call.out_shape))
        return b.reshape(shape).expand(1, *self.call.out_shape)

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        return (lam @ self.call.module.weight,)


class MatMulRule(AffineRule):
    """``x @ W`` or ``W @ x`` with a constant 2-D ``W`` (per-sample matrices are not constants)."""

    has_bias = False

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        if len(call.perturbed_positions) != 1:
            return "MatMul of two perturbed tensors is not affine"
        return None

    @property
    def _x_first(self) -> bool:
        return self.call.args[0] is PERTURBED

    def _weight(self) -> Tensor:
        (w,) = self.call.constants
        return w

    def abs_linear(self, rad: Tensor) -> Tensor:
        w = self._weight().abs()
        return rad @ w if self._x_first else w @ rad

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        w = self._weight()
        if w.dim() != 2:
            return super().transpose(lam)
        return (lam @ w.t(),) if self._x_first else (w.t() @ lam,)
