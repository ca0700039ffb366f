"""Video decoding with PyAV: open robustly, seek, decode only the frames a clip needs, RGB uint8 always.

Time axis: every timestamp in this module is in seconds from the video's first frame (0.0 = first frame). The
origin is the smallest pts among the first demuxed packets (not the container's start_time, which is off by one
frame for packed-B-frame AVIs and by 33 ms for some MKVs).

Frame selection is by timestamp, never by counting decoded frames: for a wanted time t we return the last frame
whose presentation time is <= t (the frame whose display interval contains t); times before the first frame get
the first frame. Decoders emit frames in display order, but some containers label them with wrong pts (packed
B-frames in DivX/XviD AVIs carry the pts of the packet they were packed into: decoded order 1, 4, 3, 6, 5, ...). We
therefore keep the decoder's output order and give the k-th output frame the k-th smallest pts seen so far (a
small reordering window). Sorting frames by their pts instead would swap every B/P pair in those files: the mean
absolute difference between consecutive frames rises from 4.3 to 5.9 (RATRACE_wave*.avi).

Only what a clip needs is decoded: we seek to the keyframe at or before the first wanted time, let the decoder
skip the non-reference frames no wanted time can get (`_NonrefSkipper`), and stop as soon as the last wanted time
is answered. What is left is the chain of reference frames from the keyframe: on a 10 s Kinetics clip with one
keyframe per 250 frames, over 90% of a full-resolution clip's CPU time (benchmarks/bench_decode.py). Work is
bounded (a frame budget and a wall-clock limit), so a broken file raises DecodeError instead of hanging.

Rotation side data (display matrix, e.g. phone videos) is honoured: frames come back as they should be displayed.
"""

from __future__ import annotations

import bisect
import heapq
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from nlvid.data.sampling import clip_indices, clip_span
from nlvid.errors import DecodeError

