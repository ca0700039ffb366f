"""Shared fixtures: real clips from ../shared, RNG isolation, small thread count."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = ROOT.parent / "shared" / "data" / "videos"


@pytest.fixture(autouse=True)
def _restore_rng():
    """Tests may seed freely; nobody leaks RNG state (torch, random, numpy) into the next test."""
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    np.random.set_state(np_state)


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.fail(f"real test clips not found at {SHARED_VIDEOS} (../shared must sit beside the project)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic long-range dataset (4 classes, 12 train + 4 val clips), built once per session."""
    from nlvid.data import write_synthetic

    root = tmp_path_factory.mktemp("engine_synth")
    write_synthetic(root, classes=4, clips_per_class=4, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_data) -> Path:
    """A tiny NL model trained for a few epochs on `synthetic_data` (the run folder other tests evaluate)."""
    from engine_settings import FAST, FIT  # tests/engine_settings.py
    from nlvid.config import load_config
    from nlvid.engine.train import train

    out = tmp_path_factory.mktemp("engine_run")
    train(load_config("tiny", FAST + FIT), data=synthetic_data, out=out, progress=None)
    return out


TINY_CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A `tiny` checkpoint with 3 classes (TINY_CLASSES), random weights, a head that separates the classes a
    little (so a ranking is not a tie): (path, model, classes, config), the model loaded back from the file."""
    from nlvid.checkpoint import save_checkpoint
    from nlvid.config import load_config
    from nlvid.models import create_model, load_model

    cfg = load_config("tiny", ["model.num_classes=3"])
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=3)
    with torch.no_grad():
        model.head.fc.weight.normal_(std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model_state=model.state_dict(), config=cfg.to_dict(), classes=TINY_CLASSES)
    model, classes, cfg = load_model(path)
    return path, model, classes, cfg


@pytest.fixture
def two_threads():
    """Two torch threads for the test, restored after: torch runs 1x1 convs on oneDNN (and nlvid its oneDNN
    attention and per-tap weight gradients) only with more than one thread (nlvid.models.onednn)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
