"""Max pooling (``nn.MaxPool1d/2d``, ``F.max_pool1d/2d``; onnx2torch maps ONNX MaxPool to the
``nn`` classes): a ``RelaxedRule`` whose linear bounds select one input per window.

In each window let ``j*`` be the input with the largest lower bound (first one on ties).

- lower bound: ``y >= x_{j*}`` (sound: y is the max of the window);
- upper bound: ``y <= x_{j*}`` when ``j*`` dominates (``l_{j*} >= u_i`` for every other ``i``
  of the window: then ``y = x_{j*}`` exactly), else the constant ``y <= max_i u_i``
  (DeepPoly's choice, also CROWN's default);
- interval: ``[max_i l_i, max_i u_i]`` (exact).

Padding has -inf semantics: padded positions never win and never enter a bound. Windows are
formed once per pass on the ``[B, ...]`` bounds (``unfold``); the symbolic passes only gather
(forward) and scatter-add (backward) along the selected indices, so the ``k`` equation rows or
``S`` spec rows never go through ``unfold``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robnet_svc.bounds.ops.base import LinearBounds, OpCall, RelaxedRule
from robnet_svc.bounds.propagate import row_dot

_FUNCTIONAL = {F.max_pool1d: 1, F.max_pool2d: 2, torch.max_pool1d: 1, torch.max_pool2d: 2}
_POSITIONAL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2}


def _pair(v, dims: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * dims


def pool_params(call: OpCall) -> dict:
    """kernel, stride, padding, dilation (each a ``dims``-tuple), ceil_mode, return_indices, dims."""
    if call.module is not None:
        m = call.module
        dims = _MODULES[type(m)]
        raw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                   ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    else:
        dims = _FUNCTIONAL[call.target]
        raw = dict(zip(_POSITIONAL, call.args[1:]), **call.kwargs)
    kernel = _pair(raw["kernel_size"], dims)
    stride = raw.get("stride")
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair(stride, dims)
    return dict(dims=dims, kernel=kernel, stride=stride, padding=_pair(raw.get("padding", 0), dims),
                dilation=_pair(raw.get("dilation", 1), dims), ceil_mode=bool(raw.get("ceil_mode", False)),
                return_indices=bool(raw.get("return_indices", False)))


class MaxPoolRule(RelaxedRule):
    @classmethod
    def check(cls, call: OpCall) -> str | None:
        if call.module is None and call.target not in _FUNCTIONAL:
            return "unknown max-pool function"
        try:
            params = pool_params(call)
        except (TypeError, KeyError) as exc:
            return f"max pooling with arguments it cannot read ({exc})"
        if params["return_indices"]:
            return "max pooling that returns indices"
        return None

    def _windows(self, t: Tensor, fill: float) -> Tensor:
        """``t [B, C, *spatial]`` -> windows ``[B, C, K, L]`` (``K`` window elements, ``L`` output
        positions), padded with ``fill`` (``-inf`` for values)."""
        p = pool_params(self.call)
        if p["dims"] == 1:
            t = t.unsqueeze(2)
            kernel, stride, pad, dil = (1, *p["kernel"]), (1, *p["stride"]), (0, *p["padding"]), (1, *p["dilation"])
            out_hw = (1, self.call.out_shape[-1])
        else:
            kernel, stride, pad, dil = p["kernel"], p["stride"], p["padding"], p["dilation"]
            out_hw = tuple(self.call.out_shape[-2:])
        b, c, h, w = t.shape
        # ceil_mode: extra cells on the bottom/right so that the last (partial) windows exist
        extra = [max(0, (o - 1) * s + d * (k - 1) + 1 - (n + 2 * q))
                 for o, s, d, k, n, q in zip(out_hw, stride, dil, kernel, (h, w), pad)]
        t = F.pad(t, (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0]), value=fill)
        hp, wp = t.shape[-2:]
        cols = F.unfold(t.reshape(b * c, 1, hp, wp), kernel, dilation=dil, stride=stride)  # [B*C, K, L']
        rows_out = (hp - dil[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        cols_out = (wp - dil[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        cols = cols.reshape(b, c, cols.shape[1], rows_out, cols_out)[..., :out_hw[0], :out_hw[1]]
        return cols.reshape(b, c, cols.shape[2], -1)

    def _select(self, lower: Tensor, upper: Tensor):
        """Per output: the flat input index of ``j*``, ``l_{j*}``, ``max u`` and dominance."""
        lo, up = self._windows(lower, float("-inf")), self._windows(upper, float("-inf"))
        best = lo.argmax(2, keepdim=True)  # [B, C, 1, L]
        spatial = lower.shape[2:]
        positions = torch.arange(math.prod(spatial), dtype=lower.dtype, device=lower.device).reshape(1, 1, *spatial)
        where = self._windows(positions, -1.0)  # [1, 1, K, L]: flat input position of each cell
        index = where.expand(lo.shape[0], lo.shape[1], -1, -1).gather(2, best).squeeze(2).long()
        l_best = lo.gather(2, best).squeeze(2)
        u_max = up.amax(2)
        u_other = up.scatter(2, best, float("-inf")).amax(2)
        return index, l_best, u_max, l_best >= u_other

    def interval(self, bounds):
        (lower, upper), = bounds
        _, l_best, u_max, _ = self._select(lower, upper)
        shape = (lower.shape[0], *self.call.out_shape)
        return l_best.reshape(shape), u_max.reshape(shape)

    def rounding_error(self, e_in: list[Tensor], m_in: list[Tensor], u: float) -> Tensor:
        """Float error bound of the output (robnet_svc/rounding.py): max is exact and
        ``|max x̃ − max x| <= max |x̃ − x|`` over the window (padding never wins)."""
        (e,) = e_in
        return self._windows(e, 0.0).amax(2).reshape(e.shape[0], *self.call.out_shape)

    def relax(self, bounds) -> "MaxPoolBounds":
        (lower, upper), = bounds
        index, _, u_max, dominant = self._select(lower, upper)
        return MaxPoolBounds(index, dominant.to(lower.dtype), u_max, tuple(lower.shape[1:]), self.call.out_shape)


class MaxPoolBounds(LinearBounds):
    """``x_{j*} <= y <= d·x_{j*} + (1 − d)·max u`` per output (``d`` = 1 where ``j*`` dominates)."""

    def __init__(self, index: Tensor, dominant: Tensor, u_max: Tensor, in_shape, out_shape):
        self.index, self.dominant = index, dominant  # [B, C, L]
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        b = index.shape[0]
        self.lower_bias = u_max.new_zeros((b, *self.out_shape))
        self.upper_bias = ((1 - dominant) * u_max).reshape(b, *self.out_shape)

    def _gather(self, t: Tensor) -> Tensor:
        b, m, c = t.shape[0], t.shape[1], self.in_shape[0]
        idx = self.index.unsqueeze(1).expand(b, m, c, -1)
        return t.reshape(b, m, c, -1).gather(3, idx).reshape(b, m, *self.out_shape)

    def lower(self, ins):
        (lo, _), = ins
        return self._gather(lo)

    def upper(self, ins):
        (_, up), = ins
        b = up.shape[0]
        return self._gather(up) * self.dominant.reshape(b, 1, *self.out_shape)

    def backward(self, lam: Tensor):
        b, s, c = lam.shape[0], lam.shape[1], self.in_shape[0]
        neg = -torch.relu(-lam)  # = clamp(max=0) with its gradient; clamp's backward is a slow CPU ``where``
        const = row_dot(neg, self.upper_bias)
        # Λ >= 0: slope 1 (lower bound); Λ < 0: slope d (upper bound)
        eff = lam - neg * (1 - self.dominant.reshape(b, 1, *self.out_shape))
        flat = eff.reshape(b, s, c, -1)
        idx = self.index.unsqueeze(1).expand(b, s, c, -1)
        n = flat.new_zeros((b, s, c, math.prod(self.in_shape[1:])))
        return [n.scatter_add(3, idx, flat).reshape(b, s, *self.in_shape)], const