# How many decoded frames may arrive before an earlier-labelled one (packed B-frames need 1-2). Public: the frames
# a `ReorderWindow` holds back, here and in nlvid.data.stream.
REORDER_WINDOW = 4
# Packets demuxed at open to find the time origin.
_ORIGIN_PACKETS = 8
# Codecs whose AVI files may hold packed B-frames (decoded pts out of order, dts in display order).
_PACKED_B_CODECS = frozenset({"mpeg4", "msmpeg4v1", "msmpeg4v2", "msmpeg4v3", "h263", "h263p"})
# Decode every frame within this many frames before a wanted time; skip non-reference frames further away
# (13% less CPU on a 10 s Kinetics clip with B-frames; the frames returned are bit-identical, which
# test_real_clip_decodes checks against a full sequential decode). Limitation: in a variable-rate file whose frame
# before a freeze longer than this margin is a non-reference frame, the previous reference frame is returned for
# times inside the freeze.
_SKIP_MARGIN_FRAMES = 12
# Default wall-clock limit for one read (seconds).
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of one video.

    duration: seconds (first frame to end); fps: average frame rate; num_frames: frame count from the header, or
    from a demux-only packet scan when the header has none (may be off by one for broken headers: frames are
    always selected by time, so this never matters for decoding); width/height: size of the frames as returned
    (i.e. after rotation); rotation: degrees counter-clockwise the decoder output must be turned to display
    upright (0, 90, 180, 270; what `read_clip` already applies).
    """

    duration: float
    fps: float
    num_frames: int
    width: int
    height: int
    rotation: int


# --------------------------------------------------------------------------------------------------------------
# Opening


def _open(path: Path):
    """av.open with the failure modes turned into DecodeError; returns (container, video stream)."""
    if not path.exists():
        raise DecodeError(path, "file not found")
    if path.is_dir():
        raise DecodeError(path, "is a directory, not a video file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DecodeError(path, f"cannot stat file ({e.strerror or e})") from None
    if size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise DecodeError(path, f"not a readable video container ({ffmpeg_error_message(e)})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DecodeError(path, f"cannot open ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise DecodeError(path, "no video stream (audio-only or not a video)")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.name is None:
        container.close()
        raise DecodeError(path, "video stream has no decodable codec")
    return container, stream


def ffmpeg_error_message(e: Exception) -> str:
    """A short "ErrorType: message" text for an FFmpeg/PyAV exception, for DecodeError messages and logs (used here
    and by nlvid.data.stream)."""
    msg = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {msg}"


class Video:
    """One open video: stream metadata plus the time origin; `decode_times` does the actual work.

    Public for nlvid.data.stream (reads a regular file forward with it: `seek_start`, `frame_stamp`,
    `stamp_to_seconds`) and nlvid.data.dataset; use as a context manager (closes the container)."""

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT, skip_nonref: bool = True):
        self.path = Path(path)
        self.skip_nonref = skip_nonref
        self.timeout = timeout
        self.container, self.stream = _open(self.path)
        try:
            self._read_metadata()
        except DecodeError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - any demux failure is a broken file
            self.close()
            raise DecodeError(self.path, f"cannot read stream metadata ({ffmpeg_error_message(e)})") from None

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------------------------------------------

    def _read_metadata(self) -> None:
        s = self.stream
        self.tb = s.time_base or Fraction(1, 1000)
        # `stamp_to_seconds` runs per packet and frame: int arithmetic and one true division give the same float
        # as float(Fraction) (both are the correctly rounded quotient) at a tenth of the cost
        self._tb_num, self._tb_den = self.tb.numerator, self.tb.denominator
        rate = s.average_rate or s.guessed_rate or s.base_rate
        self.fps = float(rate) if rate else 0.0
        if not (0.1 <= self.fps <= 1000):
            self.fps = 0.0
        # Origin: smallest pts among the first packets (demux only). The packets are kept for `probe`.
        first = []
        self.head_packets = []
        for packet in self.container.demux(s):
            self.head_packets.append(packet)
            if packet.pts is not None:
                first.append(packet.pts)
            elif packet.dts is not None:
                first.append(packet.dts)
            if len(first) >= _ORIGIN_PACKETS:
                break
        if not first:
            raise DecodeError(self.path, "video stream has no packets")
        self.origin_pts = min(first)
        # Frame timestamps: pts, except for packed-B-frame MPEG-4 Part 2 (DivX/XviD AVI) whose decoded frames
        # carry the pts of the packet that released them (1, 4, 3, 6, 5, ...) while their dts count up in display
        # order -- the stamp ffmpeg's best_effort_timestamp falls back to. Checked on the first decoded frames.
        self.use_dts = False
        self.time_origin = self.origin_pts
        monotonic = all(b >= a for a, b in zip(first, first[1:]))
        if monotonic and (s.codec_context.name or "") in _PACKED_B_CODECS:
            self._check_packed_bframes()
        # Duration: stream header, else container, else packet scan.
        self.duration = None
        start = s.start_time if s.start_time is not None else self.origin_pts
        if s.duration:
            self.duration = float((s.duration + start - self.origin_pts) * self.tb)
        elif self.container.duration:
            self.duration = self.container.duration / 1_000_000 - float((self.origin_pts) * self.tb)
        self.header_frames = s.frames or 0
        self._scanned = False
        if self.duration is None or self.duration <= 0 or self.fps == 0.0:
            self._packet_scan()

    def _check_packed_bframes(self) -> None:
        stamps = []
        try:
            self.seek_start()
            for frame in self.container.decode(self.stream):
                stamps.append((frame.pts, frame.dts))
                if len(stamps) >= 8:
                    break
        except Exception:  # noqa: BLE001 - a broken start is reported by the real decode
            return
        pts = [p for p, _ in stamps]
        dts = [d for _, d in stamps]
        if None in pts or None in dts:
            return
        if any(b < a for a, b in zip(pts, pts[1:])) and all(b > a for a, b in zip(dts, dts[1:])):
            self.use_dts = True
            self.time_origin = dts[0]

    def frame_stamp(self, frame, last: int | None) -> int:
        """The integer timestamp (stream time base) that orders and times a decoded frame."""
        if self.use_dts:
            # the decoder's final (flushed) frame has no dts: it follows the previous one
            p = frame.dts if frame.dts is not None else (last + 1 if last is not None else frame.pts)
        else:
            p = frame.pts if frame.pts is not None else frame.dts
        if p is None:
            p = (last + 1) if last is not None else self.time_origin
        return p

    def _packet_scan(self) -> None:
        """Demux-only pass: frame count, end time and rate when the header lacks them (MKV, broken files)."""
        if self._scanned:
            return
        self._scanned = True
        s = self.stream
        count, end, pts_list = 0, None, []
        self.seek_start()
        try:
            for packet in self.container.demux(s):
                if packet.size == 0 or (packet.pts is None and packet.dts is None):
                    continue
                count += 1
                p = packet.pts if packet.pts is not None else packet.dts
                if len(pts_list) < 64:
                    pts_list.append(p)
                e = p + (packet.duration or 0)
                end = e if end is None else max(end, e)
        except Exception:  # noqa: BLE001 - a broken tail: keep what was scanned
            pass
        self.scanned_frames = count
        if end is not None and (self.duration is None or self.duration <= 0):
            self.duration = float((end - self.origin_pts) * self.tb)
        if self.fps == 0.0 and len(pts_list) >= 2:
            pts_sorted = sorted(pts_list)
            step = float(np.median(np.diff(pts_sorted)) * self.tb)
            self.fps = 1.0 / step if step > 0 else 0.0
        if self.fps == 0.0 and self.duration and count:
            self.fps = count / self.duration
        if self.fps == 0.0:
            self.fps = 25.0  # a single-frame video: any rate works
        if not self.duration or self.duration <= 0:
            self.duration = count / self.fps

    @property
    def num_frames(self) -> int:
        if self.header_frames > 0:
            return self.header_frames
        if not self._scanned:
            self._packet_scan()
        return self.scanned_frames or max(1, round(self.duration * self.fps))

    def frame_count_estimate(self) -> int:
        """Frames from metadata without a scan (used for clip sampling)."""
        if self.header_frames > 0:
            return self.header_frames
        if self._scanned and self.scanned_frames:
            return self.scanned_frames
        return max(1, round(self.duration * self.fps))

    # -- decoding ------------------------------------------------------------------------------------------------

    def seek_start(self) -> None:
        """Seek to the keyframe at or before the first frame (the time origin), to decode from the start."""
        self.container.seek(self.origin_pts, stream=self.stream, backward=True, any_frame=False)

    def _seek(self, t: float) -> None:
        target = self.origin_pts + int(math.floor(t / self.tb))
        if t <= 0:
            self.seek_start()
        else:
            self.container.seek(target, stream=self.stream, backward=True, any_frame=False)

    def stamp_to_seconds(self, stamp: int) -> float:
        """A frame or packet timestamp (stream time base) in seconds from the first frame."""
        return (stamp - self.time_origin) * self._tb_num / self._tb_den

    def decode_times(
        self,
        times: Sequence[float],
        *,
        allow_partial: bool = False,
        short_side: int | None = None,
    ) -> np.ndarray:
        """Frames (len(times), H, W, 3) uint8 for the wanted times (seconds from the first frame)."""
        if len(times) == 0:
            raise ValueError("no timestamps given")
        wanted = np.asarray(times, dtype=np.float64)
        order = np.argsort(wanted, kind="stable")
        t_min, t_max = float(wanted[order[0]]), float(wanted[order[-1]])
        frame_dur = 1.0 / self.fps if self.fps else 0.04
        tol = 0.25 * frame_dur  # float noise in pts * time_base vs index / fps

        result = self._decode_sorted(wanted, order, t_min, t_max, tol, frame_dur, short_side, seek=t_min > 0)
        if result is None:  # the seek landed after t_min: decode from the start (that pass never returns None)
            result = self._decode_sorted(wanted, order, t_min, t_max, tol, frame_dur, short_side, seek=False)
        out, answered, error = result
        if error is None:
            return np.stack(out)
        got = [out[i] for i in range(len(out)) if answered[i]]
        partial = np.stack(got) if got else None
        if allow_partial and partial is not None:
            return partial
        n_ok = 0 if partial is None else len(partial)
        raise DecodeError(self.path, f"{error} ({n_ok} of {len(wanted)} wanted frames decoded)", partial=partial)

    def _decode_sorted(self, wanted, order, t_min, t_max, tol, frame_dur, short_side, *, seek: bool):
        """One decoding pass. Returns (frames by wanted index, answered flags, error or None), or None when the
        seek overshot t_min (caller retries from the start)."""
        answers = _Answers(wanted, order, tol, short_side)
        try:
            if seek:
                self._seek(t_min - tol)
            else:
                self.seek_start()
        except av.FFmpegError as e:
            if seek:
                return None
            return answers.result(f"seek failed ({ffmpeg_error_message(e)})")

        # Budget: frames between t_min and t_max, plus up to 60 s of GOP before the seek target.
        budget = int((t_max - (t_min if seek else 0.0) + 60.0) * max(self.fps, 1.0) * 2) + 1000
        limits = _Limits(budget=budget, deadline=time.monotonic() + self.timeout, t_max=t_max, timeout=self.timeout)
        window = ReorderWindow(self.frame_stamp, self.stamp_to_seconds,
                               overshoot_after=t_min + tol if seek else math.inf)
        skipper = _NonrefSkipper(self.stream.codec_context, enabled=self.skip_nonref and not self.use_dts,
                                 margin=_SKIP_MARGIN_FRAMES * frame_dur, seconds=self.stamp_to_seconds, tol=tol,
                                 wanted=answers._sorted)
        try:
            state, error = self._decode_packets(window, answers, limits, skipper)
            if state is None and error is None:
                self._flush_decoder(window)
            if state is None:
                state = window.drain(answers, keep=0)
        finally:
            skipper.reset()
        if state == _OVERSHOT:
            return None
        if state != _DONE:
            error = self._answer_after_last_frame(answers, error, frame_dur)
        return answers.result(error)

    def _decode_packets(self, window: ReorderWindow, answers: _Answers, limits: _Limits,
                        skipper: _NonrefSkipper) -> tuple[str | None, str | None]:
        """Demux and decode from the current position. Returns (state, error): state _DONE when every wanted time
        is answered, _OVERSHOT when the first frame lies after the seek target, None otherwise; error when a limit
        is hit or the stream fails; (None, None) at the end of the stream."""
        decoded = 0
        try:
            for packet in self.container.demux(self.stream):
                skipper.update(packet, answers.next_time())
                for frame in packet.decode():
                    decoded += 1
                    window.push(frame)
                    state = window.drain(answers, keep=REORDER_WINDOW)
                    if state is not None:
                        return state, None
                    error = limits.exceeded(decoded)
                    if error is not None:
                        return None, error
        except av.FFmpegError as e:
            return None, f"decode error after {decoded} frames ({ffmpeg_error_message(e)})"
        except (MemoryError, OSError, ValueError, RuntimeError) as e:
            return None, f"decode error after {decoded} frames ({type(e).__name__}: {e})"
        return None, None

    def _flush_decoder(self, window: ReorderWindow) -> None:
        """End of stream: move the frames the decoder still holds into the reordering window."""
        try:
            for frame in self.stream.codec_context.decode(None):
                window.push(frame)
        except av.FFmpegError:
            pass

    def _answer_after_last_frame(self, answers: _Answers, error: str | None, frame_dur: float) -> str | None:
        """Every frame is out and some wanted times are left: answer those the last frame covers. Returns the
        pass's error (a clean end of stream before the time the header promises is one)."""
        if answers.current is None:
            return error or "no frames could be decoded"
        t_cur = answers.current[0]
        tol = answers.tol
        claimed_end = max(self.duration or 0.0, self.header_frames / self.fps if self.fps else 0.0)
        if error is None and not answers.done:
            t_last = float(answers.wanted[answers.order[-1]])
            if t_cur + 2 * frame_dur + tol < t_last < claimed_end - tol:
                # The stream stops well before the time the header promises: a truncated file.
                error = (f"stream ends at {t_cur:.2f}s but the header says {claimed_end:.2f}s "
                         f"(truncated or damaged file; wanted t={t_last:.2f}s)")
        if error is None:
            # Clean end of stream: the remaining times lie after the last frame -> the last frame.
            answers.advance(math.inf, None)
        else:
            # Broken stream: only times inside the last decoded frame's interval are answered.
            answers.answer_before(t_cur + frame_dur - tol)
        return error


