"""Affine ops that move, select, combine or average values: Concat, Slice / indexing,
Split / chunk (one plan node per used output), Gather / index_select of constant indices,
transpose of two non-batch axes, ReduceMean / ReduceSum, Resize / Upsample (nearest, linear).

All are linear maps whose weights are >= 0 (selections, sums, averages, interpolation
weights), so ``|L| = L``: ``abs_linear`` is the op itself on the radii. ``Lᵀ`` is the generic
vector–Jacobian product except for Concat (a split of Λ). Every op must keep the batch axis;
a constant that would slice, gather or reduce it is refused when the rows change.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robnet_svc.bounds.ops.base import PERTURBED, AffineRule, OpCall
from robnet_svc.errors import RobnetError


class _SelectionLike(AffineRule):
    """Linear, no constant part, non-negative weights."""

    has_bias = False

    def forward(self, *xs: Tensor) -> Tensor:
        out = self.call.run(*xs)
        if out.shape[0] != xs[0].shape[0]:
            raise RobnetError(f"node {self.call.name!r} changes the batch axis ({xs[0].shape[0]} rows in, "
                              f"{out.shape[0]} out); cannot bound it")
        return out

    def abs_linear(self, *rads: Tensor) -> Tensor:
        return self.forward(*rads)

    def transpose(self, lam: Tensor) -> tuple[Tensor, ...]:
        """``Lᵀ Λ`` by reverse-mode autograd at 0 (differentiable in Λ). Not ``torch.func.vjp``:
        some onnx2torch modules read their constant inputs with ``.numpy()``, which functorch
        cannot trace."""
        with torch.enable_grad():
            zeros = tuple(lam.new_zeros((lam.shape[0], *s), requires_grad=True) for s in self.call.in_shapes)
            out = self.forward(*zeros)
            return torch.autograd.grad(out, zeros, lam, create_graph=torch.is_grad_enabled() or lam.requires_grad,
                                       allow_unused=True, materialize_grads=True)


class SelectRule(_SelectionLike):
    """Slicing and indexing by constants (``x[:, 1:3]``, ``narrow``, onnx2torch ``OnnxSlice``),
    ``index_select`` / onnx2torch ``OnnxGather`` on a non-batch axis."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        if call.args and call.args[0] is not PERTURBED:
            return "indexing into a constant with a perturbed index"
        axis = getattr(call.module, "_axis", None) if call.module is not None else None
        if call.target in (torch.index_select, torch.Tensor.index_select, torch.narrow, torch.Tensor.narrow):
            axis = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
        if isinstance(axis, int) and axis == 0:
            return "selection along the batch axis"
        if call.kind == "call_function" and call.target.__name__ == "getitem":
            index = call.args[1] if isinstance(call.args[1], tuple) else (call.args[1],)
            if not index or not (index[0] == slice(None) or index[0] is Ellipsis):
                return f"indexing {call.args[1]!r} does not keep the batch axis"
        return None


class SplitRule(_SelectionLike):
    """``torch.split`` / ``chunk`` / ``unbind``, onnx2torch ``OnnxSplit``/``OnnxSplit13``: the
    compiler turns each used output (``getitem``) into its own plan node (``OpCall.item``)."""

    tuple_output = True

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        axis = getattr(call.module, "axis", None) if call.module is not None else \
            call.kwargs.get("dim", call.args[2] if len(call.args) > 2 else 0)
        if isinstance(axis, int) and axis == 0:
            return "split along the batch axis"
        return None


