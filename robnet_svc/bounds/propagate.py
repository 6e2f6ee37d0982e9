"""The two passes every bound method is built from.

``forward_pass``   interval (IBP) propagation, optionally together with forward symbolic
                   (SSIP) bounds in centre–radius form; records the concrete bounds of every
                   activation's input (intersected with SSIP and ``tighter`` when given).
``back_substitute`` backward symbolic propagation (RSIP/CROWN) of Λ from one node, through
                   affine ops (Λ ← Lᵀ Λ, Λ·b into the constant), activations (relaxation) and
                   ``RelaxedRule`` nodes (their ``LinearBounds.backward``),
                   down to the coefficients ``a``; or, in "tail" mode, only through the affine
                   ops after the last activations, concretising at activation outputs with a
                   ``frontier`` callback (how IBP and SSIP fold the spec into the last layers).

Shapes: ``B`` samples, ``k`` coefficients, ``S`` rows of Λ, node shapes per sample. Layout:
image-shaped tensors may be channels-last in memory (``_layout``); shapes and values are the
same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from robnet_svc.bounds import native
from robnet_svc.bounds.graph import Frame
from robnet_svc.bounds.kernels import active_kernels, chunk_scratch, chunk_slices, fused_step
from robnet_svc.bounds.ops.relu import uses_relu_relaxation
from robnet_svc.bounds.types import Equation, Interval, PreActivationBounds, Relaxation, SymbolicBounds


@dataclass
class ForwardResult:
    """Per plan node: ``intervals[i]`` (always), ``symbolic[i]`` (SSIP only); ``pre[i]`` the
    bounds of the input of activation node ``i`` (a list, one per perturbed input, for a
    ``RelaxedRule`` node such as MaxPool or a product)."""

    intervals: list[Interval | None]
    symbolic: list[SymbolicBounds | None] | None
    pre: dict[int, PreActivationBounds] = field(default_factory=dict)


def box_mid_rad(aset) -> tuple[Tensor, Tensor]:
    """Centre and radius of the coefficient box, each ``[B, k]``."""
    return (aset.lower + aset.upper) / 2, (aset.upper - aset.lower) / 2


def concretize_pair(lo_eq: Equation, up_eq: Equation, aset) -> tuple[Tensor, Tensor]:
    """``(min over the box of lo_eq, max over the box of up_eq)``, each ``[B, *shape]``:
    ``const + mid·coef ∓ rad·|coef|`` as batched matrix products over the ``k`` coefficient
    rows (one pass when ``lo_eq is up_eq``, an exact equation). Differentiable in everything;
    see ``_Concretize`` for why it has its own backward."""
    mid, rad = box_mid_rad(aset)
    # neurons flattened in the coefficient rows' memory order (a view also when they are
    # channels-last, see ``_layout``); the constants and results follow that order
    order = _InOrder.of(lo_eq.coef)
    shape = order.node(lo_eq.const).shape

    def flat(eq: Equation) -> tuple[Tensor, Tensor]:
        return order.flat_rows(eq.coef), order.flat_node(eq.const)

    if lo_eq is up_eq:
        lower, upper = _Concretize.apply(*flat(lo_eq), None, None, mid, rad)
    else:
        lower, upper = _Concretize.apply(*flat(lo_eq), *flat(up_eq), mid, rad)
    return order.unflat_node(lower, shape), order.unflat_node(upper, shape)


def memory_order(t: Tensor) -> list[int]:
    """The axes of ``t`` from the outermost to the innermost in memory (decreasing stride; the
    batch axis first): ``t.permute(order)`` is contiguous for a dense tensor in any layout, so
    flattening it is a view. NCHW: ``[0, 1, 2, 3]``; channels-last: ``[0, 2, 3, 1]``."""
    return [0] + sorted(range(1, t.dim()), key=lambda d: -t.stride(d) if t.shape[d] > 1 else 0)


class _InOrder:
    """Views of a node's tensors with the axes in the memory order ``order`` (``memory_order``)
    and back: ``node`` for ``[B, *shape]``, ``rows`` for ``[B, R, *shape]``. Flattening such a view
    is a view in either layout. The element-wise steps at each activation also run on these
    views: on a channels-last tensor, autograd's reduction of a broadcast slope's gradient (``sum``
    over the row axis) writes an NCHW result and, with every op after it mixing layouts, runs
    4–6× slower than on the permuted views, which are plain contiguous tensors."""

    def __init__(self, order: list[int]):
        self.order = order
        self.inverse = sorted(range(len(order)), key=order.__getitem__)
        self.identity = order == sorted(order)

    @staticmethod
    def of(t: Tensor, rows: bool = True) -> "_InOrder":
        """The memory order of ``t``'s neuron axes (``rows``: ``t`` is ``[B, R, *shape]``)."""
        return _InOrder(memory_order(t[:, 0] if rows else t))

    def node(self, t: Tensor) -> Tensor:
        return t.permute(self.order)

    def rows(self, t: Tensor) -> Tensor:
        return t.permute(0, 1, *(d + 1 for d in self.order[1:]))

    def back_node(self, t: Tensor) -> Tensor:
        return t.permute(self.inverse)

    def back_rows(self, t: Tensor) -> Tensor:
        return t.permute(0, 1, *(d + 1 for d in self.inverse[1:]))

    def flat_node(self, t: Tensor) -> Tensor:
        """``[B, *shape]`` -> ``[B, N]``, neurons in memory order (a view when ``t`` is dense)."""
        return self.node(t).flatten(1)

    def flat_rows(self, t: Tensor) -> Tensor:
        """``[B, R, *shape]`` -> ``[B, R, N]``, neurons in memory order."""
        return self.rows(t).flatten(2)

    def unflat_node(self, t: Tensor, shape) -> Tensor:
        """``flat_node``'s inverse: ``[B, N]`` -> ``[B, *shape]``; ``shape``: ``node(x).shape`` of
        such a node tensor ``x`` (the permuted shape)."""
        return self.back_node(t.reshape(shape))

    def unflat_rows(self, t: Tensor, shape) -> Tensor:
        """``flat_rows``'s inverse: ``[B, R, N]`` -> ``[B, R, *shape]`` (``shape`` as in ``unflat_node``)."""
        return self.back_rows(t.reshape(t.shape[0], t.shape[1], *shape[1:]))

    def equation(self, eq: Equation) -> Equation:
        return Equation(self.rows(eq.coef), self.node(eq.const))

    def back(self, eq: Equation) -> Equation:
        return Equation(self.back_rows(eq.coef), self.back_node(eq.const))

    def relaxation(self, r: Relaxation) -> Relaxation:
        return Relaxation(*(self.node(t) for t in (r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias)))


def channels_last(t: Tensor, lead: int = 1) -> Tensor:
    """``t [*lead axes, C, H, W]`` with the channels innermost in memory (the same values and
    shape; ``torch.channels_last`` for ``lead = 1``). When a pass uses it: ``_layout``.

    One channel is both layouts at once in memory, but torch reads the stride of the channel
    axis to pick a convolution's output layout: here it is 1, so the first convolution of a
    grey-image network writes channels-last too (a copy of the one-channel tensor)."""
    moved = t.movedim(lead, -1)
    if moved.is_contiguous() and t.stride(lead) == 1:  # laid out so already (no copy)
        return t
    moved = moved.clone(memory_format=torch.contiguous_format) if t.shape[lead] == 1 else moved.contiguous()
    return moved.movedim(-1, lead)


