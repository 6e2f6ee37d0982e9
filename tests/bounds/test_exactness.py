"""Networks without ReLU and without clipping: ssip and every rsip-* give the exact range of
each margin (the composition with the transform is affine in the coefficients, so the minimum
over the box has a closed form); a single linear layer matches the hand-written closed form
for every method, ibp included (the spec is folded into the last affine layer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network, margin_spec
from robnet_svc.perturbations.base import DenseAffineSet

EXACT_METHODS = ("ssip", "rsip-ibp", "rsip-ssip", "rsip")
ALL_METHODS = ("ibp",) + EXACT_METHODS


class AffineResidual(nn.Module):
    """Every affine op of SPEC §3 in one ReLU-free graph: normalisation, conv (stride, groups),
    BatchNorm, pad, avgpool, residual add and sub, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.pad = nn.ZeroPad2d(1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        x = (x - 0.4) / 0.3
        h = self.conv1(x)
        h = h + self.bn(self.conv2(h))
        h = self.pool(self.pad(h)) * 2.0
        return self.fc(torch.flatten(h, 1)) - 0.5


def _random_set(b: int, k: int, shape, generator) -> DenseAffineSet:
    weights = torch.randn(b, k, *shape, generator=generator, dtype=torch.float64)
    offset = torch.rand(b, *shape, generator=generator, dtype=torch.float64)
    lower = -torch.rand(b, k, generator=generator, dtype=torch.float64)
    upper = torch.rand(b, k, generator=generator, dtype=torch.float64)
    return DenseAffineSet(weights, offset, lower, upper, (lower + upper) / 2, clip=None)


def _exact_margin_minimum(module, aset, labels, classes):
    """min over the box of the affine margins, via their gradient in ``a`` (closed form)."""
    b, k = aset.lower.shape
    spec = margin_spec(labels, classes).to(torch.float64)
    a0 = torch.zeros(b, 1, k, dtype=torch.float64, requires_grad=True)

    def margins(a):
        y = module(aset.images(a).reshape(b, *aset.image_shape)).reshape(b, classes)
        return torch.einsum("bsk,bk->bs", spec, y)

    at_zero = margins(a0.squeeze(1).unsqueeze(1))
    grads = torch.stack([torch.autograd.grad(at_zero[:, s].sum(), a0, retain_graph=True)[0].squeeze(1)
                         for s in range(classes - 1)], 1)  # [B, K-1, k]
    mid, rad = (aset.lower + aset.upper) / 2, (aset.upper - aset.lower) / 2
    return at_zero.detach() + (grads * mid.unsqueeze(1)).sum(-1) - (grads.abs() * rad.unsqueeze(1)).sum(-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_free_network_gets_exact_bounds(registry, seed):
    torch.manual_seed(seed)
    module = AffineResidual().double().eval()
    module.bn.running_mean.uniform_(-1, 1), module.bn.running_var.uniform_(0.5, 2)
    gen = torch.Generator().manual_seed(seed)
    aset = _random_set(3, 4, (2, 6, 6), gen)
    labels = torch.tensor([0, 3, 4])
    exact = _exact_margin_minimum(module, aset, labels, 5)
    net = compile_network(module)
    for name in EXACT_METHODS:
        lower = registry.bound_method(name)().margin_lower(net, aset, labels)
        torch.testing.assert_close(lower, exact, rtol=1e-9, atol=1e-9, msg=name)
    ibp = registry.bound_method("ibp")().margin_lower(net, aset, labels)
    assert (ibp <= exact + 1e-9).all()


def test_single_linear_layer_matches_closed_form(registry):
    """y = V (W a + c) + d; margin row i: (e_l - e_i)ᵀ y = gᵀ a + h with g = Wᵀ Vᵀ (e_l - e_i),
    whose minimum over [lo, hi] is h + Σ_j min(g_j lo_j, g_j hi_j)."""
    gen = torch.Generator().manual_seed(7)
    b, k, n, classes = 4, 3, 6, 4
    layer = nn.Linear(n, classes).double()
    aset = _random_set(b, k, (n,), gen)
    labels = torch.tensor([0, 1, 2, 3])
    V, d = layer.weight.detach(), layer.bias.detach()
    expected = torch.empty(b, classes - 1, dtype=torch.float64)
    for s in range(b):
        others = [i for i in range(classes) if i != labels[s]]
        for r, i in enumerate(others):
            row = V[labels[s]] - V[i]
            g = aset.weights[s] @ row  # [k]
            h = row @ aset.offset[s] + d[labels[s]] - d[i]
            expected[s, r] = h + torch.minimum(g * aset.lower[s], g * aset.upper[s]).sum()
    net = compile_network(layer)
    for name in ALL_METHODS:
        lower = registry.bound_method(name)().margin_lower(net, aset, labels)
        torch.testing.assert_close(lower, expected, rtol=1e-10, atol=1e-10, msg=name)


def test_margin_spec_rows():
    spec = margin_spec(torch.tensor([0, 2]), 3)
    expected = torch.tensor([[[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]],
                             [[-1.0, 0.0, 1.0], [0.0, -1.0, 1.0]]])
    torch.testing.assert_close(spec, expected)
