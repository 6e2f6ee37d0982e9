"""Per-operation bound rules: the contract between the engine and each op.

A rule class is registered for a target (an ``nn.Module`` subclass, matched by exact type,
or the callable / method name of a ``call_function`` / ``call_method`` node). The engine

1. at compile time calls ``RuleCls.check(call)``: a one-line reason when this particular
   node cannot be bounded (e.g. a Mul of two perturbed tensors), else None;
2. at bound time builds ``RuleCls(call)`` with the node's evaluated constants and shapes
   (a cheap object, one per node and pass) and calls its methods.

Three families exist:

- ``AffineRule`` — ``f(x_1..x_n) = L(x_1..x_n) + b``. Needs ``forward`` (f; default: run the
  node), ``abs_linear`` (|L| applied to radii; op-specific) and ``transpose`` (Lᵀ; default:
  vector-Jacobian product of f, exact because f is affine). Interval, forward-symbolic and
  backward-symbolic propagation are all built from these three (plus, optionally, a direct
  ``linear`` = L, which saves the full-size ``f(x) - f(0)`` on the equations' k coefficient rows).
- ``ActivationRule`` — elementwise non-linear ``σ``: ``interval(l, u)`` and
  ``relax(l, u) -> Relaxation``.
- ``RelaxedRule`` — any other non-linear op of one or more inputs (MaxPool, the product of two
  perturbed tensors): ``interval(bounds)`` and ``relax(bounds) -> LinearBounds``, where
  ``bounds`` holds one ``(lower, upper)`` pair per perturbed input and the ``LinearBounds``
  are linear maps of the inputs (not necessarily elementwise, e.g. a per-window selection).

All tensors carry a leading "rows" axis ``N`` (samples, samples × k equation coefficient rows, or
samples × spec rows) followed by the node's per-sample shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robnet_svc.bounds.types import Relaxation

PERTURBED = object()  # marks the argument positions that carry the propagated tensor


@dataclass
class OpCall:
    """One graph node as a rule sees it.

    Attributes:
      name:       the fx node name (used in messages).
      module:     the ``nn.Module`` of a ``call_module`` node, else None.
      target:     the module, function or method name the node calls.
      args, kwargs: the node's arguments; perturbed positions hold ``PERTURBED``, the others
                  their (evaluated, possibly parameter-carrying) constant values.
      in_shapes:  per-sample shapes of the perturbed inputs, in argument order.
      out_shape:  per-sample shape of the output.
      kind:       "call_module" | "call_function" | "call_method".
    """

    name: str
    kind: str
    target: Any
    module: nn.Module | None
    args: tuple
    kwargs: dict
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shape: tuple[int, ...] | None = None

    @property
    def perturbed_positions(self) -> list[int]:
        return [i for i, a in enumerate(self.args) if a is PERTURBED]

    @property
    def constants(self) -> list[Any]:
        """The non-perturbed arguments, in order."""
        return [a for a in self.args if a is not PERTURBED]

    #: for one output of a tuple-valued op (Split, chunk): the index of that output, else None
    item: int | None = None

    def run(self, *xs: Tensor, args: tuple | None = None) -> Tensor:
        """Call the node's target with ``xs`` in the perturbed positions (or given ``args``);
        markers inside list/tuple arguments (``torch.cat([x, y])``) are filled in order."""
        it = iter(xs)

        def fill(a):
            if a is PERTURBED:
                return next(it)
            if isinstance(a, tuple):
                return tuple(fill(v) for v in a)
            if isinstance(a, list):
                return [fill(v) for v in a]
            return a

        full = tuple(fill(a) for a in (self.args if args is None else args))
        if self.kind == "call_module":
            out = self.module(*full, **self.kwargs)
        elif self.kind == "call_function":
            out = self.target(*full, **self.kwargs)
        else:
            out = getattr(full[0], self.target)(*full[1:], **self.kwargs)
        return out if self.item is None else out[self.item]


class OpRule:
    """Base class of every op rule (plugins subclass ``AffineRule`` or ``ActivationRule``)."""

    #: "affine", "activation" or "relaxed": which propagation family the engine uses.
    family: ClassVar[str] = "affine"
    #: True: perturbed tensors may sit inside list/tuple arguments (``torch.cat([x, y], 1)``).
    nested_inputs: ClassVar[bool] = False

    def __init__(self, call: OpCall):
        self.call = call

    @classmethod
    def check(cls, call: OpCall) -> str | None:
        """A one-line reason why this node cannot be bounded, or None (compile time; shapes
        unknown, constant values unknown: ``call.args`` holds fx nodes or literals there)."""
        return None

    @classmethod
    def resolve(cls, call: OpCall) -> "type[OpRule]":
        """The rule class that bounds this node (compile time). Default: ``cls`` itself; a
        target whose nodes need different families overrides it (a Mul by a constant is affine,
        a Mul of two perturbed tensors is not)."""
        return cls


class AffineRule(OpRule):
    """``f(x) = L(x) + b`` (one or more perturbed inputs, e.g. the residual Add)."""

    family = "affine"
    #: False when ``f(0) = 0`` (reshapes, permutations): skips the bias bookkeeping.
    has_bias: ClassVar[bool] = True

    def forward(self, *xs: Tensor) -> Tensor:
        """``f(x)``: ``[N, *in_shape]`` (each input) -> ``[N, *out_shape]``."""
        return self.call.run(*xs)

    def abs_linear(self, *rads: Tensor) -> Tensor:
        """``|L|(rad)``: ``[N, *in_shape]`` -> ``[N, *out_shape]`` (rads >= 0)."""
        raise NotImplementedError(f"{type(self).__name__} must define abs_linear")

    def bias(self, like: Tensor) -> Tensor:
        """``b = f(0)``: ``[1, *out_shape]`` (zero tensor when ``has_bias`` is False)."""
        zeros = [like.new_zeros((1, *s)) for s in self.call.in_shapes]
        return self.forward(*zeros)

    def linear(self, *xs: Tensor, bias: Tensor | None = None) -> Tensor:
        """``L(x) = f(x) - f(0)`` (``bias``: ``f(0)`` when the caller has it). Override when ``L``
        is one op; the result may be an input itself, so callers never modify it in place."""
        out = self.forward(*xs)
        if not self.has_bias:
            return out
        return out - (self.bias(xs[0]) if bias is None else bias)

    def transpose(self, lam: Tensor) -> tuple[Tensor, ...]:
        """``Lᵀ(Λ)``: ``[N, *out_shape]`` -> one ``[N, *in_shape]`` per perturbed input.

        Generic: the vector–Jacobian product of ``f`` (exact since ``f`` is affine;
        differentiable w.r.t. the parameters). Hot ops override it with a direct transpose.
        """
        primals = tuple(lam.new_zeros((lam.shape[0], *s)) for s in self.call.in_shapes)
        _, vjp_fn = torch.func.vjp(self.forward, *primals)
        return tuple(vjp_fn(lam))


class ActivationRule(OpRule):
    """An elementwise non-linear activation ``y = σ(x)``."""

    family = "activation"
    #: None, or a function ``(lower, upper) -> Relaxation`` equal to ``relax`` that
    #: ``torch.compile`` can trace whole (tensor code, no host synchronisation; non-negative
    #: slopes): then ``harden --compile`` runs this activation's SSIP step as fused kernels
    #: (robnet_svc/bounds/kernels.py). The ReLU has one.
    fused_relaxation = None

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Concrete bounds of ``σ(x)`` for ``x in [lower, upper]``."""
        raise NotImplementedError

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        """Linear lower and upper bounds of ``σ`` valid on ``[lower, upper]``."""
        raise NotImplementedError

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        """The neurons whose relaxation depends on the values of their bounds (a bool mask
        like ``lower``); on every other neuron ``relax`` gives the same lines on any sub-box
        of ``[lower, upper]``, so tighter bounds there change nothing. Full CROWN computes
        tight bounds only where this is True. None (the default, e.g. smooth activations):
        every neuron."""
        return None

    def identity_on(self, lower: Tensor, upper: Tensor) -> bool:
        """True when ``σ(x) = x`` on the whole box (then ``relax`` is ``x <= σ(x) <= x`` and
        ``interval`` returns the box): callers may skip both. One host synchronisation at most;
        the default (False) none."""
        return False


