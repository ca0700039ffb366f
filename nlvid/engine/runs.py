"""A run folder's records and ownership: metrics.jsonl (and TensorBoard) written, read back as curves, the lock
that makes one process its owner, and the table of `nlvid runs`.

Files of a run folder that this module owns:
    metrics.jsonl   one JSON object per logged step ({"kind": "step", ...}) and per epoch ({"kind": "epoch", ...});
                    `MetricsLog` writes it, `read_curves` is the one reader (pictures, `nlvid runs`, tests)
    tensorboard/    TensorBoard event files with the same scalars (train.tensorboard), main process only
    run.json        where the data came from (written at every start of the run)
    .lock           the owner's pid, host and start time; flock'ed while `train` runs (`RunLock`)

Resume keeps every record stream continuous: metrics.jsonl is cut back to the records a checkpoint covers (those up
to its optimizer step) and the TensorBoard writer opens with `purge_step` = that step + 1, so TensorBoard drops the
events the killed process wrote after its last checkpoint instead of showing them twice.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import math
import os
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlvid.errors import ConfigError, TrainingError

LOCK_FILE = ".lock"
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
# files whose presence makes a folder a run folder (for `nlvid runs PARENT`)
RUN_MARKERS = ("config.yaml", METRICS_FILE, "last.pt", "best.pt", LOCK_FILE, RUN_INFO_FILE)


# ------------------------------------------------------------------------------------------ the lock


@dataclass(frozen=True)
class LockOwner:
    """What a lock file says about the process that holds (or held) it."""

    pid: int | None = None
    host: str | None = None
    started: str | None = None

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid is not None else "an unknown process"
        where = f" on {self.host}" if self.host else ""
        since = f" since {self.started}" if self.started else ""
        return f"{who}{where}{since}"

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner a lock file's text names; None for an empty or unreadable (half-written) file."""
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]) if d.get("pid") is not None else None, host=d.get("host"),
                       started=d.get("started"))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def read_lock_owner(run_dir: str | Path) -> LockOwner | None:
    try:
        return LockOwner.parse((Path(run_dir) / LOCK_FILE).read_text())
    except OSError:
        return None