def _bound_of_rows(const: Tensor, mid3: Tensor, rad3: Tensor, coef: Tensor, magnitude: Tensor, sign: float,
                   out: Tensor | None = None) -> Tensor:
    """``const + mid·coef + sign·rad·|coef|`` over the box, ``[B, 1, N]`` (``coef``, ``magnitude =
    |coef|`` ``[B, k, N]``; ``const [B, N]``; ``mid3``, ``rad3`` ``[B, 1, k]``): the lower (``sign``
    −1) or upper (+1) bound of one equation, as two batched matrix products."""
    return torch.baddbmm(torch.baddbmm(const.unsqueeze(1), mid3, coef), rad3, magnitude, alpha=sign, out=out)


class _Concretize(torch.autograd.Function):
    """``lower = lo_const + mid·lo_coef − rad·|lo_coef|``, ``upper = up_const + mid·up_coef +
    rad·|up_coef|`` (``coef [B, k, N]``, ``const [B, N]``, ``mid``/``rad`` ``[B, k]``; ``up_*``
    None: the same equation).

    Hand-written backward (the hottest step of training with SSIP): autograd of the plain
    expression stores ``|coef|`` next to ``coef`` and replays two outer products, ``sgn``, a
    multiply and an accumulation at full size per equation. Here only ``coef`` is saved and
    ``d lower/d coef = g ⊗ (mid − rad·sign(coef))`` is formed in place in one buffer
    (``d|x|/dx = sign(x)``, 0 at 0, as autograd's ``abs``).
    """

    @staticmethod
    def forward(ctx, lo_coef, lo_const, up_coef, up_const, mid, rad):
        shared = up_coef is None
        mid3, rad3 = mid.unsqueeze(1), rad.unsqueeze(1)  # [B, 1, k]
        if shared:
            centre = torch.baddbmm(lo_const.unsqueeze(1), mid3, lo_coef)
            spread = torch.bmm(rad3, lo_coef.abs())
            lower, upper = (centre - spread).squeeze(1), (centre + spread).squeeze(1)
        else:
            lower = _bound_of_rows(lo_const, mid3, rad3, lo_coef, lo_coef.abs(), -1.0).squeeze(1)
            upper = _bound_of_rows(up_const, mid3, rad3, up_coef, up_coef.abs(), 1.0).squeeze(1)
        ctx.shared = shared
        ctx.save_for_backward(lo_coef, up_coef, mid, rad)
        return lower, upper

    @staticmethod
    def backward(ctx, g_lo, g_up):
        lo_coef, up_coef, mid, rad = ctx.saved_tensors
        need = ctx.needs_input_grad
        mid3, rad3 = mid.unsqueeze(-1), rad.unsqueeze(-1)  # [B, k, 1]
        grads = [None] * 6
        if ctx.shared:
            if need[0]:  # (g_lo + g_up)⊗mid + (g_up − g_lo)⊗rad·sign
                t = torch.sign(lo_coef).mul_(rad3).mul_((g_up - g_lo).unsqueeze(1))
                grads[0] = t.addcmul_(mid3, (g_lo + g_up).unsqueeze(1))
            grads[1] = g_lo + g_up if need[1] else None
            if need[4]:
                grads[4] = torch.bmm(lo_coef, (g_lo + g_up).unsqueeze(-1)).squeeze(-1)
            if need[5]:
                grads[5] = torch.bmm(lo_coef.abs(), (g_up - g_lo).unsqueeze(-1)).squeeze(-1)
            return tuple(grads)
        if need[0]:
            grads[0] = torch.sign(lo_coef).mul_(-rad3).add_(mid3).mul_(g_lo.unsqueeze(1))
        if need[2]:
            grads[2] = torch.sign(up_coef).mul_(rad3).add_(mid3).mul_(g_up.unsqueeze(1))
        grads[1] = g_lo if need[1] else None
        grads[3] = g_up if need[3] else None
        if need[4]:
            grads[4] = (torch.bmm(lo_coef, g_lo.unsqueeze(-1)) + torch.bmm(up_coef, g_up.unsqueeze(-1))).squeeze(-1)
        if need[5]:
            grads[5] = (torch.bmm(up_coef.abs(), g_up.unsqueeze(-1))
                        - torch.bmm(lo_coef.abs(), g_lo.unsqueeze(-1))).squeeze(-1)
        return tuple(grads)


def forward_pass(frame: Frame, aset, symbolic: bool = False,
                 tighter: dict[int, PreActivationBounds] | None = None,
                 pre_only: bool = False) -> ForwardResult:
    """Interval (and, if ``symbolic``, SSIP) bounds of every node; see the module docstring.

    ``pre_only``: the caller needs only ``pre`` (RSIP-SSIP), so the pass stops once the last
    activation's input bounds are known (``intervals``/``symbolic`` stay None after it).
    Inside ``kernels.fused_activations`` (training with ``--compile``) the symbolic step at an
    activation with a ``fused_relaxation`` runs as fused kernels (``kernels.fused_step``).
    """
    n = len(frame.nodes)
    intervals: list[Interval | None] = [None] * n
    syms: list[SymbolicBounds | None] | None = [None] * n if symbolic else None
    result = ForwardResult(intervals, syms)
    layout = _layout(frame, aset)
    intervals[0] = Interval(*(layout(t) for t in aset.center_radius()))
    if symbolic:
        weights, offset = aset.dense_channels_last() if layout is channels_last else aset.dense()
        syms[0] = SymbolicBounds(Equation(layout(weights, 2), layout(offset)), None)
    last_activation = max((i for i in range(1, n) if frame.is_nonlinear(i)), default=0) if pre_only else n
    kernels = active_kernels() if symbolic else None  # fused, compiled activation steps (training)
    box = box_mid_rad(aset) if kernels is not None else None  # once per pass, for every fused step
    start = 1
    if symbolic and _clip_layer_in_one_step(frame, syms[0], last_activation):
        start = _clip_layer_forward(frame, aset, result, tighter)
    flattened: dict[int, int] = {}  # dense node -> the input of the flatten it applies itself to
    for i in range(start, n):
        node = frame.nodes[i]
        rule = frame.rule(i)
        ins = [intervals[j] for j in node.inputs]
        if frame.is_relaxed(i):
            pres, eqs = [], []
            for j, iv in zip(node.inputs, ins):
                lower, upper = iv.lower, iv.upper
                if symbolic:
                    eqs.append(_lower_upper(syms[j]))
                    sym_lower, sym_upper = concretize_pair(*eqs[-1], aset)
                    lower, upper = torch.maximum(lower, sym_lower), torch.minimum(upper, sym_upper)
                pres.append(PreActivationBounds(lower, upper))
            if tighter is not None and i in tighter:
                pres = [p.intersect(t) for p, t in zip(pres, tighter[i])]
            result.pre[i] = pres
            if i == last_activation:
                break
            boxes = [(p.lower, p.upper) for p in pres]
            intervals[i] = Interval.from_bounds(*rule.interval(boxes))
            if symbolic:
                syms[i] = _relaxed_forward(rule.relax(boxes), eqs)
            continue
        if frame.is_activation(i):
            lower, upper = ins[0].lower, ins[0].upper
            if symbolic:
                sym = syms[node.inputs[0]]
                relaxation = getattr(rule, "fused_relaxation", None)
                if kernels is not None and relaxation is not None and sym.radius is not None and i != last_activation:
                    result.pre[i], syms[i] = fused_step(kernels, relaxation, sym, ins[0],
                                                        None if tighter is None else tighter.get(i), box,
                                                        _InOrder.of(sym.centre.coef))
                    intervals[i] = Interval.from_bounds(*rule.interval(result.pre[i].lower, result.pre[i].upper))
                    continue
                ext = _native_kernels(sym)  # outside autograd on the CPU: hand-written kernels
                if ext is not None and uses_relu_relaxation(rule) and i != last_activation:
                    result.pre[i], syms[i], intervals[i] = _relu_step_native(
                        ext, sym, aset, ins[0], None if tighter is None else tighter.get(i))
                    continue
                chunked = ext is not None or _in_chunks(sym)
                if chunked:  # Lo, Up never formed whole: read from the rows here and for the next rows
                    lo_eq = up_eq = None
                    sym_lower, sym_upper = _concretize_outside_autograd(sym, aset, ext)
                else:
                    lo_eq, up_eq = _lower_upper(sym)  # formed once: concretised here, relaxed below
                    sym_lower, sym_upper = concretize_pair(lo_eq, up_eq, aset)
                lower, upper = torch.maximum(lower, sym_lower), torch.minimum(upper, sym_upper)
            pre = PreActivationBounds(lower, upper)
            if tighter is not None and i in tighter:
                pre = pre.intersect(tighter[i])
            result.pre[i] = pre
            if i == last_activation:
                break
            intervals[i] = Interval.from_bounds(*rule.interval(pre.lower, pre.upper))
            if symbolic:
                relax, nonneg = rule.relax(pre.lower, pre.upper), getattr(rule, "nonneg_slopes", False)
                if chunked and nonneg:
                    syms[i] = _relax_forward_outside_autograd(relax, sym, ext)
                else:
                    if lo_eq is None:
                        lo_eq, up_eq = _lower_upper(sym)
                    syms[i] = _relax_forward(relax, lo_eq, up_eq, sym.radius is None, nonneg)
            continue
        bias = frame.bias(i, ins[0].mid) if symbolic else None
        exact = getattr(rule, "interval_bounds", None)  # ops whose bounds map to bounds without mid ± rad
        if exact is not None:
            intervals[i] = Interval.from_bounds(*exact(*(iv.lower for iv in ins), *(iv.upper for iv in ins)))
        else:
            intervals[i] = Interval(rule.forward(*(iv.mid for iv in ins)), rule.abs_linear(*(iv.rad for iv in ins)))
        if symbolic:
            dense = frame.dense_after_flatten(i)
            if dense is not None and not _InOrder.of(syms[node.inputs[0]].centre.coef).identity:
                flattened[dense] = node.inputs[0]  # its rows stay unformed (read by ``dense`` alone)
            elif i in flattened:
                syms[i] = _affine_forward(_FlattenedDense(rule), bias, [syms[flattened.pop(i)]])
            else:
                syms[i] = _affine_forward(rule, bias, [syms[j] for j in node.inputs])
    return result


