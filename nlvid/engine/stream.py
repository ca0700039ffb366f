"""Streaming prediction: overlapping windows of a long video, a live stream, a pipe or a camera, in bounded memory.

Pipeline (`StreamPredictor`):

    decode thread: nlvid.data.stream.VideoSource.frames() -> WindowScheduler -> test views of each window's clip
                   --(bounded queue: at most `queue_size` windows and `frame_queue` full-size frames)-->
    main thread:   batches of up to `batch_size` windows (whatever is waiting, never waiting to fill a batch)
                   -> model (torch.inference_mode) -> softmax, averaged over the window's views
                   -> optional smoothing -> WindowResult yielded as it is ready

The video is decoded forward once; decoding (PyAV/swscale release the GIL) and the resize/crop/normalise of the
next windows overlap the model. Memory does not grow with the video's length: the scheduler holds only the frames
of windows not yet complete, the queue is bounded, clips are dropped once scored; what grows is the timeline (one
row and one probability vector per window, a few KB per minute) and nothing else. Thumbnails for a timeline picture
are at most `thumbnails` small frames (`nlvid.data.stream.ThumbnailKeeper`).

Preprocessing: the model's own test-time settings (`nlvid.config.test_data_kwargs`: frames, stride, short side,
crop size, mean/std) on each window's clip (which frames: `nlvid.data.stream`, "centred" = the clip predict
--segments takes). Views per window: `num_crops` crops of `nlvid.data.test_views` -- 1 by default (the centre crop):
windows already average over time, and 3 crops cost 3x per window.

Scores: each window's probabilities are the softmax averaged over its views (`raw`). With `smooth=K > 1` the
reported probabilities (`probs`, `top`) are the moving average of the raw probabilities of the last K windows
scored (causal, so a live display can use it; the first windows average what there is). The whole-video answer
(`summary()["top"]`) is the mean of the raw window probabilities.

Drop policy: for a file (not live) nothing is dropped: when the queue is full the decoder waits for the model. For
a live source (stream, pipe, camera) the decoder never waits: when the queue already holds `queue_size` windows the
OLDEST waiting window is dropped (the newest wins: the display stays current), and when it holds `frame_queue`
frames for an annotated video the oldest frame is dropped. Drops are counted (`dropped`, `frames_dropped`, in every
WindowResult and in the summary) and never queued without bound. Dropped windows have no row in the timeline.

Ending: a clean end of the source scores the last windows (`nlvid.data.stream.WindowScheduler.finish`). A source
that breaks (DecodeError) or is stopped (`stop()`, KeyboardInterrupt inside the iteration, or `close()` of the
iterator after a KeyboardInterrupt in the caller) ends the iteration after the windows already scored: windows
not yet complete are not used (a prediction from a partial clip would look as trustworthy as any other), the error
is kept in `error` (not raised: the caller still writes what it has), `interrupted` says whether it was stopped.
The decode thread is told to stop and joined for up to 2 s; a thread blocked in a read of a silent pipe stays
behind as a daemon until the read returns (network reads give up after the read timeout).

`pipelined=False` decodes and runs the model in one thread, one step after the other (the baseline of
benchmarks/bench_stream.py); results are identical.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nlvid.data.stream import (DEFAULT_OPEN_TIMEOUT, DEFAULT_READ_TIMEOUT, SAMPLINGS, StreamInfo, ThumbnailKeeper,
                               VideoSource, WindowClip, WindowScheduler, parse_source)
from nlvid.data.transforms import test_views
from nlvid.engine.device import resolve_device
from nlvid.engine.evaluate import require_finite
from nlvid.errors import ConfigError, DecodeError, NlvidError, writing

__all__ = ["FrameOut", "StreamPredictor", "StreamStatus", "WindowResult", "timeline_record", "top_labels",
           "write_timeline"]

JOIN_TIMEOUT = 2.0  # seconds to wait for the decode thread after a stop


@dataclass
class WindowResult:
    """One scored window. probs: smoothed probabilities (C,) (= raw without smoothing); raw: the window's own;
    top: [{"label", "prob"}] of probs; times: the clip's wanted times (s); frame_times / frame_indices: the frames
    used; clip: the model input of the first view (1, 3, T, S, S) on the device when `keep_clips`, else None;
    box: that view's region (x0, y0, x1, y1) in full-size frame pixels (model-size pixels without keep_frames);
    dropped: windows dropped so far."""

    index: int
    start: float
    end: float
    probs: torch.Tensor
    raw: torch.Tensor
    top: list[dict[str, Any]]
    times: np.ndarray
    frame_times: list[float]
    frame_indices: list[int]
    clip: torch.Tensor | None = None
    box: tuple[float, float, float, float] | None = None
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "start": round(self.start, 3), "end": round(self.end, 3), "top": self.top}


@dataclass
class FrameOut:
    """A decoded frame at its displayed size (only with keep_frames), in order; every window ending at or before
    `time` was yielded before it."""

    index: int
    time: float
    rgb: np.ndarray


@dataclass
class StreamStatus:
    """Progress, yielded about every `status_every` seconds: frames decoded, position (s of video), duration (None
    when live), decode rate (frames/s since the start), windows scored, dropped, seconds since the start."""

    frames: int
    position: float
    duration: float | None
    frames_per_s: float
    windows: int
    dropped: int
    elapsed: float


@dataclass
class _Prepared:
    clip: WindowClip
    views: torch.Tensor  # (V, 3, T, S, S)
    box: tuple[float, float, float, float]


@dataclass
class _End:
    error: BaseException | None = None


class _Queue:
    """The bounded hand-over between the decode thread and the model: windows and frames counted separately.
    put() waits while full unless `drop` (live): then the oldest waiting item of that kind is dropped."""

    def __init__(self, max_windows: int, max_frames: int, *, drop: bool):
        self.max_windows, self.max_frames, self.drop = max(1, max_windows), max(1, max_frames), drop
        self.items: deque = deque()
        self.windows = self.frames = 0
        self.dropped_windows = self.dropped_frames = 0
        self.cond = threading.Condition()
        self.closed = False

    def put(self, item) -> bool:
        """False when the queue was closed (the consumer stopped)."""
        is_window = isinstance(item, _Prepared)
        with self.cond:
            while not self.closed:
                count, limit = (self.windows, self.max_windows) if is_window else (self.frames, self.max_frames)
                if count < limit:
                    break
                if self.drop:
                    self._drop_oldest(_Prepared if is_window else FrameOut)
                    break
                self.cond.wait(0.1)
            if self.closed:
                return False
            self.items.append(item)
            if is_window:
                self.windows += 1
            elif isinstance(item, FrameOut):
                self.frames += 1
            self.cond.notify_all()
            return True

    def put_end(self, item: _End) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def _drop_oldest(self, kind) -> None:
        for i, it in enumerate(self.items):
            if isinstance(it, kind):
                del self.items[i]
                if kind is _Prepared:
                    self.windows -= 1
                    self.dropped_windows += 1
                else:
                    self.frames -= 1
                    self.dropped_frames += 1
                return

    def get(self, timeout: float, max_windows: int) -> list:
        """The next item, or up to `max_windows` consecutive windows; [] after `timeout` s with nothing."""
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            out: list = []
            while self.items:
                it = self.items[0]
                if isinstance(it, _Prepared):
                    if len(out) >= max_windows:
                        break
                    out.append(self.items.popleft())
                    self.windows -= 1
                    continue
                if not out:
                    out.append(self.items.popleft())
                    if isinstance(it, FrameOut):
                        self.frames -= 1
                break
            if out:
                self.cond.notify_all()
            return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.items.clear()
            self.cond.notify_all()


def top_labels(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """[{"label", "prob"}] of the k most probable classes (prob rounded to 6 digits)."""
    k = max(1, min(k, probs.numel()))
    vals, idx = probs.topk(k)
    return [{"label": classes[int(i)] if int(i) < len(classes) else str(int(i)), "prob": round(float(v), 6)}
            for v, i in zip(vals, idx)]


class StreamPredictor:
    """Windows of one source scored by `model` as the source is read (module doc).

        sp = StreamPredictor(model, classes, "long.mp4", window=2, step=1, **test_data_kwargs(cfg.data))
        for event in sp:           # WindowResult | FrameOut (keep_frames) | StreamStatus
            ...
        sp.summary()               # whole-video answer; sp.timeline: the WindowResult rows (clips not kept)

    The source is opened in the constructor (a source that does not open raises DecodeError / ConfigError there,
    before anything runs). Iterate once. `stop()` ends the iteration early (from any thread or a signal handler);
    `close()` releases the decode thread and the source (also when the iteration is abandoned)."""

    def __init__(
        self,
        model: torch.nn.Module,
        classes: Sequence[str],
        source: str,
        *,
        window: float,
        step: float,
        num_frames: int,
        stride: int,
        test_short_side: int = 256,
        test_crop_size: int = 256,
        num_crops: int = 1,
        num_clips: int | None = None,  # accepted with the other test_data_kwargs; a window is one clip
        mean: Sequence[float] = (0.45, 0.45, 0.45),
        std: Sequence[float] = (0.225, 0.225, 0.225),
        sampling: str = "centred",
        smooth: int = 1,
        topk: int = 5,
        batch_size: int = 8,
        queue_size: int | None = None,
        frame_queue: int = 32,
        device: str | torch.device = "cpu",
        input_format: str | None = None,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        live: bool | None = None,
        keep_frames: bool = False,
        keep_clips: bool = False,
        pipelined: bool = True,
        thumbnails: int = 12,
        status_every: float = 0.25,
    ):
        del num_clips
        if smooth < 1:
            raise ConfigError(f"smooth={smooth}: must be >= 1 windows", key="smooth")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1", key="batch_size")
        if num_crops < 1:
            raise ConfigError(f"num_crops={num_crops}: must be >= 1", key="data.num_crops")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling {sampling!r}: allowed: {', '.join(SAMPLINGS)}", key="sampling")
        self.model, self.classes = model, list(classes)
        self.device = resolve_device(device)
        self.window, self.step, self.sampling = float(window), float(step), sampling
        self.num_frames, self.stride = int(num_frames), int(stride)
        self.short = max(int(test_short_side), int(test_crop_size))
        self.crop, self.num_crops = int(test_crop_size), int(num_crops)
        self.mean, self.std = tuple(mean), tuple(std)
        self.smooth, self.topk, self.batch_size = int(smooth), int(topk), int(batch_size)
        self.keep_frames, self.keep_clips, self.pipelined = keep_frames, keep_clips, pipelined
        self.status_every = status_every
        self.spec = parse_source(source, input_format=input_format)
        # validate the window before opening anything (ConfigError keyed window/step)
        WindowScheduler(window=window, step=step, num_frames=self.num_frames, stride=self.stride, fps=25.0,
                        sampling=sampling)
        self.source = VideoSource(self.spec, short_side=self.short, keep_full=keep_frames,
                                  open_timeout=open_timeout, read_timeout=read_timeout)
        self.info: StreamInfo = self.source.info
        self.live = self.info.live if live is None else bool(live)
        self.scheduler = WindowScheduler(window=window, step=step, num_frames=self.num_frames, stride=self.stride,
                                         fps=self.info.fps, sampling=sampling, num_frames_hint=self.info.num_frames)
        qsize = queue_size if queue_size is not None else (self.batch_size if self.live else 2 * self.batch_size)
        self.queue = _Queue(qsize, frame_queue, drop=self.live)
        self.thumbs = ThumbnailKeeper(max_count=thumbnails, duration=None if self.live else self.info.duration)
        self.timeline: list[WindowResult] = []  # clips not kept (clip=None)
        self.probs: list[np.ndarray] = []  # raw probabilities per timeline row (C,)
        self.error: NlvidError | None = None
        self.interrupted = False
        self.frames = 0
        self.position = 0.0
        self.full_size: tuple[int, int] | None = None  # (W, H) of the displayed frames, from the first frame
        self._sum: torch.Tensor | None = None
        self._recent: deque[torch.Tensor] = deque(maxlen=self.smooth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._t0 = time.monotonic()
        self._scale = (1.0, 1.0)

    # -- state ---------------------------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return self.queue.dropped_windows

    @property
    def frames_dropped(self) -> int:
        return self.queue.dropped_frames

    def status(self) -> StreamStatus:
        el = time.monotonic() - self._t0
        return StreamStatus(frames=self.frames, position=self.position, duration=None if self.live else
                            self.info.duration, frames_per_s=self.frames / el if el > 0 else 0.0,
                            windows=len(self.timeline), dropped=self.dropped, elapsed=el)

    def summary(self) -> dict[str, Any]:
        """The whole-video answer so far: {"source", "windows", "dropped", "frames", "duration", "top",
        "interrupted", "error", "live"}; "top" is [] when no window was scored."""
        top = top_labels(self._sum / len(self.timeline), self.classes, self.topk) if self.timeline else []
        end = self.source.end_time if self.source.end_time is not None else self.position
        out = {"source": self.spec.name, "windows": len(self.timeline), "dropped": self.dropped,
               "frames": self.frames, "duration": round(float(end), 3), "top": top,
               "interrupted": self.interrupted, "error": str(self.error) if self.error is not None else None,
               "live": self.live}
        if self.frames_dropped:
            out["frames_dropped"] = self.frames_dropped
        return out

    def thumbnails(self) -> list[tuple[float, np.ndarray]]:
        return self.thumbs.items

    # -- control -------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """End the iteration at the next step; the windows scored so far stay (marks the run interrupted)."""
        self.interrupted = True
        self._stop.set()
        self.source.stop()

    def close(self) -> None:
        """Stop the decode thread and close the source (idempotent)."""
        self._stop.set()
        self.source.stop()
        self.queue.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():  # blocked in a read: it ends when the read returns; do not close under it
                return
        self.source.close()

    # -- producing (decode side) ---------------------------------------------------------------------------------

    def _prepare(self, c: WindowClip) -> _Prepared:
        views, boxes = test_views(c.frames, short_side=self.short, crop_size=self.crop, num_crops=self.num_crops,
                                  mean=self.mean, std=self.std)  # (V, 3, T, S, S)
        sx, sy = self._scale
        x0, y0, x1, y1 = boxes[0]
        return _Prepared(c, views, (x0 * sx, y0 * sy, x1 * sx, y1 * sy))

    def _items(self) -> Iterator[Any]:
        """Windows (prepared) and frames in stream order; the clean end's last windows. Raises DecodeError."""
        for f in self.source.frames():
            if self._stop.is_set():
                return
            if self.frames == 0 and f.full is not None:
                self.full_size = (f.full.shape[1], f.full.shape[0])
                self._scale = (f.full.shape[1] / f.rgb.shape[1], f.full.shape[0] / f.rgb.shape[0])
            self.thumbs.offer(f.time, f.rgb)
            for c in self.scheduler.push(f.time, f.rgb, f.index):
                yield self._prepare(c)
            if f.full is not None:
                yield FrameOut(f.index, f.time, f.full)
            self.frames = f.index + 1
            self.position = f.time
        if self._stop.is_set():
            return
        for c in self.scheduler.finish(self.source.end_time):
            yield self._prepare(c)
        if self.source.end_time is not None:
            self.position = self.source.end_time

    def _produce(self) -> None:
        end = _End()
        try:
            for item in self._items():
                if not self.queue.put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which reports or re-raises it
            end.error = e
        finally:
            self.scheduler.discard()
            self.queue.put_end(end)

    # -- consuming (model side) ----------------------------------------------------------------------------------

    def _run(self, batch: list[_Prepared]) -> list[WindowResult]:
        views = torch.cat([p.views for p in batch]).to(self.device)  # (sum V, 3, T, S, S)
        with torch.inference_mode():
            logits = self.model(views).float().cpu()
        require_finite(logits, f"{self.spec.name} windows {batch[0].clip.index}..{batch[-1].clip.index}")
        probs = logits.softmax(-1)  # (sum V, C)
        out, i = [], 0
        for p in batch:
            v = p.views.shape[0]
            raw = probs[i : i + v].mean(0)  # (C,)
            i += v
            self._recent.append(raw)
            smoothed = torch.stack(list(self._recent)).mean(0) if self.smooth > 1 else raw
            self._sum = raw.clone() if self._sum is None else self._sum + raw
            c = p.clip
            r = WindowResult(index=c.index, start=c.start, end=c.end, probs=smoothed, raw=raw,
                             top=top_labels(smoothed, self.classes, self.topk), times=c.times,
                             frame_times=c.frame_times, frame_indices=c.frame_indices, box=p.box,
                             dropped=self.dropped)
            self.timeline.append(r)
            self.probs.append(raw.numpy())
            if self.keep_clips:
                r = WindowResult(**{**r.__dict__, "clip": p.views[:1].to(self.device)})
            out.append(r)
        return out

    def __iter__(self) -> Iterator[WindowResult | FrameOut | StreamStatus]:
        if self._started:
            raise RuntimeError("a StreamPredictor is iterated once")
        self._started = True
        self.model.eval()
        self._t0 = time.monotonic()
        try:
            if self.pipelined:
                yield from self._iter_pipelined()
            else:
                yield from self._iter_sequential()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.close()

    def _iter_sequential(self) -> Iterator[Any]:
        batch: list[_Prepared] = []
        try:
            for item in self._items():
                if isinstance(item, _Prepared):
                    batch.append(item)
                    if len(batch) < self.batch_size:
                        continue
                yield from self._run(batch) if batch else ()
                batch = []
                if isinstance(item, FrameOut):
                    yield item
            if batch:
                yield from self._run(batch)
        except DecodeError as e:
            self.error = e
            yield from self._run(batch) if batch and not self._stop.is_set() else ()

    def _iter_pipelined(self) -> Iterator[Any]:
        self._thread = threading.Thread(target=self._produce, name="nlvid-decode", daemon=True)
        self._thread.start()
        last_status = time.monotonic()
        while True:
            if self._stop.is_set():
                return
            items = self.queue.get(0.1, self.batch_size)
            if time.monotonic() - last_status >= self.status_every:
                last_status = time.monotonic()
                yield self.status()
            if not items:
                continue
            if isinstance(items[0], _Prepared):
                yield from self._run(items)
            elif isinstance(items[0], FrameOut):
                yield items[0]
            elif isinstance(items[0], _End):
                err = items[0].error
                if err is None:
                    return
                if isinstance(err, DecodeError):
                    self.error = err
                    return
                raise err


