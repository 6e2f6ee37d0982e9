"""Outside autograd on the CPU, the SSIP step at an activation runs on batch chunks
(``propagate._in_chunks``): the same ops on the same values as the step on the whole
batch, so every bound, row and constant of the pass must come out bit for bit the same."""

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


def _assert_same(got, want) -> None:
    assert got.pre.keys() == want.pre.keys()
    for i, p in want.pre.items():
        for a, b in zip(got.pre[i] if isinstance(p, list) else [got.pre[i]], p if isinstance(p, list) else [p]):
            assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), f"pre[{i}]"
            assert a.lower.stride() == b.lower.stride(), f"pre[{i}] layout"
    for i, (s, t) in enumerate(zip(got.symbolic, want.symbolic)):
        assert (s is None) == (t is None), f"symbolic[{i}]"
        if s is None:
            continue
        for eq, ref in ((s.centre, t.centre), (s.radius, t.radius)):
            assert (eq is None) == (ref is None), f"symbolic[{i}] radius"
            if eq is not None:
                assert torch.equal(eq.coef, ref.coef) and torch.equal(eq.const, ref.const), f"symbolic[{i}]"
                assert eq.coef.stride() == ref.coef.stride(), f"symbolic[{i}] layout"
    for i, (a, b) in enumerate(zip(got.intervals, want.intervals)):
        if b is not None:
            assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), f"intervals[{i}]"


@pytest.mark.parametrize("act", ["relu", "prelu", "leaky-relu-negative", "hardtanh", "sigmoid"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_bytes", [1, 5000, 40000])
def test_chunked_step_equals_the_whole_batch_step(act, layout, dtype, chunk_bytes, monkeypatch):
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
    for name in ("_concretize_in_chunks", "_relax_forward_in_chunks"):
        real = getattr(propagate, name)
        monkeypatch.setattr(propagate, name, (lambda f, n: lambda *a: calls.append((n, len(a[-1 if n == "rows" else 0].centre.coef))) or f(*a))(
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


def test_chunks_only_outside_autograd(monkeypatch):
    """Under autograd (training) the step runs on the whole batch: its results carry gradients."""
    monkeypatch.setattr(propagate, "CHUNK_BYTES", 1)
    images = torch.rand(BATCH, 3, 8, 8)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="mult").affine_set(images)
    model = _network("relu", torch.float32)
    calls = []
    real = propagate._concretize_in_chunks
    monkeypatch.setattr(propagate, "_concretize_in_chunks", lambda *a: calls.append(1) or real(*a))
    lower = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset, torch.zeros(BATCH).long())
    assert not calls and lower.requires_grad
    with torch.no_grad():
        again = load_registry().bound_method("ssip")().margin_lower(compile_network(model), aset,
                                                                     torch.zeros(BATCH).long())
    assert calls and torch.equal(again, lower.detach())


def test_chunked_rows_take_broadcast_slopes(monkeypatch):
    """A rule may return relaxation tensors that only broadcast to the node's shape (here one
    row of slopes for the whole batch): the chunked step gives every sample its slopes."""
    from robnet_svc.bounds.ops.relu import ReluRule
    from robnet_svc.bounds.types import Relaxation

    def shared(self, lower, upper):  # sound: 0 <= relu(x) <= the batch's largest relu(u), slopes 0
        top = torch.relu(upper).amax(0, keepdim=True)  # [1, *shape]
        return Relaxation(torch.zeros_like(top), torch.zeros_like(top), torch.zeros_like(top), top)

    monkeypatch.setattr(ReluRule, "relax", shared)
    images = torch.rand(BATCH, 3, 8, 8, dtype=torch.float64)
    aset = load_registry().perturbation("bias-field")(0.3, order=2, mode="mult").affine_set(images)
    model = _network("relu", torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(propagate, "CHUNK_BYTES", 1 << 40)
        (whole,) = _passes(model, aset, [{}])
        monkeypatch.setattr(propagate, "CHUNK_BYTES", 1)
        (chunked,) = _passes(model, aset, [{}])
    _assert_same(chunked, whole)
