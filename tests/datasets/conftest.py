"""Fixtures for the dataset tests: a private cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own, initially empty, cache folder (never the user's)."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ROBNET_SVC_CACHE", str(folder))
    return folder
