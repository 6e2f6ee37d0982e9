"""ONNX import, export and inspect on real files: models the tests export from torch and the
shared corpus (``<repo>/../shared/corpus``, skipped when absent)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_factory
from robnet_svc.errors import RobnetError
from robnet_svc.onnx_io import BatchReshape
from robnet_svc.onnx_io import (ImportedModel, engine_support, export_model, format_inspection, inspect_model, load_model,
                                ort_session, read_onnx)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CORPUS = SHARED / "corpus"

# How to view the flat-input corpus models as images (--image-shape).
CORPUS_IMAGE_SHAPES = {
    "vnn21_mnistfc_256x2.onnx": "1x28x28",          # input [1,784,1]
    "vnn22_cifar_bias_field_0.onnx.gz": "1x4x4",    # 16 bias-field coefficients, not an image
    "cifar_bias_field_0.onnx": "1x4x4",
    "cifar_bias_field_1.onnx": "1x4x4",
}

# Corpus models that are not image classifiers, and the refusal expected at import.
CORPUS_NOT_CLASSIFIERS = {
    "onnx/vnn23_collins_rul_small_window_20.onnx.gz": "1 value per sample; a classifier needs at least 2 classes",
}

# Converted only after an opset upgrade (onnx2torch lacks the old op versions), then round-trip:
#   vnn21_acasxu_run2a_1_1 (Flatten-1: 8 -> 17), vnn23_vit_ibp_3_3_8 (Slice-1: 9 -> 17).
# Imported at their own opset thanks to robnet_svc.onnx_io.converters / lower: zuramai_mnist_extdata
#   (PyTorch 2.9 dynamo export, opset 20: Shape-19, Reshape-19 allowzero=1; external data file),
#   ext_wuhan_keras2onnx_mnist_sm (keras2onnx, opset 10: MaxPool auto_pad="SAME_UPPER").

# Corpus models that import and round-trip, but whose ONNX ops the bound engine does not
# support (checked below through inspect's engine report when the engine is installed).
CORPUS_NOT_BOUNDABLE = {
    "vnn23_gtsrb_qconv48_bn_mp.onnx.gz": {"Sign"},
    # attention (MatMul of two tensors, Softmax) and a class token expanded to the batch size
    # (Shape/Gather/Concat/ConstantOfShape kept: their value depends on N)
    "vnn23_vit_ibp_3_3_8.onnx.gz": {"Concat", "ConstantOfShape", "Gather", "MatMul", "Shape", "Softmax"},
}


def _corpus_files() -> list[str]:
    if not CORPUS.is_dir():
        return []
    files = sorted(p.relative_to(CORPUS).as_posix() for p in (CORPUS / "onnx").rglob("*.onnx*")
                   if not p.name.endswith(".data"))
    files += sorted(p.relative_to(CORPUS).as_posix() for p in (CORPUS / "vnncomp_biasfield").glob("*.onnx"))
    return files


def _ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's output in onnxruntime; a fixed-batch model is fed in padded chunks."""
    session = ort_session(read_onnx(path)[0].SerializeToString())
    declared = session.get_inputs()[0].shape[0]
    if not isinstance(declared, int):
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    n = len(x)
    padded = np.concatenate([x, np.zeros((-n % declared, *x.shape[1:]), x.dtype)])
    return np.concatenate([session.run(None, {session.get_inputs()[0].name: padded[i:i + declared]})[0]
                           for i in range(0, len(padded), declared)])[:n]


def _onnx_input(model: ImportedModel, images: torch.Tensor) -> np.ndarray:
    """Images [N,C,H,W] in the ONNX input's layout."""
    if model.layout == "NHWC":
        return images.permute(0, 2, 3, 1).numpy()
    return images.reshape(len(images), *model.input_shape).numpy()