#: Bytes of one chunk's coefficient rows in the chunked SSIP step (``_concretize_in_chunks``,
#: ``_relax_forward_in_chunks``): about a core's L2 cache (1–2 MiB on current x86 servers), so
#: that the element-wise passes over a chunk read and write cache rather than memory.
CHUNK_BYTES = 1 << 20


def _in_chunks(sym: SymbolicBounds) -> bool:
    """Whether the SSIP step at an activation runs on batch chunks of PyTorch ops: on the CPU,
    outside autograd, with a radius, when the rows span more than two chunks (and the native
    kernels are unavailable, ``_native_kernels``).

    The step on the whole batch forms ``Lo``, ``Up``, their magnitudes and the next rows as a
    dozen full-size tensors, each a pass through memory (16 MiB apiece for 64 samples at
    DM-small's first convolution). On chunks of ``CHUNK_BYTES`` those passes stay in cache and
    memory sees the input rows read twice and the output rows written once, as with the fused
    kernels (``kernels.py``); DM-small's two steps take about 15 ms instead of 19 (its whole
    SSIP pass 5–11 % less). Each op is the whole batch's op on a slice of its samples, so the
    results are the same bit for bit (tested).
    Outside autograd only: the chunks write into slices of preallocated outputs."""
    coef = sym.centre.coef
    return (sym.radius is not None and coef.device.type == "cpu" and not torch.is_grad_enabled()
            and coef.shape[0] > 1 and coef.numel() * coef.element_size() > 2 * CHUNK_BYTES)


def _native_kernels(sym: SymbolicBounds):
    """The hand-written kernels of the step (``native.kernels()``) when they apply: on the CPU,
    outside autograd, with a radius, in float32 or float64; else None. They read each row once
    per kernel where the chunked PyTorch ops read it about seven times (``native``'s docstring
    has the measurements); the results equal those of the PyTorch ops up to the summation
    order of the ``k``-term sums."""
    coef = sym.centre.coef
    if (sym.radius is None or coef.device.type != "cpu" or torch.is_grad_enabled()
            or coef.dtype not in (torch.float32, torch.float64)):
        return None
    return native.kernels()


def _relu_step_native(ext, sym: SymbolicBounds, aset, iv: Interval, tight: PreActivationBounds | None
                      ) -> tuple[PreActivationBounds, SymbolicBounds, Interval]:
    """The whole SSIP step at a ReLU outside autograd by the native kernel ``ext.relu_step``:
    the pre-activation bounds (the rows' bounds over the box ∩ the interval ``iv`` ∩ ``tight``),
    the next centre and radius equations, and the ReLU's output interval, each row read once
    while its sample is in cache. The same values as the PyTorch ops (``_concretize_outside_autograd``,
    ``relu_relaxation``, ``_relax_forward_outside_autograd``, ``ReluRule.interval``) up to the
    order of the ``k``-term sums (tested)."""
    order = _InOrder.of(sym.centre.coef)
    const = sym.centre.const
    shape = order.node(const).shape

    def flat(t: Tensor) -> Tensor:
        return order.flat_node(t.expand_as(const)).contiguous()

    c, r = order.flat_rows(sym.centre.coef).contiguous(), order.flat_rows(sym.radius.coef).contiguous()
    mid, rad = (t.contiguous() for t in box_mid_rad(aset))
    by_mid_rad = iv.bounds is None  # the interval as it is held: no conversion before the kernel
    ivs = (flat(iv.mid), flat(iv.rad)) if by_mid_rad else (flat(iv.bounds[0]), flat(iv.bounds[1]))
    bounds = (flat(tight.lower), flat(tight.upper)) if tight is not None else (None, None)
    out = ext.relu_step(c, r, flat(const), flat(sym.radius.const), mid, rad, *ivs, by_mid_rad, *bounds)
    lower, upper, centre, radius = out[:4]
    node = [order.unflat_node(t, shape) for t in (lower, upper, *out[4:6], *out[6:])]
    return (PreActivationBounds(node[0], node[1]),
            SymbolicBounds(Equation(order.unflat_rows(centre, shape), node[2]),
                           Equation(order.unflat_rows(radius, shape), node[3])),
            Interval(node[6], node[7], (node[4], node[5])))


def _concretize_outside_autograd(sym: SymbolicBounds, aset, ext) -> tuple[Tensor, Tensor]:
    """``concretize_pair(*_lower_upper(sym), aset)`` outside autograd, without forming ``Lo`` and
    ``Up`` whole: by the native kernel ``ext.bounds_of_rows``, or (``ext`` None) chunk by chunk
    (see ``_in_chunks``), each chunk's ``Lo`` and ``Up`` rows and their magnitudes formed in two
    scratch buffers and concretised by ``_bound_of_rows``, as ``_Concretize.forward`` does."""
    order = _InOrder.of(sym.centre.coef)
    shape = order.node(sym.centre.const).shape
    c, r = order.flat_rows(sym.centre.coef), order.flat_rows(sym.radius.coef)  # [B, k, N], memory order
    lo_const = order.flat_node(sym.centre.const - sym.radius.const)  # as _lower_upper, then concretize_pair
    up_const = order.flat_node(sym.centre.const + sym.radius.const)
    mid, rad = box_mid_rad(aset)  # [B, k]
    if ext is not None:
        lower, upper = ext.bounds_of_rows(c.contiguous(), r.contiguous(), lo_const.contiguous(),
                                          up_const.contiguous(), mid.contiguous(), rad.contiguous())
        return order.unflat_node(lower, shape), order.unflat_node(upper, shape)
    mid, rad = mid.unsqueeze(1), rad.unsqueeze(1)  # [B, 1, k]
    chunks = chunk_slices(c, CHUNK_BYTES)
    rows, mag = chunk_scratch(c, 2, chunks)
    lower, upper = torch.empty_like(lo_const), torch.empty_like(up_const)
    for part in chunks:
        n = part.stop - part.start
        lo = torch.sub(c[part], r[part], out=rows[:n])
        _bound_of_rows(lo_const[part], mid[part], rad[part], lo, torch.abs(lo, out=mag[:n]), -1.0,
                       out=lower[part].unsqueeze(1))
        up = torch.add(c[part], r[part], out=rows[:n])
        _bound_of_rows(up_const[part], mid[part], rad[part], up, torch.abs(up, out=mag[:n]), 1.0,
                       out=upper[part].unsqueeze(1))
    return order.unflat_node(lower, shape), order.unflat_node(upper, shape)


