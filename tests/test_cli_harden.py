"""`robnet-svc harden` and `certify` end to end through the real CLI on real digits and real ONNX files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import onnx
import pytest

from cli_support import FAST, FAST_TRAIN, invoke
from robnet_svc.models import export_onnx, tiny_cnn


@pytest.fixture(scope="module")
def hardened(digits_onnx, tmp_path_factory):
    """One harden run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "out"
    from robnet_svc.cli import main

    try:
        main(["harden", str(digits_onnx), *FAST, *FAST_TRAIN, "--out", str(out), "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


def test_harden_writes_the_three_outputs(digits_onnx, hardened):
    assert {"model.robust.onnx", "certificate.h5", "summary.json"} <= {p.name for p in hardened.iterdir()}
    assert not [p for p in hardened.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((hardened / "summary.json").read_text())
    assert set(summary["sections"]) == {"before", "after"}
    src, dst = onnx.load(str(digits_onnx)), onnx.load(str(hardened / "model.robust.onnx"))
    assert [i.name for i in dst.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in dst.graph.output] == [o.name for o in src.graph.output]
    with h5py.File(hardened / "certificate.h5") as f:
        prov = f["provenance"].attrs
        assert prov["input_model_sha256"] == summary["input_model_sha256"]
        assert prov["train_method"] == "rsip-ssip" and prov["cert_method"] == "rsip-ssip"
        assert json.loads(prov["coeff_names_json"]) == ["m_t0_g0", "m_t0_g1", "m_t1_g0", "m_t1_g1"]
        assert list(prov["coeff_lower"]) == pytest.approx([0.95, -0.05 / 3, -0.05 / 3, -0.05 / 3])
        assert f["history/epoch"][()].tolist() == [1.0]
        assert f["certificates/after/margin_lower"].shape == (40, 9)


def test_certify_reproduces_the_certificate_of_the_exported_file(hardened, capsys):
    exported = hardened / "model.robust.onnx"
    out = hardened.parent / "recheck"
    r = invoke(capsys, "certify", exported, *FAST, "--out", out, "--json")
    assert r.code == 0, r.err
    with h5py.File(hardened / "certificate.h5") as a, h5py.File(out / "certificate.h5") as b:
        import hashlib

        sha = hashlib.sha256(exported.read_bytes()).hexdigest()
        assert a["provenance"].attrs["output_model_sha256"] == sha == b["provenance"].attrs["input_model_sha256"]
        for name in ("certified", "margin_lower", "prediction", "index"):
            np.testing.assert_array_equal(a[f"certificates/after/{name}"][()], b[f"certificates/model/{name}"][()])


def test_fail_under_gates_on_certified_accuracy(digits_onnx, capsys):
    ok = invoke(capsys, "certify", digits_onnx, *FAST, "--fail-under", "0", "--json")
    assert ok.code == 0, ok.err
    certified = json.loads(ok.out)["sections"]["model"]["certified_accuracy"]
    gate = invoke(capsys, "certify", digits_onnx, *FAST, "--fail-under", str(min(certified + 0.01, 1.0)))
    assert gate.code == 1 and "under --fail-under" in gate.err


def _three_class_model(path):
    net = tiny_cnn(1, 3, 8, width=2)
    export_onnx(net, (1, 8, 8), path)
    return path


@pytest.mark.parametrize("extra, needle", [
    (("--eps", "0"), "--eps must be > 0"),
    (("--eps", "-0.1"), "--eps must be > 0"),
    (("--method", "crown"), "unknown bound method 'crown'; known: ibp, rsip"),
    (("--cert-method", "nope"), "unknown bound method 'nope'"),
    (("--perturbation", "fog"), "unknown perturbation 'fog'; known: bias-field, brightness"),
    (("--dataset", "imagenet"), "unknown dataset 'imagenet'; known: cifar10, digits"),
    (("--perturbation", "linf"), "use ibp, rsip-ibp or rsip"),
    (("--perturbation", "linf", "--cert-method", "ibp", "--method", "ssip"), "--method 'ssip' needs a small"),
    (("--perturbation", "brightness", "--order", "2"), "has no option 'order'"),
    (("--dataset", "mri"), "needs --data-dir"),
    (("--eps", "1e8"), "reaches pixel values of 2e+08 before clipping to [0, 1]; the limit is 32768"),
    (("--coef-scale", "1e-9"), "the limit is 32768 (2^15 clip-range widths"),
    (("--perturbation", "linf", "--cert-method", "ibp", "--method", "ibp", "--eps", "4e4"), "the limit is 32768"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(digits_onnx, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    fast = FAST if "--perturbation" not in extra else tuple(a for a in FAST if a not in ("--order", "1"))
    r = invoke(capsys, "harden", digits_onnx, *fast, *FAST_TRAIN, "--out", out, *extra)
    assert r.code == 2, r.err
    assert needle in r.err and len(r.err.strip().splitlines()) == 1
    assert not out.exists()


def test_model_and_dataset_disagree_on_classes(tmp_path, capsys):
    out = tmp_path / "out"
    r = invoke(capsys, "harden", _three_class_model(tmp_path / "m3.onnx"), *FAST, *FAST_TRAIN, "--out", out)
    assert r.code == 2 and "has 10 classes but model" in r.err and "outputs 3" in r.err
    assert not out.exists()


def test_out_is_protected(digits_onnx, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    r = invoke(capsys, "harden", digits_onnx, *FAST, *FAST_TRAIN, "--out", busy)
    assert r.code == 2 and "not empty; use --force" in r.err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = invoke(capsys, "harden", digits_onnx, *FAST, *FAST_TRAIN, "--out", afile / "sub")
    assert r.code == 2 and "is a file" in r.err
    r = invoke(capsys, "harden", digits_onnx, *FAST, *FAST_TRAIN)
    assert r.code == 2 and "--out" in r.err


def test_dataset_options_reach_the_dataset(digits_onnx, tmp_path, capsys):
    """--dataset-option KEY=VALUE (and a TOML list) goes to the dataset's constructor; it converts the string."""
    cheap = (*FAST, "--max-test", "1000", "--cert-method", "ibp", "--attack-steps", "0", "--attack-restarts", "0")
    base = invoke(capsys, "certify", digits_onnx, *cheap, "--json")
    more = invoke(capsys, "certify", digits_onnx, *cheap, "--dataset-option", "test_fraction=0.3", "--json")
    assert base.code == 0 and more.code == 0, more.err
    n = json.loads(base.out)["sections"]["model"]["num_samples"]
    assert json.loads(more.out)["sections"]["model"]["num_samples"] > n
    config = tmp_path / "run.toml"
    config.write_text('dataset-option = ["test_fraction=0.3"]\n')
    from_file = invoke(capsys, "certify", digits_onnx, *cheap, "--config", config, "--json")
    assert from_file.code == 0 and json.loads(from_file.out)["sections"] == json.loads(more.out)["sections"]
    unknown = invoke(capsys, "certify", digits_onnx, *FAST, "--dataset-option", "colour=red")
    assert unknown.code == 2 and "dataset 'digits' has no option 'colour'; known: seed, test_fraction" in unknown.err
    malformed = invoke(capsys, "certify", digits_onnx, *FAST, "--dataset-option", "test_fraction")
    assert malformed.code == 2 and "KEY=VALUE" in malformed.err


def test_broken_plugins_are_warnings_on_stderr(digits_onnx, capsys, monkeypatch):
    monkeypatch.setenv("ROBNET_SVC_PLUGINS", "robnet-svc-no-such-plugin")
    r = invoke(capsys, "certify", digits_onnx, *FAST, "--max-test", "5", "--json")
    assert r.code == 0, r.err
    assert "robnet-svc: warning: ROBNET_SVC_PLUGINS names 'robnet-svc-no-such-plugin'" in r.err
    json.loads(r.out)  # stdout stays the summary only


def test_a_float64_model_is_refused_with_exit_2(tmp_path, capsys):
    """A float64 ONNX model used to end in an internal error (exit 3, the code of soundness
    failures); robnet-svc hardens and certifies float32 models and says so."""
    import warnings

    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 10)).double().eval()
    path = tmp_path / "f64.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 1, 8, 8, dtype=torch.float64),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    r = invoke(capsys, "certify", path, *FAST)
    assert r.code == 2, r.err
    assert "computes in float64; robnet-svc hardens and certifies float32 models" in r.err
    assert len(r.err.strip().splitlines()) == 1
