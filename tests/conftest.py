"""Shared fixtures: real test assets (cached outside the repo) and the test fleet."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma4_fleet.testfleet import assets


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (sha256-verified)."""
    return assets.gemma3_270m_path()
