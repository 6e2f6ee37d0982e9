"""Normalising imported graphs so that every node is something the bound engine knows.

(The ONNX helper fills in ``normalize_graph``; ``BatchReshape`` is the contract with the engine.)
"""

from __future__ import annotations

import torch
from torch import nn


class BatchReshape(nn.Module):
    """Reshape every sample to ``shape`` (the batch axis is kept, whatever its size).

    Replaces exporter Reshape/Flatten patterns whose target shape was computed from the
    input's shape or hard-codes a batch size, so the graph runs at any batch size.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
