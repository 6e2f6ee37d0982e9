"""The benchmark networks: the product's own definitions, never copies of them.

- DM-small / DM-medium / DM-large: ``robnet_svc.models`` (SPEC §10; counts asserted).
- MRI-32 / MRI-64: the MRI CNN of ``benchmarks/reproduce_mri.py`` at 1×32×32 and 1×64×64
  (the network the MRI experiment trains; issue 20 measures full CROWN on MRI-32).
- tiny: ``robnet_svc.models.tiny_cnn`` at 1×8×8, 3 classes (the smoke test: seconds).
- resnet18, efficientnet_b0 (``--real``): torchvision classifiers at 3×64×64, exported to
  ONNX and imported the way ``robnet-svc`` imports a user's model (``onnx_io.load_model``),
  so they exercise the op rules a real import needs (MaxPool, residual Add, SiLU, the
  squeeze-and-excitation product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    """A benchmark network: builder, input shape ``(C, H, W)``, classes, and the counts to check."""

    name: str
    builder: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    params: int | None  # exact parameter count (SPEC §10), None: ``params_approx`` or unchecked
    relus: int | None  # ReLU outputs per sample (Sequential networks), None: unchecked
    params_approx: float | None = None  # millions, rounded to one decimal (DM-large: 17.2)
    gpu_only: bool = False  # too slow for the default CPU run

    def build(self) -> nn.Module:
        model = self.builder()
        check_counts(self, model)
        return model


def _reference(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from robnet_svc.models import REFERENCE_MODELS

        return REFERENCE_MODELS[name]()
    return build


def _mri(size: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from benchmarks.reproduce_mri import mri_network

        return mri_network(size)
    return build


def _tiny() -> nn.Module:
    from robnet_svc.models import tiny_cnn

    return tiny_cnn(in_channels=1, num_classes=3, image_size=8, width=2)


def _imported(name: str, shape: tuple[int, int, int], classes: int) -> Callable[[], nn.Module]:
    """A torchvision classifier with seeded random weights, through ONNX and the product's importer."""
    def build() -> nn.Module:
        import tempfile
        import warnings
        from pathlib import Path

        import torchvision

        from robnet_svc.models import export_onnx
        from robnet_svc.onnx_io.load import load_model

        model = getattr(torchvision.models, name)(weights=None, num_classes=classes).eval()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_onnx(model, shape, Path(tmp) / f"{name}.onnx")
            return load_model(path).module
    return build


NETWORKS: dict[str, NetworkSpec] = {
    "DM-small": NetworkSpec("DM-small", _reference("dm-small"), (3, 32, 32), 10, params=214_918, relus=6_244),
    "DM-medium": NetworkSpec("DM-medium", _reference("dm-medium"), (3, 32, 32), 10, params=2_466_858,
                             relus=62_464),
    "DM-large": NetworkSpec("DM-large", _reference("dm-large"), (3, 32, 32), 10, params=None, relus=229_888,
                            params_approx=17.2, gpu_only=True),
    "MRI-32": NetworkSpec("MRI-32", _mri(32), (1, 32, 32), 4, params=173_044, relus=7_296),
    "MRI-64": NetworkSpec("MRI-64", _mri(64), (1, 64, 64), 4, params=566_260, relus=28_800),
    "tiny": NetworkSpec("tiny", _tiny, (1, 8, 8), 3, params=4_507, relus=256),
    "resnet18": NetworkSpec("resnet18", _imported("resnet18", (3, 64, 64), 10), (3, 64, 64), 10,
                            params=None, relus=None, params_approx=11.2),
    "efficientnet_b0": NetworkSpec("efficientnet_b0", _imported("efficientnet_b0", (3, 64, 64), 10), (3, 64, 64),
                                   10, params=None, relus=None, params_approx=4.0),
}
#: the real architectures of ``--real`` (batch 32 by default)
REAL_NETWORKS = ("resnet18", "efficientnet_b0")


def count_relus(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Number of ReLU outputs for one input of ``input_shape`` (shape walk, no data needed)."""
    import torch

    total = 0
    x = torch.zeros(1, *input_shape)
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                total += x[0].numel()
    return total


def check_counts(spec: NetworkSpec, model: nn.Module) -> None:
    """Assert the parameter and ReLU counts (a wrong network benchmarks nothing)."""
    params = sum(p.numel() for p in model.parameters())
    if spec.params is not None:
        assert params == spec.params, f"{spec.name}: {params} parameters, expected {spec.params}"
    elif spec.params_approx is not None:
        assert round(params / 1e6, 1) == spec.params_approx, \
            f"{spec.name}: {params} parameters, expected {spec.params_approx} M"
    if spec.relus is not None:
        relus = count_relus(model, spec.input_shape)
        assert relus == spec.relus, f"{spec.name}: {relus} ReLUs, expected {spec.relus}"
