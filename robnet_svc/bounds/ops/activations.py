"""Piecewise-linear activations: Clip / ReLU6 / Hardtanh, LeakyReLU / PReLU, HardSigmoid.

All are exact on stable neurons (``[l, u]`` inside one linear piece). Across kinks each keeps
the tightest lines of the convex (concave) hull that pass through a kink, choosing among
them by the area between line and function (equivalently the line's value at the midpoint),
which for a single kink is CROWN's adaptive ReLU choice ``α = [u >= -l]``:

* **Clip** ``clamp(x, a, b)`` (either end may be absent): below, the hull is ``a`` up to
  ``x = a`` and then rises to ``(u, clamp(u))``; the lower line pivots on ``(a, a)`` with slope
  0 or the steepest slope that stays below (``1``, or ``(b-a)/(u-a)`` when ``u > b``); without a
  kink at ``a`` (``l >= a``) the lower line is the chord. The upper line mirrors this around
  ``(b, b)``.
* **LeakyReLU / PReLU** ``x`` for ``x >= 0``, ``αx`` below (any α, per channel for PReLU):
  convex for α <= 1 (chord above; below, the line through 0 with slope 1 if the midpoint is
  >= 0 else α), concave for α > 1 (the mirror image). α is read as ``-σ(-1)`` from the op
  itself, so PReLU's slopes stay differentiable parameters.
* **HardSigmoid** ``clamp(αx + β, 0, 1)``: the Clip relaxation of ``z = αx + β`` on the image
  of ``[l, u]``, composed with the affine map.
"""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch import Tensor

from robnet_svc.bounds.ops.base import ActivationRule, OpCall
from robnet_svc.bounds.ops.smooth import param
from robnet_svc.bounds.types import Relaxation
from robnet_svc.errors import RobnetError


