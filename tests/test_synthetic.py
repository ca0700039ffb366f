"""The synthetic long-range dataset: real files, annotations that match the pixels, labels from the relation,
determinism, the `nlvid synth` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from nlvid.cli import main
from nlvid.data import probe, read_clip, scan_dataset, write_synthetic
from nlvid.data.synthetic import HUES, NUM_FRAMES, SIZE, class_names
from nlvid.errors import ConfigError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = write_synthetic(root, classes=4, clips_per_class=4, seed=7)
    return root, summary


def _frames(path):
    return read_clip(path, num_frames=NUM_FRAMES, stride=1, start=0)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int16)
    return rgb.max(-1) - rgb.min(-1)


def test_layout_and_annotations(synth):
    root, summary = synth
    ann = json.loads((root / "annotations.json").read_text())
    assert ann["classes"] == sorted(class_names(4)) and ann["num_frames"] == NUM_FRAMES
    assert ann["size"] == [SIZE, SIZE] and ann["fps"] > 0
    assert summary["train"] == 12 and summary["val"] == 4  # a held-out quarter per class
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.mp4"))
    assert files == sorted(ann["clips"])
    for rel, meta in ann["clips"].items():
        split, cls, _ = rel.split("/")
        assert split in ("train", "val") and meta["label"] == cls
        assert len(meta["objects"]) == 2
        for obj in meta["objects"]:
            t0, t1 = obj["frames"]
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= t0 <= t1 < NUM_FRAMES and 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
    # scanned by the normal dataset code: sorted class folders = annotation classes
    index = scan_dataset(root / "train")
    assert index.classes == ann["classes"] and len(index.items) == 12


def test_files_are_real_h264(synth):
    root, _ = synth
    import av

    path = next(root.rglob("*.mp4"))
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.format.name == "yuv420p"
    info = probe(path)
    assert (info.width, info.height, info.num_frames) == (SIZE, SIZE, NUM_FRAMES)


def test_objects_where_annotated_and_label_is_the_relation(synth):
    root, _ = synth
    ann = json.loads((root / "annotations.json").read_text())
    for rel, meta in ann["clips"].items():
        frames = _frames(root / rel)
        a, b = meta["objects"]
        assert a["frames"][0] == 0 and b["frames"][1] == NUM_FRAMES - 1  # first frames vs last frames
        assert a["frames"][1] < b["frames"][0]
        # opposite halves of the frame
        ca, cb = (a["box"][0] + a["box"][2]) / 2, (b["box"][0] + b["box"][2]) / 2
        assert (ca < SIZE / 2) != (cb < SIZE / 2)
        for obj in (a, b):
            x0, y0, x1, y1 = obj["box"]
            hue = HUES.index(obj["colour"])
            inside = frames[obj["frames"][0], y0:y1, x0:x1]
            sat = _saturation(inside)
            assert (sat > 100).mean() > 0.15, rel  # a saturated object inside its box
            dominant = np.bincount(inside[sat > 100].argmax(-1), minlength=3).argmax()
            assert dominant == hue
        # nothing saturated in the frames between the two objects (distractor is grey)
        gap = frames[a["frames"][1] + 1 : b["frames"][0]]
        assert (_saturation(gap) > 100).mean() < 0.002
        same_shape = a["shape"] == b["shape"]
        same_colour = a["colour"] == b["colour"]
        expect = f"{'same' if same_shape else 'diff'}_shape_{'same' if same_colour else 'diff'}_colour"
        assert meta["label"] == expect


def test_deterministic_from_seed(tmp_path):
    write_synthetic(tmp_path / "a", classes=2, clips_per_class=2, seed=3)
    write_synthetic(tmp_path / "b", classes=2, clips_per_class=2, seed=3)
    write_synthetic(tmp_path / "c", classes=2, clips_per_class=2, seed=4)
    rel = "train/diff_shape/diff_shape_0000.mp4"
    fa, fb, fc = (_frames(tmp_path / d / rel) for d in "abc")
    assert np.array_equal(fa, fb) and not np.array_equal(fa, fc)
    assert (tmp_path / "a" / "annotations.json").read_text() == (tmp_path / "b" / "annotations.json").read_text()


def test_same_seed_writes_the_same_bytes(tmp_path):
    """`nlvid synth` run again (in a new process, as a user regenerating a set would) writes byte-identical MP4s,
    so training on regenerated data repeats exactly. With x264's SIMD paths 1-3 of these 100 files differed between
    two processes (and 12-16 of 400 between two generations in one process) though the pixels given to x264 were
    identical; three processes here."""
    files = {}
    for name in "abc":
        subprocess.run([sys.executable, "-m", "nlvid", "synth", str(tmp_path / name), "--classes", "4",
                        "--clips-per-class", "25", "--seed", "0"], check=True, capture_output=True)
        files[name] = {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.mp4")}
    assert len(files["a"]) == 100 and files["a"].keys() == files["b"].keys() == files["c"].keys()
    for other in "bc":
        assert [str(r) for r in files["a"] if files["a"][r] != files[other][r]] == [], other


def test_six_classes_and_bad_count(tmp_path):
    names = class_names(6)
    assert len(names) == 6 and len(set(names)) == 6
    with pytest.raises(ConfigError, match="2, 4, 6"):
        write_synthetic(tmp_path, classes=5, clips_per_class=1)


def test_cli_synth(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["synth", str(tmp_path / "s"), "--classes", "2", "--clips-per-class", "2", "--seed", "1"])
    assert ei.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("wrote 4 clips (2 train, 2 val, 2 classes")
    assert len(list((tmp_path / "s").rglob("*.mp4"))) == 4
    with pytest.raises(SystemExit) as ei:
        main(["synth", str(tmp_path / "t"), "--classes", "3"])
    assert ei.value.code == 2
    assert "2, 4, 6" in capsys.readouterr().err
