"""Step 2: ONNX -> torch.fx with onnx2torch (plus the converters of ``converters.py``), after
the exact rewrites of ``lower.py``.

Every node is first checked against onnx2torch's registry (its converter is looked up and
run), so an unconvertible model is refused with EVERY unconvertible node named in one line.
When a node has no converter at the model's opset, the model is converted to opset 17 with
``onnx.version_converter`` (up from old exporters) and checked again. The caller compares
the result with onnxruntime on the file as read, so no rewrite can change what the model
computes unnoticed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnx import version_converter
from torch import fx

from robnet_svc.onnx_io.base import UPGRADE_OPSET, default_opset, fail, first_line
from robnet_svc.onnx_io.converters import register
from robnet_svc.onnx_io.lower import lower


def unconvertible(model: onnx.ModelProto) -> list[str]:
    """``"node (Op opset V: why)"`` for every node onnx2torch cannot convert; [] when none."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferred = safe_shape_inference(model)
        graph = OnnxGraph(inferred.graph)
        opsets = {o.domain: o.version for o in inferred.opset_import}
        problems = []
        for name, node in graph.nodes.items():
            version = opsets.get(node.domain, 0)
            try:
                converter = get_converter(domain=node.domain, operation_type=node.operation_type, version=version)
            except NotImplementedError:
                problems.append(f"{node.proto.name or name} ({_op(node, version)}: no converter)")
                continue
            try:
                converter(node, graph)
            except Exception as exc:
                problems.append(f"{node.proto.name or name} ({_op(node, version)}: {first_line(exc)})")
    return problems


def _op(node, version: int) -> str:
    domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    return f"{domain}{node.operation_type} opset {version}"


def convert_model(model: onnx.ModelProto, path: Path) -> tuple[fx.GraphModule, onnx.ModelProto, list[str]]:
    """(graph module, the ONNX model it was converted from, rewrites applied) or RobnetError."""
    from onnx2torch import convert

    lowered, done = lower(model)
    problems = unconvertible(lowered)
    opset = default_opset(model)
    if problems and opset != UPGRADE_OPSET:
        try:
            upgraded, more = lower(version_converter.convert_version(lowered, UPGRADE_OPSET))
            onnx.checker.check_model(upgraded)
            if not unconvertible(upgraded):
                lowered, problems = upgraded, []
                done = done + more + [f"opset {opset} -> {UPGRADE_OPSET} (onnx.version_converter)"]
        except Exception:  # the version converter refuses many models: report the original problems
            pass
    if problems:
        raise fail(path, f"cannot be converted to torch; {len(problems)} node(s) unconvertible: "
                         + "; ".join(problems))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert(lowered), lowered, done
    except Exception as exc:
        raise fail(path, f"cannot be converted to torch (onnx2torch: {type(exc).__name__}: "
                         f"{first_line(exc)})") from exc
