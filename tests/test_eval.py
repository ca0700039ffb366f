"""Evaluation: multi-view averaging against a hand computation, report keys, class mapping, confusion PNG, and the
`nlvid eval` command on a trained tiny checkpoint (fixtures from tests/conftest.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nlvid.engine.evaluate import (
    average_views,
    build_report,
    collect_scores,
    match_classes,
    merge_scores,
    write_predictions,
)
from nlvid.viz.confusion import render_confusion_png
from nlvid.errors import CheckpointError


def _softmax(row):
    e = [math.exp(v) for v in row]
    s = sum(e)
    return [v / s for v in e]


def test_average_views_matches_hand_computation():
    # 1 video, 2 views, 3 classes: video score = mean of per-view softmax (not softmax of mean logits)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])
    a, b = _softmax([2, 0, 0]), _softmax([0, 0, 4])
    want = [(x + y) / 2 for x, y in zip(a, b)]
    got = average_views(logits)[0].tolist()
    assert got == pytest.approx(want, abs=1e-6)
    # softmax-of-mean would prefer class 2 less strongly; make sure we did not compute that
    assert got != pytest.approx(_softmax([1.0, 0.0, 2.0]), abs=1e-3)


class _FixedModel(torch.nn.Module):
    """Returns a logit row chosen by the first pixel of each clip (so views of a video can disagree)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0, 0].long()]


