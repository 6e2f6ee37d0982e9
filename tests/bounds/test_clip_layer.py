"""The clipping layer in one step of the SSIP pass (``propagate._clip_layer_forward``).

It must give the node-by-node pass's bounds (``_clip_layer_in_one_step`` patched to False runs
that pass, the engine as it was before the step existed) up to rounding, at every activation of
the network, and hand the network the same equations; and it must step aside wherever a later
step would read the layer's inner nodes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import robnet_svc.bounds.propagate as propagate
from robnet_svc.bounds import compile_network
from robnet_svc.bounds.propagate import forward_pass
from robnet_svc.bounds.types import PreActivationBounds
from robnet_svc.plugins import load_registry

from .strategies import DENSE_METHODS, PERTURBATIONS, build, check_sound, make_set, perturbation_inputs, recipes, \
    sampled_margins
from .test_soundness import NUM_SAMPLES, PROPERTY

DENSE = [p for p in PERTURBATIONS if p != "linf"]


def _node_by_node(fn):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(propagate, "_clip_layer_in_one_step", lambda *args: False)
        return fn()


def _assert_pre_equal(one, two, scale: float, context: str) -> None:
    assert one.keys() == two.keys(), context
    for i in one:
        a = one[i] if isinstance(one[i], list) else [one[i]]
        b = two[i] if isinstance(two[i], list) else [two[i]]
        for p, q in zip(a, b):
            for x, y in ((p.lower, q.lower), (p.upper, q.upper)):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-11 * scale, msg=lambda m: f"node {i}, {context}: {m}")


@settings(**PROPERTY, max_examples=12)
@given(data=st.data(), pert_id=st.sampled_from(DENSE))
def test_one_step_gives_the_node_by_node_bounds_and_is_sound(data, pert_id):
    recipe = data.draw(recipes(), label="recipe")
    images, labels, eps = data.draw(perturbation_inputs(recipe), label="inputs")
    module = build(recipe).double()  # float64: the two summation orders agree to ~1e-15
    # pixels off 0 and 1 by a little: at exactly 0 an additive field's box is symmetric about the
    # clip's kink (u = −l), and rounding may break the ReLU's tie α = [u >= −l] either way
    aset = make_set(pert_id, images.double() * 0.98 + 0.01, eps, True)
    net = compile_network(module)
    frame = net.frame(aset)
    context = f"{pert_id}, {recipe}"
    one = forward_pass(frame, aset, symbolic=True)
    two = _node_by_node(lambda: forward_pass(net.frame(aset), aset, symbolic=True))
    scale = max(1.0, max(p.upper.abs().max().item() for p in two.pre.values() if not isinstance(p, list)))
    _assert_pre_equal(one.pre, two.pre, scale, context)
    end = frame.clip_end
    if propagate._clip_layer_in_one_step(frame, one.symbolic[0], frame.output + 1):
        for part in ("centre", "radius"):
            a, b = getattr(one.symbolic[end], part), getattr(two.symbolic[end], part)
            assert (a is None) == (b is None), f"{part} exactness differs, {context}"
            if a is not None:
                torch.testing.assert_close(a.coef, b.coef, rtol=0, atol=1e-12, msg=lambda m: f"{part}, {context}: {m}")
                torch.testing.assert_close(a.const, b.const, rtol=0, atol=1e-12,
                                           msg=lambda m: f"{part}, {context}: {m}")
    sampled = sampled_margins(module, aset, labels, NUM_SAMPLES)
    for method in DENSE_METHODS:
        for ordered in (False, True):
            bound = load_registry().bound_method(method)(ordered=ordered)
            lower = bound.margin_lower(net, aset, labels)
            reference = _node_by_node(lambda: bound.margin_lower(net, aset, labels))
            torch.testing.assert_close(lower, reference, rtol=0, atol=1e-10 * max(1.0, reference.abs().max().item()),
                                       msg=lambda m: f"{method} ordered={ordered} {context}: {m}")
            check_sound({f"{method} ordered={ordered}": lower}, sampled, context)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()


def _set(eps: float, images: torch.Tensor):
    return make_set("bias-mult-o2", images, eps, True)


def test_a_clip_that_changes_nothing_hands_on_the_image_rows_themselves():
    """Pixels well inside [0, 1] and a small field: both ReLUs are the identity everywhere, so
    the output is the image's own equation (the rows object, not a copy), exact."""
    images = torch.full((2, 3, 6, 6), 0.5, dtype=torch.float64)
    aset = _set(0.01, images)
    frame = compile_network(_cnn()).frame(aset)
    fwd = forward_pass(frame, aset, symbolic=True)
    out = fwd.symbolic[frame.clip_end]
    assert out.radius is None
    assert out.centre.coef is fwd.symbolic[0].centre.coef
    torch.testing.assert_close(out.centre.const, fwd.symbolic[0].centre.const, rtol=0, atol=1e-15)