class TransposeRule(_SelectionLike):
    """``torch.transpose`` / ``x.transpose`` / ``swapaxes`` of two non-batch axes (channel
    shuffle is reshape, transpose, reshape)."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        dims = [a for a in call.args[1:3]]
        if any(isinstance(d, int) and d == 0 for d in dims):
            return f"transpose of axes {dims} moves the batch axis"
        return None


class ReduceRule(_SelectionLike):
    """Sum or mean over non-batch axes: ``torch.mean``/``sum``, ``x.mean()``/``x.sum()``,
    onnx2torch ``OnnxReduceStaticAxes`` (ReduceMean/ReduceSum), ``OnnxReduceSum*Axes``."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        kind = getattr(call.module, "operation_type", None) if call.module is not None else None
        if kind is not None and kind not in ("ReduceMean", "ReduceSum"):
            return f"{kind} is not linear"
        if call.module is None and len(call.args) < 2 and "dim" not in call.kwargs:
            return "a reduction over every axis (including the batch axis)"
        return None


class ResizeRule(_SelectionLike):
    """``F.interpolate`` / ``nn.Upsample`` / onnx2torch ``OnnxResize`` with constant scales or
    sizes, nearest or (bi/tri)linear: interpolation weights are >= 0 and sum to 1."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        if call.module is not None:
            mode = getattr(call.module, "mode", None) or getattr(call.module, "onnx_mode", None)
        else:
            mode = call.kwargs.get("mode", call.args[3] if len(call.args) > 3 else "nearest")
        if mode not in ("nearest", "nearest-exact", "linear", "bilinear", "trilinear"):
            return f"resize mode {mode!r} (only nearest and linear modes have non-negative weights)"
        return None


class ConcatRule(AffineRule):
    """``torch.cat`` / ``torch.concat`` / onnx2torch ``OnnxConcat`` of perturbed tensors and
    constants along a non-batch axis. Constants with batch size 1 are repeated to the rows."""

    nested_inputs = True

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        axis = cls._axis_of(call)
        if isinstance(axis, int) and axis == 0:
            return "concatenation along the batch axis"
        return None

    @staticmethod
    def _axis_of(call: OpCall):
        if call.module is not None:
            return call.module.axis
        return call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else 0)

    def _pieces(self) -> list:
        return list(self.call.args) if self.call.module is not None else list(self.call.args[0])

    @property
    def has_bias(self) -> bool:  # noqa: D401 - constants in the list are the constant part
        return any(p is not PERTURBED for p in self._pieces())

    def _cat(self, xs, rows: int, constant) -> Tensor:
        it = iter(xs)
        parts = [next(it) if p is PERTURBED else constant(p, rows) for p in self._pieces()]
        return torch.cat(parts, self._axis_of(self.call))

    def forward(self, *xs: Tensor) -> Tensor:
        return self._cat(xs, xs[0].shape[0], lambda c, n: c.expand(n, *c.shape[1:]))

    def linear(self, *xs: Tensor, bias: Tensor | None = None) -> Tensor:
        return self._cat(xs, xs[0].shape[0], lambda c, n: c.new_zeros((n, *c.shape[1:])))

    def abs_linear(self, *rads: Tensor) -> Tensor:
        return self.linear(*rads)

    def transpose(self, lam: Tensor) -> tuple[Tensor, ...]:
        axis = self._axis_of(self.call)
        axis = axis if axis >= 0 else lam.dim() + axis
        sizes, it = [], iter(self.call.in_shapes)
        for p in self._pieces():
            sizes.append(next(it)[axis - 1] if p is PERTURBED else p.shape[axis])
        chunks = torch.split(lam, sizes, dim=axis)
        return tuple(c for c, p in zip(chunks, self._pieces()) if p is PERTURBED)


class UnsupportedNormRule(AffineRule):
    """Ops refused at compile time: their statistics depend on the input, so bounding them needs
    division and square roots of perturbed values (LayerNorm, InstanceNorm, GroupNorm, Softmax)."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        target = type(call.module) if call.module is not None else call.target
        if "softmax" in getattr(target, "__name__", str(target)).lower():
            return ("softmax divides by a sum of exponentials of perturbed values: division of perturbed "
                    "values is not supported")
        return ("normalises by statistics of the input: division and square root of perturbed values are "
                "not supported (BatchNorm, which uses running statistics, is)")

    def abs_linear(self, *rads: Tensor) -> Tensor:  # never reached: check refuses every node
        raise RobnetError(self.check(self.call))

