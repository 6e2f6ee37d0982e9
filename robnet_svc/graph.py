"""Compatibility shim: the import normaliser moved to ``robnet_svc.onnx_io.normalize``."""

from robnet_svc.onnx_io.normalize import HEAD_KEY, BatchReshape, normalize_graph  # noqa: F401