def _relax_forward_outside_autograd(relax: Relaxation, sym: SymbolicBounds, ext) -> SymbolicBounds:
    """``_relax_forward(relax, *_lower_upper(sym), False, True)`` (non-negative slopes, a radius)
    outside autograd: the constants as there, on the whole batch; the next rows by the native
    kernel ``ext.half_sums``, or (``ext`` None) chunk by chunk (see ``_in_chunks``), each chunk's
    ``Lo`` and ``Up`` rows formed in scratch buffers and its next rows written straight into the
    outputs by ``_half_sums``, as ``_HalfSums.forward`` computes them."""
    order = _InOrder.of(sym.centre.coef)
    shape = order.node(sym.centre.const).shape
    c, r = order.flat_rows(sym.centre.coef), order.flat_rows(sym.radius.coef)
    lo_const, up_const = sym.centre.const - sym.radius.const, sym.centre.const + sym.radius.const
    if not order.identity:  # the constants on the same views as _relax_forward's
        relax, lo_const, up_const = order.relaxation(relax), order.node(lo_const), order.node(up_const)
    lo_s, up_s = relax.lower_slope * 0.5, relax.upper_slope * 0.5
    mid_b, rad_b = (relax.upper_bias + relax.lower_bias) * 0.5, (relax.upper_bias - relax.lower_bias) * 0.5
    centre_const, radius_const = _half_sum_consts(lo_s, up_s, mid_b, rad_b, lo_const, up_const)
    # [B, N], neurons in memory order (expanded first: a rule may return broadcastable slopes)
    hl, hu = (t.expand(shape).reshape(shape[0], -1) for t in (lo_s, up_s))
    if ext is not None:
        centre, radius = ext.half_sums(c.contiguous(), r.contiguous(), hl.contiguous(), hu.contiguous())
    else:
        hl, hu = hl.unsqueeze(1), hu.unsqueeze(1)  # [B, 1, N]
        chunks = chunk_slices(c, CHUNK_BYTES)
        lo_rows, up_rows = chunk_scratch(c, 2, chunks)
        centre, radius = torch.empty_like(c), torch.empty_like(r)
        for part in chunks:
            n = part.stop - part.start
            lo, up = torch.sub(c[part], r[part], out=lo_rows[:n]), torch.add(c[part], r[part], out=up_rows[:n])
            _half_sums(lo, up, hl[part], hu[part], centre[part], radius[part])
    if not order.identity:
        centre_const, radius_const = order.back_node(centre_const), order.back_node(radius_const)
    return SymbolicBounds(Equation(order.unflat_rows(centre, shape), centre_const),
                          Equation(order.unflat_rows(radius, shape), radius_const))


class _FlattenedDense:
    """A dense layer (``LinearRule``) applied to the un-flattened input of the flatten before it,
    ``x [N, C, H, W]`` in any memory layout: ``x`` flattened in its memory order (a view,
    ``_InOrder.flat_node``) times the weight's columns permuted to that order (a copy of the
    ``[out, C·H·W]`` weight). Flattening channels-last rows in ``C, H, W`` order copies every
    row (12 ms of DM-small's pass); the weight is 1/(B·k) of their size."""

    def __init__(self, dense):
        self.dense = dense
        self._weights: dict[tuple, Tensor] = {}

    def _weight(self, x: Tensor, magnitude: bool) -> tuple[Tensor, Tensor]:
        order = _InOrder.of(x, rows=False)
        key = (tuple(order.order), magnitude)
        if key not in self._weights:
            w = self.dense.call.module.weight
            w = w.abs() if magnitude else w
            self._weights[key] = order.flat_node(w.reshape(w.shape[0], *x.shape[1:]))
        return order.flat_node(x), self._weights[key]

    def forward(self, x: Tensor) -> Tensor:
        flat, w = self._weight(x, False)
        return torch.nn.functional.linear(flat, w, self.dense.call.module.bias)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return torch.nn.functional.linear(*self._weight(x, False))

    def abs_linear(self, rad: Tensor) -> Tensor:
        return torch.nn.functional.linear(*self._weight(rad, True))


def _clip_layer_in_one_step(frame: Frame, image: SymbolicBounds, last_activation: int) -> bool:
    """Whether the SSIP pass may run the clipping layer as one step (``_clip_layer_forward``):
    there is one, its input (the image) is exact, the pass goes past it, and no tail
    back-substitution reads its inner nodes (it would, were the layer's output to reach the
    network's output through affine nodes alone; ``_clip_layer_forward`` leaves them empty)."""
    end = frame.clip_end
    return (end > 0 and image.radius is None and last_activation > end
            and not frame.affine_path_to_output(end))


