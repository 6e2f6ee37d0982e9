"""The MRI reproduction script (benchmarks/reproduce_mri.py): its command lines and network.
The runs themselves take hours (docs/results.md); this checks what they would run."""

from __future__ import annotations

import shlex

import pytest

from benchmarks import reproduce_mri
from benchmarks.networks import NETWORKS
from robnet_svc.cli import harden_cmd


def test_dry_run_prints_one_valid_harden_command_per_row(capsys, tmp_path):
    assert reproduce_mri.main(["--dry-run", "--out", str(tmp_path / "mri"), "--data-dir", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 4 and not (tmp_path / "mri").exists()
    rows = set()
    for line in lines:
        args = shlex.split(line)
        assert args[:2] == ["robnet-svc", "harden"]
        p = harden_cmd.make_context("harden", args[2:]).params  # click accepts every option
        assert (p["order"], p["mode"], p["cert_method"], p["radius"], p["max_test"]) == (3, "mult", "rsip-ssip",
                                                                                        True, None)
        rows.add((p["method"], p["eps"]))
    assert rows == {(m, e) for m in ("rsip-ibp", "rsip-ssip") for e in (0.2, 0.4)}


def test_the_64_pixel_network_is_the_benchmarks_mri_64():
    ours, theirs = reproduce_mri.mri_network(64), NETWORKS["MRI-64"].build()
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    assert sum(p.numel() for p in reproduce_mri.mri_network(128).parameters()) > 566_260


def test_curves_table_and_figure_from_real_radius_certificates(capsys, tmp_path):
    """The script's accuracy-vs-ε summary of finished ``certify --radius`` runs: the table's
    certified accuracy is the certificate's own at each ε (clean accuracy at ε = 0, never rising
    with ε, never above the empirical one) and the figure is a real PNG; a missing run is skipped."""
    from cli_support import FAST, digits_model, invoke
    from robnet_svc.report import read_report

    model = digits_model(tmp_path / "m.onnx")
    out = tmp_path / "curves"
    result = invoke(capsys, "certify", model, *FAST, "--cert-method", "rsip-ssip", "--radius", "--radius-max", "0.1",
                    "--radius-precision", "0.02", "--out", out)
    assert result.code == 0, result.err
    certificate = out / "certificate.h5"
    curves = [("standard", certificate), ("never run", tmp_path / "missing" / "certificate.h5")]
    loaded = reproduce_mri.load_curves(curves)
    rows = reproduce_mri.curve_rows(loaded)
    assert [r["model"] for r in rows] == ["standard"]
    row, certs = rows[0], read_report(certificate).sections["model"]
    assert row["eps"] == [0.0, 0.05, 0.1] and row["n"] == certs.num_samples == 40
    assert row["certified"][0] == pytest.approx(100 * certs.summary()["clean_accuracy"])
    assert row["certified"][1] == pytest.approx(100 * certs.summary()["certified_accuracy"])
    assert all(a >= b for a, b in zip(row["certified"], row["certified"][1:]))
    assert all(c <= e for c, e in zip(row["certified"], row["empirical"]))
    table = reproduce_mri.curves_markdown(rows).splitlines()
    assert table[0].startswith("| model | n | ε = 0 | ε = 0.05 | ε = 0.1") and table[2].startswith("| standard | 40 |")
    png = reproduce_mri.curves_figure(loaded, tmp_path / "curves.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert reproduce_mri.curves_figure(reproduce_mri.load_curves(curves[1:]), tmp_path / "none.png", "test") is None