# Outcomes of draining the reordering window (besides None: more frames are needed).
_DONE = "done"  # every wanted time is answered
_OVERSHOT = "overshot"  # the first frame lies after the first wanted time: the seek went too far


class _Answers:
    """The wanted times of one decoding pass and the frames chosen for them.

    Times are answered in increasing order (`order` sorts `wanted`): each gets the last frame whose time is at or
    before it (within `tol`); times before the first frame get the first frame. Frames are converted to RGB
    (`frame_to_rgb`, with the optional short-side resize) once, however many times they answer.
    """

    def __init__(self, wanted: np.ndarray, order: np.ndarray, tol: float, short_side: int | None):
        self.wanted, self.order, self.tol, self.short_side = wanted, order, tol, short_side
        self.n = len(wanted)
        self._sorted: list[float] = wanted[order].tolist()  # the same doubles as Python floats (per-frame checks)
        self.out: list = [None] * self.n  # RGB frame per wanted index
        self.answered = [False] * self.n
        self.next_w = 0  # position in `order` of the next wanted time to answer
        self.current = None  # (time, av frame) of the last frame passed to `advance`
        self._rgb_last: tuple | None = None  # (av frame, its RGB array)

    @property
    def done(self) -> bool:
        return self.next_w >= self.n

    def next_time(self):
        """The earliest wanted time not answered yet, or None when all are."""
        return self._sorted[self.next_w] if self.next_w < self.n else None

    def advance(self, t: float, frame) -> bool:
        """`frame` is shown from time t: answer every wanted time before t with the previous frame. True when
        every time is answered."""
        while self.next_w < self.n and self._sorted[self.next_w] + self.tol < t:
            self._answer_next(self.current[1] if self.current is not None else frame)
        self.current = (t, frame)
        return self.next_w >= self.n

    def answer_before(self, end: float) -> None:
        """Answer the wanted times before `end` with the current frame."""
        while self.next_w < self.n and self._sorted[self.next_w] < end:
            self._answer_next(self.current[1])

    def result(self, error: str | None):
        """(frames by wanted index, answered flags, error or None): what a decoding pass returns."""
        return self.out, self.answered, error

    def _answer_next(self, frame) -> None:
        i = self.order[self.next_w]
        self.out[i] = self._rgb(frame)
        self.answered[i] = True
        self.next_w += 1

    def _rgb(self, frame) -> np.ndarray:
        # Frames are answered in order: only the latest can repeat. The cache holds the frame itself and compares
        # identity: keyed by id(frame) alone, a freed frame's id reused by a later frame returned the earlier
        # frame's pixels.
        if self._rgb_last is not None and self._rgb_last[0] is frame:
            return self._rgb_last[1]
        arr = frame_to_rgb(frame, self.short_side)
        self._rgb_last = (frame, arr)
        return arr


