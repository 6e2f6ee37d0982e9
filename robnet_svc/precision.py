"""Full float32 arithmetic for bounds and certification: no TF32, no bfloat16 shortcuts.

PyTorch may compute float32 matrix products and convolutions in reduced precision: TF32
(10-bit mantissa) on CUDA — cuDNN convolutions do so by default — and bfloat16 in oneDNN on
CPU when ``torch.set_float32_matmul_precision("medium")`` is in force. A bound computed that
way is not a bound of the float32 network, and a certificate's forward passes (prediction,
attack) would not be those of the deployed model. ``full_precision()`` switches every such
setting to IEEE arithmetic for the duration of a ``with`` block and restores the caller's
settings afterwards, also when the block raises.

Both APIs are handled: the per-backend ``fp32_precision`` attributes (PyTorch >= 2.9; mixing
them with the legacy flags makes the legacy getters raise, so only the new ones are touched
where they exist) and, on older versions, ``allow_tf32`` plus the matmul precision.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


#: The backends with their own ``fp32_precision`` setting (PyTorch >= 2.9).
BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _precision_backends() -> dict[str, object]:
    """Name -> backend object of each of ``BACKENDS`` this PyTorch has (empty before 2.9)."""
    found = {}
    for name in BACKENDS:
        obj = torch.backends
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found[name] = obj
    return found


def precision_settings() -> dict[str, object]:
    """The current settings: matmul precision and each backend's fp32 mode (or the legacy TF32 flags)."""
    settings: dict[str, object] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    backends = _precision_backends()
    for name, backend in backends.items():
        settings[name] = backend.fp32_precision
    if not backends:
        settings["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        settings["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    return settings


def is_full_precision() -> bool:
    """True when no float32 matrix product or convolution may use reduced precision."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backends = _precision_backends()
    if backends:
        return all(b.fp32_precision == "ieee" for b in backends.values())
    return not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@contextmanager
def full_precision() -> Iterator[None]:
    """IEEE float32 matrix products and convolutions inside the block; the caller's settings after."""
    matmul = torch.get_float32_matmul_precision()
    backends = list(_precision_backends().values())
    saved = [b.fp32_precision for b in backends]
    legacy = None if backends else (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        for backend in backends:
            backend.fp32_precision = "ieee"
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)  # first: it also writes the matmul backends' settings
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
