"""Shared fixtures. ``shared_dir``: ``<repo>/../shared`` (real models and data), skipped when absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"

# tests import helpers such as ``onnx_factory`` as top-level modules
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo>/../shared``; the test is skipped when it does not exist."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED.resolve()


@pytest.fixture(scope="module")
def registry():
    """The plugin registry (built-ins and every installed plugin), loaded once per test module."""
    from robnet_svc.plugins import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """The tiny digits CNN of ``cli_support.digits_model``, trained and exported once per session;
    tests read it and never write to it."""
    from cli_support import digits_model

    return digits_model(tmp_path_factory.mktemp("digits-model") / "digits.onnx")
