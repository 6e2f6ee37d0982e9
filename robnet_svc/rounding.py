"""The rounding allowance of a certificate: how far a floating-point evaluation of the deployed
network may be from the exact one, bounded from the magnitudes of the values involved.

A certificate claims that the *deployed* model (the ONNX file, run in its own precision,
usually float32 in onnxruntime) predicts the label everywhere in the perturbation set. The
bound methods bound the network in exact arithmetic (computed in float64, see
``robnet_svc.certify``); the deployed evaluation differs from it by rounding. This module
bounds that difference per logit, ``|fl(f(x)) − f(x)| <= err``, for every ``x`` in the set,
with the classic forward error analysis of dot products (Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1): any summation order of ``n`` products (FMA or not, blocked or
pairwise) satisfies ``|fl(Σ w_j x_j + b) − (Σ w_j x_j + b)| <= γ_{n+2} (Σ |w_j| |x_j| + |b|)``
with ``γ_m = m u / (1 − m u)`` and ``u`` the unit roundoff (2^-24 in float32). The ``+2``
covers the bias addition and one rounding of constants a runtime folds together (e.g.
BatchNorm into the preceding convolution).

Per node ``i`` of the bound graph, with ``m_j = max(|l_j|, |u_j|)`` from an interval pass over
the set and ``e_j`` the error bound of the node's input:

- the image: ``e_0 = u · m_0`` (the model receives the float image nearest to the exact one);
- an affine node ``f = L(x) + b``: ``e_i = |L|(e_in) + γ_{n_i+2} (|L|(m_in) + |b|)``, ``n_i`` its
  fan-in (``fan_in`` below, or the rule's own ``fan_in()``; data movement such as reshape or
  pad is exact: ``n_i = 0``; an op this module does not know gets its whole input size, an
  upper bound);
- ReLU: exact in floating point and 1-Lipschitz: ``e_i = e_in``; another activation with a
  ``lipschitz`` attribute ``L``: ``e_i = L e_in + 2u m_i``; without one, the width of its
  interval over ``[l − e, u + e]`` (sound, loose).

The allowance of the margin ``y_label − y_j`` is ``e_label + e_j``. ``certified`` requires
every margin lower bound to exceed its allowance (``robnet_svc.certify``). The bound pass
itself runs in float64; its own rounding is covered by adding float64's unit roundoff to
``u`` (2^-53: the same analysis applies to the bound computation, whose magnitudes are those
of the network's values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Extra roundings per affine node on top of its fan-in: the bias addition and one folded constant.
EXTRA_ROUNDINGS = 2


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the distance from 1 to the next float of ``dtype`` (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float) -> float:
    """``γ_n = n u / (1 − n u)``: the relative error bound of ``n`` chained roundings."""
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1 - nu)


def fan_in(rule) -> int:
    """The largest number of products summed into one output of an affine node (0: exact op)."""
    from robnet_svc.bounds.graph import _ClipAffine
    from robnet_svc.bounds.ops.arithmetic import ArithmeticRule
    from robnet_svc.bounds.ops.conv import ConvRule
    from robnet_svc.bounds.ops.linear import LinearRule, MatMulRule
    from robnet_svc.bounds.ops.norm import BatchNormRule
    from robnet_svc.bounds.ops.pool import AveragePoolRule, PadRule
    from robnet_svc.bounds.ops.shape import IdentityRule, PermuteRule, ReshapeRule

    call = rule.call
    declared = getattr(rule, "fan_in", None)  # a plugin rule may say (docs/plugins.md)
    if callable(declared):
        return int(declared())
    if isinstance(rule, (ReshapeRule, PermuteRule, IdentityRule, PadRule)):
        return 0
    if isinstance(rule, (ArithmeticRule, _ClipAffine)):
        return 1
    if isinstance(rule, BatchNormRule):
        return 2  # (x − mean)·scale + shift, with the folded sqrt(var + eps) as EXTRA_ROUNDINGS
    if isinstance(rule, LinearRule):
        return int(call.module.in_features)
    if isinstance(rule, ConvRule):
        m = call.module
        return int(m.in_channels // m.groups * math.prod(m.kernel_size))
    if isinstance(rule, MatMulRule):
        (w,) = call.constants
        if w.dim() == 1:
            return int(w.shape[0])
        return int(w.shape[-2] if rule._x_first else w.shape[-1])
    if isinstance(rule, AveragePoolRule):
        return int(math.prod(call.in_shapes[0][1:]))  # at most one channel's whole plane
    return int(sum(math.prod(s) for s in call.in_shapes))  # unknown op: every input element


def _magnitude(interval) -> Tensor:
    return torch.maximum(interval.lower.abs(), interval.upper.abs())


def logit_errors(frame, fwd, u: float) -> Tensor:
    """``[B, *output_shape]`` bounds of ``|fl(f(x)) − f(x)|`` over the set (module docstring);
    ``fwd``: an interval ``forward_pass`` of ``frame`` (every node's interval)."""
    from robnet_svc.bounds.ops.relu import ReluRule

    err: list[Tensor | None] = [None] * len(frame.nodes)
    err[0] = u * _magnitude(fwd.intervals[0])
    for i in range(1, len(frame.nodes)):
        node = frame.nodes[i]
        rule = frame.rule(i)
        e_in = [err[j] for j in node.inputs]
        if frame.is_activation(i):
            if isinstance(rule, ReluRule):
                err[i] = e_in[0]
                continue
            lip = getattr(rule, "lipschitz", None)
            if lip is not None:
                err[i] = lip * e_in[0] + 2 * u * _magnitude(fwd.intervals[i])
            else:
                pre = fwd.pre[i]
                lo, hi = rule.interval(pre.lower - e_in[0], pre.upper + e_in[0])
                err[i] = hi - lo
            continue
        out = rule.abs_linear(*e_in)
        n = fan_in(rule)
        if n:
            own = rule.abs_linear(*(_magnitude(fwd.intervals[j]) for j in node.inputs))
            bias = frame.bias(i, e_in[0])
            if bias is not None:
                own = own + bias.abs()
            out = out + gamma(n + EXTRA_ROUNDINGS, u) * own
        err[i] = out
    return err[frame.output]


def margin_allowance(net, aset, labels: Tensor, deployed_dtype: torch.dtype) -> Tensor:
    """``[B, K-1]`` rounding allowance of each margin ``y_label − y_j`` (``j != label``, increasing),
    for a model deployed in ``deployed_dtype``; computed in the dtype of ``aset`` (float64 in
    certification, whose own unit roundoff is added)."""
    from robnet_svc.bounds.graph import compile_network
    from robnet_svc.bounds.propagate import forward_pass

    net = compile_network(net)
    frame = net.frame(aset)
    u = unit_roundoff(deployed_dtype) + unit_roundoff(aset.lower.dtype)
    errors = logit_errors(frame, forward_pass(frame, aset), u).reshape(aset.batch_size, -1)  # [B, K]
    k = errors.shape[1]
    steps = torch.arange(k - 1, device=labels.device).unsqueeze(0)
    others = steps + (steps >= labels.unsqueeze(1)).long()  # the spec's row order
    return errors.gather(1, labels.unsqueeze(1)) + errors.gather(1, others)
