"""Datasets: layouts, annotation lists, the cached scan, VideoDataset/make_loader determinism, error policy,
transforms and test views."""

from __future__ import annotations

import io
import logging
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from rich.console import Console

import nlvid.data.dataset as ds_mod
from nlvid.cli.common import format_scan_table
from nlvid.data import (
    VideoDataset,
    make_loader,
    resolve_splits,
    scan_dataset,
    write_synthetic,
)
from nlvid.data import transforms as T
from nlvid.data.sampling import uniform_starts
from nlvid.errors import DatasetError, DecodeError

CLASSES = ["diff_shape_diff_colour", "diff_shape_same_colour", "same_shape_diff_colour", "same_shape_same_colour"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, classes=4, clips_per_class=3, seed=0)  # 2 train + 1 val per class
    return root


@pytest.fixture()
def data_copy(synth_root, tmp_path, monkeypatch):
    """A private, writable copy of the train split (tests add broken files to it)."""
    monkeypatch.setenv("NLVID_CACHE_DIR", str(tmp_path / "usercache"))
    dst = tmp_path / "data"
    shutil.copytree(synth_root / "train", dst)
    return dst


def _counting_probe(monkeypatch):
    calls = []
    real = ds_mod.probe

    def fake(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(ds_mod, "probe", fake)
    return calls


# ---------------------------------------------------------------------------------------------- layouts


def test_resolve_splits(synth_root, tmp_path):
    assert resolve_splits(synth_root) == (synth_root / "train", synth_root / "val")
    assert resolve_splits(synth_root / "train") == (synth_root / "train", None)
    lst = tmp_path / "a.txt"
    lst.write_text("x 0\n")
    assert resolve_splits(lst, tmp_path / "a.txt") == (lst, lst)
    with pytest.raises(DatasetError, match="nope"):
        resolve_splits(tmp_path / "nope")


def test_scan_folder_per_class(data_copy):
    index = scan_dataset(data_copy)
    assert index.classes == CLASSES  # sorted folder names
    assert len(index.items) == 8 and index.unreadable == []
    assert index.counts == {c: 2 for c in CLASSES}
    assert all(index.classes[lb] == p.parent.name for p, lb in index.items)
    info = index.infos[str(index.items[0][0])]
    assert (info.width, info.height, info.num_frames) == (64, 64, 16)


def test_scan_unreadable_skip_and_fail(data_copy):
    (data_copy / CLASSES[0] / "empty.mp4").write_bytes(b"")
    (data_copy / CLASSES[1] / "notes.mp4").write_text("not a video\n")
    (data_copy / CLASSES[1] / "readme.txt").write_text("ignored\n")
    index = scan_dataset(data_copy)
    assert len(index.items) == 8
    bad = {p.name: reason for p, reason in index.unreadable}
    assert set(bad) == {"empty.mp4", "notes.mp4"} and "0 bytes" in bad["empty.mp4"]
    assert index.unreadable_counts[CLASSES[0]] == 1 and [p.name for p in index.ignored] == ["readme.txt"]
    buf = io.StringIO()
    Console(file=buf, width=120).print(format_scan_table(index))
    text = buf.getvalue()
    assert "unreadable" in text and "empty.mp4" in text and CLASSES[3] in text and "total" in text
    with pytest.raises(DatasetError, match="2 unreadable") as ei:
        scan_dataset(data_copy, on_error="fail")
    assert "empty.mp4" in str(ei.value)


def test_scan_cache_second_run_does_not_probe(data_copy, monkeypatch):
    calls = _counting_probe(monkeypatch)
    scan_dataset(data_copy)
    assert len(calls) == 8 and (data_copy / ".nlvid_scan.json").is_file()
    calls.clear()
    again = scan_dataset(data_copy)
    assert calls == [] and again.probed == 0 and len(again.items) == 8
    # a changed file (size/mtime) is probed again, alone
    victim = again.items[0][0]
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    scan_dataset(data_copy)
    assert calls == [victim]


def test_scan_cache_read_only_folder_uses_user_cache(data_copy, monkeypatch, tmp_path):
    calls = _counting_probe(monkeypatch)
    mode = data_copy.stat().st_mode
    os.chmod(data_copy, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        first = scan_dataset(data_copy)
        assert not (data_copy / ".nlvid_scan.json").exists()
        assert first.cache_path is not None and first.cache_path.parent == tmp_path / "usercache"
        calls.clear()
        scan_dataset(data_copy)
        assert calls == []
    finally:
        os.chmod(data_copy, mode)


def test_scan_with_fixed_classes(data_copy):
    index = scan_dataset(data_copy, classes=list(reversed(CLASSES)))
    assert index.classes == list(reversed(CLASSES))
    assert all(index.classes[lb] == p.parent.name for p, lb in index.items)
    with pytest.raises(DatasetError, match="not one of the 2 known classes"):
        scan_dataset(data_copy, classes=CLASSES[:2])


def test_empty_dataset_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no videos found"):
        scan_dataset(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.mp4").write_bytes(b"x")
    with pytest.raises(DatasetError, match="no class folders"):
        scan_dataset(tmp_path / "flat")


# ---------------------------------------------------------------------------------------------- annotation lists


def test_annotation_lists(data_copy, tmp_path):
    vids = sorted(data_copy.rglob("*.mp4"))
    ann = tmp_path / "lists"
    ann.mkdir()
    # whitespace, label names, comment, relative paths (relative to the list file)
    lines = ["# my list", ""] + [f"{os.path.relpath(v, ann)} {v.parent.name}" for v in vids]
    (ann / "train.txt").write_text("\n".join(lines) + "\n")
    index = scan_dataset(ann / "train.txt")
    assert index.classes == CLASSES and len(index.items) == 8
    assert all(index.classes[lb] == p.parent.name for p, lb in index.items)
    # CSV with a header and integer labels
    rows = ["path,label"] + [f"{v},{CLASSES.index(v.parent.name)}" for v in vids]
    (ann / "val.csv").write_text("\n".join(rows) + "\n")
    index2 = scan_dataset(ann / "val.csv", classes=CLASSES)
    assert [lb for _, lb in index2.items] == [lb for _, lb in index.items]
    assert resolve_splits(ann / "train.txt", ann / "val.csv") == (ann / "train.txt", ann / "val.csv")


def test_annotation_list_errors_name_file_and_line(data_copy, tmp_path):
    v = next(data_copy.rglob("*.mp4"))
    bad_label = tmp_path / "a.txt"
    bad_label.write_text(f"{v} {CLASSES[0]}\n{v} no_such_class\n")
    with pytest.raises(DatasetError, match=r"a\.txt:2: unknown label 'no_such_class'"):
        scan_dataset(bad_label, classes=CLASSES)
    missing = tmp_path / "b.txt"
    missing.write_text(f"# header comment\n{v} 0\nmissing.mp4 1\n")
    with pytest.raises(DatasetError, match=r"b\.txt:3: video 'missing.mp4' not found"):
        scan_dataset(missing)
    mixed = tmp_path / "c.txt"
    mixed.write_text(f"{v} 0\n{v} cat\n")
    with pytest.raises(DatasetError, match=r"c\.txt:1"):
        scan_dataset(mixed)
    empty = tmp_path / "d.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(DatasetError, match="no entries"):
        scan_dataset(empty)


# ---------------------------------------------------------------------------------------------- dataset + loader


def _train_ds(items, **kw):
    return VideoDataset(items, train=True, num_frames=8, stride=2, train_short_side=(64, 80), crop_size=56, **kw)


def test_train_items_depend_on_seed_epoch_index_only(data_copy):
    items = scan_dataset(data_copy).items
    a = _train_ds(items, seed=3)
    clip, label, index = a[5]
    assert clip.shape == (3, 8, 56, 56) and clip.dtype == torch.float32 and index == 5 and label == items[5][1]
    b = _train_ds(items, seed=3)
    assert torch.equal(b[5][0], clip)  # a fresh dataset (a resumed run) sees the same clip
    b.set_epoch(1)
    assert not torch.equal(b[5][0], clip)
    assert torch.equal(b[(5, 0)][0], clip)  # (index, epoch) keys, as make_loader sends them
    assert not torch.equal(_train_ds(items, seed=4)[5][0], clip)


def test_test_items_views(data_copy):
    items = scan_dataset(data_copy).items
    d = VideoDataset(items, train=False, num_frames=4, stride=2, test_short_side=64, test_crop_size=48,
                     num_clips=2, num_crops=3)
    views, label, index = d[0]
    assert views.shape == (6, 3, 4, 48, 48) and index == 0
    assert torch.equal(d[0][0], views)  # no randomness at test time


def test_failing_video_skip_and_fail(data_copy, tmp_path, caplog):
    items = scan_dataset(data_copy).items
    broken = tmp_path / "gone.mp4"
    broken.write_bytes(b"")
    bad_items = items[:2] + [(broken, 1)] + items[2:4]
    d = _train_ds(bad_items, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="nlvid.data.dataset"):
        clip, label, index = d[2]
    assert index == 3 and label == bad_items[3][1]  # next item substituted, deterministically
    assert torch.equal(clip, d.load(3, 0))
    err = "\n".join(r.getMessage() for r in caplog.records)
    assert "gone.mp4" in err and "warning" in err
    assert len(d.failures) == 1
    with pytest.raises(DecodeError, match="gone.mp4"):
        _train_ds(bad_items, on_error="fail")[2]


def test_make_loader_deterministic_order(data_copy):
    items = scan_dataset(data_copy).items
    d = _train_ds(items, seed=1)
    loader = make_loader(d, batch_size=4, shuffle=True, num_workers=0, seed=1)
    order0 = [b[2].tolist() for b in loader]
    assert sorted(sum(order0, [])) == list(range(8))
    assert [b[2].tolist() for b in loader] == order0  # same epoch, same order
    d.set_epoch(1)
    order1 = [b[2].tolist() for b in loader]
    assert order1 != order0
    plain = make_loader(d, batch_size=3, shuffle=False, num_workers=0, seed=1, sampler=[7, 1, 4])
    (clips, labels, idx), = list(plain)
    assert idx.tolist() == [7, 1, 4] and clips.shape == (3, 3, 8, 56, 56)


def test_make_loader_workers_match_main_process(data_copy):
    items = scan_dataset(data_copy).items
    d = _train_ds(items, seed=2)
    d.set_epoch(3)
    ref = torch.stack([d[i][0] for i in range(4)])
    loader = make_loader(d, batch_size=4, shuffle=False, num_workers=2, seed=2, sampler=[0, 1, 2, 3])
    assert loader.persistent_workers
    (clips, _, idx), = list(loader)
    assert idx.tolist() == [0, 1, 2, 3] and torch.equal(clips, ref)


# ---------------------------------------------------------------------------------------------- transforms


def test_test_views_boxes_landscape_and_portrait():
    yy, xx = np.mgrid[0:240, 0:320]
    img = np.stack([xx * 255 / 320, yy * 255 / 240, 128 + 100 * np.sin(xx / 20) * np.cos(yy / 15)], -1)
    frames = np.stack([img, img[:, ::-1]]).astype(np.uint8)  # smooth, so sub-pixel box rounding is harmless
    views, boxes = T.test_views(frames, short_side=256, crop_size=256, num_crops=3)
    assert views.shape == (3, 3, 2, 256, 256)
    # left / centre / right along the long side, in original pixels
    assert boxes[0][0] == 0 and boxes[2][2] == pytest.approx(320, abs=0.6)
    assert boxes[1][0] == pytest.approx((320 - 240) / 2, abs=0.6)
    assert all(b[1] == 0 and b[3] == pytest.approx(240) for b in boxes)
    one, box1 = T.test_views(frames.transpose(0, 2, 1, 3), short_side=128, crop_size=128, num_crops=1)
    assert one.shape == (1, 3, 2, 128, 128) and box1[0][1] == pytest.approx(40, abs=2)  # portrait: centred on H
    # a view is the resized crop of the box region: compare view 2 against a manual crop
    x0, y0, x1, y1 = (round(v) for v in boxes[2])
    manual = T.normalize(T.resize_short_side(T.to_tchw(frames[:, y0:y1, x0:x1]), 256))
    assert (views[2] - manual).abs().mean() < 0.1


def test_train_transform_shapes_and_normalisation():
    rng = np.random.default_rng(0)
    grey = np.full((4, 100, 150, 3), round(0.45 * 255), np.uint8)
    out = T.train_transform(grey, rng=rng, short_side=(64, 80), crop_size=56)
    assert out.shape == (3, 4, 56, 56) and out.abs().max() < 0.02
    small = np.zeros((4, 30, 40, 3), np.uint8)
    assert T.train_transform(small, rng=rng, short_side=None, crop_size=56).shape == (3, 4, 56, 56)


def test_uniform_starts():
    assert uniform_starts(100, num_frames=8, stride=2, num_clips=3) == [0, 42, 85]
    assert uniform_starts(10, num_frames=8, stride=2, num_clips=4) == [0, 0, 0, 0]
    assert uniform_starts(100, num_frames=8, stride=2, num_clips=1) == [42]
