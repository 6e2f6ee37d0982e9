"""The elementwise product of two perturbed tensors, ``y = x·z`` with broadcasting
(``x * sigmoid(x)``, squeeze-excitation ``x * s`` with ``s [C, 1, 1]``, GELU's
``x · 0.5(1 + erf(.))``): a ``RelaxedRule`` with the McCormick planes.

On the box ``x ∈ [l_x, u_x]``, ``z ∈ [l_z, u_z]`` (per output element, after broadcasting):

    y >= l_z·x + l_x·z − l_x·l_z     since (x − l_x)(z − l_z) >= 0
    y <= u_z·x + l_x·z − l_x·u_z     since (x − l_x)(z − u_z) <= 0

(the other two McCormick planes have the same average gap over the box; these are the ones
CROWN / auto_LiRPA use). The interval is exact: min and max of the four corner products.
Slopes can have either sign, so forward symbolic bounds take ``Lo`` or ``Up`` of each input per
sign, and Λ picks the lower or upper plane per output by its sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robnet_svc.bounds.ops.base import LinearBounds, OpCall, RelaxedRule
from robnet_svc.bounds.propagate import row_dot


class ProductRule(RelaxedRule):
    """``x * z`` (``operator.mul``, ``torch.mul``, ``Tensor.mul``, onnx2torch Mul) with both
    operands perturbed; chosen by ``ArithmeticRule.resolve``."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        if call.kwargs:
            return f"product with keyword arguments {sorted(call.kwargs)}"
        if len(call.perturbed_positions) != 2 or len(call.args) != 2:
            return "a product rule needs exactly two perturbed operands"
        return None

    def _expand(self, t: Tensor, j: int) -> Tensor:
        """``[B, *in_j]`` or ``[B, m, *in_j]`` broadcast to the output shape."""
        out, shape = tuple(self.call.out_shape), tuple(self.call.in_shapes[j])
        lead = t.shape[:t.dim() - len(shape)]
        return t.reshape(*lead, *(1,) * (len(out) - len(shape)), *shape).expand(*lead, *out)

    def interval(self, bounds):
        (lx, ux), (lz, uz) = [(self._expand(lo, j), self._expand(up, j)) for j, (lo, up) in enumerate(bounds)]
        corners = torch.stack([lx * lz, lx * uz, ux * lz, ux * uz])
        return corners.amin(0), corners.amax(0)

    def rounding_error(self, e_in: list[Tensor], m_in: list[Tensor], u: float) -> Tensor:
        """Float error bound of ``x̃·z̃`` rounded once against ``x·z`` (robnet_svc/rounding.py):
        ``|x̃ z̃ − x z| <= |x̃| e_z + |z| e_x``, plus the product's own rounding."""
        ex, ez = (self._expand(e, j) for j, e in enumerate(e_in))
        mx, mz = (self._expand(m, j) for j, m in enumerate(m_in))
        return (mx + ex) * ez + mz * ex + u * (mx + ex) * (mz + ez)

    def relax(self, bounds) -> "ProductBounds":
        (lx, _), (lz, uz) = [(self._expand(lo, j), self._expand(up, j)) for j, (lo, up) in enumerate(bounds)]
        slopes = [(lz, uz), (lx, lx)]  # per input: (lower plane slope, upper plane slope)
        return ProductBounds(self, slopes, -lx * lz, -lx * uz)


class ProductBounds(LinearBounds):
    """The McCormick planes as per-input slopes on the broadcast inputs."""

    def __init__(self, rule: ProductRule, slopes: list[tuple[Tensor, Tensor]], lower_bias: Tensor,
                 upper_bias: Tensor):
        self.rule, self.slopes = rule, slopes
        self.lower_bias, self.upper_bias = lower_bias, upper_bias

    def _apply(self, ins, which: int) -> Tensor:
        """``Σ_j s_j⁺·first_j + s_j⁻·second_j`` with ``(first, second) = (lo, up)`` for the lower
        plane (``which`` 0) and ``(up, lo)`` for the upper one (``which`` 1)."""
        total = None
        for j, ((lo, up), slope) in enumerate(zip(ins, self.slopes)):
            s = slope[which].unsqueeze(1)
            first, second = (lo, up) if which == 0 else (up, lo)
            if first is second:  # an exact input (Lo = Up): one multiply
                term = s * self.rule._expand(first, j)
            else:
                term = s.clamp(min=0) * self.rule._expand(first, j) + s.clamp(max=0) * self.rule._expand(second, j)
            total = term if total is None else total + term
        return total

    def lower(self, ins):
        return self._apply(ins, 0)

    def upper(self, ins):
        return self._apply(ins, 1)

    def backward(self, lam: Tensor):
        pos = torch.relu(lam)  # = clamp(min=0) with a faster backward on the CPU
        neg = lam - pos
        const = row_dot(pos, self.lower_bias) + row_dot(neg, self.upper_bias)
        out = []
        for j, (lo_s, up_s) in enumerate(self.slopes):
            full = pos * lo_s.unsqueeze(1) + neg * up_s.unsqueeze(1)
            out.append(_reduce_to(full, self.rule.call.in_shapes[j]))
        return out, const


def _reduce_to(t: Tensor, shape) -> Tensor:
    """Transpose of broadcasting ``[B, S, *shape]`` -> ``[B, S, *out]``: sum the expanded axes."""
    shape = tuple(shape)
    extra = t.dim() - 2 - len(shape)
    if extra:
        t = t.sum(dim=tuple(range(2, 2 + extra)))
    axes = tuple(2 + i for i, n in enumerate(shape) if n == 1 and t.shape[2 + i] != 1)
    if axes:
        t = t.sum(dim=axes, keepdim=True)
    return t
