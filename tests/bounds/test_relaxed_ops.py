"""Issue 12's rules one by one: MaxPool's and the product's linear bounds (sound on sampled
inputs, exact where MaxPool has a dominant input, the interval exact), Concat with constants,
refused normalisations, gradients through every method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robnet_svc.bounds import compile_network
from robnet_svc.bounds.ops.maxpool import MaxPoolRule
from robnet_svc.bounds.ops.product import ProductRule
from robnet_svc.errors import RobnetError
from robnet_svc.perturbations.base import DenseAffineSet
from robnet_svc.plugins import load_registry

from .strategies import METHODS



def _frame(module: nn.Module, in_shape):
    net = compile_network(module)
    aset = DenseAffineSet(torch.zeros(1, 1, *in_shape, dtype=torch.float64), torch.zeros(1, *in_shape, dtype=torch.float64),
                          torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                          torch.zeros(1, 1, dtype=torch.float64), clip=None)
    return net.frame(aset)


def _box(shape, gen, width=1.0):
    lower = torch.randn(shape, generator=gen, dtype=torch.float64)
    return lower, lower + torch.rand(shape, generator=gen, dtype=torch.float64) * width


def _inside(lower, upper, n, gen):
    """``n`` points per sample in the box, corners first: ``[B, n, *shape]``."""
    t = torch.rand((lower.shape[0], n, *lower.shape[1:]), generator=gen, dtype=torch.float64)
    t[:, : n // 4] = t[:, : n // 4].round()
    return lower.unsqueeze(1) + t * (upper - lower).unsqueeze(1)


def _check_linear_bounds(rule, boxes, fn, gen, n=400):
    """Interval and linear bounds enclose ``fn`` at sampled points; Λ-backward matches the forward form."""
    lo_out, up_out = rule.interval(boxes)
    bounds = rule.relax(boxes)
    points = [_inside(lo, up, n, gen) for lo, up in boxes]
    b = boxes[0][0].shape[0]
    y = fn(*(p.reshape(b * n, *p.shape[2:]) for p in points)).reshape(b, n, *lo_out.shape[1:])
    assert (y >= lo_out.unsqueeze(1) - 1e-12).all() and (y <= up_out.unsqueeze(1) + 1e-12).all()
    exact = [(p, p) for p in points]
    lower = bounds.lower(exact) + bounds.lower_bias.unsqueeze(1)
    upper = bounds.upper(exact) + bounds.upper_bias.unsqueeze(1)
    assert (lower <= y + 1e-12).all() and (y <= upper + 1e-12).all()
    # backward with Λ = ±e_o reproduces the lower / upper planes at every sampled point
    m = lo_out[0].numel()
    eye = torch.eye(m, dtype=torch.float64).reshape(m, *lo_out.shape[1:])
    for sign, ref in ((1.0, lower), (-1.0, upper)):
        lams, const = bounds.backward((sign * eye).unsqueeze(0).expand(b, -1, *eye.shape[1:]))
        value = const.unsqueeze(1) + sum(torch.einsum("bsi,bni->bns", lam.flatten(2), p.flatten(2))
                                         for lam, p in zip(lams, points))
        torch.testing.assert_close(sign * value, ref.flatten(2), rtol=1e-10, atol=1e-10)
    return bounds


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                                  nn.MaxPool2d(3, 1, padding=1, dilation=2), nn.MaxPool2d((2, 3), (1, 2))])
def test_maxpool_bounds_are_sound_and_exact_where_one_input_dominates(pool):
    gen = torch.Generator().manual_seed(0)
    in_shape = (2, 5, 6)
    frame = _frame(pool, in_shape)
    rule = frame.rule(1)
    assert isinstance(rule, MaxPoolRule)
    lower, upper = _box((3, *in_shape), gen, width=0.3)
    bounds = _check_linear_bounds(rule, [(lower, upper)], pool, gen)
    lo_out, up_out = rule.interval([(lower, upper)])
    torch.testing.assert_close(lo_out, pool(lower)), torch.testing.assert_close(up_out, pool(upper))
    # where one input dominates, lower and upper bounds coincide (y = x_j*); with narrow boxes
    # and spread-out values most windows have a dominant input
    dominant = bounds.dominant.bool()
    assert dominant.any() and (~dominant).any()
    torch.testing.assert_close(bounds.upper_bias.flatten(2)[dominant], torch.zeros(int(dominant.sum()),
                                                                                  dtype=torch.float64))
    x = _inside(lower, upper, 5, gen)
    y_lo = bounds.lower([(x, x)])
    y_up = bounds.upper([(x, x)]) + bounds.upper_bias.unsqueeze(1)
    keep = dominant.reshape(3, 1, -1).expand(3, 5, -1)
    torch.testing.assert_close(y_lo.flatten(2)[keep], y_up.flatten(2)[keep])


def test_maxpool_padding_never_wins():
    """All inputs negative: a zero-padded max would be 0; the -inf semantics keep the true max."""
    pool = nn.MaxPool2d(3, 1, padding=1)
    rule = _frame(pool, (1, 3, 3)).rule(1)
    lower = -torch.arange(2.0, 11.0, dtype=torch.float64).reshape(1, 1, 3, 3)
    upper = lower + 0.5
    lo, up = rule.interval([(lower, upper)])
    assert (up < 0).all()
    torch.testing.assert_close(lo, pool(lower))


def test_maxpool1d_functional():
    rule = _frame(_Fn(lambda x: F.max_pool1d(x, 3, stride=2, padding=1, ceil_mode=True)), (2, 7)).rule(1)
    gen = torch.Generator().manual_seed(1)
    lower, upper = _box((2, 2, 7), gen)
    _check_linear_bounds(rule, [(lower, upper)], lambda x: F.max_pool1d(x, 3, 2, 1, ceil_mode=True), gen)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _SE(nn.Module):
    """``x * s`` with ``s = mean over space`` (``[C, 1, 1]``): broadcasting product."""

    def forward(self, x):
        return x * x.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("case", ["same_shape", "broadcast"])
def test_product_mccormick_bounds_are_sound_with_broadcasting(case):
    gen = torch.Generator().manual_seed(2)
    shapes = [(3, 4, 5), (3, 4, 5)] if case == "same_shape" else [(3, 4, 5), (3, 1, 1)]

    class Two(nn.Module):
        def forward(self, x):
            return x[:, :, :, :5] * x[:, :, :1, 5:6] if case == "broadcast" else x[:, :, :, :5] * x[:, :, :, 5:]

    frame = _frame(Two(), (3, 4, 10))
    i = next(i for i in range(1, len(frame.nodes)) if frame.is_relaxed(i))
    rule = frame.rule(i)
    assert isinstance(rule, ProductRule)
    boxes = [_box((2, *s), gen, width=2.0) for s in shapes]
    _check_linear_bounds(rule, boxes, torch.mul, gen)


def test_concat_with_a_constant_block_matches_its_jacobian():
    const = torch.randn(1, 2, 3, dtype=torch.float64)

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", const)

        def forward(self, x):
            return torch.cat([self.c, x], 1)

    frame = _frame(Cat().double(), (3, 3))
    rule = frame.rule(1)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(rule.forward(x), torch.cat([const.expand(4, 2, 3), x], 1))
    torch.testing.assert_close(frame.bias(1, x), torch.cat([const, torch.zeros(1, 3, 3, dtype=torch.float64)], 1))
    torch.testing.assert_close(rule.abs_linear(x.abs()), torch.cat([torch.zeros(4, 2, 3, dtype=torch.float64),
                                                                    x.abs()], 1))
    lam = torch.randn(4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(rule.transpose(lam)[0], lam[:, 2:])


@pytest.mark.parametrize("layer,what", [
    (nn.LayerNorm([2, 4, 4]), "square root"), (nn.GroupNorm(1, 2), "square root"),
    (nn.InstanceNorm2d(2), "square root"), (nn.Softmax(dim=1), "division")])
def test_input_statistics_normalisation_is_refused_with_the_reason(layer, what):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(RobnetError, match=what) as info:
        compile_network(model)
    assert type(layer).__name__ in str(info.value) and "not supported" in str(info.value)


class _Mixed(nn.Module):
    """MaxPool, a squeeze-excitation product, split, concat, resize and a mean in one net."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.gate = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.gate.bias.fill_(0.5)  # a gate that is open (a dead ReLU would stop every gradient)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        a, b = torch.chunk(h, 2, 1)
        h = torch.cat([b, a], 1)
        h = h * torch.relu(self.gate(h.mean(dim=(2, 3), keepdim=True)))
        h = F.interpolate(self.conv2(h), scale_factor=2, mode="bilinear")
        return self.fc(F.max_pool2d(h, 2, ceil_mode=True).flatten(1))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_parameter_through_the_new_ops(method):
    torch.manual_seed(0)
    model = _Mixed()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 6, 6, generator=gen)
    k = 3
    weights = images.unsqueeze(1) * torch.rand(1, k, 1, 6, 6, generator=gen)
    lower, upper = torch.full((2, k), -0.05), torch.full((2, k), 0.05)
    lower[:, 0], upper[:, 0] = 0.95, 1.05
    nominal = torch.zeros(2, k)
    nominal[:, 0] = 1.0
    aset = DenseAffineSet(weights, torch.zeros_like(images), lower, upper, nominal, clip=(0.0, 1.0))
    bound = load_registry().bound_method(method)().margin_lower(compile_network(model), aset, torch.tensor([0, 2]))
    bound.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{method}: no finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"{method}: zero gradient for {name}"


