"""Datasets: folder-per-class roots and annotation lists, a cached metadata scan, the clip dataset and its loader.

Layouts (`resolve_splits`):
    root/<class>/<video>                    one split, classes = sorted folder names
    root/train/<class>/..., root/val/...    train and val
    list.txt / list.csv                     "path label" per line (whitespace or comma/tab separated); label is a
                                            class name or an integer index; paths relative to the list file;
                                            optional header line; '#' comments; optional classes.txt beside it
                                            (one class name per line) fixes names and order.

`scan_dataset` probes every file once (threads: PyAV releases the GIL while it opens and decodes) and caches the
result keyed by resolved path + size + mtime in `<root>/.nlvid_scan.json`, or under the user cache dir
(`$NLVID_CACHE_DIR`, else `$XDG_CACHE_HOME/nlvid`, else `~/.cache/nlvid`) when the data folder is read-only.
Scale (benchmarks/bench_scan.py): a folder is listed with one os.scandir per folder and resolved paths are built,
not asked for (only links cost a call); a cached scan then costs one stat per file (10k files: ~0.2 s of CPU;
240k: ~4 s). A first scan saves the cache every minute, so an interrupted one resumes. A damaged cache file or
record is reported with a logged warning and probed again. Unreadable files are listed in the index
(on_error="skip") or raise DatasetError listing them (on_error="fail"); never silently dropped.

`VideoDataset` item i in epoch e draws all its randomness from (seed, e, i) only; `make_loader` tags each index
with the dataset's epoch so worker processes (persistent or not) use the same epoch as the main process.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import random
import stat
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from nlvid.data import decode as _decode
from nlvid.data.decode import VideoInfo, probe
from nlvid.data.sampling import clip_indices, epoch_order, item_rng, random_start, uniform_starts
from nlvid.data.transforms import MEAN, STD, random_short_side, test_views, train_transform
from nlvid.errors import DatasetError, DecodeError

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".wmv", ".3gp", ".ogv",
     ".ts", ".mts", ".m2ts", ".vob"}
)
CACHE_NAME = ".nlvid_scan.json"
_CACHE_VERSION = 1
# Probing threads (PyAV releases the GIL while it opens, demuxes and decodes): 2 per core, at most this many.
_MAX_WORKERS = 8
# A first scan saves the cache this often (seconds), so that an interrupted scan of a large folder resumes.
_CHECKPOINT_SECONDS = 60.0
_HEADER_WORDS = {"path", "video", "file", "filename", "video_path", "clip", "name", "label", "class", "class_name",
                 "category", "target", "label_id", "youtube_id"}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- splits


def resolve_splits(data: str | Path, val: str | Path | None = None) -> tuple[Path, Path | None]:
    """(train source, val source or None) from a folder-per-class root, a root holding train/ and val/, or an
    annotation list (then `val` is the second list or folder, or None)."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data}: not found (expected a folder of class folders, a folder with train/ and val/, "
                           "or an annotation list file)")
    train_src = data
    val_src = Path(val) if val is not None else None
    if data.is_dir() and (data / "train").is_dir():
        train_src = data / "train"
        if val_src is None and (data / "val").is_dir():
            val_src = data / "val"
    if val_src is not None and not val_src.exists():
        raise DatasetError(f"{val_src}: validation data not found")
    return train_src, val_src


# ---------------------------------------------------------------------------------------------------- index


