"""Pretrained weights by name: download, verify, convert and cache the files of `nlvid.models.zoo`.

    path = pretrained_checkpoint("pysf_i3d_r50_nl_8x8", progress=cb)   # an nlvid checkpoint (load_model(path))
    path = source_file("torchvision_resnet50", progress=cb)           # the verified file as published

Cache (`nlvid_home()`: $NLVID_HOME, else $XDG_CACHE_HOME/nlvid, else ~/.cache/nlvid):
    downloads/<published file name>          the file as published (put a manually downloaded file here)
    downloads/<published file name>.sha256   its full SHA-256 and URL, written once the file was verified
    downloads/<published file name>.part     an interrupted download (resumed with HTTP Range)
    downloads/<published file name>.lock     flock'ed while one process downloads / verifies / converts
    converted/<name>-<entry digest>.pt       the nlvid checkpoint: weights, config (architecture options and the
                                             source's preprocessing), Kinetics-400 class names

Download: urllib; atomic (`.part`, then rename); a partial file is resumed with a Range request where the server
allows (a 200 answer restarts it); transient failures (dropped connection, timeout, 5xx) are retried with
exponential backoff, then the next mirror; 403/404/410 go to the next mirror at once. `NLVID_ZOO_MIRROR=URL`
replaces scheme and host (and prefixes the path) of every URL; `NLVID_OFFLINE=1` never touches the network.

Trust: a published hash (MMAction2 / torchvision: the first 8 hex digits of the SHA-256 in the file name) must
match, else the file is deleted and the error shows both hashes. Without one, the file must pass the strict import
(every key mapped, every shape checked) before it is kept, and its SHA-256 is recorded beside it: a later file
under the same name with another hash is refused. The container is told from the bytes (`convert.sniff_format`)
and read by the safe loaders (`checkpoint.read_torch_file`, convert's Caffe2 unpickler).

Progress goes through `progress(event, **data)`: "notice" (text: licence and source, before a download),
"download" (url, total, done), "bytes" (done, total), "retry" (url, error, wait), "mirror" (url, error: trying the
next URL), "downloaded" (path), "verify" (path), "convert" (name), "report" (lines), "converted" (path).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from nlvid import __version__
from nlvid.checkpoint import read_torch_file, save_checkpoint
from nlvid.config import Config, ModelConfig, config_from_dict
from nlvid.errors import CheckpointError, ConfigError
from nlvid.models.convert import kinetics400_classes, sniff_format
from nlvid.models.presets import create_model
from nlvid.models.weights import build_with_init, inflate_torchvision
from nlvid.models.zoo import ZooEntry, get_entry

try:  # POSIX; elsewhere concurrent downloads of one file are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

ENV_HOME = "NLVID_HOME"
ENV_MIRROR = "NLVID_ZOO_MIRROR"
ENV_OFFLINE = "NLVID_OFFLINE"

RETRIES = 3  # retries per URL after the first attempt (transient failures only)
BACKOFF_S = 1.0  # wait before retry k: BACKOFF_S * 2**k
TIMEOUT_S = 60.0  # socket timeout of one request
CHUNK = 1 << 20

Progress = Callable[..., None]


def _quiet(event: str, **data: Any) -> None:
    pass


# ---------------------------------------------------------------------------------------------- places


def nlvid_home() -> Path:
    """$NLVID_HOME, else $XDG_CACHE_HOME/nlvid, else ~/.cache/nlvid."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nlvid"
    return Path.home() / ".cache" / "nlvid"


def source_path(entry: ZooEntry) -> Path:
    """Where the published file lives in the cache (and where a manually downloaded copy can be put)."""
    return nlvid_home() / "downloads" / entry.file_name


def converted_path(entry: ZooEntry) -> Path:
    return nlvid_home() / "converted" / f"{entry.name}-{entry.digest()}.pt"


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no")


def entry_urls(entry: ZooEntry) -> list[str]:
    """The URLs to try in order; with $NLVID_ZOO_MIRROR each has its scheme and host replaced (duplicates
    dropped), e.g. http://127.0.0.1:8000/zoo + https://host/a/b.pkl -> http://127.0.0.1:8000/zoo/a/b.pkl."""
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    if not mirror:
        return list(entry.urls)
    m = urllib.parse.urlsplit(mirror)
    if not m.scheme or not m.netloc:
        raise ConfigError(f"{ENV_MIRROR}={mirror!r}: expected a URL like http://host:port[/prefix]")
    out: list[str] = []
    for url in entry.urls:
        u = urllib.parse.urlsplit(url)
        new = urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))
        if new not in out:
            out.append(new)
    return out


