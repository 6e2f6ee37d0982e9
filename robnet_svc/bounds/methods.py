"""Bound methods (SPEC §3): the plugin base class and the built-in methods.

| name        | intermediate (activation-input) bounds | final margin bound                      |
|-------------|----------------------------------------|-----------------------------------------|
| ``ibp``       | interval                              | spec folded through the affine tail, interval |
| ``ssip``      | forward symbolic ∩ interval          | spec folded through the affine tail, symbolic |
| ``rsip-ibp``  | interval                              | backward symbolic (CROWN) from the spec |
| ``rsip-ssip`` | forward symbolic ∩ interval          | backward symbolic from the spec         |
| ``rsip``      | backward symbolic per layer ∩ interval | backward symbolic from the spec       |

``rsip``'s per-layer backward passes run only for the neurons whose relaxation needs them
(``RSIP._backward_intermediate``): the same bounds at a fraction of the cost.

Ordering guarantees (lower margin bounds; tests check them):

- ``ssip >= ibp``: SSIP returns the elementwise max of its symbolic bound, the interval bound
  through its intersected (tighter) activation bounds, and plain IBP (two extra forward
  passes on B rows: small next to the 2(k+1) of SSIP).
- ``rsip-ssip >= rsip-ibp`` and ``rsip >= rsip-ibp``: CROWN is *not* monotone in its
  intermediate bounds (tighter bounds can flip the lower slope α = [u >= -l] or change Λ's
  signs), so these methods also run the back-substitution with the IBP relaxations and return
  the elementwise max (both candidates are sound, so the max is). No violation was seen
  without the max on 1,280 sampled margins of random CNNs, but nothing guarantees it, and a
  certificate must not depend on luck. Cost: one more backward pass from the spec (K-1 rows)
  plus the plain IBP pass, i.e. about one ``rsip-ibp``.
- Every method ``>= ibp`` and ``rsip-ssip >= ssip``: a sound bound may always be replaced by a
  tighter sound one, so the backward methods also take the elementwise max with the bounds
  they hold anyway: the IBP bound through the plain interval pass, and (``rsip-ssip``) the SSIP
  bounds of its forward symbolic pass, which then runs to the output instead of stopping at
  the last activation's input. Cost: the tail of that pass (the layers after the last
  activation) and three spec folds through the affine tail.

Training does not need the ordering, only soundness: ``Method(ordered=False)`` skips those
passes (the mode is fixed when the method is constructed). ``rsip-ssip`` then runs one SSIP pass (its own
interval bounds are IBP ∩ SSIP already, since interval arithmetic is monotone) that stops at
the last activation's input, and one backward pass; ``ssip`` skips the plain IBP candidate.
Every bound stays sound; certification keeps the default ``ordered=True``.

All methods bound the bias-field transform network (``robnet_svc.bounds.graph``), are
batched over samples and spec rows, differentiable, and run on the device of the inputs.
BatchNorm is bounded as its eval-mode affine map (running statistics) even in training mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from robnet_svc.bounds.types import PreActivationBounds


class BoundMethod(ABC):
    """Base class of bound-method plugins.

    ``margin_lower(net, aset, labels)`` returns, for each sample ``b`` and each class
    ``i != labels[b]`` (in increasing ``i``), a sound lower bound of
    ``logit[label] - logit[i]`` over the whole perturbation set: ``[B, K-1]``.
    Differentiable w.r.t. the network parameters; batched; on the device of ``aset``.
    Constructed as ``cls(ordered=...)``; ``check(perturbation, image_shape)`` says, before any
    work, why the method cannot bound a perturbation's sets (one line) or None.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True when the method needs ``AffineSet.dense()`` (forward symbolic): refused for linf.
    needs_dense: ClassVar[bool] = False
    #: True: the bounds also satisfy the ordering guarantees of the module docstring
    #: (``ssip >= ibp``, ``rsip-ssip >= rsip-ibp``), which costs extra passes. False (training):
    #: any sound bound will do (every bound stays sound), so those passes are skipped.
    ordered: bool = True

    def __init__(self, *, ordered: bool = True):
        self.ordered = ordered

    def check(self, perturbation, image_shape: tuple[int, ...]) -> str | None:
        """Why this method cannot bound ``perturbation``'s sets of images ``(C, H, W)``, as a phrase
        that completes "bound method 'name' ..." (e.g. "needs ..."), or None when it can.

        The default refuses, for a method that ``needs_dense``, a perturbation whose sets cannot
        afford ``dense()`` (``Perturbation.supports_dense``, e.g. ``linf``). Override to add
        conditions of a new method (call ``super().check`` first)."""
        if self.needs_dense and not perturbation.supports_dense:
            return (f"needs a small number of perturbation coefficients; perturbation {perturbation.name!r} has "
                    f"{perturbation.num_coeffs(tuple(image_shape))}")
        return None

    @abstractmethod
    def margin_lower(self, net, aset, labels: Tensor) -> Tensor:
        """``[B, K-1]`` lower bounds of the margins ``y_label - y_i`` (i != label)."""


