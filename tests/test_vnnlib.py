"""VNN-COMP interchange (issue 19): ``export-vnnlib`` from a real certificate, its checks, the
round trip through ``verify-vnnlib``, the VNN-LIB reader's refusals, and the public
``cifar_biasfield`` benchmark's instances bounded (and checked by sampling in onnxruntime)."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cli_support import FAST, digits_model, invoke
from robnet_svc.atomic import atomic_folder
from robnet_svc.errors import RobnetError
from robnet_svc.report import read_report
from robnet_svc.vnnlib import property_text, read_instances, read_property

CHEAP = ("ibp", "rsip-ibp")


@pytest.fixture(scope="module")
def certified(tmp_path_factory):
    """A tiny digits model certified (bias field, rsip-ssip) on 12 test samples: certificate.h5."""
    from robnet_svc.cli import main

    folder = tmp_path_factory.mktemp("vnnlib")
    model = digits_model(folder / "model.onnx")
    args = ["certify", str(model), *FAST, "--max-test", "12", "--eps", "0.1", "--out", str(folder / "cert")]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    return model, folder / "cert" / "certificate.h5"


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_export_passes_its_checks_and_round_trips(certified, tmp_path, capsys):
    model, certificate = certified
    out = tmp_path / "export"
    result = invoke(capsys, "export-vnnlib", certificate, model, "--out", out, "--samples", "all", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    certs = read_report(certificate).sections["model"]
    assert summary["num_instances"] == 12 and summary["num_certified"] == int(certs.certified.sum())
    assert 0 < summary["num_certified"] < 12, "a meaningful test needs certified and unproven samples"
    # Both margin bounds are sound; certification bounds the clipping layer from the set directly,
    # the export through plain ONNX ops, so the certificate's may be a little tighter.
    assert summary["checks"]["verdicts_agree"] and summary["checks"]["verdicts_disagree"] == 0
    for entry in summary["instances"]:
        assert np.all(np.asarray(entry["recertified_margin_lower"]) <= np.asarray(entry["margin_lower"]) + 1e-4)
    instances = read_instances(out / "instances.csv")
    assert [i.onnx.name for i in instances] == [f"sample_{i}.onnx" for i in certs.index]
    assert all(i.onnx.is_file() and i.vnnlib.is_file() and i.timeout == 300 for i in instances)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left

    # The exported network at the nominal coefficients is the model on the clean image (checked here
    # independently: the digits test image through onnxruntime on the user's file).
    from robnet_svc.plugins import load_registry

    splits = load_registry().dataset("digits")(None).load((1, 8, 8))
    first = instances[0]
    prop = read_property(first.vnnlib)
    assert prop.label == certs.label[0] and prop.targets == [j for j in range(10) if j != prop.label]
    nominal = np.zeros((1, prop.num_inputs), np.float32)
    nominal[0, 0] = 1.0  # multiplicative field: the constant term is 1, the others 0
    image = splits.test_images[int(certs.index[0])][None].numpy()
    np.testing.assert_allclose(_ort(first.onnx, nominal), _ort(model, image), atol=1e-5)
    graph = onnx.load(str(first.onnx)).graph
    assert [n.op_type for n in graph.node][:6] == ["Gemm", "Relu", "Sub", "Relu", "Sub", "Reshape"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, prop.num_inputs]

    # Round trip: our own engine on the exported instance reaches the certificate's verdict and margins.
    result = invoke(capsys, "verify-vnnlib", first.onnx, first.vnnlib, "--method", "rsip-ssip", "--json")
    assert result.code == 0, result.err
    (checked,) = json.loads(result.out)
    (method,) = checked["methods"]
    assert method["verdict"] == ("verified" if certs.certified[0] else "unknown")
    assert np.all(np.asarray(method["margin_lower"]) <= certs.margin_lower[0] + 1e-4)
    np.testing.assert_allclose(method["margin_lower"], certs.margin_lower[0], rtol=0.1, atol=0.05)


def test_linf_export_uses_an_add_transform(certified, tmp_path, capsys):
    model, _ = certified
    cert = tmp_path / "cert"
    fast = [a for a in FAST if a not in ("--order", "1")]
    result = invoke(capsys, "certify", model, *fast, "--perturbation", "linf", "--eps", "0.01", "--max-test", "3",
                    "--cert-method", "rsip-ibp", "--out", cert)
    assert result.code == 0, result.err
    result = invoke(capsys, "export-vnnlib", cert / "certificate.h5", model, "--out", tmp_path / "x",
                    "--samples", "all", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["num_coefficients"] == 64 and summary["added_ops"][0] == "Add"
    assert summary["num_instances"] == 3 and summary["checks"]["verdicts_agree"]


def test_export_refuses_a_model_the_certificate_is_not_about(certified, tmp_path, capsys):
    model, certificate = certified
    other = onnx.load(str(model))
    onnx.helper.set_model_props(other, {"note": "same weights, other file"})
    onnx.save(other, str(tmp_path / "other.onnx"))
    result = invoke(capsys, "export-vnnlib", certificate, tmp_path / "other.onnx", "--out", tmp_path / "x")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "none of the models certified" in result.err
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    result = invoke(capsys, "export-vnnlib", certificate, model, "--out", tmp_path / "full")
    assert result.code == 2 and "--force" in result.err and (tmp_path / "full" / "keep").exists()
    result = invoke(capsys, "export-vnnlib", certificate, model, "--out", tmp_path / "y", "--samples", "0")
    assert result.code == 2 and "--samples" in result.err


def test_property_text_reads_back_exactly(tmp_path):
    lower = np.array([0.7, -0.0375], dtype=np.float32).astype(np.float64)
    upper = np.array([1.3, 0.0375], dtype=np.float32).astype(np.float64)
    text = property_text(lower, upper, label=2, num_outputs=4, comments=["hello"])
    (tmp_path / "p.vnnlib").write_text(text)
    prop = read_property(tmp_path / "p.vnnlib")
    np.testing.assert_array_equal(prop.lower, lower)
    np.testing.assert_array_equal(prop.upper, upper)
    assert (prop.label, prop.targets, prop.num_outputs) == (2, [0, 1, 3], 4)


HEADER = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (<= X_0 1.0))\n(assert (>= X_0 0.0))\n"
BAD = [
    (HEADER + BOX + "(assert (or (and (>= Y_1 Y_0))\n", 6, "never closed"),
    (HEADER + BOX + "(assert (<= Y_0 0.5))\n", 6, "must compare two outputs"),
    (HEADER + "(assert (<= X_0 1.0))\n(assert (>= Y_1 Y_0))\n", 1, "no lower bound"),
    (HEADER + BOX + "(assert (or (and (>= Y_1 Y_0)) (and (>= Y_0 Y_1))))\n", 6, "several outputs"),
    (HEADER + BOX + "(assert (or (and (>= Y_1 Y_0) (<= X_0 0.5))))\n", 6, "several conditions"),
    (HEADER + BOX + "(declare-fun f () Real)\n(assert (>= Y_1 Y_0))\n", 6, "unsupported command"),
    (HEADER + "(assert (<= X_0 0.0))\n(assert (>= X_0 1.0))\n(assert (>= Y_1 Y_0))\n", 1, "empty"),
    (HEADER + BOX + "(assert (and (>= Y_1 Y_0) (>= Y_1 Y_0)))\n", 6, "conjunction of output"),
    (HEADER + BOX + "(assert (>= Y_1 Y_0))\n(assert (>= Y_1 Y_0))\n", 7, "one output assert"),
]


@pytest.mark.parametrize("text, line, needle", BAD, ids=[b[2].replace(" ", "-") for b in BAD])
def test_malformed_vnnlib_is_refused_with_file_and_line(tmp_path, text, line, needle):
    path = tmp_path / "bad.vnnlib"
    path.write_text(text)
    with pytest.raises(RobnetError, match=needle) as info:
        read_property(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_malformed_vnnlib_is_exit_2_one_line(certified, tmp_path, capsys):
    model, _ = certified
    path = tmp_path / "bad.vnnlib"
    path.write_text(BAD[1][0])
    result = invoke(capsys, "verify-vnnlib", model, path)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"{path}:6:" in result.err and "Traceback" not in result.err


def test_atomic_folder_leaves_nothing_on_failure_and_replaces_on_request(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_folder(target) as tmp:
            (tmp / "b").write_text("2")
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["b"]


@pytest.mark.parametrize("index, label", [(0, 0), (1, 6)])
def test_public_benchmark_instances_are_read_and_bounded(shared_dir, index, label):
    """The two shared cifar_biasfield instances: read, bounded with cheap methods, sound by sampling
    the box through onnxruntime on the original file."""
    from robnet_svc.vnnlib_verify import verify_instance

    folder = shared_dir / "corpus" / "vnncomp_biasfield"
    net, prop_path = folder / f"cifar_bias_field_{index}.onnx", folder / f"prop_{index}.vnnlib"
    rows = list(csv.reader((folder / "instances.csv").open()))
    assert rows[index] == [f"onnx/cifar_bias_field_{index}.onnx", f"vnnlib/prop_{index}.vnnlib", "300"]
    prop = read_property(prop_path)
    assert prop.label == label and prop.num_inputs == 16 and prop.num_outputs == 10
    result = verify_instance(net, prop_path, list(CHEAP))
    assert result.label == label and result.attack_margin > 0  # correctly classified, no counterexample
    gen = np.random.default_rng(index)
    points = (prop.lower + gen.random((64, 16)) * (prop.upper - prop.lower)).astype(np.float32)
    session = ort.InferenceSession(str(net), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: p[None]})[0] for p in points])
    sampled = logits[:, [label]] - logits[:, prop.targets]  # [64, 9]
    for method in result.methods:
        assert method.verdict in ("verified", "unknown") and len(method.margin_lower) == 9
        assert np.isfinite(method.margin_lower).all()
        assert (np.asarray(method.margin_lower) <= sampled.min(0) + 1e-3).all(), method.method
        if method.verdict == "verified":
            assert (sampled > 0).all()


class _NHWC(torch.nn.Module):
    """A CNN whose ONNX input is ``[N, H, W, C]`` (a Transpose to NCHW first, as tf2onnx writes)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                        torch.nn.Linear(4 * 6 * 6, 10))

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("name", ["softmax", "flat_mlp", "shape_flatten", "nhwc"])
def test_export_of_other_input_layouts_and_heads(name, tmp_path, capsys):
    """Softmax head (stripped: the outputs are logits), flat input, Shape-computed flatten, NHWC input."""
    import onnx_factory

    if name == "nhwc":
        model = onnx_factory.export(_NHWC().eval(), tmp_path / "nhwc.onnx", (8, 8, 1))
    else:
        model = onnx_factory.build(name, tmp_path)
    extra = ("--image-shape", "1x8x8") if name == "flat_mlp" else ()
    result = invoke(capsys, "certify", model, *FAST, *extra, "--max-test", "3", "--out", tmp_path / "cert")
    assert result.code == 0, result.err
    result = invoke(capsys, "export-vnnlib", tmp_path / "cert" / "certificate.h5", model, "--out", tmp_path / "x",
                    "--samples", "all", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["num_instances"] == 3 and summary["checks"]["verdicts_agree"]
    graph = onnx.load(str(tmp_path / "x" / summary["instances"][0]["onnx"])).graph
    assert "Softmax" not in {n.op_type for n in graph.node}
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 10]


