"""Training back-propagates through the bounds: every parameter gets a gradient from every
method, and computing bounds leaves BatchNorm running statistics alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network
from robnet_svc.perturbations.base import DenseAffineSet
from robnet_svc.plugins import load_registry

METHODS = ("ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip")


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 3 * 3, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        x = (x - 0.5) / 0.25
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        h = self.pool(h).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _aset(b: int = 3, k: int = 4) -> DenseAffineSet:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, 6, 6, generator=gen)
    weights = images.unsqueeze(1) * torch.rand(1, k, 1, 6, 6, generator=gen)
    lower = torch.full((b, k), -0.05)
    upper = torch.full((b, k), 0.05)
    lower[:, 0], upper[:, 0] = 0.9, 1.1
    nominal = torch.zeros(b, k)
    nominal[:, 0] = 1.0
    return DenseAffineSet(weights, torch.zeros_like(images), lower, upper, nominal, clip=(0.0, 1.0))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_parameter(method):
    torch.manual_seed(0)
    model = SmallResNet().train()  # training mode: bounds still use BatchNorm running stats
    net = compile_network(model)
    stats = [b.clone() for b in model.buffers()]
    lower = load_registry().bound_method(method)().margin_lower(net, _aset(), torch.tensor([0, 1, 2]))
    assert lower.shape == (3, 3)
    lower.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{method}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{method}: non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"{method}: zero gradient for {name}"
    for before, after in zip(stats, model.buffers()):
        torch.testing.assert_close(before, after)  # running stats untouched by bounding


def test_bounds_follow_the_device_and_dtype_of_the_inputs():
    model = SmallResNet().double().eval()
    aset = _aset()
    aset = DenseAffineSet(aset.weights.double(), aset.offset.double(), aset.lower.double(), aset.upper.double(),
                          aset.nominal.double(), clip=aset.clip)
    lower = load_registry().bound_method("rsip-ssip")().margin_lower(compile_network(model), aset,
                                                                     torch.tensor([0, 1, 2]))
    assert lower.dtype == torch.float64 and lower.device == aset.lower.device


@pytest.mark.parametrize("method", METHODS)
def test_unordered_training_bounds_are_sound_differentiable_and_below_the_ordered_ones(method):
    """``ordered=False`` (what training uses) skips the passes that only enforce the ordering
    guarantees: still sound (sampled margins, box corners included, never below it), still
    differentiable, and never tighter than the ordered bound (which maxes over more candidates)."""
    torch.manual_seed(1)
    model = SmallResNet().double().eval()
    net = compile_network(model)
    base = _aset()
    aset = DenseAffineSet(base.weights.double(), base.offset.double(), base.lower.double(), base.upper.double(),
                          base.nominal.double(), clip=base.clip)
    labels = torch.tensor([0, 1, 2])
    cls = load_registry().bound_method(method)
    loose = cls(ordered=False).margin_lower(net, aset, labels)
    ordered = cls().margin_lower(net, aset, labels)
    assert (ordered >= loose - 1e-9).all(), f"{method}: ordered bound below the unordered one"
    coeffs = aset.sample(2000, torch.Generator().manual_seed(0))  # [B, n, k]
    with torch.no_grad():
        logits = model(aset.clipped(aset.images(coeffs)).flatten(0, 1)).reshape(3, 2000, -1)
    others = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, 4)]) for i in labels.tolist()])
    margins = logits.gather(2, labels.view(3, 1, 1).expand(3, 2000, 1)) - logits.gather(2, others.unsqueeze(1).expand(3, 2000, 3))
    assert (loose <= margins.min(1).values + 1e-9).all(), f"{method}: unordered bound is not sound"
    loose.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{method}: bad gradient for {name}"
