"""Image classifiers as users bring them, and the exporters users export them with, for the
import tests (``tests/test_import_zoo.py``) and the full matrix
(``benchmarks/import_matrix.py``).

* ``HANDWRITTEN``: small CNNs, one per op kind (MaxPool, Sigmoid, Tanh, LeakyReLU, ELU, GELU,
  ReLU6, Hardswish, Concat, Upsample, LayerNorm, Dropout, Softmax / LogSoftmax head);
* ``ZOO``: torchvision and MONAI architectures (``monai`` is a dev dependency; MONAI rows are
  absent without it). Widths are reduced where the builder allows it (MobileNet
  ``width_mult``, MONAI ``init_features``/``growth_rate``, VGG's classifier hidden size) to keep
  exports fast; depth and op kinds are the architecture's own;
* ``EXPORTERS``: the legacy TorchScript exporter at opset 13 and 17 (dynamic batch axis) and
  the dynamo exporter at its default opset and at 17 (exported at batch 1, as
  ``torch.onnx.export(model, (x,), path, dynamo=True)`` does without ``dynamic_shapes``).

``build(name, channels, classes)`` makes a seeded model in eval mode; ``export(model, path,
exporter, image_shape)`` writes the ONNX file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGE_SIZE = 64
CLASSES = 4


class _Cnn(nn.Module):
    """conv -> ``block`` -> strided conv -> ReLU -> flatten -> linear (-> ``head``)."""

    def __init__(self, channels: int, classes: int, block: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.stem = nn.Conv2d(channels, 8, 3, padding=1)
        self.block = block
        self.reduce = nn.Sequential(nn.Conv2d(8, 8, 4, stride=4), nn.ReLU(), nn.Flatten())
        self.fc = nn.LazyLinear(classes)
        self.head = head if head is not None else nn.Identity()

    def forward(self, x):
        return self.head(self.fc(self.reduce(self.block(self.stem(x)))))


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.relu(torch.cat([self.a(x), self.b(x)], dim=1))


class _LayerNormHead(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 4, stride=4), nn.ReLU(), nn.Flatten())
        self.mlp = nn.Sequential(nn.LazyLinear(32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.mlp(self.features(x))


def _handwritten(kind: str) -> Callable[[int, int], nn.Module]:
    blocks: dict[str, Callable[[], nn.Module]] = {
        "MaxPool": lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Upsample(scale_factor=2)),
        "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "LeakyReLU": lambda: nn.LeakyReLU(0.1), "ELU": nn.ELU,
        "GELU": nn.GELU, "ReLU6": nn.ReLU6, "Hardswish": nn.Hardswish, "Concat": _Concat,
        "Upsample": lambda: nn.Sequential(nn.ReLU(), nn.AvgPool2d(2), nn.Upsample(scale_factor=2, mode="nearest")),
        "Dropout": lambda: nn.Sequential(nn.ReLU(), nn.Dropout(0.3)),
    }
    if kind == "LayerNorm":
        return _LayerNormHead
    if kind in ("Softmax", "LogSoftmax"):
        head = nn.Softmax(dim=1) if kind == "Softmax" else nn.LogSoftmax(dim=1)
        return lambda c, k: _Cnn(c, k, nn.ReLU(), head)
    return lambda c, k: _Cnn(c, k, blocks[kind]())


HANDWRITTEN = {f"cnn_{kind.lower()}": _handwritten(kind) for kind in (
    "MaxPool", "Sigmoid", "Tanh", "LeakyReLU", "ELU", "GELU", "ReLU6", "Hardswish", "Concat", "Upsample",
    "LayerNorm", "Dropout", "Softmax", "LogSoftmax")}


def _first_conv_to(model: nn.Module, channels: int) -> nn.Module:
    """Replace the first Conv2d by one reading ``channels`` input channels (torchvision models
    take 3)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels:
                    setattr(parent, name, nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride,
                                                    child.padding, child.dilation, child.groups, child.bias is not None))
                return model
    return model


def _torchvision(name: str, **kwargs) -> Callable[[int, int], nn.Module]:
    def make(channels: int, classes: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=classes, **kwargs)
        if name == "vgg11_bn":  # the 25088x4096 hidden layer is 400 MB: a narrower one, same ops
            model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
                                             nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, classes))
        return _first_conv_to(model, channels)

    return make


def _monai(name: str) -> Callable[[int, int], nn.Module]:
    def make(channels: int, classes: int) -> nn.Module:
        from monai.networks import nets

        if name == "monai_densenet121":
            return nets.DenseNet121(spatial_dims=2, in_channels=channels, out_channels=classes,
                                    init_features=16, growth_rate=8)
        return nets.Classifier(in_shape=(channels, IMAGE_SIZE, IMAGE_SIZE), classes=classes,
                               channels=(8, 16, 32), strides=(2, 2, 2))

    return make


ZOO: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v2": _torchvision("mobilenet_v2", width_mult=0.25),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", width_mult=0.25),
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "vgg11_bn": _torchvision("vgg11_bn"),
    "densenet121": _torchvision("densenet121"),
    "squeezenet1_1": _torchvision("squeezenet1_1"),
    "shufflenet_v2_x0_5": _torchvision("shufflenet_v2_x0_5"),
    "regnet_y_400mf": _torchvision("regnet_y_400mf"),
    "convnext_tiny": _torchvision("convnext_tiny"),
    "monai_densenet121": _monai("monai_densenet121"),
    "monai_classifier": _monai("monai_classifier"),
}

MODELS = {**ZOO, **HANDWRITTEN}

# exporter -> (dynamo?, opset or None for the exporter's default)
EXPORTERS = {"legacy-13": (False, 13), "legacy-17": (False, 17), "dynamo": (True, None), "dynamo-17": (True, 17)}


def build(name: str, channels: int, classes: int = CLASSES) -> nn.Module:
    """``MODELS[name]`` for ``channels`` x 64 x 64 images, seeded, in eval mode, lazy layers built."""
    torch.manual_seed(0)
    model = MODELS[name](channels, classes)
    with torch.no_grad():
        model.eval()(torch.zeros(1, channels, IMAGE_SIZE, IMAGE_SIZE))
    return model.eval()


def export(model: nn.Module, path: str | Path, exporter: str, image_shape: tuple[int, int, int]) -> Path:
    """Write ``model`` with ``EXPORTERS[exporter]`` the way a user would; returns ``path``."""
    dynamo, opset = EXPORTERS[exporter]
    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            kwargs = {} if opset is None else {"opset_version": opset}
            program = torch.onnx.export(model, (torch.rand(1, *image_shape),), dynamo=True, verbose=False, **kwargs)
            program.save(str(path))
        else:
            torch.onnx.export(model, (torch.rand(2, *image_shape),), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path
