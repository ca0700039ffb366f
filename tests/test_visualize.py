"""nlvid.viz.attention / render and `nlvid visualize`: grid->pixel mapping, query choice, pictures, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli  # tests/cli_helpers.py

from experiments.localisation import localization_score
from nlvid.checkpoint import save_checkpoint
from nlvid.config import load_config, model_kwargs
from nlvid.data import test_views, write_synthetic
from nlvid.engine.train import train
from nlvid.errors import ConfigError
from nlvid.models import create_model, load_model
from nlvid.viz import attention as A
from nlvid.viz import render as R


def make_checkpoint(path: Path, *, num_classes: int = 3, **model_kw) -> Path:
    cfg = load_config("tiny")
    cfg.model.num_classes = num_classes
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    model = create_model("tiny", **model_kwargs(cfg.model))
    save_checkpoint(path, model_state=model.state_dict(), config=cfg.to_dict(),
                    classes=[f"class_{i}" for i in range(num_classes)])
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


# ---------------------------------------------------------------------------------------------- grid mapping


def _grid(**kw) -> A.GridMap:
    # Original 240x128 frames; the model saw the box x in [40, 200) resized by 1/2 to 80x64, 8 frames.
    d = dict(input_shape=(8, 64, 80), query_grid=(4, 8, 10), key_grid=(4, 4, 5), key_pool=(1, 2, 2),
             box=(40.0, 0.0, 200.0, 128.0), frame_size=(240, 128), source_frames=tuple(range(10, 26, 2)))
    d.update(kw)
    return A.GridMap(**d)


def test_query_and_key_cells_map_to_pixels_through_box_and_pooling():
    g = _grid()
    # query cell (t=3, h=6, w=1): input x [8, 16), y [48, 56) -> original x 40 + 2*[8, 16) = [56, 72), y [96, 112)
    assert g.query_box((3, 6, 1)) == pytest.approx((56, 96, 72, 112))
    assert g.query_center((3, 6, 1)) == pytest.approx((64, 104))
    # key cell (t'=2, h'=1, w'=3) covers query cells h 2..3, w 6..7 -> input x [48, 64), y [16, 32)
    assert g.key_box((2, 1, 3)) == pytest.approx((136, 32, 168, 64))
    assert g.key_center((2, 1, 3)) == pytest.approx((152, 48))
    # time: 8 input frames on 4 query cells; key pool 1 in time
    assert [g.qt_of_frame(i) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert g.frames_of_kt(2) == [4, 5]
    assert [g.source_frame(i) for i in g.frames_of_kt(2)] == [18, 20]
    # pixel -> query cell (frame 6, x=70, y=100) -> (3, 6, 1); outside the box or the clip -> ConfigError
    assert g.pixel_to_query(6, 70, 100) == (3, 6, 1)
    with pytest.raises(ConfigError, match="outside"):
        g.pixel_to_query(0, 10, 10)
    with pytest.raises(ConfigError, match="frames 0..7"):
        g.pixel_to_query(8, 100, 10)


def test_temporal_key_pooling_and_floor_dropped_cells():
    g = _grid(query_grid=(4, 7, 9), key_grid=(2, 3, 4), key_pool=(2, 2, 2))
    assert g.frames_of_kt(0) == [0, 1, 2, 3] and g.frames_of_kt(1) == [4, 5, 6, 7]
    heat = np.zeros((3, 4), np.float32)
    heat[2, 3] = 1.0
    q = g.key_heat_in_input(heat)  # (7, 9): last row/column are not covered by any key (floor pooling)
    assert q.shape == (7, 9) and q[4:6, 6:8].min() == 1 and q.sum() == 4


def test_key_pool_inferred_from_block_and_grids():
    class B:
        pool_size = (1, 2, 2)

    assert A.key_pool_for(B(), (4, 8, 11), (4, 4, 5)) == (1, 2, 2)
    assert A.key_pool_for(object(), (4, 3, 7), (4, 1, 3)) == (1, 3, 2)  # inferred: smallest p with q // p == k


def test_one_hot_attention_lands_on_the_expected_pixels():
    """A hand-made attention row (one key) through analyse_block and the renderer: the key, its heat peak and
    the query sit where the arithmetic says, on the right source frames."""
    g = _grid()
    nk = int(np.prod(g.key_grid))
    target = (2, 1, 3)
    j = (target[0] * 4 + target[1]) * 5 + target[2]

    def rows(cells):
        w = torch.full((cells.shape[0], nk), 0.0)
        w[:, j] = 1.0
        return w, g.key_grid

    class Block:
        instantiation = "embedded_gaussian"
        pool_size = (1, 2, 2)

    b = A.analyse_block(rows, name="res3.nl.1", block=Block(), input_shape=g.input_shape, query_grid=g.query_grid,
                        box=g.box, frame_size=g.frame_size, shown=[0, 2, 5, 7], source_frames=g.source_frames,
                        queries=[(6, 70, 100)], topk=3)
    q = b.queries[0]
    assert q.cell == (3, 6, 1) and (q.x, q.y) == pytest.approx((64, 104)) and q.frame == 6
    top = q.keys[0]
    assert top.cell == target and top.weight == 1.0
    assert (top.x, top.y) == pytest.approx((152, 48)) and top.frames == [4, 5] and top.frame == 5
    js = q.to_json(b.grid)
    assert js["keys"][0]["source_frames"] == [18, 20] and js["source_frame"] == 22
    # rendered heat on frame 5 (original size): peak inside the key's box, nothing far away
    heat = R.heat_to_frame(b.grid, R.heat_for_frame(b.grid, q.weights, 5), (240, 128))
    assert heat[48, 152] == pytest.approx(np.nanmax(heat), rel=1e-3) and np.nanmax(heat) > 0.5
    assert heat[110, 60] == 0
    assert np.isnan(heat[:, :40]).all() and np.isnan(heat[:, 200:]).all()  # outside the view box: no tint
    # on a frame of another key cell the heat is zero
    assert np.nanmax(R.heat_to_frame(b.grid, R.heat_for_frame(b.grid, q.weights, 0), (240, 128))) == 0


# ---------------------------------------------------------------------------------------------- weights, choice


def test_display_weights_normalisation():
    raw = torch.tensor([[0.5, -1.0, 1.5, 0.0], [-1.0, -2.0, -0.5, -0.1]])
    for inst in ("dot_product", "concatenation"):
        w = A.display_weights(raw, inst)
        assert torch.allclose(w[0], torch.tensor([0.25, 0.0, 0.75, 0.0]))
        assert torch.all(w[1] == 0)  # all <= 0: nothing to show
    soft = raw.softmax(-1)
    assert torch.equal(A.display_weights(soft, "embedded_gaussian"), soft)


def test_choose_queries_spreads_over_frames_and_suppresses_neighbours():
    s = np.zeros((3, 8, 8))
    s[0, 2:5, 2:5] = 10  # a hot blob in frame 0
    s[0, 7, 7] = 9
    s[1, 4, 4] = 5
    s[2, 0, 0] = 4
    q = A.choose_queries(s, 4, radius=2)
    assert q[0][0] == 0 and q[0][1:] in [(h, w) for h in range(2, 5) for w in range(2, 5)]
    assert (1, 4, 4) in q and (2, 0, 0) in q  # round robin over temporal cells
    assert (0, 7, 7) in q  # second pick in frame 0 comes from outside the suppressed blob
    assert sum(1 for c in q if c[0] == 0 and 2 <= c[1] <= 4 and 2 <= c[2] <= 4) == 1
    # only frame 2 allowed; default radius max(1, round(8 / 4)) = 2 suppresses rows/cols 0..2 around (0, 0)
    assert A.choose_queries(s, 2, allowed_t=[2]) == [(2, 0, 0), (2, 0, 3)]


def test_block_resolution_and_errors():
    m = create_model("tiny", num_classes=2)
    names = list(A.nl_blocks(m))
    assert names and A.resolve_blocks(m, None) == [next(n for n in names if n.startswith("res3."))]
    assert A.resolve_blocks(m, "all") == names
    with pytest.raises(ConfigError) as e:
        A.resolve_blocks(m, "res9.nl.0")
    assert all(n in str(e.value) for n in names)
    base = create_model("tiny", num_classes=2, nonlocal_blocks={})
    with pytest.raises(ConfigError, match="no Non-local blocks"):
        A.resolve_blocks(base, None)


# ---------------------------------------------------------------------------------------------- real models


def _synthetic_frames(T=8, H=48, W=80, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.integers(20, 60, size=(T, H, W, 3)).astype(np.uint8)
    f[:, 10:22, 8:20] = (230, 40, 40)
    return f


@pytest.mark.parametrize("inst", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_attend_clip_all_instantiations(inst, tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = create_model("tiny", num_classes=3, instantiation=inst).eval()
    for blk in A.nl_blocks(m).values():  # make the weights non-trivial
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=0.3)
    frames = _synthetic_frames()
    kw = dict(classes=["a", "b", "c"], blocks=A.resolve_blocks(m, "all"), short_side=48, mean=[0.45] * 3,
              std=[0.225] * 3, topk=6, num_queries=3, source_frames=list(range(0, 16, 2)))
    res = A.attend_clip(m, frames, **kw)
    sums = []
    for b in res.blocks:
        assert b.instantiation == inst and len(b.queries) == 3
        for q in b.queries:
            assert q.weights.min() >= 0 and q.weights.max() <= 1
            sums.append(float(q.weights.sum()))
            assert [k.weight for k in q.keys] == sorted((k.weight for k in q.keys), reverse=True)
            for k in q.keys:
                assert 0 <= k.x <= 80 and 0 <= k.y <= 48 and k.frame in res.shown
    # softmax rows sum to 1; dot_product/concatenation rows are clamped at 0 and divided by their sum (a row with
    # nothing positive stays 0)
    if inst in A.PROBABILITY_INSTANTIATIONS:
        assert all(abs(v - 1) < 1e-4 for v in sums)
    else:
        assert all(abs(v - 1) < 1e-4 or v == 0 for v in sums) and max(sums) > 0.99
    # scoring all query cells in small chunks gives the same choice (bounded memory path)
    monkeypatch.setattr(A, "MAX_CHUNK_ELEMENTS", 200)  # 200 // Nk rows per call
    res2 = A.attend_clip(m, frames, **kw)
    assert [q.cell for q in res2.blocks[0].queries] == [q.cell for q in res.blocks[0].queries]
    png = R.query_figure(res, res.blocks[-1], 2)
    assert png.width >= 800 and png.height > 2 * R.DISPLAY_MIN  # upscaled 48 px frames, two rows
    assert R.summary_figure(res, res.blocks[0]).height > R.DISPLAY_MIN


# ---------------------------------------------------------------------------------------------- CLI on real clips


def test_cli_visualize_writes_pictures_and_hotspots(shared_videos, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "viz"
    clip = shared_videos / "v_SoccerJuggling_g23_c01.avi"
    code, stdout, err = run_cli(["visualize", str(clip), "--checkpoint", str(tiny_ckpt), "--out", str(out),
                                 "--queries", "3", "--topk", "8", "--mp4"], capsys)
    assert code == 0, err
    hot = json.loads((out / "hotspots.json").read_text())
    (b,) = hot["blocks"]
    assert b["block"].startswith("res3.") and len(b["queries"]) == 3
    W, H = hot["clip"]["frame_size"]
    assert (W, H) == (320, 240) and len(hot["clip"]["source_frames"]) == 8
    for q in b["queries"]:
        assert (out / q["png"]).stat().st_size > 10_000 and (out / q["gif"]).exists() and (out / q["mp4"]).exists()
        assert len(q["keys"]) == 8 and 0 <= q["x"] <= W and 0 <= q["y"] <= H
        assert q["source_frame"] == hot["clip"]["source_frames"][q["frame"]]
        for k in q["keys"]:
            assert 0 <= k["x"] <= W and 0 <= k["y"] <= H and 0 <= k["weight"] <= 1
    assert (out / b["summary_png"]).exists()
    gif = Image.open(out / b["queries"][0]["gif"])
    assert gif.n_frames == 8
    with av.open(str(out / b["queries"][0]["mp4"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 8


def test_cli_visualize_manual_query_terminal_and_json(shared_videos, tiny_ckpt, capsys):
    clip = shared_videos / "video_90.mov"  # rotated: frames come upright, 320 wide x 568 high
    code, stdout, err = run_cli(["visualize", str(clip), "--checkpoint", str(tiny_ckpt), "--query", "3,300,500",
                                 "--block", "all", "--json", "--topk", "4"], capsys)
    assert code == 0, err
    hot = json.loads(stdout)
    assert hot["clip"]["frame_size"] == [320, 568] and len(hot["blocks"]) >= 2
    for b in hot["blocks"]:
        (q,) = b["queries"]
        assert q["frame"] == 3 and q["requested"] == {"frame": 3, "x": 300.0, "y": 500.0}
        x0, y0, x1, y1 = q["box"]
        assert x0 <= 300 < x1 and y0 <= 500 < y1  # the query cell contains the asked pixel
    code, stdout, err = run_cli(["visualize", str(clip), "--checkpoint", str(tiny_ckpt), "--terminal",
                                 "--queries", "1", "--topk", "3"], capsys)
    assert code == 0, err
    assert "▀" in stdout and "hotspots" in stdout


def test_cli_visualize_errors(shared_videos, tiny_ckpt, tmp_path, capsys):
    clip = shared_videos / "asl_book.mkv"
    code, _, err = run_cli(["visualize", str(clip), "--checkpoint", str(tiny_ckpt), "--block", "res2.nl.7"], capsys)
    assert code == 2 and "res3.nl." in err and "all" in err
    code, _, err = run_cli(["visualize", str(clip), "--checkpoint", str(tiny_ckpt), "--query", "1,2"], capsys)
    assert code == 2 and "T,X,Y" in err
    code, _, err = run_cli(["visualize", str(clip), "--checkpoint", str(tiny_ckpt), "--query", "0,9999,1"], capsys)
    assert code == 2 and "outside" in err
    code, _, err = run_cli(["visualize", str(shared_videos / "corrupted.mp4"), "--checkpoint", str(tiny_ckpt),
                            "--json"], capsys)
    assert code == 1 and "corrupted.mp4" in err
    base = make_checkpoint(tmp_path / "base.pt", nonlocal_blocks={})
    code, _, err = run_cli(["visualize", str(clip), "--checkpoint", str(base)], capsys)
    assert code == 2 and "no Non-local blocks" in err


def test_cli_missing_clip_is_a_runtime_error_like_in_predict(tiny_ckpt, tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    for command in ("visualize", "predict"):
        code, _, err = run_cli([command, str(missing), "--checkpoint", str(tiny_ckpt)], capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "missing.mp4" in lines[0]
        assert "not found" in lines[0]


# ---------------------------------------------------------------------------------------------- localisation


@pytest.mark.slow
def test_trained_attention_links_the_two_objects(tmp_path):
    """The NL row of the small Table 2 (experiments/table2.py: tiny, 100 clips/class, 30 epochs AdamW, seeds 0-2):
    after training, a query on one deciding object puts its top-10 keys on the other object more often than the
    same network did at init (res3 block, held-out clips). One seed's number moves a lot with the last bits of
    training: six retrainings of these three seeds, differing only in a few percent of re-encoded MP4s (before
    `nlvid synth` wrote identical bytes) or in the CPU's kernels, gave trained 3.44/1.50/2.63, 2.71/3.92/1.73,
    1.33/1.54/2.64 (a CI machine), 2.91/2.64/1.26, 3.10/3.32/1.41 (byte-identical data, this test's files, twice) and
    1.72/1.95/1.89 (the same files with oneDNN, MKL and ATen held to AVX2, standing in for another CPU) against init
    2.58/1.17-1.18/1.05 x chance: mean trained / mean init 1.15-1.74x; seeds 1 and 2 beat their init in every draw
    (by 1.20x or more), seed 0 (whose init is already 2.58x) in 4 of 6. The bounds are what held in all six with a
    margin: mean trained > mean init, trained > init for at least two seeds of three, every seed above chance.
    (A 1.25x bound on the mean failed the CI draw.)"""
    root = tmp_path / "synth"
    write_synthetic(root, classes=4, clips_per_class=100, seed=0)
    trained, init = [], []
    for seed in (0, 1, 2):
        cfg = load_config("tiny", ["train.epochs=30", "train.eval_every=30", "optim.optimizer=adamw",
                                   "optim.lr=0.002", f"train.seed={seed}"])
        train(cfg, data=root, out=tmp_path / f"run{seed}", progress=None)
        model, _, cfg = load_model(tmp_path / f"run{seed}" / "last.pt")
        torch.manual_seed(seed)  # the engine seeds like this before building the network
        model0 = create_model(cfg.model.name, **model_kwargs(cfg.model))
        d = cfg.data
        kw = dict(block="res3.nl.0", num_frames=d.num_frames, stride=d.stride, short_side=d.test_short_side,
                  mean=d.mean, std=d.std, topk=10)
        s, s0 = localization_score(model, root, **kw), localization_score(model0, root, **kw)
        assert s["num_queries"] > 500 and s["chance_rate"] == pytest.approx(s0["chance_rate"])
        trained.append(s["ratio"])
        init.append(s0["ratio"])
    report = f"trained {[round(r, 2) for r in trained]} vs init {[round(r, 2) for r in init]} x chance"
    print(report)  # shown with pytest -s
    assert sum(trained) > sum(init), report
    assert sum(t > i for t, i in zip(trained, init)) >= 2, report
    assert min(trained) > 1.0, report


def test_center_view_maps_through_the_crop_box():
    """--view center: the model sees test_views' centre crop; cells map back inside that box of the frame."""
    torch.manual_seed(0)
    m = create_model("tiny", num_classes=2).eval()
    frames = _synthetic_frames(H=48, W=96)
    _, boxes = test_views(frames, short_side=48, crop_size=48, num_crops=1, mean=[0.45] * 3, std=[0.225] * 3)
    res = A.attend_clip(m, frames, classes=["a", "b"], blocks=A.resolve_blocks(m, None), short_side=48,
                        crop_size=48, view="center", mean=[0.45] * 3, std=[0.225] * 3, topk=4, num_queries=2)
    (b,) = res.blocks
    x0, y0, x1, y1 = boxes[0]
    assert b.grid.box == pytest.approx(boxes[0]) and (x0, x1) == pytest.approx((24, 72))
    assert b.grid.query_box((0, 0, 0))[:2] == pytest.approx((x0, y0))
    for q in b.queries:
        assert x0 <= q.x <= x1 and all(x0 <= k.x <= x1 for k in q.keys)
