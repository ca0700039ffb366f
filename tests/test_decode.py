"""Decoding: every real clip in ../shared/data/videos, generated broken files, pixel formats, VFR, rotation."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from nlvid.data import probe, read_clip, read_frames
from nlvid.data.decode import clip_indices, read_clips
from nlvid.errors import DecodeError

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
VIDEO_EXT = {".mp4", ".avi", ".mkv", ".mov"}
CLIPS = sorted(p.name for p in VIDEOS.glob("*") if p.suffix.lower() in VIDEO_EXT) if VIDEOS.is_dir() else []
GOOD = [c for c in CLIPS if c != "corrupted.mp4"]


def reference_frames(path: Path) -> list[np.ndarray]:
    """Plain sequential decode of the whole file: every frame in decoder output (display) order, rotated."""
    import av

    out = []
    with av.open(str(path), metadata_errors="ignore") as c:
        try:
            for f in c.decode(video=0):
                a = f.to_ndarray(format="rgb24")
                rot = int(round((f.rotation or 0) / 90)) % 4
                out.append(np.rot90(a, k=rot) if rot else a)
        except av.FFmpegError:
            pass
    return out


def test_shared_clips_present(shared_videos):
    names = {p.name for p in shared_videos.iterdir()}
    assert {"corrupted.mp4", "video_90.mov", "flipping_a_pancake.mkv"} <= names
    assert len(CLIPS) >= 13


@pytest.mark.parametrize("name", GOOD)
def test_real_clip_decodes(shared_videos, name):
    path = shared_videos / name
    info = probe(path)
    assert info.width > 0 and info.height > 0 and info.fps > 1 and info.duration > 0 and info.num_frames > 0
    clip = read_clip(path, num_frames=8, stride=2)
    assert clip.shape == (8, info.height, info.width, 3) and clip.dtype == np.uint8
    assert clip.std() > 5  # real content, not a blank frame
    ref = reference_frames(path)
    assert abs(info.num_frames - len(ref)) <= 1  # header or packet scan; AVI headers may claim one more
    # A frame picked by timestamp (after a seek) equals the same frame of a full sequential decode.
    n = len(ref)
    for k in sorted({0, 1, n // 3, n // 2, n - 2} & set(range(n))):
        got = read_frames(path, [k / info.fps])[0]
        assert got.shape == ref[k].shape
        err = np.abs(got.astype(np.int16) - ref[k]).mean()
        assert err == 0, f"{name}: frame {k} differs from the sequential decode (mean abs {err:.2f})"
        for j in (k - 1, k + 1):  # and it is not a neighbour (when neighbours differ)
            if 0 <= j < n and np.abs(ref[j].astype(np.int16) - ref[k]).mean() > 1.0:
                assert err < np.abs(got.astype(np.int16) - ref[j]).mean()


def test_clip_frames_in_display_order(shared_videos):
    """Packed-B-frame AVI: pts come out 1, 4, 3, 6, 5 ...; frames must stay in display order."""
    path = shared_videos / "hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"
    ref = reference_frames(path)
    fps = probe(path).fps
    got = read_frames(path, [k / fps for k in range(10, 20)])
    for k, g in zip(range(10, 20), got):
        assert np.array_equal(g, ref[k])


def test_rotation_portrait(shared_videos):
    path = shared_videos / "video_90.mov"
    info = probe(path)
    assert info.rotation == 270  # display matrix -90 degrees
    assert (info.width, info.height) == (320, 568)  # stored 568x320, displayed portrait
    clip = read_clip(path, num_frames=4, stride=1)
    assert clip.shape == (4, 568, 320, 3)
    assert read_clip(path, num_frames=2, stride=1, short_side=160).shape == (2, 284, 160, 3)  # resize after turn


def test_mkv_without_frame_count(shared_videos):
    info = probe(shared_videos / "flipping_a_pancake.mkv")  # header: 0 frames, no stream duration
    assert 300 <= info.num_frames <= 320 and 10.0 < info.duration < 10.6 and info.fps == pytest.approx(30)


def test_short_side_resize_in_decode(shared_videos):
    clip = read_clip(shared_videos / "R6llTwEh07w.mp4", num_frames=4, stride=8, start=1.0, short_side=128)
    assert clip.shape == (4, 128, 170, 3)


@pytest.mark.parametrize("name", ["R6llTwEh07w.mp4", "video_90.mov", "v_SoccerJuggling_g23_c01.avi"])
def test_cached_reformatter_matches_pyav(shared_videos, name):
    """frame_to_rgb keeps one swscale context per thread (a speed-up); its pixels must equal PyAV's own
    frame.to_ndarray for every size, including when the target size changes between calls."""
    import av

    from nlvid.data.decode import frame_to_rgb

    with av.open(str(shared_videos / name), metadata_errors="ignore") as c:
        frames = [f for _, f in zip(range(4), c.decode(video=0))]
    for short in (None, 96, 128, 96, 400):  # down, down, back to a size used before, up
        for f in frames:
            rot = int(round((f.rotation or 0) / 90)) % 4
            if short is None:
                want = f.to_ndarray(format="rgb24")
            else:
                dw, dh = (f.height, f.width) if rot % 2 else (f.width, f.height)
                s = short / min(dw, dh)
                tw, th = max(1, round(dw * s)), max(1, round(dh * s))
                if rot % 2:
                    tw, th = th, tw
                want = f.to_ndarray(format="rgb24", width=tw, height=th, interpolation="AREA" if s < 1 else "BILINEAR")
            want = np.rot90(want, k=rot) if rot else want
            got = frame_to_rgb(f, short)
            assert got.shape == want.shape and np.array_equal(got, want), (name, short)


def test_corrupted_partial(shared_videos):
    path = shared_videos / "corrupted.mp4"
    info = probe(path)
    times = [k / info.fps for k in range(50)]
    with pytest.raises(DecodeError) as ei:
        read_frames(path, times)
    assert "corrupted.mp4" in str(ei.value) and "InvalidData" in str(ei.value)
    assert ei.value.partial is not None and ei.value.partial.shape[0] == 28
    part = read_frames(path, times, allow_partial=True)
    assert part.shape == (28, 720, 1280, 3)
    assert np.array_equal(part, np.stack(reference_frames(path)))
    with pytest.raises(DecodeError, match="corrupted.mp4"):
        read_clip(path, num_frames=8, stride=8)  # centred clip reaches past frame 28
    clip = read_clip(path, num_frames=8, stride=8, allow_partial=True)  # padded with the last good frame
    assert clip.shape == (8, 720, 1280, 3)


@pytest.mark.parametrize("kind", ["missing", "zero", "text", "dir", "truncated_mp4", "truncated_mkv"])
def test_broken_files(tmp_path, shared_videos, kind):
    p = tmp_path / "broken.mp4"
    if kind == "zero":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a video\n" * 20)
    elif kind == "dir":
        p.mkdir()
    elif kind.startswith("truncated"):
        src = shared_videos / ("R6llTwEh07w.mp4" if kind == "truncated_mp4" else "flipping_a_pancake.mkv")
        p = tmp_path / f"broken{src.suffix}"
        data = src.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as ei:
        read_clip(p, num_frames=8, stride=8)
    assert str(p) in str(ei.value) and ei.value.reason


def _encode(path: Path, frames: np.ndarray, *, codec="libx264", pix_fmt="yuv420p", rate=10, pts=None):
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if pts is not None:
            s.time_base = Fraction(1, rate)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], Fraction(1, rate)
            for pkt in s.encode(f):
                out.mux(pkt)
        for pkt in s.encode(None):
            out.mux(pkt)


@pytest.mark.parametrize("codec,pix_fmt,ext", [("libx264", "yuv444p", "mp4"), ("libx264", "yuv420p10le", "mp4"),
                                               ("libx264", "yuvj420p", "mkv"), ("gif", "rgb8", "gif"),
                                               ("mpeg4", "yuv420p", "avi")])
def test_pixel_formats_give_rgb(tmp_path, codec, pix_fmt, ext):
    frames = np.zeros((6, 32, 48, 3), np.uint8)
    for i in range(6):
        frames[i] = (200, 30 + 30 * i, 40)
    p = tmp_path / f"clip.{ext}"
    _encode(p, frames, codec=codec, pix_fmt=pix_fmt)
    got = read_frames(p, [0.0, 0.3])
    assert got.dtype == np.uint8 and got.shape == (2, 32, 48, 3)
    for g, want in zip(got, frames[[0, 3]]):
        assert np.abs(g.reshape(-1, 3).mean(0) - want[0, 0]).max() < 6


def test_variable_frame_rate_by_timestamp(tmp_path):
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    for i in range(5):
        frames[i] = 20 + 40 * i
    p = tmp_path / "vfr.mkv"
    _encode(p, frames, pts=[0, 1, 2, 10, 11])  # frames shown at 0.0, 0.1, 0.2, 1.0, 1.1 s
    got = read_frames(p, [0.0, 0.15, 0.5, 0.95, 1.0, 1.05, 1.2])
    levels = [int(round(g.mean())) for g in got]
    expect = [20, 60, 100, 100, 140, 140, 180]
    assert all(abs(a - b) <= 3 for a, b in zip(levels, expect)), levels


def test_clip_indices_loop_and_fit():
    assert clip_indices(5, num_frames=4, stride=2, total=100).tolist() == [5, 7, 9, 11]
    assert clip_indices(98, num_frames=4, stride=2, total=100).tolist() == [93, 95, 97, 99]  # moved back inside
    assert clip_indices(0, num_frames=4, stride=4, total=10).tolist() == [0, 4, 8, 2]  # short video loops


def test_read_clips_one_pass(shared_videos):
    path = shared_videos / "v_SoccerJuggling_g23_c01.avi"
    clips = read_clips(path, lambda total: [0, total - 8], num_frames=4, stride=2)
    assert len(clips) == 2 and clips[0].shape == (4, 240, 320, 3)
    ref = reference_frames(path)
    assert np.array_equal(clips[0][1], ref[2]) and np.array_equal(clips[1][3], ref[len(ref) - 2])


# B-frames + GOP 250, MKV, packed-B AVI, rotation; the other clips run with -m slow
_SKIP_FAST = {"R6llTwEh07w.mp4", "flipping_a_pancake.mkv", "video_90.mov",
              "hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"}


@pytest.mark.parametrize("name", [n if n in _SKIP_FAST else pytest.param(n, marks=pytest.mark.slow) for n in GOOD])
def test_skipping_never_changes_the_frames(shared_videos, name):
    """The decoder skips non-reference frames far from the wanted times and those between the frames of a strided
    clip (superseded by a frame already decoded); the frames returned equal a decode that skips nothing, for
    strided clips anywhere in every shared clip, with and without the short-side resize."""
    from nlvid.data.decode import Video

    path = shared_videos / name
    info = probe(path)
    n = info.num_frames
    rng = np.random.default_rng(len(name))
    cases = [(max(0, n - 57), 8, 8, None), (n // 3, 16, 4, None), (int(rng.integers(0, n)), 2, 8, 112)]
    for start, stride, frames, short in cases:
        times = [min(start + i * stride, n - 1) / info.fps for i in range(frames)]
        with Video(path) as v:
            got = v.decode_times(times, short_side=short)
        with Video(path, skip_nonref=False) as v:
            want = v.decode_times(times, short_side=short)
        assert np.array_equal(got, want), (name, start, stride, short)
    starts = []
    clips = read_clips(path, lambda total: starts.extend([0, total // 2, max(0, total - 57)]) or starts,
                       num_frames=8, stride=8)  # several clips in one pass
    for c, s in zip(clips, starts):
        with Video(path, skip_nonref=False) as v:
            want = v.decode_times(clip_indices(s, num_frames=8, stride=8, total=v.frame_count_estimate()) / v.fps)
        assert np.array_equal(c, want), (name, s)


@pytest.mark.parametrize("name", ["asl_eat.mkv", "RATRACE_wave_f_nm_np1_fr_goo_37.avi", "R6llTwEh07w.mp4"])
def test_times_after_the_last_frame_get_the_last_frame(shared_videos, name):
    """Regression: the one-frame RGB cache was keyed by id(frame); once that frame was freed, a later frame could
    reuse its id and be answered with the earlier frame's pixels (times past the end returned frame 32 of 47)."""
    path = shared_videos / name
    ref = reference_frames(path)
    fps = probe(path).fps
    times = [k * 16 / fps for k in range(len(ref) // 16 + 3)]
    got = read_frames(path, times)
    for t, g in zip(times, got):
        k = min(int(round(t * fps)), len(ref) - 1)
        assert np.array_equal(g, ref[k]), (name, t)
