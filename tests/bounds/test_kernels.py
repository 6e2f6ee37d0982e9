"""The fused activation step of training (robnet_svc/bounds/kernels.py): ``harden --compile``'s
compiled kernels, the native ones training uses on the CPU by default, and the chunked eager
ones it falls back to.

- its hand-written backward against finite differences (float64, the kernels run op by op and
  on chunks of one sample);
- the chunked kernels against the whole-batch ones, chunk sizes from one sample to the batch;
- on random networks of the soundness suite (float64), inside ``fused_activations`` the
  training methods return the eager engine's bounds (to rounding) and stay sound at sampled
  points, with both;
- the native kernels (C++ loops) against the whole-batch ones, odd shapes, NaN, and their
  fallback to the chunked ones;
- training runs the native kernels on the CPU without ``--compile``;
- the kernels compiled by ``torch.compile`` give the eager engine's margins and parameter
  gradients on a channels-last CNN and an MLP, across batch sizes;
- a ``Bounder`` runs its own kernels and certification's copies run none.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robnet_svc.bounder import Bounder
from robnet_svc.bounds import compile_network
from robnet_svc.bounds import kernels
from robnet_svc.bounds import native
from robnet_svc.bounds.kernels import (CHUNKED, EAGER, NATIVE, _FusedStep, active_kernels, check_compiled_kernels,
                                       fused_activations, training_kernels)
from robnet_svc.bounds.ops.relu import ReluRule
from robnet_svc.perturbations.bias_field import BiasField
from robnet_svc.plugins import load_registry

from .strategies import build, check_sound, make_set, perturbation_inputs, recipes, sampled_margins
from .test_soundness import NUM_SAMPLES, PROPERTY

TRAINING = ("ssip", "rsip-ssip")


def _step_inputs(b: int, k: int, n: int, seed: int, tighter: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    rows = [rand(b, k, n), rand(b, k, n, scale=0.3)]
    consts = [rand(b, n), rand(b, n, scale=0.3)]
    mid, rad = torch.randn(b, k, generator=gen, dtype=torch.float64), torch.rand(b, k, generator=gen,
                                                                                  dtype=torch.float64)
    iv_lo, iv_up = rand(b, n, scale=3.0), None
    iv_up = (iv_lo.detach() + 6 * torch.rand(b, n, generator=gen, dtype=torch.float64)).requires_grad_()
    t_lo, t_up = ((iv_lo.detach() + 0.5).requires_grad_(), (iv_up.detach() - 0.5).requires_grad_()) if tighter \
        else (iv_lo, iv_up)
    return [*rows, *consts, mid.requires_grad_(), rad.requires_grad_(), iv_lo, iv_up, t_lo, t_up]


def _native_built() -> bool:
    return native.kernels() is not None


needs_native = pytest.mark.skipif(not _native_built(), reason="the native CPU kernels cannot be built here")


@pytest.mark.parametrize("which", ["eager", "chunked", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("tighter", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_step_backward_matches_finite_differences(seed, tighter, which, monkeypatch):
    """Every input's gradient (rows, constants, the box, interval and tighter bounds), all
    outputs used; random values keep every neuron off the relaxation's kinks. The chunked
    kernels run on chunks of one sample; the native ones are C++ loops (float64 as well)."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)
    fused = {"eager": EAGER, "chunked": CHUNKED, "native": NATIVE}[which]
    inputs = _step_inputs(3, 4, 7, seed, tighter)
    torch.autograd.gradcheck(lambda *t: _FusedStep.apply(fused, ReluRule.fused_relaxation, *t), inputs,
                             eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [1, 2 * 4 * 7 * 8, 1 << 40])  # one sample, two (float64), the batch
