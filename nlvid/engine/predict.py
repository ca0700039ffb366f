"""Predictions for video files: multi-view averaging like `nlvid eval`, several files batched, per-file errors.

Views: `num_clips` clips evenly spaced over the video (`nlvid.data.sampling.uniform_starts`) x `num_crops` crops
(`nlvid.data.test_views`); the softmax scores of all views are averaged (paper section 4, inference). With `segments=S`, the
video is also cut into windows [0, S), [S, 2S), ...: one clip centred in each window (x the crops) gives that
window's top label. All clips of one file are decoded in one pass (`nlvid.data.decode.read_clips`); files are
decoded by a small thread pool (PyAV releases the GIL) while the model runs on full batches of views.

A file that cannot be decoded (missing, not a video, a stream that breaks before the frames a view needs, like
`corrupted.mp4`) gives `{"file": ..., "error": "..."}` and the other files are still predicted; partial frames are
NOT used (a prediction from a truncated stream would look as trustworthy as any other).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from nlvid.data import probe, test_views
from nlvid.data.decode import read_clips
from nlvid.data.sampling import clip_span, uniform_starts
from nlvid.engine.device import resolve_device
from nlvid.engine.evaluate import Progress, require_finite
from nlvid.errors import ConfigError, NlvidError

@dataclass
class _Decoded:
    index: int
    views: torch.Tensor | None  # (V, 3, T, S, S)
    owners: list[int]  # per view: -1 = whole-video view, k = segment k
    segments: list[tuple[float, float]]
    error: str | None = None


def _segment_windows(duration: float, seconds: float) -> list[tuple[float, float]]:
    n = max(1, math.ceil(duration / seconds - 1e-9))
    return [(k * seconds, min(duration, (k + 1) * seconds)) for k in range(n)]


def _decode_one(
    index: int,
    path: Path,
    *,
    num_frames: int,
    stride: int,
    num_clips: int,
    num_crops: int,
    short_side: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    segments: float | None,
) -> _Decoded:
    try:
        windows: list[tuple[float, float]] = []
        seg_starts: list[int] = []
        if segments:
            info = probe(path)
            fps = info.fps if info.fps > 0 else 25.0
            windows = _segment_windows(info.duration, segments)
            half = clip_span(num_frames, stride) // 2
            seg_starts = [max(0, int(round((a + b) / 2 * fps)) - half) for a, b in windows]

        def starts(total: int) -> list[int]:
            whole = uniform_starts(total, num_frames=num_frames, stride=stride, num_clips=num_clips)
            return whole + seg_starts

        short = max(short_side, crop_size)
        clips = read_clips(path, starts, num_frames=num_frames, stride=stride, short_side=short)
        views, owners = [], []
        for c, clip in enumerate(clips):
            v, _ = test_views(clip, short_side=short, crop_size=crop_size, num_crops=num_crops, mean=mean, std=std)
            views.append(v)
            owners += [-1 if c < num_clips else c - num_clips] * v.shape[0]
        return _Decoded(index, torch.cat(views), owners, windows)
    except NlvidError as e:
        reason = getattr(e, "reason", None) or str(e)
        if reason.startswith(f"{path}: "):
            reason = reason[len(str(path)) + 2 :]
        return _Decoded(index, None, [], [], reason)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the others; the reason is reported
        return _Decoded(index, None, [], [], f"{e.__class__.__name__}: {e}")


def _decoded_in_order(
    paths: Sequence[Path], decode: Callable[[int, Path], _Decoded], workers: int
) -> Iterator[_Decoded]:
    """Decode ahead with a thread pool, at most 2 * workers files in flight; yields in input order."""
    if workers <= 0:
        for i, p in enumerate(paths):
            yield decode(i, p)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list = []
        nxt = 0
        while nxt < len(paths) or pending:
            while nxt < len(paths) and len(pending) < 2 * workers:
                pending.append(pool.submit(decode, nxt, paths[nxt]))
                nxt += 1
            yield pending.pop(0).result()


def _top(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    k = max(1, min(k, probs.numel()))
    vals, idx = probs.topk(k)
    return [{"label": _name(classes, int(i)), "prob": round(float(v), 6)} for v, i in zip(vals, idx)]


def _name(classes: Sequence[str], i: int) -> str:
    return classes[i] if i < len(classes) else str(i)


def predict_files(
    model: torch.nn.Module,
    classes: Sequence[str],
    paths: Sequence[str | Path],
    *,
    num_frames: int,
    stride: int,
    num_clips: int = 10,
    num_crops: int = 3,
    test_short_side: int = 256,
    test_crop_size: int = 256,
    mean: Sequence[float] = (0.45, 0.45, 0.45),
    std: Sequence[float] = (0.225, 0.225, 0.225),
    topk: int = 5,
    segments: float | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    workers: int = 2,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels of each video, in the order given: [{"file", "top": [{"label", "prob"}], "views"}] or
    [{"file", "error"}]; with `segments` (seconds) each result also has "segments": [{"start", "end", "label",
    "prob"}]. `progress("file", done=..., total=..., file=...)` is called after each file."""
    if segments is not None and segments <= 0:
        raise ConfigError(f"segments={segments}: must be a positive number of seconds", key="segments")
    paths = [Path(p) for p in paths]
    device = resolve_device(device)
    model.eval()
    decode = partial(
        _decode_one, num_frames=num_frames, stride=stride, num_clips=num_clips, num_crops=num_crops,
        short_side=test_short_side, crop_size=test_crop_size, mean=mean, std=std, segments=segments,
    )
    results: list[dict[str, Any] | None] = [None] * len(paths)
    sums: dict[int, dict[int, torch.Tensor]] = {}  # file -> owner (-1 whole, k segment) -> summed probs
    counts: dict[int, dict[int, int]] = {}
    meta: dict[int, _Decoded] = {}
    remaining: dict[int, int] = {}  # views not yet run per file
    queue: list[tuple[int, int, torch.Tensor]] = []  # (file, owner, view)
    done = 0

    def finish(i: int) -> None:
        nonlocal done
        d = meta.pop(i)
        s, c = sums.pop(i), counts.pop(i)
        whole = s[-1] / c[-1]
        out: dict[str, Any] = {"file": str(paths[i]), "top": _top(whole, classes, topk), "views": c[-1]}
        if segments is not None:
            segs = []
            for k, (a, b) in enumerate(d.segments):
                p = s[k] / c[k]
                j = int(p.argmax())
                segs.append({"start": round(a, 3), "end": round(b, 3), "label": _name(classes, j),
                             "prob": round(float(p[j]), 6)})
            out["segments"] = segs
        results[i] = out
        done += 1
        if progress is not None:
            progress("file", done=done, total=len(paths), file=str(paths[i]))

    def run(batch: list[tuple[int, int, torch.Tensor]]) -> None:
        x = torch.stack([v for _, _, v in batch]).to(device)
        with torch.inference_mode():
            logits = require_finite(model(x).float().cpu(), ", ".join(sorted({str(paths[i]) for i, _, _ in batch})))
            probs = logits.softmax(-1)  # (B, classes)
        for (i, owner, _), p in zip(batch, probs):
            sums[i][owner] = sums[i].get(owner, 0) + p
            counts[i][owner] = counts[i].get(owner, 0) + 1
            remaining[i] -= 1
            if remaining[i] == 0:
                finish(i)

    for d in _decoded_in_order(paths, decode, workers):
        if d.error is not None:
            results[d.index] = {"file": str(paths[d.index]), "error": d.error}
            done += 1
            if progress is not None:
                progress("file", done=done, total=len(paths), file=str(paths[d.index]))
            continue
        meta[d.index] = d
        sums[d.index], counts[d.index] = {}, {}
        remaining[d.index] = len(d.owners)
        queue += [(d.index, o, v) for o, v in zip(d.owners, d.views)]
        while len(queue) >= batch_size:
            batch, queue = queue[:batch_size], queue[batch_size:]
            run(batch)
    while queue:
        batch, queue = queue[:batch_size], queue[batch_size:]
        run(batch)
    return [r for r in results if r is not None]
