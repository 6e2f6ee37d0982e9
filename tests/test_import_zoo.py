"""Models as users export them (``tests/model_zoo.py``) import with onnxruntime parity, and
``inspect`` prints the bound engine's verdict.

The default suite keeps to a few seconds per case: every hand-written CNN of the zoo with the
legacy exporter (opset 13, 1x64x64 and 3x64x64 alternately), one hand-written CNN with many op
kinds through the dynamo exporter at its default opset and at ``opset_version=17``, and one
torchvision network per exporter. The whole matrix (every zoo model x exporter x shape) is
``python -m benchmarks.import_matrix`` (tens of minutes; it prints the table).
Which ops the engine supports is another concern (op rules): here only that a verdict is
printed.
"""

from __future__ import annotations

import pytest
import torch

import model_zoo
from robnet_svc.onnx_io import export_model, format_inspection, inspect_model, load_model


def _inspect(path):
    report = inspect_model(path)
    text = format_inspection(report)
    verdict = [line for line in text.splitlines() if line.startswith("engine")]
    assert len(verdict) == 1 and ("every op is supported" in verdict[0] or "NOT supported" in verdict[0])
    assert report["num_classes"] == model_zoo.CLASSES
    return report


@pytest.mark.parametrize("index, name", list(enumerate(model_zoo.HANDWRITTEN)))
def test_handwritten_cnn_legacy_exporter(index, name, tmp_path):
    channels = 1 if index % 2 == 0 else 3
    model = model_zoo.build(name, channels)
    path = model_zoo.export(model, tmp_path / f"{name}.onnx", "legacy-13", (channels, 64, 64))
    report = _inspect(path)
    assert report["image_shape"] == [channels, 64, 64]
    if name in ("cnn_softmax", "cnn_logsoftmax"):
        assert report["head"] == name[4:].replace("log", "Log").replace("softmax", "Softmax")


class _ManyOps(torch.nn.Module):
    """One small net with the op kinds the dynamo exporter writes differently from the legacy one
    (Gelu 20, ReduceMean 18 with axes as input, Reshape allowzero=1, Split 18, Resize 18+)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.head = torch.nn.Linear(8, model_zoo.CLASSES)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.norm(self.stem(x)))
        a, b = torch.split(x, 4, dim=1)
        x = torch.cat([torch.nn.functional.hardswish(a), torch.relu(b)], dim=1)
        x = torch.nn.functional.max_pool2d(self.up(x), 2)
        return torch.log_softmax(self.head(x.mean(dim=(2, 3))), dim=1)


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo-17"])
def test_dynamo_exporter(exporter, tmp_path):
    torch.manual_seed(0)
    path = model_zoo.export(_ManyOps().eval(), tmp_path / "many.onnx", exporter, (1, 64, 64))
    report = _inspect(path)
    assert report["opset"] >= 18  # the dynamo exporter writes opset 18+ even when asked for 17
    assert report["head"] == "LogSoftmax"
    # what harden does with it: export (parity-checked) and import again (parity-checked)
    imported = load_model(path)
    export_model(imported.module, imported, tmp_path / "robust.onnx", {})
    again = load_model(tmp_path / "robust.onnx")
    assert (again.head, again.num_classes, again.image_shape) == ("LogSoftmax", model_zoo.CLASSES, (1, 64, 64))


@pytest.mark.parametrize("exporter", list(model_zoo.EXPORTERS))
def test_one_torchvision_network_per_exporter(exporter, tmp_path):
    """squeezenet1_1 (the cheapest to export): Fire modules (Concat), MaxPool with ceil_mode,
    Dropout, adaptive average pooling (ReduceMean or GlobalAveragePool), Flatten or Reshape."""
    model = model_zoo.build("squeezenet1_1", 3)
    _inspect(model_zoo.export(model, tmp_path / "squeezenet.onnx", exporter, (3, 64, 64)))
