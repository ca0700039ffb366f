"""nlvid.viz.stats and `nlvid visualize --stats`: reach, query dependence and entropy on hand-made attention where
the answer is known, on every instantiation of a real model, and from the command line; the global context map."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli  # tests/cli_helpers.py

from nlvid.checkpoint import save_checkpoint
from nlvid.config import load_config, model_kwargs
from nlvid.models import create_model
from nlvid.viz import render as R
from nlvid.viz import stats as S
from nlvid.viz.attention import GridMap, attend_clip, resolve_blocks

INSTS = ["gaussian", "embedded_gaussian", "dot_product", "concatenation", "global_context"]


def _grid(pool=(1, 1, 1), query_grid=(4, 4, 4)) -> GridMap:
    # 8 frames of 64 x 64 px: a query cell is 2 frames x 16 px; keys pooled by `pool`
    kg = tuple(q // p for q, p in zip(query_grid, pool))
    return GridMap((8, 64, 64), query_grid, kg, pool, (0.0, 0.0, 64.0, 64.0), (64, 64))


def _cells(grid):
    t, h, w = grid.query_grid
    return [(a, b, c) for a in range(t) for b in range(h) for c in range(w)]


def _index(grid, cell):
    _, h, w = grid.key_grid
    return (cell[0] * h + cell[1]) * w + cell[2]


def test_uniform_rows():
    g = _grid()
    n = 64
    s = S.weights_stats(torch.full((n, n), 1 / n), g)
    assert s.cosine_distance == pytest.approx(0, abs=1e-9) and s.jsd == pytest.approx(0, abs=1e-9)
    assert s.unary_share == pytest.approx(1)
    assert s.entropy == pytest.approx(math.log(n)) and s.effective_keys == pytest.approx(n)
    assert s.keys == n and s.queries == n and s.empty_rows == 0
    assert sum(s.time_hist.mass) == pytest.approx(1) and sum(s.space_hist.mass) == pytest.approx(1)
    assert s.effective_hist.mass[-1] == pytest.approx(1)  # every row: all keys


@pytest.mark.parametrize("dt,dh,dw,frames,px", [(1, 0, 0, 2.0, 0.0), (2, 0, 0, 4.0, 0.0), (0, 0, 2, 0.0, 32.0),
                                                 (0, 1, 1, 0.0, 16 * math.sqrt(2)), (2, 2, 0, 4.0, 32.0)])
def test_one_hot_rows_at_a_known_offset(dt, dh, dw, frames, px):
    """Every query attends to one key (dt, dh, dw) cells away (reflected at the border): reach = that offset."""
    g = _grid()
    A = torch.zeros(64, 64)
    for i, (t, h, w) in enumerate(_cells(g)):
        k = (t + dt if t + dt < 4 else t - dt, h + dh if h + dh < 4 else h - dh, w + dw if w + dw < 4 else w - dw)
        A[i, _index(g, k)] = 1
    s = S.weights_stats(A, g)
    assert s.time_reach == pytest.approx(frames) and s.space_reach * 64 == pytest.approx(px)
    assert s.time_far_share == (1.0 if frames > 1 else 0.0)
    assert s.space_far_share == (1.0 if px > 16 else 0.0)
    assert s.entropy == pytest.approx(0) and s.effective_keys == pytest.approx(1)
    i = int(frames // S.TIME_BIN)
    assert s.time_hist.mass[i] == pytest.approx(1)
    js = s.to_json()
    assert js["reach"]["time"]["mean"] == pytest.approx(frames)
    assert js["reach"]["space"]["mean_px"] == pytest.approx(px, abs=0.01)


def test_distances_to_pooled_keys_use_cell_centres():
    g = _grid(pool=(2, 2, 2))  # key grid (2, 2, 2); key (0, 0, 0) covers query cells t 0-1, h 0-1, w 0-1
    assert np.allclose(g.key_centres()[0], [1.5, 16, 16])  # frames 0-3 -> centre 1.5; 32 px wide -> centre 16
    assert np.allclose(g.query_centres()[0], [0.5, 8, 8])
    A = torch.zeros(64, 8)
    A[:, 0] = 1
    s = S.weights_stats(A, g)
    q = g.query_centres()
    want_t = np.abs(q[:, 0] - 1.5).mean()
    want_s = np.hypot(q[:, 1] - 16, q[:, 2] - 16).mean() / 64
    assert s.time_reach == pytest.approx(want_t) and s.space_reach == pytest.approx(want_s)


def test_query_dependence_measures():
    g = _grid()
    gen = torch.Generator().manual_seed(0)
    # the same row for every query (what global_context computes): no query dependence
    row = torch.rand(64, generator=gen)
    s = S.weights_stats((row / row.sum()).expand(64, -1), g)
    assert s.cosine_distance == pytest.approx(0, abs=1e-9) and s.jsd == pytest.approx(0, abs=1e-9)
    assert s.unary_share == pytest.approx(1)
    # a permutation: every query its own key -> orthogonal rows, unary share 1/N', JSD log N'
    perm = torch.randperm(64, generator=gen)
    s = S.weights_stats(torch.eye(64)[perm], g)
    assert s.cosine_distance == pytest.approx(1) and s.jsd == pytest.approx(math.log(64))
    assert s.unary_share == pytest.approx(1 / 64)
    # against a direct computation on random rows: the mean over pairs of 1 - cos, H(mean) - mean H
    A = torch.rand(64, 64, generator=gen) ** 4
    A = A / A.sum(1, keepdim=True)
    s = S.weights_stats(A, g)
    U = A / A.norm(dim=1, keepdim=True)
    cos = U @ U.T
    want = (1 - cos)[~torch.eye(64, dtype=torch.bool)].mean()
    m = A.mean(0)
    H = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    assert s.cosine_distance == pytest.approx(float(want), rel=1e-6)
    assert s.jsd == pytest.approx(float(H(m) - H(A).mean()), rel=1e-5)
    assert s.unary_share == pytest.approx(float((m * m).sum() / (A * A).sum(1).mean()), rel=1e-6)


def test_groups_chunks_and_empty_rows(monkeypatch):
    """space mode measures query dependence within a frame; chunking changes nothing; all-zero rows are left out."""
    g = _grid()
    A = torch.zeros(64, 64)
    for i, (t, h, w) in enumerate(_cells(g)):
        A[i, t * 16 : (t + 1) * 16] = 1 / 16  # uniform over its own frame: what a space-mode block sees
    s = S.weights_stats(A, g, mode="space")
    assert s.keys == 16 and s.cosine_distance == pytest.approx(0, abs=1e-9) and s.jsd == pytest.approx(0, abs=1e-9)
    assert s.entropy == pytest.approx(math.log(16)) and s.time_reach == 0
    spacetime = S.weights_stats(A, g)  # across frames the rows are orthogonal
    assert spacetime.cosine_distance == pytest.approx(1 - 15 / 63)
    monkeypatch.setattr(S, "STATS_CHUNK_ELEMENTS", 100)  # one row per call
    again = S.weights_stats(A, g, mode="space")
    assert again.to_json() == s.to_json()
    B = A.clone()
    B[:10] = 0
    s2 = S.weights_stats(B, g, mode="space")
    assert s2.empty_rows == 10 and s2.queries == 54


def _model(inst):
    torch.manual_seed(0)
    m = create_model("tiny", num_classes=3, instantiation=inst).eval()
    for blk in S.nl_blocks(m).values():
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return m


@pytest.mark.parametrize("inst", INSTS)
def test_stats_of_every_instantiation(inst, tmp_path):
    m = _model(inst)
    blocks = resolve_blocks(m, "all")
    accs = S.new_accumulators(m, blocks, num_frames=8, stride=2)
    for seed in range(2):
        torch.manual_seed(seed)
        S.clip_stats(m, torch.randn(1, 3, 8, 48, 64), accs)
    stats = [a.result() for a in accs.values()]
    assert [s.name for s in stats] == ["res3.nl.0", "res4.nl.0"]
    for s in stats:
        assert s.clips == 2 and s.queries + s.empty_rows == 2 * int(np.prod(s.query_grid))
        assert 0 <= s.time_reach <= 8 and 0 <= s.space_reach <= 1.5
        assert 0 <= s.entropy <= math.log(s.keys) + 1e-9 and 1 - 1e-9 <= s.effective_keys <= s.keys + 1e-6
        assert sum(s.time_hist.mass) == pytest.approx(1) and sum(s.space_hist.mass) == pytest.approx(1)
        assert 0 <= s.unary_share <= 1 and 0 <= s.cosine_distance <= 1
        if inst == "global_context":  # one map for every query
            assert s.cosine_distance == pytest.approx(0, abs=1e-6) and s.jsd == pytest.approx(0, abs=1e-6)
            assert s.unary_share == pytest.approx(1, abs=1e-6)
        else:
            assert s.cosine_distance > 1e-3
        js = json.loads(json.dumps(s.to_json()))
        assert js["weights"] == s.normalisation
    paths = R.write_stats(stats, tmp_path)
    assert [p.name for p in paths] == ["res3_nl_0_stats.png", "res4_nl_0_stats.png"]
    assert 20_000 < paths[0].stat().st_size < 200_000


def test_global_context_is_drawn_as_one_map(tmp_path):
    m = _model("global_context")
    frames = (np.random.default_rng(0).random((8, 48, 64, 3)) * 255).astype(np.uint8)
    res = attend_clip(m, frames, classes=["a", "b", "c"], blocks=resolve_blocks(m, "all"), short_side=48,
                      mean=[0.45] * 3, std=[0.225] * 3, num_queries=2, topk=5)
    b = res.blocks[0]
    assert not b.query_dependent
    assert np.allclose(b.queries[0].weights, b.queries[1].weights, atol=1e-6)
    assert np.allclose(b.mean_weights, b.queries[0].weights, atol=1e-6)
    written = R.write_outputs(res, tmp_path)
    assert sorted(p.name for p in written.paths) == ["res3_nl_0_map.png", "res4_nl_0_map.png"]
    assert written.blocks["res3.nl.0"].summary_png == "res3_nl_0_map.png"


# ---------------------------------------------------------------------------------------------- CLI


def _checkpoint(path: Path, **model_kw) -> Path:
    cfg = load_config("tiny")
    cfg.model.num_classes = 3
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    model = create_model("tiny", **model_kwargs(cfg.model))
    save_checkpoint(path, model_state=model.state_dict(), config=cfg.to_dict(), classes=["a", "b", "c"])
    return path


@pytest.mark.parametrize("inst", ["embedded_gaussian", "global_context"])
def test_cli_stats_on_a_clip_and_a_folder(inst, shared_videos, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pt", instantiation=inst)
    clip = shared_videos / "v_SoccerJuggling_g23_c01.avi"
    out = tmp_path / "stats"
    code, stdout, err = run_cli(["visualize", str(clip), "--checkpoint", str(ckpt), "--stats", "--out", str(out)],
                                capsys)
    assert code == 0, err
    rep = json.loads((out / "stats.json").read_text())
    assert [b["block"] for b in rep["blocks"]] == ["res3.nl.0", "res4.nl.0"]  # every block by default
    for b in rep["blocks"]:
        assert (out / b["png"]).exists() and b["instantiation"] == inst and b["clips"] == 1
    assert "attention statistics" in stdout and "stats.json" in stdout
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("v_SoccerJuggling_g23_c01.avi", "corrupted.mp4"):
        if name != "corrupted.mp4":
            (folder / name).symlink_to(shared_videos / name)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.avi").symlink_to(clip)
    code, stdout, err = run_cli(["visualize", "--data", str(folder), "--num-clips", "2", "--checkpoint", str(ckpt),
                                 "--block", "res3.nl.0", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert len(rep["clips"]) == 2 and [b["block"] for b in rep["blocks"]] == ["res3.nl.0"]
    assert rep["blocks"][0]["clips"] == 2


def test_cli_stats_errors(shared_videos, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pt")
    code, _, err = run_cli(["visualize", "--checkpoint", str(ckpt), "--stats"], capsys)
    assert code == 2 and "--data" in err
    code, _, err = run_cli(["visualize", "--data", str(tmp_path), "--checkpoint", str(ckpt)], capsys)
    assert code == 1 and "no videos found" in err
