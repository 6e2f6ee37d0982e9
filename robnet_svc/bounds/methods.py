"""Bound methods (SPEC §3): the plugin base class. Implementations: robnet_svc.bounds.* (engine helper fills in)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor


class BoundMethod(ABC):
    """Base class of bound-method plugins.

    ``margin_lower(net, aset, labels)`` returns, for each sample ``b`` and each class
    ``i != labels[b]`` (in increasing ``i``), a sound lower bound of
    ``logit[label] - logit[i]`` over the whole perturbation set: ``[B, K-1]``.
    Differentiable w.r.t. the network parameters; batched; on the device of ``aset``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True when the method needs ``AffineSet.dense()`` (forward symbolic): refused for linf.
    needs_dense: ClassVar[bool] = False

    @abstractmethod
    def margin_lower(self, net, aset, labels: Tensor) -> Tensor:
        """``[B, K-1]`` lower bounds of the margins ``y_label - y_i`` (i != label)."""
