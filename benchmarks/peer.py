"""Peer mode: the same measurements with auto_LiRPA, when it is importable (issue 20).

auto_LiRPA is not a dependency of robnet-svc. The package index has only 0.3, pinned to
torch < 1.13, which does not import with numpy 2; 0.7.1 from its repository imports with this
project's torch when its package folder is on ``PYTHONPATH`` (with appdirs, pyyaml, tqdm and
graphviz; its setup.py caps torch below 2.9, so ``pip install`` of it would replace torch).
Each of our methods is paired with its analogue, bounding the same network over the same
per-sample bias-field map:

| ours       | auto_LiRPA                  | measured as                   |
|------------|-----------------------------|-------------------------------|
| rsip-ibp   | ``CROWN-IBP``               | training step                 |
| ssip       | ``Forward``                 | training step                 |
| rsip-ssip  | ``Forward+Backward``        | training step                 |
| rsip       | ``CROWN``                   | certification (no_grad)       |

The peer bounds ``net(clip(W_b a + c_b))`` in the coefficients ``a`` (an L∞ box around the
box's centre with its radius), with ``W_b``/``c_b`` the perturbation's own per-sample affine
map, and the margin specification ``C`` of the same labels. The certification pair also
reports how far apart the two sides' margin bounds are (``max_abs_diff``: CROWN and our
``rsip`` are the same bound, so this is rounding). Its training step is ours with
the margin bounds replaced (the same hinge loss, backward and Adam). Both sides run in fresh
processes with the same allocator tuning (``bounds/alloc.py``), interleaved job by job.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: our method -> (auto_LiRPA method, kind of measurement)
ANALOGUES = {"rsip-ibp": ("CROWN-IBP", "train"), "ssip": ("Forward", "train"),
             "rsip-ssip": ("Forward+Backward", "train"), "rsip": ("CROWN", "cert")}
#: issue 20's targets: ours ÷ auto_LiRPA's analogue at most this
TARGETS = {"rsip-ibp": 0.8, "ssip": 0.6, "rsip-ssip": 0.6, "rsip": 1.0}


def unavailable() -> str | None:
    """Why peer mode cannot run here (one line), or None when auto_LiRPA is importable."""
    if importlib.util.find_spec("auto_LiRPA") is None:
        return "auto_LiRPA is not importable here: peer comparisons skipped"
    return None


class _CoefficientInput(nn.Module):
    """``(a [B, k+1], W [B, N, k+1]) -> net(clip(W a))``: the per-sample map ``W`` has the offset
    ``c`` as its last column (the last coefficient is fixed at 1) and is a second, unperturbed
    input. auto_LiRPA treats a buffer or parameter as shared by the batch: with ``bmm`` or a
    per-sample ``+ c`` it fails on shapes, and its forward mode fails on an element-wise product
    with a per-sample buffer; an element-wise product with a batched unperturbed input, then a
    sum, every mode bounds."""

    def __init__(self, net: nn.Module, image_shape, clip):
        super().__init__()
        self.net, self.image_shape, self.clip = net, tuple(image_shape), clip

    def forward(self, a: Tensor, weights: Tensor) -> Tensor:
        pixels = (weights * a.unsqueeze(1)).sum(-1)
        if self.clip is not None:  # clamp as lo + relu(x - lo) - relu(x - hi): auto_LiRPA's own clamp
            low, high = self.clip      # (BoundHardTanh) fails to trace with torch >= 2.9
            pixels = low + torch.relu(pixels - low) - torch.relu(pixels - high)
        return self.net(pixels.reshape(-1, *self.image_shape))


def _spec(labels: Tensor, classes: int) -> Tensor:
    """The margin rows ``e_label − e_i`` (i ≠ label): ``[B, K-1, K]``, as ours."""
    from robnet_svc.bounds.spec import margin_spec

    return margin_spec(labels, classes)


def margin_bounds(setup, method: str) -> Callable[[], Tensor]:
    """A closure returning auto_LiRPA's ``[B, K-1]`` margin lower bounds with ``method``."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    aset = setup.perturbation.affine_set(setup.images)
    weights, offset = aset.dense()  # [B, k, *image], [B, *image]
    b, k = weights.shape[:2]
    columns = torch.cat([weights.reshape(b, k, -1), offset.reshape(b, 1, -1)], 1).transpose(1, 2).detach().contiguous()
    wrapped = _CoefficientInput(setup.model, setup.images.shape[1:], getattr(setup.perturbation, "clip", (0.0, 1.0)))
    one = torch.ones_like(aset.lower[:, :1])
    lower, upper = torch.cat([aset.lower, one], 1), torch.cat([aset.upper, one], 1)
    mid = (lower + upper) / 2
    bounded = BoundedModule(wrapped, (mid, columns), device=str(setup.device))
    x = BoundedTensor(mid, PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper))
    spec = _spec(setup.labels, int(setup.model(setup.images[:1]).shape[-1])).to(mid.dtype)

    def run() -> Tensor:
        lower, _ = bounded.compute_bounds(x=(x, columns), C=spec, method=method, bound_upper=False)
        return lower
    return run


def train_step(setup, method: str) -> Callable[[], None]:
    """Our training step with auto_LiRPA's margin bounds (same loss, backward, Adam)."""
    from robnet_svc.training import robust_loss

    optimiser = torch.optim.Adam(setup.model.parameters(), lr=5e-4)
    bounds = margin_bounds(setup, method)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        setup.model.train()
        logits = setup.model(setup.images)
        setup.model.eval()
        loss = F.cross_entropy(logits, setup.labels) + robust_loss(bounds()).mean()
        loss.backward()
        optimiser.step()
    return step
