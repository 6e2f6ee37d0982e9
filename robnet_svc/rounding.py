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
the set (``symbolic=True``: the SSIP ∩ IBP intervals, sound and often far smaller: IBP's ranges
grow with depth, and every bound below grows with them) and ``e_j`` the error bound of the
node's input:

- the image: ``e_0 = u · m_0`` (the model receives the float image nearest to the exact one);
- an affine node ``f = L(x) + b``: ``e_i = |L|(e_in) + γ_{n_i+2} (|L|(m_in) + |b|)``, ``n_i`` its
  fan-in (``fan_in`` below, or the rule's own ``fan_in()``; data movement such as reshape or
  pad is exact: ``n_i = 0``; an op this module does not know gets its whole input size, an
  upper bound);
- ReLU: exact in floating point and 1-Lipschitz: ``e_i = e_in``, and ``0`` where the input's
  upper bound plus its error is still ``<= 0`` (the float input is ``<= 0`` too: both outputs
  are exactly 0); another activation with a
  ``lipschitz`` attribute ``L``: ``e_i = L e_in + r u (m_i + f) + j``, ``r`` its ``rounding_ulps``
  (default 2; 16 for the transcendental ones, whose float implementations are not correctly
  rounded), ``f`` its ``rounding_floor`` (default 0; 1 for those), ``j`` its ``jump`` (Softplus's
  switch to ``x`` above its threshold); without one, the width of its
  interval over ``[l − e, u + e]`` (sound, loose);
- a relaxed (non-elementwise) rule: its ``rounding_error(e_in, m_in, u)`` — MaxPool: the
  largest input error in the window (max is exact and 1-Lipschitz in the max-norm); a product
  ``x·z``: ``(m_x + e_x) e_z + m_z e_x + u (m_x + e_x)(m_z + e_z)``; without one, the width of
  its interval over the inputs widened by their errors plus ``2u m``.