def test_chunked_kernels_compute_the_whole_batch_kernels(chunk_bytes, dtype, monkeypatch):
    """Each chunked kernel returns what the whole-batch one does, to rounding (they sum over ``k``
    in another order), whatever the chunking, a last chunk shorter than the others included."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", chunk_bytes)
    ins = [t.detach().to(dtype) for t in _step_inputs(5, 4, 7, 3, tighter=True)]
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(5, 4, 7, generator=gen).to(dtype) for _ in range(2)]
    per_neuron = [torch.randn(5, 7, generator=gen).to(dtype) for _ in range(4)]  # h_lo, h_up, ∂s_lo, ∂s_up
    _assert_kernels_agree(CHUNKED, ins, grads, per_neuron, dtype)


def _assert_kernels_agree(other, ins, grads, per_neuron, dtype):
    """Each of ``other``'s kernels returns what ``EAGER``'s does, to rounding."""
    tol = {"rtol": 0, "atol": 1e-12 if dtype == torch.float64 else 1e-5}
    pairs = [(EAGER.forward(*ins, ReluRule.fused_relaxation), other.forward(*ins, ReluRule.fused_relaxation)),
             (EAGER.slope_grads(*grads, *ins[:2]), other.slope_grads(*grads, *ins[:2])),
             (EAGER.row_grads(*grads, *ins[:2], *per_neuron[:2], *ins[4:6], *per_neuron[2:]),
              other.row_grads(*grads, *ins[:2], *per_neuron[:2], *ins[4:6], *per_neuron[2:]))]
    for whole, chunked in pairs:
        assert len(whole) == len(chunked)
        for a, b in zip(whole, chunked):
            assert b.shape == a.shape and b.dtype == a.dtype
            torch.testing.assert_close(b, a, **tol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 4, 7), (1, 1, 1), (3, 17, 300)])
def test_native_kernels_compute_the_whole_batch_kernels(shape, dtype):
    """The native kernels return what the whole-batch ones do, to rounding, for odd widths (no
    whole vector), a single neuron and coefficient, and a long row."""
    b, k, n = shape
    gen = torch.Generator().manual_seed(b * 100 + n)
    ins = [t.detach().to(dtype) for t in _step_inputs(b, k, n, n, tighter=True)]
    grads = [torch.randn(b, k, n, generator=gen).to(dtype) for _ in range(2)]
    per_neuron = [torch.randn(b, n, generator=gen).to(dtype) for _ in range(4)]  # h_lo, h_up, ∂s_lo, ∂s_up
    _assert_kernels_agree(NATIVE, ins, grads, per_neuron, dtype)


@needs_native
def test_native_kernels_match_the_whole_batch_ones_at_nan_and_zero():
    """A NaN row element and rows at exactly 0 give the whole-batch kernels' values: the slopes'
    gradients NaN where a product meets the NaN, the rows' gradients with sign 0 for both (as
    ``torch.sign`` on the CPU)."""
    ins = [t.detach() for t in _step_inputs(2, 3, 5, 7, tighter=False)]
    ins[0][0, 1, 2] = float("nan")
    ins[0][1, 0, :] = 0.0
    ins[1][1, 0, :] = 0.0
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    per_neuron = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    args = (*grads, *ins[:2], *per_neuron[:2], *ins[4:6], *per_neuron[2:])
    for want, got in zip(EAGER.row_grads(*args), NATIVE.row_grads(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)
    for want, got in zip(EAGER.slope_grads(*grads, *ins[:2]), NATIVE.slope_grads(*grads, *ins[:2])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)
        assert got[0, 2].isnan() and not got[1].isnan().any()


def test_native_kernels_fall_back_to_the_chunked_ones(monkeypatch):
    """With ``ROBNET_SVC_NATIVE=0`` (or a dtype the loops do not take) ``NATIVE`` runs
    ``CHUNKED``'s kernels: the same values, and a spy on the chunked forward sees the calls."""
    ins = [t.detach() for t in _step_inputs(3, 4, 7, 5, tighter=True)]
    calls, chunked_forward = [], kernels._forward_chunked

    def spy(*args):
        calls.append(args[0].dtype)
        return chunked_forward(*args)

    monkeypatch.setattr(kernels, "_forward_chunked", spy)
    NATIVE.forward(*[t.bfloat16() for t in ins], ReluRule.fused_relaxation)  # not float32/64: chunked
    monkeypatch.setenv(native.ENV, "0")
    got = NATIVE.forward(*ins, ReluRule.fused_relaxation)
    assert calls == [torch.bfloat16, torch.float64]
    for a, b in zip(got, EAGER.forward(*ins, ReluRule.fused_relaxation)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _fused_vs_eager(module: nn.Module, aset, labels, fused, method: str, ordered: bool):
    net = compile_network(module)
    bound = load_registry().bound_method(method)(ordered=ordered)
    eager = bound.margin_lower(net, aset, labels)
    with fused_activations(fused):
        assert active_kernels() is fused
        lower = bound.margin_lower(net, aset, labels)
    return eager, lower


@settings(**PROPERTY, max_examples=6)
@given(data=st.data(), clip=st.booleans(), pert_id=st.sampled_from(["bias-mult-o2", "bias-both-o1", "contrast"]))
def test_fused_bounds_equal_the_eager_engine_and_are_sound(data, clip, pert_id):
    recipe = data.draw(recipes(), label="recipe")
    images, labels, eps = data.draw(perturbation_inputs(recipe), label="inputs")
    module = build(recipe).double()  # float64: the two summation orders agree to ~1e-15
    # no pixel exactly at 0 or 1: there the additive field's box is symmetric about the clip's
    # kink, u = −l exactly, and rounding may break the ReLU's tie α = [u >= −l] either way (two
    # different, equally sound lines)
    aset = make_set(pert_id, images.double() * 0.98 + 0.01, eps, clip)
    sampled = sampled_margins(module, aset, labels, NUM_SAMPLES)
    saved = kernels.CHUNK_BYTES
    kernels.CHUNK_BYTES = 1  # the chunked kernels on chunks of one sample
    try:
        for method in TRAINING:
            for ordered in (False, True):
                for name, fused_kernels in (("fused", EAGER), ("chunked", CHUNKED), ("native", NATIVE)):
                    eager, fused = _fused_vs_eager(module, aset, labels, fused_kernels, method, ordered)
                    scale = max(1.0, eager.abs().max().item())
                    torch.testing.assert_close(
                        fused, eager, rtol=0, atol=1e-10 * scale,
                        msg=lambda m: f"{name} {method} ordered={ordered} {pert_id} {recipe}: {m}")
                    check_sound({f"{method} {name}": fused.detach()}, sampled, f"{pert_id}, clip={clip}, {recipe}")
    finally:
        kernels.CHUNK_BYTES = saved


class _CNN(nn.Module):
    """Wide enough for the channels-last layout (``Frame.prefers_channels_last``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 5))


def _margins_and_grads(module: nn.Module, images, labels, method: str, kernels):
    perturbation = BiasField(0.2, order=2, clip=(0.0, 1.0))
    bounder = Bounder(module, load_registry().bound_method(method)(ordered=False), perturbation,
                      tuple(images.shape[1:]), kernels=kernels)
    module.zero_grad()
    lower = bounder.margin_lower(images, labels)
    torch.relu(1 - lower).sum().backward()
    return lower.detach(), [p.grad.clone() for p in module.parameters()]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile needs a C++ compiler on the CPU")
@pytest.mark.parametrize("make", [_CNN, _mlp], ids=["cnn", "mlp"])
def test_compiled_kernels_give_the_eager_margins_and_gradients(make):
    kernels = check_compiled_kernels(torch.device("cpu"))
    torch.manual_seed(0)
    module = make()
    for batch in (6, 11):  # one compilation serves every shape (dynamic)
        gen = torch.Generator().manual_seed(batch)
        images, labels = torch.rand(batch, 3, 8, 8, generator=gen), torch.randint(0, 5, (batch,), generator=gen)
        for method in TRAINING:
            eager, eager_grads = _margins_and_grads(module, images, labels, method, None)
            fused, fused_grads = _margins_and_grads(module, images, labels, method, kernels)
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
            for a, b in zip(fused_grads, eager_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_a_bounder_runs_its_own_kernels_and_certification_copies_run_none():
    module = _mlp()
    perturbation = BiasField(0.1, order=1, clip=(0.0, 1.0))
    seen = []

    class Spy(load_registry().bound_method("ssip")):
        def margin_lower(self, net, aset, labels):
            seen.append(active_kernels())
            return super().margin_lower(net, aset, labels)

    bounder = Bounder(module, Spy(ordered=False), perturbation, (3, 8, 8), kernels=EAGER)
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with fused_activations(None):
        bounder.margin_lower(images, labels)
    for copy in (bounder.for_module(module), bounder.bound_copy(torch.float64)):
        with fused_activations(EAGER):  # a caller's context does not reach a bounder without kernels
            copy.margin_lower(images.to(next(copy.module.parameters()).dtype), labels)
    assert seen == [EAGER, None, None]


def test_training_runs_the_native_kernels_on_the_cpu(digits_onnx, tmp_path, monkeypatch):
    """Without ``--compile``, a CPU ``harden`` trains with ``NATIVE`` (``training_kernels``): its
    forward kernel runs in every training step's SSIP pass (a spy counts the calls) and takes
    the native loops where they are built; on CUDA the eager engine stays (None)."""
    from robnet_svc.pipeline import Options, harden
    from robnet_svc.progress import Reporter

    calls, chunked = [], []

    def spy(*args):
        calls.append(args[0].shape[0])  # the batch of rows
        return kernels._forward_native(*args)

    def chunked_spy(*args):
        chunked.append(args[0].shape[0])
        return CHUNKED.forward(*args)

    monkeypatch.setattr(kernels, "NATIVE", kernels.Kernels(spy, NATIVE.slope_grads, NATIVE.row_grads))
    monkeypatch.setattr(kernels, "_forward_chunked", chunked_spy)
    assert training_kernels(torch.device("cuda")) is None
    options = Options(model=str(digits_onnx), dataset="digits", eps=0.05, order=1, max_test=16, attack_steps=2,
                      attack_restarts=1, device="cpu", epochs=1, max_train=64, batch_size=32,
                      out=str(tmp_path / "out"))
    harden(options, {}, "test", Reporter())
    assert len(calls) >= 2 and max(calls) <= 32  # training's batches (certification's bounders run none)
    assert chunked == ([] if _native_built() else calls)
