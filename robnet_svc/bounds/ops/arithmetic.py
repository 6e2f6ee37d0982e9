"""Add / Sub / Mul / Div where at most the additive ops take two perturbed tensors.

Covers onnx2torch ``OnnxBinaryMathOperation`` (normalisation ``(x - mean) / std``, the
residual Add of ResNets) and plain ``x + c``, ``x * 2.0``, ``torch.add(x, y)``, ... nodes.

- one perturbed operand: ``x ± c``, ``c - x``, ``x * c``, ``c * x``, ``x / c`` are affine;
  ``|L|`` is the same op with ``|c|`` and no additive constant.
- two perturbed operands: ``x + y`` and ``x - y`` (sum forward; Λ to both parents backward);
  ``x * y`` is not affine and goes to ``ProductRule`` (McCormick relaxation, ``resolve``).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from robnet_svc.bounds.ops.base import PERTURBED, AffineRule, OpCall

_OPS = {
    operator.add: "add", torch.add: "add", "add": "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub", operator.isub: "sub",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", "div": "div", "truediv": "div",
    torch.Tensor.add: "add", torch.Tensor.sub: "sub", torch.Tensor.mul: "mul", torch.Tensor.div: "div",
}


def op_name(call: OpCall) -> str | None:
    """"add" | "sub" | "mul" | "div" for the node, or None when it is none of them."""
    if call.module is not None:
        fn = getattr(call.module, "math_op_function", None)
        if fn is None:
            return None
        return _OPS.get(fn) or ("div" if getattr(fn, "__name__", "").endswith("div") else None)
    return _OPS.get(call.target)


class ArithmeticRule(AffineRule):
    @classmethod
    def resolve(cls, call: OpCall):
        if op_name(call) == "mul" and len(call.perturbed_positions) == 2:
            from robnet_svc.bounds.ops.product import ProductRule

            return ProductRule
        return cls

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        op = op_name(call)
        n_perturbed = len(call.perturbed_positions)
        if op is None:
            return "unknown arithmetic operation"
        if call.kwargs:
            return f"{op} with keyword arguments {sorted(call.kwargs)}"
        if n_perturbed == 2 and op in ("mul", "div"):
            return f"{op} of two perturbed tensors is not affine"
        if op == "div" and call.args[1] is PERTURBED:
            return "division by a perturbed tensor is not affine"
        return None

    @property
    def has_bias(self) -> bool:  # noqa: D401 - products and two-input sums have no constant
        return op_name(self.call) in ("add", "sub") and len(self.call.perturbed_positions) == 1

    def linear(self, *xs: Tensor, bias: Tensor | None = None) -> Tensor:
        """``L(x)``; for ``x ± c`` / ``c - x`` that is ``±x`` (no full-size subtraction of ``f(0)``).
        ``x`` itself may be returned (callers must not modify the result in place then)."""
        if not self.has_bias:
            return self.forward(*xs)
        if tuple(self.call.in_shapes[0]) != tuple(self.call.out_shape):  # broadcasting constant
            return super().linear(*xs, bias=bias)
        negate = op_name(self.call) == "sub" and self.call.args[1] is PERTURBED
        return -xs[0] if negate else xs[0]

    def abs_linear(self, *rads: Tensor) -> Tensor:
        op = op_name(self.call)
        if op in ("add", "sub"):
            total = rads[0] if len(rads) == 1 else rads[0] + rads[1]
            return total.expand(total.shape[0], *self.call.out_shape)
        args = tuple(a if a is PERTURBED else _abs(a) for a in self.call.args)
        return self.call.run(*rads, args=args)

    def transpose(self, lam: Tensor) -> tuple[Tensor, ...]:
        same = all(tuple(s) == tuple(self.call.out_shape) for s in self.call.in_shapes)
        if len(self.call.perturbed_positions) == 2 and same:
            return (lam, -lam) if op_name(self.call) == "sub" else (lam, lam)
        return super().transpose(lam)


def _abs(value):
    return value.abs() if isinstance(value, Tensor) else abs(value)
