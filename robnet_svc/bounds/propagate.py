"""The two passes every bound method is built from.

``forward_pass``   interval (IBP) propagation, optionally together with forward symbolic
                   (SSIP) bounds in centre–radius form; records the concrete bounds of every
                   activation's input (intersected with SSIP and ``tighter`` when given).
``back_substitute`` backward symbolic propagation (RSIP/CROWN) of Λ from one node, through
                   affine ops (Λ ← Lᵀ Λ, Λ·b into the constant) and activations (relaxation),
                   down to the coefficients ``a``; or, in "tail" mode, only through the affine
                   ops after the last activations, concretising at activation outputs with a
                   ``frontier`` callback (how IBP and SSIP fold the spec into the last layers).

Shapes: ``B`` samples, ``k`` coefficients, ``S`` rows of Λ, node shapes per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from robnet_svc.bounds.graph import Frame
from robnet_svc.bounds.types import Interval, PreActivationBounds, Relaxation, SymbolicBounds


@dataclass
class ForwardResult:
    """Per plan node: ``intervals[i]`` (always), ``symbolic[i]`` (SSIP only); ``pre[i]`` the
    bounds of the input of activation node ``i``."""

    intervals: list[Interval | None]
    symbolic: list[SymbolicBounds | None] | None
    pre: dict[int, PreActivationBounds] = field(default_factory=dict)


def box_mid_rad(aset) -> tuple[Tensor, Tensor]:
    """Centre and radius of the coefficient box, each ``[B, k]``."""
    return (aset.lower + aset.upper) / 2, (aset.upper - aset.lower) / 2


def concretize_equation(eq: Tensor, aset, upper: bool = False) -> Tensor:
    """min (or max) over the box of the equations ``eq [B, k+1, *shape]`` -> ``[B, *shape]``."""
    mid, rad = box_mid_rad(aset)
    coef = eq[:, :-1].flatten(2)
    const = eq[:, -1]
    centre = torch.einsum("bkn,bk->bn", coef, mid)
    spread = torch.einsum("bkn,bk->bn", coef.abs(), rad)
    out = centre + spread if upper else centre - spread
    return const + out.reshape(const.shape)


def forward_pass(frame: Frame, aset, symbolic: bool = False,
                 tighter: dict[int, PreActivationBounds] | None = None) -> ForwardResult:
    """Interval (and, if ``symbolic``, SSIP) bounds of every node; see the module docstring."""
    n = len(frame.nodes)
    intervals: list[Interval | None] = [None] * n
    syms: list[SymbolicBounds | None] | None = [None] * n if symbolic else None
    result = ForwardResult(intervals, syms)
    intervals[0] = Interval(*aset.center_radius())
    if symbolic:
        weights, offset = aset.dense()
        syms[0] = SymbolicBounds(torch.cat([weights, offset.unsqueeze(1)], 1), None)
    for i in range(1, n):
        node = frame.nodes[i]
        rule = frame.rule(i)
        ins = [intervals[j] for j in node.inputs]
        if frame.is_activation(i):
            lower, upper = ins[0].lower, ins[0].upper
            if symbolic:
                sym = syms[node.inputs[0]]
                lo_eq, up_eq = sym.lower, sym.upper  # formed once: concretised here, relaxed below
                lower = torch.maximum(lower, concretize_equation(lo_eq, aset))
                upper = torch.minimum(upper, concretize_equation(up_eq, aset, upper=True))
            pre = PreActivationBounds(lower, upper)
            if tighter is not None and i in tighter:
                pre = pre.intersect(tighter[i])
            result.pre[i] = pre
            intervals[i] = Interval.from_bounds(*rule.interval(pre.lower, pre.upper))
            if symbolic:
                syms[i] = _relax_forward(rule.relax(pre.lower, pre.upper), lo_eq, up_eq, sym.radius is None,
                                         getattr(rule, "nonneg_slopes", False))
            continue
        bias = frame.bias(i, ins[0].mid) if symbolic else None
        intervals[i] = Interval(rule.forward(*(iv.mid for iv in ins)), rule.abs_linear(*(iv.rad for iv in ins)))
        if symbolic:
            syms[i] = _affine_forward(rule, bias, [syms[j] for j in node.inputs])
    return result


def _affine_forward(rule, bias: Tensor | None, ins: list[SymbolicBounds]) -> SymbolicBounds:
    """SSIP through an affine op: centre' = L(centre) (+ b on the constant row), radius' = |L|(radius);
    the equation axis is folded into the batch axis."""
    b, rows = ins[0].centre.shape[:2]

    def fold(t: Tensor) -> Tensor:
        return t.reshape(b * rows, *t.shape[2:])

    centre = rule.forward(*(fold(s.centre) for s in ins))
    centre = centre.reshape(b, rows, *centre.shape[1:])
    if bias is not None:
        # f added b to every row; only the constant row keeps it (in place: centre is fresh).
        centre[:, :-1] -= bias.unsqueeze(1)
    if all(s.radius is None for s in ins):
        return SymbolicBounds(centre, None)
    radii = [fold(s.radius) if s.radius is not None else torch.zeros_like(fold(s.centre)) for s in ins]
    radius = rule.abs_linear(*radii)
    return SymbolicBounds(centre, radius.reshape(b, rows, *radius.shape[1:]))


def _relax_forward(relax: Relaxation, lo_eq: Tensor, up_eq: Tensor, exact_input: bool,
                   nonneg_slopes: bool) -> SymbolicBounds:
    """SSIP through an activation: Lo' = s_lo·Lo + b_lo, Up' = s_up·Up + b_up (slopes >= 0;
    negative slopes swap the roles of Lo and Up), returned in centre–radius form.
    Equations ``[B, k+1, *shape]``; the biases go to the constant row."""
    lo_s, up_s = relax.lower_slope.unsqueeze(1), relax.upper_slope.unsqueeze(1)
    if exact_input and bool(((relax.lower_slope == relax.upper_slope) & (relax.lower_bias == relax.upper_bias)).all()):
        centre = lo_s * lo_eq
        centre[:, -1] += relax.lower_bias
        return SymbolicBounds(centre, None)
    # halves folded into the slopes: centre' = (Up' + Lo')/2, radius' = (Up' - Lo')/2
    lo_s, up_s = lo_s * 0.5, up_s * 0.5
    if nonneg_slopes:
        half_lo, half_up = lo_s * lo_eq, up_s * up_eq
    else:
        half_lo = lo_s.clamp(min=0) * lo_eq + lo_s.clamp(max=0) * up_eq
        half_up = up_s.clamp(min=0) * up_eq + up_s.clamp(max=0) * lo_eq
    centre, radius = half_up + half_lo, half_up - half_lo
    centre[:, -1] += (relax.upper_bias + relax.lower_bias) * 0.5
    radius[:, -1] += (relax.upper_bias - relax.lower_bias) * 0.5
    return SymbolicBounds(centre, radius)


Frontier = Callable[[int, Tensor], tuple[Tensor | None, Tensor]]


def interval_frontier(fwd: ForwardResult) -> Frontier:
    """Concretise ``Λ·x`` at a node with its interval: ``Λ·mid − |Λ|·rad``."""
    def value(i: int, lam: Tensor) -> tuple[None, Tensor]:
        iv = fwd.intervals[i]
        flat = lam.flatten(2)
        const = (flat * iv.mid.flatten(1).unsqueeze(1)).sum(-1) - (flat.abs() * iv.rad.flatten(1).unsqueeze(1)).sum(-1)
        return None, const

    return value


def symbolic_frontier(fwd: ForwardResult) -> Frontier:
    """``Λ·x >= Λ·centre(a) − |Λ|·radius(a)``: an equation in ``a`` (``[B, S, k]``, ``[B, S]``)."""
    def value(i: int, lam: Tensor) -> tuple[Tensor, Tensor]:
        sym = fwd.symbolic[i]
        flat = lam.flatten(2)
        eq = torch.einsum("bsn,bkn->bsk", flat, sym.centre.flatten(2))
        if sym.radius is not None:
            eq = eq - torch.einsum("bsn,bkn->bsk", flat.abs(), sym.radius.flatten(2))
        return eq[..., :-1], eq[..., -1]

    return value


def back_substitute(frame: Frame, aset, start: int, lam: Tensor,
                    relax: dict[int, Relaxation] | None = None,
                    frontier: Frontier | None = None) -> Tensor:
    """Sound lower bounds ``[B, S]`` of ``Λ·x_start`` over the box, ``lam [B, S, *shape_start]``.

    Λ is accumulated per node in reverse topological order (DAGs: a node feeding two ops
    receives the sum). At an activation node, ``frontier`` (when given) concretises;
    otherwise the node's ``relax`` relaxation back-substitutes (lower relaxation for Λ >= 0,
    upper for Λ < 0).
    """
    b, s = lam.shape[:2]
    acc: dict[int, Tensor] = {start: lam}
    const = lam.new_zeros((b, s))
    coef: Tensor | None = None
    for i in range(start, -1, -1):
        lam_i = acc.pop(i, None)
        if lam_i is None:
            continue
        if i == 0:
            c, offset = aset.transpose(lam_i)
            coef = c if coef is None else coef + c
            const = const + offset
            continue
        node = frame.nodes[i]
        if frame.is_activation(i):
            if frontier is not None:
                c, offset = frontier(i, lam_i)
                if c is not None:
                    coef = c if coef is None else coef + c
                const = const + offset
                continue
            r = relax[i]
            # Λ >= 0 takes the lower relaxation, Λ < 0 the upper one.
            nonneg = lam_i >= 0
            slope = torch.where(nonneg, r.lower_slope.unsqueeze(1), r.upper_slope.unsqueeze(1))
            bias = torch.where(nonneg, r.lower_bias.unsqueeze(1), r.upper_bias.unsqueeze(1))
            const = const + (lam_i * bias).flatten(2).sum(-1)
            _accumulate(acc, node.inputs[0], lam_i * slope)
            continue
        rule = frame.rule(i)
        bias = frame.bias(i, lam_i)
        if bias is not None:
            const = const + (lam_i * bias.unsqueeze(1)).flatten(2).sum(-1)
        parents = rule.transpose(lam_i.reshape(b * s, *lam_i.shape[2:]))
        for j, t in zip(node.inputs, parents):
            _accumulate(acc, j, t.reshape(b, s, *frame.shapes[j]))
    if coef is None:
        return const
    return aset.concretize(coef, const)


def _accumulate(acc: dict[int, Tensor], j: int, t: Tensor) -> None:
    acc[j] = t if j not in acc else acc[j] + t