class LinearBounds:
    """Linear lower and upper bounds of a non-elementwise op ``y = g(x_1..x_n)`` valid on the
    input boxes they were built from:

        Σ_j A_j^lo(x_j) + lower_bias  <=  y  <=  Σ_j A_j^up(x_j) + upper_bias.

    Every tensor argument has a leading sample axis ``B`` and a rows axis ``m`` (equation
    coefficient rows, spec rows): ``[B, m, *shape]``; the relaxation's own tensors are per
    sample, ``[B, ...]``, and are broadcast over the rows.
    """

    lower_bias: Tensor  # [B, *out_shape]
    upper_bias: Tensor  # [B, *out_shape]

    def lower(self, ins: list[tuple[Tensor, Tensor]]) -> Tensor:
        """``Σ_j A_j^lo⁺(lo_j) + A_j^lo⁻(up_j)`` (no bias) for ``ins = [(lo_j, up_j)]``: a lower
        bound of ``Σ_j A_j^lo(x_j)`` whenever ``lo_j <= x_j <= up_j`` (forward symbolic bounds)."""
        raise NotImplementedError

    def upper(self, ins: list[tuple[Tensor, Tensor]]) -> Tensor:
        """``Σ_j A_j^up⁺(up_j) + A_j^up⁻(lo_j)`` (no bias): the matching upper bound."""
        raise NotImplementedError

    def backward(self, lam: Tensor) -> tuple[list[Tensor], Tensor]:
        """Λ through the op, ``lam [B, S, *out_shape]``: rows ``Λ_o >= 0`` take the lower bound,
        the others the upper one. Returns Λ per input ``[B, S, *in_shape_j]`` and the constant
        ``Σ_o Λ_o⁺ lower_bias_o + Λ_o⁻ upper_bias_o`` ``[B, S]``."""
        raise NotImplementedError


class RelaxedRule(OpRule):
    """A non-linear op whose relaxation is not elementwise, or that has several perturbed
    inputs: ``interval`` gives concrete output bounds, ``relax`` linear ones."""

    family = "relaxed"

    def interval(self, bounds: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Concrete bounds ``[B, *out_shape]`` of the output for inputs in the given boxes."""
        raise NotImplementedError

    def relax(self, bounds: list[tuple[Tensor, Tensor]]) -> LinearBounds:
        """Linear bounds of the output valid on the given input boxes."""
        raise NotImplementedError

