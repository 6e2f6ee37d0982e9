"""Certification: bounds + attack -> per-sample certificates, and the soundness cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robnet_svc.bounder import Bounder
from robnet_svc.certify import (AttackSettings, Certificates, attack_margin, box_corners, certify_model,
                                check_soundness, margins)
from robnet_svc.errors import SoundnessError
from robnet_svc.plugins import load_registry


@pytest.fixture(scope="module")
def setup(registry):
    """A small random CNN, 24 random 1x8x8 images labelled by the net itself (so most are correct)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.ReLU(),
                        nn.Linear(16, 3)).eval()
    images = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        labels = net(images).argmax(-1)
    labels[:3] = (labels[:3] + 1) % 3  # three misclassified samples
    return net, images, labels


def test_margins_and_corners():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert margins(logits, torch.tensor([0, 0])).tolist() == [1.0, -5.0]
    corners = box_corners(torch.tensor([[0.0, -1.0]]), torch.tensor([[1.0, 1.0]]))
    assert sorted(map(tuple, corners[0].tolist())) == [(0, -1), (0, 1), (1, -1), (1, 1)]


def test_certificates_are_consistent_deterministic_and_sound(registry, setup):
    net, images, labels = setup
    method = registry.bound_method("rsip-ssip")()
    pert = registry.perturbation("bias-field")(0.15, order=1)
    bounder = Bounder(net, method, pert, tuple(images.shape[1:]), rules=registry.rules())
    kwargs = dict(batch_size=10, attack=AttackSettings(steps=5, restarts=4), device=torch.device("cpu"))
    certs = certify_model(bounder, images, labels, **kwargs)
    again = certify_model(bounder, images, labels, **kwargs)
    for name in Certificates.FIELDS:
        np.testing.assert_array_equal(getattr(certs, name), getattr(again, name))
    assert certs.margin_lower.shape == (24, 2)
    assert not certs.certified[:3].any() and certs.attack_success[:3].all()  # misclassified: never certified
    assert certs.certified.any() and not certs.certified.all()  # a meaningful test: both kinds present
    s = certs.summary()
    assert s["certified_accuracy"] <= s["empirical_robust_accuracy"] <= s["clean_accuracy"]
    # every certified sample keeps its label on 256 sampled perturbations (corners included)
    aset = pert.affine_set(images)
    coeffs = aset.sample(256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = net(aset.clipped(aset.images(coeffs)).reshape(-1, 1, 8, 8)).reshape(24, 256, 3)
    worst = margins(logits, labels.unsqueeze(1)).min(1).values.numpy()
    assert (worst[certs.certified] > 0).all()
    assert (certs.attack_margin <= worst + 1e-5).all()  # the attack is at least as strong as sampling


def test_attack_finds_the_known_worst_case_of_a_linear_model():
    """Logit difference = mean brightness - 0.5: the brightness box [-0.3, 0.3] flips images
    whose mean is within 0.3 of 0.5 (no clipping at mean 0.5 +- 0.2 of a flat image)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.25] * 4, [0.0] * 4]))
        net[1].bias.copy_(torch.tensor([-0.5, 0.0]))
    images = torch.tensor([0.6, 0.9]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    pert = load_registry().perturbation("brightness")(0.3)
    found, success = attack_margin(net, pert.affine_set(images), torch.tensor([0, 0]),
                                   AttackSettings(steps=3, restarts=1), torch.arange(2))
    assert found.tolist() == pytest.approx([0.6 - 0.3 - 0.5, 0.9 - 0.3 - 0.5], abs=1e-6)
    assert success.tolist() == [True, False]


def _tie_model() -> nn.Module:
    """logit_0 = 0.25, logit_1 = pixel: a flat 0.5 image under brightness 0.25 reaches an exact tie
    (0.25 = 0.25, every value a short binary fraction, so no rounding) at the box corner a = -0.25."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
        net[1].bias.copy_(torch.tensor([0.25, 0.0]))
    return net.eval()


def test_a_tie_with_a_lower_class_is_a_successful_attack():
    """argmax breaks ties towards the lower index, so at the tie the prediction is class 0, not
    the label 1: the attack succeeded although its margin is exactly 0 (issue 13, case 3)."""
    net = _tie_model()
    images = torch.full((1, 1, 1, 1), 0.5)
    pert = load_registry().perturbation("brightness")(0.25)
    found, success = attack_margin(net, pert.affine_set(images), torch.tensor([1]),
                                   AttackSettings(steps=2, restarts=1), torch.arange(1))
    assert found.item() == 0.0 and success.item()
    with torch.no_grad():  # the tie point really is predicted as class 0
        assert net(torch.full((1, 1, 1, 1), 0.25)).argmax(-1).item() == 0
    # and certification agrees: not certified (margin lower bound 0 is not > its allowance), attack success
    certs = certify_model(Bounder(net, load_registry().bound_method("ibp")(), pert, (1, 1, 1)), images,
                          torch.tensor([1]), batch_size=1, attack=AttackSettings(steps=2, restarts=1),
                          device=torch.device("cpu"))
    assert certs.prediction.tolist() == [1] and certs.attack_success.tolist() == [True]
    assert certs.certified.tolist() == [False] and certs.margin_lower[0, 0] == 0.0


def test_certified_and_attacked_is_a_soundness_error_naming_the_sample():
    certs = Certificates(index=np.array([10, 11, 12]), label=np.array([0, 1, 2]), prediction=np.array([0, 1, 2]),
                         certified=np.array([True, True, False]), margin_lower=np.full((3, 2), 0.1, np.float32),
                         attack_success=np.array([False, True, True]),
                         attack_margin=np.array([0.5, -0.2, -0.1], np.float32),
                         rounding_allowance=np.full((3, 2), 1e-6))
    with pytest.raises(SoundnessError, match="sample 11 .*certified by rsip-ssip"):
        check_soundness(certs, "rsip-ssip")
    certs.attack_success[1] = False
    check_soundness(certs, "rsip-ssip")  # consistent certificates pass
