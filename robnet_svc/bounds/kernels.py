"""Fused kernels for SSIP's step at a ReLU in training: hand-written CPU loops (the CPU's
default, ``NATIVE``), eager on batch chunks (``CHUNKED``, where those cannot be built) or
compiled by ``torch.compile`` (``harden --compile``).

At an activation, SSIP's forward pass (``propagate.forward_pass``) forms ``Lo``/``Up`` from
centre–radius rows ``(C, R)`` ``[B, k, N]``, concretises them over the coefficient box, relaxes
the activation on the resulting bounds and writes the next rows. Eagerly that is about 11
full-size passes forward and 20 backward (docs/benchmarks.md, *Where the time goes*), and no
regrouping of whole-batch eager ops gets below it. Here the step is one autograd Function
whose work runs in three kernels, which ``torch.compile`` fuses into loops reading each
full-size tensor once or twice:

``forward``     (C, R, box, interval bounds) -> concretised bounds, slopes, next rows
                ``C' = (h_u + h_l)·C + (h_u − h_l)·R``, ``R' = (h_u − h_l)·C + (h_u + h_l)·R``
                (``h`` half the slopes; the same algebra as ``Lo' = s_l·Lo``, ``Up' = s_u·Up``)
``slope_grads`` (∂C', ∂R', C, R) -> ∂h_l = Σ_k (∂C' − ∂R')·Lo, ∂h_u = Σ_k (∂C' + ∂R')·Up
``row_grads``   -> ∂C, ∂R from the rows' part and the concretisation's
                (``∂lower/∂Lo = mid − rad·sign(Lo)``, as ``propagate._Concretize``)

Between the two backward kernels the per-neuron part (the relaxation on ``[B, N]`` tensors) is
differentiated by autograd on a recomputed graph. Only the inputs ``C``, ``R`` are saved at full
size, as many bytes as the eager step keeps.

On the CPU, training runs them as hand-written loops (``NATIVE``, ``training_kernels``:
``robnet_svc.bounds.native``'s ``bounds_of_rows`` and ``half_sums`` forward, ``slope_grads`` and
``row_grads`` backward, each reading the rows once per pass), or, where those cannot be built,
eagerly on batch chunks (``CHUNKED``). Each chunk of about ``CHUNK_BYTES`` of rows is bounded, relaxed
and turned into its next rows while it is in cache, and its temporaries stay there: memory sees
``C`` and ``R`` read once and ``C'``, ``R'`` written once forward, and the four row tensors read
once per backward kernel. The whole-batch eager step reads and writes full-size tensors some 30
times. On the CPU that made DM-medium's ``rsip-ssip`` training step 13–18 % faster
(docs/benchmarks.md).

The kernels compute the eager step's values in another summation order, equal up to rounding.
They serve training only: a ``Bounder`` built with ``kernels`` runs its bounds inside
``fused_activations``; certification's bounders never are, so certificates come from the
engine's own passes (``propagate``). Without the context nothing here runs.

An activation takes part when its rule has a ``fused_relaxation``: a module-level function
``(lower, upper) -> Relaxation`` equal to ``relax``, with non-negative slopes and no host
synchronisation, which the compiled forward kernel traces (the ReLU's).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from robnet_svc.bounds import native
from robnet_svc.bounds.types import Equation, Interval, PreActivationBounds, SymbolicBounds
from robnet_svc.errors import RobnetError


def _per_neuron(s_lo: Tensor, s_up: Tensor, c_const: Tensor, r_const: Tensor, iv_lo: Tensor, iv_up: Tensor,
                t_lo: Tensor, t_up: Tensor, relaxation: Callable):
    """The ``[B, N]`` part: bounds (symbolic ∩ interval ∩ tighter), half slopes, next constants."""
    lo_const, up_const = c_const - r_const, c_const + r_const
    lower = torch.maximum(torch.maximum(iv_lo, lo_const + s_lo), t_lo)
    upper = torch.minimum(torch.minimum(iv_up, up_const + s_up), t_up)
    r = relaxation(lower, upper)
    h_lo, h_up = r.lower_slope * 0.5, r.upper_slope * 0.5
    centre_const = h_up * up_const + h_lo * lo_const + (r.upper_bias + r.lower_bias) * 0.5
    radius_const = h_up * up_const - h_lo * lo_const + (r.upper_bias - r.lower_bias) * 0.5
    return lower, upper, h_lo, h_up, centre_const, radius_const


def _forward(c: Tensor, r: Tensor, c_const: Tensor, r_const: Tensor, mid: Tensor, rad: Tensor,
             iv_lo: Tensor, iv_up: Tensor, t_lo: Tensor, t_up: Tensor, relaxation: Callable):
    lo, up = c - r, c + r
    m, q = mid.unsqueeze(-1), rad.unsqueeze(-1)  # [B, k, 1]
    s_lo = (m * lo - q * lo.abs()).sum(1)
    s_up = (m * up + q * up.abs()).sum(1)
    lower, upper, h_lo, h_up, centre_const, radius_const = _per_neuron(
        s_lo, s_up, c_const, r_const, iv_lo, iv_up, t_lo, t_up, relaxation)
    a, b = (h_up + h_lo).unsqueeze(1), (h_up - h_lo).unsqueeze(1)
    return s_lo, s_up, lower, upper, h_lo, h_up, a * c + b * r, b * c + a * r, centre_const, radius_const


def _slope_grads(g_c: Tensor, g_r: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    return ((g_c - g_r) * (c - r)).sum(1), ((g_c + g_r) * (c + r)).sum(1)


def _row_grads(g_c: Tensor, g_r: Tensor, c: Tensor, r: Tensor, h_lo: Tensor, h_up: Tensor, mid: Tensor,
               rad: Tensor, g_s_lo: Tensor, g_s_up: Tensor) -> tuple[Tensor, Tensor]:
    m, q = mid.unsqueeze(-1), rad.unsqueeze(-1)
    g_lo = h_lo.unsqueeze(1) * (g_c - g_r) + g_s_lo.unsqueeze(1) * (m - q * torch.sign(c - r))
    g_up = h_up.unsqueeze(1) * (g_c + g_r) + g_s_up.unsqueeze(1) * (m + q * torch.sign(c + r))
    return g_lo + g_up, g_up - g_lo


#: Bytes of one batch chunk's rows in the chunked kernels (``CHUNKED``): about a core's L2 cache,
#: as ``propagate.CHUNK_BYTES`` for the engine's chunked step outside autograd.
CHUNK_BYTES = 1 << 20


def chunk_slices(rows: Tensor, chunk_bytes: int) -> list[slice]:
    """Batch slices of ``rows [B, k, N]`` of about ``chunk_bytes`` each (at least one sample): the
    chunks of ``CHUNKED``'s kernels and of the engine's step outside autograd (``propagate``)."""
    step = max(1, chunk_bytes // max(1, rows[0].numel() * rows.element_size()))
    return [slice(start, min(start + step, rows.shape[0])) for start in range(0, rows.shape[0], step)]


def chunk_scratch(rows: Tensor, count: int, parts: list[slice]) -> Tensor:
    """``count`` scratch buffers the size of the first (largest) of ``parts`` of ``rows``:
    ``[count, chunk, k, N]``; a shorter last chunk uses their leading samples."""
    return rows.new_empty((count, parts[0].stop - parts[0].start, *rows.shape[1:]))


def _forward_chunked(c: Tensor, r: Tensor, c_const: Tensor, r_const: Tensor, mid: Tensor, rad: Tensor,
                     iv_lo: Tensor, iv_up: Tensor, t_lo: Tensor, t_up: Tensor, relaxation: Callable):
    """``_forward`` on batch chunks, each one bounded, relaxed (``_per_neuron`` on its ``[n, N]``
    slice: the relaxation is per neuron) and turned into its next rows while it is in cache."""
    parts = chunk_slices(c, CHUNK_BYTES)
    node = [torch.empty_like(c_const) for _ in range(8)]  # s_lo, s_up, lower, upper, h_lo, h_up, consts'
    s_lo, s_up = node[0], node[1]
    c2, r2 = torch.empty_like(c), torch.empty_like(r)
    rows, mag = chunk_scratch(c, 2, parts)
    for part in parts:
        n = part.stop - part.start
        cs, rs, m3, q3 = c[part], r[part], mid[part].unsqueeze(1), rad[part].unsqueeze(1)  # [n, 1, k]
        for sign, form, s_part in ((-1.0, torch.sub, s_lo[part]), (1.0, torch.add, s_up[part])):
            lo_up = form(cs, rs, out=rows[:n])  # Lo = C − R, then Up = C + R
            out = s_part.unsqueeze(1)
            torch.bmm(m3, lo_up, out=out).baddbmm_(q3, torch.abs(lo_up, out=mag[:n]), alpha=sign)
        values = _per_neuron(s_lo[part], s_up[part], c_const[part], r_const[part], iv_lo[part], iv_up[part],
                             t_lo[part], t_up[part], relaxation)
        for out, value in zip(node[2:], values):
            out[part] = value
        h_lo, h_up = values[2], values[3]
        a, b = (h_up + h_lo).unsqueeze(1), (h_up - h_lo).unsqueeze(1)
        torch.mul(rs, b, out=c2[part]).addcmul_(a, cs)  # C' = a·C + b·R
        torch.mul(cs, b, out=r2[part]).addcmul_(a, rs)  # R' = b·C + a·R
    return s_lo, s_up, *node[2:6], c2, r2, node[6], node[7]


def _slope_grads_chunked(g_c: Tensor, g_r: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """``_slope_grads`` on batch chunks (the products formed in cache, then summed over ``k``)."""
    parts = chunk_slices(c, CHUNK_BYTES)
    g_h_lo, g_h_up = c.new_empty((c.shape[0], c.shape[2])), c.new_empty((c.shape[0], c.shape[2]))
    grad, rows = chunk_scratch(c, 2, parts)
    for part in parts:
        n = part.stop - part.start
        for form, out in ((torch.sub, g_h_lo), (torch.add, g_h_up)):
            g = form(g_c[part], g_r[part], out=grad[:n])
            torch.sum(g.mul_(form(c[part], r[part], out=rows[:n])), 1, out=out[part])
    return g_h_lo, g_h_up


def _row_grads_chunked(g_c: Tensor, g_r: Tensor, c: Tensor, r: Tensor, h_lo: Tensor, h_up: Tensor, mid: Tensor,
                       rad: Tensor, g_s_lo: Tensor, g_s_up: Tensor) -> tuple[Tensor, Tensor]:
    """``_row_grads`` on batch chunks."""
    parts = chunk_slices(c, CHUNK_BYTES)
    out_c, out_r = torch.empty_like(c), torch.empty_like(r)
    g_lo, g_up, grad = chunk_scratch(c, 3, parts)
    for part in parts:
        n = part.stop - part.start
        m3, q3 = mid[part].unsqueeze(-1), rad[part].unsqueeze(-1)  # [n, k, 1]
        for sign, form, h, g_s, out in ((-1.0, torch.sub, h_lo, g_s_lo, g_lo), (1.0, torch.add, h_up, g_s_up, g_up)):
            # g_s·(mid ± rad·sign(Lo|Up)) + h·(∂C' ∓ ∂R')
            t = form(c[part], r[part], out=out[:n]).sign_().mul_(q3 * sign).add_(m3).mul_(g_s[part].unsqueeze(1))
            t.addcmul_(h[part].unsqueeze(1), form(g_c[part], g_r[part], out=grad[:n]))
        torch.add(g_lo[:n], g_up[:n], out=out_c[part])
        torch.sub(g_up[:n], g_lo[:n], out=out_r[part])
    return out_c, out_r


def _native_for(rows: Tensor):
    """The hand-written CPU kernels (``robnet_svc.bounds.native``) when they serve ``rows``
    (float32 or float64 on the CPU) and are built; None: use the chunked PyTorch ops."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64):
        return None
    return native.kernels()


