"""The dataset scan at scale: parallel probing equals serial, the cache (hits open no video, changed files are probed
again, deleted ones disappear, damaged caches are rebuilt with a warning), symbolic links, and the probe's fast
first frame. Small folders of hard links to the shared clips stand in for Kinetics (benchmarks/bench_scan.py
times the 10k-file case)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from dataclasses import asdict
from pathlib import Path

import pytest

import nlvid.data.dataset as ds_mod
from nlvid.data import probe, scan_dataset
from nlvid.data import decode as dec
from nlvid.errors import DecodeError

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
CLIPS = sorted(p for p in VIDEOS.glob("*") if p.suffix.lower() in {".mp4", ".avi", ".mkv", ".mov"}) \
    if VIDEOS.is_dir() else []
pytestmark = pytest.mark.skipif(len(CLIPS) < 5, reason="needs ../shared/data/videos")


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    """60 files in 4 class folders (one nested folder, one hidden file, a text file, a broken video): hard links
    to private copies of the shared clips."""
    monkeypatch.setenv("NLVID_CACHE_DIR", str(tmp_path / "usercache"))
    src = tmp_path / "src"
    src.mkdir()
    clips = [Path(shutil.copy2(c, src / c.name)) for c in CLIPS]
    root = tmp_path / "data"
    for i in range(60):
        c = clips[i % len(clips)]
        d = root / f"c{i % 4}" / ("sub" if i % 17 == 5 else "")
        d.mkdir(parents=True, exist_ok=True)
        os.link(c, d / f"v{i:03d}{c.suffix}")
    (root / "c0" / ".hidden.mp4").write_bytes(b"")
    (root / "c1" / "notes.txt").write_text("not a video\n")
    (root / "c2" / "broken.mp4").write_bytes(b"\x00" * 512)
    return root


def _no_probe(monkeypatch):
    def fail(path):
        raise AssertionError(f"probed {path}")

    monkeypatch.setattr(ds_mod, "probe", fail)


def _same_index(a, b) -> None:
    assert a.classes == b.classes and a.items == b.items and a.counts == b.counts
    assert [(p, r) for p, r in a.unreadable] == [(p, r) for p, r in b.unreadable]
    assert a.infos == b.infos and a.ignored == b.ignored


def test_parallel_scan_equals_serial(folder):
    serial = scan_dataset(folder, cache=False, workers=1)
    parallel = scan_dataset(folder, cache=False, workers=4)
    _same_index(serial, parallel)
    assert len(serial.items) == 60 and [p.name for p, _ in serial.unreadable] == ["broken.mp4"]
    assert [p.name for p in serial.ignored] == ["notes.txt"]
    # the order of the Path.rglob listing the scan used before: class folders sorted, then sorted(rglob)
    expected = [f for d in sorted(folder.iterdir()) for f in sorted(d.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(d).parts)
                and f.suffix.lower() in ds_mod.VIDEO_EXTENSIONS]
    bad = {p for p, _ in serial.unreadable}
    assert [p for p, _ in serial.items] == [f for f in expected if f not in bad]
    assert [p for p, _ in serial.unreadable] == [f for f in expected if f in bad]
    # the metadata is probe()'s
    p0 = serial.items[0][0]
    assert serial.infos[str(p0)] == probe(p0)


def test_cache_hit_opens_no_video(folder, monkeypatch):
    first = scan_dataset(folder, workers=2)
    assert first.probed == 61 and first.cache_path == folder / ds_mod.CACHE_NAME
    _no_probe(monkeypatch)
    monkeypatch.setattr(dec.av, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("av.open called")))
    again = scan_dataset(folder)
    assert again.probed == 0
    _same_index(first, again)


def test_changed_file_is_probed_again_and_deleted_file_disappears(folder, monkeypatch):
    first = scan_dataset(folder)
    calls = []
    real = ds_mod.probe
    monkeypatch.setattr(ds_mod, "probe", lambda p: calls.append(Path(p)) or real(p))
    changed, deleted = first.items[3][0], first.items[7][0]
    changed.unlink()  # a new file under the old name: other size and mtime
    shutil.copyfile(CLIPS[0], changed)
    deleted.unlink()
    again = scan_dataset(folder)
    assert calls == [changed] and again.probed == 1
    assert deleted not in [p for p, _ in again.items] and len(again.items) == len(first.items) - 1
    assert again.infos[str(changed)] == probe(CLIPS[0])
    data = json.loads((folder / ds_mod.CACHE_NAME).read_text())
    assert os.path.realpath(deleted) not in data["files"] and os.path.realpath(changed) in data["files"]
    # mtime alone (same size) also counts as a change
    calls.clear()
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    scan_dataset(folder)
    assert calls == [changed]


def test_damaged_cache_is_rebuilt_with_a_warning(folder, caplog):
    scan_dataset(folder)
    cache = folder / ds_mod.CACHE_NAME
    cache.write_text(cache.read_text()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="nlvid.data.dataset"):
        again = scan_dataset(folder)
    assert again.probed == 61 and "damaged" in caplog.text and str(cache) in caplog.text
    assert json.loads(cache.read_text())["version"] == ds_mod._CACHE_VERSION
    caplog.clear()
    data = json.loads(cache.read_text())
    key = next(iter(data["files"]))
    data["files"][key]["info"]["width"] = True  # a bool where an int belongs
    cache.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="nlvid.data.dataset"):
        assert scan_dataset(folder).probed == 1
    assert "1 scan cache entries" in caplog.text


def test_cache_file_is_readable_by_others(folder):
    scan_dataset(folder)
    mode = stat.S_IMODE((folder / ds_mod.CACHE_NAME).stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_progress_reports_every_file(folder):
    seen = []
    scan_dataset(folder, progress=lambda done, total: seen.append((done, total)), workers=3)
    assert seen[0] == (0, 61) and seen[-1] == (61, 61) and len(seen) == 62
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen.clear()
    scan_dataset(folder, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(61, 61)]


def test_symlinks_share_one_probe_and_link_into_other_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("NLVID_CACHE_DIR", str(tmp_path / "usercache"))
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    os.symlink(CLIPS[0], root / "a" / "x.mp4")
    os.symlink(CLIPS[0], root / "b" / "y.mp4")
    os.symlink(tmp_path / "nowhere.mp4", root / "b" / "dangling.mp4")
    os.symlink(root / "a", root / "b" / "linked_dir")  # like rglob: a linked folder is not entered
    calls = []
    real = ds_mod.probe
    monkeypatch.setattr(ds_mod, "probe", lambda p: calls.append(p) or real(p))
    index = scan_dataset(root)
    assert [p.name for p, _ in index.items] == ["x.mp4", "y.mp4"] and len(calls) == 1
    data = json.loads((root / ds_mod.CACHE_NAME).read_text())
    assert list(data["files"]) == [os.path.realpath(CLIPS[0])]


def test_annotation_list_keys_match_folder_keys(folder, tmp_path, monkeypatch):
    """A list naming the same files (relative, with '..', absolute) hits the same resolved-path records."""
    index = scan_dataset(folder)
    lines = [f"{os.path.relpath(p, folder)} {index.classes[lb]}" for p, lb in index.items[:10]]
    lines[1] = f"c9/../{lines[1]}"
    lines[2] = f"{index.items[2][0]} {index.classes[index.items[2][1]]}"
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    _no_probe(monkeypatch)
    (folder / "c9").mkdir()
    listed = scan_dataset(folder / "list.txt", classes=index.classes)
    assert listed.probed == 0 and len(listed.items) == 10


def test_probe_first_keyframe_matches_the_full_decode(monkeypatch):
    """probe decodes the leading keyframe alone (then flushes); the VideoInfo equals the one from decoding the
    first frame the usual way, on every shared clip."""
    fast = {}
    for c in CLIPS:
        try:
            fast[c.name] = asdict(probe(c))
        except DecodeError as e:
            fast[c.name] = e.reason
    monkeypatch.setattr(dec, "_first_keyframe", lambda v: None)
    for c in CLIPS:
        try:
            slow = asdict(probe(c))
        except DecodeError as e:
            slow = e.reason
        assert fast[c.name] == slow, c.name


@pytest.mark.slow
def test_scan_of_a_thousand_files_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NLVID_CACHE_DIR", str(tmp_path / "usercache"))
    src = tmp_path / "src"
    src.mkdir()
    clips = [Path(shutil.copy2(c, src / c.name)) for c in CLIPS]
    root = tmp_path / "data"
    for i in range(1000):
        c = clips[i % len(clips)]
        d = root / f"c{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(c, d / f"v{i:04d}{c.suffix}")
    first = scan_dataset(root)
    assert first.probed == 1000
    _no_probe(monkeypatch)
    again = scan_dataset(root)
    _same_index(first, again)