class ReorderWindow:
    """Decoded frames waiting for their time (see the module docstring); used by `Video.decode_times` and by
    nlvid.data.stream.

    Frames leave in decoder output order; the k-th frame out gets the k-th smallest timestamp pushed so far.
    stamp(frame, previous stamp) -> the frame's integer timestamp; seconds(stamp) -> seconds from the first frame.
    The first frame out must not lie after `overshoot_after` (the first wanted time, when the pass sought to it).
    """

    def __init__(self, stamp, seconds, *, overshoot_after: float = math.inf):
        self._stamp, self._seconds = stamp, seconds
        self.overshoot_after = overshoot_after
        self._frames: deque = deque()  # decoder output order
        self._stamps: list[int] = []  # heap: timestamps not yet given to a frame, smallest first
        self.last_stamp: int | None = None  # stamp of the frame pushed last
        self.emitted = 0  # frames taken out so far

    def push(self, frame) -> None:
        p = self._stamp(frame, self.last_stamp)
        self.last_stamp = p
        heapq.heappush(self._stamps, p)
        self._frames.append(frame)

    def pop(self) -> tuple[float, object]:
        """(time, frame): the smallest pending timestamp, in seconds, and the oldest frame."""
        t = self._seconds(heapq.heappop(self._stamps))
        self.emitted += 1
        return t, self._frames.popleft()

    def drain(self, answers: _Answers, *, keep: int) -> str | None:
        """Take frames out until `keep` remain, answering wanted times with them. Returns _OVERSHOT, _DONE, or
        None when more frames are needed."""
        while len(self._frames) > keep:
            first = self.emitted == 0
            t, frame = self.pop()
            if first and t > self.overshoot_after:
                return _OVERSHOT
            if answers.advance(t, frame):
                return _DONE
        return None


