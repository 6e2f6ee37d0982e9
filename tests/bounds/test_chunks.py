"""Outside autograd on the CPU, the SSIP step at an activation runs as native kernels
(``robnet_svc/bounds/native.py``) or, where those are off or unavailable, on batch chunks
(``propagate._in_chunks``). The chunks run the same ops on the same values as the step on the
whole batch, so every bound, row and constant of the pass must come out bit for bit the same;
the native kernels sum in another order, so theirs must agree to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network, graph, propagate
from robnet_svc.bounds.propagate import forward_pass
from robnet_svc.plugins import load_registry

from .strategies import ACTIVATIONS

BATCH = 5


def _network(act: str, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ACTIVATIONS[act](8, gen),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), ACTIVATIONS[act](8, gen),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 6), ACTIVATIONS[act](6, gen), nn.Linear(6, 3))
    return model.to(dtype).eval()


def _passes(model, aset, symbolic_kwargs: list[dict]):
    frame = compile_network(model).frame(aset)
    plain = forward_pass(frame, aset)
    return [forward_pass(frame, aset, symbolic=True, **{**kw, "tighter": plain.pre if kw.get("tighter") else None})
            for kw in symbolic_kwargs]


def _assert_same(got, want, dtype: torch.dtype | None = None) -> None:
    """Every bound, row, constant and interval of two passes: equal bit for bit and in the same
    memory layout (``dtype`` None), or equal to rounding in ``dtype`` (``_close``)."""
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a, b) if dtype is None else _close(a, b, dtype)

    def layout(a: torch.Tensor, b: torch.Tensor) -> bool:
        return dtype is not None or a.stride() == b.stride()

    assert got.pre.keys() == want.pre.keys()
    for i, p in want.pre.items():
        for a, b in zip(got.pre[i] if isinstance(p, list) else [got.pre[i]], p if isinstance(p, list) else [p]):
            assert same(a.lower, b.lower) and same(a.upper, b.upper), f"pre[{i}]"
            assert layout(a.lower, b.lower), f"pre[{i}] layout"
    for i, (s, t) in enumerate(zip(got.symbolic, want.symbolic)):
        assert (s is None) == (t is None), f"symbolic[{i}]"
        if s is None:
            continue
        for eq, ref in ((s.centre, t.centre), (s.radius, t.radius)):
            assert (eq is None) == (ref is None), f"symbolic[{i}] radius"
            if eq is not None:
                assert same(eq.coef, ref.coef) and same(eq.const, ref.const), f"symbolic[{i}]"
                assert layout(eq.coef, ref.coef), f"symbolic[{i}] layout"
    for i, (a, b) in enumerate(zip(got.intervals, want.intervals)):
        assert (a is None) == (b is None), f"intervals[{i}]"
        if b is not None:
            assert same(a.lower, b.lower) and same(a.upper, b.upper), f"intervals[{i}]"


def _pytorch_passes(model, aset, symbolic_kwargs: list[dict], monkeypatch):
    """``_passes`` with the native kernels off: the PyTorch ops' results to compare them with."""
    with monkeypatch.context() as m:
        m.setenv("ROBNET_SVC_NATIVE", "0")
        return _passes(model, aset, symbolic_kwargs)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to the rounding of a different summation order: a few ulps of the largest
    magnitude involved (the sums run over at most a few hundred terms here)."""
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
    return a.shape == b.shape and bool(((a - b).abs() <= 64 * torch.finfo(dtype).eps * scale).all())


@pytest.fixture
def pytorch_ops(monkeypatch):
    """The engine without its native kernels (``ROBNET_SVC_NATIVE=0``): the chunked PyTorch ops."""
    monkeypatch.setenv("ROBNET_SVC_NATIVE", "0")


@pytest.mark.parametrize("act", ["relu", "prelu", "leaky-relu-negative", "hardtanh", "sigmoid"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_bytes", [1, 5000, 40000])
def test_chunked_step_equals_the_whole_batch_step(act, layout, dtype, chunk_bytes, monkeypatch, pytorch_ops):
    """Every activation kind (ReLU; PReLU's per-channel slopes; a negative slope, which swaps
    Lo and Up; a clamp; a smooth one), both layouts, both precisions, chunks of one sample up to
    uneven ones, and every way a pass runs (alone, with tighter bounds, stopping at the last
    activation): the chunked pass equals the pass on the whole batch bit for bit."""
    monkeypatch.setattr(graph.Frame, "prefers_channels_last", property(lambda self: layout == "channels_last"))
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 3, 8, 8, generator=gen, dtype=dtype)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="both", clip=(0.0, 1.0)).affine_set(images)
    model = _network(act, dtype)
    kwargs = [{}, {"tighter": True}, {"pre_only": True}]
    calls = []
    for name in ("_concretize_outside_autograd", "_relax_forward_outside_autograd"):
        real = getattr(propagate, name)
        monkeypatch.setattr(propagate, name, (lambda f, n: lambda *a: calls.append((n, len(a[1 if n == "rows" else 0].centre.coef))) or f(*a))(
            real, "rows" if "relax" in name else "bounds"))
    with torch.no_grad():
        monkeypatch.setattr(propagate, "CHUNK_BYTES", 1 << 40)
        whole = _passes(model, aset, kwargs)
        assert not calls
        monkeypatch.setattr(propagate, "CHUNK_BYTES", chunk_bytes)
        chunked = _passes(model, aset, kwargs)
    for got, want in zip(chunked, whole):
        _assert_same(got, want)
    if chunk_bytes < 40000:  # the first convolution's rows (15 x 8 x 8 x 8 per sample) span chunks
        assert ("bounds", BATCH) in calls
        assert (("rows", BATCH) in calls) is (act not in ("prelu", "leaky-relu-negative"))  # slopes >= 0


def test_chunks_only_outside_autograd(monkeypatch, pytorch_ops):
    """Under autograd (training) the step runs on the whole batch: its results carry gradients."""
    monkeypatch.setattr(propagate, "CHUNK_BYTES", 1)
    images = torch.rand(BATCH, 3, 8, 8)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="mult").affine_set(images)
    model = _network("relu", torch.float32)
    calls = []
    real = propagate._concretize_outside_autograd
    monkeypatch.setattr(propagate, "_concretize_outside_autograd", lambda *a: calls.append(1) or real(*a))
    lower = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset, torch.zeros(BATCH).long())
    assert not calls and lower.requires_grad
    with torch.no_grad():
        again = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset,
                                                                     torch.zeros(BATCH).long())
    assert calls and torch.equal(again, lower.detach())


@pytest.mark.parametrize("native", [False, True])
def test_chunked_rows_take_broadcast_slopes(native, monkeypatch):
    """A rule may return relaxation tensors that only broadcast to the node's shape (here one
    row of slopes for the whole batch): the chunked step gives every sample its slopes."""
    from robnet_svc.bounds.ops.relu import ReluRule
    from robnet_svc.bounds.types import Relaxation

    def shared(self, lower, upper):  # sound: 0 <= relu(x) <= the batch's largest relu(u), slopes 0
        top = torch.relu(upper).amax(0, keepdim=True)  # [1, *shape]
        return Relaxation(torch.zeros_like(top), torch.zeros_like(top), torch.zeros_like(top), top)

    monkeypatch.setattr(ReluRule, "relax", shared)  # no longer ReLU's relaxation: no native relu_step
    monkeypatch.setenv("ROBNET_SVC_NATIVE", "1" if native else "0")
    images = torch.rand(BATCH, 3, 8, 8, dtype=torch.float64)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="mult").affine_set(images)
    model = _network("relu", torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(propagate, "CHUNK_BYTES", 1 << 40)
        (whole,) = _passes(model, aset, [{}]) if not native else _pytorch_passes(model, aset, [{}], monkeypatch)
        monkeypatch.setattr(propagate, "CHUNK_BYTES", 1)
        (chunked,) = _passes(model, aset, [{}])
    _assert_same(chunked, whole, torch.float64 if native else None)


@pytest.mark.parametrize("act", ["relu", "prelu", "leaky-relu-negative", "hardtanh", "sigmoid"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_native_step_agrees_with_the_pytorch_ops(act, layout, dtype, clip, monkeypatch):
    """The native kernels (the ReLU's whole step, the bounds and the next rows of any
    activation with non-negative slopes, the clipping layer) against the PyTorch ops, every
    way a pass runs (alone, with tighter bounds, stopping at the last activation), both
    layouts and precisions: every bound, row, constant and interval agrees to rounding, and the
    kernels ran where they apply."""
    from robnet_svc.bounds import native

    if native.kernels() is None:
        pytest.fail(f"the native kernels did not build here: {native.status()}")
    monkeypatch.setattr(graph.Frame, "prefers_channels_last", property(lambda self: layout == "channels_last"))
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 3, 8, 8, generator=gen, dtype=dtype)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="both", clip=clip).affine_set(images)
    model = _network(act, dtype)
    kwargs = [{}, {"tighter": True}, {"pre_only": True}]
    calls = []
    for name in ("_relu_step_native", "_clip_layer_native", "_concretize_outside_autograd",
                 "_relax_forward_outside_autograd"):
        real = getattr(propagate, name)
        monkeypatch.setattr(propagate, name, (lambda f, n: lambda *a: calls.append((n, a[-1] is not None))
                                              or f(*a))(real, name))
    with torch.no_grad():
        want = _pytorch_passes(model, aset, kwargs, monkeypatch)
        calls.clear()
        got = _passes(model, aset, kwargs)
    for g, w in zip(got, want):
        _assert_same(g, w, dtype)
    names = {name for name, _ in calls}
    assert ("_relu_step_native" in names) is (act == "relu")
    assert ("_clip_layer_native" in names) is (clip is not None)
    if act != "relu":  # the bounds by ext.bounds_of_rows (ext given), rows by ext.half_sums where slopes >= 0
        assert ("_concretize_outside_autograd", True) in calls
        assert (("_relax_forward_outside_autograd", True) in calls) is (act not in ("prelu", "leaky-relu-negative"))


def test_native_step_only_outside_autograd(monkeypatch):
    """Under autograd (training) no native kernel runs: the bounds carry gradients."""
    calls = []
    real = propagate._relu_step_native
    monkeypatch.setattr(propagate, "_relu_step_native", lambda *a: calls.append(1) or real(*a))
    images = torch.rand(BATCH, 3, 8, 8)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="mult", clip=(0.0, 1.0)).affine_set(images)
    model = _network("relu", torch.float32)
    lower = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset, torch.zeros(BATCH).long())
    assert not calls and lower.requires_grad
    with torch.no_grad():
        again = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset,
                                                                     torch.zeros(BATCH).long())
    assert calls and _close(again, lower.detach(), torch.float32)