def _forward_native(c: Tensor, r: Tensor, c_const: Tensor, r_const: Tensor, mid: Tensor, rad: Tensor,
                    iv_lo: Tensor, iv_up: Tensor, t_lo: Tensor, t_up: Tensor, relaxation: Callable):
    """``_forward`` with the rows' two passes in native kernels: the sums over the box
    (``bounds_of_rows`` from zero constants) and the next rows (``half_sums``); the relaxation
    between them stays ``_per_neuron`` on ``[B, N]``."""
    module = _native_for(c)
    if module is None:
        return _forward_chunked(c, r, c_const, r_const, mid, rad, iv_lo, iv_up, t_lo, t_up, relaxation)
    zero = torch.zeros_like(c_const)
    s_lo, s_up = module.bounds_of_rows(c, r, zero, zero, mid, rad)
    lower, upper, h_lo, h_up, centre_const, radius_const = _per_neuron(
        s_lo, s_up, c_const, r_const, iv_lo, iv_up, t_lo, t_up, relaxation)
    h_lo, h_up = h_lo.contiguous(), h_up.contiguous()
    c2, r2 = module.half_sums(c, r, h_lo, h_up)
    return s_lo, s_up, lower, upper, h_lo, h_up, c2, r2, centre_const, radius_const


def _slope_grads_native(g_c: Tensor, g_r: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    module = _native_for(c)
    if module is None:
        return _slope_grads_chunked(g_c, g_r, c, r)
    return tuple(module.slope_grads(g_c, g_r, c, r))


def _row_grads_native(g_c: Tensor, g_r: Tensor, c: Tensor, r: Tensor, h_lo: Tensor, h_up: Tensor, mid: Tensor,
                      rad: Tensor, g_s_lo: Tensor, g_s_up: Tensor) -> tuple[Tensor, Tensor]:
    module = _native_for(c)
    if module is None:
        return _row_grads_chunked(g_c, g_r, c, r, h_lo, h_up, mid, rad, g_s_lo, g_s_up)
    return tuple(module.row_grads(g_c, g_r, c, r, h_lo, h_up, mid, rad, g_s_lo, g_s_up))


@dataclass(frozen=True)
class Kernels:
    """The three kernels of the fused step: compiled (``compiled_kernels``), eager on batch
    chunks (``CHUNKED``), or plain (``EAGER``: the same functions run op by op on the whole
    batch, slower than the eager engine; the reference the tests hold the others to)."""

    forward: Callable
    slope_grads: Callable
    row_grads: Callable


EAGER = Kernels(_forward, _slope_grads, _row_grads)

#: The kernels run eagerly on batch chunks: training's fallback on the CPU where ``NATIVE``'s
#: kernels cannot be built (or ``ROBNET_SVC_NATIVE=0``).
CHUNKED = Kernels(_forward_chunked, _slope_grads_chunked, _row_grads_chunked)

#: The kernels as hand-written CPU loops (``robnet_svc.bounds.native``), each call falling back
#: to ``CHUNKED``'s where those are not built or the dtype is not float32/float64: training's
#: default on the CPU (``training_kernels``).
NATIVE = Kernels(_forward_native, _slope_grads_native, _row_grads_native)


def training_kernels(device: torch.device) -> Kernels | None:
    """The kernels training uses without ``--compile``: ``NATIVE`` on the CPU, where the
    whole-batch step is bound by memory traffic; None (the eager engine) on CUDA."""
    return NATIVE if torch.device(device).type == "cpu" else None


@functools.cache
def compiled_kernels() -> Kernels:
    """The kernels through ``torch.compile`` (dynamic shapes: one compilation serves every layer
    and batch size; C++ on the CPU, Triton on CUDA), compiled on first use and cached on disk by
    torch (``TORCHINDUCTOR_CACHE_DIR``)."""
    return Kernels(*(torch.compile(f, dynamic=True, fullgraph=True) for f in (_forward, _slope_grads, _row_grads)))


def check_compiled_kernels(device: torch.device) -> Kernels:
    """The compiled kernels, after running the fused step forward and backward once on tiny
    tensors on ``device`` (which compiles them); RobnetError (one line) when torch cannot
    compile here (no C++ compiler on the CPU, no Triton on CUDA)."""
    from robnet_svc.bounds.ops.relu import ReluRule

    kernels = compiled_kernels()
    gen = torch.Generator().manual_seed(0)
    b, k, n = 2, 3, 5  # no size 0 or 1: torch specialises those

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    rows = [rand(b, k, n).requires_grad_() for _ in range(2)]
    mid, rad = rand(b, k), rand(b, k).abs()
    try:
        iv_lo, iv_up = torch.full((b, n), -9.0, device=device), torch.full((b, n), 9.0, device=device)
        outs = _FusedStep.apply(kernels, ReluRule.fused_relaxation, *rows, rand(b, n), rand(b, n).abs(), mid, rad,
                                iv_lo, iv_up, iv_lo, iv_up)
        sum(o.sum() for o in outs).backward()
    except Exception as e:  # noqa: BLE001 - any failure of the compiler stack is the same answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        need = "a C++ compiler (g++, or the one named by $CXX)" if device.type == "cpu" else "Triton"
        raise RobnetError(f"--compile: torch.compile cannot build the fused kernels on {device.type} "
                          f"({type(e).__name__}: {reason[:200]}); it needs {need}: install it, or run without "
                          "--compile") from None
    return kernels


def _plain(*ts: Tensor) -> list[Tensor]:
    """The tensors as the compiled kernels take them: contiguous, and detached, so that the guards
    torch.compile puts on its inputs (strides, ``requires_grad``, the base of a view) hold for
    every call and one compilation serves them all. Rows arrive contiguous from ``fused_step``;
    a gradient may not (a broadcast zero for an unused output, another layout from the op that
    reads the rows): that one is copied."""
    return [t.detach().contiguous() for t in ts]


class _FusedStep(torch.autograd.Function):
    """``(C, R, centre/radius constants, box mid/rad, interval and tighter bounds) -> (lower,
    upper, C', R', constants')`` of one activation, rows ``[B, k, N]``, the rest ``[B, N]``
    (``mid``/``rad`` ``[B, k]``); see the module docstring."""

    @staticmethod
    def forward(ctx, kernels: Kernels, relaxation: Callable, c, r, c_const, r_const, mid, rad,
                iv_lo, iv_up, t_lo, t_up):
        s_lo, s_up, lower, upper, h_lo, h_up, c2, r2, c2_const, r2_const = kernels.forward(
            *_plain(c, r, c_const, r_const, mid, rad, iv_lo, iv_up, t_lo, t_up), relaxation)
        ctx.kernels, ctx.relaxation = kernels, relaxation
        ctx.save_for_backward(c, r, c_const, r_const, mid, rad, iv_lo, iv_up, t_lo, t_up, s_lo, s_up, h_lo, h_up)
        return lower, upper, c2, r2, c2_const, r2_const

    @staticmethod
    def backward(ctx, g_lower, g_upper, g_c2, g_r2, g_c2_const, g_r2_const):
        c, r, c_const, r_const, mid, rad, iv_lo, iv_up, t_lo, t_up, s_lo, s_up, h_lo, h_up = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_c2, g_r2, c, r = _plain(g_c2, g_r2, c, r)
        g_h_lo, g_h_up = ctx.kernels.slope_grads(g_c2, g_r2, c, r)
        with torch.enable_grad():  # the [B, N] part, recomputed
            leaves = [t.detach().requires_grad_() for t in (s_lo, s_up, c_const, r_const, iv_lo, iv_up, t_lo, t_up)]
            outs = _per_neuron(*leaves, ctx.relaxation)
            small = torch.autograd.grad(outs, leaves, (g_lower, g_upper, g_h_lo, g_h_up, g_c2_const, g_r2_const),
                                        allow_unused=True)
        g_s_lo, g_s_up = (torch.zeros_like(s_lo) if g is None else g for g in small[:2])
        g_c = g_r = g_mid = g_rad = None
        if need[2] or need[3]:
            g_c, g_r = ctx.kernels.row_grads(g_c2, g_r2, c, r, *_plain(h_lo, h_up, mid, rad, g_s_lo, g_s_up))
        if need[6] or need[7]:  # the box (not a parameter in training; kept exact all the same)
            lo, up = c - r, c + r
            g_mid = (torch.bmm(lo, g_s_lo.unsqueeze(-1)) + torch.bmm(up, g_s_up.unsqueeze(-1))).squeeze(-1)
            g_rad = (torch.bmm(up.abs(), g_s_up.unsqueeze(-1)) - torch.bmm(lo.abs(), g_s_lo.unsqueeze(-1))).squeeze(-1)
        return (None, None, g_c, g_r, *small[2:4], g_mid, g_rad, *small[4:])


_ACTIVE: ContextVar[Kernels | None] = ContextVar("robnet_svc_fused_kernels", default=None)


@contextmanager
def fused_activations(kernels: Kernels | None) -> Iterator[None]:
    """Within it, SSIP's forward passes run the fused step with ``kernels`` at every activation
    that supports it (None: the eager engine, as outside)."""
    token = _ACTIVE.set(kernels)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_kernels() -> Kernels | None:
    return _ACTIVE.get()


def fused_step(kernels: Kernels, relaxation: Callable, sym: SymbolicBounds, interval: Interval,
               tighter: PreActivationBounds | None, box: tuple[Tensor, Tensor],
               order) -> tuple[PreActivationBounds, SymbolicBounds]:
    """The activation's input bounds and its output's SSIP bounds from its input's ``sym`` (with a
    radius) and ``interval``, intersected with ``tighter``; ``box``: the coefficient box's centre and
    radius (``propagate.box_mid_rad``); ``order``: the rows' memory order
    (``propagate._InOrder``), in which every tensor is flattened."""
    shape = order.node(sym.centre.const).shape
    rows, node = order.flat_rows, order.flat_node

    iv_lo, iv_up = node(interval.lower), node(interval.upper)
    t_lo, t_up = (iv_lo, iv_up) if tighter is None else (node(tighter.lower), node(tighter.upper))
    mid, rad = box
    lower, upper, c, r, c_const, r_const = _FusedStep.apply(
        kernels, relaxation, rows(sym.centre.coef), rows(sym.radius.coef), node(sym.centre.const),
        node(sym.radius.const), mid, rad, iv_lo, iv_up, t_lo, t_up)

    def back_node(t: Tensor) -> Tensor:
        return order.unflat_node(t, shape)

    def back_rows(t: Tensor) -> Tensor:
        return order.unflat_rows(t, shape)

    return (PreActivationBounds(back_node(lower), back_node(upper)),
            SymbolicBounds(Equation(back_rows(c), back_node(c_const)), Equation(back_rows(r), back_node(r_const))))