def _setup(net, aset, labels):
    from robnet_svc.bounds.graph import compile_network
    from robnet_svc.bounds.spec import spec_lambda

    net = compile_network(net)
    frame = net.frame(aset)
    return frame, spec_lambda(frame, labels, aset.lower)


class IBP(BoundMethod):
    """Interval bound propagation; the spec is folded through the affine tail before concretising."""

    name = "ibp"
    description = "interval bound propagation (cheapest, loosest)"

    def margin_lower(self, net, aset, labels: Tensor) -> Tensor:
        from robnet_svc.bounds.propagate import back_substitute, forward_pass, interval_frontier

        frame, lam = _setup(net, aset, labels)
        fwd = forward_pass(frame, aset)
        return back_substitute(frame, aset, frame.output, lam, frontier=interval_frontier(fwd))


class SSIP(BoundMethod):
    """Forward symbolic interval propagation in the coefficients (centre–radius form)."""

    name = "ssip"
    description = "forward symbolic bounds in the perturbation coefficients, intersected with IBP"
    needs_dense = True

    def margin_lower(self, net, aset, labels: Tensor) -> Tensor:
        from robnet_svc.bounds.propagate import (back_substitute, forward_pass, interval_frontier,
                                                 symbolic_frontier)

        frame, lam = _setup(net, aset, labels)
        out = frame.output
        if not self.ordered:  # training: the symbolic pass's own intervals are already IBP ∩ SSIP
            fwd = forward_pass(frame, aset, symbolic=True)
            symbolic = back_substitute(frame, aset, out, lam, frontier=symbolic_frontier(fwd))
            return torch.maximum(symbolic, back_substitute(frame, aset, out, lam, frontier=interval_frontier(fwd)))
        plain = forward_pass(frame, aset)
        fwd = forward_pass(frame, aset, symbolic=True, tighter=plain.pre)
        symbolic = back_substitute(frame, aset, out, lam, frontier=symbolic_frontier(fwd))
        through_tight = back_substitute(frame, aset, out, lam, frontier=interval_frontier(fwd))
        ibp = back_substitute(frame, aset, out, lam, frontier=interval_frontier(plain))
        return torch.maximum(torch.maximum(symbolic, through_tight), ibp)


