"""``robnet-svc demo``: the whole pipeline on a fresh machine, on real images, in minutes.

1. load the handwritten digits shipped with scikit-learn (no download), at their native 8x8;
2. train a small CNN normally (cross-entropy, Adam) and export it to ``OUT/model.onnx``;
3. ``harden`` it: rsip-ssip training against an order-2 multiplicative bias field, then
   certify before and after, writing ``model.robust.onnx``, ``certificate.h5`` and
   ``summary.json`` next to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from robnet_svc.errors import RobnetError
from robnet_svc.models import export_onnx, tiny_cnn
from robnet_svc.pipeline import Options, _device, harden
from robnet_svc.progress import SILENT, Reporter
from robnet_svc.report import Report
from robnet_svc.training import train_standard

IMAGE_SHAPE = (1, 8, 8)
INPUT_MODEL = "model.onnx"


def demo_options(out: Path, fast: bool, device: str) -> Options:
    """The demo's harden settings (the full run: ~10 s on 2 CPU cores; ``fast``: a smoke test)."""
    return Options(
        model=str(out / INPUT_MODEL), dataset="digits", perturbation="bias-field", eps=0.3, order=2, mode="mult",
        method="rsip-ssip", cert_method="rsip-ssip", alpha=1.0, device=device, seed=0, val_fraction=0.1,
        epochs=3 if fast else 6, ramp_epochs=1 if fast else None, lr=1e-3 if fast else 5e-4,
        batch_size=32 if fast else 64, max_train=256 if fast else None, max_test=64 if fast else None,
        attack_steps=5 if fast else 10, out=str(out), force=True,
        # fast: 26 validation samples (one is 3.8%) and a rushed schedule; a smoke test of the
        # pipeline, so a loose budget. The full demo keeps the default 0.02.
        max_clean_drop=0.2 if fast else Options.max_clean_drop,
    )


def train_input_model(path: Path, image_shape: tuple[int, int, int] = IMAGE_SHAPE, epochs: int = 12,
                      width: int = 8, seed: int = 0, held_out: Options | None = None):
    """Train ``tiny_cnn`` normally on the embedded digits at ``image_shape`` and export it to ONNX
    at ``path``; returns the dataset's ``Splits``. ``held_out``: the harden options whose
    validation split the model must not see (``pipeline.validation_split``)."""
    from robnet_svc.pipeline import validation_split
    from robnet_svc.plugins import load_registry

    splits = load_registry().dataset("digits")(None).load(image_shape)
    if held_out is not None:
        _val, keep = validation_split(splits.train_labels.shape[0], held_out.val_fraction, held_out.seed,
                                      held_out.max_train)
        splits.train_images, splits.train_labels = splits.train_images[keep], splits.train_labels[keep]
    torch.manual_seed(seed)  # the initial weights
    model = tiny_cnn(in_channels=image_shape[0], num_classes=splits.num_classes, image_size=image_shape[1],
                     width=width)
    train_standard(model, splits.train_images, splits.train_labels, epochs=epochs, lr=2e-3, seed=seed)
    export_onnx(model, image_shape, path)
    return splits


def run_demo(out: str | Path, *, fast: bool = False, force: bool = False, device: str = "cpu",
             reporter: Reporter = SILENT) -> Report:
    """Run the demo into folder ``out`` (refused when it exists, is not empty and not ``force``)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise RobnetError(f"--out {out} exists and is not empty; use --force to overwrite or choose another --out")
    _device(device)  # a bad --device is one line now, not after training the input model
    out.mkdir(parents=True, exist_ok=True)
    reporter.log("training a small CNN normally on the embedded digits (scikit-learn)")
    options = demo_options(out, fast, device)
    train_input_model(out / INPUT_MODEL, epochs=3 if fast else 12, held_out=options)
    config = {k: v for k, v in vars(options).items() if k not in ("force", "resume")}
    return harden(options, config, f"robnet-svc demo --out {out}" + (" --fast" if fast else ""), reporter)
