"""The benchmark networks: SPEC §10 reference networks and an MRI-shaped CNN.

Every network is a plain ``nn.Sequential`` classifier (logits out, ReLU after every layer
but the last), exactly what ``onnx2torch`` hands the engine for the CROWN-IBP model
definitions. Parameter and ReLU counts are asserted against SPEC §10 when built.

The DM networks come from ``robnet_svc.models`` when it defines them (so the benchmark
measures the product's networks); the local definitions are the fallback, and the count
check applies to either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    """A benchmark network: builder, input shape ``(C, H, W)``, classes, and the counts to check."""

    name: str
    build_local: Callable[[], nn.Sequential]
    input_shape: tuple[int, int, int]
    num_classes: int
    params: int | None  # exact parameter count (SPEC §10), None: checked by ``params_approx``
    relus: int
    params_approx: float | None = None  # millions, rounded to one decimal (DM-large: 17.2)
    gpu_only: bool = False  # too slow for the default CPU run

    def build(self) -> nn.Sequential:
        model = _from_product(self.name) or self.build_local()
        check_counts(self, model)
        return model


def _conv(cin: int, cout: int, k: int, s: int, p: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=s, padding=p), nn.ReLU()]


def _fc(fin: int, fout: int, relu: bool = True) -> list[nn.Module]:
    return [nn.Linear(fin, fout)] + ([nn.ReLU()] if relu else [])


def dm_small() -> nn.Sequential:
    """Conv(3→16,k4,s2,p1) → Conv(16→32,k4,s2,p1) → FC(2048→100) → FC(100→10)."""
    return nn.Sequential(*_conv(3, 16, 4, 2, 1), *_conv(16, 32, 4, 2, 1), nn.Flatten(),
                         *_fc(2048, 100), *_fc(100, 10, relu=False))


def dm_medium() -> nn.Sequential:
    """Conv(3→32,k3,s1,p1) → Conv(32→32,k4,s2,p1) → Conv(32→64,k3,s1,p1) →
    Conv(64→64,k4,s2,p1) → FC(4096→512) → FC(512→512) → FC(512→10)."""
    return nn.Sequential(*_conv(3, 32, 3, 1, 1), *_conv(32, 32, 4, 2, 1), *_conv(32, 64, 3, 1, 1),
                         *_conv(64, 64, 4, 2, 1), nn.Flatten(),
                         *_fc(4096, 512), *_fc(512, 512), *_fc(512, 10, relu=False))


def dm_large() -> nn.Sequential:
    """Conv(3→64,k3,s1,p1) → Conv(64→64,k3,s1,p1) → Conv(64→128,k3,s2,p1) →
    Conv(128→128,k3,s1,p1) ×2 → FC(32768→512) → FC(512→10)."""
    return nn.Sequential(*_conv(3, 64, 3, 1, 1), *_conv(64, 64, 3, 1, 1), *_conv(64, 128, 3, 2, 1),
                         *_conv(128, 128, 3, 1, 1), *_conv(128, 128, 3, 1, 1), nn.Flatten(),
                         *_fc(32768, 512), *_fc(512, 10, relu=False))


def mri_cnn() -> nn.Sequential:
    """MRI-shaped CNN (ours, not from the paper): 1×64×64 grey slices, 4 tumour classes.

    Conv(1→16,k4,s2,p1) → Conv(16→32,k4,s2,p1) → Conv(32→64,k4,s2,p1) → FC(4096→128) → FC(128→4):
    the DM-small pattern with one more stride-2 stage for the larger image.
    """
    return nn.Sequential(*_conv(1, 16, 4, 2, 1), *_conv(16, 32, 4, 2, 1), *_conv(32, 64, 4, 2, 1),
                         nn.Flatten(), *_fc(4096, 128), *_fc(128, 4, relu=False))


def tiny() -> nn.Sequential:
    """A miniature CNN (1×8×8, 3 classes) for the smoke test: seconds, not minutes."""
    return nn.Sequential(*_conv(1, 4, 4, 2, 1), nn.Flatten(), *_fc(64, 8), *_fc(8, 3, relu=False))


NETWORKS: dict[str, NetworkSpec] = {
    "DM-small": NetworkSpec("DM-small", dm_small, (3, 32, 32), 10, params=214_918, relus=6_244),
    "DM-medium": NetworkSpec("DM-medium", dm_medium, (3, 32, 32), 10, params=2_466_858, relus=62_464),
    "DM-large": NetworkSpec("DM-large", dm_large, (3, 32, 32), 10, params=None, relus=229_888,
                            params_approx=17.2, gpu_only=True),
    "MRI-64": NetworkSpec("MRI-64", mri_cnn, (1, 64, 64), 4, params=566_260, relus=28_800),
    "tiny": NetworkSpec("tiny", tiny, (1, 8, 8), 3, params=615, relus=72),
}


def count_relus(model: nn.Sequential, input_shape: tuple[int, int, int]) -> int:
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


def check_counts(spec: NetworkSpec, model: nn.Sequential) -> None:
    """Assert the parameter and ReLU counts of SPEC §10 (a wrong network benchmarks nothing)."""
    params = sum(p.numel() for p in model.parameters())
    if spec.params is not None:
        assert params == spec.params, f"{spec.name}: {params} parameters, SPEC §10 says {spec.params}"
    else:
        assert round(params / 1e6, 1) == spec.params_approx, \
            f"{spec.name}: {params} parameters, SPEC §10 says {spec.params_approx} M"
    relus = count_relus(model, spec.input_shape)
    assert relus == spec.relus, f"{spec.name}: {relus} ReLUs, expected {spec.relus}"


def _from_product(name: str) -> nn.Module | None:
    """The product's own definition of a SPEC §10 network (``robnet_svc.models``), if present;
    MRI-64 and tiny are the benchmark's own (the product's ``tiny`` is a different network)."""
    if not name.startswith("DM-"):
        return None
    try:
        from robnet_svc.models import REFERENCE_MODELS  # noqa: PLC0415 - owned by another engineer
    except ImportError:
        return None
    builder = REFERENCE_MODELS.get(name.lower())
    return builder() if builder is not None else None