@dataclass
class DatasetIndex:
    """A scanned dataset. items: (path, label index) of readable videos; unreadable: (path, reason);
    counts: readable clips per class (every class, zeros included); infos: probe result per path string."""

    classes: list[str]
    items: list[tuple[Path, int]]
    unreadable: list[tuple[Path, str]]
    counts: dict[str, int]
    source: Path | None = None
    infos: dict[str, VideoInfo] = field(default_factory=dict)
    unreadable_counts: dict[str, int] = field(default_factory=dict)
    ignored: list[Path] = field(default_factory=list)  # non-video files in class folders
    cache_path: Path | None = None
    probed: int = 0  # files probed by this call (the rest came from the cache)


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _walk_files(top: str, top_real: str) -> list[tuple[tuple[str, ...], str, str]]:
    """(parts relative to `top`, path, resolved path) of every non-hidden file below `top`, sorted by parts (the
    order of sorted(Path(top).rglob("*"))). Like rglob it recurses into real folders only, not linked ones. One
    os.scandir per folder and no call per file: the resolved path is `top_real` + the parts, except for a
    symbolic link (resolved on its own, as is the stat that tells whether it points at a file)."""
    out: list[tuple[tuple[str, ...], str, str]] = []
    stack: list[tuple[str, str, tuple[str, ...]]] = [(top, top_real, ())]
    while stack:
        folder, real, parts = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, f"{real}/{e.name}", parts + (e.name,)))
                elif e.is_file():  # follows a link: a link to a file counts, one to a folder does not
                    link = e.is_symlink()
                    out.append((parts + (e.name,), e.path, os.path.realpath(e.path) if link else f"{real}/{e.name}"))
            except OSError:
                continue
    out.sort(key=lambda t: t[0])
    return out


def _entries_from_folder(root: Path, classes: list[str] | None):
    """(classes, [(path, label)], resolved path per entry, ignored non-video files)."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not _is_hidden(d))
    if not class_dirs:
        loose = [f for f in root.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS]
        hint = f" (found {len(loose)} videos directly in it: put them in class folders)" if loose else ""
        raise DatasetError(f"{root}: no class folders; expected {root}/<class>/<video>{hint}")
    names = [d.name for d in class_dirs]
    if classes is None:
        classes = names
    lookup = {c: i for i, c in enumerate(classes)}
    entries, keys, ignored = [], [], []
    for d in class_dirs:
        if d.name not in lookup:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise DatasetError(f"{d}: class '{d.name}' is not one of the {len(classes)} known classes ({shown})")
        label = lookup[d.name]
        for parts, path, real in _walk_files(str(d), os.path.realpath(d)):
            if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
                entries.append((d.joinpath(*parts), label))  # parses the new parts only
                keys.append(real)
            else:
                ignored.append(d.joinpath(*parts))
    return list(classes), entries, keys, ignored


def _read_class_file(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: duplicate class names")
    return names


def _as_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def _entries_from_list(list_path: Path, classes: list[str] | None):
    base = list_path.parent
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{list_path}: not a UTF-8 text annotation list") from None
    except OSError as e:
        raise DatasetError(f"{list_path}: cannot read ({e.strerror or e})") from None
    rows: list[tuple[int, str, str]] = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line or "\t" in line:
            fields = [f.strip() for f in next(csv.reader(io.StringIO(line), delimiter="\t" if "\t" in line else ","))]
            fields = [f for f in fields if f != ""]
        else:
            fields = line.rsplit(None, 1)
        if len(fields) < 2:
            raise DatasetError(f"{list_path}:{no}: expected 'path label', got {line!r}")
        rel, label = fields[0], fields[1]
        if not rows and (rel.lower() in _HEADER_WORDS or label.lower() in _HEADER_WORDS) and not (base / rel).exists():
            continue  # header line
        rows.append((no, rel, label))
    if not rows:
        raise DatasetError(f"{list_path}: no entries (expected lines 'path label')")
    if classes is None and (base / "classes.txt").is_file() and (base / "classes.txt") != list_path:
        classes = _read_class_file(base / "classes.txt")
    ints = [_as_int(lb) for _, _, lb in rows]
    if classes is None:
        if all(i is not None for i in ints):
            used = sorted(set(ints))
            if used != list(range(len(used))):
                gaps = sorted(set(range(max(0, used[-1]) + 1)) - set(used))[:5] if used[-1] < 10**6 else []
                raise DatasetError(
                    f"{list_path}: labels are class indices but not 0..{len(used) - 1} (found {used[0]}..{used[-1]}"
                    + (f"; no video for {', '.join(map(str, gaps))}" if gaps else "")
                    + "); add classes.txt beside the list to name every class")
            classes = [str(i) for i in used]
        elif any(i is not None for i in ints):
            no = rows[next(k for k, i in enumerate(ints) if i is not None)][0]
            raise DatasetError(f"{list_path}:{no}: label is an index but other lines use class names; use one "
                               "kind, or add classes.txt beside the list")
        else:
            classes = sorted({lb for _, _, lb in rows})
    lookup = {c: i for i, c in enumerate(classes)}
    entries, keys = [], []
    seen: dict[str, tuple[int, int]] = {}
    real_dirs: dict[str, str] = {}
    for (no, rel, label), as_int in zip(rows, ints):
        if label in lookup:
            idx = lookup[label]
        elif as_int is not None and 0 <= as_int < len(classes):
            idx = as_int
        else:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise DatasetError(f"{list_path}:{no}: unknown label {label!r} (known: {shown}; or an index "
                               f"0..{len(classes) - 1})")
        p = Path(rel) if Path(rel).is_absolute() else base / rel
        real = _resolved_file(str(p), real_dirs)
        if real is None:
            raise DatasetError(f"{list_path}:{no}: video {rel!r} not found (paths are relative to the list file)")
        first = seen.setdefault(real, (no, idx))
        if first[1] != idx:
            raise DatasetError(f"{list_path}:{no}: video {rel!r} is listed again with another label (line "
                               f"{first[0]}: {classes[first[1]]!r}, here: {classes[idx]!r})")
        entries.append((p, idx))
        keys.append(real)
    return list(classes), entries, keys, []


def _resolved_file(path: str, real_dirs: dict[str, str]) -> str | None:
    """The resolved path of `path` when it is a file (or a link to one), else None. One lstat per file; each
    folder is resolved once (`real_dirs` caches them), as Path.resolve would resolve it every time."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return os.path.realpath(path) if os.path.isfile(path) else None
    if not stat.S_ISREG(st.st_mode):
        return None
    folder, name = os.path.split(path)
    real = real_dirs.get(folder)
    if real is None:
        real = real_dirs[folder] = os.path.realpath(folder or ".")
    return os.path.join(real, name)