class _NonrefSkipper:
    """Which packets the decoder may skip when they hold non-reference frames (nothing is predicted from those, so
    the frames kept decode bit-identically). Two rules, checked per packet before it is decoded:

    far: the packet lies more than `margin` seconds before the next wanted time (placed by dts, else pts);
    superseded: with w the first wanted time the packet's frame could answer (the first w >= its pts time - `tol`;
        `wanted`: the sorted times), a frame already sent to the decoder in full mode lies after this one and no
        later than w + tol. Times before w lie before this frame; w and every later time are answered by that
        frame or a later one. So this frame answers nothing, whatever the frame rate does. This skips the
        B-frames between the frames of a strided clip, which the margin keeps.
    Everything else is decoded. seconds(stamp) places a pts or dts in time."""

    def __init__(self, codec_context, *, enabled: bool, margin: float, seconds, tol: float = 0.0,
                 wanted: Sequence[float] = ()):
        self.cc, self.enabled, self.margin, self._seconds, self.tol = codec_context, enabled, margin, seconds, tol
        self.wanted = list(wanted)
        self.skipping = False
        self._shown: deque = deque(maxlen=16)  # times (pts) of the packets decoded in full mode lately
        codec_context.skip_frame = "DEFAULT"

    def update(self, packet, next_time) -> None:
        """Set the decoder's mode for `packet`; next_time: the next wanted time, None when all are answered."""
        if not self.enabled:
            return
        pts = packet.pts
        ps = packet.dts if packet.dts is not None else pts
        far = ps is not None and next_time is not None and next_time - self._seconds(ps) > self.margin
        t = self._seconds(pts) if pts is not None else None
        if not far and t is not None and next_time is not None:
            k = bisect.bisect_left(self.wanted, t - self.tol)
            if k < len(self.wanted):
                limit = self.wanted[k] + self.tol
                far = any(t < q <= limit for q in self._shown)
        if far != self.skipping:
            self.cc.skip_frame = "NONREF" if far else "DEFAULT"
            self.skipping = far
        if not far and t is not None:
            self._shown.append(t)

    def reset(self) -> None:
        """Decode every frame again."""
        if self.skipping:
            self.cc.skip_frame = "DEFAULT"
            self.skipping = False


