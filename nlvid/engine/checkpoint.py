"""One checkpoint format for every command, written atomically.

A checkpoint is a dict saved with `torch.save`:
    {"format": "nlvid", "version": nlvid.__version__, "model": state_dict, "config": Config.to_dict(),
     "classes": [names], "epoch": int, "step": int, plus optional "optimizer", "scheduler", "scaler", "rng",
     "metrics", "extra"}
`build --out`, `train` and the weight importers all write it; `eval`, `predict`, `visualize` read it with
`load_model`. Loading uses `torch.load(weights_only=True)`: a checkpoint is untrusted input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nlvid import __version__
from nlvid.errors import CheckpointError, ConfigError

FORMAT = "nlvid"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    classes: list[str],
    epoch: int = 0,
    step: int = 0,
    **extra: Any,
) -> None:
    """Write a checkpoint atomically. `extra` may hold optimizer/scheduler/scaler state, rng, metrics."""
    obj = {
        "format": FORMAT,
        "version": __version__,
        "model": model_state,
        "config": config,
        "classes": list(classes),
        "epoch": epoch,
        "step": step,
    }
    obj.update(extra)
    atomic_save(obj, path)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an nlvid checkpoint safely; clear errors for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a checkpoint file (e.g. {path}/best.pt)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds (RuntimeError, UnpicklingError, EOFError, zipfile errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "model" not in obj:
        raise CheckpointError(
            f"{path}: not an nlvid checkpoint; to import PySlowFast/Caffe2/MMAction2 weights use "
            f"`nlvid build PRESET --init FORMAT=FILE --out model.pt`"
        )
    return obj


def model_from_checkpoint(ckpt: dict[str, Any], *, path: str | Path = "<checkpoint>") -> torch.nn.Module:
    """Build the model described by a checkpoint's config and load its weights (strict, with a key report)."""
    from nlvid.config import config_from_dict, model_kwargs
    from nlvid.models import create_model, load_state_dict_checked

    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is not valid for this nlvid version: {e}") from None
    model = create_model(cfg.model.name, **model_kwargs(cfg.model))
    try:
        load_state_dict_checked(model, ckpt["model"])
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model.name!r}: {e}") from None
    return model


def load_model(path: str | Path, *, device: str | torch.device = "cpu"):
    """-> (model in eval mode on `device`, class names, Config). The one way commands open a checkpoint."""
    from nlvid.config import config_from_dict

    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path=path)
    model.to(device).eval()
    return model, list(ckpt["classes"]), config_from_dict(ckpt["config"])