def _clip_layer_forward(frame: Frame, aset, result: ForwardResult,
                        tighter: dict[int, PreActivationBounds] | None) -> int:
    """The clipping layer's nodes ``1..e`` (``e = frame.clip_end``) of an SSIP pass in one step;
    returns ``e + 1``, the next node to process.

    Every node of the layer is element-wise with non-negative slopes (ReLUs and ``±x + t``) and
    its input is the exact image ``x = W a + c``, so each node's lower and upper equations are
    per-neuron affine functions of its own pixel: ``Lo_i = λ_i·x + lo_i``, ``Up_i = υ_i·x + up_i``
    (``[B, N]`` scalars: a scale ``s < 0`` swaps them, ``λ' = s·υ``; a relaxation ``(s_l, b_l,
    s_u, b_u)`` maps ``λ' = s_l·λ``, ``lo' = s_l·lo + b_l`` and ``υ``, ``up`` alike). A pixel's
    range over the box is the image node's interval ``[mid − rad, mid + rad]`` (the pass has it),
    so ``min Lo_i = λ_i·mid − |λ_i|·rad + lo_i``: the bounds of the node-by-node pass, whose
    concretisation of ``λ_i·W`` sums the same products in another order. Only the output's rows
    ``((υ ± λ)/2)·W`` are formed: two full-size passes where node by node the layer takes about
    fifteen (two concretisations, the relaxed rows, two negations). Only the output node's
    ``symbolic`` entry is set (``_clip_layer_in_one_step`` checks that no other is read)."""
    end = frame.clip_end
    intervals, syms = result.intervals, result.symbolic
    image = syms[0].centre
    order = _InOrder.of(image.coef)
    shape = order.node(image.const).shape

    flat = order.flat_node

    def node(t: Tensor) -> Tensor:
        return order.unflat_node(t, shape)

    pixel_mid, pixel_rad = flat(intervals[0].mid), flat(intervals[0].rad)
    ext = _native_clip_kernels(frame, pixel_mid)
    if ext is not None:
        return _clip_layer_native(ext, frame, result, tighter, order, shape, pixel_mid, pixel_rad)
    lam = ups = torch.ones_like(pixel_mid)
    lo = up = torch.zeros_like(pixel_mid)
    for i in range(1, end + 1):
        rule, iv = frame.rule(i), intervals[i - 1]
        if frame.is_activation(i):
            sym_lower = torch.addcmul(lo, lam, pixel_mid).sub_(lam.abs().mul_(pixel_rad))
            sym_upper = torch.addcmul(up, ups, pixel_mid).add_(ups.abs().mul_(pixel_rad))
            pre = PreActivationBounds(torch.maximum(iv.lower, node(sym_lower)), torch.minimum(iv.upper, node(sym_upper)))
            if tighter is not None and i in tighter:
                pre = pre.intersect(tighter[i])
            result.pre[i] = pre
            if rule.identity_on(pre.lower, pre.upper):  # e.g. the clip's first ReLU on non-negative pixels
                intervals[i] = Interval.from_bounds(pre.lower, pre.upper)
                continue
            intervals[i] = Interval.from_bounds(*rule.interval(pre.lower, pre.upper))
            r = rule.relax(pre.lower, pre.upper)
            s_lo, s_up = flat(r.lower_slope), flat(r.upper_slope)
            lam, lo = s_lo * lam, torch.addcmul(flat(r.lower_bias), s_lo, lo)
            ups, up = s_up * ups, torch.addcmul(flat(r.upper_bias), s_up, up)
        else:  # the layer's affine parts ``scale·x + shift`` (python scalars)
            intervals[i] = Interval.from_bounds(*rule.interval_bounds(iv.lower, iv.upper))
            scale, shift = rule.scale, rule.shift
            if scale < 0:
                lam, ups, lo, up = ups, lam, up, lo
            lam, ups, lo, up = lam * scale, ups * scale, lo * scale + shift, up * scale + shift
    # Lo = λ·(W a + c) + lo: rows λ·W, constant λ·c + lo (and Up alike), in centre–radius form
    w, c = order.flat_rows(image.coef), flat(image.const)
    half_sum, half_diff = (ups + lam) * 0.5, (ups - lam) * 0.5

    def rows(scale: Tensor) -> Tensor:
        return order.unflat_rows(scale.unsqueeze(1) * w, shape)

    centre_const = node(torch.addcmul((up + lo) * 0.5, half_sum, c))
    if torch.equal(lam, ups) and torch.equal(lo, up):  # Lo = Up: the output is exact
        centre = image.coef if torch.equal(half_sum, torch.ones_like(half_sum)) else rows(half_sum)
        syms[end] = SymbolicBounds(Equation(centre, centre_const), None)
    else:
        radius_const = node(torch.addcmul((up - lo) * 0.5, half_diff, c))
        syms[end] = SymbolicBounds(Equation(rows(half_sum), centre_const), Equation(rows(half_diff), radius_const))
    return end + 1


def _native_clip_kernels(frame: Frame, pixels: Tensor):
    """The native kernels for the clipping layer (``native.kernels()``) when they apply: outside
    autograd, on the CPU, float32 or float64, and every node of the layer an affine part
    (``scale``, ``shift``) or a node that relaxes as a ReLU; else None."""
    if torch.is_grad_enabled() or pixels.device.type != "cpu" or pixels.dtype not in (torch.float32, torch.float64):
        return None
    for i in range(1, frame.clip_end + 1):
        rule = frame.rule(i)
        if not (uses_relu_relaxation(rule) if frame.is_activation(i) else hasattr(rule, "scale")):
            return None
    return native.kernels()


def _clip_layer_native(ext, frame: Frame, result: ForwardResult, tighter: dict[int, PreActivationBounds] | None,
                       order: _InOrder, shape, pixel_mid: Tensor, pixel_rad: Tensor) -> int:
    """``_clip_layer_forward``'s loop and output rows by the native kernels ``ext.clip_layer``
    (every node per pixel in one pass) and ``ext.scaled_rows`` (the image's rows read once for
    both output rows): the same operations per pixel, so the same values up to the sign of a
    zero and the contraction of a product and a sum into one rounding (tested)."""
    end = frame.clip_end
    intervals, syms = result.intervals, result.symbolic
    image = syms[0].centre
    empty = pixel_mid.new_empty(0)
    relu = [frame.is_activation(i) for i in range(1, end + 1)]
    rules = [frame.rule(i) for i in range(1, end + 1)]
    scales = [0.0 if is_relu else float(rule.scale) for is_relu, rule in zip(relu, rules)]
    shifts = [0.0 if is_relu else float(rule.shift) for is_relu, rule in zip(relu, rules)]
    tight = [tighter[i] if tighter is not None and i in tighter and relu[i - 1] else None for i in range(1, end + 1)]

    def flat(t: Tensor) -> Tensor:
        return order.flat_node(t.expand_as(image.const)).contiguous()

    t_lo = [empty if t is None else flat(t.lower) for t in tight]
    t_up = [empty if t is None else flat(t.upper) for t in tight]
    out = ext.clip_layer(pixel_mid.contiguous(), pixel_rad.contiguous(), order.flat_node(image.const).contiguous(),
                         relu, scales, shifts, t_lo, t_up)

    def node(t: Tensor) -> Tensor:
        return order.unflat_node(t, shape)

    at = 2 * end
    for i in range(1, end + 1):
        intervals[i] = Interval.from_bounds(node(out[2 * i - 2]), node(out[2 * i - 1]))
        if relu[i - 1]:
            result.pre[i] = PreActivationBounds(node(out[at]), node(out[at + 1]))
            at += 2
    lam, ups, lo, up, half_sum, half_diff, centre_const, radius_const = out[at:]
    centre_const = node(centre_const)
    if torch.equal(lam, ups) and torch.equal(lo, up):  # Lo = Up: the output is exact
        centre = (image.coef if torch.equal(half_sum, torch.ones_like(half_sum))
                  else order.unflat_rows(ext.scaled_rows(order.flat_rows(image.coef).contiguous(), half_sum,
                                                         half_sum)[0], shape))
        syms[end] = SymbolicBounds(Equation(centre, centre_const), None)
    else:
        centre, radius = ext.scaled_rows(order.flat_rows(image.coef).contiguous(), half_sum, half_diff)
        syms[end] = SymbolicBounds(Equation(order.unflat_rows(centre, shape), centre_const),
                                   Equation(order.unflat_rows(radius, shape), node(radius_const)))
    return end + 1


def uses_channels_last(frame: Frame, aset) -> bool:
    """Whether ``frame``'s passes over ``aset`` lay image-shaped tensors out channels-last."""
    return _layout(frame, aset) is channels_last


def _layout(frame: Frame, aset) -> Callable[..., Tensor]:
    """How the pass lays out image-shaped tensors: channels-last (``channels_last``) on the CPU
    when most 2-D convolutions read enough channels (``Frame.prefers_channels_last``), where
    oneDNN's convolutions and their backward run 25–40 % faster on it; as given otherwise
    (CUDA keeps NCHW). Element-wise ops follow their operands' layout; the steps at each
    activation run on views in memory order (``_InOrder``) and every flattening of neurons
    follows memory order (``memory_order``), so no step copies a full-size tensor to change
    layout. Values do not depend on it, only summation orders inside ops."""
    if aset.lower.device.type == "cpu" and len(aset.image_shape) == 3 and frame.prefers_channels_last:
        return channels_last
    return lambda t, lead=1: t


def _relaxed_forward(bounds, eqs: list[tuple[Equation, Equation]]) -> SymbolicBounds:
    """SSIP through a ``RelaxedRule`` node: ``Lo' = A_lo⁺ Lo + A_lo⁻ Up + b_lo`` and
    ``Up' = A_up⁺ Up + A_up⁻ Lo + b_up`` on the coefficient rows and the constants, returned
    in centre–radius form."""
    coef_ins = [(lo.coef, up.coef) for lo, up in eqs]
    const_ins = [(lo.const.unsqueeze(1), up.const.unsqueeze(1)) for lo, up in eqs]
    lower = Equation(bounds.lower(coef_ins), bounds.lower(const_ins).squeeze(1) + bounds.lower_bias)
    upper = Equation(bounds.upper(coef_ins), bounds.upper(const_ins).squeeze(1) + bounds.upper_bias)
    return SymbolicBounds(Equation((upper.coef + lower.coef) * 0.5, (upper.const + lower.const) * 0.5),
                          Equation((upper.coef - lower.coef) * 0.5, (upper.const - lower.const) * 0.5))