def _scalar(value, what: str) -> float | None:
    """A clamp bound as a float (None: absent); tensors must hold one value."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise RobnetError(f"{what} with a non-scalar bound (shape {tuple(value.shape)}) has no bound rule")
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None  # clamp(x, -inf, b) = min(x, b)


def _safe_div(num: Tensor, den: Tensor, where: Tensor) -> Tensor:
    return num / torch.where(where, den, torch.ones_like(den))


def _widen(r: Relaxation, lower: Tensor, upper: Tensor, where: Tensor) -> Relaxation:
    """Lower/raise the biases of the chord and pivot lines (``where``) by a few units of
    round-off, so that they stay bounds when evaluated in floating point (stable neurons,
    whose lines are the function itself, stay exact)."""
    reach = torch.maximum(lower.abs(), upper.abs())
    eps = 4 * torch.finfo(lower.dtype).eps

    def tol(slope: Tensor, bias: Tensor) -> Tensor:
        return torch.where(where, eps * (bias.abs() + slope.abs() * reach), torch.zeros_like(bias)).detach()

    return Relaxation(r.lower_slope, r.lower_bias - tol(r.lower_slope, r.lower_bias),
                      r.upper_slope, r.upper_bias + tol(r.upper_slope, r.upper_bias))


def clip_relaxation(lower: Tensor, upper: Tensor, a: float | None, b: float | None) -> Relaxation:
    """Linear bounds of ``clamp(x, a, b)`` on ``[lower, upper]`` (see the module docstring)."""
    if a is not None and b is not None and a > b:  # torch: every value becomes b
        a = b
    # an absent end is placed outside [l, u], where it never binds (no special cases below)
    a_t = lower.detach() - 1 if a is None else torch.full_like(lower, a)
    b_t = upper.detach() + 1 if b is None else torch.full_like(upper, b)
    one, zero = torch.ones_like(lower), torch.zeros_like(lower)
    mid = (lower + upper) * 0.5
    below, above = upper <= a_t, lower >= b_t          # constant a / constant b
    kink_a, kink_b = (lower < a_t) & ~below, (upper > b_t) & ~above
    # lower line
    s_pivot = torch.where(kink_b, _safe_div(b_t - a_t, upper - a_t, kink_a & kink_b), one)
    s_pivot = torch.where(mid >= a_t, s_pivot, zero)
    chord_lo = _safe_div(b_t - lower, upper - lower, kink_b & ~kink_a)
    s_lo = torch.where(kink_a, s_pivot, torch.where(kink_b, chord_lo, one))
    b_lo = torch.where(kink_a, a_t * (1 - s_pivot), torch.where(kink_b, lower * (1 - chord_lo), zero))
    # upper line
    u_pivot = torch.where(kink_a, _safe_div(b_t - a_t, b_t - lower, kink_a & kink_b), one)
    u_pivot = torch.where(mid <= b_t, u_pivot, zero)
    chord_up = _safe_div(upper - a_t, upper - lower, kink_a & ~kink_b)
    s_up = torch.where(kink_b, u_pivot, torch.where(kink_a, chord_up, one))
    b_up = torch.where(kink_b, b_t * (1 - u_pivot), torch.where(kink_a, a_t - chord_up * lower, zero))
    # constant pieces last: they override everything
    s_lo, s_up = torch.where(below | above, zero, s_lo), torch.where(below | above, zero, s_up)
    const = torch.where(below, a_t, b_t)
    b_lo, b_up = torch.where(below | above, const, b_lo), torch.where(below | above, const, b_up)
    return _widen(Relaxation(s_lo, b_lo, s_up, b_up), lower, upper, (kink_a | kink_b) & ~(below | above))


class ClipRule(ActivationRule):
    """``nn.ReLU6``, ``nn.Hardtanh``, onnx2torch ``OnnxClip``, ``F.relu6``, ``F.hardtanh``,
    ``torch.clamp`` / ``x.clamp()`` / ``torch.clip`` with constant scalar bounds."""

    nonneg_slopes = True
    lipschitz = 1.0  # and exact in floating point (a comparison)
    rounding_ulps = 0.0

    def __init__(self, call: OpCall):
        super().__init__(call)
        self.a, self.b = self._bounds()

    def _bounds(self) -> tuple[float | None, float | None]:
        call, m = self.call, self.call.module
        name = getattr(call.target, "__name__", type(m).__name__ if m is not None else str(call.target))
        if m is not None:
            if hasattr(m, "min_val"):  # Hardtanh / ReLU6 / OnnxClip
                return _scalar(m.min_val, name), _scalar(m.max_val, name)
            raise RobnetError(f"no clip bounds on {type(m).__name__}")
        if name == "relu6":
            return 0.0, 6.0
        if name == "hardtanh":
            return _scalar(param(call, "min_val", 1, -1.0), name), _scalar(param(call, "max_val", 2, 1.0), name)
        return _scalar(param(call, "min", 1, None), name), _scalar(param(call, "max", 2, None), name)

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return torch.clamp(lower, self.a, self.b), torch.clamp(upper, self.a, self.b)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        return clip_relaxation(lower, upper, self.a, self.b)

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """``[l, u]`` strictly contains a kink; otherwise it lies in one linear piece, whose
        exact lines hold on any sub-box."""
        a, b = self.a, self.b
        if a is not None and b is not None and a > b:
            a = b
        kinks = [k for k in (a, b) if k is not None]
        mask = torch.zeros_like(lower, dtype=torch.bool)
        for k in kinks:  # at most two scalar kinks
            mask |= (lower < k) & (upper > k)
        return mask


class LeakyReluRule(ActivationRule):
    """``nn.LeakyReLU`` / ``F.leaky_relu`` (ONNX ``LeakyRelu``) and ``nn.PReLU`` / ``F.prelu`` /
    onnx2torch ``OnnxPReLU`` (constant, possibly per-channel slopes)."""

    @property
    def lipschitz(self) -> float | None:
        """max(1, |α|) for a constant slope (rounding allowance); None (the generic, looser
        treatment) for PReLU's per-channel weights."""
        m = self.call.module
        if m is not None and isinstance(getattr(m, "negative_slope", None), Number):
            return max(1.0, abs(float(m.negative_slope)))
        if m is None and getattr(self.call.target, "__name__", "") == "leaky_relu":
            return max(1.0, abs(float(param(self.call, "negative_slope", 1, 0.01))))
        return None

    def _alpha(self, like: Tensor) -> Tensor | float:
        m = self.call.module
        if m is not None and isinstance(getattr(m, "negative_slope", None), Number):
            return float(m.negative_slope)
        if m is None and getattr(self.call.target, "__name__", "") == "leaky_relu":
            return float(param(self.call, "negative_slope", 1, 0.01))
        # PReLU: the per-element slope is -σ(-1), differentiable in the weight
        probe = -torch.ones((1, *self.call.in_shapes[0]), dtype=like.dtype, device=like.device)
        return -self.call.run(probe)

    @property
    def nonneg_slopes(self) -> bool:
        m = self.call.module
        slope = getattr(m, "negative_slope", None) if m is not None else None
        return isinstance(slope, Number) and slope >= 0

    def _f(self, x: Tensor, alpha) -> Tensor:
        return torch.where(x >= 0, x, alpha * x)

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self._alpha(lower)
        fl, fu = self._f(lower, alpha), self._f(upper, alpha)
        # convex for α <= 1 (minimum 0 at the kink when α < 0), increasing for α >= 0
        straddles = (lower < 0) & (upper > 0)
        lo = torch.where(straddles, torch.minimum(torch.minimum(fl, fu), torch.zeros_like(fl)), torch.minimum(fl, fu))
        return lo, torch.maximum(fl, fu)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        alpha = self._alpha(lower)
        alpha = alpha if isinstance(alpha, Tensor) else torch.full_like(lower, alpha)
        alpha = alpha.expand_as(lower)
        one, zero = torch.ones_like(lower), torch.zeros_like(lower)
        pos, neg = lower >= 0, upper <= 0
        unstable = ~pos & ~neg
        chord = _safe_div(upper - alpha * lower, upper - lower, unstable)
        chord_b = lower * (alpha - chord)  # the chord through (l, αl)
        origin = torch.where((lower + upper) >= 0, one, alpha)
        convex = alpha <= 1
        s_lo = torch.where(convex, origin, chord)
        b_lo = torch.where(convex, zero, chord_b)
        s_up = torch.where(convex, chord, origin)
        b_up = torch.where(convex, chord_b, zero)
        stable_s = torch.where(pos, one, alpha)
        return _widen(Relaxation(torch.where(unstable, s_lo, stable_s), torch.where(unstable, b_lo, zero),
                                 torch.where(unstable, s_up, stable_s), torch.where(unstable, b_up, zero)),
                      lower, upper, unstable)


    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """``l < 0 <= u`` (as for ReLU): otherwise the relaxation (``x`` or ``αx``) is the same
        on any sub-box."""
        return (lower < 0) & (upper >= 0)


