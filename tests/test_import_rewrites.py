"""What today's exporters write, on hand-made ONNX graphs: the converters registered in
onnx2torch's registry (opset 18-20), the exact rewrites before conversion (IR version,
allowzero, auto_pad, shared weights), the pre-check naming every unconvertible node, dense
constants becoming trainable ``nn.Linear`` layers, the relative parity tolerance, the
single-output refusal, reproducible exports and ``inspect``'s note on non-image inputs.
Every import is checked against onnxruntime by ``load_model`` itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_factory
from robnet_svc.errors import RobnetError
from robnet_svc.onnx_io import export_model, format_inspection, inspect_model, load_model
from robnet_svc.onnx_io.base import PARITY_ATOL, PARITY_RTOL
from robnet_svc.onnx_io.parity import tolerance

RNG = np.random.default_rng(0)


def _floats(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _graph(path, nodes, initializers, image=(2, 8, 8), classes=3, opset=18, batch="N"):
    """x [N, *image] -> nodes -> logits [N, classes]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *image])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    return onnx_factory.write_graph(path, nodes, [x], [y], initializers, opset=opset)


def _pool_head(features, classes=3):
    """GlobalAveragePool -> Flatten -> Gemm: [N, C, H, W] -> logits."""
    nodes = [helper.make_node("GlobalAveragePool", [features], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], transB=1)]
    return nodes


def _module_classes(imported) -> set[str]:
    return {type(m).__name__ for m in imported.module.modules()}


def test_reduce_mean_18_axes_as_input(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=0, name="the_mean"),
             helper.make_node("Gemm", ["m", "head_w", "head_b"], ["logits"], transB=1)]
    inits = [_init("w", _floats(4, 2, 3, 3)), _init("axes", np.array([2, 3], np.int64)),
             _init("head_w", _floats(3, 4)), _init("head_b", _floats(3))]
    imported = load_model(_graph(tmp_path / "m.onnx", nodes, inits, opset=18))
    assert imported.opset == 18 and imported.source_opset is None
    assert "OnnxReduceStaticAxes" in _module_classes(imported)  # the class onnx2torch makes at opset 13


@pytest.mark.parametrize("form", ["num_outputs", "split input"])
def test_split_18(form, tmp_path):
    attrs = {"num_outputs": 2} if form == "num_outputs" else {}
    inputs = ["c"] if form == "num_outputs" else ["c", "sizes"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Split", inputs, ["a", "b"], axis=1, **attrs),
             helper.make_node("Sub", ["a", "b"], ["d"]), *_pool_head("d")]
    inits = [_init("w", _floats(4, 2, 3, 3)), _init("sizes", np.array([2, 2], np.int64)),
             _init("head_w", _floats(3, 2)), _init("head_b", _floats(3))]
    imported = load_model(_graph(tmp_path / "s.onnx", nodes, inits, opset=18))
    assert {"OnnxSplit", "OnnxSplit13"} & _module_classes(imported)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate, tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Gelu", ["c"], ["g"], approximate=approximate),
             *_pool_head("g")]
    inits = [_init("w", _floats(4, 2, 3, 3)), _init("head_w", _floats(3, 4)), _init("head_b", _floats(3))]
    imported = load_model(_graph(tmp_path / "g.onnx", nodes, inits, opset=20))
    gelu = [m for m in imported.module.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelu) == 1 and gelu[0].approximate == approximate


def test_type_only_versions_reuse_the_older_converter(tmp_path):
    """Opset 21-22 versions of Conv/Shape/Reshape/Identity/... only widened their types."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Identity", ["p"], ["i"]), helper.make_node("Flatten", ["i"], ["flat"]),
             helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], transB=1)]
    inits = [_init("w", _floats(4, 2, 3, 3)), _init("head_w", _floats(3, 64)), _init("head_b", _floats(3))]
    imported = load_model(_graph(tmp_path / "t.onnx", nodes, inits, opset=22))
    assert {"Conv2d", "AvgPool2d", "Linear"} <= _module_classes(imported)


def test_every_unconvertible_node_is_named_in_one_line(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 2, 2, 2]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], dilations=[2, 2], name="dilated_pool"),
             helper.make_node("Hardmax", ["p"], ["h"], name="the_hardmax"), *_pool_head("h")]
    inits = [_init("w", _floats(4, 2, 3, 3)), _init("head_w", _floats(3, 4)), _init("head_b", _floats(3))]
    path = _graph(tmp_path / "bad.onnx", nodes, inits, opset=19)
    with pytest.raises(RobnetError) as info:
        load_model(path)
    text = str(info.value)
    assert "\n" not in text and "2 node(s) unconvertible" in text
    assert "dilated_pool (AveragePool opset 19: AveragePool opset 19 with dilations=[2, 2]" in text
    assert "the_hardmax (Hardmax opset 19: no converter)" in text


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_becomes_explicit_pads(mode, tmp_path):
    """Odd sizes and stride 2: the padding is asymmetric, so upper/lower really differ."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=mode, strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], auto_pad=mode, kernel_shape=[2, 2], strides=[2, 2]),
             *_pool_head("p")]
    inits = [_init("w", _floats(4, 2, 4, 4)), _init("head_w", _floats(3, 4)), _init("head_b", _floats(3))]
    imported = load_model(_graph(tmp_path / "same.onnx", nodes, inits, image=(2, 9, 9), opset=11))
    assert "auto_pad -> explicit pads on 2 node(s)" in imported.lowered