@dataclass(frozen=True)
class _Limits:
    """Bounds on one decoding pass, so that a broken file fails instead of hanging: at most `budget` decoded frames,
    and no decoding once `deadline` (time.monotonic()) has passed."""

    budget: int
    deadline: float
    t_max: float  # the last wanted time (for the message)
    timeout: float  # seconds (for the message)

    def exceeded(self, decoded: int) -> str | None:
        """The error message once `decoded` frames have been decoded, or None while within the limits."""
        if decoded > self.budget:
            return f"decoded {decoded} frames without reaching t={self.t_max:.3f}s (frame budget)"
        if time.monotonic() > self.deadline:
            return f"decoding took longer than {self.timeout:.0f}s"
        return None


_local = threading.local()


def _reformatter():
    """This thread's PyAV VideoReformatter. `frame.to_ndarray(format=...)` builds a new swscale context on every
    call (~2 ms for a 64 px frame when the size changes between calls, measured); one reformatter per thread keeps
    its context (sws_getCachedContext) while the source/target sizes stay the same: ~0.05 ms, identical pixels.
    Callers pass threads=1: swscale's default (0 = auto) starts a thread pool inside the context, and a context
    inherited by a forked DataLoader worker then deadlocks on threads that do not exist in the child."""
    r = getattr(_local, "reformatter", None)
    if r is None:
        r = _local.reformatter = VideoReformatter()
    return r