def _round_trip(source_path: Path, tmp_path: Path, image_shape=None) -> ImportedModel:
    """import -> export -> re-import; source, export and re-import agree at batch 1 and 7."""
    first = load_model(source_path, image_shape=image_shape)
    out = tmp_path / "exported.onnx"
    export_model(first.module, first, out, {"test": "round trip"})
    second = load_model(out, image_shape=image_shape)
    assert (second.input_name, second.output_name) == (first.input_name, first.output_name)
    assert (second.image_shape, second.input_shape, second.layout) == (first.image_shape, first.input_shape, first.layout)
    assert second.head == first.head and second.num_classes == first.num_classes
    exported = onnx.load(str(out))
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert max(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in exported.metadata_props}
    assert props["test"] == "round trip" and props["robnet_svc.source_sha256"] == first.sha256
    for batch in (1, 7):
        images = torch.rand(batch, *first.image_shape, generator=torch.Generator().manual_seed(batch))
        x = _onnx_input(first, images).astype(first.input_dtype)
        source_out = _ort_outputs(source_path, x)
        export_out = _ort_outputs(out, x)
        with torch.no_grad():
            logits = second.module(images)
        if second.head == "Softmax":
            logits = torch.softmax(logits, 1)
        elif second.head == "LogSoftmax":
            logits = torch.log_softmax(logits, 1)
        np.testing.assert_allclose(export_out, source_out, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits.numpy(), source_out, atol=1e-4, rtol=0)
    return first


# --------------------------------------------------------------------------- models from torch


@pytest.mark.parametrize("name", sorted(onnx_factory.MODELS))
def test_factory_model_round_trips(name, tmp_path):
    path = onnx_factory.build(name, tmp_path)
    _round_trip(path, tmp_path, image_shape="1x8x8" if name == "flat_mlp" else None)


def test_imported_model_fields(tmp_path):
    model = load_model(onnx_factory.build("softmax", tmp_path))
    assert model.image_shape == (1, 8, 8) and model.input_shape == (1, 8, 8) and model.layout == "NCHW"
    assert model.num_classes == 10 and model.head == "Softmax"
    assert (model.input_name, model.output_name) == ("input", "logits")
    assert model.input_dtype == np.float32 and model.opset == 17
    assert model.producer.startswith("pytorch") and len(model.sha256) == 64
    assert model.parity_max_abs_diff <= 1e-4
    logits = model.module(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10) and not torch.allclose(logits.exp().sum(1), torch.ones(5))


def test_fixed_batch_model_runs_at_any_batch(tmp_path):
    path = onnx_factory.build("fixed_batch", tmp_path)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 10
    model = load_model(path)
    kinds = {type(m).__name__ for m in model.module.modules()}
    assert "BatchReshape" in kinds and "OnnxReshape" not in kinds
    reference = onnx_factory.make_model("fixed_batch")
    reference.batch = None  # the same weights, flattening per sample
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model.module(x), reference(x), atol=1e-5, rtol=0)


def test_flat_input_needs_image_shape(tmp_path):
    path = onnx_factory.build("flat_mlp", tmp_path)
    with pytest.raises(RobnetError, match=r"flat_mlp.onnx: input 'input' is \[N,64\] \(64 values.*does not look like an image.*--image-shape CxHxW \(product 64, e.g. 1x8x8"):
        load_model(path)
    with pytest.raises(RobnetError, match="--image-shape 1x8x9 has 72 values"):
        load_model(path, image_shape="1x8x9")
    with pytest.raises(RobnetError, match="expected CxHxW"):
        load_model(path, image_shape="8x8")
    model = load_model(path, image_shape=(1, 8, 8))
    assert model.layout == "flat" and model.input_shape == (64,) and model.image_shape == (1, 8, 8)
    first = next(n for n in model.module.graph.nodes if n.op == "call_module")
    assert isinstance(model.module.get_submodule(first.target), BatchReshape)


def test_image_model_refuses_other_image_shape(tmp_path):
    with pytest.raises(RobnetError, match="does not match the model's image input"):
        load_model(onnx_factory.build("mlp", tmp_path), image_shape="1x4x16")


def test_gzip_and_external_data(tmp_path):
    path = onnx_factory.build("cnn_bn", tmp_path)
    gz = tmp_path / "model.onnx.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_model(gz).num_classes == 10
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(path)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert (external.parent / "model.onnx.data").stat().st_size > 0
    assert load_model(external).num_classes == 10
    (external.parent / "model.onnx.data").unlink()
    with pytest.raises(RobnetError, match="external data"):
        load_model(external)


