"""Floating-point edges of a certificate (issue 13): the rounding allowance against the deployed
model's real float32 evaluation in onnxruntime, and full-precision arithmetic (no TF32)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnx_factory import export
from robnet_svc.bounder import Bounder
from robnet_svc.bounds import compile_network
from robnet_svc.bounds.methods import BoundMethod
from robnet_svc.bounds.propagate import forward_pass
from robnet_svc.certify import AttackSettings, certify_model
from robnet_svc.plugins import load_registry
from robnet_svc.precision import full_precision, is_full_precision, precision_settings
from robnet_svc.rounding import logit_errors, margin_allowance


def _near_tie_model(n: int = 16) -> nn.Module:
    """Two logits with identical weights (256 per pixel) and biases 0 and 2^-20: in exact
    arithmetic class 1 wins by 2^-20 everywhere, but once the logits reach the hundreds,
    float32 cannot hold that difference (its spacing there is 2^-15 or more) and both round to
    the same value: a tie, which argmax gives to class 0."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(n, 2))
    with torch.no_grad():
        net[1].weight.fill_(256.0)
        net[1].bias.copy_(torch.tensor([0.0, 2.0 ** -20]))
    return net.eval()


def test_certified_means_the_deployed_float32_model_keeps_its_prediction(tmp_path):
    """Case 1: the exact margin lower bound is 2^-20 > 0, which the old rule (margin_lower > 0)
    certified; onnxruntime's float32 evaluation of the very ONNX file flips the prediction at
    a point of the set. The rounding allowance refuses it, and the attack reports the flip."""
    net = _near_tie_model()
    images = torch.zeros(1, 1, 4, 4)  # clean: logits (0, 2^-20), class 1
    pert = load_registry().perturbation("brightness")(0.5)
    path = export(net, tmp_path / "near_tie.onnx", (1, 4, 4))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"input": x.numpy()})[0]  # noqa: E731
    assert run(images).argmax(-1).tolist() == [1]
    assert run(torch.full((1, 1, 4, 4), 0.5)).argmax(-1).tolist() == [0]  # brightness +0.5: in the set, flipped

    bounder = Bounder(net, load_registry().bound_method("rsip-ssip")(), pert, (1, 4, 4))
    certs = certify_model(bounder, images, torch.tensor([1]), batch_size=1, attack=AttackSettings(steps=2, restarts=2),
                          device=torch.device("cpu"))
    assert certs.prediction.tolist() == [1]
    assert certs.margin_lower[0, 0] == pytest.approx(2.0 ** -20)  # a correct bound of the exact network ...
    assert certs.rounding_allowance[0, 0] > 1e-4  # ... within float32's reach of the logits (about 2048)
    assert certs.certified.tolist() == [False] and certs.attack_success.tolist() == [True]


def _float32_vs_float64(net: nn.Module, pert, images: torch.Tensor, samples: int = 64):
    """At ``samples`` sampled points of the set of each image: the float32 logits, the float64
    ones ``[B, samples, K]``, the float64 compiled network, its set and the per-logit error
    bounds ``[B, 1, K]`` of robnet_svc.rounding."""
    aset = pert.affine_set(images)
    coeffs = aset.sample(samples, generator=torch.Generator().manual_seed(0))
    pixels = aset.clipped(aset.images(coeffs)).reshape(-1, *images.shape[1:])
    net64 = compile_network(copy.deepcopy(net).double())
    aset64 = pert.affine_set(images.double())
    b = images.shape[0]
    with torch.no_grad():
        low = net(pixels).reshape(b, samples, -1).double()
        exact = net64(pixels.double()).reshape(b, samples, -1)
        frame = net64.frame(aset64)
        errors = logit_errors(frame, forward_pass(frame, aset64), 2.0 ** -24 + 2.0 ** -53).reshape(b, 1, -1)
    return low, exact, net64, aset64, errors


def _symbolic_errors(net64, aset64, b: int) -> torch.Tensor:
    """The per-logit error bounds from SSIP ∩ IBP magnitudes ``[B, 1, K]``."""
    with torch.no_grad():
        frame = net64.frame(aset64)
        plain = forward_pass(frame, aset64)
        fwd = forward_pass(frame, aset64, symbolic=True, tighter=plain.pre)
        return logit_errors(frame, fwd, 2.0 ** -24 + 2.0 ** -53).reshape(b, 1, -1)


