"""ONNX in and out, one file per step:

* ``read.py``: read and check the file, find its one input and one output;
* ``lower.py`` + ``converters.py`` + ``convert.py``: exact rewrites, onnx2torch with the
  converters it lacks (registered in its own registry), every node pre-checked;
* ``normalize.py``: the normalised graph the bound engine reads (see its docstring);
* ``layout.py``: how the ONNX input holds the image (NCHW, NHWC, flat);
* ``parity.py``: onnxruntime vs torch, tolerance relative to the output's scale;
* ``load.py``: the import pipeline (``load_model``);
* ``export.py``: writing a torch model back to ONNX (``export_model``);
* ``inspection.py``: ``robnet-svc inspect`` (``inspect_model``, ``format_inspection``).
"""

from robnet_svc.onnx_io.base import (ADAPTER_NAME, EXPORT_OPSET, LAYOUT_KEYS, PARITY_ATOL, PARITY_RTOL, UPGRADE_OPSET,
                                     ImportedModel, default_opset)
from robnet_svc.onnx_io.convert import convert_model, unconvertible
from robnet_svc.onnx_io.export import export_model
from robnet_svc.onnx_io.inspection import engine_support, format_inspection, inspect_model
from robnet_svc.onnx_io.layout import parse_image_shape
from robnet_svc.onnx_io.load import load_model
from robnet_svc.onnx_io.normalize import HEAD_KEY, BatchReshape, normalize_graph
from robnet_svc.onnx_io.parity import ort_session
from robnet_svc.onnx_io.read import read_onnx

__all__ = ["ADAPTER_NAME", "EXPORT_OPSET", "HEAD_KEY", "LAYOUT_KEYS", "PARITY_ATOL", "PARITY_RTOL", "UPGRADE_OPSET",
           "BatchReshape", "ImportedModel", "convert_model", "default_opset", "engine_support", "export_model",
           "format_inspection", "inspect_model", "load_model", "normalize_graph", "ort_session", "parse_image_shape",
           "read_onnx", "unconvertible"]