def test_syntax_variants_and_a_subset_of_classes(tmp_path):
    """A linear 2-input, 3-class network (bounds are exact): label 0 against class 2 only holds;
    against classes 1 and 2 the attack falsifies it (class 1 overtakes). Inputs bounded in an
    ``and``, numbers on either side, ``(<= Y_l Y_j)`` form."""
    import onnx_factory

    from robnet_svc.vnnlib_verify import verify_instance

    linear = torch.nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]]))
        linear.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    net = onnx_factory.export(linear.eval(), tmp_path / "linear.onnx", (2,))
    head = "; variants\n(declare-const X_0 Real)\n(declare-const X_1 Real)\n" + "".join(
        f"(declare-const Y_{i} Real)\n" for i in range(3))
    inputs = "(assert (and (>= X_0 0.0) (<= X_0 1.0)))\n(assert (<= 0 X_1))\n(assert (>= 1e0 X_1))\n"
    (tmp_path / "one.vnnlib").write_text(head + inputs + "(assert (<= Y_0 Y_2))\n")
    (tmp_path / "two.vnnlib").write_text(head + inputs + "(assert (or (>= Y_1 Y_0) (and (<= Y_0 Y_2))))\n")
    prop = read_property(tmp_path / "two.vnnlib")
    assert (prop.lower.tolist(), prop.upper.tolist(), prop.label, prop.targets) == ([0, 0], [1, 1], 0, [1, 2])
    one = verify_instance(net, tmp_path / "one.vnnlib", ["ibp", "rsip-ssip"])
    assert [m.verdict for m in one.methods] == ["verified", "verified"] and one.attack_margin > 0
    np.testing.assert_allclose(one.methods[0].margin_lower, [0.5], atol=1e-6)  # min of 1 - 0.5 x_1
    two = verify_instance(net, tmp_path / "two.vnnlib", ["ibp"])
    assert two.methods[0].verdict == "falsified-by-attack" and two.attack_margin < 0
    np.testing.assert_allclose(two.methods[0].margin_lower, [-1.0, 0.5], atol=1e-6)
