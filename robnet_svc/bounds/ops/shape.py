"""Ops that only move values: reshapes, flattens, squeezes, permutations, identity, dropout.

Reshape-like ops use the per-sample output shape recorded by the engine's shape pass, so a
reshape whose target shape was baked for one batch size still works on any number of rows.
"""

from __future__ import annotations

from torch import Tensor

from robnet_svc.bounds.ops.base import AffineRule, OpCall


class ReshapeRule(AffineRule):
    """Flatten / Reshape / view / Squeeze / Unsqueeze: ``[N, *in_shape] -> [N, *out_shape]``."""

    has_bias = False

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.call.out_shape)

    def abs_linear(self, rad: Tensor) -> Tensor:
        return self.forward(rad)

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        return (lam.reshape(lam.shape[0], *self.call.in_shapes[0]),)


class PermuteRule(AffineRule):
    """A permutation of the per-sample axes (onnx2torch ``OnnxTranspose``, ``permute``)."""

    has_bias = False

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        perm = getattr(call.module, "perm", None) if call.module is not None else call.args[1:]
        if call.module is None and len(perm) == 1 and isinstance(perm[0], (tuple, list)):
            perm = perm[0]
        if perm is None or len(perm) == 0 or perm[0] != 0:
            return f"transpose with permutation {perm} moves the batch axis"
        return None

    def abs_linear(self, rad: Tensor) -> Tensor:
        return self.forward(rad)


class IdentityRule(AffineRule):
    """``nn.Identity`` and dropout (identity at evaluation; bounds describe the deployed net)."""

    has_bias = False

    def forward(self, x: Tensor, *_) -> Tensor:
        return x

    def abs_linear(self, rad: Tensor) -> Tensor:
        return rad

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        return (lam,)
