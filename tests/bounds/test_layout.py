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


@pytest.mark.parametrize("name", ["dm-small", "dm-medium", "dm-large"])
def test_layout_policy_follows_the_convolutions(name):
    """Channels-last when most 2-D convolutions reading more than one channel ask for it (every
    one does): the DM networks (3 and 16; 3, 32, 32, 64; ...) and an MRI-shaped net on grey images
    (1 abstains; 16, 32); NCHW for a network without 2-D convolutions (no votes) and for one whose
    convolutions are 1-D."""
    from robnet_svc.models import REFERENCE_MODELS

    images = torch.rand(1, 3, 32, 32)
    aset = load_registry().perturbation("bias-field")(0.1, order=1, mode="mult").affine_set(images)
    assert compile_network(REFERENCE_MODELS[name]()).frame(aset).prefers_channels_last
    mri = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 3))
    grey = load_registry().perturbation("bias-field")(0.1, order=1, mode="mult").affine_set(torch.rand(1, 1, 32, 32))
    assert compile_network(mri).frame(grey).prefers_channels_last
    lone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 3))
    assert not compile_network(lone).frame(grey).prefers_channels_last  # its only convolution abstains
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


@pytest.mark.parametrize("channels", [3, 1])
def test_bias_field_builds_its_weights_channels_last(channels):
    """A channels-last pass asks the set for its weights in that layout (``dense_channels_last``);
    the multiplicative bias field builds them so, no copy needed (``channels_last`` hands them back
    as they are), bit for bit ``dense()``'s, and the pass's image rows are laid out so."""
    torch.manual_seed(0)
    images = torch.rand(2, channels, 8, 8, dtype=torch.float64)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="mult").affine_set(images)
    weights, offset = aset.dense()
    weights_cl, offset_cl = aset.dense_channels_last()
    assert weights.is_contiguous() and weights.stride(2) == 64 and weights_cl.stride(2) == 1
    assert torch.equal(weights_cl, weights) and torch.equal(offset_cl, offset)
    assert channels_last(weights_cl, 2) is weights_cl
    model = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 3)).double()
    frame = compile_network(model).frame(aset)
    assert frame.prefers_channels_last
    rows = forward_pass(frame, aset, symbolic=True).symbolic[0].centre.coef
    assert rows.stride(2) == 1 and torch.equal(rows, weights)


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


def test_dense_layer_reads_the_unflattened_channels_last_rows(monkeypatch):
    """Flatten -> Linear on channels-last rows: the SSIP pass leaves the flatten's rows unformed
    and the dense layer's bounds equal those through the flatten (float64, to rounding)."""
    model, aset, _ = _setting()
    frame = compile_network(model).frame(aset)
    flatten = next(i for i in range(1, len(frame.nodes)) if frame.dense_after_flatten(i) is not None)
    dense = frame.dense_after_flatten(flatten)
    fwd = forward_pass(frame, aset, symbolic=True)
    assert fwd.symbolic[flatten] is None and fwd.symbolic[dense] is not None
    monkeypatch.setattr(graph.Frame, "dense_after_flatten", lambda self, i: None)
    ref = forward_pass(compile_network(model).frame(aset), aset, symbolic=True)
    assert ref.symbolic[flatten] is not None
    for got, want in ((fwd.symbolic[dense].centre, ref.symbolic[dense].centre),
                      (fwd.symbolic[dense].radius, ref.symbolic[dense].radius)):
        torch.testing.assert_close(got.coef, want.coef, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.const, want.const, rtol=1e-12, atol=1e-12)
    for i in fwd.pre:
        torch.testing.assert_close(fwd.pre[i].lower, ref.pre[i].lower, rtol=1e-12, atol=1e-12)


class _TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc, self.skip = nn.Linear(4 * 8 * 8, 4), nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(h) + self.skip(h)