class RSIP(BoundMethod):
    """Backward symbolic propagation (CROWN) from the spec, configured with its source of
    intermediate bounds: ``"ibp"``, ``"ssip"`` (∩ IBP) or ``"backward"`` (per-layer CROWN ∩ IBP)."""

    name = "rsip"
    description = "full CROWN: intermediate bounds by backward passes too (tightest; small networks)"
    intermediate: ClassVar[str] = "backward"
    #: Λ elements per chunk when bounding the neurons of a layer (full CROWN only): the memory
    #: budget of one backward pass, 128 MiB of float32 at the widest node.
    chunk_elements: ClassVar[int] = 1 << 25
    #: full CROWN hands the free heap back to the system after a chunk when the process's
    #: resident memory exceeds this (``alloc.release_free_memory_above``): the chunks' blocks
    #: fragment the tuned heap (DM-medium at batch 8 peaked anywhere from 2.3 to 8.7 GiB)
    heap_limit: ClassVar[int] = 6 << 30
    #: full CROWN bounds only the neurons whose relaxation needs them (False: every neuron;
    #: the same result, kept to check exactly that)
    sparse: ClassVar[bool] = True

    def margin_lower(self, net, aset, labels: Tensor) -> Tensor:
        from robnet_svc.bounds.propagate import (back_substitute, forward_pass, interval_frontier,
                                                 symbolic_frontier, uses_channels_last)

        frame, lam = _setup(net, aset, labels)
        # their narrow networks run faster NCHW (ops/conv.py); ``rsip-ibp`` only in training:
        # certification's ordered methods share one layout, so that each one's ``rsip-ibp`` part
        # rounds as ``rsip-ibp`` itself does and the ordering holds exactly
        if self.intermediate == "backward" or (self.intermediate == "ibp" and not self.ordered):
            from robnet_svc.bounds.ops.conv import CHANNELS_LAST_MIN_FULL_CROWN

            frame.channels_last_min = CHANNELS_LAST_MIN_FULL_CROWN
        out = frame.output
        if self.intermediate == "ssip" and not self.ordered:
            # training: one SSIP pass (its own intervals make it IBP ∩ SSIP), one backward pass
            pre = forward_pass(frame, aset, symbolic=True, pre_only=True).pre
            return back_substitute(frame, aset, out, lam, relax=_relaxations(frame, pre))
        plain = forward_pass(frame, aset)
        if self.intermediate == "ibp":
            crown = back_substitute(frame, aset, out, lam, relax=_relaxations(frame, plain.pre))
            if not self.ordered:
                return crown
            return torch.maximum(crown, back_substitute(frame, aset, out, lam, frontier=interval_frontier(plain)))
        held = []  # sound bounds this method computes on the way
        if self.intermediate == "ssip":  # ordered here: the whole pass, so SSIP's own bounds are held too
            fwd = forward_pass(frame, aset, symbolic=True, tighter=plain.pre)
            pre = fwd.pre
            held += [back_substitute(frame, aset, out, lam, frontier=symbolic_frontier(fwd)),
                     back_substitute(frame, aset, out, lam, frontier=interval_frontier(fwd))]
        else:
            pre = self._backward_intermediate(frame, aset, plain.pre)
        tight = back_substitute(frame, aset, out, lam, relax=_relaxations(frame, pre))
        if not self.ordered:
            return tight
        if self.intermediate == "backward":
            # ``rsip-ibp``'s and ``ibp``'s bounds as those methods compute them, in the default
            # layout when full CROWN's own frame lays tensors out otherwise (the threshold above):
            # the same bounds in another layout round otherwise, by enough to put ``rsip`` below
            # ``rsip-ibp`` (the property tests found 7.6e-6 on a float32 network)
            default, default_lam = _setup(net, aset, labels)
            if uses_channels_last(default, aset) != uses_channels_last(frame, aset):
                frame, lam, out, plain = default, default_lam, default.output, forward_pass(default, aset)
        held += [back_substitute(frame, aset, out, lam, relax=_relaxations(frame, plain.pre)),
                 back_substitute(frame, aset, out, lam, frontier=interval_frontier(plain))]
        for bound in held:
            tight = torch.maximum(tight, bound)
        return tight

    def _backward_intermediate(self, frame, aset, ibp_pre: dict) -> dict:
        """CROWN bounds of every activation input, layer by layer, each ∩ IBP.

        Sparse: the IBP box screens each layer, and only the neurons whose relaxation depends
        on their bounds (``rule.unstable`` on the box; every input of a ``RelaxedRule``) are
        back-substituted; the others keep their IBP box, which gives the same relaxation as any
        tighter box would. So the result equals bounding every neuron (``sparse = False``).
        (Screening with the interval pass through the CROWN bounds of the earlier layers was
        measured too: it changes the result and spares few neurons, since one layer of
        interval arithmetic over thousands of inputs is nearly as loose as IBP.)
        """
        from robnet_svc.bounds.alloc import release_free_memory_above
        from robnet_svc.bounds.propagate import neuron_bounds

        pre: dict = {}
        relax: dict = {}
        crown: dict[int, PreActivationBounds] = {}  # per plan node whose bounds an op needs

        def bounds_of(p: int, box: PreActivationBounds) -> PreActivationBounds:
            if p not in crown:
                mask = _needed_neurons(frame, ibp_pre, p, box) if self.sparse else None
                crown[p] = neuron_bounds(frame, aset, p, relax, box, mask, self.chunk_elements,
                                         lambda: release_free_memory_above(self.heap_limit))
            return crown[p]

        for i in sorted(ibp_pre):
            if frame.is_relaxed(i):
                pre[i] = [bounds_of(p, box) for p, box in zip(frame.nodes[i].inputs, ibp_pre[i])]
            else:
                pre[i] = bounds_of(frame.nodes[i].inputs[0], ibp_pre[i])
            relax[i] = _relax(frame, i, pre[i])
        return pre


def _needed_neurons(frame, ibp_pre: dict, p: int, box: PreActivationBounds) -> Tensor | None:
    """The ``[B, n]`` mask of node ``p``'s neurons whose relaxation, in some non-linear op that
    reads ``p``, depends on their bounds (None: all of them)."""
    mask = None
    for i in ibp_pre:
        if p not in frame.nodes[i].inputs:
            continue
        if frame.is_relaxed(i):
            return None
        unstable = frame.rule(i).unstable(box.lower, box.upper)
        if unstable is None:
            return None
        unstable = unstable.reshape(unstable.shape[0], -1)
        mask = unstable if mask is None else mask | unstable
    return mask


class RSIPIBP(RSIP):
    """CROWN-IBP: interval intermediate bounds, backward symbolic from the spec."""

    name = "rsip-ibp"
    description = "CROWN-IBP: interval intermediate bounds, backward symbolic final bound"
    intermediate = "ibp"


class RSIPSSIP(RSIP):
    """The paper's RSIP-SSIP: intermediate bounds = tightest of IBP and SSIP per neuron."""

    name = "rsip-ssip"
    description = "intermediate bounds from SSIP ∩ IBP, backward symbolic final bound (paper Alg. 1)"
    intermediate = "ssip"
    needs_dense = True


def _relax(frame, i: int, bounds):
    """The relaxation of non-linear node ``i`` on its input bounds (one ``PreActivationBounds``
    for an activation, a list of them for a ``RelaxedRule`` node)."""
    if isinstance(bounds, list):
        return frame.rule(i).relax([(p.lower, p.upper) for p in bounds])
    return frame.rule(i).relax(bounds.lower, bounds.upper)


def _relaxations(frame, pre: dict) -> dict:
    return {i: _relax(frame, i, b) for i, b in pre.items()}


BUILTIN_METHODS = (IBP, SSIP, RSIPIBP, RSIPSSIP, RSIP)
