"""Checkpoint and weights files: the one safe reader, atomic writes, and nlvid's checkpoint format.

Every `.pt`/`.pth`/`.pyth` file nlvid opens goes through `read_torch_file`: `torch.load(weights_only=True)`
(tensors, numpy data and plain containers; never code), with one-line errors for a missing, foreign, corrupt or
code-carrying file. Every file nlvid writes with torch goes through `atomic_save` (temp file, fsync, rename).

An nlvid checkpoint is a dict:
    {"format": "nlvid", "version": nlvid.__version__, "model": state_dict, "config": Config.to_dict(),
     "classes": [names], "epoch": int, "step": int, plus optional "optimizer", "scheduler", "scaler", "rng",
     "metrics", "extra"}
`build --out`, `train` and the weight importers write it; `nlvid.models.load_model` builds the model it describes.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlvid import __version__
from nlvid.errors import CheckpointError

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


def require_file(path: Path, what: str = "checkpoint") -> None:
    """CheckpointError unless `path` is an existing file."""
    if not path.exists():
        raise CheckpointError(f"{path}: {what} not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the {what} file (e.g. {path}/best.pt)")


def first_line(e: BaseException) -> str:
    """The line of an exception worth showing (torch's weights_only error puts the refused global on its own)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported global" in ln or "Unsupported operand" in ln:
            return ln[:240]
    return (lines[0] if lines else e.__class__.__name__)[:240]


def _numpy_data_globals() -> list[Any]:
    """numpy array/scalar reconstruction for torch's weights_only unpickler (data only; e.g. MMAction2's `meta`
    may hold numpy scalars), under both the numpy 2 (`numpy._core`) and numpy 1 (`numpy.core`) names."""
    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")}
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *sorted(dtypes, key=str),
            (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (core.multiarray.scalar, "numpy.core.multiarray.scalar")]


def read_torch_file(path: str | Path, *, what: str = "checkpoint",
                    map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)` with numpy data allowed; CheckpointError naming the file otherwise."""
    path = Path(path)
    require_file(path, what)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            if "numpy" not in str(e) or not hasattr(torch.serialization, "safe_globals"):
                raise
            with torch.serialization.safe_globals(_numpy_data_globals()):  # still weights_only: data, no code
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle ({first_line(e)}); nlvid reads {what} files with "
            "torch.load(weights_only=True), which allows tensors, numpy data and plain containers only"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...: torch raises many kinds
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?): {first_line(e)}") from None


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an nlvid checkpoint safely; clear errors for a missing, truncated or foreign file."""
    path = Path(path)
    obj = read_torch_file(path, map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "model" not in obj:
        raise CheckpointError(
            f"{path}: not an nlvid checkpoint; to import PySlowFast/Caffe2/MMAction2 weights use "
            f"`nlvid build PRESET --init FORMAT=FILE --out model.pt`"
        )
    return obj
