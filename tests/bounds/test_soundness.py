"""Property tests of the bound engine (SPEC §3, issue 3): soundness, ordering, exactness.

Random networks (MLP, CNN with stride/padding/groups, residual Add, BatchNorm, AvgPool,
ZeroPad, normalisation by constants in front, Dropout/Identity) × random inputs and boxes
× every bound method × every perturbation × clipping on/off. Ground truth: the true margins
of ``net(clip(W a + c))`` at >= 1000 sampled coefficient vectors per sample (box corners
first, see ``AffineSet.sample``). A failure prints the hypothesis recipe, which rebuilds the
network exactly (``strategies.build``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from contextlib import contextmanager
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from robnet_svc.bounds import compile_network, native, propagate
from robnet_svc.errors import RobnetError
from robnet_svc.graph import normalize_graph
from robnet_svc.plugins import load_registry

from .strategies import (ACTIVATIONS, DENSE_METHODS, METHODS, OP_FAMILIES, PERTURBATIONS, Recipe, build, check_order,
                         check_sound,
                         exact_margin_min, make_set, perturbation_inputs, recipes, sampled_margins)

NUM_SAMPLES = 1000
EXACT_TOL = 1e-8  # relative, float64

# seeded (derandomised) and without a deadline: bound passes vary in time
PROPERTY = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _methods(pert_id: str) -> list[str]:
    return [m for m in METHODS if not (pert_id == "linf" and m in DENSE_METHODS)]


@contextmanager
def _native_kernels(value: str):
    """``ROBNET_SVC_NATIVE=value`` for the block (hypothesis tests take no ``monkeypatch``)."""
    before = os.environ.get(native.ENV)
    os.environ[native.ENV] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[native.ENV]
        else:
            os.environ[native.ENV] = before


def _bounds(module: nn.Module, aset, labels, names, classes: int) -> dict[str, torch.Tensor]:
    """Lower margin bounds ``[B, K-1]`` of each named method (checked for shape and finiteness),
    under autograd as in training. The forward symbolic methods are run three times more as
    certification runs them, outside autograd: with the native kernels (``bounds/native.py``,
    certification's default on the CPU), and without them with the SSIP steps on the whole
    batch and in chunks of one sample (``propagate._in_chunks``), which must agree bit for bit.
    They may differ from training's bounds and from each other by rounding, and join the result
    as ``"<name> outside autograd"`` and ``"<name> native"`` (``check_sound`` checks every entry,
    ``check_order`` the methods' own)."""
    net = compile_network(module)
    registry = load_registry()
    out = {}
    for name in names:
        lower = registry.bound_method(name)().margin_lower(net, aset, labels)
        assert lower.shape == (aset.batch_size, classes - 1), f"{name}: shape {tuple(lower.shape)}"
        assert torch.isfinite(lower).all(), f"{name}: non-finite bound {lower}"
        out[name] = lower.detach()
        if name in DENSE_METHODS:
            got = {}
            chunk_bytes = propagate.CHUNK_BYTES
            try:
                with torch.no_grad(), _native_kernels("1"):
                    out[f"{name} native"] = registry.bound_method(name)().margin_lower(net, aset, labels)
                with torch.no_grad(), _native_kernels("0"):
                    for size in (1 << 40, 1):
                        propagate.CHUNK_BYTES = size
                        got[size] = registry.bound_method(name)().margin_lower(net, aset, labels)
            finally:
                propagate.CHUNK_BYTES = chunk_bytes
            assert torch.equal(got[1], got[1 << 40]), f"{name}: chunked {got[1]} != whole batch {got[1 << 40]}"
            out[f"{name} outside autograd"] = got[1]  # checked for soundness with the rest
    return out


def _check_drawn_network(data, recipe_strategy, pert_id: str, clip: bool) -> None:
    """Draw a network from ``recipe_strategy`` and inputs for it; every method's bounds must be
    sound at sampled points of the set and ordered as the methods promise."""
    recipe = data.draw(recipe_strategy, label="recipe")
    images, labels, eps = data.draw(perturbation_inputs(recipe), label="inputs")
    module = build(recipe)
    aset = make_set(pert_id, images, eps, clip)
    context = f"{pert_id}, eps={eps}, clip={clip}, {recipe}"
    bounds = _bounds(module, aset, labels, _methods(pert_id), recipe.classes)
    check_sound(bounds, sampled_margins(module, aset, labels, NUM_SAMPLES), context)
    check_order(bounds, context)


@pytest.mark.parametrize("pert_id", list(PERTURBATIONS))
@settings(**PROPERTY, max_examples=5)
@given(data=st.data(), clip=st.booleans())
def test_random_networks_sound_and_ordered(pert_id, data, clip):
    _check_drawn_network(data, recipes(), pert_id, clip)


@pytest.mark.parametrize("pert_id", list(PERTURBATIONS))
@pytest.mark.parametrize("family", OP_FAMILIES)
@settings(**PROPERTY, max_examples=2)
@given(data=st.data(), clip=st.booleans())
def test_networks_with_maxpool_products_and_structural_ops_sound_and_ordered(family, pert_id, data, clip):
    """Issue 12's non-affine and structural ops (MaxPool1d/2d with every option, McCormick
    products incl. squeeze-excitation broadcasting, Split/Concat/shuffle/slice/gather/resize/
    reduce) through every method and perturbation."""
    _check_drawn_network(data, recipes(families=(family,)), pert_id, clip)


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_forward_symbolic_methods_refuse_linf(method):
    recipe = Recipe("cnn", 1, (6, 6), 3, 4, True, "none", False, False, False, 1, False, False, 0)
    aset = make_set("linf", torch.rand(2, 1, 6, 6), 0.1, clip=True)
    with pytest.raises(RobnetError, match="linf|coefficients|ssip"):
        load_registry().bound_method(method)().margin_lower(compile_network(build(recipe)), aset,
                                                            torch.tensor([0, 1]))


# affine networks: a representative subset of the dense perturbations keeps the file fast
EXACT_PERTURBATIONS = ("bias-mult-o3", "bias-add-o1", "bias-both-o2", "bias-both-o0", "brightness", "contrast")


@pytest.mark.parametrize("pert_id", EXACT_PERTURBATIONS)
@settings(**PROPERTY, max_examples=4)
@given(data=st.data())
def test_networks_without_relu_get_exact_bounds(pert_id, data):
    recipe = data.draw(recipes(relu=False), label="recipe")
    images, labels, eps = data.draw(perturbation_inputs(recipe), label="inputs")
    module = build(recipe).double()
    aset = make_set(pert_id, images.double(), eps, clip=False)
    exact = exact_margin_min(module, aset, labels)
    names = ["ssip", "rsip-ibp", "rsip-ssip", "rsip"]
    bounds = _bounds(module, aset, labels, names + ["ibp"], recipe.classes)
    tol = EXACT_TOL * max(1.0, exact.abs().max().item())
    check_sound(bounds, exact.unsqueeze(1), f"{pert_id}, exact, {recipe}")
    for name in names:
        err = (bounds[name] - exact).abs().max().item()
        assert err <= tol, f"{name} is not exact on an affine network: error {err:.3e} ({pert_id}, {recipe})"


@pytest.mark.parametrize("pert_id", ["bias-both-o2", "contrast", "linf"])
def test_single_linear_layer_matches_closed_form(pert_id):
    """``min over a of (e_y - e_i)^T (L (W a + c) + b)``: concretise the closed-form coefficients."""
    torch.manual_seed(0)
    layer = nn.Linear(2 * 5 * 4, 6).double()
    module = nn.Sequential(nn.Flatten(), layer).eval()
    images = torch.rand(3, 2, 5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5])
    aset = make_set(pert_id, images, 0.2, clip=False)
    spec = torch.eye(6, dtype=torch.float64)[labels].unsqueeze(1) - torch.eye(6, dtype=torch.float64)  # [B, K, K]
    spec = torch.stack([s[torch.arange(6) != y] for s, y in zip(spec, labels)])  # [B, K-1, K]
    lam = (spec @ layer.weight).reshape(3, 5, 2, 5, 4)  # back through the layer: [B, K-1, C, H, W]
    coef, const = aset.transpose(lam)
    closed = aset.concretize(coef, const + spec @ layer.bias)
    # IBP is exact only where the input box is (linf); the symbolic methods always are
    methods = ["ibp", "rsip-ibp", "rsip"] if pert_id == "linf" else ["ssip", "rsip-ibp", "rsip-ssip", "rsip"]
    bounds = _bounds(module, aset, labels, methods, 6)
    for name, lower in bounds.items():
        torch.testing.assert_close(lower, closed, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_parameter(method):
    recipe = Recipe("residual", 2, (6, 6), 4, 4, True, "subdiv", True, True, True, 1, True, False, 3)
    module = build(recipe)
    images, labels = torch.rand(2, 2, 6, 6), torch.tensor([1, 2])
    aset = make_set("bias-both-o1", images, 0.05, clip=True)
    lower = load_registry().bound_method(method)().margin_lower(compile_network(module), aset, labels)
    lower.sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{method}: no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), f"{method}: non-finite gradient at {name}"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


IMPORTED = [Recipe("cnn", 3, (7, 6), 4, 4, True, "subdiv", True, True, True, 2, True, True, 11),
            Recipe("residual", 2, (8, 8), 5, 4, True, "muladd", True, False, True, 1, False, False, 12),
            Recipe("mlp", 1, (5, 5), 3, 6, True, "subdiv", True, False, False, 1, False, True, 13)]


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("recipe", IMPORTED, ids=[r.family for r in IMPORTED])
def test_onnx_imported_networks_sound_and_ordered(recipe, opset):
    """The same property through the real import path: torch -> ONNX -> onnx2torch -> normalize_graph,
    so the engine sees onnx2torch's modules (OnnxBinaryMathOperation Sub/Div/Mul/Add by constants,
    OnnxPadStatic/OnnxPadDynamic, BatchNormalization kept unfolded, two-tensor Add)."""
    _check_through_onnx(recipe, opset=opset, seed=opset, do_constant_folding=False,
                        input_names=["x"], output_names=["y"])


def _check_through_onnx(recipe: Recipe, opset: int, seed: int, **export_options) -> None:
    """Export ``build(recipe)`` to ONNX at ``opset``, import it (onnx2torch + normalize_graph),
    check it computes the same, then bound it under a bias field and linf: sound by sampling
    the original module, and ordered."""
    onnx = pytest.importorskip("onnx")
    onnx2torch = pytest.importorskip("onnx2torch")

    module = build(recipe)
    example = torch.rand(1, recipe.channels, *recipe.size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, **export_options)
    imported = normalize_graph(onnx2torch.convert(onnx.load_from_string(buffer.getvalue())), example).eval()
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, recipe.channels, *recipe.size, generator=gen)
    labels = torch.tensor([0, recipe.classes - 1])
    torch.testing.assert_close(imported(images), module(images), rtol=1e-5, atol=1e-5)
    for pert_id in ("bias-both-o1", "linf"):
        aset = make_set(pert_id, images, 0.1, clip=True)
        bounds = _bounds(imported, aset, labels, _methods(pert_id), recipe.classes)
        context = f"onnx opset {opset}, {pert_id}, {recipe}"
        check_sound(bounds, sampled_margins(module, aset, labels, NUM_SAMPLES), context)
        check_order(bounds, context)