def frame_to_rgb(frame, short_side: int | None) -> np.ndarray:
    """RGB uint8 (H, W, 3) as displayed: any pixel format, rotation applied, optional short-side resize.

    The one conversion of decoded frames to arrays, here and in nlvid.data.stream."""
    rot = rotation_of(frame)
    w, h = frame.width, frame.height
    if short_side is not None:
        # Display size after rotation decides which side is short.
        dw, dh = (h, w) if rot in (90, 270) else (w, h)
        scale = short_side / min(dw, dh)
        nw, nh = max(1, round(dw * scale)), max(1, round(dh * scale))
        tw, th = (nh, nw) if rot in (90, 270) else (nw, nh)
        interp = "AREA" if scale < 1 else "BILINEAR"
        arr = _reformatter().reformat(frame, format="rgb24", width=tw, height=th, interpolation=interp,
                                      threads=1).to_ndarray()
    else:
        arr = _reformatter().reformat(frame, format="rgb24", threads=1).to_ndarray()
    if rot:
        arr = np.ascontiguousarray(np.rot90(arr, k=rot // 90))
    return arr


def rotation_of(frame) -> int:
    """Counter-clockwise degrees to display the frame upright, in {0, 90, 180, 270}.

    PyAV 18 exposes the display matrix as `frame.rotation` (av_display_rotation_get: -90 for a phone video shot
    in portrait); ffmpeg's autorotate turns such a frame 90 degrees clockwise, which is np.rot90(k=-1).
    Used by `frame_to_rgb`, `probe` and nlvid.data.stream (its full-size annotated frames)."""
    try:
        r = frame.rotation
    except Exception:  # noqa: BLE001 - older PyAV
        return 0
    if not r:
        return 0
    return int(round(float(r) / 90.0)) % 4 * 90


# --------------------------------------------------------------------------------------------------------------
# Public API


def probe(path: str | Path) -> VideoInfo:
    """Metadata from the container (plus a demux-only packet scan when the header lacks a frame count or
    duration) and the first decoded frame (rotation, display size; proves the stream decodes)."""
    with Video(path) as v:
        frame = None
        try:
            frame = _first_keyframe(v)
            if frame is None:
                v.seek_start()
                for frame in v.container.decode(v.stream):
                    break
        except av.FFmpegError as e:
            raise DecodeError(v.path, f"first frame does not decode ({ffmpeg_error_message(e)})") from None
        if frame is None:
            raise DecodeError(v.path, "no frames could be decoded")
        rot = rotation_of(frame)
        w, h = (frame.height, frame.width) if rot in (90, 270) else (frame.width, frame.height)
        return VideoInfo(
            duration=float(v.duration),
            fps=float(v.fps),
            num_frames=int(v.num_frames),
            width=int(w),
            height=int(h),
            rotation=rot,
        )


def _first_keyframe(v: Video):
    """The first frame of a video whose decoder is still unopened, decoded from the packets `Video` demuxed at
    open (no seek): the leading keyframe alone, then a flush, on one thread. A probe needs any one frame (its
    rotation side data, its size, proof that the stream decodes); decoding only the keyframe skips the frames a
    B-frame decoder would otherwise take in before it lets the first one out, and one thread skips starting a
    thread pool: a probe of a 10 s 340x256 H.264 clip costs 3.0 instead of 3.9 ms of CPU (22% less over the shared
    clips; the rest is mostly av.open, whose stream analysis decodes a frame of its own). None when this does not
    give a frame (the caller then decodes from the start the usual way)."""
    cc = v.stream.codec_context
    if cc.is_open or not v.head_packets or not v.head_packets[0].is_keyframe:
        return None
    cc.thread_count = 1
    frames = cc.decode(v.head_packets[0]) or cc.decode(None)
    if not frames:
        cc.flush_buffers()
        return None
    return frames[0]


def read_frames(
    path: str | Path,
    timestamps: Sequence[float],
    *,
    allow_partial: bool = False,
    short_side: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> np.ndarray:
    """Frames at the given times (seconds from the first frame), uint8 (N, H, W, 3) in the order given.

    Each time gets the last frame shown at or before it. A stream that breaks part-way raises DecodeError whose
    `.partial` holds the frames for the times that were reached; with `allow_partial=True` those frames (fewer
    than asked) are returned instead. `short_side` resizes during colour conversion (swscale, area filter).
    """
    with Video(path, timeout=timeout) as v:
        return v.decode_times(timestamps, allow_partial=allow_partial, short_side=short_side)


def read_clip(
    path: str | Path,
    *,
    num_frames: int,
    stride: int,
    start: float | None = None,
    short_side: int | None = None,
    allow_partial: bool = False,
) -> np.ndarray:
    """One clip of `num_frames` frames, `stride` frames apart, uint8 (T, H, W, 3).

    start: seconds from the first frame; None = the clip centred in the video. Frame indices are counted at the
    stream's average frame rate and turned into times, so variable-frame-rate files get the frames shown at those
    times. Videos shorter than the clip loop (see `nlvid.data.sampling.clip_indices`). With allow_partial, a stream
    that breaks before the clip ends gives the frames that decoded, the last one repeated to fill the clip.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1 (got {num_frames}, {stride})")
    with Video(path) as v:
        return _read_clip_open(
            v, num_frames=num_frames, stride=stride, start=start, short_side=short_side, allow_partial=allow_partial
        )


def _read_clip_open(v: Video, *, num_frames, stride, start, short_side=None, allow_partial=False) -> np.ndarray:
    total = v.frame_count_estimate()
    if start is None:
        start_index = max(0, (total - clip_span(num_frames, stride)) // 2)
    else:
        start_index = int(round(float(start) * v.fps))
    idx = clip_indices(start_index, num_frames=num_frames, stride=stride, total=total)
    frames = v.decode_times(idx / v.fps, allow_partial=allow_partial, short_side=short_side)
    if len(frames) < num_frames:  # allow_partial: pad with the last decoded frame
        pad = np.repeat(frames[-1:], num_frames - len(frames), axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    return frames


def read_clips(
    path: str | Path,
    starts_fn,
    *,
    num_frames: int,
    stride: int,
    short_side: int | None = None,
    allow_partial: bool = False,
) -> list[np.ndarray]:
    """Several clips from one open video in one decoding pass.

    starts_fn(total_frames) -> list of start frame indices (see nlvid.data.sampling). Returns a list of uint8
    (T, H, W, 3) clips in the order of the starts.
    """
    with Video(path) as v:
        total = v.frame_count_estimate()
        starts = list(starts_fn(total))
        idx = np.concatenate(
            [clip_indices(s, num_frames=num_frames, stride=stride, total=total) for s in starts]
        )
        uniq, inverse = np.unique(idx, return_inverse=True)
        try:
            frames = v.decode_times(uniq / v.fps, short_side=short_side)
        except DecodeError as e:
            if not allow_partial or e.partial is None:
                raise
            got = e.partial
            frames = np.concatenate([got, np.repeat(got[-1:], len(uniq) - len(got), axis=0)], axis=0)
        allf = frames[inverse]  # (len(starts) * T, H, W, 3)
        return [allf[i * num_frames : (i + 1) * num_frames] for i in range(len(starts))]