def test_ort_session_uses_an_explicit_provider_list(tmp_path):
    session = ort_session(onnx_factory.build("mlp", tmp_path))
    expected = ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.cuda.is_available() else ["CPUExecutionProvider"]
    assert session.get_providers() == expected


# --------------------------------------------------------------------------- export


def test_export_failure_writes_nothing(tmp_path):
    source = load_model(onnx_factory.build("mlp", tmp_path / "."))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    with pytest.raises(RobnetError, match="model.onnx: ONNX export failed"):
        export_model(Broken(), source, out_dir / "model.onnx", {})
    assert list(out_dir.iterdir()) == []


def test_export_keeps_numeric_names_and_dtype(tmp_path):
    """Old exporters name values '0' or '12', which TorchScript refuses as names."""
    path = onnx_factory.export(onnx_factory.make_model("mlp"), tmp_path / "m.onnx", (1, 8, 8))
    model = onnx.load(str(path))
    for old, new in (("input", "0"), ("logits", "12")):
        for node in model.graph.node:
            node.input[:] = [new if v == old else v for v in node.input]
            node.output[:] = [new if v == old else v for v in node.output]
        for v in (*model.graph.input, *model.graph.output):
            v.name = new if v.name == old else v.name
    onnx.save(model, str(path))
    source = load_model(path)
    export_model(source.module, source, tmp_path / "out.onnx", {})
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert (out.graph.input[0].name, out.graph.output[0].name) == ("0", "12")
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_export_of_fine_tuned_module_round_trips(tmp_path):
    source = load_model(onnx_factory.build("normalized", tmp_path))
    with torch.no_grad():
        for p in source.module.parameters():
            p.add_(0.01)
    export_model(source.module, source, tmp_path / "tuned.onnx", {})
    again = load_model(tmp_path / "tuned.onnx")
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(again.module(x), source.module(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- bad input


def _two_inputs(path: Path) -> Path:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 1, 8, 8])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    return onnx_factory.write_graph(path, [helper.make_node("Add", ["a", "b"], ["y"])], [a, b], [y])


def _unconvertible_op(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    return onnx_factory.write_graph(path, [helper.make_node("Hardmax", ["x"], ["y"], name="the_hardmax")], [x], [y])


def _integer_input(path: Path) -> Path:
    x = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])
    return onnx_factory.write_graph(path, [helper.make_node("Cast", ["tokens"], ["y"], to=TensorProto.FLOAT)], [x], [y])


def _bad(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "bad.onnx"
    if kind == "missing":
        return tmp_path / "nowhere.onnx"
    if kind == "directory":
        (tmp_path / "dir.onnx").mkdir()
        return tmp_path / "dir.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        good = onnx_factory.build("cnn_bn", tmp_path).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif kind == "two inputs":
        _two_inputs(path)
    elif kind == "unconvertible op":
        _unconvertible_op(path)
    elif kind == "integer input":
        _integer_input(path)
    return path


BAD = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "is empty",
    "random bytes": "not an ONNX model",
    "truncated": "not an ONNX model|not a valid ONNX model",
    "two inputs": "has 2 inputs",
    "unconvertible op": r"cannot be converted to torch; 1 node\(s\) unconvertible: the_hardmax \(Hardmax opset \d+: no converter\)",
    "integer input": "input 'tokens' has type INT64",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_one_clear_error(kind, tmp_path):
    path = _bad(kind, tmp_path)
    with pytest.raises(RobnetError, match=BAD[kind]) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random bytes", "truncated",
                                  "two inputs", "unconvertible op", "integer input"])
