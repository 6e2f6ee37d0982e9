"""What every import/export step shares: the ``ImportedModel`` record, the constants of the
checks, and small helpers (error lines, dtypes, random test images)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx, nn

from robnet_svc.errors import RobnetError

EXPORT_OPSET = 17        # legacy exporter; onnx2torch reads it back
UPGRADE_OPSET = 17       # target of onnx.version_converter when a converter is missing
# Parity, onnxruntime vs torch: |got - expected| <= PARITY_ATOL + PARITY_RTOL * max|expected|.
# Relative to the output's scale: float32 sums of different order differ by ~1e-6 relative,
# so a ResNet-50 with logits ~100 legitimately differs by ~1e-4 absolute.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5
IMPORT_PARITY_BATCHES = (1, 7)
EXPORT_PARITY_BATCHES = (1, 7)
ADAPTER_NAME = "image_to_input"  # first module of the graph: image [N,C,H,W] -> ONNX input layout
# metadata_props of exported files that load_model reads back
LAYOUT_KEYS = {"layout": "robnet_svc.input_layout", "image_shape": "robnet_svc.image_shape"}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass
class ImportedModel:
    """An ONNX classifier converted to torch, normalised and checked against onnxruntime."""

    path: Path
    sha256: str                       # of the file as given (compressed bytes for .onnx.gz)
    onnx_model: onnx.ModelProto       # as converted (after lowering / an opset change if one was needed)
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
    source_opset: int | None = None    # opset of the file when it was converted to another, else None
    parity_max_abs_diff: float = 0.0   # measured at import
    lowered: tuple[str, ...] = ()      # what was rewritten before conversion (one phrase each)


def fail(path: Path | str, problem: str) -> RobnetError:
    """The one-line error for ``path``."""
    return RobnetError(f"{path}: {problem}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, whitespace-collapsed and capped."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:300]


def dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """A value's shape: ints, symbolic names, or None for unknown dimensions."""
    out: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or None)
    return out


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old exporters list weights as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def head_module(head: str | None) -> nn.Module:
    return {"Softmax": nn.Softmax(dim=1), "LogSoftmax": nn.LogSoftmax(dim=1), None: nn.Identity()}[head]


def torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def random_images(batch: int, image_shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *image_shape, generator=generator).to(dtype)
