"""Activation rules checked pointwise: on dense grids over random, degenerate, touching-zero
and very wide intervals, in float32 and float64, the lower line <= σ <= the upper line and
the interval bounds contain σ, with σ the torch module itself (not the rule's own formula).
Also: registration of every torch / onnx2torch target, exactness of piecewise-linear rules
on stable neurons, finite gradients, and the fusion of exported SiLU/GELU/HardSwish."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network
from robnet_svc.bounds.fuse import HardSwish
from robnet_svc.bounds.graph import registry_rules, find_unsupported
from robnet_svc.bounds.ops.base import PERTURBED, OpCall

from .strategies import Clamp


def _prelu() -> nn.Module:
    m = nn.PReLU(5)
    m.weight.data = torch.tensor([-0.7, 0.0, 0.25, 1.0, 2.5])
    return m


# name -> module (σ is the module's own forward)
CASES = {
    "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(-0.5, 2.0), "clamp-min": Clamp(0.3, None),
    "clamp-max": Clamp(None, -0.2), "clamp-inverted": Clamp(1.0, 0.5),
    "leaky": nn.LeakyReLU(0.01), "leaky-steep": nn.LeakyReLU(3.0), "leaky-negative": nn.LeakyReLU(-0.5),
    "prelu": _prelu(), "hardsigmoid": nn.Hardsigmoid(), "hardswish": nn.Hardswish(),
    "hardswish-fused": HardSwish(0.4, 0.7), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "elu": nn.ELU(),
    "elu-small": nn.ELU(0.3), "elu-steep": nn.ELU(2.5), "softplus": nn.Softplus(),
    "softplus-beta": nn.Softplus(beta=2.0, threshold=3.0), "silu": nn.SiLU(), "gelu": nn.GELU(),
}
PIECEWISE_LINEAR = ("relu6", "hardtanh", "clamp-min", "clamp-max", "clamp-inverted", "leaky", "leaky-steep",
                    "leaky-negative", "prelu", "hardsigmoid")


def _rule(module: nn.Module, width: int):
    """The registered rule for ``module`` (a one-node graph, as the compiler builds it)."""
    net = compile_network(nn.Sequential(module))
    (node,) = [n for n in net._plan]
    call = OpCall(node.name, node.call.kind, node.call.target, node.call.module, (PERTURBED,) + tuple(
        node.call.args[1:]), dict(node.call.kwargs), [(width,)], (width,))
    return node.rule_cls(call)


def _intervals(dtype: torch.dtype, n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n + extras, 5]`` bounds: random centres/widths at scales 0.01..1e4, degenerate ones,
    intervals touching 0 and the kinks/inflections, very wide ones (±1e4, ±1e15)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 0.3, 1.0, 3.0, 10.0, 1e4], dtype=torch.float64)
    pick = lambda: scales[torch.randint(0, len(scales), (n, 5), generator=gen)]  # noqa: E731
    centre = (torch.rand(n, 5, generator=gen, dtype=torch.float64) * 2 - 1) * pick()
    width = torch.rand(n, 5, generator=gen, dtype=torch.float64) * pick()
    width[: n // 8] = 0
    lower, upper = centre - width, centre + width
    special = [(0, 0), (0, 1), (-1, 0), (-3, 3), (-3, -3), (3, 3), (-1.5, -1.5), (2.3994, 2.3994),
               (-1e4, 1e4), (-1e4, -1e4 + 1e-3), (1e4, 1e4 + 1e-3), (-1e15, 1e15), (-1e15, -1e15), (6, 6.5),
               (-0.5, 2.0), (-1e-30, 1e-30)]
    extra = torch.tensor(special, dtype=torch.float64).unsqueeze(-1).expand(-1, -1, 5)
    lower, upper = torch.cat([lower, extra[:, 0]]), torch.cat([upper, extra[:, 1]])
    return lower.to(dtype), upper.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_relaxation_and_interval_hold_on_dense_grids(name, dtype):
    module = CASES[name].to(dtype)
    rule = _rule(module, 5)
    lower, upper = _intervals(dtype)
    relax = rule.relax(lower, upper)
    lo_i, up_i = rule.interval(lower, upper)
    for t in (relax.lower_slope, relax.lower_bias, relax.upper_slope, relax.upper_bias, lo_i, up_i):
        assert t.shape == lower.shape and torch.isfinite(t).all(), f"{name}: non-finite coefficients"
    steps = torch.linspace(0, 1, 257, dtype=dtype)
    x = lower.unsqueeze(-1) + (upper - lower).unsqueeze(-1) * steps  # [N, 5, 257]
    x = torch.minimum(torch.maximum(x, lower.unsqueeze(-1)), upper.unsqueeze(-1))
    with torch.no_grad():
        y = module(x.transpose(1, 2).reshape(-1, 5)).reshape(x.shape[0], 257, 5).transpose(1, 2)
    below = relax.lower_slope.unsqueeze(-1) * x + relax.lower_bias.unsqueeze(-1)
    above = relax.upper_slope.unsqueeze(-1) * x + relax.upper_bias.unsqueeze(-1)
    for what, bad in (("lower line above σ", below > y), ("upper line below σ", above < y),
                      ("interval misses σ", (y < lo_i.unsqueeze(-1)) | (y > up_i.unsqueeze(-1)))):
        if bad.any():
            i = bad.any(-1).nonzero()[0]
            pytest.fail(f"{name} {dtype}: {what} on [{lower[tuple(i)].item()}, {upper[tuple(i)].item()}]")
    # degenerate intervals: both lines meet σ(l) (up to the round-off allowance)
    point = lower == upper
    y0 = y[..., 0]
    scale = 1 + y0.abs() + relax.upper_slope.abs() * lower.abs()
    gap = ((above[..., 0] - below[..., 0] - 2 * getattr(rule, "jump", 0.0)) / scale)[point]  # Softplus: see its rule
    assert gap.max() <= (1e-3 if dtype == torch.float32 else 1e-10), f"{name}: loose at l = u"


@pytest.mark.parametrize("name", PIECEWISE_LINEAR)
def test_piecewise_linear_rules_are_exact_on_stable_neurons(name):
    module = CASES[name].double()
    rule = _rule(module, 5)
    # intervals inside one linear piece of every activation above: far left, far right, between kinks
    lower = torch.tensor([[-50.0] * 5, [40.0] * 5, [0.05] * 5], dtype=torch.float64)
    upper = torch.tensor([[-45.0] * 5, [44.0] * 5, [0.1] * 5], dtype=torch.float64)
    r = rule.relax(lower, upper)
    torch.testing.assert_close(r.lower_slope, r.upper_slope, rtol=0, atol=0)
    torch.testing.assert_close(r.lower_bias, r.upper_bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_relaxation_is_differentiable(name):
    rule = _rule(CASES[name].float(), 5)
    lower = (torch.randn(64, 5) * 3).requires_grad_()
    width = (torch.rand(64, 5) * 4).requires_grad_()
    r = rule.relax(lower, lower + width)
    total = sum(t.sum() for t in (r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias))
    total.backward()
    assert torch.isfinite(lower.grad).all() and torch.isfinite(width.grad).all()


def test_every_torch_and_onnx2torch_activation_is_registered():
    import torch.nn.functional as F

    rules = registry_rules()
    for target in (nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.Hardsigmoid, nn.Hardswish, nn.Sigmoid,
                   nn.Tanh, nn.ELU, nn.Softplus, nn.SiLU, nn.GELU, HardSwish, torch.clamp, F.relu6, F.silu,
                   F.gelu, torch.sigmoid, torch.tanh, torch.erf):
        assert target in rules, target
    onnx2torch = pytest.importorskip("onnx2torch")
    from onnx2torch.node_converters.activations import OnnxErf, OnnxHardSigmoid, OnnxPReLU
    from onnx2torch.node_converters.clip import OnnxClip
    from onnx2torch.node_converters.functions import OnnxFunction

    assert onnx2torch and all(t in rules for t in (OnnxClip, OnnxPReLU, OnnxHardSigmoid, OnnxErf, OnnxFunction))
    # OnnxFunction covers Tanh only: the others are refused with the function's name
    assert find_unsupported(nn.Sequential(nn.Linear(3, 3), OnnxFunction("Exp"), nn.Linear(3, 2)))[0][1].startswith(
        "OnnxFunction (elementwise function exp")


def test_gelu_tanh_approximation_is_refused():
    assert "approximate='tanh'" in find_unsupported(nn.Sequential(nn.Linear(3, 3), nn.GELU("tanh")))[0][1]


class _Head(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(2, 4, 3), act, nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("act, fused", [(nn.SiLU(), "SiLU"), (nn.GELU(), "GELU"), (nn.Hardswish(), None)],
                         ids=["silu", "gelu", "hardswish"])
def test_exported_subgraphs_are_fused_and_bound_soundly(act, fused, opset):
    """Legacy-exporter ONNX of SiLU (Sigmoid·Mul), GELU (Div/Erf/Add/Mul/Mul) and, at opset
    13, HardSwish (HardSigmoid·Mul) imports as a product the compiler fuses to one activation."""
    onnx = pytest.importorskip("onnx")
    onnx2torch = pytest.importorskip("onnx2torch")
    from robnet_svc.graph import normalize_graph
    from robnet_svc.plugins import load_registry

    from .strategies import check_order, check_sound, make_set, sampled_margins

    torch.manual_seed(opset)
    module = _Head(act).eval()
    example = torch.rand(1, 2, 5, 5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset)
    gm = normalize_graph(onnx2torch.convert(onnx.load_from_string(buffer.getvalue())), example).eval()
    net = compile_network(gm)
    kinds = {type(net.gm.get_submodule(n.target)).__name__ for n in net.gm.graph.nodes if n.op == "call_module"}
    expected = fused or ("HardSwish" if opset == 13 else "Hardswish")
    assert expected in kinds and "OnnxBinaryMathOperation" not in kinds, kinds
    if fused or opset == 13:  # the imported module itself is left as it was
        assert net.module is gm and "OnnxBinaryMathOperation" in {type(m).__name__ for m in gm.modules()}
    images, labels = torch.rand(2, 2, 5, 5), torch.tensor([0, 2])
    for pert_id in ("bias-both-o2", "linf"):
        aset = make_set(pert_id, images, 0.3, clip=True)
        methods = ["ibp", "rsip-ibp", "rsip"] + ([] if pert_id == "linf" else ["ssip", "rsip-ssip"])
        bounds = {m: load_registry().bound_method(m)().margin_lower(net, aset, labels).detach() for m in methods}
        context = f"{expected} opset {opset} {pert_id}"
        check_sound(bounds, sampled_margins(gm, aset, labels, 1000), context)
        check_order(bounds, context)


@pytest.mark.parametrize("low, high", [(0.5, None), (None, 0.2)])
def test_clip_with_one_bound_imports_and_bounds(low, high, tmp_path):
    """``torch.clamp(x, min=c)`` exports ``Clip(x, c, "")``, which onnx2torch cannot read alone;
    the importer drops the empty input (an absent min becomes -inf) and the rule sees one end."""
    pytest.importorskip("onnx2torch")
    from robnet_svc.onnx_io import load_model

    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), Clamp(low, high), nn.Linear(4, 2)).eval()
    path = tmp_path / "clamp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 2, 2),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    imported = load_model(path)  # parity with onnxruntime is checked inside
    net = compile_network(imported.module)
    (clip,) = [p for p in net._plan if p.rule_cls.__name__ == "ClipRule"]
    rule = clip.rule_cls(OpCall(clip.name, clip.call.kind, clip.call.target, clip.call.module, (PERTURBED,), {},
                                [(4,)], (4,)))
    f32 = lambda v: None if v is None else pytest.approx(v, rel=1e-6)  # noqa: E731 (stored as float32)
    assert (rule.a, rule.b) == (f32(low), f32(high))


def _relu_relaxation_by_cases(lower, upper):
    """The ReLU relaxation written case by case (masks and ``where``): the definition that
    ``relu_relaxation``'s arithmetic form must reproduce."""
    active, unstable = lower >= 0, (lower < 0) & (upper > 0)
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = torch.where(unstable, upper / width, torch.zeros_like(upper))
    alpha = (upper >= -lower).to(upper.dtype)
    one, zero = torch.ones_like(upper), torch.zeros_like(upper)
    return (torch.where(active, one, torch.where(unstable, alpha, zero)), zero,
            torch.where(active, one, chord), -chord * lower.clamp(max=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_relaxation_matches_its_case_by_case_definition(dtype):
    """Values equal (bit for bit up to the sign of a zero) on every case, the edges included:
    l = u = 0, bounds of ±0, subnormal and huge bounds, l = -u (alpha's tie); gradients
    equal to rounding and never NaN (the l = u = 0 case divides by 1, not 0)."""
    from robnet_svc.bounds.ops.relu import relu_relaxation

    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    big = torch.finfo(dtype).max / 4
    edges = [(0.0, 0.0), (-0.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (-1.0, -0.0), (-1.0, 1.0), (-2.0, 1.0),
             (-1.0, 2.0), (1.0, 2.0), (-3.0, -1.0), (-tiny, tiny), (0.0, tiny), (-tiny, 0.0), (tiny, 2 * tiny),
             (-big, big), (-big, 1.0), (-1.0, big), (2.0, 2.0), (-2.0, -2.0)]
    gen = torch.Generator().manual_seed(0)
    lo = torch.cat([torch.tensor([e[0] for e in edges], dtype=dtype), torch.randn(500, generator=gen, dtype=dtype)])
    up = torch.cat([torch.tensor([e[1] for e in edges], dtype=dtype),
                    lo[len(edges):] + torch.rand(500, generator=gen, dtype=dtype) * 2])
    got = relu_relaxation(lo, up)
    for mine, ref in zip((got.lower_slope, got.lower_bias, got.upper_slope, got.upper_bias),
                         _relu_relaxation_by_cases(lo, up)):
        assert torch.equal(mine, ref)

    lo_g, up_g = lo[len(edges):].clone().requires_grad_(), up[len(edges):].clone().requires_grad_()
    lo_r, up_r = lo_g.detach().clone().requires_grad_(), up_g.detach().clone().requires_grad_()
    weights = torch.rand(4, 500, generator=gen, dtype=dtype)
    relax = relu_relaxation(lo_g, up_g)
    (weights[2] * relax.upper_slope + weights[3] * relax.upper_bias).sum().backward()
    ref = _relu_relaxation_by_cases(lo_r, up_r)
    (weights[2] * ref[2] + weights[3] * ref[3]).sum().backward()
    assert torch.allclose(lo_g.grad, lo_r.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(up_g.grad, up_r.grad, rtol=1e-5, atol=1e-6)
    zero = torch.zeros(3, dtype=dtype, requires_grad=True)
    relax = relu_relaxation(zero, zero)
    (relax.upper_slope + relax.upper_bias).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_relu_is_the_identity_exactly_on_non_negative_boxes():
    """``identity_on``: True exactly when every lower bound is >= 0 (-0 included), and there the
    relaxation it lets callers skip is the identity line and the interval the box itself."""
    from robnet_svc.bounds.ops.relu import ReluRule

    rule = ReluRule.__new__(ReluRule)  # these methods read no graph node
    lo = torch.tensor([[0.0, -0.0, 0.5, 3.0]])
    up = torch.tensor([[0.0, 1.0, 0.5, 4.0]])
    assert rule.identity_on(lo, up)
    relax = rule.relax(lo, up)
    assert torch.equal(relax.lower_slope, torch.ones_like(lo)) and torch.equal(relax.upper_slope, torch.ones_like(lo))
    assert torch.equal(relax.lower_bias, torch.zeros_like(lo)) and torch.equal(relax.upper_bias, torch.zeros_like(lo))
    assert all(torch.equal(a, b) for a, b in zip(rule.interval(lo, up), (lo, up)))
    assert not rule.identity_on(torch.tensor([[0.0, -1e-30, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
