"""Certified radius per sample (``--radius``): checked against fixed-ε certification with the
real engine on a tiny digits model, the attack's radius, format 2 and reading format 1."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from cli_support import FAST, invoke
from robnet_svc.bounder import Bounder
from robnet_svc.certify import (AttackSettings, RadiusSettings, certify_model, check_radius_support,
                                check_radius_soundness)
from robnet_svc.errors import RobnetError, SoundnessError
from robnet_svc.onnx_io import load_model
from robnet_svc.perturbations.bias_field import BiasField
from robnet_svc.report import read_report

SETTINGS = RadiusSettings(max=0.8, precision=0.02)
NO_ATTACK = AttackSettings(steps=0, restarts=0)


@pytest.fixture(scope="module")
def engine(digits_onnx, registry):
    """A tiny digits CNN (ONNX, re-imported), 40 test samples, the registry's rsip-ssip and ibp."""
    imported = load_model(digits_onnx)
    splits = registry.dataset("digits")(None).load(imported.image_shape)
    pick = torch.arange(0, splits.test_labels.shape[0], splits.test_labels.shape[0] // 40)[:40]
    from robnet_svc.bounds import compile_network

    module = imported.module.eval()
    return registry, module, compile_network(module, rules=registry.rules()), \
        splits.test_images[pick], splits.test_labels[pick]


def _certify(engine, method_name: str, eps: float, radius=None, attack=NO_ATTACK):
    registry, module, net, images, labels = engine
    pert = registry.perturbation("bias-field")(eps, order=1)
    bounder = Bounder(net, registry.bound_method(method_name)(), pert, tuple(images.shape[1:]))
    return certify_model(bounder, images, labels, batch_size=16,
                         attack=attack, device=torch.device("cpu"), radius=radius)


@pytest.mark.parametrize("method, eps", [("ibp", 0.01), ("rsip-ssip", 0.1)])
def test_radius_agrees_with_fixed_eps_certification(engine, method, eps):
    settings = RadiusSettings(max=8 * eps, precision=eps / 5)
    certs = _certify(engine, method, eps, radius=settings, attack=AttackSettings(steps=3, restarts=2))
    radius = certs.radius
    correct = certs.prediction == certs.label
    assert (radius[~correct] == 0).all() and (certs.attack_radius[~correct] == 0).all()
    inside = correct & (radius > 0) & (radius < settings.max)
    assert inside.sum() >= 5  # a meaningful test: radii strictly inside (0, max)
    # certified at the certificate's eps -> radius >= eps; at other eps, to the precision
    assert (radius[certs.certified] >= eps).all() and certs.certified.any()
    for other in (0.5 * eps, 2 * eps, 3 * eps, 4.5 * eps):
        fixed = _certify(engine, method, other)
        assert (radius[fixed.certified] > other - settings.precision).all(), other
    # not certified at radius + precision (each distinct radius, by the perturbation's own set)
    registry, module, net, images, labels = engine
    for r in np.unique(radius[inside]):
        rows = np.flatnonzero(inside & (radius == r))
        pert = registry.perturbation("bias-field")(float(r) + settings.precision, order=1)
        bounder = Bounder(net, registry.bound_method(method)(), pert, tuple(images.shape[1:]))
        above = certify_model(bounder, images[rows], labels[rows],
                              batch_size=16, attack=NO_ATTACK, device=torch.device("cpu"))
        assert not above.certified.any(), (method, r)
    # the attack's smallest successful radius lies above the certified radius
    assert (certs.attack_radius[correct] > radius[correct]).all()
    assert (certs.attack_radius[certs.attack_success] <= eps).all()
    curve = certs.accuracy_at([0.0, eps, settings.max])
    assert curve["certified_accuracy"][0] == pytest.approx(correct.mean())
    assert curve["certified_accuracy"][1] == pytest.approx(certs.summary()["certified_accuracy"])
    assert certs.attack_coeffs.shape == (40, 4)


def test_broken_below_the_certified_radius_is_a_soundness_error(engine):
    certs = _certify(engine, "rsip-ssip", 0.1, radius=RadiusSettings(max=0.2, precision=0.05))
    i = int(np.flatnonzero(certs.radius > 0)[0])
    certs.attack_radius[i] = certs.radius[i]
    with pytest.raises(SoundnessError, match=f"sample {int(certs.index[i])} .* up to radius"):
        check_radius_soundness(certs, "rsip-ssip")


class _Quadratic(BiasField):
    """A box that grows like eps^2: per-sample scaling of one box cannot give its sets."""

    name = "quadratic-test"

    def affine_set(self, images, eps=None):
        eps = self.eps if eps is None else float(eps)
        return super().affine_set(images, eps=eps * eps)


def test_radius_needs_a_box_linear_in_eps():
    check_radius_support(BiasField(0.1, order=2), torch.rand(2, 1, 6, 6), SETTINGS)
    with pytest.raises(RobnetError, match="does not grow linearly"):
        check_radius_support(_Quadratic(0.1, order=1), torch.rand(2, 1, 6, 6), SETTINGS)


def test_certify_radius_is_stored_and_summarised(digits_onnx, tmp_path, capsys):
    model = digits_onnx
    out = tmp_path / "out"
    run = invoke(capsys, "certify", model, *FAST, "--radius", "--radius-max", "0.5", "--radius-precision", "0.05",
                 "--out", out)
    assert run.code == 0, run.err
    report = read_report(out / "certificate.h5")
    assert report.format_version == "2" and report.radius_settings == {"max": 0.5, "precision": 0.05}
    certs = report.sections["model"]
    assert certs.radius.dtype == np.float64 and certs.attack_coeffs.shape == (40, 4)
    summary = json.loads((out / "summary.json").read_text())["sections"]["model"]
    assert summary["radius"]["eps"] == pytest.approx(np.linspace(0, 0.5, 11))
    assert summary["radius"]["eps"][1] == 0.05  # exactly the certificate's eps: its flags count there
    assert summary["radius"]["certified_accuracy"][1] >= summary["certified_accuracy"] > 0
    assert summary["radius"]["certified_accuracy"] == pytest.approx(
        certs.accuracy_at(np.arange(11) * 0.5 / 10)["certified_accuracy"])
    with h5py.File(out / "certificate.h5") as f:
        np.testing.assert_allclose(f["certificates/model"].attrs["radius_certified_accuracy"],
                                   summary["radius"]["certified_accuracy"])
    shown = invoke(capsys, "report", "show", out / "certificate.h5")
    assert shown.code == 0 and "│ 0.45 │" in shown.out  # a row of the accuracy-at-eps table
    bad = invoke(capsys, "certify", model, *FAST, "--radius", "--radius-max", "0.1", "--radius-precision", "0.2")
    assert bad.code == 2 and "larger than --radius-max" in bad.err and "Traceback" not in bad.err


def write_format_1(path, report) -> None:
    """A certificate as robnet-svc wrote it before format 2 (its writer's layout, verbatim)."""
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = "1"
        f.attrs["kind"] = report.kind
        prov = f.create_group("provenance")
        for key, value in report.provenance.as_dict().items():
            if key != "radius_json":
                prov.attrs[key] = value if not isinstance(value, (list, tuple)) else np.asarray(value)
        summary = f.create_group("summary")
        summary.attrs["sections_json"] = json.dumps(list(report.sections))
        for name, certs in report.sections.items():
            group = f.create_group(f"certificates/{name}")
            for key, value in {**report.section_attrs[name], **certs.summary()}.items():
                if not key.startswith("radius_"):
                    group.attrs[key] = value
                    summary.attrs[f"{name}.{key}"] = value if key in certs.summary() else 0
            for field in ("index", "label", "prediction", "certified", "margin_lower", "attack_success",
                          "attack_margin"):
                group.create_dataset(field, data=getattr(certs, field), compression="gzip", shuffle=True)


def test_format_1_certificates_still_read(digits_onnx, tmp_path, capsys):
    model = digits_onnx
    out = tmp_path / "out"
    assert invoke(capsys, "certify", model, *FAST, "--out", out).code == 0
    old = tmp_path / "old.h5"
    write_format_1(old, read_report(out / "certificate.h5"))
    back = read_report(old)
    assert back.format_version == "1" and back.radius_settings is None
    certs = back.sections["model"]
    assert certs.attack_coeffs is None and certs.radius is None
    np.testing.assert_array_equal(certs.certified, read_report(out / "certificate.h5").sections["model"].certified)
    assert back.summary()["sections"]["model"] == certs.summary()  # no radius curve
    shown = invoke(capsys, "report", "show", old)
    assert shown.code == 0 and "format 1" in shown.out
    drawn = invoke(capsys, "report", "plot", old, "--out", tmp_path / "pictures")
    assert drawn.code == 0, drawn.err
    assert "no attack points" in (tmp_path / "pictures" / "report.html").read_text()


def test_scaled_boxes_contain_the_perturbations_own():
    from robnet_svc.certify import scaled_set

    pert = BiasField(0.1, order=3)
    images = torch.rand(3, 1, 8, 8)
    reference = pert.affine_set(images, eps=0.7)
    for eps in (0.013, 0.1, 0.33, 0.7):
        own = pert.affine_set(images, eps=eps)
        mine = scaled_set(reference, torch.full((3,), eps / 0.7, dtype=torch.float64))
        assert (mine.lower <= own.lower).all() and (mine.upper >= own.upper).all()
        torch.testing.assert_close(mine.lower, own.lower, rtol=0, atol=1e-6)