def cache_state(entry: ZooEntry) -> str:
    """'converted' (ready to use), 'downloaded' (source file verified, not converted yet), 'partial' or 'no'."""
    if entry.is_classifier and converted_path(entry).exists():
        return "converted"
    src = source_path(entry)
    if src.exists() and _record_path(src).exists():
        return "downloaded"
    if src.with_name(src.name + ".part").exists():
        return "partial"
    return "no"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block: one process (or thread) at a time works on a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- download


class _NotFound(Exception):
    pass


class _Unreachable(Exception):
    """The host cannot be reached at all (DNS, refused, no route): retrying the same URL does not help."""


def _unreachable(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _write(f, chunk: bytes) -> None:
    f.write(chunk)


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _fetch(url: str, part: Path, progress: Progress) -> None:
    """Download `url` into `part`, resuming from its current size when the server honours Range."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"nlvid/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code in (403, 404, 410):
            raise _NotFound(f"HTTP {e.code}") from None
        if e.code == 416:  # the partial file is not a prefix the server can continue: start again
            part.unlink(missing_ok=True)
        raise
    except urllib.error.URLError as e:
        if _unreachable(e):
            raise _Unreachable(str(getattr(e, "reason", e))) from None
        raise
    with resp:
        if start and resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                part.unlink(missing_ok=True)
                raise OSError(f"unexpected Content-Range {content_range!r}")
            mode = "ab"
        else:
            start, mode = 0, "wb"  # the server sent the whole file
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        progress("download", url=url, total=total, done=start)
        done = start
        try:
            with open(part, mode) as f:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    _write(f, chunk)
                    done += len(chunk)
                    progress("bytes", done=done, total=total)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if _disk_full(e):
                raise
            raise OSError(f"connection lost after {done} bytes ({e})") from None
    if total is not None and done != total:
        raise OSError(f"connection closed after {done} of {total} bytes")


def _download(entry: ZooEntry, part: Path, progress: Progress) -> str:
    """Fetch the entry into `part` from the first URL that works; returns that URL. CheckpointError when none did."""
    urls = entry_urls(entry)
    final = source_path(entry)
    failures: list[tuple[str, str, bool]] = []  # (url, reason, not found)
    for i, url in enumerate(urls):
        for attempt in range(RETRIES + 1):
            try:
                _fetch(url, part, progress)
                return url
            except _NotFound as e:
                failures.append((url, str(e), True))
                break
            except _Unreachable as e:
                failures.append((url, str(e), False))
                break
            except OSError as e:
                if _disk_full(e):
                    part.unlink(missing_ok=True)
                    raise CheckpointError(f"disk full while downloading {entry.file_name} into {part.parent} "
                                          f"(nothing kept); free space or point {ENV_HOME} at another disk") from None
                error = str(getattr(e, "reason", None) or e)
            except (http.client.HTTPException, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < RETRIES:
                wait = BACKOFF_S * 2 ** attempt
                progress("retry", url=url, error=error, wait=wait)
                time.sleep(wait)
            else:
                failures.append((url, error, False))
        if i + 1 < len(urls):
            progress("mirror", url=urls[i + 1], error=failures[-1][1])
    if failures and all(nf for _, _, nf in failures):
        raise CheckpointError(f"{entry.name}: not found on any mirror ({'; '.join(f'{u}: {r}' for u, r, _ in failures)})")
    url, reason, _ = next(f for f in failures if not f[2])
    raise CheckpointError(f"{entry.name}: cannot download {url} ({reason}); download it by other means and put "
                          f"it at {final}")


# ---------------------------------------------------------------------------------------------- verify, convert


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_CONTAINERS = {"caffe2": ("pickle",), "mmaction2": ("zip", "torch-legacy"), "imagenet": ("zip", "torch-legacy"),
               "pyslowfast": ("pickle", "zip", "torch-legacy")}


def _import(entry: ZooEntry, path: Path) -> dict[str, Any]:
    """The strict import of the entry's file -> {"model", "model_cfg", "classes", "report"} (CheckpointError)."""
    kind = sniff_format(path)
    if kind not in _CONTAINERS[entry.format]:
        raise CheckpointError(f"{path}: the file is a {kind} file; a {entry.format} file is a "
                              f"{' or '.join(_CONTAINERS[entry.format])} file")
    model_cfg = ModelConfig(name=entry.preset, **copy.deepcopy(entry.model))
    if entry.format == "imagenet":
        model = create_model(entry.preset)
        result = inflate_torchvision(model, read_torch_file(path, what="torchvision weights"))
        return {"model": model, "model_cfg": model_cfg, "classes": None, "report": result["lines"]}
    model, new_cfg, classes, report = build_with_init(model_cfg, f"{entry.format}={path}")
    return {"model": model, "model_cfg": new_cfg, "classes": classes, "report": report}


def _verify(entry: ZooEntry, path: Path, progress: Progress, url: str | None) -> dict[str, Any] | None:
    """Check `path` (a fresh download or a file put in the cache by hand) and record its hash; the file is deleted
    when it fails. Returns the import when it had to be done to trust the file (no published hash)."""
    progress("verify", path=str(path))
    digest = sha256_file(path)
    record = _record_path(source_path(entry))
    imported = None
    if entry.sha256:
        if not digest.startswith(entry.sha256.lower()):
            path.unlink(missing_ok=True)
            raise CheckpointError(f"{entry.file_name}: SHA-256 {digest} does not match the published "
                                  f"{entry.sha256} (file deleted; the download was corrupted or replaced)")
    else:
        if record.exists():
            known = record.read_text().split()[0] if record.read_text().strip() else ""
            if known and known != digest:
                path.unlink(missing_ok=True)
                raise CheckpointError(f"{entry.file_name}: SHA-256 {digest} differs from the {known} recorded "
                                      f"when this file was first downloaded (file deleted; delete {record} to "
                                      "accept a new version)")
        try:
            imported = _import(entry, path)
        except (CheckpointError, ConfigError) as e:
            path.unlink(missing_ok=True)
            raise CheckpointError(f"{entry.file_name} failed the strict import and was not kept: {e}") from None
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(f"{digest}  {url or 'placed by hand'}\n")
    os.replace(tmp, record)
    return imported


def _ensure_source(entry: ZooEntry, progress: Progress) -> tuple[Path, dict[str, Any] | None]:
    """The verified source file (downloading it if needed). Call with the entry's lock held."""
    final = source_path(entry)
    if final.exists():
        if _record_path(final).exists():
            return final, None
        return final, _verify(entry, final, progress, None)  # put there by hand: check it now
    if offline():
        raise CheckpointError(f"{entry.name}: not in the cache and {ENV_OFFLINE} is set: download "
                              f"{entry_urls(entry)[0]} and put it at {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    progress("notice", text=f"{entry.name}: {entry.file_name} from {entry.source}, licence {entry.license}"
             + (" (non-commercial use only)" if "NC" in entry.license else ""))
    part = final.with_name(final.name + ".part")
    url = _download(entry, part, progress)
    progress("downloaded", path=str(part))
    imported = _verify(entry, part, progress, url)
    os.replace(part, final)
    return final, imported


def source_file(name: str | ZooEntry, *, progress: Progress | None = None) -> Path:
    """The verified published file of a registry entry, downloaded into the cache if needed."""
    entry = name if isinstance(name, ZooEntry) else get_entry(name)
    progress = progress or _quiet
    final = source_path(entry)
    if final.exists() and _record_path(final).exists():
        return final
    with _locked(final.with_name(final.name + ".lock")):
        return _ensure_source(entry, progress)[0]


def pretrained_checkpoint(name: str | ZooEntry, *, progress: Progress | None = None) -> Path:
    """The nlvid checkpoint of a registry entry (downloaded, verified and converted once, then read from the cache).

    Its config holds the entry's architecture options and the source's preprocessing (`data.*`), so eval, predict
    and visualize feed the model as the source did; its classes are the Kinetics-400 names.
    """
    entry = name if isinstance(name, ZooEntry) else get_entry(name)
    if not entry.is_classifier:
        raise ConfigError(f"{entry.name} is an ImageNet backbone, not a video classifier: use it to initialise a "
                          f"model (`nlvid build PRESET --pretrained {entry.name}`, `nlvid train DATA --pretrained "
                          f"{entry.name}`)", key="pretrained")
    progress = progress or _quiet
    out = converted_path(entry)
    if out.exists():
        return out
    src = source_path(entry)
    with _locked(src.with_name(src.name + ".lock")):
        if out.exists():  # another process converted it while we waited
            return out
        path, imported = _ensure_source(entry, progress)
        progress("convert", name=entry.name)
        if imported is None:
            imported = _import(entry, path)
        progress("report", lines=list(imported["report"]))
        cfg = Config()
        cfg.model = imported["model_cfg"]
        data = config_from_dict({"data": copy.deepcopy(entry.data)}).data  # checked like any config
        cfg.data = data
        classes = imported["classes"] or (kinetics400_classes() if cfg.model.num_classes == 400
                                          else [f"class_{i}" for i in range(cfg.model.num_classes)])
        save_checkpoint(out, model_state=imported["model"].state_dict(), config=cfg.to_dict(), classes=classes,
                        pretrained={"name": entry.name, "file": entry.file_name, "source": entry.source,
                                    "license": entry.license, "sha256": _record_path(path).read_text().split()[0],
                                    "top1": entry.top1, "top5": entry.top5, "protocol": entry.protocol})
        progress("converted", path=str(out))
    return out


__all__ = ["ENV_HOME", "ENV_MIRROR", "ENV_OFFLINE", "cache_state", "converted_path", "entry_urls", "nlvid_home",
           "offline", "pretrained_checkpoint", "sha256_file", "source_file", "source_path"]