@pytest.mark.parametrize("case", ["two readers", "not dense", "not a flatten"])
def test_flatten_stays_a_node_unless_one_dense_layer_reads_it(case):
    """``Frame.dense_after_flatten`` only pairs a flatten with the single ``nn.Linear`` reading it;
    other shapes keep the node-by-node pass, with margins that still bound sampled perturbations."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = {"two readers": _TwoReaders(),
             "not dense": nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.ReLU(), nn.Linear(256, 4)),
             "not a flatten": nn.Sequential(conv, nn.ReLU(), nn.Unflatten(1, (2, 2)), nn.Flatten(2),
                                            nn.Flatten(), nn.Linear(256, 4))}[case].double().eval()
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    aset = load_registry().perturbation("bias-field")(0.3, order=1, mode="mult").affine_set(images)
    frame = compile_network(model).frame(aset)
    assert frame.prefers_channels_last
    paired = [i for i in range(1, len(frame.nodes)) if frame.dense_after_flatten(i) is not None]
    # "not a flatten": only the last Flatten ([2, 2, 64] -> [256]) is one; the [4, 8, 8] -> [2, 2, 8, 8]
    # and [2, 2, 8, 8] -> [2, 2, 64] reshapes are not
    assert len(paired) == (1 if case == "not a flatten" else 0)
    labels = model(images).argmax(1)
    lower = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset, labels)
    with torch.no_grad():
        xs = aset.clipped(aset.images(aset.sample(128, torch.Generator().manual_seed(1))))
        logits = model(xs.flatten(0, 1)).reshape(*xs.shape[:2], -1)
    for b in range(len(labels)):
        margins = logits[b, :, labels[b], None] - logits[b]
        others = torch.cat([margins[:, :labels[b]], margins[:, labels[b] + 1:]], 1)
        assert (others.amin(0) >= lower[b] - 1e-9).all()


def test_full_crown_keeps_narrow_networks_nchw(monkeypatch):
    """``rsip`` (full CROWN) and training's ``rsip-ibp`` vote with ``CHANNELS_LAST_MIN_FULL_CROWN``:
    DM-small (3, 16 channels) runs NCHW there and channels-last in ``ssip``, ``rsip-ssip`` and
    certification's ``rsip-ibp`` (the ordered methods share a layout); DM-medium (3, 32, 32, 64)
    would run channels-last in all."""
    from robnet_svc.bounds.ops.conv import CHANNELS_LAST_MIN_FULL_CROWN
    from robnet_svc.models import REFERENCE_MODELS

    frames = []
    make_frame = graph.BoundNetwork.frame
    monkeypatch.setattr(graph.BoundNetwork, "frame", lambda self, aset: frames.append(make_frame(self, aset))
                        or frames[-1])
    images = torch.rand(1, 3, 32, 32)
    aset = load_registry().perturbation("bias-field")(0.01, order=1, mode="mult").affine_set(images)
    net = compile_network(REFERENCE_MODELS["dm-small"]().eval())
    labels = net(images).argmax(1)
    for method, ordered, expected in (("ssip", True, True), ("rsip-ssip", True, True), ("rsip", True, False),
                                      ("rsip", False, False), ("rsip-ibp", False, False), ("rsip-ibp", True, True)):
        start = len(frames)
        with torch.no_grad():
            load_registry().bound_method(method)(ordered=ordered).margin_lower(net, aset, labels)
        assert frames[start].prefers_channels_last is expected, (method, ordered)
        # certification's rsip computes the rsip-ibp and ibp bounds it keeps in their own layout
        assert [f.prefers_channels_last for f in frames[start + 1:]] == ([True] if (method, ordered) == ("rsip", True)
                                                                         else []), (method, ordered)
    wide = compile_network(REFERENCE_MODELS["dm-medium"]()).frame(aset)
    wide.channels_last_min = CHANNELS_LAST_MIN_FULL_CROWN
    assert wide.prefers_channels_last


def test_full_crown_is_at_least_crown_ibp_and_ibp_exactly():
    """Full CROWN (``rsip``) runs narrow convolutions NCHW (its 32-channel threshold), ``rsip-ibp``
    and ``ibp`` in certification channels-last (the default): in certification ``rsip`` still
    returns at least their bounds, exactly (it computes them as they do), not only up to the
    rounding of another layout. A float32 network of 1→6→6-channel convolutions without ReLUs
    (only the clipping layer's): full CROWN's own bound equals CROWN-IBP's but for rounding."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(),
                          nn.Linear(6 * 5 * 4, 3)).eval()
    images = torch.rand(16, 1, 5, 4)
    aset = load_registry().perturbation("bias-field")(0.01, order=1, mode="both", clip=(0.0, 1.0)).affine_set(images)
    labels = model(images).argmax(1)
    net = compile_network(model)
    frame = net.frame(aset)
    assert frame.prefers_channels_last  # the default threshold: channels-last
    frame.channels_last_min = 32
    assert not frame.prefers_channels_last  # full CROWN's: NCHW
    with torch.no_grad():
        got = {m: load_registry().bound_method(m)().margin_lower(net, aset, labels) for m in ("ibp", "rsip-ibp", "rsip")}
    assert (got["rsip"] >= got["rsip-ibp"]).all() and (got["rsip"] >= got["ibp"]).all()
    assert (got["rsip-ibp"] >= got["ibp"]).all()