# ------------------------------------------------------------------------------------------------ timeline files


def timeline_record(sp: StreamPredictor) -> dict[str, Any]:
    """What timeline.json holds: {"source", "settings", "summary", "timeline": [{"index", "start", "end", "top"}]}
    (times in seconds from the first frame; "top" after smoothing)."""
    settings = {"window": sp.window, "stride": sp.step, "sampling": sp.sampling, "smooth": sp.smooth,
                "crops": sp.num_crops, "num_frames": sp.num_frames, "frame_stride": sp.stride,
                "fps": round(sp.info.fps, 6), "live": sp.live}
    return {"source": sp.spec.name, "settings": settings, "summary": sp.summary(),
            "timeline": [r.to_json() for r in sp.timeline]}


def write_timeline(sp: StreamPredictor, out_dir: str | Path, *, topk: int | None = None) -> list[Path]:
    """Write timeline.json (`timeline_record`) and timeline.csv (index, start, end, label_1, prob_1, ...,
    label_k, prob_k: one row per window) into `out_dir` (created); returns the two paths."""
    out = Path(out_dir)
    k = topk or sp.topk
    with writing(out, "folder"):
        out.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out / "timeline.json", out / "timeline.csv"
    with writing(jpath, "timeline"):
        jpath.write_text(json.dumps(timeline_record(sp), indent=1) + "\n")
    with writing(cpath, "timeline"), cpath.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "start", "end"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob")])
        for r in sp.timeline:
            cells: list[Any] = [r.index, f"{r.start:.3f}", f"{r.end:.3f}"]
            for t in r.top[:k]:
                cells += [t["label"], f"{t['prob']:.6f}"]
            w.writerow(cells)
    return [jpath, cpath]