def test_onnx_split_outputs_are_bounded_as_selections():
    """ONNX Split (onnx2torch ``OnnxSplit13``, a tuple consumed by getitem) through the import path."""
    import io
    import warnings

    onnx = pytest.importorskip("onnx")
    onnx2torch = pytest.importorskip("onnx2torch")
    from robnet_svc.bounds.ops.structural import SplitRule
    from robnet_svc.graph import normalize_graph
    from robnet_svc.perturbations.bias_field import BiasField

    from .strategies import check_sound, sampled_margins

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 16, 3)

        def forward(self, x):
            a, b = torch.split(torch.relu(self.conv(x)), [1, 3], dim=1)
            return self.fc(torch.cat([b, a * 2.0], 1).flatten(1))

    torch.manual_seed(0)
    module = Net().eval()
    example = torch.rand(1, 2, 4, 4)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    imported = normalize_graph(onnx2torch.convert(onnx.load_from_string(buffer.getvalue())), example).eval()
    net = compile_network(imported)
    assert sum(p.rule_cls is SplitRule for p in net._plan) == 2
    images, labels = torch.rand(2, 2, 4, 4), torch.tensor([0, 2])
    aset = BiasField(0.1, clip=(0.0, 1.0), mode="both", order=1).affine_set(images)
    bounds = {m: load_registry().bound_method(m)().margin_lower(net, aset, labels).detach() for m in METHODS}
    check_sound(bounds, sampled_margins(module, aset, labels, 1000), "onnx split")
