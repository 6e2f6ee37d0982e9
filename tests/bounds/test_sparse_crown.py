"""Full CROWN (``rsip``) with sparse intermediate bounds (issue 20).

``rsip`` back-substitutes only the neurons whose relaxation depends on their bounds
(``ActivationRule.unstable`` on the IBP box; every input of a ``RelaxedRule``) and keeps the
IBP box elsewhere. That is exact only if ``unstable`` tells the truth, so both are checked:
the rules' claim directly (the relaxation of a neuron outside the mask is the same on any
sub-box), and the end result against bounding every neuron (``sparse = False``, today's
algorithm) on random networks with every family of op rules, in several chunks. Soundness of
``rsip`` itself is covered by the property suite (``test_soundness``, ``test_activations``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robnet_svc.bounds import compile_network
from robnet_svc.bounds.methods import RSIP

from .strategies import FAMILIES, OP_FAMILIES, Recipe, build, make_set, perturbation_inputs, recipes
from .test_soundness import PROPERTY

# activations with an ``unstable`` mask (piecewise linear) and ones without (smooth: all neurons)
ACTS = ("relu", "relu6", "clamp-max", "leaky-relu-negative", "prelu", "sigmoid")


class _Dense(RSIP):
    """Today's full CROWN: every neuron of every layer, small chunks."""

    sparse = False
    chunk_elements = 1 << 12


class _SparseSmallChunks(RSIP):
    chunk_elements = 1 << 10


@pytest.mark.parametrize("act", ACTS)
@settings(**PROPERTY, max_examples=2)
@given(data=st.data(), clip=st.booleans(), pert=st.sampled_from(["bias-mult-o2", "bias-both-o1", "linf"]))
def test_sparse_equals_dense(act, data, clip, pert):
    recipe = data.draw(recipes(families=FAMILIES + OP_FAMILIES, relu=True, act=act), label="recipe")
    images, labels, eps = data.draw(perturbation_inputs(recipe), label="inputs")
    module = build(recipe).double()
    aset = make_set(pert, images.double(), eps, clip=clip)
    net = compile_network(module)
    for ordered in (True, False):
        sparse = _SparseSmallChunks(ordered=ordered).margin_lower(net, aset, labels)
        dense = _Dense(ordered=ordered).margin_lower(net, aset, labels)
        scale = max(1.0, dense.abs().max().item())
        err = (sparse - dense).abs().max().item()
        assert err <= 1e-6 * scale, f"sparse rsip differs from dense by {err:.3e} ({act}, {pert}, {recipe})"


@pytest.mark.parametrize("act", ["relu", "relu6", "hardtanh", "clamp-min", "clamp-max", "leaky-relu",
                                 "leaky-relu-steep", "leaky-relu-negative", "prelu"])
def test_unstable_mask_is_honest(act):
    """Outside ``unstable(l, u)`` the relaxation on ``[l, u]`` equals the one on any sub-box
    (random boxes, many with an end exactly at a kink)."""
    from torch import nn

    from .strategies import ACTIVATIONS

    torch.manual_seed(0)
    layer = ACTIVATIONS[act](4, torch.Generator().manual_seed(0))
    net = compile_network(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), layer, nn.Linear(4, 2)).double().eval())
    frame = net.frame(make_set("linf", torch.rand(1, 1, 2, 2, dtype=torch.float64), 0.1, clip=False))
    (i,) = [i for i in range(len(frame.nodes)) if frame.is_activation(i)]
    rule = frame.rule(i)
    n = 4000
    kinks = torch.tensor([0.0, -0.3, 0.4, -0.4, 0.7], dtype=torch.float64)
    ends = torch.randn(n, 2, dtype=torch.float64)
    snap = torch.rand(n, 2) < 0.3  # some ends exactly at a kink
    ends = torch.where(snap, kinks[torch.randint(0, len(kinks), (n, 2))], ends)
    lower, upper = ends.min(1).values.reshape(-1, 4), ends.max(1).values.reshape(-1, 4)
    t = torch.rand(2, *lower.shape, dtype=torch.float64).sort(0).values
    sub_lo, sub_up = lower + t[0] * (upper - lower), lower + t[1] * (upper - lower)
    mask = rule.unstable(lower, upper)
    assert mask is not None and mask.any() and not mask.all()
    whole, sub = rule.relax(lower, upper), rule.relax(sub_lo, sub_up)
    for field in ("lower_slope", "lower_bias", "upper_slope", "upper_bias"):
        a, b = getattr(whole, field), getattr(sub, field)
        assert torch.equal(a[~mask], b[~mask]), f"{act}: {field} of a neuron outside the mask changed on a sub-box"


def test_smooth_activations_need_every_neuron():
    """Smooth activations' relaxations depend on both ends everywhere: no mask (all neurons)."""
    from torch import nn

    net = compile_network(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)).eval())
    frame = net.frame(make_set("linf", torch.rand(1, 1, 2, 2), 0.1, clip=False))
    (i,) = [i for i in range(len(frame.nodes)) if frame.is_activation(i)]
    assert frame.rule(i).unstable(-torch.ones(1, 4), torch.ones(1, 4)) is None


class _TrimmedChunks(RSIP):
    """Full CROWN that hands the free heap back after every chunk (a limit of 0 bytes)."""

    chunk_elements = 1 << 10
    heap_limit = 0


def test_handing_the_heap_back_between_chunks_changes_no_bound():
    """``RSIP.heap_limit``: above it full CROWN trims the heap after a chunk (the allocator tuned
    as the command line tunes it); the bounds do not depend on it."""
    import sys

    from robnet_svc.bounds.alloc import keep_freed_memory, resident_bytes

    keep_freed_memory()
    if sys.platform.startswith("linux"):
        assert resident_bytes() > 0
    recipe = Recipe("cnn", 1, (6, 6), 3, 4, True, "none", False, False, False, 1, False, False, 0)
    module = build(recipe).double()
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(3, recipe.channels, *recipe.size, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, recipe.classes, (3,), generator=gen)
    aset = make_set("bias-mult-o2", images, 0.1, clip=True)
    net = compile_network(module)
    trimmed = _TrimmedChunks().margin_lower(net, aset, labels)
    plain = _SparseSmallChunks().margin_lower(net, aset, labels)
    assert torch.equal(trimmed, plain)