def test_bad_input_through_the_cli(kind, tmp_path):
    path = _bad(kind, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run([sys.executable, "-m", "robnet_svc", "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


# --------------------------------------------------------------------------- inspect


def test_inspect_report(tmp_path):
    path = onnx_factory.build("normalized", tmp_path)
    report = inspect_model(path)
    json.dumps(report)  # JSON-ready
    assert report["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float"}]
    assert report["outputs"][0]["name"] == "logits" and report["num_classes"] == 10
    assert report["opset"] == 17 and report["image_shape"] == [1, 8, 8]
    assert report["op_types"]["Conv"] == 1 and report["op_types"]["Sub"] == 1 and report["op_types"]["Div"] == 1
    expected = sum(p.numel() for p in onnx_factory.make_model("normalized").parameters()) + 2  # + mean, std
    assert report["parameters"] == expected
    assert report["engine"]["supported"] in (True, False, None)
    text = format_inspection(report)
    assert "input        input [batch, 1, 8, 8] float" in text and "Conv x1" in text


def test_inspect_cli_json(tmp_path):
    path = onnx_factory.build("flat_mlp", tmp_path)
    result = subprocess.run([sys.executable, "-m", "robnet_svc", "inspect", str(path), "--image-shape", "1x8x8",
                             "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input_layout"] == "flat" and report["image_shape"] == [1, 8, 8]
    refused = subprocess.run([sys.executable, "-m", "robnet_svc", "inspect", str(path)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--image-shape" in refused.stderr


# --------------------------------------------------------------------------- shared corpus


@pytest.mark.parametrize("name", _corpus_files() or ["(corpus absent)"])
def test_corpus_model_round_trips(name, shared_dir, tmp_path):
    path = shared_dir / "corpus" / name
    if name in CORPUS_NOT_CLASSIFIERS:
        with pytest.raises(RobnetError, match=CORPUS_NOT_CLASSIFIERS[name]) as info:
            load_model(path, image_shape=CORPUS_IMAGE_SHAPES.get(Path(name).name))
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
        return
    imported = _round_trip(path, tmp_path, image_shape=CORPUS_IMAGE_SHAPES.get(Path(name).name))
    engine = engine_support(imported)
    if engine["supported"] is not None:
        assert {row["onnx_op"] for row in engine["unsupported"]} == CORPUS_NOT_BOUNDABLE.get(Path(name).name, set())


def test_corpus_external_data_loads(shared_dir):
    path = shared_dir / "corpus" / "onnx" / "zuramai_mnist_extdata" / "mnist.onnx"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    model, _ = read_onnx(path)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert sum(w.size for w in weights) > 200_000 and all(np.isfinite(w).all() for w in weights)


def test_corpus_flat_model_needs_image_shape(shared_dir):
    path = shared_dir / "corpus" / "onnx" / "vnn21_mnistfc_256x2.onnx"
    with pytest.raises(RobnetError, match=r"is \[N,784x1\].*does not look like an image.*--image-shape"):
        load_model(path)


def test_corpus_opset_conversions(shared_dir):
    model = load_model(shared_dir / "corpus" / "onnx" / "zuramai_mnist_extdata" / "mnist.onnx")
    assert (model.source_opset, model.opset) == (None, 20)  # read at its own opset (registered converters)
    assert "Reshape allowzero=1 -> 0 on 1 node(s)" in model.lowered
    model = load_model(shared_dir / "corpus" / "onnx" / "vnn21_acasxu_run2a_1_1.onnx")
    assert (model.source_opset, model.opset) == (8, 17)


def test_corpus_parameter_counts_match_manifest(shared_dir):
    rows = [line.split("\t") for line in (shared_dir / "corpus" / "MANIFEST.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    for row in rows:
        entry = dict(zip(header, row))
        name = entry["filename"]
        if name.startswith("zuramai"):
            continue
        model, _ = read_onnx(shared_dir / "corpus" / "onnx" / name)
        from robnet_svc.onnx_io.inspection import _parameter_count

        assert _parameter_count(model) == int(entry["num_params"]), name


def test_inspect_names_unsupported_onnx_nodes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.LayerNorm([4, 6, 6]), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10))
    report = inspect_model(onnx_factory.export(model, tmp_path / "layernorm.onnx", (1, 8, 8)))
    if report["engine"]["supported"] is None:
        pytest.skip("bound engine not available")
    assert report["engine"]["supported"] is False
    unsupported = [(row["node"], row["onnx_op"]) for row in report["engine"]["unsupported"]]
    assert unsupported == [("/1/LayerNormalization", "LayerNormalization")]
    assert "/1/LayerNormalization: LayerNormalization" in format_inspection(report)
    assert inspect_model(onnx_factory.build("normalized", tmp_path))["engine"]["supported"] is True
