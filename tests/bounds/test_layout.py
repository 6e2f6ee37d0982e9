"""The CPU pass lays image-shaped tensors out channels-last for networks with wide 2-D
convolutions (``propagate._layout``): the layout changes summation orders only, never values
beyond rounding, and the helpers that flatten neurons follow each tensor's memory order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network
from robnet_svc.bounds import graph
from robnet_svc.bounds.propagate import channels_last, forward_pass, memory_order, row_dot
from robnet_svc.plugins import load_registry

METHODS = ("ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip")


def test_memory_order_names_the_innermost_axis_last():
    t = torch.randn(2, 5, 3, 4)
    assert memory_order(t) == [0, 1, 2, 3]
    assert memory_order(channels_last(t)) == [0, 2, 3, 1]
    assert memory_order(channels_last(torch.randn(2, 7, 5, 3, 4), lead=2)[:, 0]) == [0, 2, 3, 1]
    assert torch.equal(channels_last(t), t)


@pytest.mark.parametrize("lam_cl", [False, True])
@pytest.mark.parametrize("v_cl", [False, True])
def test_row_dot_in_any_layout(lam_cl, v_cl):
    g = torch.Generator().manual_seed(0)
    lam = torch.randn(3, 4, 5, 6, 7, generator=g, dtype=torch.float64)
    v = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    want = torch.einsum("bschw,bchw->bs", lam, v)
    got = row_dot(channels_last(lam, 2) if lam_cl else lam, channels_last(v) if v_cl else v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class WideCNN(nn.Module):
    """Convolutions reading 3 and 32 channels (the second asks for channels-last), a residual
    add, average pooling and a flatten into linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(32 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(h + self.conv3(h))
        h = self.pool(h).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class WideMixed(nn.Module):
    """The relaxed ops on channels-last tensors: MaxPool, a squeeze-excitation product, split and
    concat, BatchNorm and SiLU, with convolutions reading 3, 32, 32 and 32 channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.gate = nn.Conv2d(32, 32, 1)
        self.conv3 = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 4)
        with torch.no_grad():
            self.gate.bias.fill_(0.5)
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        a, b = torch.chunk(h, 2, 1)
        h = nn.functional.silu(self.bn(self.conv2(torch.cat([b, a], 1))))
        h = h * torch.relu(self.gate(h.mean(dim=(2, 3), keepdim=True)))
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv3(h)), 2).flatten(1))


def _setting(dtype=torch.float64, network=None):
    torch.manual_seed(0)
    model = (network or WideCNN)().to(dtype).eval()
    images = torch.rand(3, 3, 8, 8, dtype=dtype)
    aset = load_registry().perturbation("bias-field")(0.3, order=1, mode="mult").affine_set(images)
    return model, aset, model(images).argmax(1)


@pytest.mark.parametrize("name, expected", [("dm-small", False), ("dm-medium", True), ("dm-large", True)])
def test_layout_policy_follows_the_convolutions(name, expected):
    """Channels-last when most 2-D convolutions read >= 32 channels: DM-small's read 3 and 16,
    DM-medium's 3, 32, 32, 64; an MRI-shaped net (1, 16, 32) stays NCHW; so does the CPU pass
    of a network without convolutions."""
    from robnet_svc.models import REFERENCE_MODELS

    images = torch.rand(1, 3, 32, 32)
    aset = load_registry().perturbation("bias-field")(0.1, order=1, mode="mult").affine_set(images)
    assert compile_network(REFERENCE_MODELS[name]()).frame(aset).prefers_channels_last is expected
    mri = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 3))
    grey = load_registry().perturbation("bias-field")(0.1, order=1, mode="mult").affine_set(torch.rand(1, 1, 32, 32))
    assert not compile_network(mri).frame(grey).prefers_channels_last
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.ReLU(), nn.Linear(8, 3))
    assert not compile_network(mlp).frame(aset).prefers_channels_last


def test_wide_network_runs_channels_last():
    model, aset, _ = _setting()
    frame = compile_network(model).frame(aset)
    assert frame.prefers_channels_last
    fwd = forward_pass(frame, aset, symbolic=True)
    conv2 = next(i for i, n in enumerate(frame.nodes) if len(frame.shapes[i]) == 3 and frame.shapes[i][1] == 4)
    assert memory_order(fwd.symbolic[conv2].centre.coef[:, 0]) == [0, 2, 3, 1]
    assert memory_order(fwd.intervals[conv2].mid) == [0, 2, 3, 1]


@pytest.mark.parametrize("network", [WideCNN, WideMixed])
@pytest.mark.parametrize("method", METHODS)
def test_channels_last_bounds_and_gradients_equal_nchw(method, network, monkeypatch):
    """Margins and their parameter gradients, in float64: channels-last (the policy) and NCHW
    (the policy switched off) agree to rounding, and the margins bound sampled perturbations."""
    results = []
    for layout in ("policy", "nchw"):
        if layout == "nchw":
            monkeypatch.setattr(graph.Frame, "prefers_channels_last", property(lambda self: False))
        model, aset, labels = _setting(network=network)
        net = compile_network(model)
        assert net.frame(aset).prefers_channels_last is (layout == "policy")
        lower = load_registry().bound_method(method)().margin_lower(net, aset, labels)
        if layout == "policy":  # sound: below the margins of 256 sampled coefficient vectors
            with torch.no_grad():
                images = aset.clipped(aset.images(aset.sample(256, torch.Generator().manual_seed(1))))
                logits = model(images.flatten(0, 1)).reshape(*images.shape[:2], -1)
                true = logits.gather(2, labels.view(-1, 1, 1).expand(-1, images.shape[1], 1)) - logits
                others = torch.stack([true[i, :, [j for j in range(logits.shape[2]) if j != labels[i]]]
                                      for i in range(len(labels))])
                assert (others.amin(1) >= lower.detach() - 1e-9).all()
        lower.sum().backward()
        results.append((lower.detach(), [p.grad for p in model.parameters()]))
    (lo_cl, grads_cl), (lo_nchw, grads_nchw) = results
    assert torch.isfinite(lo_cl).all()
    torch.testing.assert_close(lo_cl, lo_nchw, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads_cl, grads_nchw):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