ACTIVATION_CASES = [a for a in ACTIVATIONS if a != "relu"]


def _activation_perturbations(index: int) -> list[str]:
    """Every kind of perturbation (bias field mult/add/both, brightness, contrast, linf); the
    bias-field orders rotate with the activation's index, so each (mode, order) pair meets
    several activations and the test stays fast."""
    return [f"bias-mult-o{index % 4}", f"bias-add-o{(index + 1) % 4}", f"bias-both-o{(index + 2) % 4}",
            "brightness", "contrast", "linf"]


@pytest.mark.parametrize("act", ACTIVATION_CASES)
@settings(**PROPERTY, max_examples=2)
@given(data=st.data())
def test_activation_networks_sound_and_ordered(act, data):
    """Random networks with each activation of ``ACTIVATIONS`` (Clip/ReLU6/Hardtanh/clamp,
    LeakyReLU with slopes < 0, < 1 and > 1, PReLU, HardSigmoid, HardSwish, Sigmoid, Tanh,
    ELU, Softplus, SiLU, GELU, and SiLU/GELU written as products, which the compiler fuses)
    through every method and every kind of perturbation, with and without clipping. Small
    inputs (at most 5x5) keep full CROWN cheap."""
    recipe = data.draw(recipes(relu=True, act=act), label="recipe")
    recipe = dataclasses.replace(recipe, size=(min(recipe.size[0], 5), min(recipe.size[1], 5)))
    module = build(recipe)
    for pert_id in _activation_perturbations(ACTIVATION_CASES.index(act)):
        images, labels, eps = data.draw(perturbation_inputs(recipe), label="inputs")
        clip = data.draw(st.booleans(), label="clip")
        aset = make_set(pert_id, images, eps, clip)
        context = f"{act}, {pert_id}, eps={eps}, clip={clip}, {recipe}"
        bounds = _bounds(module, aset, labels, _methods(pert_id), recipe.classes)
        check_sound(bounds, sampled_margins(module, aset, labels, NUM_SAMPLES), context)
        check_order(bounds, context)


