"""nlvid.engine.predict and `nlvid predict`: multi-view averaging, batching, per-file errors, JSON, checkpoints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli  # tests/cli_helpers.py

from nlvid.errors import CheckpointError
from nlvid.cli.options import resolve_checkpoint
from nlvid.engine.predict import predict_files

from conftest import TINY_CLASSES as CLASSES
BROKEN = {"corrupted.mp4", "missing.mp4", "text.mp4"}


def _settings(cfg, **kw):
    from nlvid.config import test_data_kwargs

    return test_data_kwargs(cfg.data, **kw)


@pytest.fixture(scope="module")
def clip_paths(shared_videos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "text.mp4").write_text("this is not a video\n")
    videos = sorted(p for p in shared_videos.iterdir() if p.suffix in (".mp4", ".mkv", ".avi", ".mov"))
    return videos + [tmp / "missing.mp4", tmp / "text.mp4"]


def test_predict_files_real_clips_and_broken_ones(tiny, clip_paths):
    _, model, classes, cfg = tiny
    res = predict_files(model, classes, clip_paths, topk=2, batch_size=3, **_settings(cfg))
    assert [r["file"] for r in res] == [str(p) for p in clip_paths]  # order kept, one result per file
    for p, r in zip(clip_paths, res):
        if p.name in BROKEN:
            assert "error" in r and "top" not in r and r["error"], r
            continue
        assert "error" not in r, r
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {t["label"] for t in r["top"]} <= set(CLASSES)
        assert r["views"] == cfg.data.num_clips * cfg.data.num_crops
    errors = {Path(r["file"]).name: r["error"] for r in res if "error" in r}
    assert set(errors) == BROKEN
    assert "not found" in errors["missing.mp4"]


def test_single_view_equals_the_model_on_the_centred_clip(tiny, shared_videos):
    """clips=1, crops=1: the prediction is the softmax of the model on the centred clip's centre crop."""
    from nlvid.data import read_clip, test_views

    _, model, classes, cfg = tiny
    path = shared_videos / "arm_wrestling_demo.mp4"
    (r,) = predict_files(model, classes, [path], topk=3, **_settings(cfg, num_clips=1, num_crops=1))
    d = cfg.data
    frames = read_clip(path, num_frames=d.num_frames, stride=d.stride, short_side=d.test_short_side)
    views, _ = test_views(frames, short_side=d.test_short_side, crop_size=d.test_crop_size, num_crops=1,
                          mean=d.mean, std=d.std)
    with torch.no_grad():
        p = model(views).softmax(-1)[0]
    want = sorted(((float(v), CLASSES[i]) for i, v in enumerate(p)), reverse=True)
    assert [t["label"] for t in r["top"]] == [n for _, n in want]
    assert np.allclose([t["prob"] for t in r["top"]], [v for v, _ in want], atol=2e-3)


def test_batching_does_not_change_results(tiny, shared_videos):
    _, model, classes, cfg = tiny
    paths = [shared_videos / n for n in ("asl_eat.mkv", "R6llTwEh07w.mp4", "video_90.mov")]
    kw = _settings(cfg, num_clips=3, num_crops=1)
    a = predict_files(model, classes, paths, batch_size=1, workers=0, **kw)
    b = predict_files(model, classes, paths, batch_size=4, workers=2, **kw)
    for x, y in zip(a, b):
        assert x["file"] == y["file"] and [t["label"] for t in x["top"]] == [t["label"] for t in y["top"]]
        assert np.allclose([t["prob"] for t in x["top"]], [t["prob"] for t in y["top"]], atol=1e-5)
    assert all(r["views"] == 3 for r in a)


def test_segments_cover_the_video(tiny, shared_videos):
    from nlvid.data import probe

    _, model, classes, cfg = tiny
    path = shared_videos / "asl_book.mkv"
    (r,) = predict_files(model, classes, [path], segments=1.0, **_settings(cfg))
    segs = r["segments"]
    dur = probe(path).duration
    assert len(segs) == int(np.ceil(dur - 1e-9))
    assert segs[0]["start"] == 0 and abs(segs[-1]["end"] - dur) < 1e-2
    assert all(a["end"] == b["start"] for a, b in zip(segs, segs[1:]))
    assert all(s["label"] in CLASSES and 0 < s["prob"] <= 1 for s in segs)


def test_cli_predict_json_errors_and_exit_code(tiny, clip_paths, capsys):
    path = tiny[0]
    chosen = [p for p in clip_paths if p.name in BROKEN or p.name in ("asl_help.mkv", "v_SoccerJuggling_g23_c01.avi")]
    code, out, err = run_cli(["predict", *map(str, chosen), "--checkpoint", str(path), "--json", "--topk", "3",
                              "--segments", "2"], capsys)
    assert code == 1
    res = json.loads(out)
    assert len(res) == len(chosen)
    ok = [r for r in res if "top" in r]
    assert len(ok) == 2 and all(len(r["top"]) == 3 and r["segments"] for r in ok)
    err_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 3 and all(any(n in line for n in BROKEN) for line in err_lines)


def test_cli_predict_table_and_env_checkpoint(tiny, shared_videos, capsys, monkeypatch):
    monkeypatch.setenv("NLVID_CHECKPOINT", str(tiny[0]))
    code, out, err = run_cli(["predict", str(shared_videos / "asl_thanks.mkv"), "--clips", "1"], capsys)
    assert code == 0, err
    assert "asl_thanks.mkv" in out and "rank" in out and any(c in out for c in CLASSES)


def test_resolve_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("NLVID_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="nlvid train") as e:
        resolve_checkpoint(None)
    assert "nlvid build" in str(e.value)
    old, new = tmp_path / "runs/a/best.pt", tmp_path / "runs/b/c/best.pt"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    now = time.time()
    os.utime(old, (now, now))
    os.utime(new, (now - 100, now - 100))
    assert resolve_checkpoint(None).resolve() == old.resolve()  # the newest
    monkeypatch.setenv("NLVID_CHECKPOINT", "/x/y.pt")
    assert resolve_checkpoint(None) == Path("/x/y.pt")
    assert resolve_checkpoint("given.pt") == Path("given.pt")
