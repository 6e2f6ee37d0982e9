"""Smooth (and piecewise convex/concave) activations: Sigmoid, Tanh, Erf, ELU, Softplus, SiLU,
GELU and HardSwish.

Every function here is described by its *pieces*: intervals of the real line on each of which
it is convex or concave (``Piece``). That is all the soundness argument needs:

* **slopes** are chosen by the sign of the curvature on ``[l, u]`` (the CROWN/DeepPoly scheme):
  convex on ``[l, u]``: chord above, tangent at the midpoint below; concave: the mirror image;
  S-shaped (convex, then concave; Sigmoid, Tanh, Erf, ELU with α > 1) across the inflection:
  the tangent through ``(l, σ(l))`` above and the one through ``(u, σ(u))`` below, tangent
  points found by bisection (or the chord where it is already a bound); valley-shaped
  (concave, convex, concave; SiLU, GELU, HardSwish) across a piece boundary: the chord
  above and, below, the better (at the midpoint) of the tangent at the midpoint (clamped to
  the convex piece) and the CROWN-like end slope ``σ'(u)`` if ``u >= -l`` else ``σ'(l)``.
* **biases** are never taken from the slope heuristic: for a slope ``s`` the upper bias is an
  upper bound of ``max over [l, u] of σ(x) - s·x`` computed piece by piece (convex piece:
  the endpoints; concave piece: the minimum of two tangent lines of ``σ(x) - s·x`` at the
  ends of a bisection bracket of its stationary point, or at a known tangent point), and the
  lower bias mirrors it. Each value is an upper (lower) bound whatever the bracket or guess,
  so an imprecise tangent point only loosens a bound, it never breaks one.
* a relative slack of a few units of round-off (``_SLACK`` · eps · scale) is added to both
  biases, so that the lines stay bounds under float rounding (checked pointwise in float32
  and float64 by the tests, including ``l = u`` and intervals of width 1e4 and beyond).

Bisections run a fixed number of vectorised iterations on detached tensors; the final lines
are differentiable in ``l``/``u`` through the function values and chords (training passes
gradients through them), not through the bisection.

Interval bounds are the exact range of σ on ``[l, u]``: ``[σ(l), σ(u)]`` for the monotone
functions; SiLU, GELU and HardSwish fall to a global minimum and rise after it, so their
lower bound is that minimum when it lies in ``[l, u]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robnet_svc.bounds.ops.base import ActivationRule, OpCall
from robnet_svc.bounds.types import Relaxation

ITERATIONS = 10  # bisection steps (fixed: vectorised, no data-dependent loop)
_SLACK = 16.0    # round-off allowance, in units of the dtype's eps times the magnitudes involved


@dataclass(frozen=True)
class Piece:
    """``[lo, hi]`` on which σ is convex (``convex=True``) or concave, with the derivative ``df``
    to use on it (None: the rule's ``df``; pieces of functions with kinks give their own)."""

    lo: float
    hi: float
    convex: bool
    df: Callable[[Tensor], Tensor] | None = None


def _bisect(fn: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor,
            keep_low_when_nonneg: bool = True) -> tuple[Tensor, Tensor]:
    """Bracket ``[lo, hi]`` of a sign change of a monotone ``fn`` after ``ITERATIONS`` halvings:
    the midpoint replaces ``lo`` where ``fn(mid) >= 0`` (``keep_low_when_nonneg``) else ``hi``."""
    with torch.no_grad():
        lo, hi = lo.detach().clone(), hi.detach().clone()
        for _ in range(ITERATIONS):
            mid = (lo + hi) * 0.5
            nonneg = fn(mid) >= 0
            go_up = nonneg if keep_low_when_nonneg else ~nonneg
            lo = torch.where(go_up, mid, lo)
            hi = torch.where(go_up, hi, mid)
    return lo, hi


def concave_max(g: Callable[[Tensor], Tensor], dg: Callable[[Tensor], Tensor], a: Tensor, b: Tensor,
                guess: Tensor | None = None) -> Tensor:
    """An upper bound of ``max over [a, b] of g`` for ``g`` concave on ``[a, b]`` (elementwise).

    With ``T_lo``/``T_hi`` the tangents of ``g`` at the two ends of a bracket ``[lo, hi]`` of its
    stationary point (bisection on ``g'``, or ``lo = hi = guess``), ``g <= min(T_lo, T_hi)`` on
    ``[a, b]`` by concavity, and the maximum of that minimum of two lines is read off their
    slopes: both falling -> at ``a``, both rising -> at ``b``, else at most
    ``min(T_lo(hi), T_hi(lo))``. True for any bracket, so the guess affects tightness only.
    """
    if guess is None:
        with torch.no_grad():
            inner_root = (dg(a) > 0) & (dg(b) < 0)
        if bool(inner_root.any()):
            lo, hi = _bisect(dg, a, b)
        else:  # monotone on every [a, b]: the maximum is at an end (one host sync saves the bisection)
            with torch.no_grad():
                lo = hi = torch.where(dg(a) <= 0, a, b).detach()
    else:
        with torch.no_grad():
            lo = hi = torch.minimum(torch.maximum(guess, a), b).detach()
    g_lo, g_hi, d_lo, d_hi = g(lo), g(hi), dg(lo), dg(hi)
    width = hi - lo
    inner = torch.minimum(g_lo + d_lo.clamp(min=0) * width, g_hi + (-d_hi).clamp(min=0) * width)
    inner = torch.maximum(inner, torch.maximum(g_lo, g_hi))
    at_a = torch.minimum(g_lo + d_lo * (a - lo), g_hi + d_hi * (a - hi))
    at_b = torch.minimum(g_lo + d_lo * (b - lo), g_hi + d_hi * (b - hi))
    return torch.where(d_lo < 0, at_a, torch.where(d_hi > 0, at_b, inner))


class CurvatureRule(ActivationRule):
    """An elementwise activation given by ``f``, ``df`` and its convex/concave ``pieces``.

    ``shape``: "convex" (one convex piece), "s" (convex, then concave at ``inflection``) or
    "valley" (concave, convex, concave; the convex piece is ``[p, q]``). Non-monotone
    (valley) rules give ``argmin``, the global minimiser.
    """

    shape: ClassVar[str] = "convex"
    monotone: ClassVar[bool] = True
    #: absolute allowance for a function that is convex/concave only up to a tiny jump (Softplus)
    jump: float = 0.0
    #: round-off of the implementation that grows with |x| (units of eps·|x|, for |x| <= 16):
    #: GELU's ``1 + erf(x/√2)`` cancels for negative x
    noise: ClassVar[float] = 0.0
    #: For the rounding allowance (robnet_svc/rounding.py): a Lipschitz constant of ``f`` on the
    #: whole line, and the accuracy assumed of a float implementation of ``f`` (exp, tanh, erf
    #: in libm, SLEEF or onnxruntime's MLAS): within ``rounding_ulps`` units of roundoff of
    #: ``|f(x)| + 1``. Transcendental functions are not correctly rounded, hence 16 rather than 1.
    lipschitz: float = 1.0
    rounding_ulps: ClassVar[float] = 16.0
    rounding_floor: ClassVar[float] = 1.0

    def __init__(self, call: OpCall):
        super().__init__(call)
        self.configure()

    def configure(self) -> None:
        """Read the op's parameters from ``self.call`` (subclasses)."""

    @property
    def nonneg_slopes(self) -> bool:  # monotone non-decreasing: every chord and tangent slope >= 0
        return self.monotone

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def pieces(self) -> list[Piece]:
        return [Piece(-math.inf, math.inf, True)]

    def argmin(self) -> float:
        raise NotImplementedError

    # ------------------------------------------------------------------ interval

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        upper = torch.maximum(lower, upper)
        fl, fu = self.f(lower), self.f(upper)
        # float implementations are monotone only up to an ulp or so: widen by a few
        eps = torch.finfo(lower.dtype).eps
        reach = torch.maximum(lower.abs(), upper.abs()).clamp(max=16.0)
        tol = (_SLACK * eps * (torch.maximum(fl.abs(), fu.abs()) + self.noise * reach) + self.jump).detach()
        if self.monotone:
            return fl - tol, fu + tol
        x_min = self.argmin()
        f_min = self._min_value(lower)
        inside = (lower <= x_min) & (x_min <= upper)
        return torch.where(inside, f_min, torch.minimum(fl, fu) - tol), torch.maximum(fl, fu) + tol

    def _min_value(self, like: Tensor) -> Tensor:
        """The global minimum (computed in float64), lowered by a round-off allowance."""
        x = torch.tensor(self.argmin(), dtype=torch.float64)
        value = float(self.f(x))
        eps = torch.finfo(like.dtype).eps
        return like.new_tensor(value - _SLACK * eps * max(1.0, abs(value)))

    # ------------------------------------------------------------------ relaxation

    def _df_on(self, piece: Piece) -> Callable[[Tensor], Tensor]:
        return piece.df if piece.df is not None else self.df

    def _bias(self, s: Tensor, lower: Tensor, upper: Tensor, upper_side: bool, guess: Tensor | None) -> Tensor:
        """Upper bound of ``max (f(x) - s·x)`` (``upper_side``) or lower bound of ``min`` over
        ``[lower, upper]``, piece by piece (see the module docstring)."""
        best = None
        for piece in self.pieces():
            present = (lower <= piece.hi) & (upper >= piece.lo)
            if best is not None and not bool(present.any()):
                continue  # no neuron reaches this piece (one host sync saves a bisection)
            a = lower.clamp(min=piece.lo, max=piece.hi)
            b = upper.clamp(min=piece.lo, max=piece.hi)
            df = self._df_on(piece)
            if upper_side:
                if piece.convex:
                    value = torch.maximum(self.f(a) - s * a, self.f(b) - s * b)
                else:
                    value = concave_max(lambda x: self.f(x) - s * x, lambda x: df(x) - s, a, b, guess)
                value = torch.where(present, value, torch.full_like(value, -math.inf))
                best = value if best is None else torch.maximum(best, value)
            else:
                if piece.convex:
                    value = -concave_max(lambda x: s * x - self.f(x), lambda x: s - df(x), a, b, guess)
                else:
                    value = torch.minimum(self.f(a) - s * a, self.f(b) - s * b)
                value = torch.where(present, value, torch.full_like(value, math.inf))
                best = value if best is None else torch.minimum(best, value)
        return best

    def _df_at(self, x: Tensor) -> Tensor:
        """``σ'`` with each point's own piece's derivative (first matching piece)."""
        out = None
        for piece in reversed(self.pieces()):
            d = self._df_on(piece)(x)
            out = d if out is None else torch.where((x >= piece.lo) & (x <= piece.hi), d, out)
        return out

    def _chord(self, lower: Tensor, upper: Tensor, fl: Tensor, fu: Tensor) -> Tensor:
        """Chord slope, kept within the range of ``σ'`` on ``[l, u]`` (it is, up to round-off;
        the clamp keeps narrow intervals from amplifying it) and ``σ'(l)`` when ``l = u``."""
        width = upper - lower
        wide = width > 0
        chord = (fu - fl) / torch.where(wide, width, torch.ones_like(width))
        lo_d = hi_d = None
        for piece in self.pieces():
            df = self._df_on(piece)
            a = lower.clamp(min=piece.lo, max=piece.hi)
            b = upper.clamp(min=piece.lo, max=piece.hi)
            present = (lower <= piece.hi) & (upper >= piece.lo)
            da, db = df(a), df(b)
            lo_p = torch.where(present, torch.minimum(da, db), torch.full_like(da, math.inf))
            hi_p = torch.where(present, torch.maximum(da, db), torch.full_like(da, -math.inf))
            lo_d = lo_p if lo_d is None else torch.minimum(lo_d, lo_p)
            hi_d = hi_p if hi_d is None else torch.maximum(hi_d, hi_p)
        chord = torch.minimum(torch.maximum(chord, lo_d), hi_d)
        return torch.where(wide, chord, self._df_at(lower))

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        upper = torch.maximum(lower, upper)  # intersected bounds may cross by a rounding error
        finite = torch.isfinite(lower) & torch.isfinite(upper)
        if not bool(finite.all()):  # overflowed bounds: constant lines from the interval bounds
            safe_l = torch.where(finite, lower, torch.zeros_like(lower))
            safe_u = torch.where(finite, upper, torch.zeros_like(upper))
            r = self.relax(safe_l, safe_u)
            lo, up = self.interval(lower, upper)
            zero = torch.zeros_like(lower)
            return Relaxation(torch.where(finite, r.lower_slope, zero), torch.where(finite, r.lower_bias, lo),
                              torch.where(finite, r.upper_slope, zero), torch.where(finite, r.upper_bias, up))
        fl, fu = self.f(lower), self.f(upper)
        chord = self._chord(lower, upper, fl, fu)
        mid = (lower + upper) * 0.5
        lines = {"convex": self._convex_lines, "s": self._s_lines, "valley": self._valley_lines}[self.shape]
        s_lo, b_lo, s_up, b_up = lines(lower, upper, fl, fu, chord, mid)
        return Relaxation(s_lo, b_lo - self._slack(s_lo, b_lo, lower, upper, fl, fu),
                          s_up, b_up + self._slack(s_up, b_up, lower, upper, fl, fu))

    def _slack(self, s, b, lower, upper, fl, fu) -> Tensor:
        eps = torch.finfo(lower.dtype).eps
        reach = torch.maximum(lower.abs(), upper.abs())
        scale = 1.0 + torch.maximum(fl.abs(), fu.abs()) + b.abs() + s.abs() * reach + self.noise * reach.clamp(max=16.0)
        return (_SLACK * eps * scale + self.jump).detach()

    def _convex_lines(self, lower, upper, fl, fu, chord, mid):
        """Convex everywhere: chord above, tangent at the midpoint below."""
        s_lo = self.df(mid)
        return (s_lo, self._bias(s_lo, lower, upper, False, mid),
                chord, self._bias(chord, lower, upper, True, None))

    def _s_lines(self, lower, upper, fl, fu, chord, mid):
        """Convex up to ``self.inflection``, concave after it (see the module docstring)."""
        c = self.inflection
        convex_piece, concave_piece = self.pieces()
        df_cv, df_cc = self._df_on(convex_piece), self._df_on(concave_piece)
        all_convex, all_concave = upper <= c, lower >= c
        c_t = torch.full_like(lower, c)
        mixed = bool((~all_convex & ~all_concave).any())  # else no tangent point is needed
        # upper: tangent at d in [c, u] through (l, f(l)); phi(d) increases with d on the concave piece
        hi_end = torch.maximum(upper, c_t)
        d_up = hi_end
        if mixed:
            _, d_up = _bisect(lambda d: self.f(d) + df_cc(d) * (lower - d) - fl, c_t, hi_end,
                              keep_low_when_nonneg=False)
        chord_up_ok = df_cc(hi_end) >= chord  # the chord itself lies above
        s_up = torch.where(all_convex, chord, torch.where(all_concave, df_cc(mid),
                                                          torch.where(chord_up_ok, chord, df_cc(d_up))))
        g_up = torch.where(all_concave, mid, torch.where(chord_up_ok, upper, d_up))
        # lower: tangent at d in [l, c] through (u, f(u)); psi(d) increases with d on the convex piece
        lo_end = torch.minimum(lower, c_t)
        d_lo = lo_end
        if mixed:
            d_lo, _ = _bisect(lambda d: self.f(d) + df_cv(d) * (upper - d) - fu, lo_end, c_t,
                              keep_low_when_nonneg=False)
        chord_lo_ok = df_cv(lo_end) >= chord
        s_lo = torch.where(all_concave, chord, torch.where(all_convex, df_cv(mid),
                                                           torch.where(chord_lo_ok, chord, df_cv(d_lo))))
        g_lo = torch.where(all_convex, mid, torch.where(chord_lo_ok, lower, d_lo))
        return (s_lo, self._bias(s_lo, lower, upper, False, g_lo),
                s_up, self._bias(s_up, lower, upper, True, g_up))

    def _valley_lines(self, lower, upper, fl, fu, chord, mid):
        """Concave, convex on ``[p, q]``, concave (see the module docstring)."""
        _, middle, _ = self.pieces()
        p, q = middle.lo, middle.hi
        all_convex = (lower >= p) & (upper <= q)
        all_concave = (upper <= p) | (lower >= q)
        s_up = torch.where(all_concave, self._df_at(mid), chord)
        b_up = self._bias(s_up, lower, upper, True, None)
        # lower: (a) tangent at the midpoint clamped to [p, q]; (b) the end slope; keep the higher at mid
        t = mid.clamp(min=p, max=q)
        s_a = torch.where(all_concave, chord, self._df_on(middle)(t))
        b_a = self._bias(s_a, lower, upper, False, t)
        s_b = torch.where(upper >= -lower, self._df_at(upper), self._df_at(lower))
        b_b = self._bias(s_b, lower, upper, False, None)
        take_a = all_convex | all_concave | (s_a * mid + b_a >= s_b * mid + b_b)
        return torch.where(take_a, s_a, s_b), torch.where(take_a, b_a, b_b), s_up, b_up


# ---------------------------------------------------------------------------- concrete rules


def param(call: OpCall, name: str, index: int, default):
    """An op parameter: the module's attribute ``name``, or the function's positional argument
    ``index`` / keyword ``name`` (``default`` when absent)."""
    if call.module is not None:
        return getattr(call.module, name, default)
    if len(call.args) > index:
        return call.args[index]
    return call.kwargs.get(name, default)


def _root(fn: Callable[[float], float], lo: float, hi: float) -> float:
    """Root of an increasing ``fn`` on ``[lo, hi]`` in float64 (module constants)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


#: SiLU is convex exactly on [-C, C] where x·tanh(x/2) = 2; minimum where silu'(x) = 0
SILU_INFLECTION = _root(lambda x: x * math.tanh(x / 2) - 2, 1.0, 4.0)
SILU_ARGMIN = _root(lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x))), -SILU_INFLECTION, 0.0)
#: GELU = x·Φ(x): gelu'' = φ(x)(2 - x²), convex exactly on [-√2, √2]
GELU_INFLECTION = math.sqrt(2.0)
_INV_SQRT2, _INV_SQRT_2PI = 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi)
GELU_ARGMIN = _root(lambda x: 0.5 * (1 + math.erf(x * _INV_SQRT2)) + x * math.exp(-x * x / 2) * _INV_SQRT_2PI,
                    -GELU_INFLECTION, 0.0)


class SShapedRule(CurvatureRule):
    """Convex up to the inflection point 0, concave after it."""

    shape = "s"
    inflection = 0.0

    def pieces(self) -> list[Piece]:
        return [Piece(-math.inf, self.inflection, True), Piece(self.inflection, math.inf, False)]


class SigmoidRule(SShapedRule):
    """``nn.Sigmoid``, ``torch.sigmoid``, ``x.sigmoid()``."""

    lipschitz = 0.25

    def f(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def df(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 - s)


class TanhRule(SShapedRule):
    """``nn.Tanh``, ``torch.tanh``, ``x.tanh()`` and onnx2torch's ``OnnxFunction('Tanh')``."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        fn = getattr(call.module, "function", torch.tanh) if call.module is not None else torch.tanh
        if fn is not torch.tanh:
            return f"elementwise function {getattr(fn, '__name__', fn)} has no bound rule"
        return None

    def f(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def df(self, x: Tensor) -> Tensor:
        return 1 - torch.tanh(x) ** 2


class ErfRule(SShapedRule):
    """``torch.erf`` and onnx2torch's ``OnnxErf`` (erf'' = -2x·erf'(x))."""

    lipschitz = 2 / math.sqrt(math.pi)

    def f(self, x: Tensor) -> Tensor:
        return torch.erf(x)

    def df(self, x: Tensor) -> Tensor:
        return (2 / math.sqrt(math.pi)) * torch.exp(-x * x)


class EluRule(CurvatureRule):
    """``nn.ELU`` / ``F.elu`` (ONNX ``Elu``): convex for 0 <= α <= 1; for α > 1 the kink at 0
    is concave, so it is S-shaped (convex on x <= 0, linear after)."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        alpha = param(call, "alpha", 1, 1.0)
        if isinstance(alpha, (int, float)) and alpha < 0:
            return f"ELU with negative alpha {alpha} is not monotone; no bound rule"
        return None

    def configure(self) -> None:
        self.alpha = float(param(self.call, "alpha", 1, 1.0))
        self.lipschitz = max(1.0, self.alpha)
        self.shape = "convex" if self.alpha <= 1 else "s"
        self.inflection = 0.0

    def pieces(self) -> list[Piece]:
        if self.alpha <= 1:
            return [Piece(-math.inf, math.inf, True)]
        return [Piece(-math.inf, 0.0, True), Piece(0.0, math.inf, False)]

    def f(self, x: Tensor) -> Tensor:
        return F.elu(x, self.alpha)

    def df(self, x: Tensor) -> Tensor:
        # at 0: α (left derivative), a valid sub/supergradient on every piece (see pieces)
        return torch.where(x > 0, torch.ones_like(x), self.alpha * torch.exp(x.clamp(max=0)))


class SoftplusRule(CurvatureRule):
    """``nn.Softplus`` / ``F.softplus(β, threshold)`` (ONNX ``Softplus``): convex. Above the
    threshold torch returns ``x`` itself, a jump of ``log1p(e^-threshold)/β`` below the true
    curve; that jump is added to both biases."""

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        beta = param(call, "beta", 1, 1.0)
        if isinstance(beta, (int, float)) and beta <= 0:
            return f"Softplus with beta {beta} <= 0"
        return None

    def configure(self) -> None:
        self.beta = float(param(self.call, "beta", 1, 1.0))
        self.threshold = float(param(self.call, "threshold", 2, 20.0))
        self.jump = math.log1p(math.exp(-self.threshold)) / self.beta

    def f(self, x: Tensor) -> Tensor:
        return F.softplus(x, self.beta, self.threshold)

    def df(self, x: Tensor) -> Tensor:
        bx = x * self.beta
        return torch.where(bx > self.threshold, torch.ones_like(x), torch.sigmoid(bx))


class ValleyRule(CurvatureRule):
    """Concave, convex on ``[-inflection, inflection]``, concave; one global minimum."""

    shape = "valley"
    monotone = False
    inflection: ClassVar[float]

    def pieces(self) -> list[Piece]:
        c = self.inflection
        return [Piece(-math.inf, -c, False), Piece(-c, c, True), Piece(c, math.inf, False)]


class SiluRule(ValleyRule):
    """``nn.SiLU`` / ``F.silu`` and the fused ``x * sigmoid(x)`` of ONNX exports."""

    lipschitz = 1.1  # max SiLU' = 1.0998 (at x = 2.40)

    inflection = SILU_INFLECTION

    def argmin(self) -> float:
        return SILU_ARGMIN

    def f(self, x: Tensor) -> Tensor:
        return F.silu(x)

    def df(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))


class GeluRule(ValleyRule):
    """``nn.GELU`` / ``F.gelu`` (exact, erf form) and the fused ``x·0.5·(1 + erf(x/√2))`` of
    ONNX exports (opset < 20). The tanh approximation is refused."""

    lipschitz = 1.13  # max GELU' = 1.1289 (at x = 1.41)

    inflection = GELU_INFLECTION
    noise = 4.0

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        approximate = param(call, "approximate", 99, "none")
        if approximate != "none":
            return f"GELU(approximate={approximate!r}) has no bound rule (only the exact erf form)"
        return None

    def argmin(self) -> float:
        return GELU_ARGMIN

    def f(self, x: Tensor) -> Tensor:
        return F.gelu(x)

    def df(self, x: Tensor) -> Tensor:
        return 0.5 * (1 + torch.erf(x * _INV_SQRT2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


class HardSwishRule(CurvatureRule):
    """``x · clamp(αx + β, 0, 1)`` with α > 0: ``nn.Hardswish`` / ``F.hardswish`` (α = 1/6,
    β = 1/2; ONNX ``HardSwish``) and the fused ``x * HardSigmoid(x)`` (``fuse.HardSwish``).
    Piecewise quadratic: 0 up to ``p = -β/α``, the convex parabola ``αx² + βx`` on
    ``[p, q = (1-β)/α]``, ``x`` after: pieces linear | convex | linear, whatever the kinks."""

    shape = "valley"
    monotone = False

    def configure(self) -> None:
        self.alpha = float(getattr(self.call.module, "alpha", 1 / 6))
        self.beta = float(getattr(self.call.module, "beta", 0.5))
        # slope: 0 | 2αx + β on [p, q], from -β to 2 - β | 1
        self.lipschitz = max(1.0, abs(self.beta), abs(2 - self.beta))
        self.torch_form = self.call.module is None or type(self.call.module).__name__ == "Hardswish"

    def pieces(self) -> list[Piece]:
        a, b = self.alpha, self.beta
        p, q = -b / a, (1 - b) / a
        return [Piece(-math.inf, p, False, torch.zeros_like), Piece(p, q, True, lambda x: 2 * a * x + b),
                Piece(q, math.inf, False, torch.ones_like)]

    def argmin(self) -> float:
        a, b = self.alpha, self.beta
        return min(max(-b / (2 * a), -b / a), (1 - b) / a)

    def f(self, x: Tensor) -> Tensor:
        if self.torch_form:
            return F.hardswish(x)
        return x * torch.clamp(x * self.alpha + self.beta, 0, 1)

    def df(self, x: Tensor) -> Tensor:
        return self._df_at(x)
