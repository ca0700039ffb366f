"""Reading a video forward once -- a file, a live stream, a pipe or a camera -- and cutting it into windows.

Sources (`parse_source`): what `nlvid predict --window` accepts.

    clip.mp4, /path/to/x.mkv      a regular file (opened like `nlvid.data.decode`: same checks, time origin, rate)
    -                             standard input (av.open(sys.stdin.buffer); give --input-format for raw streams)
    a FIFO (mkfifo)               read like a pipe: live (no seeking, no duration)
    rtsp:// rtsps:// rtmp:// rtmps:// http:// https:// udp:// rtp:// tcp:// srt://
                                  a network stream, whatever FFmpeg reads through PyAV (tcp://...?listen=1 listens)
    /dev/videoN                   a Linux capture device (format v4l2)
    v4l2:/dev/video0, avfoundation:0, avfoundation:"FaceTime HD Camera", dshow:video=Integrated Camera,
    x11grab::0.0, gdigrab:desktop, lavfi:testsrc=size=320x240:rate=25
                                  FORMAT:NAME, an FFmpeg input device and the device name it takes (macOS lists
                                  them with `ffmpeg -f avfoundation -list_devices true -i ""`, Windows with
                                  `ffmpeg -list_devices true -f dshow -i dummy`); only the formats the PyAV build has
                                  work (the wheels carry v4l2, x11grab and lavfi on Linux)
    any other name with input_format set: av.open(name, format=input_format)

Everything but a regular file is *live*: duration unknown, timestamps may start anywhere (times are counted from
the first frame), nothing can be sought. Opening and reading are bounded in time: PyAV's `timeout=(open, read)`
(an FFmpeg interrupt callback) gives up when a network source does not answer within `open_timeout` seconds or
sends nothing for `read_timeout` seconds (default 10 s each; blocking reads of a pipe or FIFO are not covered).

Frames (`VideoSource.frames`): decoded forward once, in display order, each with its time in seconds from the
first frame. Regular files reuse `nlvid.data.decode.Video` (its time origin, its packed-B-frame timestamps) and its
reordering window (`ReorderWindow`: the k-th frame out gets the k-th smallest timestamp); live sources use the same
reordering window with pts (else dts, else the previous stamp plus one frame) and take the first frame out as time
0; a timestamp that jumps back by more than a second (a restarted encoder, an mpegts wrap) is treated as a
discontinuity and the times carry on from the previous frame. Every frame is converted once, by
`nlvid.data.decode.frame_to_rgb` (rotation side data honoured, short-side resize in swscale) to the model's size,
and, when asked (`keep_full`), also at its displayed size for an annotated video (a second swscale context, so the
two sizes do not rebuild one context on every frame).

Errors: a file that does not open fails like `nlvid.data.decode` does. A decode error in a file stops the read
(DecodeError, after the frames before it were given: the caller keeps what it has); a clean end of a file much
earlier than its header says (more than 1 s and 10% short) is reported as a truncated file. Live sources skip
undecodable packets (a lost UDP packet is normal) and fail only after 50 in a row; an I/O error or the read
timeout ends them with a DecodeError; a clean end of a live stream is not an error.

Windows (`WindowScheduler`): window k covers [k * step, k * step + window) seconds from the first frame. Which
frames a window's clip holds (`sampling`):

    "centred" (default)  the clip the model was trained and tested on: `num_frames` frames `stride` frames apart
                         at the source's frame rate, centred in the window -- exactly the clip `nlvid predict
                         --segments` takes for a window (`clip_indices` from the window's centre; with a known frame
                         count it is moved back to end inside the video, and moved forward to start at frame 0).
                         A window longer than the clip's span is only partly seen by the model; a shorter one is
                         seen with some context around it. Keeps the model's temporal scale (a 2 s window with an 8x8
                         clip shows the model 8 frames over 1.9 s, as in training).
    "spread"             `num_frames` frames evenly spaced over the window (frame i at start + (i + 0.5) * window /
                         num_frames): covers all of the window, but at another temporal scale than training.

A wanted time gets the last frame shown at or before it (`nlvid.data.decode`'s rule, with the same quarter-frame
tolerance); times before the first frame get the first frame, times after the end of the stream the last frame.
Which windows exist is decided by the decoded stream (duration D = last frame time + one frame): window 0 always,
and window k while k * step < D - window + step and k * step < D -- the windows cover the video and the last one
ends at D (its end is clipped; its clip stays where the nominal window puts it unless the frame count is known).
A window is emitted as soon as a frame at or after its nominal end has arrived and its clip is complete, or at the
end of the stream. Memory: the scheduler holds only the frames chosen for windows not yet emitted (at most
`frame_bound` = windows alive x num_frames + 1, independent of the video's length) and never a list of all frames.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import sys
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from nlvid.data.decode import REORDER_WINDOW, ReorderWindow, Video, ffmpeg_error_message, frame_to_rgb, rotation_of
from nlvid.data.sampling import clip_indices, clip_span
from nlvid.errors import ConfigError, DecodeError

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLINGS", "SourceSpec", "StreamInfo", "StreamFrame", "VideoSource", "WindowClip", "WindowScheduler",
    "ThumbnailKeeper", "parse_source", "window_bounds",
]

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "http", "https", "udp", "rtp", "tcp", "srt", "mms",
                   "mmsh", "hls")
# FORMAT:NAME prefixes: FFmpeg input devices (and lavfi, a test source); the value is the FFmpeg format name.
DEVICE_FORMATS = {"v4l2": "v4l2", "video4linux2": "v4l2", "avfoundation": "avfoundation", "dshow": "dshow",
                  "x11grab": "x11grab", "gdigrab": "gdigrab", "lavfi": "lavfi", "kmsgrab": "kmsgrab",
                  "fbdev": "fbdev", "android_camera": "android_camera"}
DEFAULT_OPEN_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 10.0
SAMPLINGS = ("centred", "spread")
_MAX_BAD_PACKETS = 50  # undecodable packets in a row before a live source is given up
_DEFAULT_FPS = 25.0  # a live source that states no frame rate (only the clip's frame spacing depends on it)


# --------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class SourceSpec:
    """What to open. name: as the user gave it (for messages); url: what av.open gets ("-" = stdin); format: the
    FFmpeg input format or None (probe); kind: "file", "pipe" (stdin or a FIFO), "url" or "device"."""

    name: str
    url: str
    format: str | None
    kind: str

    @property
    def live(self) -> bool:
        return self.kind != "file"


def parse_source(source: str, *, input_format: str | None = None) -> SourceSpec:
    """Classify a source string (module doc). Raises ConfigError (key "source") for an unknown FORMAT: prefix
    that is not a path either."""
    s = str(source)
    if s == "-":
        return SourceSpec(s, "-", input_format, "pipe")
    scheme, sep, rest = s.partition("://")
    if sep and scheme.lower() in NETWORK_SCHEMES:
        return SourceSpec(s, s, input_format, "url")
    if sep and scheme.lower() == "file":
        s = rest
    prefix, sep, rest = s.partition(":")
    if sep and prefix.lower() in DEVICE_FORMATS and not Path(s).exists():
        return SourceSpec(s, rest, input_format or DEVICE_FORMATS[prefix.lower()], "device")
    if s.startswith("/dev/video"):
        return SourceSpec(s, s, input_format or "v4l2", "device")
    p = Path(s)
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
        return SourceSpec(s, s, input_format, "pipe")
    if sep and len(prefix) > 1 and mode is None and input_format is None and "/" not in prefix:
        raise ConfigError(f"{s}: unknown input '{prefix}:' (a file that does not exist, or not one of the device "
                          f"formats {', '.join(sorted(set(DEVICE_FORMATS)))}; or give --input-format)", key="source")
    if input_format is not None:
        # a forced format on a name: FFmpeg opens it as given (lavfi graphs, raw files, device names)
        return SourceSpec(s, s, input_format, "file" if mode is not None and stat.S_ISREG(mode) else "device")
    return SourceSpec(s, s, None, "file")


@dataclass(frozen=True)
class StreamInfo:
    """An open source. fps: the frame rate windows count frames at (the stream's average rate; 25 when a live
    source states none); rate: the exact rate as a Fraction when the stream states one (for writing a video at the
    original rate); duration: seconds, None when unknown (live); num_frames: the frame count when the header or a
    scan gives it, else None; width/height: the codec's coded size (frames may be displayed rotated: the frames
    themselves are authoritative); live: see SourceSpec."""

    fps: float
    rate: Fraction | None
    duration: float | None
    num_frames: int | None
    width: int
    height: int
    live: bool
    codec: str


@dataclass
class StreamFrame:
    """One decoded frame: index (0, 1, ... in display order), time (seconds from the first frame), rgb (uint8
    (h, w, 3), short side resized for the model), full (uint8 (H, W, 3) as displayed, or None)."""

    index: int
    time: float
    rgb: np.ndarray
    full: np.ndarray | None = None


class VideoSource:
    """An opened source whose frames are read forward once (module doc).

        with VideoSource(parse_source("clip.mp4"), short_side=256) as src:
            for f in src.frames(): ...

    After `frames()` is exhausted: `end_time` (last frame time + one frame), `frames_read`, `bad_packets`.
    `stop()` (any thread) makes `frames()` end at the next frame."""

    def __init__(self, spec: SourceSpec, *, short_side: int | None, keep_full: bool = False,
                 open_timeout: float = DEFAULT_OPEN_TIMEOUT, read_timeout: float = DEFAULT_READ_TIMEOUT):
        self.spec = spec
        self.short_side = short_side
        self.keep_full = keep_full
        self.open_timeout, self.read_timeout = float(open_timeout), float(read_timeout)
        self.frames_read = 0
        self.bad_packets = 0
        self.end_time: float | None = None
        self._stop = False
        self._video: Video | None = None
        self._full_reformatter = VideoReformatter() if keep_full else None
        if spec.kind == "file":
            self._video = Video(spec.url, timeout=max(self.read_timeout, 60.0))  # same checks as nlvid.data
            self.container, self.stream = self._video.container, self._video.stream
        else:
            self.container, self.stream = self._open_live()
        try:
            self.info = self._info()
        except Exception:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------------------------

    def _error(self, reason: str) -> DecodeError:
        return DecodeError(self.spec.name, reason)

    def _open_live(self):
        spec = self.spec
        if spec.kind == "device" and spec.format == "v4l2" and not os.path.exists(spec.url):
            raise self._error("capture device not found (no such device; `ls /dev/video*` lists the cameras)")
        names = {n for f in av.formats_available for n in f.split(",")}  # "video4linux2,v4l2" is one entry
        if spec.format is not None and spec.format not in names:
            devices = sorted(f for f in set(DEVICE_FORMATS.values()) if f in names)
            raise self._error(f"input format '{spec.format}' is not in this PyAV/FFmpeg build (input devices here: "
                              f"{', '.join(devices) or 'none'})")
        target = sys.stdin.buffer if spec.url == "-" else spec.url
        try:
            container = av.open(target, format=spec.format, timeout=(self.open_timeout, self.read_timeout),
                                metadata_errors="ignore")
        except av.ExitError:
            raise self._error(f"no answer within {self.open_timeout:g} s (open timeout; --timeout sets it)") from None
        except ConnectionRefusedError:
            raise self._error("connection refused (nothing is listening there)") from None
        except FileNotFoundError:
            what = "capture device" if spec.kind == "device" else "file, pipe or stream"
            raise self._error(f"{what} not found") from None
        except PermissionError:
            raise self._error("permission denied") from None
        except av.FFmpegError as e:
            raise self._error(f"cannot open ({ffmpeg_error_message(e)})") from None
        except (OSError, ValueError) as e:
            raise self._error(f"cannot open ({type(e).__name__}: {e})") from None
        if not container.streams.video:
            container.close()
            raise self._error("no video stream (audio-only or not a video)")
        stream = container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.name is None:
            container.close()
            raise self._error("video stream has no decodable codec")
        return container, stream

    def _info(self) -> StreamInfo:
        s = self.stream
        exact = s.average_rate or s.guessed_rate or s.base_rate
        rate = Fraction(exact) if exact else None
        if rate is not None and not (0.1 <= float(rate) <= 1000):
            rate = None
        cc = s.codec_context
        if self._video is not None:
            v = self._video
            return StreamInfo(fps=v.fps, rate=rate, duration=float(v.duration), num_frames=v.frame_count_estimate(),
                              width=int(cc.width or 0), height=int(cc.height or 0), live=False, codec=str(cc.name))
        fps = float(rate) if rate is not None else _DEFAULT_FPS
        return StreamInfo(fps=fps, rate=rate, duration=None, num_frames=None, width=int(cc.width or 0),
                          height=int(cc.height or 0), live=True, codec=str(cc.name))

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stop(self) -> None:
        """Ask `frames()` to end after the frame being decoded (thread-safe: a flag)."""
        self._stop = True

    # -- reading -------------------------------------------------------------------------------------------------

    def _full_rgb(self, frame) -> np.ndarray:
        arr = self._full_reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
        rot = rotation_of(frame)
        return np.ascontiguousarray(np.rot90(arr, k=rot // 90)) if rot else arr

    def _reorder(self) -> ReorderWindow:
        if self._video is not None:
            return ReorderWindow(self._video.frame_stamp, self._video.stamp_to_seconds)
        tb = self.stream.time_base or Fraction(1, 1000)
        step = max(1, round(1 / (self.info.fps * tb)))
        origin: list[int] = []

        def stamp(frame, last):
            p = frame.pts if frame.pts is not None else frame.dts
            return p if p is not None else (last + step if last is not None else 0)

        def seconds(p: int) -> float:
            if not origin:
                origin.append(p)  # the first frame out has the smallest pending stamp: time 0
            return float((p - origin[0]) * tb)

        return ReorderWindow(stamp, seconds)

    def frames(self) -> Iterator[StreamFrame]:
        """Every frame once, in display order (module doc). Raises DecodeError when the source breaks (after
        yielding the frames before the break)."""
        window = self._reorder()
        fps = self.info.fps
        frame_dur = 1.0 / fps
        pushed = 0
        offset = 0.0  # added to live times after a discontinuity
        last_t: float | None = None

        def out(t: float, frame) -> StreamFrame:
            nonlocal last_t, offset
            t += offset
            if last_t is not None and t < last_t - 1.0:  # discontinuity: carry on from the previous frame
                offset += last_t + frame_dur - t
                t = last_t + frame_dur
            last_t = t if last_t is None else max(last_t, t)
            f = StreamFrame(self.frames_read, t, frame_to_rgb(frame, self.short_side),
                            self._full_rgb(frame) if self.keep_full else None)
            self.frames_read += 1
            return f

        if self._video is not None:
            try:
                self._video.seek_start()
            except av.FFmpegError as e:
                raise self._error(f"seek to the start failed ({ffmpeg_error_message(e)})") from None
        error: str | None = None
        bad_in_row = 0
        try:
            for packet in self.container.demux(self.stream):
                if self._stop:
                    break
                try:
                    decoded = packet.decode()
                    bad_in_row = 0
                except av.FFmpegError as e:
                    if self.spec.live and bad_in_row < _MAX_BAD_PACKETS:
                        if self.bad_packets == 0:
                            log.warning("%s: skipping undecodable packets (%s)", self.spec.name,
                                        ffmpeg_error_message(e))
                        bad_in_row += 1
                        self.bad_packets += 1
                        continue
                    error = f"decode error after {self.frames_read} frames ({ffmpeg_error_message(e)})"
                    break
                for frame in decoded:
                    window.push(frame)
                    pushed += 1
                    while pushed - window.emitted > REORDER_WINDOW:
                        yield out(*window.pop())
        except av.ExitError:
            error = f"no data for {self.read_timeout:g} s (read timeout: the stream stalled or broke)"
        except av.FFmpegError as e:
            error = f"stream broke after {self.frames_read} frames ({ffmpeg_error_message(e)})"
        except (OSError, MemoryError, ValueError, RuntimeError) as e:
            error = f"stream broke after {self.frames_read} frames ({type(e).__name__}: {e})"
        if error is None and not self._stop:
            try:
                for frame in self.stream.codec_context.decode(None):
                    window.push(frame)
                    pushed += 1
            except av.FFmpegError:
                pass
        if error is None and not self._stop:
            while pushed > window.emitted:
                yield out(*window.pop())
        if last_t is not None:
            self.end_time = last_t + frame_dur
        if error is not None:
            raise self._error(error + (f" at {last_t:.2f} s" if last_t is not None else ""))
        if self._stop:
            return
        if self.frames_read == 0:
            raise self._error("no frames could be decoded")
        if self._video is not None and self.end_time is not None:
            claimed = float(self._video.duration)
            if claimed - self.end_time > max(1.0, 0.1 * claimed):
                raise self._error(f"stream ends at {self.end_time:.2f} s but the header says {claimed:.2f} s "
                                  f"(truncated or damaged file)")


# --------------------------------------------------------------------------------------------------------------
# Windows


def _window_exists(k: int, start: float, duration: float, window: float, step: float) -> bool:
    eps = 1e-9
    return k == 0 or (start < duration - window + step - eps and start < duration - eps)


def window_bounds(duration: float, window: float, step: float) -> list[tuple[float, float]]:
    """The (start, end) seconds of every window of a video of `duration` seconds (module doc: window 0, then
    every k * step before D - window + step; the last end clipped to D)."""
    out = []
    k = 0
    while _window_exists(k, k * step, duration, window, step):
        out.append((k * step, min(k * step + window, duration)))
        k += 1
    return out


@dataclass
class WindowClip:
    """A window and the frames of its clip. times: the wanted times (num_frames, seconds); frames: uint8
    (num_frames, h, w, 3) model-size RGB; frame_times: the times of the frames given for them; frame_indices:
    their indices in the stream."""

    index: int
    start: float
    end: float
    times: np.ndarray
    frames: np.ndarray
    frame_times: list[float]
    frame_indices: list[int]


@dataclass
class _Pending:
    index: int
    start: float
    times: np.ndarray  # sorted wanted times
    got: list = field(default_factory=list)  # (time, index, rgb) per answered wanted time, in order

    @property
    def complete(self) -> bool:
        return len(self.got) == len(self.times)


class WindowScheduler:
    """Cuts a forward stream of frames into window clips (module doc).

        sched = WindowScheduler(window=2, step=1, num_frames=8, stride=8, fps=30)
        for f in frames: for clip in sched.push(f.time, f.rgb, f.index): ...
        for clip in sched.finish(): ...     # clean end of stream only

    `held` is the number of frames held now (an upper bound: a frame shared by two windows counts twice),
    `max_held` the most ever held, `frame_bound` the bound `max_held` never exceeds."""

    def __init__(self, *, window: float, step: float, num_frames: int, stride: int, fps: float,
                 sampling: str = "centred", num_frames_hint: int | None = None):
        if not (window > 0 and math.isfinite(window)):
            raise ConfigError(f"window={window}: must be a positive number of seconds", key="window")
        if not (step > 0 and math.isfinite(step)):
            raise ConfigError(f"stride={step}: must be a positive number of seconds", key="step")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling {sampling!r}: allowed: {', '.join(SAMPLINGS)}", key="sampling")
        if num_frames < 1 or stride < 1 or not fps > 0:
            raise ConfigError(f"num_frames={num_frames}, stride={stride}, fps={fps}: must be positive", key="fps")
        self.window, self.step = float(window), float(step)
        self.num_frames, self.stride, self.fps = int(num_frames), int(stride), float(fps)
        self.sampling = sampling
        self.total = int(num_frames_hint) if num_frames_hint else None
        self.tol = 0.25 / self.fps  # float noise in pts * time_base vs index / fps (as nlvid.data.decode)
        self._pending: deque[_Pending] = deque()
        self._next = 0
        self._next_times = self.clip_times(0)
        self._prev: tuple[float, int, np.ndarray] | None = None
        self.held = 0
        self.max_held = 0
        span_s = clip_span(self.num_frames, self.stride) / self.fps if sampling == "centred" else self.window
        self.window_bound = math.ceil((self.window + span_s + 2 * self.tol) / self.step) + 2
        self.frame_bound = self.window_bound * self.num_frames + 1

    def clip_times(self, k: int) -> np.ndarray:
        """The wanted times (seconds, sorted) of window k's clip."""
        start = k * self.step
        if self.sampling == "spread":
            return start + (np.arange(self.num_frames) + 0.5) * self.window / self.num_frames
        end = start + self.window
        if self.total is not None:
            end = min(end, self.total / self.fps)
        centre = int(round((start + end) / 2 * self.fps))
        first = max(0, centre - clip_span(self.num_frames, self.stride) // 2)
        if self.total is not None:
            idx = clip_indices(first, num_frames=self.num_frames, stride=self.stride, total=self.total)
        else:
            idx = first + np.arange(self.num_frames) * self.stride
        return np.sort(idx / self.fps)

    def _create_until(self, t: float) -> None:
        # With a known frame count, clips near the end are moved back (before their window's start): windows that
        # start after the header's end are not created early (they would never stop coming).
        end = self.total / self.fps if self.total is not None else math.inf
        while self._next_times[0] + self.tol < t and (self._next * self.step <= t or self._next * self.step < end):
            self._pending.append(_Pending(self._next, self._next * self.step, self._next_times))
            self._next += 1
            self._next_times = self.clip_times(self._next)

    def _answer(self, t: float, fallback: tuple[float, int, np.ndarray]) -> None:
        """Answer every wanted time before t (within tol) with the previous frame (or `fallback` when none)."""
        given = self._prev if self._prev is not None else fallback
        for w in self._pending:
            while not w.complete and w.times[len(w.got)] + self.tol < t:
                w.got.append(given)
                self.held += 1
        self.max_held = max(self.max_held, self.held + 1)

    def _emit(self, w: _Pending, end: float) -> WindowClip:
        self.held -= len(w.got)
        return WindowClip(index=w.index, start=w.start, end=end, times=w.times,
                          frames=np.stack([g[2] for g in w.got]), frame_times=[g[0] for g in w.got],
                          frame_indices=[g[1] for g in w.got])

    def push(self, t: float, rgb: np.ndarray, index: int = -1) -> list[WindowClip]:
        """Give the next frame (time t, seconds from the first frame); returns the windows it completes."""
        self._create_until(t)
        self._answer(t, (t, index, rgb))
        self._prev = (t, index, rgb)
        out = []
        while self._pending and self._pending[0].complete and t >= self._pending[0].start + self.window - self.tol:
            w = self._pending.popleft()
            out.append(self._emit(w, w.start + self.window))
        return out

    def finish(self, end_time: float | None = None) -> list[WindowClip]:
        """The end of a stream that ended cleanly at `end_time` (default: last frame + one frame): the remaining
        windows that exist, their clips completed with the last frame, the last end clipped."""
        if self._prev is None:
            return []
        d = end_time if end_time is not None else self._prev[0] + 1.0 / self.fps
        while _window_exists(self._next, self._next * self.step, d, self.window, self.step):
            self._pending.append(_Pending(self._next, self._next * self.step, self._next_times))
            self._next += 1
            self._next_times = self.clip_times(self._next)
        out = []
        while self._pending:
            w = self._pending.popleft()
            if not _window_exists(w.index, w.start, d, self.window, self.step):
                self.held -= len(w.got)
                continue
            while not w.complete:
                w.got.append(self._prev)
                self.held += 1
            out.append(self._emit(w, min(w.start + self.window, d)))
        self._prev = None
        return out

    def discard(self) -> int:
        """Drop the windows not emitted (a broken or stopped stream: partial clips are not used); returns how many."""
        n = len(self._pending)
        self._pending.clear()
        self.held = 0
        self._prev = None
        return n


# --------------------------------------------------------------------------------------------------------------
# Thumbnails for a timeline picture


class ThumbnailKeeper:
    """At most `max_count` small frames spread over the video, for a timeline picture; memory stays bounded.

    Duration known: slot i is the first frame at or after (i + 0.5) * duration / max_count. Unknown (live): a frame
    every `interval` seconds (from 0); whenever more than `max_count` are kept, every other one is dropped and the
    interval doubles. Thumbnails are subsampled (every k-th pixel) to about `height` pixels high."""

    def __init__(self, *, max_count: int = 12, duration: float | None = None, height: int = 72,
                 interval: float = 1.0):
        self.max_count, self.duration, self.height = int(max_count), duration, int(height)
        self.interval = float(interval)
        self._items: list[tuple[float, np.ndarray]] = []
        self._next = (0.5 * duration / max_count) if duration else 0.0

    def offer(self, t: float, rgb: np.ndarray) -> None:
        if t + 1e-9 < self._next:
            return
        k = max(1, rgb.shape[0] // self.height)
        self._items.append((float(t), np.ascontiguousarray(rgb[::k, ::k])))
        if self.duration:
            n = len(self._items)
            self._next = (n + 0.5) * self.duration / self.max_count if n < self.max_count else math.inf
            return
        if len(self._items) > self.max_count:
            self._items = self._items[::2]
            self.interval *= 2
        self._next = self._items[-1][0] + self.interval

    @property
    def items(self) -> list[tuple[float, np.ndarray]]:
        return list(self._items)
