"""Streaming prediction (`nlvid predict --window`): window plan, bounded scheduler, equality with direct prediction,
timeline files, annotated video, live streams through a FIFO and a loopback TCP socket, broken and bad inputs,
Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cli_helpers import run_cli  # tests/cli_helpers.py

from nlvid.data import read_frames, test_views
from nlvid.data.stream import WindowScheduler, parse_source, window_bounds
from nlvid.engine.stream import FrameOut, StreamPredictor, WindowResult, _Prepared, _Queue

from conftest import TINY_CLASSES as CLASSES
ROOT = Path(__file__).resolve().parents[1]


def _kw(cfg):
    from nlvid.config import test_data_kwargs

    return test_data_kwargs(cfg.data, num_crops=1)


def _windows(sp):
    return [e for e in sp if isinstance(e, WindowResult)]


# ------------------------------------------------------------------------------------------ a live H.264 writer


def _write_h264(target: str, *, seconds: float, fps: int = 25, realtime: bool = True, stall: threading.Event | None
                = None, done: dict | None = None, fmt: str = "mpegts", connect_retries: float = 0.0) -> None:
    """Encode a moving bar (96x64) as H.264 into `target` (a FIFO path, a tcp:// URL...) frame by frame, at real
    time when `realtime`. With `stall`, wait for that event before closing (the stream goes silent)."""
    deadline = time.monotonic() + connect_retries
    # A FIFO is opened read-write here: that never blocks (a blocking open inside av.open would hold the GIL).
    sink = os.fdopen(os.open(target, os.O_RDWR), "wb", buffering=0) if "://" not in target else target
    while True:  # the output is opened (a TCP connection made) by start_encoding
        out = av.open(sink, "w", format=fmt, options={"flush_packets": "1"})
        s = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "tune": "zerolatency"})
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        try:
            out.start_encoding()
            break
        except (ConnectionRefusedError, av.FFmpegError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        t0 = time.monotonic()
        for i in range(int(seconds * fps)):
            img = np.full((64, 96, 3), 40, np.uint8)
            x = (i * 3) % 86
            img[:, x : x + 10] = 230
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                out.mux(p)
            if realtime:
                time.sleep(max(0.0, t0 + (i + 1) / fps - time.monotonic()))
        if stall is not None:
            stall.wait(30)
        else:
            for p in s.encode():
                out.mux(p)
    except (BrokenPipeError, ConnectionResetError, av.FFmpegError, OSError):
        pass  # the reader went away: fine for these tests
    finally:
        if done is not None:
            done["t"] = time.monotonic()
        for closing in (out, sink):
            try:
                closing.close()
            except Exception:  # noqa: BLE001
                pass


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------------------------------ windows and scheduler


def test_parse_source_kinds(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert parse_source("-").kind == "pipe"
    assert parse_source(str(fifo)).kind == "pipe"
    assert parse_source("rtsp://cam/x").kind == "url" and parse_source("tcp://127.0.0.1:5?listen=1").live
    dev = parse_source("/dev/video0")
    assert (dev.kind, dev.format) == ("device", "v4l2")
    assert (parse_source("avfoundation:0").format, parse_source("avfoundation:0").url) == ("avfoundation", "0")
    assert parse_source("dshow:video=USB Cam").url == "video=USB Cam"
    assert parse_source("clip.mp4").kind == "file" and not parse_source("clip.mp4").live


def test_window_bounds_cover_the_video():
    assert window_bounds(10, 2, 1) == [(k, k + 2) for k in range(9)]
    b = window_bounds(10, 2, 1.5)
    assert b[0] == (0, 2) and b[-1] == (9.0, 10) and len(b) == 7
    assert window_bounds(1, 2, 1) == [(0, 1)]  # shorter than a window: one window, clipped
    assert window_bounds(10, 1, 2) == [(k, k + 1) for k in range(0, 10, 2)]  # gaps between windows


def test_scheduler_memory_is_bounded_on_a_long_input():
    """10 minutes at 25 fps: windows as planned, the frames held never exceed the bound (which does not depend on
    the length), and every clip is the centred clip of its window."""
    fps, n = 25, 25 * 600
    sched = WindowScheduler(window=2, step=1, num_frames=8, stride=8, fps=fps)
    frame = np.zeros((2, 2, 3), np.uint8)
    out = []
    for i in range(n):
        out += sched.push(i / fps, frame, i)
        assert sched.held <= sched.frame_bound
    out += sched.finish()
    assert [(c.start, c.end) for c in out] == window_bounds(n / fps, 2, 1)
    assert sched.max_held <= sched.frame_bound <= 100 and sched.held == 0
    c = out[100]  # window [100, 102): frames centred on 101 s, 8 frames apart
    assert c.frame_indices == [101 * fps - 28 + 8 * k for k in range(8)]


def test_live_queue_drops_the_oldest_window():
    q = _Queue(2, 4, drop=True)
    items = [_Prepared(clip=i, views=torch.zeros(1), box=(0, 0, 1, 1)) for i in range(5)]  # type: ignore[arg-type]
    for it in items:
        assert q.put(it)
    assert q.dropped_windows == 3
    assert [p.clip for p in q.get(0.01, 8)] == [3, 4]  # the newest won


# ------------------------------------------------------------------------------------------ files


def test_streaming_equals_predicting_the_same_clips(tiny, shared_videos):
    _, model, classes, cfg = tiny
    path = shared_videos / "asl_book.mkv"
    kw = _kw(cfg)
    res = _windows(StreamPredictor(model, classes, str(path), window=1, step=0.5, batch_size=3, **kw))
    seq = _windows(StreamPredictor(model, classes, str(path), window=1, step=0.5, batch_size=2, pipelined=False,
                                   **kw))
    from nlvid.data import probe

    dur = probe(path).duration
    got = [x for r in res for x in (r.start, r.end)]
    assert got == pytest.approx([x for b in window_bounds(dur, 1, 0.5) for x in b], abs=0.02)
    assert [r.index for r in seq] == [r.index for r in res]
    for r, s in zip(res, seq):
        assert torch.allclose(r.raw, s.raw, atol=1e-5)
    short = max(kw["test_short_side"], kw["test_crop_size"])
    for r in res:
        frames = read_frames(path, r.times, short_side=short)
        views, _ = test_views(frames, short_side=short, crop_size=kw["test_crop_size"], num_crops=1,
                              mean=kw["mean"], std=kw["std"])
        with torch.inference_mode():
            p = model(views).softmax(-1)[0]
        assert torch.allclose(p, r.raw, atol=1e-5), (r.index, p, r.raw)


def test_smoothing_is_a_moving_average(tiny, shared_videos):
    _, model, classes, cfg = tiny
    res = _windows(StreamPredictor(model, classes, str(shared_videos / "asl_book.mkv"), window=1, step=0.5,
                                   smooth=3, **_kw(cfg)))
    raws = torch.stack([r.raw for r in res])
    for k, r in enumerate(res):
        assert torch.allclose(r.probs, raws[max(0, k - 2) : k + 1].mean(0), atol=1e-6)


def test_cli_window_json_csv_png_and_annotated_video(tiny, shared_videos, tmp_path, capsys):
    ckpt = tiny[0]
    src = shared_videos / "asl_book.mkv"
    out, video = tmp_path / "tl", tmp_path / "annotated.mp4"
    code, stdout, err = run_cli(["predict", str(src), "--checkpoint", str(ckpt), "--window", "1", "--stride", "0.5",
                                 "--json", "-k", "2", "--out", str(out), "--out-video", str(video), "--attention"],
                                capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in stdout.splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert all(r["type"] == "window" for r in rows) and summary["type"] == "summary"
    assert [r["start"] for r in rows] == [0.5 * k for k in range(len(rows))] and len(rows) == 7
    assert all(r["end"] - r["start"] <= 1.0 + 1e-9 for r in rows) and abs(rows[-1]["end"] - 3.633) < 0.01
    assert summary["windows"] == 7 and summary["dropped"] == 0 and summary["error"] is None
    assert {t["label"] for t in summary["top"]} <= set(CLASSES) and len(summary["top"]) == 2
    saved = json.loads((out / "timeline.json").read_text())
    assert [r["top"] for r in saved["timeline"]] == [r["top"] for r in rows]
    assert saved["settings"]["window"] == 1 and saved["settings"]["stride"] == 0.5
    with (out / "timeline.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["start"]) for r in table] == [r["start"] for r in rows]
    assert [r["label_1"] for r in table] == [r["top"][0]["label"] for r in rows]
    assert [float(r["prob_2"]) for r in table] == pytest.approx([r["top"][1]["prob"] for r in rows], abs=1e-6)
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(str(video)) as c:  # original size and rate, every frame, no audio
        s = c.streams.video[0]
        assert (s.width, s.height) == (640, 480) and s.average_rate == 30 and not c.streams.audio
        assert sum(1 for _ in c.decode(s)) == 109


def test_broken_file_keeps_the_timeline_so_far(tiny, shared_videos, tmp_path, capsys):
    out = tmp_path / "tl"
    code, stdout, err = run_cli(["predict", str(shared_videos / "corrupted.mp4"), "--checkpoint", str(tiny[0]),
                                 "--window", "1", "--stride", "0.5", "--out", str(out), "--json"], capsys)
    assert code == 1
    errors = [x for x in err.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "corrupted.mp4" in errors[0], err
    saved = json.loads((out / "timeline.json").read_text())
    assert len(saved["timeline"]) >= 2 and saved["summary"]["error"]
    assert json.loads(stdout.splitlines()[-1])["windows"] == len(saved["timeline"])


def test_bad_inputs_fail_in_one_line(tiny, shared_videos, tmp_path, capsys):
    ckpt = str(tiny[0])
    src = str(shared_videos / "asl_eat.mkv")
    closed = _free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    cases = [
        ([f"tcp://127.0.0.1:{closed}"], 1, "connection refused"),
        ([f"tcp://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1"], 1, "no answer within 1 s"),
        (["/dev/video99"], 1, "capture device not found"),
        ([src, "--out-video", str(tmp_path / "missing" / "a.mp4")], 1, str(tmp_path / "missing" / "a.mp4")),
        ([src, "--attention"], 2, "--out-video"),
        ([src, "--window", "-1"], 2, "window"),
        ([src, "--sampling", "sideways"], 2, "sampling"),
    ]
    try:
        for args, want_code, want in cases:
            argv = ["predict", *args, "--checkpoint", ckpt] + ([] if "--window" in args else ["--window", "1"])
            t0 = time.monotonic()
            code, stdout, err = run_cli(argv, capsys)
            lines = [x for x in err.splitlines() if x.strip()]
            assert code == want_code and len(lines) == 1 and want in lines[0], (args, code, err)
            assert stdout == "" and time.monotonic() - t0 < 10
    finally:
        silent.close()
    code, _, err = run_cli(["predict", src, "--checkpoint", ckpt, "--stride", "1"], capsys)
    assert code == 2 and "--window" in err


# ------------------------------------------------------------------------------------------ live streams


def test_fifo_stream_gives_windows_while_it_is_written(tiny, tmp_path):
    _, model, classes, cfg = tiny
    fifo = tmp_path / "live.ts"
    os.mkfifo(fifo)
    done: dict = {}
    writer = threading.Thread(target=_write_h264, args=(str(fifo),), kwargs={"seconds": 4, "done": done})
    writer.start()
    try:
        sp = StreamPredictor(model, classes, str(fifo), window=1, step=1, **_kw(cfg))
        assert sp.live and sp.info.duration is None
        arrivals = [(r.start, time.monotonic()) for r in sp if isinstance(r, WindowResult)]
    finally:
        writer.join(30)
    assert [s for s, _ in arrivals] == [0, 1, 2, 3]
    assert arrivals[0][1] < done["t"] - 1.5  # the first label came while the writer still had > 1.5 s to go
    assert sp.error is None and not sp.interrupted and sp.summary()["frames"] == 100


def test_tcp_stream_that_stalls_ends_with_a_clean_error(tiny, tmp_path, capsys):
    """nlvid listens on a loopback port, the writer connects, sends 2.5 s at real time and goes silent."""
    port = _free_port()
    stall = threading.Event()
    writer = threading.Thread(target=_write_h264, args=(f"tcp://127.0.0.1:{port}",),
                              kwargs={"seconds": 2.5, "stall": stall, "connect_retries": 20})
    writer.start()
    out = tmp_path / "tl"
    try:
        code, stdout, err = run_cli(["predict", f"tcp://127.0.0.1:{port}?listen=1", "--input-format", "mpegts",
                                     "--checkpoint", str(tiny[0]), "--window", "1", "--timeout", "2", "--json",
                                     "--out", str(out)], capsys)
    finally:
        stall.set()
        writer.join(30)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and "no data for 2 s" in lines[0], err
    rows = [json.loads(x) for x in stdout.splitlines()]
    assert [r["start"] for r in rows[:-1]] == [0, 1]  # the complete windows before the stall
    saved = json.loads((out / "timeline.json").read_text())
    assert len(saved["timeline"]) == 2 and "read timeout" in saved["summary"]["error"]


def test_live_source_drops_the_oldest_windows_when_the_model_is_slow(tiny, shared_videos):
    _, model, classes, cfg = tiny

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            time.sleep(0.3)
            return self.m(x)

    sp = StreamPredictor(Slow(), classes, str(shared_videos / "arm_wrestling_demo.mp4"), window=1, step=0.25,
                         live=True, batch_size=1, **_kw(cfg))
    res = _windows(sp)
    assert sp.dropped > 0 and len(res) + sp.dropped == len(window_bounds(10.0, 1, 0.25))
    idx = [r.index for r in res]
    assert idx == sorted(idx) and idx[-1] == len(window_bounds(10.0, 1, 0.25)) - 1  # the newest window was scored
    assert res[-1].dropped == sp.dropped == sp.summary()["dropped"]


def test_keep_frames_yields_every_frame_after_its_windows(tiny, shared_videos):
    _, model, classes, cfg = tiny
    sp = StreamPredictor(model, classes, str(shared_videos / "asl_eat.mkv"), window=0.5, step=0.5, keep_frames=True,
                         **_kw(cfg))
    seen_end, frames = 0.0, 0
    for ev in sp:
        if isinstance(ev, WindowResult):
            seen_end = ev.end
        elif isinstance(ev, FrameOut):
            assert ev.rgb.shape == (480, 640, 3) or ev.rgb.shape[2] == 3
            assert ev.time < seen_end + 0.5 + 1e-6  # labels never lag more than one window
            frames += 1
    assert frames == sp.frames == 47


def test_ctrl_c_stops_cleanly_and_writes_the_outputs(tiny, tmp_path):
    fifo = tmp_path / "live.ts"
    os.mkfifo(fifo)
    writer = threading.Thread(target=_write_h264, args=(str(fifo),), kwargs={"seconds": 30}, daemon=True)
    writer.start()
    out = tmp_path / "tl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nlvid", "predict", str(fifo), "--checkpoint", str(tiny[0]),
                             "--window", "1", "--json", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        first = proc.stdout.readline()  # the first window arrived: the stream is live
        assert json.loads(first)["type"] == "window"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], stderr
    assert "Traceback" not in stderr
    saved = json.loads((out / "timeline.json").read_text())
    assert saved["summary"]["interrupted"] and len(saved["timeline"]) >= 1
    assert (out / "timeline.csv").exists() and (out / "timeline.png").exists()
    assert json.loads(stdout.splitlines()[-1])["type"] == "summary"