def lock_is_held(run_dir: str | Path) -> bool:
    """Whether a live process holds the run folder's lock (probed with a shared, non-blocking flock that is let go
    at once; `RunLock.acquire` retries for a moment, so a probe never turns a trainer away)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing also lets go of a shared lock taken above
    return False


ORPHAN_WAIT_S = 15.0  # DataLoader workers check every 5 s that their parent lives


def _gone(owner: LockOwner) -> bool:
    """Whether `owner` is a process of this host that no longer exists."""
    if owner.pid is None or owner.host != socket.gethostname():
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLock:
    """One process owns a run folder at a time: an exclusive `flock` on `<run>/.lock`, which holds the owner's pid,
    host and start time. The kernel lets go of the flock when its process dies however it dies, so a lock file whose
    flock is free is stale: `acquire` takes it over and says so through `progress`. A held lock is a TrainingError
    naming the owner. `release` removes the file (and the run folder if the lock was all there was in it).
    `enabled=False` (the other ranks under torchrun) makes both no-ops."""

    def __init__(self, run_dir: str | Path, *, progress: Callable[..., Any] | None = None, enabled: bool = True,
                 wait: float = 1.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.progress = progress or (lambda event, **data: None)
        self.enabled = enabled
        self.wait = wait  # seconds to retry a busy lock (a `lock_is_held` probe holds it for microseconds)
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        if not self.enabled or self._fd is not None:
            return self
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        waited_for_orphans = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                owner = read_lock_owner(self.run_dir) or LockOwner()
                if not waited_for_orphans and _gone(owner):
                    # the owner died but processes it forked (DataLoader workers) still share its lock; they notice
                    # their parent is gone within seconds and exit
                    waited_for_orphans = True
                    deadline = time.monotonic() + ORPHAN_WAIT_S
                    self.progress("message", text=f"{self.run_dir}: {owner.describe()} has exited; waiting up to "
                                                  f"{ORPHAN_WAIT_S:.0f} s for its child processes to let go of the "
                                                  "lock")
                    continue
                if _gone(owner):
                    raise TrainingError(f"run folder {self.run_dir} is still locked by child processes of "
                                        f"{owner.describe()}, which has exited (lock {self.path}); end them or "
                                        "train into another folder", key="out") from None
                raise TrainingError(f"run folder {self.run_dir} is in use: {owner.describe()} is training into it "
                                    f"(lock {self.path}); wait for it to end or train into another folder",
                                    key="out") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the owner released (and removed) the file between our open and flock: open it again
        self._fd = fd
        previous = LockOwner.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if previous is not None:  # whoever wrote it no longer holds the flock: a stale lock
            self.progress("message", text=f"{self.run_dir}: taking over the stale lock of {previous.describe()} "
                                          "(that process is gone)")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = (json.dumps(me) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._same_file(fd):
                self.path.unlink()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a run that failed before writing anything leaves no folder
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ writing records


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """ConfigError (keyed train.tensorboard) when the tensorboard package is missing; cheap (no import)."""
    if not tensorboard_available():
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'nlvid[tensorboard]' "
                          "(or set train.tensorboard=false)", key="train.tensorboard")


# metrics.jsonl fields that say where a record is, not what was measured (not TensorBoard scalars)
_POSITION_KEYS = ("kind", "epoch", "step", "batch", "batches")


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a metrics record: `<kind>/<field>` for every measured number in it."""
    kind = record.get("kind", "step")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in _POSITION_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """The main process's writer of a run's records: metrics.jsonl, plus TensorBoard event files in
    `<run>/tensorboard/` when `tensorboard` is set. `start` before the first record, `close` at the end;
    `enabled=False` (other ranks under torchrun) writes nothing."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self.enabled = enabled
        self._tb: Any = None

    def start(self, *, resume_step: int | None) -> None:
        """A fresh run (`resume_step` None) starts empty record files; a resumed one keeps the records up to its
        checkpoint's optimizer step `resume_step` and continues them."""
        if not self.enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_metrics(self.path, resume_step)
        if self.tensorboard:
            self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, resume_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for tag, value in scalars_of(record).items():
                self._tb.add_scalar(tag, value, global_step=int(record["step"]))
            self._tb.flush()  # on disk before the checkpoint that covers it: a kill then loses nothing

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _open_tensorboard(log_dir: Path, *, resume_step: int | None) -> Any:
    """A SummaryWriter into `log_dir`: a fresh run removes the event files of an earlier attempt; a resumed one
    opens with purge_step = resume_step + 1 (TensorBoard then drops what an earlier process logged after that)."""
    require_tensorboard()
    # optional heavy dependency (the `tensorboard` extra, which torch.utils.tensorboard needs): imported only when
    # train.tensorboard is on
    from torch.utils.tensorboard import SummaryWriter

    if resume_step is None and log_dir.is_dir():
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
    return SummaryWriter(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume from a checkpoint at optimizer step `step`, drop the metric records written after it (they will
    be redone): those with a larger step. An epoch's record carries the step of the epoch's last optimizer step
    and is written before that step's checkpoint, so a checkpoint at `step` covers exactly the records up to it."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) > step:
            continue
        keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def write_run_info(run_dir: str | Path, **info: Any) -> None:
    """run.json: where a run's data came from (atomically: a temp file renamed over it)."""
    run_dir = Path(run_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_INFO_FILE}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; config.yaml beside it is readable too
        os.replace(tmp, run_dir / RUN_INFO_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ reading records


@dataclass
class Curves:
    """A run's records as curves: `steps` (step records) and `epochs` (epoch records), each sorted by optimizer
    step with one record per step; `best` is the epoch record of the epoch best.pt holds (the last one that
    improved), None before any. `skipped_lines`: lines that were not JSON (cut by a kill)."""

    name: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    skipped_lines: int = 0

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one field over the `kind` ("step" or "epoch") records that have a finite value."""
        records = self.steps if kind == "step" else self.epochs
        xs, ys = [], []
        for r in records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(int(r["step"]))
                ys.append(float(v))
        return xs, ys

    @property
    def epoch_ends(self) -> list[tuple[int, int]]:
        """(step, epoch) of every finished epoch."""
        return [(int(r["step"]), int(r["epoch"])) for r in self.epochs]


def read_curves(run_dir: str | Path, *, name: str | None = None) -> Curves:
    """Parse `<run_dir>/metrics.jsonl` into curves (empty when the file is missing). A record repeated for one
    step (a resume whose records were not cut back) counts once, the later one winning."""
    run_dir = Path(run_dir)
    curves = Curves(name=name or run_dir.name)
    path = run_dir / METRICS_FILE
    if not path.exists():
        return curves
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"step": {}, "epoch": {}}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, TypeError, KeyError):
            curves.skipped_lines += 1
            continue
        if isinstance(rec, dict) and rec.get("kind") in by_kind:
            by_kind[rec["kind"]][step] = rec
    curves.steps = [by_kind["step"][s] for s in sorted(by_kind["step"])]
    curves.epochs = [by_kind["epoch"][s] for s in sorted(by_kind["epoch"])]
    improved = [r for r in curves.epochs if r.get("is_best")]
    curves.best = improved[-1] if improved else None
    return curves


# ------------------------------------------------------------------------------------------ the runs table


@dataclass
class RunSummary:
    """One row of `nlvid runs`. state: running (a live process holds the lock), finished (all planned epochs
    done), interrupted (a last.pt, epochs left, nobody holding the lock), no checkpoint (stopped before its first
    checkpoint), broken (a file that cannot be read: see `problems`)."""

    path: str
    name: str
    state: str
    model: str | None = None
    data: str | None = None
    epochs_done: int = 0
    epochs_planned: int | None = None
    steps: int = 0
    best_val_top1: float | None = None
    best_val_epoch: int | None = None
    best_metric: str | None = None  # what best.pt is chosen by: val_top1, or train_acc without validation
    best: float | None = None
    best_epoch: int | None = None
    last_checkpoint: str | None = None  # local time of last.pt's last write
    owner: str | None = None  # the lock holder (running) or the process that left a stale lock
    has_curves_png: bool = False
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """The run folders among `dirs`: a folder that is a run itself, else its sub-folders that are runs (sorted)."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ConfigError(f"{d}: no such folder (give run folders or the folder that holds them)")
        if is_run_dir(d):
            found.append(d)
        else:
            found += sorted(p for p in d.iterdir() if is_run_dir(p))
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def summarize_run(run_dir: str | Path) -> RunSummary:
    """One run folder as a table row; never raises for what is inside the folder (problems go in the row)."""
    run_dir = Path(run_dir)
    row = RunSummary(path=str(run_dir), name=run_dir.name, state="")
    cfg = _read_yaml(run_dir / "config.yaml", row)
    if cfg is not None:
        model, train = cfg.get("model") or {}, cfg.get("train") or {}
        row.model = model.get("name") if isinstance(model, dict) else None
        planned = train.get("epochs") if isinstance(train, dict) else None
        row.epochs_planned = planned if isinstance(planned, int) else None
    info = _read_json(run_dir / RUN_INFO_FILE, row)
    if info is not None and isinstance(info, dict):
        row.data = info.get("data")
    curves = read_curves(run_dir)
    if not (run_dir / METRICS_FILE).exists() and (run_dir / "last.pt").exists():
        row.problems.append(f"{METRICS_FILE}: missing")
    if curves.skipped_lines:
        row.problems.append(f"{METRICS_FILE}: {curves.skipped_lines} unreadable line(s) skipped")
    if curves.epochs:
        row.epochs_done = int(curves.epochs[-1]["epoch"])
    row.steps = max([int(r["step"]) for r in curves.steps + curves.epochs] or [0])
    vx, vy = curves.series("epoch", "val_top1")
    if vy:
        i = max(range(len(vy)), key=lambda j: (vy[j], -j))  # the first epoch reaching the maximum
        row.best_val_top1 = vy[i]
        row.best_val_epoch = int(next(r["epoch"] for r in curves.epochs if int(r["step"]) == vx[i]))
    if curves.best is not None:
        row.best, row.best_epoch = curves.best.get("best"), int(curves.best["epoch"])
        row.best_metric = "val_top1" if "val_top1" in curves.best else "train_acc"
    last = run_dir / "last.pt"
    if last.exists():
        row.last_checkpoint = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.stat().st_mtime))
        _check_torch_zip(last, row)
    if (run_dir / "best.pt").exists():
        _check_torch_zip(run_dir / "best.pt", row)
    row.has_curves_png = (run_dir / CURVES_FILE).exists()
    owner = read_lock_owner(run_dir)
    if lock_is_held(run_dir):
        row.state = "running"
        row.owner = (owner or LockOwner()).describe()
        return row
    if owner is not None:
        row.owner = f"stale lock of {owner.describe()}"
    bad_checkpoint = any(p.startswith(("last.pt", "best.pt")) for p in row.problems)
    bad_config = cfg is None and ((run_dir / "config.yaml").exists() or last.exists())
    if bad_checkpoint or bad_config:
        row.state = "broken"
    elif row.epochs_planned is not None and row.epochs_done >= row.epochs_planned and last.exists():
        row.state = "finished"
    elif last.exists():
        row.state = "interrupted"
    else:
        row.state = "no checkpoint"
    return row


def list_runs(dirs: Iterable[str | Path]) -> list[RunSummary]:
    return [summarize_run(d) for d in find_runs(dirs)]


def _read_yaml(path: Path, row: RunSummary) -> dict[str, Any] | None:
    if not path.exists():
        row.problems.append(f"{path.name}: missing")
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        row.problems.append(f"{path.name}: unreadable ({_first_line(e)})")
        return None
    if not isinstance(data, dict):
        row.problems.append(f"{path.name}: not a config (a {type(data).__name__})")
        return None
    return data


def _read_json(path: Path, row: RunSummary) -> Any:
    if not path.exists():
        return None  # older runs have no run.json: the data column stays empty
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        row.problems.append(f"{path.name}: unreadable ({_first_line(e)})")
        return None


def _check_torch_zip(path: Path, row: RunSummary) -> None:
    """A cheap integrity check of a checkpoint (torch files are zip archives: read the directory, not the tensors)."""
    try:
        with zipfile.ZipFile(path) as z:
            if not z.namelist():
                raise zipfile.BadZipFile("empty archive")
    except (OSError, zipfile.BadZipFile) as e:
        row.problems.append(f"{path.name}: truncated or corrupt ({_first_line(e)})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else e.__class__.__name__)[:160]
