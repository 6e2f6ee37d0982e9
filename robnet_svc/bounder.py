"""The one object between the pipeline and the bound engine: network, method and perturbation.

A ``Bounder`` is built once, while a run's inputs are checked (``pipeline.prepare``), and
answers one question: *margin lower bounds for these images and labels*. It holds

- the compiled network (``robnet_svc.bounds.BoundNetwork``; ``bounder.module`` is the
  classifier it wraps, whose live parameters the bounds follow),
- the bound method, its mode fixed when it was constructed (``ordered=True`` for
  certification, ``ordered=False`` for training: robnet_svc/bounds/methods.py),
- the perturbation at its target radius.

Building one checks that the three fit together: the method's contract check
(``BoundMethod.check(perturbation, image_shape)``, a one-line reason or None) and the
compilation of the network with the registry's op rules (every plugin's, the built-ins
included), which names the first unsupported node. Certification, training, validation and
the training objective all take a ``Bounder``, so none of them can pair a network with a
method or a perturbation it was not checked with.
"""

from __future__ import annotations

import copy
import torch
from torch import Tensor, nn

from robnet_svc.errors import RobnetError


class Bounder:
    """``margin_lower(images, labels, eps=None)`` of ``module`` under ``method`` over ``perturbation``'s sets.

    ``module``: the classifier, or its compiled ``BoundNetwork``; ``image_shape``: ``(C, H, W)``
    of its inputs; ``rules``: the op-rule table (None: the registry's, built-ins and plugins);
    ``kernels``: the fused activation kernels its bounds run with (training only:
    robnet_svc/bounds/kernels.py, ``training_kernels`` by default, compiled with ``harden
    --compile``; None: the eager engine). The copies ``for_module`` and ``bound_copy`` make
    (certification's) never use them.
    RobnetError (one line) when the method cannot bound the perturbation's sets of that shape
    or the network has an unsupported operation.
    """

    def __init__(self, module: nn.Module, method, perturbation, image_shape: tuple[int, ...],
                 rules: dict | None = None, kernels=None):
        from robnet_svc.bounds import compile_network

        reason = method.check(perturbation, tuple(image_shape))
        if reason is not None:
            raise RobnetError(f"bound method {method.name!r} {reason}")
        self.net = compile_network(module, rules)
        self.method = method
        self.perturbation = perturbation
        self.image_shape = tuple(image_shape)
        self.kernels = kernels

    @property
    def module(self) -> nn.Module:
        """The classifier the bounds are of (its parameters are the compiled network's)."""
        return self.net.module

    def margin_lower(self, images: Tensor, labels: Tensor, eps: float | None = None) -> Tensor:
        """``[B, K-1]`` sound lower bounds of ``logit[label] - logit[i]`` (``i != label``, increasing)
        over the perturbation's set of each image ``images [B, C, H, W]`` (at ``eps``, default the
        perturbation's own radius); differentiable w.r.t. the parameters; dtype and device of ``images``."""
        return self.margin_lower_over(self.perturbation.affine_set(images, eps=eps), labels)

    def margin_lower_over(self, aset, labels: Tensor) -> Tensor:
        """The same over a given ``AffineSet`` (certification's per-sample radius search scales one)."""
        from robnet_svc.bounds.kernels import fused_activations

        with fused_activations(self.kernels):
            return self.method.margin_lower(self.net, aset, labels)

    def for_module(self, module: nn.Module) -> "Bounder":
        """The same method and perturbation for another network of the same inputs (the exported
        model, re-imported), compiled with the same op rules."""
        return Bounder(module, self.method, self.perturbation, self.image_shape, rules=self.net.rules)

    def bound_copy(self, dtype: torch.dtype) -> "Bounder":
        """This bounder on a copy of the network in ``dtype`` (certification bounds in float64 and
        leaves the model itself in its deployed precision)."""
        return Bounder(network_copy(self.net, dtype), self.method, self.perturbation, self.image_shape)


def network_copy(net, dtype: torch.dtype):
    """A copy of the compiled network ``net`` in ``dtype``, compiled with the same op rules. The
    module is copied and compiled again: copying the compiled plan would walk the fx graph's
    linked nodes recursively (Python's recursion limit on deep networks)."""
    from robnet_svc.bounds import compile_network

    module = copy.deepcopy(net.module).to(dtype)  # parameters and floating buffers (folded constants)
    return compile_network(module, rules=net.rules)