# ---------------------------------------------------------------------------------------------------- cache


def user_cache_dir() -> Path:
    env = os.environ.get("NLVID_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nlvid"


def _cache_paths(root: Path) -> list[Path]:
    """Candidate cache files, preferred first: beside the data, then the user cache dir."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / CACHE_NAME, user_cache_dir() / f"scan-{key}.json"]


def _load_cache(root: Path) -> dict[str, Any]:
    """The records of the cache files of `root` merged (the preferred file wins). A file that exists but is not a
    cache this version wrote (damaged, truncated, another format) is ignored with a warning; its videos are probed
    again and the next save replaces it."""
    merged: dict[str, Any] = {}
    for p in reversed(_cache_paths(root)):
        try:
            text = p.read_text()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("warning: cannot read the scan cache %s (%s); probing its videos again", p, e.strerror or e)
            continue
        try:
            data = json.loads(text)
        except ValueError as e:
            log.warning("warning: the scan cache %s is damaged (%s); probing its videos again", p, e)
            continue
        if isinstance(data, dict) and data.get("version") == _CACHE_VERSION and isinstance(data.get("files"), dict):
            merged.update(data["files"])
        else:
            log.warning("warning: %s is not a scan cache of this version; probing its videos again", p)
    return merged


_INFO_TYPES = {"duration": (int, float), "fps": (int, float), "num_frames": (int,), "width": (int,),
               "height": (int,), "rotation": (int,)}


def _valid_record(rec: Any) -> bool:
    """A cache entry this version wrote: size/mtime, then either a VideoInfo's fields or an error text. Anything
    else (another version, a hand edit) is probed again instead of trusted. Exact types (JSON gives exactly int,
    float, str; a bool is not a number here); runs once per cached file, so a plain loop."""
    if type(rec) is not dict or type(rec.get("size")) is not int or type(rec.get("mtime_ns")) is not int:
        return False
    if "error" in rec:
        return type(rec["error"]) is str and "info" not in rec
    info = rec.get("info")
    if type(info) is not dict or len(info) != len(_INFO_TYPES):
        return False
    for k, types in _INFO_TYPES.items():
        if type(info.get(k)) not in types:
            return False
    return True


class _GcPaused:
    """Cyclic garbage collection off while a scan builds or checks hundreds of thousands of small objects (paths,
    cache records) that hold no cycles: the collector would rescan them all again and again (30% of a cached
    240k-file scan). Not used around probing (PyAV objects are freed as usual there)."""

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc) -> None:
        if self.was_enabled:
            gc.enable()


def _writable_dir(d: Path) -> bool:
    """Writable for us AND not marked read-only (root ignores permission bits; we respect a r-x folder such as
    the shared test-data folder instead of dropping a cache file into it)."""
    try:
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def _save_cache(root: Path, files: dict[str, Any]) -> Path | None:
    payload = json.dumps({"version": _CACHE_VERSION, "files": files}, separators=(",", ":"), sort_keys=True)
    for p in _cache_paths(root):
        if p.parent.exists() and not _writable_dir(p.parent):
            continue
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".nlvid_scan.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(payload)
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other users of the data
                os.replace(tmp, p)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return p
        except OSError:
            continue
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stat_key(p: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _probe_record(path: Path) -> dict[str, Any]:
    """The cache record of one file: its size and mtime (taken before probing), then its VideoInfo or the reason
    it is unreadable."""
    st = _stat_key(path) or (0, 0)
    rec: dict[str, Any] = {"size": st[0], "mtime_ns": st[1]}
    try:
        rec["info"] = asdict(probe(path))
    except DecodeError as e:
        rec["error"] = e.reason
    except Exception as e:  # noqa: BLE001 - anything else is also "unreadable", with its reason
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def _in_order(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """fn(job) for every job on `workers` threads, yielded in the order of `jobs`, with at most 4 jobs per worker
    queued (a 240k-file scan does not hold 240k futures)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nlvid-scan")
    try:
        pending: deque = deque()
        it = iter(jobs)
        for job in itertools.islice(it, 4 * workers):
            pending.append(ex.submit(fn, job))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(it, 1):
                pending.append(ex.submit(fn, job))
            yield result
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------- scan


def scan_dataset(
    source: str | Path,
    *,
    classes: Sequence[str] | None = None,
    on_error: str = "skip",
    cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> DatasetIndex:
    """Find every video of a folder-per-class root or annotation list, probe it (cached), and index it.

    classes: fixed class names/order (e.g. from a checkpoint); a folder or label outside them is a DatasetError.
    on_error: "skip" lists unreadable files in `index.unreadable`; "fail" raises DatasetError listing them.
    progress(done, total) is called as files are probed.
    """
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail' (got {on_error!r})")
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: not found")
    classes = list(classes) if classes is not None else None
    with _GcPaused():  # listing and cache check of up to ~10^5-10^6 files
        if source.is_dir():
            classes, entries, keys, ignored = _entries_from_folder(source, classes)
            root = source
        else:
            classes, entries, keys, ignored = _entries_from_list(source, classes)
            root = source.parent
        if not entries:
            raise DatasetError(f"{source}: no videos found (extensions: {', '.join(sorted(VIDEO_EXTENSIONS))})")

        cached = _load_cache(root) if cache else {}
        results: dict[str, Any] = {}
        todo: list[tuple[Path, str]] = []
        invalid = 0
        for (p, _), key in zip(entries, keys):
            if key in results:
                continue
            hit = cached.get(key)
            if hit is not None and not _valid_record(hit):
                invalid += 1
                hit = None
            if hit is not None and _stat_key(key) == (hit["size"], hit["mtime_ns"]):  # one stat per cached file
                results[key] = hit
            else:
                results[key] = None  # queued
                todo.append((p, key))
    if invalid:
        log.warning("warning: %d scan cache entries of %s are not valid records; probing those videos again",
                    invalid, root)
    total = len(entries)
    done = total - len(todo)
    if progress is not None:
        progress(done, total)

    cache_path = None
    merged = dict(cached) if cache else {}
    n_workers = workers or min(_MAX_WORKERS, max(1, os.cpu_count() or 1) * 2)
    last_save = time.monotonic()
    for (p, key), rec in zip(todo, _in_order(lambda job: _probe_record(job[0]), todo, n_workers)):
        results[key] = merged[key] = rec
        done += 1
        if progress is not None:
            progress(done, total)
        if cache and time.monotonic() - last_save > _CHECKPOINT_SECONDS:
            # a long first scan that is interrupted resumes from here
            cache_path = _save_cache(root, merged)
            last_save = time.monotonic()

    if cache and todo:
        seen = set(keys)
        for key in [k for k in merged if k not in seen]:
            if not os.path.exists(key):  # a deleted file leaves the cache (another list's files stay)
                del merged[key]
        cache_path = _save_cache(root, merged)
    elif cache:
        cache_path = next((p for p in _cache_paths(root) if p.exists()), None)

    with _GcPaused():
        items, unreadable, infos = [], [], {}
        counts = {c: 0 for c in classes}
        bad_counts = {c: 0 for c in classes}
        for (p, label), key in zip(entries, keys):
            rec = results[key]
            if "info" in rec:
                items.append((p, label))
                infos[str(p)] = VideoInfo(**rec["info"])
                counts[classes[label]] += 1
            else:
                unreadable.append((p, rec.get("error", "unreadable")))
                bad_counts[classes[label]] += 1
    if unreadable and on_error == "fail":
        shown = "; ".join(f"{p}: {r}" for p, r in unreadable[:3])
        more = f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
        raise DatasetError(f"{source}: {len(unreadable)} unreadable video(s): {shown}{more} "
                           "(data.on_error=skip leaves them out)")
    return DatasetIndex(classes=classes, items=items, unreadable=unreadable, counts=counts, source=source,
                        infos=infos, unreadable_counts=bad_counts, ignored=ignored, cache_path=cache_path,
                        probed=len(todo))


# ---------------------------------------------------------------------------------------------------- dataset


class VideoDataset(torch.utils.data.Dataset):
    """Clips from a list of (path, label) items.

    Train item: (clip float32 (3, T, crop, crop), label, index). Test item: (views float32
    (num_clips * num_crops, 3, T, S, S), label, index), views ordered clip-major (clip 0 crops 0..K-1, clip 1, ...).
    `index` is the item actually returned: when a video fails with on_error="skip" a warning naming it is logged
    (logger `nlvid.data.dataset`, in the process that loads the item) and the next readable item (index + 1, + 2,
    ... wrapping) is returned in its place. Failures are counted in `self.failures` (per process: with worker
    processes each worker counts its own).
    Item keys may be an int or (index, epoch) (make_loader sends the latter).
    """

    def __init__(
        self,
        items: Iterable[tuple[str | Path, int]],
        *,
        train: bool,
        num_frames: int,
        stride: int,
        train_short_side: Sequence[int] | int = (256, 320),
        crop_size: int = 224,
        test_short_side: int = 256,
        test_crop_size: int = 256,
        num_clips: int = 10,
        num_crops: int = 3,
        flip: bool = True,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        on_error: str = "skip",
        seed: int = 0,
    ):
        if on_error not in ("skip", "fail"):
            raise DatasetError(f"on_error must be 'skip' or 'fail' (got {on_error!r})")
        if num_frames < 1 or stride < 1:
            raise DatasetError(f"num_frames and stride must be >= 1 (got {num_frames}, {stride})")
        self.items = [(Path(p), int(lb)) for p, lb in items]
        self.train = bool(train)
        self.num_frames, self.stride = int(num_frames), int(stride)
        self.train_short_side = train_short_side
        self.crop_size = int(crop_size)
        self.test_short_side, self.test_crop_size = int(test_short_side), int(test_crop_size)
        self.num_clips, self.num_crops = int(num_clips), int(num_crops)
        self.flip = bool(flip)
        self.mean, self.std = tuple(mean), tuple(std)
        self.on_error = on_error
        self.seed = int(seed)
        self.epoch = 0
        self.failures: list[tuple[int, str, str]] = []  # (index, path, reason), this process
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), self.epoch
        n = len(self.items)
        if not 0 <= index < n:
            raise IndexError(f"item {index} out of range (dataset has {n})")
        for attempt in range(n):
            j = (index + attempt) % n
            if j in self._bad:
                continue
            path, label = self.items[j]
            try:
                return self.load(j, epoch), label, j
            except DecodeError as e:
                if self.on_error == "fail":
                    raise
                self._bad.add(j)
                self.failures.append((j, str(path), e.reason))
                log.warning("warning: skipping unreadable video %s: %s (item %d; %d failure(s) so far in this process)",
                            path, e.reason, j, len(self.failures))
        raise DatasetError(f"none of the {n} videos could be decoded (first failure: {self.failures[0][1]})")

    def load(self, index: int, epoch: int = 0) -> torch.Tensor:
        """The tensor of item `index` in `epoch` (no error substitution)."""
        path, _ = self.items[index]
        rng = item_rng(self.seed, epoch, index)
        if self.train:
            short = max(random_short_side(rng, self.train_short_side), self.crop_size)
            with _decode.Video(path) as v:
                total = v.frame_count_estimate()
                start = random_start(total, num_frames=self.num_frames, stride=self.stride, rng=rng)
                idx = clip_indices(start, num_frames=self.num_frames, stride=self.stride, total=total)
                frames = v.decode_times(idx / v.fps, short_side=short)
            return train_transform(frames, rng=rng, short_side=None, crop_size=self.crop_size, flip=self.flip,
                                   mean=self.mean, std=self.std)
        short = max(self.test_short_side, self.test_crop_size)
        starts = partial(uniform_starts, num_frames=self.num_frames, stride=self.stride, num_clips=self.num_clips)
        clips = _decode.read_clips(path, starts, num_frames=self.num_frames, stride=self.stride, short_side=short)
        views = [test_views(c, short_side=short, crop_size=self.test_crop_size, num_crops=self.num_crops,
                            mean=self.mean, std=self.std)[0] for c in clips]
        return torch.cat(views)  # num_clips x (K, 3, T, S, S) -> (num_clips * K, 3, T, S, S)


# ---------------------------------------------------------------------------------------------------- loader


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) so that every worker uses the epoch set on the main process's dataset.

    Order: `base` (any iterable of indices or a Sampler; its set_epoch is called) if given, else
    `epoch_order(n, seed=seed, epoch=epoch)` when shuffling (the order training uses), else 0..n-1.
    """

    def __init__(self, dataset, *, base=None, shuffle: bool = False, seed: int = 0, tag: bool = True):
        self.dataset, self.base, self.shuffle, self.seed, self.tag = dataset, base, shuffle, int(seed), tag

    def _epoch(self) -> int:
        return int(getattr(self.dataset, "epoch", 0))

    def __iter__(self):
        epoch = self._epoch()
        if self.base is not None:
            if hasattr(self.base, "set_epoch"):
                self.base.set_epoch(epoch)
            order = iter(self.base)
        elif self.shuffle:
            order = iter(epoch_order(len(self.dataset), seed=self.seed, epoch=epoch))
        else:
            order = iter(range(len(self.dataset)))
        for i in order:
            yield (int(i), epoch) if self.tag else int(i)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else len(self.dataset)


def _worker_init(worker_id: int, *, seed: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process computes
    s = (int(seed) * 1000 + worker_id) & 0xFFFFFFFF
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def make_loader(
    dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    sampler=None,
    pin_memory: bool | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader over a VideoDataset: deterministic order ((seed, epoch) permutation when shuffling, or the
    given sampler / index list), worker processes seeded from (seed, worker id), pinned memory on CUDA,
    persistent workers when num_workers > 0."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    tag = isinstance(dataset, VideoDataset)
    smp = EpochSampler(dataset, base=sampler, shuffle=shuffle and sampler is None, seed=seed, tag=tag)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2,
                      worker_init_fn=partial(_worker_init, seed=seed))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=smp,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)),
        **kwargs,
    )