def test_pixels_clipped_at_the_top_everywhere_give_exact_constant_rows():
    """Every pixel far above 1 over the whole box: the clip outputs the constant 1, exactly
    (zero rows, no radius), as node by node."""
    images = torch.full((2, 3, 6, 6), 0.5, dtype=torch.float64)
    aset = make_set("bias-add-o0", images + 5.0, 0.1, True)
    net = compile_network(_cnn())
    fwd = forward_pass(net.frame(aset), aset, symbolic=True)
    end = net.frame(aset).clip_end
    out = fwd.symbolic[end]
    ref = _node_by_node(lambda: forward_pass(net.frame(aset), aset, symbolic=True)).symbolic[end]
    assert out.radius is None and ref.radius is None
    assert torch.count_nonzero(out.centre.coef) == 0
    torch.testing.assert_close(out.centre.const, torch.ones_like(out.centre.const), rtol=0, atol=0)
    torch.testing.assert_close(out.centre.coef, ref.centre.coef, rtol=0, atol=0)


def test_tighter_bounds_at_the_clip_relus_are_intersected():
    """RSIP-SSIP style ``tighter`` bounds at the layer's ReLUs reach the recorded bounds and
    everything after them, as node by node."""
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    aset = _set(0.4, images)
    net = compile_network(_cnn())
    frame = net.frame(aset)
    plain = forward_pass(frame, aset, symbolic=True)
    tighter = {}
    for i in (2, 4):  # the clip's ReLUs
        p = plain.pre[i]
        width = p.upper - p.lower
        tighter[i] = PreActivationBounds(p.lower + 0.3 * width, p.upper - 0.2 * width)
    one = forward_pass(frame, aset, symbolic=True, tighter=tighter)
    two = _node_by_node(lambda: forward_pass(net.frame(aset), aset, symbolic=True, tighter=tighter))
    _assert_pre_equal(one.pre, two.pre, 1.0, "tighter")
    for i in (2, 4):
        torch.testing.assert_close(one.pre[i].lower, tighter[i].lower, rtol=0, atol=1e-15)


class _Skip(nn.Module):
    """An affine path from the (clipped) input straight to the output, beside a ReLU branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.skip = nn.Linear(3 * 6 * 6, 5), nn.Linear(5, 3), nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        flat = x.flatten(1)
        return self.fc2(torch.relu(self.fc1(flat))) + self.skip(flat)


@pytest.mark.parametrize("make, one_step", [(_cnn, True), (_Skip, False),
                                            (lambda: nn.Sequential(nn.Flatten(), nn.Linear(108, 3)), False)],
                         ids=["cnn", "skip-to-output", "no-activation"])
def test_the_one_step_is_taken_only_where_no_inner_node_is_read(make, one_step):
    """A tail back-substitution reads the clip's inner nodes when the layer reaches the output
    through affine nodes (a skip connection, or no activation at all): there the pass goes node
    by node; every method's margins stay those of the node-by-node pass."""
    gen = torch.Generator().manual_seed(2)
    module = make().double()
    images = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    aset = _set(0.3, images)
    labels = torch.tensor([0, 2])
    net = compile_network(module)
    frame = net.frame(aset)
    image = forward_pass(frame, aset, symbolic=True).symbolic[0]
    assert propagate._clip_layer_in_one_step(frame, image, len(frame.nodes)) == one_step
    for method in DENSE_METHODS:
        bound = load_registry().bound_method(method)(ordered=False)
        lower = bound.margin_lower(net, aset, labels)
        reference = _node_by_node(lambda: bound.margin_lower(net, aset, labels))
        torch.testing.assert_close(lower, reference, rtol=0, atol=1e-12)
