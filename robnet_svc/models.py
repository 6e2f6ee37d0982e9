"""Small reference networks (demo, tests, acceptance runs) and the paper's CIFAR-10
networks (SPEC §10), plus a plain ONNX export for models that were never imported.

Every network maps images ``[N, C, H, W]`` in ``[0, 1]`` to logits ``[N, K]``; ReLU after
every layer but the last, as in the CROWN-IBP model definitions the paper uses.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from robnet_svc.atomic import atomic_path


def tiny_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 16, width: int = 8) -> nn.Sequential:
    """Two convolutions and two linear layers (~70 k parameters at 16x16): the demo network."""
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def dm_small(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """DM-small: Conv(16,k4,s2,p1) -> Conv(32,k4,s2,p1) -> FC(100) -> FC(K).
    At 3x32x32 and K=10: 214,918 parameters, 6,244 ReLUs (SPEC §10)."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * side * side, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def dm_medium(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """DM-medium: 4 convolutions and 3 linear layers; 2,466,858 parameters, 62,464 ReLUs at CIFAR size."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def dm_large(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """DM-large: 5 convolutions and 2 linear layers; 17.2 M parameters, 229,888 ReLUs at CIFAR size."""
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * side * side, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


REFERENCE_MODELS = {"tiny": tiny_cnn, "dm-small": dm_small, "dm-medium": dm_medium, "dm-large": dm_large}


def export_onnx(model: nn.Module, image_shape: tuple[int, int, int], path: str | Path,
                input_name: str = "input", output_name: str = "logits", opset: int = 17) -> Path:
    """Export a plain torch classifier to ONNX with a dynamic batch axis (atomically).

    For networks built here (demo, tests, acceptance); hardened models are exported by
    ``robnet_svc.onnx_io.export_model``, which keeps the input file's names and checks parity.
    """
    path = Path(path)
    was_training = model.training
    model.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, torch.zeros(1, *image_shape), str(tmp), dynamo=False, opset_version=opset,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
        model.train(was_training)
    return path
