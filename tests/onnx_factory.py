"""Small torch classifiers exported to real ONNX files, for tests.

API (other tests import it):

* ``MODELS``: name -> ``Spec`` (builder, per-sample input shape, export batch). Names:
  ``mlp`` (Flatten + Linear on 1x8x8 images), ``cnn_bn`` (Conv + ReLU + BatchNorm, kept as a node),
  ``residual`` (a residual Add), ``avgpool`` (AvgPool + GlobalAvgPool), ``normalized``
  (``(x - mean) / std`` in front), ``softmax`` (Softmax at the end), ``logsoftmax``,
  ``fixed_batch`` (exported at batch 10, ``x.reshape(10, -1)``: the batch baked in),
  ``shape_flatten`` (``x.view(x.size(0), -1)``: Shape/Gather/Concat/Reshape),
  ``matmul_add`` (``x @ W + b`` instead of Gemm), ``flat_mlp`` (flat input ``[N, 64]``).
* ``build(name, directory, **export_kwargs) -> Path``: export ``MODELS[name]`` to
  ``directory/<name>.onnx``.
* ``export(model, path, input_shape, *, batch=None, ...) -> Path``: export any torch module
  (``batch=None``: dynamic batch axis; an int: that fixed batch size).
* ``write_graph(path, nodes, inputs, outputs, initializers=()) -> Path``: a hand-made ONNX
  graph (``onnx.helper``) for inputs torch cannot produce (bad models).

Every model is seeded (same weights on every call) and small (exports in well under a second).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

IMAGE = (1, 8, 8)


@dataclass(frozen=True)
class Spec:
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...] = IMAGE
    batch: int | None = None  # None: dynamic batch axis; else exported at this fixed batch


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.25]).view(1, 1, 1, 1))
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block(x))


class _Reshaped(nn.Module):
    """Flattens with ``x.reshape(batch, -1)`` (fixed) or ``x.view(x.size(0), -1)`` (from Shape)."""

    def __init__(self, batch: int | None):
        super().__init__()
        self.batch = batch
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        x = self.conv(x)
        x = x.reshape(self.batch, -1) if self.batch else x.view(x.size(0), -1)
        return self.fc(x)


class _MatMulAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(64, 16) / 8), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 10) / 4), nn.Parameter(torch.randn(10))

    def forward(self, x):
        x = torch.flatten(x, 1)
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def _cnn_bn() -> nn.Module:
    # BatchNorm after the ReLU: the exporter cannot fold it into the Conv, so it stays a node.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    bn = model[2]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return model


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


MODELS: dict[str, Spec] = {
    "mlp": Spec(_mlp),
    "cnn_bn": Spec(_cnn_bn),
    "residual": Spec(_Residual),
    "avgpool": Spec(lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                          nn.Conv2d(4, 10, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())),
    "normalized": Spec(_Normalized),
    "softmax": Spec(lambda: nn.Sequential(_mlp(), nn.Softmax(dim=1))),
    "logsoftmax": Spec(lambda: nn.Sequential(_mlp(), nn.LogSoftmax(dim=1))),
    "fixed_batch": Spec(lambda: _Reshaped(batch=10), batch=10),
    "shape_flatten": Spec(lambda: _Reshaped(batch=None)),
    "matmul_add": Spec(_MatMulAdd),
    "flat_mlp": Spec(lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), input_shape=(64,)),
}


def make_model(name: str) -> nn.Module:
    """The seeded torch model behind ``MODELS[name]``, in eval mode."""
    torch.manual_seed(0)
    return MODELS[name].make().eval()


def build(name: str, directory: str | Path, **export_kwargs) -> Path:
    """Export ``MODELS[name]`` to ``directory/<name>.onnx`` and return the path."""
    spec = MODELS[name]
    export_kwargs.setdefault("batch", spec.batch)
    return export(make_model(name), Path(directory) / f"{name}.onnx", spec.input_shape, **export_kwargs)


def export(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], *, batch: int | None = None,
           opset: int = 17, input_name: str = "input", output_name: str = "logits") -> Path:
    """Export ``model`` (input ``[N, *input_shape]``) with torch's legacy exporter."""
    path = Path(path)
    example = torch.rand(batch or 2, *input_shape)
    dynamic = None if batch else {input_name: {0: "batch"}, output_name: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name], dynamic_axes=dynamic)
    return path


def write_graph(path: str | Path, nodes, inputs, outputs, initializers=(), opset: int = 17) -> Path:
    """Save a hand-made graph: ``nodes`` from ``onnx.helper.make_node``, ``inputs``/``outputs``
    from ``onnx.helper.make_tensor_value_info``, ``initializers`` from ``numpy_helper.from_array``."""
    graph = onnx.helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)
