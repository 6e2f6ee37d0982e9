"""ONNX in and out: load -> check -> (upgrade opset) -> onnx2torch -> normalise -> parity;
export -> check -> parity -> rename.

``load_model`` returns an ``ImportedModel`` whose ``module`` is a NORMALISED
``torch.fx.GraphModule`` (see ``robnet_svc.graph``) that maps an image batch
``[N, C, H, W]`` to logits ``[N, K]`` at any batch size N. How the image is laid out for
the ONNX input is part of that module (its first node):

* image input ``[N, C, H, W]``: nothing to do;
* flat input (``[N, D]``, or any per-sample shape that is not 3-D, e.g. ``[N, 784, 1]``):
  the user must say how to view it as an image (``image_shape``, product = D); the module
  starts with ``BatchReshape(input_shape)``;
* NHWC input ``[N, H, W, C]`` whose first node is ``Transpose(perm=[0, 3, 1, 2])``
  (tf2onnx/keras2onnx): ``image_shape`` is ``(C, H, W)`` and the module starts with
  ``OnnxTranspose(perm=[0, 2, 3, 1])``, so the user's images are CHW like everyone else's.

Before ``load_model`` returns, the module (plus the stripped Softmax head) is compared with
onnxruntime on the original ONNX file at two batch sizes (max abs diff <= 1e-4).

``export_model`` writes a logits-only torch model back with the source's input layout,
head, names, dtypes and a dynamic batch axis, and checks it against onnxruntime before the
file appears under its final name.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import external_data_helper, helper, numpy_helper, version_converter
from torch import fx, nn

from robnet_svc import __version__
from robnet_svc.atomic import atomic_path
from robnet_svc.errors import RobnetError
from robnet_svc.graph import HEAD_KEY, BatchReshape, normalize_graph

EXPORT_OPSET = 17        # legacy exporter; onnx2torch reads it back
UPGRADE_OPSET = 17       # target of onnx.version_converter when a converter is missing
PARITY_ATOL = 1e-4       # max abs diff, onnxruntime vs torch
IMPORT_PARITY_BATCHES = (1, 7)
EXPORT_PARITY_BATCHES = (1, 7)
ADAPTER_NAME = "image_to_input"  # first module of the graph: image [N,C,H,W] -> ONNX input layout
# metadata_props of exported files that load_model reads back
LAYOUT_KEYS = {"layout": "robnet_svc.input_layout", "image_shape": "robnet_svc.image_shape"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass
class ImportedModel:
    """An ONNX classifier converted to torch, normalised and checked against onnxruntime."""

    path: Path
    sha256: str                       # of the file as given (compressed bytes for .onnx.gz)
    onnx_model: onnx.ModelProto       # as converted (after an opset upgrade if one was needed)
    module: fx.GraphModule            # normalised: image [N,C,H,W] -> logits [N,K]
    input_name: str
    output_name: str
    input_dtype: np.dtype
    output_dtype: np.dtype
    image_shape: tuple[int, int, int]  # (C, H, W) as the user's images are given
    input_shape: tuple[int, ...]       # the ONNX input's per-sample shape, e.g. (784,)
    num_classes: int
    head: str | None                   # "Softmax"/"LogSoftmax" stripped from the end
    opset: int                         # default-domain opset of ``onnx_model``
    producer: str
    layout: str = "NCHW"               # "NCHW", "flat" or "NHWC": how ``input_shape`` holds the image
    source_opset: int | None = None    # opset of the file when it was upgraded, else None
    parity_max_abs_diff: float = 0.0   # measured at import


# --------------------------------------------------------------------------- reading


def _fail(path: Path | str, problem: str) -> RobnetError:
    return RobnetError(f"{path}: {problem}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:300]


def read_onnx(path: str | Path) -> tuple[onnx.ModelProto, str]:
    """Load and check an ONNX file (``.onnx`` or ``.onnx.gz``, external data next to it).

    Returns the model (topologically sorted) and the sha256 of the file's bytes.
    Raises ``RobnetError`` naming the file for every way the file can be unusable.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not an ONNX file")
    raw = path.read_bytes()
    if not raw:
        raise _fail(path, "is empty (0 bytes), not an ONNX model")
    sha256 = hashlib.sha256(raw).hexdigest()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise _fail(path, f"is not a readable gzip file ({_first_line(exc)})") from exc
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf DecodeError and friends
        raise _fail(path, f"is not an ONNX model (cannot parse it: {_first_line(exc)})") from exc
    if not model.graph.node or not model.opset_import:
        raise _fail(path, "is not an ONNX model (no graph or no opset in it; truncated or another format?)")
    try:  # a no-op unless some tensor lives in an external data file (next to the model)
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # OSError, or onnx's ValidationError for a missing file
        raise _fail(path, f"cannot read its external data file(s) next to it ({_first_line(exc)})") from exc
    model = _toposorted(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise _fail(path, f"is not a valid ONNX model (onnx.checker: {_first_line(exc)})") from exc
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


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _signature(model: onnx.ModelProto, path: Path) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    """The one input and one output, or a RobnetError saying what is wrong."""
    inputs, outputs = _graph_inputs(model), list(model.graph.output)
    if len(inputs) != 1:
        names = ", ".join(repr(v.name) for v in inputs) or "none"
        raise _fail(path, f"has {len(inputs)} inputs ({names}); robnet-svc needs exactly one image input")
    if len(outputs) != 1:
        names = ", ".join(repr(v.name) for v in outputs)
        raise _fail(path, f"has {len(outputs)} outputs ({names}); robnet-svc needs exactly one logits output")
    for kind, v in (("input", inputs[0]), ("output", outputs[0])):
        elem = v.type.tensor_type.elem_type
        if not v.type.HasField("tensor_type") or elem not in _FLOAT_TYPES:
            type_name = onnx.TensorProto.DataType.Name(elem) if v.type.HasField("tensor_type") else "non-tensor"
            raise _fail(path, f"{kind} {v.name!r} has type {type_name}; robnet-svc needs a float "
                              f"({'image' if kind == 'input' else 'logits'}) tensor")
    return inputs[0], outputs[0]


# --------------------------------------------------------------------------- converting


def _convert(model: onnx.ModelProto, path: Path) -> tuple[fx.GraphModule, onnx.ModelProto]:
    """onnx2torch; when it lacks a converter for the model's op versions, convert the model
    to opset 17 with ``onnx.version_converter`` (up from old exporters, down from new ones
    such as PyTorch's dynamo exporter at opset 18-20) and retry.

    The result is checked against onnxruntime on the ORIGINAL model by the caller, so a
    conversion step that changed what the model computes cannot go unnoticed.
    """
    from onnx2torch import convert as onnx2torch_convert

    def convert(m: onnx.ModelProto) -> fx.GraphModule:
        return onnx2torch_convert(_clip_without_empty_inputs(m))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return convert(model), model
        except Exception as first:
            opset = default_opset(model)
            if opset == UPGRADE_OPSET:
                raise _fail(path, f"cannot be converted to torch: {_describe(first, model)}; "
                                  "this op is not supported") from first
            direction = "upgrading" if opset < UPGRADE_OPSET else "converting"
            try:
                converted = _relax_allowzero(version_converter.convert_version(model, UPGRADE_OPSET))
                onnx.checker.check_model(converted)
            except Exception as exc:
                raise _fail(path, f"cannot be converted to torch ({_describe(first, model)}) and "
                                  f"{direction} it from opset {opset} to {UPGRADE_OPSET} failed "
                                  f"({_first_line(exc)})") from exc
            try:
                return convert(converted), converted
            except Exception as exc:
                raise _fail(path, f"cannot be converted to torch: {_describe(exc, converted)} (also after "
                                  f"{direction} the opset from {opset} to {UPGRADE_OPSET}); "
                                  "this op is not supported") from exc


def _clip_without_empty_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx2torch reads Clip's optional min/max inputs as constants but fails on an empty
    input name (``torch.clamp(x, min=c)`` exports ``Clip(x, c, "")``): trailing empty inputs
    are dropped and an absent min before a given max becomes a -inf constant. Returns a
    patched copy, or the model itself when no Clip has an empty input."""
    if not any(n.op_type == "Clip" and "" in list(n.input)[1:] for n in model.graph.node):
        return model
    model = copy.deepcopy(model)
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Clip":
            continue
        inputs = list(node.input)
        while len(inputs) > 1 and inputs[-1] == "":
            inputs.pop()
        if len(inputs) == 3 and inputs[1] == "":
            inputs[1] = f"{node.name or 'Clip'}_{i}_no_min"
            model.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), inputs[1]))
        del node.input[:]
        node.input.extend(inputs)
    return model


def _relax_allowzero(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reshape ``allowzero=1`` (PyTorch >= 2.9 sets it) -> 0 unless the target shape is a
    constant containing a 0: the two only differ for a literal 0 in the shape (a computed
    shape has no 0 for a non-empty batch). onnx2torch refuses ``allowzero=1``."""
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = constants.get(node.input[1])
        if shape is not None and 0 in numpy_helper.to_array(shape).tolist():
            continue
        for attribute in node.attribute:
            if attribute.name == "allowzero":
                attribute.i = 0
    return model


def _describe(exc: BaseException, model: onnx.ModelProto) -> str:
    """Name the ONNX op (and nodes) behind an onnx2torch failure where possible."""
    text = _first_line(exc)
    if "OperationDescription(" in text:
        op = text.split("operation_type='", 1)[1].split("'", 1)[0]
        version = text.split("version=", 1)[1].split(")", 1)[0]
        nodes = [n.name or n.op_type for n in model.graph.node if n.op_type == op][:3]
        return f"onnx2torch has no converter for ONNX op {op} (opset {version}), node(s) {', '.join(nodes)}"
    return f"onnx2torch: {type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- input layout


def parse_image_shape(text: str | tuple | list | None) -> tuple[int, int, int] | None:
    """``"1x28x28"`` (or a 3-tuple) -> ``(1, 28, 28)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        parts = tuple(int(p) for p in (text.lower().split("x") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise RobnetError(f"--image-shape {text!r}: expected CxHxW with three positive integers, e.g. 1x28x28")
    return parts  # type: ignore[return-value]


def _is_nhwc(model: onnx.ModelProto, input_name: str, per_sample: tuple[int, ...]) -> bool:
    """True when the input ``[N, H, W, C]`` feeds only a Transpose to NCHW (tf2onnx/keras2onnx),
    or, for one channel, only a Reshape to ``[N, 1, H, W]`` (tf2onnx's form of that Transpose)."""
    consumers = [n for n in model.graph.node if input_name in n.input]
    if len(consumers) != 1:
        return False
    node = consumers[0]
    if node.op_type == "Transpose":
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None) == [0, 3, 1, 2]
    height, width, channels = per_sample
    if node.op_type == "Reshape" and channels == 1 and len(node.input) > 1:
        shape = next((numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[1]), None)
        return shape is not None and shape.shape == (4,) and tuple(int(s) for s in shape[1:]) == (1, height, width)
    return False


def _layout(model, path, value_info, image_shape) -> tuple[str, tuple[int, int, int], tuple[int, ...], nn.Module | None]:
    """(layout, image_shape, per-sample input shape, adapter image -> input or None)."""
    dims = _dims(value_info)
    name = value_info.name
    per_sample = dims[1:]
    if not dims or any(not isinstance(d, int) or d <= 0 for d in per_sample):
        shown = "x".join(str(d) if d is not None else "?" for d in dims) or "unknown"
        raise _fail(path, f"input {name!r} has shape [{shown}]; robnet-svc needs a batch axis "
                          "followed by fixed per-sample dimensions, e.g. [N,C,H,W]")
    per_sample = tuple(per_sample)
    # Files we exported say how their input holds the image (the exporter may have fused
    # the NHWC Transpose away, and a flat model's image shape is otherwise unknown).
    hints = {p.key: p.value for p in model.metadata_props}
    wanted = parse_image_shape(image_shape if image_shape is not None else hints.get(LAYOUT_KEYS["image_shape"]))
    shown = "x".join(map(str, per_sample))
    if len(per_sample) == 3:
        if _is_nhwc(model, name, per_sample) or hints.get(LAYOUT_KEYS["layout"]) == "NHWC":
            from onnx2torch.node_converters.transpose import OnnxTranspose

            height, width, channels = per_sample
            image = (channels, height, width)
            layout, adapter = "NHWC", OnnxTranspose(perm=[0, 2, 3, 1])
        else:
            image, layout, adapter = per_sample, "NCHW", None
        if wanted is not None and wanted != image:
            raise _fail(path, f"--image-shape {'x'.join(map(str, wanted))} does not match the model's "
                              f"image input {name!r} ({'x'.join(map(str, image))} as CxHxW); leave it out")
        return layout, image, per_sample, adapter
    size = int(np.prod(per_sample))
    if wanted is None:
        raise _fail(path, f"input {name!r} is flat [N,{shown}], not an image [N,C,H,W]; say how to view it "
                          f"as an image with --image-shape CxHxW (product must be {size}, e.g. 1x28x28 for 784)")
    if int(np.prod(wanted)) != size:
        raise _fail(path, f"--image-shape {'x'.join(map(str, wanted))} has {int(np.prod(wanted))} values but "
                          f"input {name!r} [N,{shown}] has {size} per sample")
    return "flat", wanted, per_sample, BatchReshape(per_sample)


def _prepend(gm: fx.GraphModule, adapter: nn.Module) -> None:
    """Make ``adapter`` the first node after the placeholder."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule(ADAPTER_NAME, adapter)
    with gm.graph.inserting_after(placeholder):
        first = gm.graph.call_module(ADAPTER_NAME, (placeholder,))
    placeholder.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)
    gm.recompile()


# --------------------------------------------------------------------------- onnxruntime


def ort_session(path_or_bytes: str | Path | bytes):
    """An onnxruntime session with an explicit provider list: CUDA only when torch sees a GPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers: list = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        # TF32 would cost ~1e-3 of accuracy: parity checks need full float32.
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    source = str(path_or_bytes) if isinstance(path_or_bytes, (str, Path)) else path_or_bytes
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def _ort_runner(session, fixed_batch: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``x [N, ...] -> [output [N, ...], ...]``; a model with a fixed batch size B is fed in
    zero-padded chunks of B."""
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        if fixed_batch is None:
            return session.run(None, {input_name: x})
        n = x.shape[0]
        padded = np.concatenate([x, np.zeros((-n % fixed_batch, *x.shape[1:]), x.dtype)])
        chunks = [session.run(None, {input_name: padded[i:i + fixed_batch]})
                  for i in range(0, len(padded), fixed_batch)]
        return [np.concatenate(outputs)[:n] for outputs in zip(*chunks)]

    return run


def _head_module(head: str | None) -> nn.Module:
    return {"Softmax": nn.Softmax(dim=1), "LogSoftmax": nn.LogSoftmax(dim=1), None: nn.Identity()}[head]


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _random_images(batch: int, image_shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *image_shape, generator=generator).to(dtype)


# --------------------------------------------------------------------------- import


def load_model(path: str | Path, image_shape: str | tuple | None = None, check_parity: bool = True) -> ImportedModel:
    """Import an ONNX classifier (see the module docstring); RobnetError on bad input."""
    path = Path(path)
    source, sha256 = read_onnx(path)
    input_info, output_info = _signature(source, path)
    layout, image, per_sample, adapter = _layout(source, path, input_info, image_shape)
    gm, model = _convert(source, path)
    if adapter is not None:
        _prepend(gm, adapter)

    input_dtype = helper.tensor_dtype_to_np_dtype(input_info.type.tensor_type.elem_type)
    output_dtype = helper.tensor_dtype_to_np_dtype(output_info.type.tensor_type.elem_type)
    torch_dtype = _torch_dtype(input_dtype)
    batch_dim = _dims(input_info)[0]
    fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    example = _random_images(fixed_batch or 2, image, torch_dtype, seed=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            normalize_graph(gm, example)
            with torch.no_grad():
                logits = gm(example)
    except RobnetError:
        raise
    except Exception as exc:
        raise _fail(path, f"the converted torch model does not run on a {list(example.shape)} input "
                          f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != example.shape[0]:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise _fail(path, f"output {output_info.name!r} is {shape} for a batch of {example.shape[0]}; "
                          "robnet-svc needs logits [N,K]")
    producer = f"{model.producer_name} {model.producer_version}".strip()
    imported = ImportedModel(
        path=path, sha256=sha256, onnx_model=model, module=gm,
        input_name=input_info.name, output_name=output_info.name,
        input_dtype=np.dtype(input_dtype), output_dtype=np.dtype(output_dtype),
        image_shape=image, input_shape=per_sample, num_classes=int(logits.shape[1]),
        head=gm.meta.get(HEAD_KEY), opset=default_opset(model), producer=producer, layout=layout,
        source_opset=default_opset(source) if model is not source else None,
    )
    if check_parity:
        imported.parity_max_abs_diff = _import_parity(imported, source, fixed_batch)
    return imported


def _import_parity(imported: ImportedModel, source: onnx.ModelProto, fixed_batch: int | None) -> float:
    """Compare the module with onnxruntime on the model as read; RobnetError above PARITY_ATOL.

    Both the model's output (module + head) and, when a head was stripped, the logits
    before it are compared: a saturated Softmax would hide differences in the logits.
    """
    path = imported.path
    reference = source  # the model as read, before any opset conversion
    logits_value = _logits_value(reference) if imported.head else None
    if logits_value is not None:
        reference = copy.deepcopy(reference)
        reference.graph.output.append(helper.make_tensor_value_info(
            logits_value, reference.graph.output[0].type.tensor_type.elem_type, None))
    try:
        session = ort_session(reference.SerializeToString())
    except Exception as exc:
        raise _fail(path, f"onnxruntime cannot load the model ({_first_line(exc)})") from exc
    run = _ort_runner(session, fixed_batch)
    head = _head_module(imported.head)
    adapter = dict(imported.module.named_children()).get(ADAPTER_NAME, nn.Identity())
    worst = 0.0
    for i, batch in enumerate(IMPORT_PARITY_BATCHES):
        images = _random_images(batch, imported.image_shape, _torch_dtype(imported.input_dtype), seed=1 + i)
        with torch.no_grad():
            logits = imported.module(images)
            expected = [head(logits).numpy(), logits.numpy()]
            onnx_input = adapter(images).numpy().astype(imported.input_dtype)
        try:
            got = run(onnx_input)
        except Exception as exc:
            raise _fail(path, f"onnxruntime cannot run the model at batch {batch} ({_first_line(exc)})") from exc
        diff = max(_max_abs_diff(g, e) for g, e in zip(got, expected))
        worst = max(worst, diff)
        if not diff <= PARITY_ATOL:
            raise _fail(path, f"the torch conversion differs from onnxruntime by {diff:.3g} at batch {batch} "
                              f"(allowed {PARITY_ATOL:g}); the model uses an op that onnx2torch converts wrongly")
    return worst


def _logits_value(model: onnx.ModelProto) -> str | None:
    """Name of the value that enters the final Softmax/LogSoftmax (through Identity/Dropout)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type in ("Identity", "Dropout"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return None
    return node.input[0]


# --------------------------------------------------------------------------- export


class _ExportWrapper(nn.Module):
    """ONNX input layout -> image -> logits module -> head, in the source's dtypes."""

    def __init__(self, module: nn.Module, source: ImportedModel):
        super().__init__()
        self.module = module
        self.to_image = BatchReshape(source.image_shape) if source.layout == "flat" else (
            _Permute((0, 3, 1, 2)) if source.layout == "NHWC" else nn.Identity())
        self.head = _head_module(source.head)
        self.output_dtype = _torch_dtype(source.output_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Casts only where the dtypes differ (the checks are Python-level: no Cast node otherwise).
        param = next(self.module.parameters(), None)
        image = self.to_image(x)
        if param is not None and image.dtype != param.dtype:
            image = image.to(param.dtype)
        out = self.head(self.module(image))
        return out if out.dtype == self.output_dtype else out.to(self.output_dtype)


class _Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def export_model(module: nn.Module, source: ImportedModel, out_path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``module`` (image ``[N, *source.image_shape]`` -> logits ``[N, K]``) as ONNX.

    The file has the source's input layout, head, input/output names and dtypes, a dynamic
    batch axis, opset ``max(17, source opset)``, ``metadata`` plus robnet-svc provenance in
    ``metadata_props``; it passes ``onnx.checker`` and matches the torch model in
    onnxruntime at batch 1 and 7 (max abs diff <= 1e-4) before it appears at ``out_path``
    (written to a temporary name in the same directory, then renamed).
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise _fail(out_path.parent, "output directory does not exist")
    wrapper = _ExportWrapper(copy.deepcopy(module).cpu().eval(), source).eval()
    torch_dtype = _torch_dtype(source.input_dtype)
    example = torch.zeros(2, *source.input_shape, dtype=torch_dtype)
    opset = max(EXPORT_OPSET, source.opset)
    try:
        with atomic_path(out_path) as tmp:
            with warnings.catch_warnings():
                # The TorchScript-based exporter is deprecated in favour of dynamo, which cannot
                # export onnx2torch's Reshape modules; its warnings are expected here.
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[_EXPORT_INPUT], output_names=[_EXPORT_OUTPUT],
                    dynamic_axes={_EXPORT_INPUT: {0: "batch"}, _EXPORT_OUTPUT: {0: "batch"}},
                    do_constant_folding=True,
                )
            exported = onnx.load(str(tmp))
            # TorchScript refuses names such as '12' (common in old exports): rename afterwards.
            _rename_value(exported.graph, _EXPORT_INPUT, source.input_name)
            _rename_value(exported.graph, _EXPORT_OUTPUT, source.output_name)
            exported.producer_name, exported.producer_version = "robnet-svc", __version__
            props = {"robnet_svc.version": __version__, "robnet_svc.source_sha256": source.sha256,
                     "robnet_svc.source_file": source.path.name,
                     LAYOUT_KEYS["layout"]: source.layout, LAYOUT_KEYS["image_shape"]: "x".join(map(str, source.image_shape)),
                     **{str(k): str(v) for k, v in metadata.items()}}
            helper.set_model_props(exported, props)
            onnx.checker.check_model(exported)
            onnx.save(exported, str(tmp))
            _export_parity(tmp, wrapper, source)
    except RobnetError:
        raise
    except Exception as exc:
        raise _fail(out_path, f"ONNX export failed ({type(exc).__name__}: {_first_line(exc)})") from exc


_EXPORT_INPUT, _EXPORT_OUTPUT = "robnet_svc_input", "robnet_svc_output"


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value ``old`` to ``new`` everywhere in ``graph`` (moving a clash out of the way)."""
    if old == new:
        return
    names = {v for n in graph.node for v in (*n.input, *n.output)} | {t.name for t in graph.initializer}
    if new in names:
        _rename_value(graph, new, f"{new}__renamed")
    for node in graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new


def _export_parity(tmp: Path, wrapper: nn.Module, source: ImportedModel) -> None:
    session = ort_session(tmp)
    torch_dtype = _torch_dtype(source.input_dtype)
    for i, batch in enumerate(EXPORT_PARITY_BATCHES):
        x = _random_images(batch, source.input_shape, torch_dtype, seed=100 + i)
        with torch.no_grad():
            expected = wrapper(x).numpy()
        got = session.run(None, {source.input_name: x.numpy()})[0]
        diff = _max_abs_diff(got, expected)
        if not diff <= PARITY_ATOL:
            raise RobnetError(f"{tmp.name}: exported model differs from the torch model by {diff:.3g} in "
                              f"onnxruntime at batch {batch} (allowed {PARITY_ATOL:g}); nothing written")


# --------------------------------------------------------------------------- inspect


def inspect_model(path: str | Path, image_shape: str | tuple | None = None) -> dict[str, Any]:
    """JSON-ready pre-flight report: signature, opset, producer, parameters, ops, engine support."""
    imported = load_model(path, image_shape=image_shape)
    model = imported.onnx_model
    source_ops = Counter(n.op_type for n in model.graph.node)
    inputs, outputs = _graph_inputs(model), list(model.graph.output)
    return {
        "file": str(imported.path),
        "sha256": imported.sha256,
        "producer": imported.producer,
        "ir_version": int(model.ir_version),
        "opset": imported.source_opset or imported.opset,
        "opset_imports": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "converted_at_opset": imported.opset if imported.source_opset else None,
        "inputs": [_value_report(v) for v in inputs],
        "outputs": [_value_report(v) for v in outputs],
        "input_layout": imported.layout,
        "image_shape": list(imported.image_shape),
        "num_classes": imported.num_classes,
        "head": imported.head,
        "parameters": _parameter_count(model),
        "op_types": dict(sorted(source_ops.items())),
        "parity_max_abs_diff": imported.parity_max_abs_diff,
        "engine": engine_support(imported),
    }


def _value_report(v: onnx.ValueInfoProto) -> dict[str, Any]:
    elem = v.type.tensor_type.elem_type
    return {"name": v.name, "shape": _dims(v), "dtype": onnx.TensorProto.DataType.Name(elem).lower()}


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

    def shape(dims: list) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"

    lines = [f"model        {report['file']}",
             f"sha256       {report['sha256']}",
             f"producer     {report['producer'] or 'unknown'} (IR {report['ir_version']})",
             f"opset        {report['opset']}" + (f" (converted at opset {report['converted_at_opset']})"
                                                   if report.get("converted_at_opset") else "")]
    for v in report["inputs"]:
        lines.append(f"input        {v['name']} {shape(v['shape'])} {v['dtype']}")
    for v in report["outputs"]:
        lines.append(f"output       {v['name']} {shape(v['shape'])} {v['dtype']}")
    lines += [f"image        {'x'.join(map(str, report['image_shape']))} (CxHxW; input layout {report['input_layout']})",
              f"classes      {report['num_classes']}" + (f" (trailing {report['head']} stripped for certification)"
                                                          if report["head"] else ""),
              f"parameters   {report['parameters']:,}",
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