def test_ir_version_newer_than_onnxruntime_is_lowered(tmp_path):
    from robnet_svc.onnx_io.lower import ort_max_ir_version

    path = onnx_factory.build("cnn_bn", tmp_path)
    model = onnx.load(str(path))
    model.ir_version = onnx.IR_VERSION
    onnx.save(model, str(path))
    imported = load_model(path)
    if onnx.IR_VERSION > ort_max_ir_version():
        assert f"IR version {onnx.IR_VERSION} -> {ort_max_ir_version()}" in imported.lowered


def test_reshape_allowzero(tmp_path):
    def reshape_model(shape, name):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
                 helper.make_node("Reshape", ["c", "shape"], ["flat"], allowzero=1, name="the_reshape"),
                 helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], transB=1)]
        inits = [_init("w", _floats(1, 2, 3, 3)), _init("shape", np.array(shape, np.int64)),
                 _init("head_w", _floats(3, 36)), _init("head_b", _floats(3))]
        return _graph(tmp_path / name, nodes, inits, opset=14)

    assert "Reshape allowzero=1 -> 0 on 1 node(s)" in load_model(reshape_model([-1, 36], "ok.onnx")).lowered
    with pytest.raises(RobnetError, match=r"the_reshape \(Reshape opset 14:"):  # a literal 0: kept, refused
        load_model(reshape_model([0, 36], "zero.onnx"))


def test_dense_constants_become_trainable_linear_layers(tmp_path):
    """tf2onnx/MATLAB: MatMul by a constant + Add of a constant, and nothing else with weights."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("MatMul", ["f", "w1"], ["m1"], name="dense1"), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="dense2"), helper.make_node("Add", ["b2", "m2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["logits"], name="dense3")]  # no bias
    inits = [_init("w1", _floats(128, 16)), _init("b1", _floats(16)), _init("w2", _floats(16, 8)),
             _init("b2", _floats(1, 8)), _init("w3", _floats(8, 3))]
    imported = load_model(_graph(tmp_path / "dense.onnx", nodes, inits, opset=13))
    linears = dict((name, m) for name, m in imported.module.named_modules() if isinstance(m, torch.nn.Linear))
    assert sorted(linears) == ["dense1", "dense2", "dense3"] and linears["dense3"].bias is None
    assert not {"OnnxMatMul", "OnnxBinaryMathOperation"} & _module_classes(imported)
    params = list(imported.module.parameters())
    assert sum(p.numel() for p in params) == 128 * 16 + 16 + 16 * 8 + 8 + 8 * 3
    assert all(p.requires_grad for p in params)
    imported.module(torch.rand(4, 2, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_matmul_add_factory_model_trains(tmp_path):
    imported = load_model(onnx_factory.build("matmul_add", tmp_path))
    assert "Linear" in _module_classes(imported)
    assert not [name for name, _ in imported.module.named_buffers() if name.startswith("initializers.")]


def test_parity_tolerance_is_relative_to_the_scale():
    small, large = np.array([[0.5, -1.0]]), np.array([[100.0, -250.0]])
    assert tolerance([small]) == pytest.approx(PARITY_ATOL + PARITY_RTOL * 1.0)
    assert tolerance([large]) == pytest.approx(PARITY_ATOL + PARITY_RTOL * 250.0)


def test_large_logits_import(tmp_path):
    """Logits in the hundreds (a healthy ResNet-50's scale) pass parity."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(64 * 6 * 6, 10))
    with torch.no_grad():
        model[3].weight.mul_(400.0)
    path = onnx_factory.export(model, tmp_path / "big.onnx", (1, 8, 8))
    imported = load_model(path)
    assert imported.module(torch.rand(3, 1, 8, 8)).abs().max() > 50


def test_single_output_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 1))
    path = onnx_factory.export(model, tmp_path / "regressor.onnx", (1, 8, 8))
    result = subprocess.run([sys.executable, "-m", "robnet_svc", "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "a classifier needs at least 2 classes" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_is_byte_reproducible_and_path_free(tmp_path):
    first_dir, second_dir = tmp_path / "a" / "deep", tmp_path / "b"
    first_dir.mkdir(parents=True)
    second_dir.mkdir()
    source = load_model(onnx_factory.build("normalized", tmp_path))
    for directory in (first_dir, second_dir):
        export_model(source.module, source, directory / "model.robust.onnx", {"robnet_svc.train_method": "ibp"})
    first, second = ((d / "model.robust.onnx").read_bytes() for d in (first_dir, second_dir))
    assert first == second
    props = {p.key: p.value for p in onnx.load_from_string(first).metadata_props}
    assert props["robnet_svc.train_method"] == "ibp" and "robnet_svc.source_sha256" in props
    assert not any(str(tmp_path) in value or "/" in value for value in props.values())


def test_inspect_says_when_the_input_is_not_an_image(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    path = onnx_factory.write_graph(tmp_path / "vector.onnx", [helper.make_node("Gemm", ["x", "w", "b"], ["logits"])],
                                    [x], [y], [_init("w", _floats(5, 3)), _init("b", _floats(3))], opset=13)
    with pytest.raises(RobnetError) as refused:  # the CLI turns this into exit 2 (tests/test_onnx_io.py)
        load_model(path)
    assert "(5 values per sample), which does not look like an image" in str(refused.value)
    assert "--image-shape CxHxW (product 5, e.g. 1x1x5" in str(refused.value)
    text = format_inspection(inspect_model(path, image_shape="1x1x5"))
    assert "NOTE         the input is not an image: [N,5] holds 5 values per sample; --image-shape 1x1x5" in text
