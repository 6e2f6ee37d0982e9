"""The HDF5 certificate: versioned schema, atomic write, read back, `report show`."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cli_support import FAST, invoke
from robnet_svc.certify import Certificates
from robnet_svc.errors import RobnetError
from robnet_svc.report import FORMAT_VERSION, Provenance, Report, read_report, write_report


def _certs(n: int = 6, k: int = 3) -> Certificates:
    rng = np.random.default_rng(0)
    label = rng.integers(0, k, n)
    margin = rng.normal(size=(n, k - 1)).astype(np.float32)
    return Certificates(index=np.arange(n) * 2, label=label, prediction=label.copy(),
                        certified=(margin > 0).all(1), margin_lower=margin,
                        attack_success=np.zeros(n, bool), attack_margin=np.abs(margin).min(1) + 1,
                        rounding_allowance=np.full((n, k - 1), 1e-6))


def _report(**sections) -> Report:
    return Report(kind="harden", provenance=Provenance(class_names=["a", "b", "c"], cert_method="ibp",
                                                       perturbation={"name": "bias-field", "eps": 0.1}),
                  sections=sections, section_attrs={name: {"model_sha256": "ab" * 32} for name in sections},
                  history={"epoch": np.array([1.0, 2.0]), "loss": np.array([0.5, 0.25])})


def test_roundtrip_keeps_every_array_and_attribute(tmp_path):
    before, after = _certs(), _certs()
    path = write_report(tmp_path / "certificate.h5", _report(before=before, after=after))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certificate.h5"]  # no temporary left behind
    back = read_report(path)
    assert list(back.sections) == ["before", "after"] and back.kind == "harden"
    for name in Certificates.FIELDS:
        np.testing.assert_array_equal(getattr(back.sections["after"], name), getattr(after, name))
    np.testing.assert_array_equal(back.history["loss"], [0.5, 0.25])
    assert back.summary()["sections"]["before"] == before.summary()
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f["certificates/after/margin_lower"].shape == (6, 2)
        assert f["summary"].attrs["after.certified_accuracy"] == pytest.approx(after.summary()["certified_accuracy"])


def test_per_class_rows_add_up(tmp_path):
    certs = _certs(n=30)
    back = read_report(write_report(tmp_path / "c.h5", _report(model=certs)))
    rows = back.per_class()["model"]
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert sum(r["num_samples"] for r in rows) == 30
    assert sum(r["certified_accuracy"] * r["num_samples"] for r in rows) == pytest.approx(certs.certified.sum())


def test_reading_other_files_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(RobnetError, match="not an HDF5 file"):
        read_report(bad)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = [1, 2]
    with pytest.raises(RobnetError, match="not a robnet-svc certificate"):
        read_report(other)
    path = write_report(tmp_path / "c.h5", _report(model=_certs()))
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = "99"
    with pytest.raises(RobnetError, match="format 99"):
        read_report(path)
    with pytest.raises(RobnetError, match="is a folder; give the certificate.h5 file in it"):
        read_report(tmp_path)


def test_format_1_certificates_are_still_read(tmp_path):
    """Format 1 had no rounding allowance: it reads back as zeros (its rule was margin_lower > 0)."""
    certs = _certs()
    path = write_report(tmp_path / "c.h5", _report(model=certs))
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = "1"
        del f["certificates/model/rounding_allowance"]
    back = read_report(path).sections["model"]
    np.testing.assert_array_equal(back.margin_lower, certs.margin_lower)
    assert back.rounding_allowance.shape == certs.margin_lower.shape and not back.rounding_allowance.any()


def test_report_show_prints_summary_provenance_and_classes(digits_onnx, tmp_path, capsys):
    model = digits_onnx
    out = tmp_path / "out"
    assert invoke(capsys, "certify", model, *FAST, "--out", out).code == 0
    shown = invoke(capsys, "report", "show", out / "certificate.h5")
    assert shown.code == 0, shown.err
    for needle in ("certified", "input_model_sha256", "per class", "rsip-ssip"):
        assert needle in shown.out
    as_json = json.loads(invoke(capsys, "report", "show", out / "certificate.h5", "--json").out)
    assert as_json["summary"] == json.loads((out / "summary.json").read_text())
    assert len(as_json["per_class"]["model"]) == 10
    with h5py.File(out / "certificate.h5") as f:
        stored = dict(f["provenance"].attrs)
    # the typed record decodes every stored attribute and encodes it back unchanged (names, values, types)
    assert as_json["provenance"] == {k: v.tolist() if isinstance(v, np.ndarray) else v.item()
                                     if isinstance(v, np.generic) else v for k, v in sorted(stored.items())}
    prov = Provenance.decode(stored)
    assert prov.unknown == {} and prov.train_method is None and prov.image_shape == (1, 8, 8)
    encoded = prov.encode()
    assert encoded.keys() == stored.keys()
    for key, value in stored.items():
        assert type(encoded[key]) is type(value) or isinstance(value, np.generic), key
        np.testing.assert_array_equal(np.asarray(encoded[key]), np.asarray(value), err_msg=key)
        assert np.asarray(encoded[key]).dtype == np.asarray(value).dtype, key
    missing = invoke(capsys, "report", "show", tmp_path / "nope.h5")
    assert missing.code == 2 and "nope.h5 does not exist" in missing.err