@pytest.mark.parametrize("act", ["prelu", "hardswish", "sigmoid", "silu-product", "gelu-erf"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_parameter_through_activations(method, act):
    """Also PReLU's slopes, and through the fused SiLU/GELU products."""
    recipe = Recipe("residual", 2, (5, 5), 4, 4, True, "subdiv", True, True, True, 1, True, False, 3, act)
    module = build(recipe)
    images, labels = torch.rand(2, 2, 5, 5), torch.tensor([1, 2])
    aset = make_set("bias-both-o1", images, 0.05, clip=True)
    lower = load_registry().bound_method(method)().margin_lower(compile_network(module), aset, labels)
    lower.sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{method}, {act}: no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), f"{method}, {act}: non-finite gradient at {name}"
    prelus = [m for m in module.modules() if isinstance(m, nn.PReLU)]
    assert bool(prelus) == (act == "prelu")
    assert all(m.weight.grad.abs().sum() > 0 for m in prelus), f"{method}: PReLU slopes get no gradient"

OP_IMPORTED = [Recipe("maxpool", 2, (7, 6), 3, 4, True, "subdiv", False, False, True, 1, True, False, 21),
               Recipe("product", 3, (6, 6), 4, 4, True, "none", False, False, False, 2, False, False, 22),
               Recipe("structural", 2, (5, 6), 3, 4, True, "muladd", False, False, True, 1, False, False, 23),
               Recipe("structural", 1, (6, 5), 3, 6, True, "none", False, False, False, 1, False, False, 24)]


@pytest.mark.parametrize("recipe", OP_IMPORTED, ids=[f"{r.family}-{r.seed}" for r in OP_IMPORTED])
def test_onnx_imported_networks_with_the_new_ops_sound_and_ordered(recipe):
    """Issue 12's ops as onnx2torch imports them at opset 17: MaxPool (1d, 2d), Mul of two
    perturbed tensors, ReduceMean/ReduceSum, Split (+ getitem), Concat, Slice, Gather, Resize."""
    _check_through_onnx(recipe, opset=17, seed=recipe.seed,
                        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