The allowance of the margin ``y_label − y_j`` is ``e_label + e_j``, or, when the output node
is affine, ``|(e_label − e_j)ᵀ L|(e_in)`` plus that node's own rounding of both logits. ``certified`` requires
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
    from robnet_svc.bounds.ops.structural import ConcatRule, ReduceRule, SelectRule, SplitRule, TransposeRule

    call = rule.call
    declared = getattr(rule, "fan_in", None)  # a plugin rule may say (docs/plugins.md)
    if callable(declared):
        return int(declared())
    if isinstance(rule, (ReshapeRule, PermuteRule, IdentityRule, PadRule, ConcatRule, SelectRule, SplitRule,
                         TransposeRule)):
        return 0  # data movement: exact
    if isinstance(rule, ReduceRule):  # a sum of in/out elements per output (and the mean's division)
        return int(math.prod(call.in_shapes[0]) // max(math.prod(call.out_shape), 1)) + 1
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
    err, own = _node_errors(frame, fwd, u)
    return err[frame.output]


def _node_errors(frame, fwd, u: float) -> tuple[list, list]:
    """Per node: the error bound of its output, and of affine nodes the part of it that is the
    node's own rounding (``γ (|L|(m_in) + |b|)``, None for exact ops and activations)."""
    from robnet_svc.bounds.ops.relu import ReluRule

    err: list[Tensor | None] = [None] * len(frame.nodes)
    own: list[Tensor | None] = [None] * len(frame.nodes)
    err[0] = u * _magnitude(fwd.intervals[0])
    for i in range(1, len(frame.nodes)):
        node = frame.nodes[i]
        rule = frame.rule(i)
        e_in = [err[j] for j in node.inputs]
        if frame.is_activation(i):
            pre = fwd.pre[i]
            if isinstance(rule, ReluRule):  # exact; 0 (no error) where the input stays <= 0 even with its error
                err[i] = torch.where(pre.upper + e_in[0] > 0, e_in[0], torch.zeros_like(e_in[0]))
                continue
            lip = getattr(rule, "lipschitz", None)
            if lip is not None:  # own rounding: the rule's stated implementation accuracy (default 2 ulps)
                ulps = getattr(rule, "rounding_ulps", 2.0)
                floor = getattr(rule, "rounding_floor", 0.0)
                err[i] = lip * e_in[0] + ulps * u * (_magnitude(fwd.intervals[i]) + floor) + getattr(rule, "jump", 0.0)
            else:
                lo, hi = rule.interval(pre.lower - e_in[0], pre.upper + e_in[0])
                err[i] = hi - lo
            continue
        if frame.is_relaxed(i):  # MaxPool, products of perturbed tensors, plugins' relaxed rules
            m_in = [_magnitude(fwd.intervals[j]) for j in node.inputs]
            own_error = getattr(rule, "rounding_error", None)
            if own_error is not None:
                err[i] = own_error(e_in, m_in, u)
            else:  # sound for any rule: the output range over the inputs widened by their errors
                lo, hi = rule.interval([(fwd.intervals[j].lower - e, fwd.intervals[j].upper + e)
                                        for j, e in zip(node.inputs, e_in)])
                err[i] = (hi - lo) + 2 * u * _magnitude(fwd.intervals[i])
            continue
        out = rule.abs_linear(*e_in)
        n = fan_in(rule)
        if n:
            mine = rule.abs_linear(*(_magnitude(fwd.intervals[j]) for j in node.inputs))
            bias = frame.bias(i, e_in[0])
            if bias is not None:
                mine = mine + bias.abs()
            own[i] = gamma(n + EXTRA_ROUNDINGS, u) * mine
            out = out + own[i]
        err[i] = out
    return err, own


def margin_allowance(net, aset, labels: Tensor, deployed_dtype: torch.dtype, symbolic: bool = False) -> Tensor:
    """``[B, K-1]`` rounding allowance of each margin ``y_label − y_j`` (``j != label``, increasing),
    for a model deployed in ``deployed_dtype``; computed in the dtype of ``aset`` (float64 in
    certification, whose own unit roundoff is added).

    When the output node is affine (the usual final layer ``W x + b``), the error arriving at
    its input goes through the margin's own row ``(e_label − e_j)ᵀ W``, so ``|w_label − w_j|``
    multiplies it rather than ``|w_label| + |w_j|``; the layer's own rounding of each logit is
    added as it is."""
    from robnet_svc.bounds.graph import compile_network
    from robnet_svc.bounds.propagate import forward_pass
    from robnet_svc.bounds.spec import spec_lambda

    net = compile_network(net)
    frame = net.frame(aset)
    u = unit_roundoff(deployed_dtype) + unit_roundoff(aset.lower.dtype)
    fwd = forward_pass(frame, aset)
    if symbolic and getattr(aset, "supports_dense", True):  # SSIP ∩ IBP intervals: smaller magnitudes
        fwd = forward_pass(frame, aset, symbolic=True, tighter=fwd.pre)
    err, own = _node_errors(frame, fwd, u)
    b, out = aset.batch_size, frame.output
    k = err[out].reshape(b, -1).shape[1]
    steps = torch.arange(k - 1, device=labels.device).unsqueeze(0)
    others = steps + (steps >= labels.unsqueeze(1)).long()  # the spec's row order

    def pair(e: Tensor) -> Tensor:  # e_label + e_j per spec row
        e = e.reshape(b, -1)
        return e.gather(1, labels.unsqueeze(1)) + e.gather(1, others)

    node = frame.nodes[out]
    if frame.is_activation(out) or len(node.inputs) != 1:
        return pair(err[out])
    lam = spec_lambda(frame, labels, aset.lower)  # [B, K-1, *out_shape]
    (rows,) = frame.rule(out).transpose(lam.reshape(b * (k - 1), *lam.shape[2:]))
    e_in = err[node.inputs[0]].reshape(b, 1, -1)
    through = (rows.reshape(b, k - 1, -1).abs() * e_in).sum(-1)
    return through + (pair(own[out]) if own[out] is not None else 0)
