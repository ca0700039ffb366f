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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlvid import __version__
from nlvid.config import config_from_dict
from nlvid.errors import CheckpointError, ConfigError, OutputError, writing

FORMAT = "nlvid"


def _clean_stale_temps(path: Path) -> None:
    """Remove temp files of earlier writes of `path` whose writing process is gone (killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _file_mode() -> int:
    """The mode open() gives a new file here (0o666 minus the umask), read without changing the umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact.

    The file gets the usual mode of a new file (not mkstemp's 0600); temp files left by killed writers of the same
    path are removed; an OSError (disk full, read-only folder) is one OutputError naming `path`."""
    path = Path(path)
    with writing(path, "checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    torch.save(obj, f)
                except RuntimeError as e:  # torch reports a failed write (disk full, size limit) this way
                    free = shutil.disk_usage(path.parent).free
                    raise OutputError(f"{path}: cannot write checkpoint (torch.save failed: {first_line(e)}; "
                                      f"{free / 2**20:.0f} MiB free on that disk)") from None
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
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
    _check_fields(obj, path)
    return obj


def _check_fields(obj: dict[str, Any], path: Path) -> None:
    """The parts every reader relies on: a state dict of tensors, a config mapping, class names that match the
    classifier's outputs, integer counters."""
    state, config, classes = obj.get("model"), obj.get("config"), obj.get("classes")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: damaged checkpoint: 'model' is not a state dict of tensors")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: damaged checkpoint: 'config' is missing or not a mapping")
    try:
        config_from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is not valid for this nlvid version: {e}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: damaged checkpoint: 'classes' is missing or not a list of names")
    fc = state.get("head.fc.weight")
    if fc is not None and fc.dim() >= 1 and fc.shape[0] != len(classes):
        raise CheckpointError(f"{path}: damaged checkpoint: {len(classes)} class names for a classifier with "
                              f"{fc.shape[0]} outputs")
    for key in ("epoch", "step"):
        if not isinstance(obj.get(key, 0), int) or obj.get(key, 0) < 0:
            raise CheckpointError(f"{path}: damaged checkpoint: {key!r} is not a non-negative integer")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); "
                              f"nothing computed from them would mean anything")
