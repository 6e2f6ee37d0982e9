"""onnx2torch converters for op versions it does not know yet, registered in its own registry
(``onnx2torch.node_converters.registry.add_converter``: op type + version + domain).

onnx2torch lags the ONNX standard; PyTorch's dynamo exporter writes opset 18-23. Three kinds:

* versions that only widened the accepted types (bfloat16, float8, int4, ...; schema otherwise
  unchanged): the converter of the newest older version is reused, so the torch module is the
  very class onnx2torch makes for the older opset (``_TYPES_ONLY``);
* versions that added an attribute or input which is harmless at its default: the older
  converter is reused when the node leaves it at the default, and the node is refused (named
  by the import pre-check) otherwise (``_GUARDED``: AveragePool 19/22 dilations, Pad 18+
  axes/wrap, Resize 18/19 antialias/axes/aspect policy/half_pixel_symmetric);
* real changes: ``Reduce*`` 18/20 (axes became an input: constant axes -> onnx2torch's
  ``OnnxReduceStaticAxes``, as for opset 13), ``Split`` 18 (``num_outputs``: onnx2torch's
  ``OnnxSplit``/``OnnxSplit13``) and the new ``Gelu`` 20 (``torch.nn.GELU``).

``register()`` is idempotent and leaves alone every version onnx2torch already has (a newer
onnx2torch wins). ``PRODUCED_MODULES`` lists every module class these converters create.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_TYPES_ONLY: dict[str, tuple[int, ...]] = {
    "Acos": (22,), "Asin": (22,), "Atan": (22,), "Cos": (22,), "Sin": (22,), "Tan": (22,),
    "Cast": (19, 21, 23, 24, 25), "Celu": (28,), "Constant": (19, 21, 23, 24, 25),
    "ConstantOfShape": (20, 21, 23, 24, 25), "Conv": (22,), "ConvTranspose": (22,),
    "DepthToSpace": (28,), "Dropout": (22,), "Einsum": (28,), "Elu": (22,), "Equal": (19,),
    "EyeLike": (22,), "Flatten": (21, 23, 24, 25), "GlobalAveragePool": (22,),
    "GreaterOrEqual": (16,), "HardSigmoid": (22,), "HardSwish": (22,),
    "Identity": (19, 21, 23, 24, 25), "InstanceNormalization": (22,), "IsInf": (20,), "IsNaN": (20,),
    "LessOrEqual": (16,), "MaxPool": (22,), "Mod": (28,), "Reshape": (19, 21, 23, 24, 25),
    "RoiAlign": (22,), "Round": (22,), "Selu": (22,), "Shape": (19, 21, 23, 24, 25),
    "Softplus": (22,), "Softsign": (22,), "Squeeze": (23, 24, 25), "TopK": (24,),
    "Transpose": (21, 23, 24, 25), "Unsqueeze": (21, 23, 24, 25),
}
# Cast 19+ adds `saturate`/`round_mode`, which only matter for float8/float4 targets (onnx2torch
# refuses those types anyway), so it is listed with the type-only versions.

_REDUCE_18 = {"ReduceL1": (18,), "ReduceL2": (18,), "ReduceLogSum": (18,), "ReduceLogSumExp": (18,),
              "ReduceMax": (18, 20), "ReduceMean": (18,), "ReduceMin": (18, 20), "ReduceProd": (18,),
              "ReduceSumSquare": (18,)}

PRODUCED_MODULES = (
    "the class onnx2torch makes for the op's older version (every _TYPES_ONLY and _GUARDED op)",
    "onnx2torch.node_converters.reduce.OnnxReduceStaticAxes (Reduce* 18/20)",
    "torch.nn.Identity (Reduce* 18 with empty axes and noop_with_empty_axes=1)",
    "onnx2torch.node_converters.split.OnnxSplit (Split 18, constant split sizes)",
    "onnx2torch.node_converters.split.OnnxSplit13 (Split 18, num_outputs or computed split sizes)",
    "torch.nn.GELU (Gelu 20, approximate 'none' or 'tanh')",
)


def _older(op: str, version: int) -> Callable:
    """The onnx2torch converter of the newest version of ``op`` before ``version``."""
    from onnx import defs
    from onnx2torch.node_converters.registry import get_converter

    older = defs.get_schema(op, max_inclusive_version=version - 1).since_version
    return get_converter(operation_type=op, version=older)


def _attr(node, name: str, default):
    value = node.attributes.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _extra_input(node, index: int) -> bool:
    return len(node.input_values) > index and bool(node.input_values[index])


def _guard_average_pool(node) -> str | None:
    dilations = _attr(node, "dilations", None)
    return None if not dilations or all(d == 1 for d in dilations) else f"dilations={list(dilations)}"


def _guard_pad(node) -> str | None:
    if _extra_input(node, 3):
        return "an 'axes' input"
    return "mode='wrap'" if _attr(node, "mode", "constant") == "wrap" else None


def _guard_resize(node) -> str | None:
    if _attr(node, "antialias", 0):
        return "antialias=1"
    if _attr(node, "axes", None):
        return "an 'axes' attribute"
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={_attr(node, 'keep_aspect_ratio_policy', '')!r}"
    if _attr(node, "coordinate_transformation_mode", "half_pixel") == "half_pixel_symmetric":
        return "coordinate_transformation_mode='half_pixel_symmetric'"
    return None


_GUARDED: dict[str, tuple[tuple[int, ...], Callable]] = {
    "AveragePool": ((19, 22), _guard_average_pool),
    "Pad": ((18, 19, 21, 23, 24, 25), _guard_pad),
    "Resize": ((18, 19), _guard_resize),
}


def _delegate(op: str, version: int, guard: Callable | None = None) -> Callable:
    def convert(node, graph):
        problem = guard(node) if guard is not None else None
        if problem is not None:
            raise NotImplementedError(f"{op} opset {version} with {problem} is not supported")
        return _older(op, version)(node, graph)

    return convert


def _constant_list(node, graph, index: int) -> list[int] | None:
    """The constant integer list at input ``index``; None when absent; NotImplementedError when
    computed at run time."""
    from onnx2torch.utils.common import get_const_value

    if not _extra_input(node, index):
        return None
    try:
        return [int(v) for v in get_const_value(node.input_values[index], graph).reshape(-1).tolist()]
    except KeyError as exc:
        raise NotImplementedError(f"{node.operation_type} with an input {index} computed at run time") from exc


def _reduce_18(node, graph):
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    axes = _constant_list(node, graph, 1)
    mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    if not axes and _attr(node, "noop_with_empty_axes", 0):
        return OperationConverterResult(torch_module=nn.Identity(), onnx_mapping=mapping)
    module = OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes or None,
                                  keepdims=_attr(node, "keepdims", 1))
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


def _split_18(node, graph):
    from onnx2torch.node_converters.split import OnnxSplit, OnnxSplit13
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    axis, count = _attr(node, "axis", 0), len(node.output_values)
    if _extra_input(node, 1):
        try:
            sizes = [int(s) for s in get_const_value(node.input_values[1], graph).tolist()]
        except KeyError:  # sizes computed at run time: onnx2torch's opset-13 module reads them
            return OperationConverterResult(torch_module=OnnxSplit13(num_splits=count, axis=axis),
                                            onnx_mapping=OnnxMapping(node.input_values, node.output_values))
        return OperationConverterResult(torch_module=OnnxSplit(num_splits=count, axis=axis, split=sizes),
                                        onnx_mapping=OnnxMapping((node.input_values[0],), node.output_values))
    # num_outputs: equal parts (the pre-conversion lowering turns an uneven split with a known
    # shape into explicit sizes; anything else is caught by the parity check).
    return OperationConverterResult(torch_module=OnnxSplit13(num_splits=count, axis=axis),
                                    onnx_mapping=OnnxMapping((node.input_values[0],), node.output_values))


def _gelu_20(node, graph):
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    approximate = _attr(node, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu with approximate={approximate!r}")
    return OperationConverterResult(torch_module=nn.GELU(approximate=approximate),
                                    onnx_mapping=onnx_mapping_from_node(node))


def _plan() -> list[tuple[str, int, Callable]]:
    rows = [(op, v, _delegate(op, v)) for op, versions in _TYPES_ONLY.items() for v in versions]
    rows += [(op, v, _delegate(op, v, guard)) for op, (versions, guard) in _GUARDED.items() for v in versions]
    rows += [(op, v, _reduce_18) for op, versions in _REDUCE_18.items() for v in versions]
    rows += [("Split", 18, _split_18), ("Gelu", 20, _gelu_20)]
    return rows


_registered = False


def register() -> None:
    """Add the converters above to onnx2torch's registry (once; never over one it has)."""
    global _registered
    if _registered:
        return
    from onnx import defs
    from onnx2torch.node_converters.registry import add_converter, get_converter

    for op, version, converter in _plan():
        if version > defs.onnx_opset_version():
            continue  # an onnx too old to know this version
        try:
            get_converter(operation_type=op, version=version)
            continue  # onnx2torch has it already
        except NotImplementedError:
            add_converter(operation_type=op, version=version)(converter)
    _registered = True
