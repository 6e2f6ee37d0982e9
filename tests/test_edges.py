"""Certificates at the edges (issue 13): huge radii through the clipping layer, the refusal of
fields float32 cannot represent, the best of the bounds a method has, the default coef_scale
in the declared set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network
from robnet_svc.bounds.propagate import forward_pass
from robnet_svc.certify import margins
from robnet_svc.errors import RobnetError
from robnet_svc.perturbations.base import check_field_range

METHODS = ("ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip")


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).eval()
    images = torch.rand(6, 1, 4, 4) * 0.8 + 0.1
    with torch.no_grad():
        labels = net(images).argmax(-1)
    return net, images, labels


def _sampled_worst(net, aset, labels, num=512):
    coeffs = aset.sample(num, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = aset.clipped(aset.images(coeffs))
        logits = net(images.reshape(-1, *images.shape[2:])).reshape(images.shape[0], num, -1)
    k = logits.shape[-1]
    rows = []
    for i in range(k):  # margins against each class, as the spec rows (i != label, increasing i)
        rows.append(logits.gather(-1, labels.view(-1, 1, 1).expand(-1, num, 1)).squeeze(-1) - logits[..., i])
    full = torch.stack(rows, -1).min(1).values  # [B, K]
    keep = torch.ones_like(full, dtype=torch.bool).scatter(1, labels.unsqueeze(1), False)
    return full[keep].reshape(full.shape[0], k - 1)


@pytest.mark.parametrize("setting", [{"eps": 1e8}, {"eps": 0.3, "coef_scale": 1e-8}])
def test_clipping_bounds_hold_at_huge_field_ranges(registry, small_cnn, setting):
    """With a field range far past float32's resolution at [0, 1], the clipping layer's bounds
    used to go through centre ± radius and lose the clip range: every method then bounded the
    clip output as a constant and "certified" flippable samples. Its bounds are now the clip
    range itself, and every method's margin bounds stay below sampled margins (float32 engine)."""
    net, images, labels = small_cnn
    pert = registry.perturbation("bias-field")(setting["eps"], order=1, coef_scale=setting.get("coef_scale"))
    aset = pert.affine_set(images)
    compiled = compile_network(net, rules=registry.rules())
    frame = compiled.frame(aset)
    clip_out = forward_pass(frame, aset).intervals[5]
    centre, radius = pert.affine_set(images.double()).center_radius()  # the field's pixel range, in float64
    torch.testing.assert_close(clip_out.lower, (centre - radius).clamp(0, 1).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(clip_out.upper, (centre + radius).clamp(0, 1).float(), rtol=0, atol=1e-6)
    worst = _sampled_worst(net, aset, labels)
    assert (worst.min(-1).values < 0).any()  # the set does flip samples: a meaningful test
    for name in METHODS:
        bound = registry.bound_method(name)().margin_lower(compiled, aset, labels)
        assert (bound <= worst + 1e-4).all(), name


def test_field_range_limit_is_refused_and_normal_settings_pass(registry):
    pert = registry.perturbation("bias-field")
    check_field_range(pert(0.3, order=3), (1, 8, 8))  # the demo's kind of setting
    check_field_range(pert(1000.0, order=1), (1, 8, 8))  # far out, still resolvable in float32
    with pytest.raises(RobnetError, match="the limit is 32768"):
        check_field_range(pert(1e7, order=1), (1, 8, 8))
    with pytest.raises(RobnetError, match="coef_scale 1e-09"):
        check_field_range(pert(0.3, order=1, coef_scale=1e-9), (1, 8, 8))


def test_declared_set_is_the_bounded_box(registry):
    """The default coef_scale is recorded as the value used (it was stored as null)."""
    pert = registry.perturbation("bias-field")(0.3, order=3)
    described = pert.describe()
    assert described["coef_scale"] == 15.0
    aset = pert.affine_set(torch.rand(1, 1, 4, 4))
    assert aset.upper[0, 1].item() == pytest.approx(described["eps"] / described["coef_scale"])
    assert "coef_scale" not in registry.perturbation("brightness")(0.1).describe()


@pytest.mark.parametrize("method", ["rsip-ibp", "rsip-ssip", "rsip"])
def test_backward_methods_keep_the_best_bound_they_hold(registry, small_cnn, method):
    """A sound bound may be replaced by a tighter sound one: every method is at least IBP, and
    rsip-ssip at least SSIP, elementwise, on the very same inputs."""
    net, images, labels = small_cnn
    aset = registry.perturbation("bias-field")(0.4, order=1).affine_set(images)
    compiled = compile_network(net, rules=registry.rules())
    bound = registry.bound_method(method)().margin_lower(compiled, aset, labels)
    looser = ["ibp"] + (["ssip"] if method == "rsip-ssip" else [])
    for name in looser:
        other = registry.bound_method(name)().margin_lower(compiled, aset, labels)
        assert (bound >= other).all(), name