def _affine_forward(rule, bias: Tensor | None, ins: list[SymbolicBounds]) -> SymbolicBounds:
    """SSIP through an affine op: centre' = L(centre coefficients), f(centre constant);
    radius' = |L|(radius) (coefficients and constant); the coefficient axis is folded into
    the batch axis."""
    b, k = ins[0].centre.coef.shape[:2]

    def fold(t: Tensor) -> Tensor:
        if t.dim() > 3 and t.shape[2] == 1:  # keeps a one-channel tensor's layout (``channels_last``)
            return t.movedim(2, -1).reshape(b * k, *t.shape[3:], 1).movedim(-1, 1)
        return t.reshape(b * k, *t.shape[2:])

    def unfold(t: Tensor) -> Tensor:
        return t.reshape(b, k, *t.shape[1:])

    coefs = [fold(s.centre.coef) for s in ins]
    # L on the coefficient rows (e.g. the conv without its bias), f = L + b on the constant.
    coef = rule.forward(*coefs) if bias is None else rule.linear(*coefs, bias=bias)
    centre = Equation(unfold(coef), rule.forward(*(s.centre.const for s in ins)))
    if all(s.radius is None for s in ins):
        return SymbolicBounds(centre, None)
    rad_coefs = [fold(s.radius.coef) if s.radius is not None else torch.zeros_like(c) for s, c in zip(ins, coefs)]
    rad_consts = [s.radius.const if s.radius is not None else torch.zeros_like(s.centre.const) for s in ins]
    radius = Equation(unfold(rule.abs_linear(*rad_coefs)), rule.abs_linear(*rad_consts))
    return SymbolicBounds(centre, radius)


def _relax_forward(relax: Relaxation, lo_eq: Equation, up_eq: Equation, exact_input: bool,
                   nonneg_slopes: bool) -> SymbolicBounds:
    """SSIP through an activation: Lo' = s_lo·Lo + b_lo, Up' = s_up·Up + b_up (slopes >= 0;
    negative slopes swap the roles of Lo and Up), returned in centre–radius form.
    The biases go to the (small) constant terms.

    Cost (the hot step of SSIP): three full-size ops when slopes are non-negative
    (``h = s_up/2·Up``, ``centre' = h + s_lo/2·Lo``, ``radius' = h − s_lo/2·Lo``), two while the
    input is exact (Lo = Up), one or none when every neuron is stable (exact relaxation).
    """
    ordered = _InOrder.of(lo_eq.coef)
    if not ordered.identity:  # channels-last: compute on views in memory order, see _InOrder
        lo, up = ordered.equation(lo_eq), None if up_eq is lo_eq else ordered.equation(up_eq)
        out = _relax_forward(ordered.relaxation(relax), lo, lo if up is None else up, exact_input, nonneg_slopes)
        return SymbolicBounds(ordered.back(out.centre), None if out.radius is None else ordered.back(out.radius))
    if exact_input and _is_exact(relax):
        if _is_identity(relax):
            return SymbolicBounds(lo_eq, None)
        return SymbolicBounds(_scale(relax.lower_slope, lo_eq, relax.lower_bias), None)
    # halves folded into the slopes: centre' = (Up' + Lo')/2, radius' = (Up' - Lo')/2
    lo_s, up_s = relax.lower_slope * 0.5, relax.upper_slope * 0.5
    mid_b, rad_b = (relax.upper_bias + relax.lower_bias) * 0.5, (relax.upper_bias - relax.lower_bias) * 0.5
    if nonneg_slopes and lo_eq is up_eq:
        return SymbolicBounds(_scale(up_s + lo_s, lo_eq, mid_b), _scale(up_s - lo_s, lo_eq, rad_b))
    if nonneg_slopes:
        centre, radius = _HalfSums.apply(lo_eq.coef, up_eq.coef, lo_s.unsqueeze(1), up_s.unsqueeze(1))
        centre_const, radius_const = _half_sum_consts(lo_s, up_s, mid_b, rad_b, lo_eq.const, up_eq.const)
        return SymbolicBounds(Equation(centre, centre_const), Equation(radius, radius_const))
    half_lo = _scale(lo_s.clamp(min=0), lo_eq) + _scale(lo_s.clamp(max=0), up_eq)
    half_up = _scale(up_s.clamp(min=0), up_eq) + _scale(up_s.clamp(max=0), lo_eq)
    centre, radius = half_up + half_lo, half_up - half_lo
    return SymbolicBounds(Equation(centre.coef, centre.const + mid_b), Equation(radius.coef, radius.const + rad_b))


