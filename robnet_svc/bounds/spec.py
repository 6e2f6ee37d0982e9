"""The robustness specification: margins ``y_label − y_i`` for every ``i != label``."""

from __future__ import annotations

import torch
from torch import Tensor


def margin_spec(labels: Tensor, num_classes: int) -> Tensor:
    """Rows ``e_label − e_i`` for ``i != label`` in increasing ``i``: labels ``[B]`` -> ``[B, K-1, K]``."""
    k = int(num_classes)
    eye = torch.eye(k, device=labels.device)
    steps = torch.arange(k - 1, device=labels.device).unsqueeze(0)
    others = steps + (steps >= labels.unsqueeze(1)).long()
    return eye[labels].unsqueeze(1) - eye[others]


def spec_lambda(frame, labels: Tensor, like: Tensor) -> Tensor:
    """The spec as Λ at the output node: ``[B, K-1, *output_shape]`` (dtype/device of ``like``)."""
    out_shape = frame.shapes[frame.output]
    num_classes = 1
    for d in out_shape:
        num_classes *= d
    spec = margin_spec(labels.to(like.device), num_classes).to(like.dtype)
    return spec.reshape(spec.shape[0], spec.shape[1], *out_shape)
