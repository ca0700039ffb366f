"""A long video's predictions over time as one PNG: class probabilities as lines, top-1 band, frame thumbnails.

Contract (what `nlvid predict` on a long video / stream calls):

    render_timeline_png(starts, ends, probs, classes, *, path, top=5, rank="mean", classes_shown=None,
                        thumbnails=(), title=None, width=1200) -> Path
    timeline_image(starts, ends, probs, classes, *, ...same keywords without path) -> PIL.Image.Image

    starts, ends   N floats: each window's first and last second in the video (N >= 1, ends >= starts)
    probs          array-like (N, C): each window's class probabilities (softmax, in [0, 1])
    classes        C class names (long names are shortened with "..." in the legend)
    top, rank      how many classes get a line, ranked by "mean" or "max" probability over the windows
    classes_shown  exact class names to draw instead (in that order; unknown names -> ConfigError)
    thumbnails     (time_s, uint8 (H, W, 3) RGB frame of any size) pairs, drawn scaled to THUMB_HEIGHT px under
                   the time axis at their time; one that would overlap the previous one is skipped
    title          first line of the header (default "predictions over time"); the header's second line says
                   how many windows, the stride and the duration
    path           the PNG; its folder must exist (else OutputError naming it); returns Path(path)

Drawing: x = window centre (start + end) / 2 in seconds (ticks in s, or m:ss from one minute on), y =
probability 0..1. One colour per shown class (PALETTE order = legend order); a window is drawn as a dot when there
are few windows, and a single window as a segment over [start, end]. The band above the plot holds each window's
top-1 class in its colour (grey when that class has no line). Pillow only, fonts by `nlvid.viz.render.font`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nlvid.errors import ConfigError, writing
from nlvid.viz.render import PAD, _caption, _stack, font

# Distinct, colour-blind-friendly-ish line colours on a dark background (Tableau 10, brightened a little).
PALETTE = (
    (78, 160, 235), (255, 150, 40), (80, 200, 90), (240, 70, 70), (180, 130, 230),
    (200, 140, 110), (245, 130, 200), (190, 190, 190), (220, 220, 60), (40, 210, 220),
)
OTHER = (95, 95, 95)  # top-1 band: a class without a line
BACKGROUND = (24, 24, 24)  # the house background (render._stack, render._caption)
THUMB_HEIGHT = 72
PLOT_HEIGHT = 300
LEGEND_WIDTH = 300
DOTS_UP_TO = 60  # windows drawn with a dot each when there are at most this many
RANKS = ("mean", "max")


def _seconds(t: float, span: float) -> str:
    if span >= 60:
        m, s = divmod(t, 60)
        return f"{int(m)}:{s:04.1f}" if span < 180 else f"{int(m)}:{int(round(s)):02d}"
    return f"{t:.1f}s" if span < 20 else f"{t:.0f}s"


def _prob(v: float) -> str:
    """A probability in 5 characters: 0.81, 0.004 (small ones keep a digit), 1.00."""
    return f"{v:.2f} " if v >= 0.0995 or v == 0 else f"{v:.3f}"


def _tick_step(span: float, max_ticks: int) -> float:
    """A 1/2/5 x 10^k (or 15/30 s, 1/2/5/10 min) step giving at most max_ticks ticks over span seconds."""
    raw = span / max(1, max_ticks)
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if step >= raw:
            return float(step)
    return float(10 ** math.ceil(math.log10(raw)))


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: float, size: int) -> str:
    """`text` shortened with "..." to fit `width` pixels at font size `size` (also used by viz.annotate)."""
    if draw.textlength(text, font=font(size)) <= width:
        return text
    while text and draw.textlength(text + "...", font=font(size)) > width:
        text = text[:-1]
    return text + "..."


def _check(starts, ends, probs, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(starts, dtype=np.float64).reshape(-1)
    e = np.asarray(ends, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]  # one window given as a (C,) vector
    if p.ndim != 2 or p.shape[0] == 0:
        raise ConfigError(f"timeline: probs must be (windows, classes), got shape {tuple(p.shape)}", key="probs")
    if not len(s) == len(e) == p.shape[0]:
        raise ConfigError(f"timeline: {len(s)} starts, {len(e)} ends and {p.shape[0]} rows of probs differ",
                          key="probs")
    if p.shape[1] != len(classes):
        raise ConfigError(f"timeline: probs has {p.shape[1]} classes, {len(classes)} names given", key="classes")
    return s, np.maximum(e, s), np.nan_to_num(p)


def _chosen(p: np.ndarray, classes: Sequence[str], top: int, rank: str,
            classes_shown: Sequence[str] | None) -> list[int]:
    if classes_shown is not None:
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in classes_shown if c not in index]
        if unknown:
            raise ConfigError(f"timeline: unknown class(es) {', '.join(map(repr, unknown))}", key="classes_shown")
        return [index[c] for c in classes_shown]
    if rank not in RANKS:
        raise ConfigError(f"timeline: rank {rank!r}: allowed: {', '.join(RANKS)}", key="rank")
    score = p.mean(0) if rank == "mean" else p.max(0)
    order = np.lexsort((-p.mean(0), -score))  # by score, ties by mean
    return [int(i) for i in order[: max(1, top)]]


def timeline_image(
    starts: Sequence[float],
    ends: Sequence[float],
    probs: np.ndarray | Sequence[Sequence[float]],
    classes: Sequence[str],
    *,
    top: int = 5,
    rank: str = "mean",
    classes_shown: Sequence[str] | None = None,
    thumbnails: Sequence[tuple[float, np.ndarray]] = (),
    title: str | None = None,
    width: int = 1200,
) -> Image.Image:
    """The timeline figure (see the module doc); `render_timeline_png` saves it."""
    s, e, p = _check(starts, ends, probs, classes)
    shown = _chosen(p, classes, top, rank, classes_shown)
    colour = {c: PALETTE[k % len(PALETTE)] for k, c in enumerate(shown)}
    n = len(s)
    centres = (s + e) / 2
    t0, t1 = float(s.min()), float(e.max())
    if t1 - t0 < 1e-6:
        t1 = t0 + 1.0
    span = t1 - t0

    left, right, band_h, gap = 56, 16, 12, 6
    width = max(width, left + right + LEGEND_WIDTH + 200)
    plot_w = width - left - right - LEGEND_WIDTH
    axis_h = 26
    thumbs_h = THUMB_HEIGHT + 14 if len(thumbnails) else 0
    height = PAD + band_h + gap + PLOT_HEIGHT + axis_h + thumbs_h + PAD
    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    band_y = PAD
    top_y = band_y + band_h + gap
    y0 = top_y + PLOT_HEIGHT  # probability 0

    def X(t: float) -> float:
        return left + (t - t0) / span * (plot_w - 1)

    def Y(v: float) -> float:
        return y0 - v * PLOT_HEIGHT

    # Top-1 band: each window's best class over [start, end] (at least 1 px wide).
    best = p.argmax(1)
    for i in np.argsort(e - s)[::-1]:  # long windows first, so short ones stay visible on top
        xa, xb = X(s[i]), X(e[i])
        d.rectangle((xa, band_y, max(xa, xb - 1), band_y + band_h - 1), fill=colour.get(int(best[i]), OTHER))
    d.text((left - 6 - d.textlength("top-1", font=font(11)), band_y - 1), "top-1", font=font(11),
           fill=(200, 200, 200))

    # Axes and grid.
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = Y(v)
        d.line((left, y, left + plot_w, y), fill=(200, 200, 200) if v == 0 else (60, 60, 60), width=1)
        label = f"{v:.2f}".rstrip("0").rstrip(".") if v not in (0.0, 1.0) else f"{v:.0f}"
        d.text((left - 8 - d.textlength(label, font=font(12)), y - 7), label, font=font(12), fill=(220, 220, 220))
    d.line((left, top_y, left, y0), fill=(200, 200, 200), width=1)
    step = _tick_step(span, max(2, plot_w // 90))
    first = math.ceil(t0 / step - 1e-9) * step
    for k in range(int((t1 - first) / step + 1e-9) + 1):
        t = first + k * step
        x = X(t)
        d.line((x, top_y, x, y0), fill=(45, 45, 45), width=1)
        d.line((x, y0, x, y0 + 4), fill=(220, 220, 220), width=1)
        label = _seconds(t, span)
        tw = d.textlength(label, font=font(12))
        d.text((min(max(0, x - tw / 2), left + plot_w - tw), y0 + 6), label, font=font(12), fill=(230, 230, 230))

    # One line per class, the best ranked drawn last (on top).
    lw = 3 if n <= 200 else 2
    for c in reversed(shown):
        col = colour[c]
        if n == 1:
            xa, xb, y = X(s[0]), X(e[0]), Y(p[0, c])
            d.line((xa, y, max(xa + 1, xb), y), fill=col, width=lw)
        else:
            order = np.argsort(centres, kind="stable")
            pts = [(X(centres[i]), Y(p[i, c])) for i in order]
            d.line(pts, fill=col, width=lw, joint="curve")
        if n <= DOTS_UP_TO:
            for i in range(n):
                x, y = X(centres[i]), Y(p[i, c])
                d.ellipse((x - 3.5, y - 3.5, x + 3.5, y + 3.5), fill=col, outline=BACKGROUND)

    # Legend: swatch, name, mean / max.
    lx = left + plot_w + 18
    d.text((lx, top_y), f"class (ranked by {rank if classes_shown is None else 'choice'})", font=font(13),
           fill=(200, 200, 200))
    d.text((lx + LEGEND_WIDTH - 98, top_y), "mean   max", font=font(13), fill=(200, 200, 200))
    for k, c in enumerate(shown):
        y = top_y + 24 + k * 24
        if y + 20 > y0 + axis_h:
            d.text((lx, y), f"... {len(shown) - k} more", font=font(13), fill=(200, 200, 200))
            break
        d.rectangle((lx, y + 3, lx + 18, y + 15), fill=colour[c])
        name = fit_text(d, str(classes[c]), LEGEND_WIDTH - 132, 15)
        d.text((lx + 26, y), name, font=font(15), fill=(240, 240, 240))
        d.text((lx + LEGEND_WIDTH - 98, y + 1), f"{_prob(p[:, c].mean())}  {_prob(p[:, c].max())}", font=font(13),
               fill=(220, 220, 220))

    # Thumbnails under the axis, at their times; skip one that would overlap the previous.
    ty = y0 + axis_h + 10
    last = -1e9
    for t, frame in sorted(thumbnails, key=lambda tf: float(tf[0])):
        fr = np.asarray(frame)
        if fr.ndim != 3 or fr.shape[0] == 0 or fr.shape[1] == 0:
            continue
        tw = max(1, round(fr.shape[1] * THUMB_HEIGHT / fr.shape[0]))
        x = X(min(max(float(t), t0), t1))
        xa = int(round(min(max(x - tw / 2, 0), width - tw)))
        if xa < last + 2:
            continue
        thumb = Image.fromarray(fr[..., :3].astype(np.uint8)).resize((tw, THUMB_HEIGHT), Image.BILINEAR)
        img.paste(thumb, (xa, ty))
        d.line((x, y0 + 1, x, ty - 1), fill=(150, 150, 150), width=1)
        d.rectangle((xa - 1, ty - 1, xa + tw, ty + THUMB_HEIGHT), outline=(150, 150, 150))
        last = xa + tw

    stride = float(np.median(np.diff(np.sort(s)))) if n > 1 else 0.0
    length = float(np.median(e - s))
    head = [title or "predictions over time",
            f"{n} window{'s' if n != 1 else ''} of {length:.2f}s" + (f", every {stride:.2f}s" if n > 1 else "")
            + f", {_seconds(t0, span)} .. {_seconds(t1, span)}; line = class probability at the window's centre"]
    return _stack([_caption(width, head), img])


def render_timeline_png(
    starts: Sequence[float],
    ends: Sequence[float],
    probs: np.ndarray | Sequence[Sequence[float]],
    classes: Sequence[str],
    *,
    path: str | Path,
    top: int = 5,
    rank: str = "mean",
    classes_shown: Sequence[str] | None = None,
    thumbnails: Sequence[tuple[float, np.ndarray]] = (),
    title: str | None = None,
    width: int = 1200,
) -> Path:
    """Draw the timeline (module doc) and save it as a PNG at `path`; returns Path(path)."""
    img = timeline_image(starts, ends, probs, classes, top=top, rank=rank, classes_shown=classes_shown,
                         thumbnails=thumbnails, title=title, width=width)
    path = Path(path)
    with writing(path, "timeline PNG"):
        img.save(path, format="PNG", compress_level=6)
    return path