def _half_sums(lo: Tensor, up: Tensor, hl: Tensor, hu: Tensor, centre: Tensor | None = None,
               radius: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(hu·up + hl·lo, hu·up − hl·lo)`` in three full-size passes (into ``centre``/``radius`` when
    given): the next centre and radius rows after an activation with non-negative slopes."""
    half_up = torch.mul(up, hu, out=radius)
    return torch.addcmul(half_up, hl, lo, out=centre), half_up.addcmul_(hl, lo, value=-1.0)


def _half_sum_consts(lo_s: Tensor, up_s: Tensor, mid_b: Tensor, rad_b: Tensor, lo_const: Tensor,
                     up_const: Tensor) -> tuple[Tensor, Tensor]:
    """The constants that go with ``_half_sums``: ``(hu·up + hl·lo + mid_b, hu·up − hl·lo + rad_b)``."""
    half_up = up_s * up_const
    return (torch.addcmul(half_up, lo_s, lo_const) + mid_b,
            torch.addcmul(half_up, lo_s, lo_const, value=-1.0) + rad_b)


class _HalfSums(torch.autograd.Function):
    """``(lo, up, hl, hu) -> (hu·up + hl·lo, hu·up − hl·lo)``: the coefficient rows of SSIP's
    centre and radius after an activation with non-negative slopes (``hl``, ``hu``: half the
    slopes, ``[B, 1, *shape]``; ``lo``, ``up`` ``[B, k, *shape]``).

    Hand-written backward: autograd of the three ops replays two multiplies per ``addcmul``
    operand, a sum for each broadcast slope on its own temporary and two accumulations, each a
    full-size pass; here ``s = g_c + g_r`` and ``d = g_c − g_r`` are formed once and give both
    the rows' gradients (``hu·s``, ``hl·d``) and, multiplied in place, the slopes' (``Σ_k s·up``,
    ``Σ_k d·lo``): six full-size passes instead of about ten.
    """

    @staticmethod
    def forward(ctx, lo, up, hl, hu):
        ctx.save_for_backward(lo, up, hl, hu)
        return _half_sums(lo, up, hl, hu)

    @staticmethod
    def backward(ctx, g_centre, g_radius):
        lo, up, hl, hu = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = g_centre + g_radius  # d/d(hu·up)
        d = g_centre - g_radius  # d/d(hl·lo)
        g_lo = d * hl if need[0] else None
        g_up = s * hu if need[1] else None
        g_hl = d.mul_(lo).sum(1, keepdim=True) if need[2] else None
        g_hu = s.mul_(up).sum(1, keepdim=True) if need[3] else None
        return g_lo, g_up, g_hl, g_hu


class _LowerUpper(torch.autograd.Function):
    """``(c, r) -> (c − r, c + r)``, the rows of ``Lo`` and ``Up`` from centre–radius form, with the
    backward ``g_c = g_lo + g_up``, ``g_r = g_up − g_lo``: two passes where autograd of ``c − r`` and
    ``c + r`` takes three (a negation, then two accumulations)."""

    @staticmethod
    def forward(ctx, c, r):
        return c - r, c + r

    @staticmethod
    def backward(ctx, g_lo, g_up):
        return g_lo + g_up, g_up - g_lo


def _lower_upper(sym: SymbolicBounds) -> tuple[Equation, Equation]:
    """``(Lo, Up) = (centre − radius, centre + radius)`` of forward symbolic bounds (one object when
    the radius is zero), the rows through ``_LowerUpper``. Every pass forms them here, once per
    node: both are needed together (concretised, then relaxed)."""
    if sym.radius is None:
        return sym.centre, sym.centre
    lo, up = _LowerUpper.apply(sym.centre.coef, sym.radius.coef)
    return (Equation(lo, sym.centre.const - sym.radius.const),
            Equation(up, sym.centre.const + sym.radius.const))


def _scale(slope: Tensor, eq: Equation, bias: Tensor | None = None) -> Equation:
    """``slope·eq (+ bias)`` elementwise per neuron; ``slope``, ``bias`` ``[B, *shape]``."""
    const = slope * eq.const
    return Equation(slope.unsqueeze(1) * eq.coef, const if bias is None else const + bias)


def _is_exact(relax: Relaxation) -> bool:
    """Every neuron's lower and upper relaxations coincide (all stable). One host sync."""
    return torch.equal(relax.lower_slope, relax.upper_slope) and torch.equal(relax.lower_bias, relax.upper_bias)


def _is_identity(relax: Relaxation) -> bool:
    """An exact relaxation (``_is_exact``, which every caller checks first: the upper line is the
    lower one) that is ``x <= σ(x) <= x`` everywhere (e.g. the clip's first ReLU on non-negative
    pixels), so Λ and equations pass through unchanged. One host sync."""
    return (torch.equal(relax.lower_slope, torch.ones_like(relax.lower_slope))
            and torch.equal(relax.lower_bias, torch.zeros_like(relax.lower_bias)))


Frontier = Callable[[int, Tensor], tuple[Tensor | None, Tensor]]


def interval_frontier(fwd: ForwardResult) -> Frontier:
    """Concretise ``Λ·x`` at a node with its interval: ``Λ·mid − |Λ|·rad``."""
    def value(i: int, lam: Tensor) -> tuple[None, Tensor]:
        iv = fwd.intervals[i]
        return None, row_dot(lam, iv.mid) - row_dot(lam.abs(), iv.rad)

    return value


def symbolic_frontier(fwd: ForwardResult) -> Frontier:
    """``Λ·x >= Λ·centre(a) − |Λ|·radius(a)``: an equation in ``a`` (``[B, S, k]``, ``[B, S]``)."""
    def value(i: int, lam: Tensor) -> tuple[Tensor, Tensor]:
        sym = fwd.symbolic[i]
        order = _InOrder.of(lam)  # every tensor flattened in Λ's memory order (see row_dot)

        rows = order.flat_rows  # [B, R, *shape] -> [B, R, n]

        coef = torch.einsum("bsn,bkn->bsk", rows(lam), rows(sym.centre.coef))
        const = row_dot(lam, sym.centre.const)
        if sym.radius is not None:
            mag = lam.abs()
            coef = coef - torch.einsum("bsn,bkn->bsk", rows(mag), rows(sym.radius.coef))
            const = const - row_dot(mag, sym.radius.const)
        return coef, const

    return value


def back_substitute(frame: Frame, aset, start: int, lam: Tensor,
                    relax: dict[int, Relaxation] | None = None,
                    frontier: Frontier | None = None, both_signs: bool = False) -> Tensor:
    """Sound lower bounds ``[B, S]`` of ``Λ·x_start`` over the box, ``lam [B, S, *shape_start]``.

    Λ is accumulated per node in reverse topological order (DAGs: a node feeding two ops
    receives the sum). At an activation node, ``frontier`` (when given) concretises;
    otherwise the node's ``relax`` relaxation back-substitutes (lower relaxation for Λ >= 0,
    upper for Λ < 0).

    ``both_signs``: bound ``[Λ; −Λ]`` (``[B, 2S]``: lower bounds, then negated upper bounds).
    Up to the first non-linear node everything is linear in Λ, so that stretch runs once and
    is negated there (exactly: negation commutes with rounding) before the two diverge.
    """
    b, s = lam.shape[:2]
    split = both_signs
    layout = _layout(frame, aset)
    # which relaxations are exact (all neurons stable) or the identity: their step is cheaper
    exact = {} if frontier is not None else {i: _relaxation_kind(r) for i, r in relax.items()
                                             if i <= start and isinstance(r, Relaxation)}
    acc: dict[int, Tensor] = {start: lam}
    const = lam.new_zeros((b, s))
    coef: Tensor | None = None
    for i in range(start, -1, -1):
        if split and i in acc and (i == 0 or frame.is_nonlinear(i)):
            acc = {j: torch.cat([t, -t], 1) for j, t in acc.items()}
            const, s, split = torch.cat([const, -const], 1), 2 * s, False
        lam_i = acc.pop(i, None)
        if lam_i is None:
            continue
        if lam_i.dim() == 5:  # image-shaped Λ [B, S, C, H, W] in the pass's layout (a no-op when it is)
            lam_i = layout(lam_i, 2)
        if i == 0:
            c, offset = aset.transpose(lam_i)
            coef = c if coef is None else coef + c
            const = const + offset
            continue
        node = frame.nodes[i]
        if frame.is_relaxed(i) and frontier is None:
            lams, offset = relax[i].backward(lam_i)
            const = const + offset
            for j, t in zip(node.inputs, lams):
                _accumulate(acc, j, t)
            continue
        if frame.is_nonlinear(i):
            if frontier is not None:
                c, offset = frontier(i, lam_i)
                if c is not None:
                    coef = c if coef is None else coef + c
                const = const + offset
                continue
            lam_in, offset = _relax_backward(relax[i], lam_i, exact.get(i))
            if offset is not None:
                const = const + offset
            _accumulate(acc, node.inputs[0], lam_in)
            continue
        rule = frame.rule(i)
        bias = frame.bias(i, lam_i)
        if bias is not None:
            order = _InOrder.of(lam_i)  # bias [1, *shape]: one matrix–vector product
            const = const + torch.matmul(order.rows(lam_i).flatten(2), order.node(bias).flatten())
        parents = rule.transpose(lam_i.reshape(b * s, *lam_i.shape[2:]))
        for j, t in zip(node.inputs, parents):
            _accumulate(acc, j, t.reshape(b, s, *frame.shapes[j]))
    if coef is None:
        return const
    return aset.concretize(coef, const)


def neuron_bounds(frame: Frame, aset, p: int, relax: dict[int, Relaxation], box: PreActivationBounds,
                  mask: Tensor | None, chunk_elements: int,
                  after_chunk: Callable[[], None] | None = None) -> PreActivationBounds:
    """``box`` tightened by back-substitution from node ``p`` (its relaxations ``relax`` of the
    non-linear nodes before it) at the neurons ``mask [B, n]`` (None: all), ∩ ``box``.

    Each sample's selected neurons are listed first (padded to the batch's largest count with
    a dummy index ``n`` whose results are dropped), and Λ = ``[+e_j; −e_j]`` for them runs in one
    backward pass per chunk, so lower and upper bounds share it (and its affine stretch down to
    the first non-linear node, ``back_substitute(both_signs=True)``); a chunk holds at most
    ``chunk_elements`` Λ entries at the widest node of the network; ``after_chunk`` (if given)
    runs after each (full CROWN hands back fragmented heap there).
    """
    b, shape = aset.batch_size, frame.shapes[p]
    n = box.lower[0].numel()
    lower, upper = box.lower.reshape(b, n), box.upper.reshape(b, n)
    if mask is None:
        idx = torch.arange(n, device=lower.device).expand(b, n)
    else:
        count = mask.sum(1)
        width = int(count.max())
        if width == 0:
            return box
        # selected neurons first (a stable sort keeps their order), then the dummy index n
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
        slot = torch.arange(width, device=lower.device).unsqueeze(0)
        idx = torch.where(slot < count.unsqueeze(1), order, n)
    width = idx.shape[1]
    widest = max(math.prod(s) for s in frame.shapes)
    step = max(1, chunk_elements // (2 * b * widest))
    lows, ups = [], []
    for s in range(0, width, step):
        cols = idx[:, s:s + step]
        m = cols.shape[1]
        eye = lower.new_zeros((b, m, n + 1)).scatter_(2, cols.unsqueeze(-1), 1.0)[..., :n]
        both = back_substitute(frame, aset, p, eye.reshape(b, m, *shape), relax, both_signs=True)
        lows.append(both[:, :m])
        ups.append(-both[:, m:])
        del eye, both
        if after_chunk is not None:
            after_chunk()
    pad = lower.new_zeros((b, 1))
    lower_p, upper_p = torch.cat([lower, pad], 1), torch.cat([upper, pad], 1)
    tight_lo = torch.maximum(torch.cat(lows, 1), lower_p.gather(1, idx))
    tight_up = torch.minimum(torch.cat(ups, 1), upper_p.gather(1, idx))
    new_lo = lower_p.scatter(1, idx, tight_lo)[:, :n]
    new_up = upper_p.scatter(1, idx, tight_up)[:, :n]
    # in the box's layout (channels-last or not), so the relaxations built on them match Λ's
    return PreActivationBounds(torch.empty_like(box.lower).copy_(new_lo.reshape(b, *shape)),
                               torch.empty_like(box.upper).copy_(new_up.reshape(b, *shape)))


def _accumulate(acc: dict[int, Tensor], j: int, t: Tensor) -> None:
    acc[j] = t if j not in acc else acc[j] + t


def _relaxation_kind(relax: Relaxation) -> str:
    """"identity", "exact" (lower = upper relaxation everywhere) or "general"."""
    if not _is_exact(relax):
        return "general"
    return "identity" if _is_identity(relax) else "exact"


def _relax_backward(r: Relaxation, lam: Tensor, kind: str | None) -> tuple[Tensor, Tensor | None]:
    """Λ through an activation, ``lam [B, S, *shape]``: Λ >= 0 takes the lower relaxation,
    Λ < 0 the upper one. Returns Λ at the activation's input and the constant ``[B, S]``.

    Written as ``Λ·s_up + Λ⁺·(s_lo − s_up)`` (one ReLU, one multiply, one fused multiply-add
    at full size) and constants as matrix–vector products, instead of sign masks and
    ``where`` chains that autograd must store and replay. ``Λ⁺`` is ``relu``, not ``clamp``:
    the same values and gradient, but ``clamp``'s backward is a ``where``, which on the CPU
    costs about seven times as much (measured: 98 vs 13 ms on 19 M floats, one core).
    """
    if kind == "identity":
        return lam, None
    ordered = _InOrder.of(lam)
    if not ordered.identity:  # channels-last: on views in memory order (``_InOrder``)
        lam_in, offset = _relax_backward(ordered.relaxation(r), ordered.rows(lam), kind)
        return ordered.back_rows(lam_in), offset
    if kind == "exact":
        return lam * r.lower_slope.unsqueeze(1), row_dot(lam, r.lower_bias)
    return _RelaxBackward.apply(lam, r.lower_slope, r.upper_slope, r.lower_bias, r.upper_bias)


class _RelaxBackward(torch.autograd.Function):
    """The general step of ``_relax_backward`` on ``lam [B, S, *shape]`` in memory order (slopes and
    biases ``[B, *shape]``): ``Λ_in = Λ·s_up + Λ⁺·(s_lo − s_up)`` and the constant
    ``Λ·b_up + Λ⁺·(b_lo − b_up)`` (row sums, batched matrix–vector products). ``Λ⁺`` is ``relu``:
    ``clamp``'s backward would be a ``where``, which on the CPU costs about seven times as much.

    Hand-written backward: the part of Λ's gradient that passes ``relu`` (from ``Λ⁺``'s two uses) is
    formed once, masked once (``threshold_backward``, relu's own) and added to the unmasked part
    in place, and the slopes' and biases' gradients are row sums of the saved ``Λ`` and ``Λ⁺``:
    seven full-size passes where autograd of the expression takes about ten (a multiply per use,
    one sum per broadcast slope on its own temporary, two outer products and three
    accumulations).
    """

    @staticmethod
    def forward(ctx, lam, lower_slope, upper_slope, lower_bias, upper_bias):
        pos = torch.relu(lam)
        up_s = upper_slope.unsqueeze(1)
        lam_in = (lam * up_s).addcmul_(pos, lower_slope.unsqueeze(1) - up_s)
        const = row_dot(lam, upper_bias) + row_dot(pos, lower_bias - upper_bias)
        ctx.save_for_backward(lam, pos, lower_slope, upper_slope, lower_bias, upper_bias)
        return lam_in, const

    @staticmethod
    def backward(ctx, g_in, g_const):
        lam, pos, lower_slope, upper_slope, lower_bias, upper_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_c = g_const.reshape(*g_const.shape, *([1] * (lam.dim() - 2)))  # [B, S, 1, ...]
        grads = [None] * 5
        if need[0]:
            # through Λ⁺ (masked where Λ <= 0, as relu's backward), then the direct part
            through = (g_in * (lower_slope - upper_slope).unsqueeze(1)).addcmul_(
                g_c, (lower_bias - upper_bias).unsqueeze(1))
            g_lam = torch.ops.aten.threshold_backward(through, lam, 0)
            grads[0] = g_lam.addcmul_(g_in, upper_slope.unsqueeze(1)).addcmul_(g_c, upper_bias.unsqueeze(1))
        if need[1] or need[2]:
            on_pos = (g_in * pos).sum(1)  # Σ_S g·Λ⁺
            grads[1] = on_pos if need[1] else None
            grads[2] = (g_in * lam).sum(1) - on_pos if need[2] else None  # Σ_S g·(Λ − Λ⁺)
        if need[3] or need[4]:
            lam_pos = _row_combination(g_const, pos)  # Σ_S g_c·Λ⁺
            grads[3] = lam_pos if need[3] else None
            grads[4] = _row_combination(g_const, lam) - lam_pos if need[4] else None
        return tuple(grads)


def _row_combination(weights: Tensor, lam: Tensor) -> Tensor:
    """``Σ_s weights[b, s]·lam[b, s, …]`` -> ``[B, *shape]`` (one batched vector–matrix product; ``lam``
    contiguous, as in ``_RelaxBackward``)."""
    return torch.bmm(weights.unsqueeze(1), lam.flatten(2)).reshape(lam.shape[0], *lam.shape[2:])


def row_dot(lam: Tensor, v: Tensor) -> Tensor:
    """``Σ_n lam[b, s, n]·v[b, n]`` over a node's neurons, ``lam [B, S, *shape]``, ``v [B, *shape]``
    -> ``[B, S]``: one batched matrix–vector product, both flattened in Λ's memory order (a view
    of Λ in either layout; ``v`` is copied if its layout differs)."""
    order = _InOrder.of(lam)
    flat_v = order.flat_node(v.expand(lam.shape[0], *v.shape[1:]))
    return torch.bmm(order.flat_rows(lam), flat_v.unsqueeze(-1)).squeeze(-1)