class HardSigmoidRule(ActivationRule):
    """``clamp(αx + β, 0, 1)``: onnx2torch ``OnnxHardSigmoid`` (ONNX defaults α = 0.2, β = 0.5),
    ``nn.Hardsigmoid`` / ``F.hardsigmoid`` (α = 1/6, β = 1/2)."""

    def __init__(self, call: OpCall):
        super().__init__(call)
        m = call.module
        self.alpha = float(getattr(m, "alpha", 1 / 6))
        self.beta = float(getattr(m, "beta", 0.5))
        self.lipschitz = abs(self.alpha)  # the clamp is exact; αx + β rounds twice (rounding_ulps)
        self.rounding_ulps = 2.0
        self.rounding_floor = abs(self.beta)

    @property
    def nonneg_slopes(self) -> bool:
        return self.alpha >= 0

    def _z(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        zl, zu = lower * self.alpha + self.beta, upper * self.alpha + self.beta
        return torch.minimum(zl, zu), torch.maximum(zl, zu)

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        zl, zu = self._z(lower, upper)
        # round-off of torch's relu6(x + 3)/6 against αx + β
        reach = torch.maximum(lower.abs(), upper.abs())
        tol = (4 * torch.finfo(lower.dtype).eps * (1 + abs(self.alpha) * reach)).detach()
        return zl.clamp(0, 1) - tol, zu.clamp(0, 1) + tol

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        r = clip_relaxation(*self._z(lower, upper), 0.0, 1.0)
        a, b = self.alpha, self.beta
        r = Relaxation(r.lower_slope * a, r.lower_slope * b + r.lower_bias, r.upper_slope * a,
                       r.upper_slope * b + r.upper_bias)
        # torch computes relu6(x + 3)/6, not x/6 + 1/2: allow for the different rounding
        return _widen(r, lower, upper, torch.ones_like(lower, dtype=torch.bool))


def activation_rules() -> dict:
    """The built-in activation rules: torch modules, functions and methods, the modules
    onnx2torch imports them as, and the fused modules of ``robnet_svc.bounds.fuse``."""
    import torch.nn.functional as F
    from torch import nn

    from robnet_svc.bounds.fuse import HardSwish
    from robnet_svc.bounds.ops import smooth as s

    table = {
        nn.ReLU6: ClipRule, nn.Hardtanh: ClipRule, F.relu6: ClipRule, F.hardtanh: ClipRule,
        torch.clamp: ClipRule, torch.clip: ClipRule, torch.Tensor.clamp: ClipRule, torch.Tensor.clip: ClipRule,
        nn.LeakyReLU: LeakyReluRule, F.leaky_relu: LeakyReluRule, nn.PReLU: LeakyReluRule, F.prelu: LeakyReluRule,
        nn.Hardsigmoid: HardSigmoidRule, F.hardsigmoid: HardSigmoidRule,
        nn.Hardswish: s.HardSwishRule, F.hardswish: s.HardSwishRule, HardSwish: s.HardSwishRule,
        nn.Sigmoid: s.SigmoidRule, torch.sigmoid: s.SigmoidRule, F.sigmoid: s.SigmoidRule,
        torch.Tensor.sigmoid: s.SigmoidRule,
        nn.Tanh: s.TanhRule, torch.tanh: s.TanhRule, F.tanh: s.TanhRule, torch.Tensor.tanh: s.TanhRule,
        torch.erf: s.ErfRule, torch.special.erf: s.ErfRule, torch.Tensor.erf: s.ErfRule,
        nn.ELU: s.EluRule, F.elu: s.EluRule,
        nn.Softplus: s.SoftplusRule, F.softplus: s.SoftplusRule,
        nn.SiLU: s.SiluRule, F.silu: s.SiluRule,
        nn.GELU: s.GeluRule, F.gelu: s.GeluRule,
    }
    # onnx2torch's classes by import path (imported only when a run asks for the rules)
    converters = "onnx2torch.node_converters"
    table.update({f"{converters}.clip:OnnxClip": ClipRule, f"{converters}.activations:OnnxPReLU": LeakyReluRule,
                  f"{converters}.activations:OnnxHardSigmoid": HardSigmoidRule,
                  f"{converters}.activations:OnnxErf": s.ErfRule, f"{converters}.functions:OnnxFunction": s.TanhRule})
    return table