@pytest.mark.parametrize("perturbation, eps", [("bias-field", 0.4), ("linf", 0.05)])
def test_allowance_covers_float32_evaluations(perturbation, eps):
    """At sampled points of the set, float32 logits differ from float64 ones by at most the
    per-logit error bound (large weights, so the rounding is far from negligible)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(40)
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    images = torch.rand(5, 2, 4, 4)
    kwargs = {"order": 1} if perturbation == "bias-field" else {}
    pert = load_registry().perturbation(perturbation)(eps, **kwargs)
    low, exact, net64, aset64, errors = _float32_vs_float64(net, pert, images)
    with torch.no_grad():
        allowance = margin_allowance(net64, aset64, torch.zeros(5, dtype=torch.long), torch.float32)
    observed = (low - exact).abs()
    assert observed.max() > 0  # rounding did happen
    assert (observed <= errors).all()
    margin_error = ((low[..., :1] - low[..., 1:]) - (exact[..., :1] - exact[..., 1:])).abs().amax(1)  # label 0
    assert allowance.shape == (5, 3) and (margin_error <= allowance).all()
    assert (allowance <= errors[:, 0, :1] + errors[:, 0, 1:]).all()  # the margin's own row is never looser
    with torch.no_grad():  # magnitudes from SSIP ∩ IBP intervals (what symbolic certification uses)
        tight = margin_allowance(net64, aset64, torch.zeros(5, dtype=torch.long), torch.float32, symbolic=True)
    assert (margin_error <= tight).all() and (tight <= allowance).all()
    if perturbation == "bias-field":
        assert (tight < allowance).any()
    else:  # a set without a dense form keeps the interval magnitudes
        assert torch.equal(tight, allowance)


class _Recorder(BoundMethod):
    """A real bound method (IBP) that records whether full precision was in force when called."""

    name = "recorder"
    seen: list = []

    def margin_lower(self, net, aset, labels):
        type(self).seen.append(is_full_precision())
        return load_registry().bound_method("ibp")().margin_lower(net, aset, labels)


def test_full_precision_is_in_force_inside_and_restored_after():
    before = precision_settings()
    torch.set_float32_matmul_precision("medium")  # a user's setting: bfloat16 matmuls in oneDNN
    try:
        changed = precision_settings()
        assert not is_full_precision()
        with full_precision():
            assert is_full_precision()
        assert precision_settings() == changed
        with pytest.raises(ZeroDivisionError):
            with full_precision():
                assert is_full_precision()
                _ = 1 / 0
        assert precision_settings() == changed  # restored on an exception too
    finally:
        torch.set_float32_matmul_precision(before["float32_matmul_precision"])


def test_certification_runs_in_full_precision():
    torch.set_float32_matmul_precision("medium")
    try:
        net = _near_tie_model()
        _Recorder.seen = []
        certify_model(Bounder(net, _Recorder(), load_registry().perturbation("brightness")(0.1), (1, 4, 4)),
                      torch.rand(3, 1, 4, 4), torch.tensor([1, 1, 1]), batch_size=2,
                      attack=AttackSettings(steps=1, restarts=1), device=torch.device("cpu"))
        assert _Recorder.seen == [True, True]
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_certification_ignores_tf32_and_matches_cpu():
    """With TF32 switched on by the user, CUDA certification still computes in full float32
    (and float64 bounds): the flags are off inside, back on after, and the certificates match
    the CPU ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 32), nn.ReLU(),
                        nn.Linear(32, 3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8)
    images = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        labels = net(images).argmax(-1)
    pert = load_registry().perturbation("bias-field")(0.2, order=1)
    kwargs = dict(batch_size=8, attack=AttackSettings(steps=3, restarts=2))
    cpu = certify_model(Bounder(net, _Recorder(), pert, (1, 8, 8)), images, labels, device=torch.device("cpu"),
                        **kwargs)
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        gpu_net = net.cuda()
        _Recorder.seen = []
        gpu = certify_model(Bounder(gpu_net, _Recorder(), pert, (1, 8, 8)), images, labels,
                            device=torch.device("cuda"), **kwargs)
        assert _Recorder.seen and all(_Recorder.seen)
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the user's settings are back
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        np.testing.assert_array_equal(gpu.certified, cpu.certified)
        np.testing.assert_allclose(gpu.margin_lower, cpu.margin_lower, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(gpu.attack_margin, cpu.attack_margin, rtol=1e-4, atol=1e-4)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
        net.cpu()


def _covers_sampled_float32_errors(net: nn.Module, scale: float, image_shape: tuple, eps: float):
    """Scale ``net``'s parameters by ``scale`` (so rounding matters), then check at sampled points of
    an order-1 bias field's sets that float32 logits differ from float64 ones (rounding did happen)
    by at most the per-logit error bound, from interval and from SSIP magnitudes alike.
    Returns the float64 frame and the interval error bounds."""
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    pert = load_registry().perturbation("bias-field")(eps, order=1)
    low, exact, net64, aset64, errors = _float32_vs_float64(net, pert, torch.rand(*image_shape))
    observed = (low - exact).abs()
    assert observed.max() > 0
    assert (observed <= errors).all()
    assert (observed <= _symbolic_errors(net64, aset64, observed.shape[0])).all()
    return net64.frame(aset64), errors


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU, nn.ELU, nn.Softplus, nn.Hardswish,
                                 nn.Hardsigmoid, nn.ReLU6, lambda: nn.LeakyReLU(0.2)])
def test_allowance_covers_float32_evaluations_through_activations(act):
    """Every activation rule states a Lipschitz constant and an implementation accuracy for
    the allowance: at sampled points, float32 logits stay within the per-logit error bound."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(32, 24), act(), nn.Linear(24, 24), act(), nn.Linear(24, 4)).eval()
    frame, errors = _covers_sampled_float32_errors(net, 8, (5, 2, 4, 4), 0.2)
    assert all(getattr(frame.rule(i), "lipschitz", 1.0) is not None
               for i in range(1, len(frame.nodes)) if frame.is_activation(i))
    assert errors.max() < 1.0  # a usable allowance, not the width of every neuron's range


class _Squeeze(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(mean(x))`` (a product of two perturbed tensors)."""

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


def test_allowance_covers_float32_evaluations_through_maxpool_and_products():
    """The relaxed rules state their own float error (MaxPool: the window's largest; products:
    both factors' errors and one rounding): float32 logits stay within the bound."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), _Squeeze(),
                        nn.Conv2d(6, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 3 * 3, 4)).eval()
    frame, _errors = _covers_sampled_float32_errors(net, 20, (5, 2, 5, 5), 0.3)
    assert any(frame.is_relaxed(i) for i in range(1, len(frame.nodes)))
