"""Step 1: read an ONNX file (``.onnx`` / ``.onnx.gz``, external data), check it, and find
its one image input and one logits output."""

from __future__ import annotations

import copy
import gzip
import hashlib
from pathlib import Path

import onnx
from onnx import external_data_helper

from robnet_svc.onnx_io.base import FLOAT_TYPES, fail, first_line, graph_inputs


def read_onnx(path: str | Path) -> tuple[onnx.ModelProto, str]:
    """Load and check an ONNX file (``.onnx`` or ``.onnx.gz``, external data next to it).

    Returns the model (topologically sorted) and the sha256 of the file's bytes.
    Raises ``RobnetError`` naming the file for every way the file can be unusable.
    """
    path = Path(path)
    if not path.exists():
        raise fail(path, "no such file")
    if path.is_dir():
        raise fail(path, "is a directory, not an ONNX file")
    raw = path.read_bytes()
    if not raw:
        raise fail(path, "is empty (0 bytes), not an ONNX model")
    sha256 = hashlib.sha256(raw).hexdigest()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise fail(path, f"is not a readable gzip file ({first_line(exc)})") from exc
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf DecodeError and friends
        raise fail(path, f"is not an ONNX model (cannot parse it: {first_line(exc)})") from exc
    if not model.graph.node or not model.opset_import:
        raise fail(path, "is not an ONNX model (no graph or no opset in it; truncated or another format?)")
    try:  # a no-op unless some tensor lives in an external data file (next to the model)
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # OSError, or onnx's ValidationError for a missing file
        raise fail(path, f"cannot read its external data file(s) next to it ({first_line(exc)})") from exc
    model = _toposorted(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise fail(path, f"is not a valid ONNX model (onnx.checker: {first_line(exc)})") from exc
    return model, sha256


def _toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its nodes in topological order (some exporters write them reversed;
    onnx2torch needs them sorted)."""
    nodes = list(model.graph.node)
    known = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            return model  # a cycle or a dangling input: let the checker/converter report it
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    if [id(n) for n in ordered] == [id(n) for n in nodes]:
        return model
    sorted_model = copy.deepcopy(model)
    del sorted_model.graph.node[:]
    sorted_model.graph.node.extend(copy.deepcopy(ordered))
    return sorted_model


def signature(model: onnx.ModelProto, path: Path) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    """The one input and one output, or a RobnetError saying what is wrong."""
    inputs, outputs = graph_inputs(model), list(model.graph.output)
    if len(inputs) != 1:
        names = ", ".join(repr(v.name) for v in inputs) or "none"
        raise fail(path, f"has {len(inputs)} inputs ({names}); robnet-svc needs exactly one image input")
    if len(outputs) != 1:
        names = ", ".join(repr(v.name) for v in outputs)
        raise fail(path, f"has {len(outputs)} outputs ({names}); robnet-svc needs exactly one logits output")
    for kind, v in (("input", inputs[0]), ("output", outputs[0])):
        elem = v.type.tensor_type.elem_type
        if not v.type.HasField("tensor_type") or elem not in FLOAT_TYPES:
            type_name = onnx.TensorProto.DataType.Name(elem) if v.type.HasField("tensor_type") else "non-tensor"
            raise fail(path, f"{kind} {v.name!r} has type {type_name}; robnet-svc needs a float "
                             f"({'image' if kind == 'input' else 'logits'}) tensor")
    return inputs[0], outputs[0]
