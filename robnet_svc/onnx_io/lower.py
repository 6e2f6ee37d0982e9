"""Step 2a: rewrite what onnx2torch cannot read into the equivalent form it can, before
conversion. Each rewrite is exact (same function); the parity check compares the result with
onnxruntime on the file as read.

* IR version newer than onnxruntime loads (the newest ``onnx`` writes IR 14): lowered to the
  newest IR onnxruntime loads when the model's opsets allow it (``ort_loadable``);
* ``Reshape`` ``allowzero=1`` (PyTorch >= 2.9 sets it) -> 0 when the target shape has no 0;
* ``Identity`` of an initializer (the legacy exporter shares equal weights, e.g. two zero
  biases, that way; onnx2torch's Conv wants its weights as initializers) -> an initializer of
  its own under the Identity's output name;
* ``auto_pad="SAME_UPPER"/"SAME_LOWER"/"VALID"`` on Conv, MaxPool, AveragePool, LpPool
  (keras2onnx / tf2onnx) -> explicit ``pads`` computed from the inferred input shape;
* ``Clip`` with an empty optional input (``torch.clamp(x, min=c)`` exports ``Clip(x, c, "")``;
  onnx2torch fails on the empty name): trailing empty inputs dropped, an absent min before a
  given max becomes a ``-inf`` constant.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

_AUTO_PAD_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool"}


@functools.lru_cache(maxsize=1)
def ort_max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (probed once on a 1-node model)."""
    import onnxruntime as ort

    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir in range(onnx.IR_VERSION, 6, -1):
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # "Unsupported model IR version"
            continue
    return 7


def ort_loadable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """``model`` with its IR version lowered to what onnxruntime loads, when the opsets allow it.
    Returns (model, phrase describing the change or None)."""
    newest = ort_max_ir_version()
    if model.ir_version <= newest:
        return model, None
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # an opset newer than this onnx knows
        return model, None
    if needed > newest:
        return model, None
    lowered = copy.deepcopy(model)
    lowered.ir_version = newest
    return lowered, f"IR version {model.ir_version} -> {newest}"


def lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every rewrite above applied, and one phrase per kind applied."""
    model, ir_change = ort_loadable(model)
    model = copy.deepcopy(model) if ir_change is None else model
    done = [ir_change] if ir_change else []
    if count := _inline_constant_identities(model):
        done.append(f"Identity of a stored tensor -> a tensor of its own on {count} node(s)")
    if count := _relax_allowzero(model):
        done.append(f"Reshape allowzero=1 -> 0 on {count} node(s)")
    if count := _explicit_pads(model):
        done.append(f"auto_pad -> explicit pads on {count} node(s)")
    if count := _clip_without_empty_inputs(model):
        done.append(f"Clip with an empty min/max input -> explicit inputs on {count} node(s)")
    return model, done


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    return constants


def _inline_constant_identities(model: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` (not a graph output) by a copy of the initializer."""
    initializers = {t.name: t for t in model.graph.initializer}
    outputs = {v.name for v in model.graph.output}
    kept, count = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            copied = copy.deepcopy(initializers[node.input[0]])
            copied.name = node.output[0]
            model.graph.initializer.append(copied)
            count += 1
        else:
            kept.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return count


def _relax_allowzero(model: onnx.ModelProto) -> int:
    """``allowzero`` only matters for a literal 0 in the target shape; a shape computed at run time
    from a non-empty tensor's shape has none. onnx2torch refuses ``allowzero=1``."""
    constants, count = _constants(model), 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = constants.get(node.input[1])
        if shape is not None and 0 in numpy_helper.to_array(shape).tolist():
            continue
        for attribute in node.attribute:
            if attribute.name == "allowzero" and attribute.i != 0:
                attribute.i = 0
                count += 1
    return count


def _explicit_pads(model: onnx.ModelProto) -> int:
    """Replace ``auto_pad`` by the ``pads`` it stands for (ONNX: output = ceil(input / stride);
    the total padding is split evenly, the odd pixel at the end for SAME_UPPER, at the start for
    SAME_LOWER). Nodes whose input shape cannot be inferred are left for the pre-check to name."""
    nodes = [n for n in model.graph.node if n.op_type in _AUTO_PAD_OPS
             and any(a.name == "auto_pad" and a.s.decode() not in ("", "NOTSET") for a in n.attribute)]
    if not nodes:
        return 0
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        return 0
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    count = 0
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs["auto_pad"].decode()
        spatial = (shapes.get(node.input[0]) or [])[2:]
        kernel = list(attrs.get("kernel_shape") or
                      (weights.get(node.input[1], [])[2:] if node.op_type == "Conv" and len(node.input) > 1 else []))
        if mode == "VALID":
            pads = [0] * 2 * len(kernel)
        elif not spatial or None in spatial or len(kernel) != len(spatial):
            continue
        else:
            strides = list(attrs.get("strides") or [1] * len(spatial))
            dilations = list(attrs.get("dilations") or [1] * len(spatial))
            begin, end = [], []
            for size, k, s, d in zip(spatial, kernel, strides, dilations):
                total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if mode == "SAME_UPPER" else large)
                end.append(large if mode == "SAME_UPPER" else small)
            pads = begin + end
        if not pads:
            continue
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("pads", pads)])
        count += 1
    return count


def _clip_without_empty_inputs(model: onnx.ModelProto) -> int:
    """Clip's optional min/max inputs without empty names (in place); the number of nodes changed."""
    count = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Clip" or "" not in list(node.input)[1:]:
            continue
        inputs = list(node.input)
        while len(inputs) > 1 and inputs[-1] == "":
            inputs.pop()
        if len(inputs) == 3 and inputs[1] == "":
            inputs[1] = f"{node.name or 'Clip'}_{i}_no_min"
            model.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), inputs[1]))
        del node.input[:]
        node.input.extend(inputs)
        count += 1
    return count
