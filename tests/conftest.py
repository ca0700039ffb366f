"""Shared fixtures: real clips from ../shared, RNG isolation, small thread count."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = ROOT.parent / "shared" / "data" / "videos"


@pytest.fixture(autouse=True)
def _restore_rng():
    """Tests may seed freely; nobody leaks RNG state into the next test."""
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.fail(f"real test clips not found at {SHARED_VIDEOS} (../shared must sit beside the project)")
    return SHARED_VIDEOS