def test_collect_scores_multi_view_and_clip_accuracy():
    table = [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]
    model = _FixedModel(table)
    # 2 videos x 3 views; view value = which logit row it produces
    codes = torch.tensor([[0, 0, 1], [2, 1, 1]])
    views = torch.zeros(2, 3, 3, 1, 2, 2)  # (B, V, 3, T, S, S)
    views[:, :, 0, 0, 0, 0] = codes.float()
    labels = torch.tensor([0, 2])
    res = collect_scores(model, [(views, labels, torch.tensor([0, 1]))], chunk=2)
    p = [_softmax(r) for r in table]
    want0 = [(p[0][k] * 2 + p[1][k]) / 3 for k in range(3)]
    want1 = [(p[2][k] + 2 * p[1][k]) / 3 for k in range(3)]
    assert res["scores"][0].tolist() == pytest.approx(want0, abs=1e-6)
    assert res["scores"][1].tolist() == pytest.approx(want1, abs=1e-6)
    # clip accuracy: views correct: video0 2/3 (label 0), video1 1/3 (label 2)
    assert (res["view_correct"], res["view_total"]) == (3, 6)
    rep = build_report(res["scores"], res["labels"], ["a", "b", "c"], indices=res["indices"],
                       view_correct=res["view_correct"], view_total=res["view_total"])
    assert rep["top1"] == 0.5  # video 1 is predicted "b" (2 of 3 views) but is "c"
    assert rep["clip_top1"] == pytest.approx(0.5)
    assert rep["top5"] == 1.0  # top-k is capped at the number of classes
    assert rep["per_class"]["a"]["accuracy"] == 1.0 and rep["per_class"]["c"]["accuracy"] == 0.0
    assert rep["per_class"]["b"]["accuracy"] is None
    assert rep["mean_class_accuracy"] == 0.5
    assert rep["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_label_map_and_merge():
    model = _FixedModel([[0.0, 5.0], [5.0, 0.0]])
    views = torch.zeros(2, 1, 3, 1, 1, 1)
    views[1, 0, 0, 0, 0, 0] = 1.0
    # data has classes [y] and [x] in the other order: label_map data->model
    part = collect_scores(model, [(views, torch.tensor([0, 1]), torch.tensor([3, 4]))], label_map=[1, 0])
    assert part["labels"].tolist() == [1, 0]
    merged = merge_scores([part, part])  # DDP padding duplicates are dropped by index
    assert merged["indices"].tolist() == [3, 4] and merged["view_total"] == 4


def test_match_classes():
    assert match_classes(["a", "b"], ["a", "b"]) == (None, None)
    m, note = match_classes(["a", "b", "c"], ["c", "a"])
    assert m == [2, 0] and "2 of the checkpoint's 3" in note
    with pytest.raises(CheckpointError, match="unknown to the checkpoint.*zebra"):
        match_classes(["a", "b"], ["a", "zebra"])


def test_confusion_png_and_predictions(tmp_path):
    classes = ["a_long_class_name", "b", "climbing_a_rope"]
    rep = build_report(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), torch.tensor([0, 1]), classes)
    png = render_confusion_png(rep["confusion_matrix"], classes, tmp_path / "cm.png")
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[0] > 60 and img.shape[1] > 60
    assert (img < 128).sum() > 200  # text was drawn
    csv_path = write_predictions(rep, tmp_path / "pred.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("path,label,pred") and len(lines) == 3
    assert lines[2].split(",")[1:3] == ["b", "climbing_a_rope"]


# ------------------------------------------------------------------------------- the command on a real checkpoint


def _nlvid(*args, **kw):
    return subprocess.run([sys.executable, "-m", "nlvid", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def test_eval_json_keys_and_files(trained_run, synthetic_data, tmp_path):
    r = _nlvid("eval", trained_run / "best.pt", synthetic_data, "--json", "--out", tmp_path / "ev",
               "--clips", "2", "--crops", "1")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("top1", "top5", "clip_top1", "mean_class_accuracy", "num_videos", "per_class", "confusion_matrix"):
        assert key in rep
    assert rep["num_clips"] == 2 and rep["num_views"] == 2
    assert rep["num_videos"] == sum(v["num_videos"] for v in rep["per_class"].values())
    assert (tmp_path / "ev" / "confusion.png").exists()
    assert len((tmp_path / "ev" / "predictions.csv").read_text().splitlines()) == rep["num_videos"] + 1
    assert "evaluating the validation split" in r.stderr


def test_eval_refuses_other_classes(trained_run, synthetic_data, tmp_path):
    import shutil

    data = tmp_path / "other"
    src = sorted(p for p in (synthetic_data / "val").iterdir() if p.is_dir())[0]
    shutil.copytree(src, data / "not_a_class_of_the_checkpoint")
    r = _nlvid("eval", trained_run / "best.pt", data)
    assert r.returncode == 1
    assert "classes do not match" in r.stderr and "not_a_class_of_the_checkpoint" in r.stderr
    # a subset of the checkpoint's classes is mapped by name
    sub = tmp_path / "subset"
    shutil.copytree(src, sub / src.name)
    r = _nlvid("eval", trained_run / "best.pt", sub, "--json", "--clips", "1", "--crops", "1", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["per_class"][src.name]["num_videos"] == rep["num_videos"] > 0
    assert "mapped by class name" in r.stderr


def test_eval_refuses_other_architecture_and_corrupt_file(trained_run, synthetic_data, tmp_path):
    from nlvid.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(trained_run / "best.pt")
    cfg = dict(ck["config"])
    cfg["model"] = dict(cfg["model"], nonlocal_blocks={})  # a baseline model: the NL keys are unexpected
    save_checkpoint(tmp_path / "other.pt", model_state=ck["model"], config=cfg, classes=ck["classes"])
    r = _nlvid("eval", tmp_path / "other.pt", synthetic_data)
    assert r.returncode == 1
    assert "weights do not fit" in r.stderr and "nl" in r.stderr
    raw = (trained_run / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    r = _nlvid("eval", tmp_path / "cut.pt", synthetic_data)
    assert r.returncode == 1 and "truncated or corrupt" in r.stderr
    r = _nlvid("eval", tmp_path / "missing.pt", synthetic_data)
    assert r.returncode == 1 and "not found" in r.stderr
    r = _nlvid("eval", trained_run / "best.pt", synthetic_data, "--crops", "2")
    assert r.returncode == 2 and "--crops" in r.stderr
