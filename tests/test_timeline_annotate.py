"""nlvid.viz.timeline (predictions over time as a PNG) and nlvid.viz.annotate (annotated MP4, attention heat)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from nlvid.errors import ConfigError, OutputError
from nlvid.models import create_model
from nlvid.viz import annotate as N
from nlvid.viz import timeline as TL
from nlvid.viz.attention import nl_blocks


def _count(img: np.ndarray, colour, tol: int = 0) -> int:
    return int((np.abs(img.astype(int) - np.array(colour)).max(-1) <= tol).sum())


def _decode(path: Path) -> tuple[int, int, int, Fraction, list[np.ndarray]]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return len(frames), s.width, s.height, s.average_rate, frames


# ---------------------------------------------------------------------------------------------- timeline


def _two_halves(n: int = 600, c: int = 40, seed: int = 0):
    """n windows at 1 s stride: class 3 wins the first half, class 7 the second; class names long and short."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=0.5, size=(n, c))
    logits[: n // 2, 3] += 6
    logits[n // 2 :, 7] += 6
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    classes = [f"c{i}" for i in range(c)]
    classes[3] = "a very long class name that cannot fit in the legend of the timeline " * 2
    starts = np.arange(n, dtype=float)
    return starts, starts + 2.13, p, classes


def test_timeline_png_lines_legend_band_and_thumbnails(tmp_path):
    starts, ends, p, classes = _two_halves()
    thumb = np.zeros((90, 120, 3), dtype=np.uint8)
    thumb[:] = (0, 255, 0)  # a colour no line, text or background uses
    thumbs = [(t, thumb) for t in np.linspace(0, 600, 50)]
    out = TL.render_timeline_png(starts, ends, p, classes, path=tmp_path / "t.png", top=3, thumbnails=thumbs,
                                 title="long.mp4")
    assert out == tmp_path / "t.png" and out.is_file()
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] == 1200 and 450 < img.shape[0] < 700
    # the two winners are ranked first: first colour = class 3 or 7 (equal means), second the other
    c_a, c_b = TL.PALETTE[0], TL.PALETTE[1]
    assert _count(img, c_a) > 500 and _count(img, c_b) > 500
    # the top-1 band: left part in one winner's colour, right part in the other's
    band_y = next(y for y in range(img.shape[0]) if _count(img[y : y + 1, 60:800], c_a) > 200
                  or _count(img[y : y + 1, 60:800], c_b) > 200)
    row = img[band_y + 3]
    left, right = tuple(row[100]), tuple(row[700])
    assert {left, right} == {c_a, c_b}
    # thumbnails: many of them drawn (not all 50: overlapping ones are skipped), below the plot
    green = _count(img, (0, 255, 0), tol=8)
    per_thumb = round(120 * TL.THUMB_HEIGHT / 90) * TL.THUMB_HEIGHT
    assert 4 * per_thumb <= green < 50 * per_thumb
    ys = np.where((np.abs(img.astype(int) - (0, 255, 0)).max(-1) <= 8).any(1))[0]
    assert ys.min() > img.shape[0] - TL.THUMB_HEIGHT - 30


def test_timeline_one_window_and_chosen_classes(tmp_path):
    p = np.array([[0.1, 0.6, 0.3]])
    out = TL.render_timeline_png([4.0], [6.1], p, ["x", "y", "z"], path=tmp_path / "one.png", classes_shown=["z"])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert _count(img, TL.PALETTE[0]) > 100 and _count(img, TL.PALETTE[1]) == 0  # only the chosen class
    # top-1 (y) has no line: the band is grey
    assert _count(img, TL.OTHER) > 500
    # a (C,) vector is one window; a PIL image comes back from timeline_image
    assert TL.timeline_image([0.0], [1.0], [0.2, 0.8], ["a", "b"]).width == 1200


def test_timeline_errors(tmp_path):
    starts, ends, p, classes = _two_halves(n=4, c=10)
    missing = tmp_path / "nope" / "t.png"
    with pytest.raises(OutputError) as e:
        TL.render_timeline_png(starts, ends, p, classes, path=missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="classes"):
        TL.render_timeline_png(starts, ends, p, classes[:3], path=tmp_path / "t.png")
    with pytest.raises(ConfigError, match="starts"):
        TL.render_timeline_png(starts[:2], ends, p, classes, path=tmp_path / "t.png")
    with pytest.raises(ConfigError, match="unknown class"):
        TL.render_timeline_png(starts, ends, p, classes, path=tmp_path / "t.png", classes_shown=["zzz"])
    with pytest.raises(ConfigError, match="rank"):
        TL.render_timeline_png(starts, ends, p, classes, path=tmp_path / "t.png", rank="median")


# ---------------------------------------------------------------------------------------------- one frame


def _frame(H: int = 240, W: int = 320, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 220, size=(H, W, 3)).astype(np.uint8)


def test_annotate_frame_panel_only_inside_its_box_and_heat_changes_pixels():
    f = _frame()
    labels = [("riding a segway through a very long street name", 0.81), ("walking", 0.12), ("x", 0.0)]
    out = N.annotate_frame(f, labels)
    assert out.shape == f.shape and out.dtype == np.uint8 and not np.shares_memory(out, f)
    x0, y0, x1, y1 = N.panel_box(320, 240, 3)
    changed = (out != f).any(-1)
    ys, xs = np.where(changed)
    assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
    assert changed[y0:y1, x0:x1].mean() > 0.9  # the panel is darkened everywhere
    assert _count(out, N.BAR) > 0  # probability bars drawn
    assert (y1 - y0) < 240 / 2 and (x1 - x0) <= 0.5 * 320
    # the panel scales with the frame: twice the height, twice the panel (fonts stay >= 10 px below 300 p)
    small, large = N.panel_box(640, 480, 3), N.panel_box(1280, 960, 3)
    assert (large[3] - large[1]) == pytest.approx(2 * (small[3] - small[1]), abs=6)
    # dict labels (the JSON of predict) draw the same
    same = N.annotate_frame(f, [{"label": n, "prob": p} for n, p in labels])
    assert np.array_equal(same, out)
    # no labels, no heat: the frame as it is; heat (any size) tints the whole frame, hotter = more change
    assert np.array_equal(N.annotate_frame(f), f)
    heat = np.zeros((6, 8), dtype=np.float32)
    heat[:, 4:] = 1.0
    hot = N.annotate_frame(f, None, heat=heat)
    d = np.abs(hot.astype(int) - f.astype(int)).sum(-1)
    assert d[:, :140].mean() > 0 and d[:, 180:].mean() > 2 * d[:, :140].mean()
    # NaN = no tint
    assert np.array_equal(N.annotate_frame(f, None, heat=np.full((3, 3), np.nan)), f)
    assert N.resize_heat(heat, (320, 240)).shape == (240, 320)
    # frames too small for a row get no panel; a short frame gets the rows that fit
    for h, w in ((1, 1), (24, 32)):
        assert N.panel_box(w, h, 3) is None and np.array_equal(N.annotate_frame(_frame(h, w), labels), _frame(h, w))
    short = N.panel_box(400, 48, 5)
    assert short is not None and short[3] <= 48


def test_frame_rate_is_kept_exactly():
    assert N.frame_rate("30000/1001") == Fraction(30000, 1001)
    assert N.frame_rate(29.97002997) == Fraction(30000, 1001)
    assert N.frame_rate(23.976) == Fraction(24000, 1001)
    assert N.frame_rate(25) == 25 and N.frame_rate(12.5) == Fraction(25, 2)
    assert N.frame_rate(Fraction(60000, 1001)) == Fraction(60000, 1001)
    for bad in ("fast", 0, -3.0):
        with pytest.raises(ConfigError, match="fps"):
            N.frame_rate(bad)


# ---------------------------------------------------------------------------------------------- the video


def test_writer_keeps_count_size_and_fractional_rate(tmp_path):
    path = tmp_path / "a.mp4"
    f = _frame(120, 160)
    labels = [("one", 0.7), ("two", 0.2)]
    with N.AnnotatedVideoWriter(path, fps=Fraction(30000, 1001), width=160, height=120) as w:
        assert not w.padded and w.encoded_size == (160, 120)
        for i in range(12):
            w.write(f, labels=labels, heat=np.full((4, 5), i / 11, dtype=np.float32) if i % 2 else None)
    assert w.frames_written == 12
    n, width, height, rate, frames = _decode(path)
    assert (n, width, height, rate) == (12, 160, 120, Fraction(30000, 1001))
    # the panel is in the video: darker there than in the source frame, the rest close to the source
    x0, y0, x1, y1 = N.panel_box(160, 120, 2)
    dec = frames[0].astype(int)
    assert dec[y0:y1, x0:x1].mean() < f[y0:y1, x0:x1].mean() - 30
    assert abs(dec[y1 + 4 :, :].mean() - f[y1 + 4 :, :].mean()) < 6


def test_writer_pads_odd_sizes_and_checks_frames(tmp_path):
    path = tmp_path / "odd.mp4"
    with N.AnnotatedVideoWriter(path, fps=25, width=161, height=91) as w:
        assert w.padded and w.encoded_size == (162, 92)
        for _ in range(3):
            w.write(_frame(91, 161), labels=[("a", 0.5)])
        with pytest.raises(ConfigError, match="91, 161, 3"):
            w.write(_frame(90, 160))
    n, width, height, rate, _ = _decode(path)
    assert (n, width, height, rate) == (3, 162, 92, 25)


def test_writer_missing_folder_is_one_output_error(tmp_path):
    path = tmp_path / "missing" / "out.mp4"
    with pytest.raises(OutputError) as e:
        N.AnnotatedVideoWriter(path, fps=25, width=64, height=48)
    assert str(path) in str(e.value) and "does not exist" in str(e.value) and "\n" not in str(e.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write video"):
        N.AnnotatedVideoWriter(blocker / "out.mp4", fps=25, width=64, height=48)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_inside_with_leaves_a_decodable_video(tmp_path, exc):
    path = tmp_path / "partial.mp4"
    with pytest.raises(exc):
        with N.AnnotatedVideoWriter(path, fps=Fraction(24000, 1001), width=64, height=48) as w:
            for i in range(5):
                w.write(_frame(48, 64, seed=i), labels=[("a", 0.9)])
            raise exc("stop")
    n, width, height, rate, _ = _decode(path)
    assert (n, width, height, rate) == (5, 64, 48, Fraction(24000, 1001))
    w.close()  # closing twice is harmless
    with pytest.raises(OutputError, match="closed"):
        w.write(_frame(48, 64))


# ---------------------------------------------------------------------------------------------- attention heat


@pytest.fixture(scope="module")
def tiny_nl() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("tiny", num_classes=3, instantiation="embedded_gaussian").eval()
    for blk in nl_blocks(m).values():  # non-trivial attention (NL blocks are the identity at init)
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return m


def test_attention_heat_shape_range_and_time_mapping(tiny_nl):
    torch.manual_seed(1)
    clip = torch.randn(1, 3, 8, 48, 64)
    heat = N.attention_heat(tiny_nl, clip, queries=3)
    assert heat.shape == (8, 48, 64) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0) and heat.std() > 0
    # tiny's res3 grid has 4 temporal cells for 8 frames: frames 2k and 2k+1 share a key cell, so a map
    assert all(np.array_equal(heat[2 * k], heat[2 * k + 1]) for k in range(4))
    # another block by name; and maps in original-frame pixels: 0 outside the box the clip shows
    other = N.attention_heat(tiny_nl, clip, block="res4.nl.0", queries=1)
    assert other.shape == (8, 48, 64) and 0 <= other.min() and other.max() <= 1
    big = N.attention_heat(tiny_nl, clip, frame_size=(320, 120), box=(80.0, 0.0, 240.0, 120.0))
    assert big.shape == (8, 120, 320)
    assert big[:, :, :78].max() == 0 and big[:, :, 242:].max() == 0 and big[:, :, 80:240].max() == pytest.approx(1)
    # the writer takes these maps as they are
    frame = _frame(120, 320)
    assert not np.array_equal(N.annotate_frame(frame, None, heat=big[0]), frame)


def test_attention_heat_errors(tiny_nl):
    with pytest.raises(ConfigError, match="res9"):
        N.attention_heat(tiny_nl, torch.randn(1, 3, 8, 48, 64), block="res9.nl.0")
    with pytest.raises(ConfigError, match="1, 3, T, H, W"):
        N.attention_heat(tiny_nl, torch.randn(3, 8, 48, 64))
    base = create_model("tiny", num_classes=2, nonlocal_blocks={})
    with pytest.raises(ConfigError, match="no Non-local blocks"):
        N.attention_heat(base, torch.randn(1, 3, 8, 48, 64))
