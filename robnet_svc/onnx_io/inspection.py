"""Step 6: ``robnet-svc inspect``: a JSON-ready pre-flight report of an imported model and
its text form (signature, opset, producer, parameters, ops, rewrites, the bound engine's
verdict)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from robnet_svc.onnx_io.base import ImportedModel, dims, graph_inputs
from robnet_svc.onnx_io.layout import layout_note
from robnet_svc.onnx_io.load import load_model


def inspect_model(path: str | Path, image_shape: str | tuple | None = None) -> dict[str, Any]:
    """JSON-ready pre-flight report: signature, opset, producer, parameters, ops, engine support."""
    imported = load_model(path, image_shape=image_shape)
    model = imported.onnx_model
    source_ops = Counter(n.op_type for n in model.graph.node)
    inputs, outputs = graph_inputs(model), list(model.graph.output)
    return {
        "file": str(imported.path),
        "sha256": imported.sha256,
        "producer": imported.producer,
        "ir_version": int(model.ir_version),
        "opset": imported.source_opset or imported.opset,
        "opset_imports": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "converted_at_opset": imported.opset if imported.source_opset else None,
        "rewrites": list(imported.lowered),
        "inputs": [_value_report(v) for v in inputs],
        "outputs": [_value_report(v) for v in outputs],
        "input_layout": imported.layout,
        "image_shape": list(imported.image_shape),
        "input_note": layout_note(imported.layout, imported.image_shape, imported.input_shape),
        "num_classes": imported.num_classes,
        "head": imported.head,
        "parameters": _parameter_count(model),
        "trainable_parameters": int(sum(p.numel() for p in imported.module.parameters() if p.requires_grad)),
        "op_types": dict(sorted(source_ops.items())),
        "parity_max_abs_diff": imported.parity_max_abs_diff,
        "engine": engine_support(imported),
    }


def _value_report(v: onnx.ValueInfoProto) -> dict[str, Any]:
    elem = v.type.tensor_type.elem_type
    return {"name": v.name, "shape": dims(v), "dtype": onnx.TensorProto.DataType.Name(elem).lower()}


def _parameter_count(model: onnx.ModelProto) -> int:
    """Elements of every stored tensor: initializers and Constant nodes (weights, biases,
    BatchNorm statistics, normalisation constants and the few shape constants)."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return int(sum(int(np.prod(t.dims)) for t in tensors))


def engine_support(imported: ImportedModel) -> dict[str, Any]:
    """Which normalised nodes the bound engine has no rule for, named by their ONNX node."""
    try:
        from robnet_svc.bounds.graph import find_unsupported
        from robnet_svc.plugins import load_registry
    except ImportError:
        return {"supported": None, "unsupported": [], "note": "engine support: unknown (bound engine not installed)"}
    unsupported = find_unsupported(imported.module, load_registry().rules())
    onnx_nodes = _onnx_nodes_by_module(imported.onnx_model)
    fx_nodes = {n.name: n for n in imported.module.graph.nodes}
    rows = []
    for node_name, description in unsupported:
        fx_node = fx_nodes.get(node_name)
        target = str(fx_node.target) if fx_node is not None else node_name
        onnx_node = onnx_nodes.get(target) or onnx_nodes.get(node_name)
        rows.append({
            "node": onnx_node.name if onnx_node is not None and onnx_node.name else target,
            "onnx_op": onnx_node.op_type if onnx_node is not None else None,
            "torch_op": description,
        })
    return {"supported": not rows, "unsupported": rows, "note": None}


def _onnx_nodes_by_module(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """onnx2torch's submodule name (the node's unique name) -> ONNX node."""
    from onnx2torch.onnx_graph import OnnxGraph

    graph = OnnxGraph(model.graph)
    return {name: node.proto for name, node in graph.nodes.items()}


def format_inspection(report: dict[str, Any]) -> str:
    """Human-readable text of an ``inspect_model`` report."""

    def shape(values: list) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in values) + "]"

    lines = [f"model        {report['file']}",
             f"sha256       {report['sha256']}",
             f"producer     {report['producer'] or 'unknown'} (IR {report['ir_version']})",
             f"opset        {report['opset']}" + (f" (converted at opset {report['converted_at_opset']})"
                                                   if report.get("converted_at_opset") else "")]
    if report.get("rewrites"):
        lines.append("rewritten    " + "; ".join(report["rewrites"]) + " (exact; checked by parity)")
    for v in report["inputs"]:
        lines.append(f"input        {v['name']} {shape(v['shape'])} {v['dtype']}")
    for v in report["outputs"]:
        lines.append(f"output       {v['name']} {shape(v['shape'])} {v['dtype']}")
    lines.append(f"image        {'x'.join(map(str, report['image_shape']))} (CxHxW; input layout {report['input_layout']})")
    if report.get("input_note"):
        lines.append(f"NOTE         {report['input_note']}")
    lines += [f"classes      {report['num_classes']}" + (f" (trailing {report['head']} stripped for certification)"
                                                          if report["head"] else ""),
              f"parameters   {report['parameters']:,} stored values, "
              f"{report.get('trainable_parameters', 0):,} trainable weights",
              f"parity       max |torch - onnxruntime| = {report['parity_max_abs_diff']:.2g}",
              "ops          " + ", ".join(f"{op} x{n}" for op, n in report["op_types"].items())]
    engine = report["engine"]
    if engine["supported"] is None:
        lines.append(engine["note"] or "engine support: unknown")
    elif engine["supported"]:
        lines.append("engine       every op is supported by the bound engine")
    else:
        lines.append(f"engine       {len(engine['unsupported'])} node(s) NOT supported by the bound engine:")
        for row in engine["unsupported"]:
            lines.append(f"  - {row['node']}: {row['onnx_op'] or '?'} ({row['torch_op']})")
    return "\n".join(lines)
