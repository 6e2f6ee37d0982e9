"""Helpers for tests that drive the real command line in-process (shared by the harden,
certify, report and demo tests): a tiny digits model exported to ONNX, and ``invoke``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from robnet_svc.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def invoke(capsys: pytest.CaptureFixture, *args: str) -> Result:
    """Run ``robnet-svc ARGS`` through ``main`` (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def digits_model(path: Path, image_size: int = 8, epochs: int = 4, width: int = 4) -> Path:
    """A tiny CNN trained normally on the embedded digits for a few epochs, exported to ``path``."""
    from robnet_svc.demo import train_input_model

    train_input_model(path, image_shape=(1, image_size, image_size), epochs=epochs, width=width)
    return path


# Settings that keep a harden/certify run on digits to a second or two.
FAST = ("--dataset", "digits", "--eps", "0.05", "--order", "1", "--max-test", "40",
        "--attack-steps", "3", "--attack-restarts", "2", "--device", "cpu")
FAST_TRAIN = ("--epochs", "1", "--max-train", "128", "--batch-size", "32")


def interrupt_at(prefix: str):
    """Stands in for Ctrl-C or a killed process: a ``Reporter`` that raises KeyboardInterrupt when
    the run logs a line starting with ``prefix``."""
    from robnet_svc.progress import Reporter

    def log(message: str) -> None:
        if message.startswith(prefix):
            raise KeyboardInterrupt

    return Reporter(log=log)
