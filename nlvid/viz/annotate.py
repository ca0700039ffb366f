"""The video itself, annotated: current top labels with probability bars (and optionally attention heat) per frame.

Contract (what `nlvid predict` on a long video / stream calls):

    annotate_frame(frame, labels=None, heat=None) -> np.ndarray
        frame   uint8 (H, W, 3) RGB (not changed; a new array is returned)
        labels  [(name, prob), ...] or [{"label": name, "prob": prob}, ...], drawn in the given order (pass the
                top-k, best first); None or [] draws no panel; rows that do not fit the frame's height are left
                out, and a frame too small for one row (under about 60 px wide) gets none
        heat    float (h, w) in [0, 1] of any size (stretched over the whole frame by `resize_heat`; NaN = no
                tint) or None; drawn first with `nlvid.viz.render.overlay` (inferno, vmin 0, vmax 1)
        The panel is a semi-transparent dark box in the top-left corner (`panel_box` says where), one row per
        label: its name and percentage, a horizontal bar of length prob under them; sizes scale with the frame
        height, so it reads the same at 240p and 1080p.

    with AnnotatedVideoWriter(path, *, fps, width, height, codec=None, crf=20, preset="veryfast") as w:
        w.write(frame, labels=..., heat=...)      # annotate_frame, then encode one frame
        fps     the original rate: Fraction, int, float or "30000/1001"; kept exactly as a Fraction (floats near
                N*1000/1001 become that NTSC fraction); frame i gets pts i in time base 1/fps
        width, height   the original size; every frame must be uint8 (height, width, 3) RGB (else ConfigError).
                yuv420p needs even sizes: an odd one is padded by one edge-replicated pixel at the right/bottom
                (`w.padded`, `w.encoded_size` (W, H) say what was written)
        codec   None: libx264 (yuv420p, `crf`, `preset`) when PyAV has it, else mpeg4; `w.codec` says which
        Audio is left out: the MP4 has one video stream. `w.frames_written` counts the frames.
        Errors: a missing output folder, a folder we may not write in, or a failing write -> OutputError, one
        line naming the path. Leaving the `with` by any exception (KeyboardInterrupt too) flushes the encoder
        and closes the file, so the frames written so far stay a decodable MP4 (a killed process, SIGKILL,
        leaves no index: MP4 writes it on close). Without `with`: w = AnnotatedVideoWriter(...); ...; w.close().

    attention_heat(model, clip, *, block=None, queries=3, topk=20, frame_size=None, box=None) -> np.ndarray
        clip    float tensor (1, 3, T, H, W), the model's input, on the model's device
        block   NL block name; None = the first res3 NL block, else the first NL block (`resolve_blocks`);
                ConfigError if the model has no NL block or the name is not one
        Runs one forward pass under `AttentionRecorder`, chooses `queries` query cells the way `nlvid visualize`
        does (`analyse_block` -> `choose_queries`: the most concentrated, spread round-robin over time), averages
        their attention over the key grid and scales it to a maximum of 1. Returns float32 (T, H', W') in [0, 1]:
        map i is for input frame i (the key cell holding that frame; `heat_for_frame`, `heat_to_frame`).
        Without frame_size: (H', W') = (H, W), the clip's pixels. With frame_size=(W0, H0), the original frames'
        size, and box=(x0, y0, x1, y1), the region of the original frame the clip shows (default: all of it),
        the maps are in original pixels, 0 outside the box: pass them straight to `write(heat=...)`.

    resize_heat(heat, size) -> float32 (H, W): one (h, w) map resized to size=(W, H), bilinear, NaN kept as NaN.
    panel_box(width, height, n_labels) -> (x0, y0, x1, y1) of the label panel, or None when none is drawn.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from nlvid.errors import ConfigError, OutputError, writing
from nlvid.models import AttentionRecorder
from nlvid.viz.attention import analyse_block, nl_blocks, resolve_blocks, rows_fn
from nlvid.viz.render import font, heat_for_frame, heat_to_frame, overlay
from nlvid.viz.timeline import fit_text

BAR = (255, 170, 40)
TRACK = (80, 80, 80)
PANEL_ALPHA = 0.6  # share of black over the frame inside the panel
NTSC = 1001


# ----------------------------------------------------------------------------------------------------------------
# One frame


def _layout(width: int, height: int) -> dict[str, int]:
    """Panel geometry for a frame: sizes scale with the frame height (480 px = 1, from 0.5 to 3); the panel is
    300 px wide at that scale (never wider than the frame). A row is the name line, a small gap, then the bar."""
    s = min(3.0, max(0.5, height / 480))
    margin = max(2, round(10 * s))
    size = max(10, round(16 * s))
    bar = max(3, round(7 * s))
    under = max(2, round(3 * s))  # name line -> bar
    return {"margin": margin, "pad": max(2, round(8 * s)), "font": size, "bar": bar, "under": under,
            "line": size + under + bar,
            "gap": max(3, round(9 * s)), "width": min(width - 2 * margin, round(300 * s))}


def _rows_that_fit(width: int, height: int, n_labels: int) -> int:
    """How many of n_labels rows the panel holds on this frame: 0 when it is too narrow for the text and bar."""
    g = _layout(width, height)
    if g["width"] - 2 * g["pad"] < 3 * g["font"]:
        return 0
    room = height - 2 * g["margin"] - 2 * g["pad"] + g["gap"]
    return max(0, min(n_labels, room // (g["line"] + g["gap"])))


def panel_box(width: int, height: int, n_labels: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) (exclusive) of the label panel on a width x height frame; None when nothing is drawn
    (no labels, or a frame too small for one row). Rows that do not fit in the frame's height are left out."""
    n = _rows_that_fit(width, height, n_labels)
    if n == 0:
        return None
    g = _layout(width, height)
    m, p = g["margin"], g["pad"]
    return (m, m, m + g["width"], m + 2 * p + n * g["line"] + (n - 1) * g["gap"])


def _pairs(labels: Sequence[Any] | None) -> list[tuple[str, float]]:
    out = []
    for item in labels or ():
        if isinstance(item, dict):
            out.append((str(item["label"]), float(item["prob"])))
        else:
            name, prob = item
            out.append((str(name), float(prob)))
    return out


def resize_heat(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float (h, w) map -> float32 (H, W) for size=(W, H): bilinear; pixels nearest a NaN cell stay NaN."""
    h = np.asarray(heat, dtype=np.float32)
    if h.ndim != 2:
        raise ConfigError(f"heat must be a 2-d (h, w) map, got shape {tuple(h.shape)}", key="heat")
    W, H = int(size[0]), int(size[1])
    if h.shape == (H, W):
        return h
    nan = np.isnan(h)
    out = np.asarray(Image.fromarray(np.where(nan, 0, h), mode="F").resize((W, H), Image.BILINEAR)).copy()
    if nan.any():
        holes = np.asarray(Image.fromarray(nan.astype(np.uint8) * 255).resize((W, H), Image.NEAREST)) > 127
        out[holes] = np.nan
    return out


def annotate_frame(frame: np.ndarray, labels: Sequence[Any] | None = None, heat: np.ndarray | None = None
                   ) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> a new annotated copy (module doc): heat overlay, then the label panel."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ConfigError(f"frame must be uint8 (H, W, 3) RGB, got {frame.dtype} {tuple(frame.shape)}", key="frame")
    H, W = frame.shape[:2]
    out = frame.copy()
    if heat is not None:
        out = overlay(out, resize_heat(heat, (W, H)), 1.0, 0.0)
    pairs = _pairs(labels)
    box = panel_box(W, H, len(pairs))
    pairs = pairs[: _rows_that_fit(W, H, len(pairs))]
    if box is None:
        return out
    x0, y0, x1, y1 = box
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = (region * (1 - PANEL_ALPHA)).round().astype(np.uint8)  # darken towards black
    img = Image.fromarray(out)
    d = ImageDraw.Draw(img)
    g = _layout(W, H)
    fs, p = g["font"], g["pad"]
    inner = x1 - x0 - 2 * p
    for k, (name, prob) in enumerate(pairs):
        y = y0 + p + k * (g["line"] + g["gap"])
        pct = f"{100 * prob:.0f}%"
        pw = d.textlength(pct, font=font(fs))
        d.text((x1 - p - pw, y), pct, font=font(fs), fill=(230, 230, 230))
        d.text((x0 + p, y), fit_text(d, name, inner - pw - fs // 2, fs), font=font(fs),
               fill=(255, 255, 255) if k == 0 else (220, 220, 220))
        by = y + fs + g["under"]
        d.rectangle((x0 + p, by, x1 - p - 1, by + g["bar"] - 1), fill=TRACK)
        length = round(min(1.0, max(0.0, prob)) * inner)
        if length > 0:
            d.rectangle((x0 + p, by, x0 + p + length - 1, by + g["bar"] - 1), fill=BAR)
    return np.asarray(img)


# ----------------------------------------------------------------------------------------------------------------
# The video


def frame_rate(fps: Fraction | int | float | str) -> Fraction:
    """A frame rate as an exact Fraction: "30000/1001", 25, 29.97002997 -> 30000/1001, 12.5 -> 25/2."""
    try:
        r = Fraction(fps) if not isinstance(fps, float) else None
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"fps {fps!r}: not a frame rate (e.g. 25, 29.97, 30000/1001)", key="fps") from None
    if r is None:
        ntsc = round(fps * NTSC / 1000)
        r = Fraction(ntsc * 1000, NTSC) if abs(fps * NTSC / 1000 - ntsc) < 1e-3 else Fraction(fps).limit_denominator(
            NTSC)
    if not r > 0:
        raise ConfigError(f"fps {fps!r}: must be > 0", key="fps")
    return r


class AnnotatedVideoWriter:
    """H.264 MP4 of annotated frames at the original rate and size (module doc)."""

    def __init__(self, path: str | Path, *, fps: Fraction | int | float | str, width: int, height: int,
                 codec: str | None = None, crf: int = 20, preset: str = "veryfast") -> None:
        self.path = Path(path)
        self.rate = frame_rate(fps)
        self.width, self.height = int(width), int(height)
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"video size {width}x{height}: must be at least 1x1", key="width")
        self.encoded_size = (self.width + self.width % 2, self.height + self.height % 2)
        self.padded = self.encoded_size != (self.width, self.height)
        self.codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        self.frames_written = 0
        folder = self.path.parent
        if not folder.is_dir():
            raise OutputError(f"{self.path}: cannot write video (folder {folder} does not exist)")
        options = {"crf": str(crf), "preset": preset} if self.codec == "libx264" else {}
        with writing(self.path, "video"):
            self._container = av.open(str(self.path), "w")
        try:
            self._stream = self._container.add_stream(self.codec, rate=self.rate, options=options)
            self._stream.width, self._stream.height = self.encoded_size
            self._stream.pix_fmt = "yuv420p"
        except BaseException:
            self._container.close()
            raise
        self._closed = False

    def __enter__(self) -> AnnotatedVideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, frame: np.ndarray, *, labels: Sequence[Any] | None = None, heat: np.ndarray | None = None
              ) -> None:
        """Annotate one uint8 (height, width, 3) RGB frame (`annotate_frame`) and encode it as the next frame."""
        if self._closed:
            raise OutputError(f"{self.path}: the video is already closed")
        frame = np.asarray(frame)
        if frame.shape != (self.height, self.width, 3):
            raise ConfigError(f"frame of shape {tuple(frame.shape)}: this video is {self.width}x{self.height}, "
                              f"frames must be ({self.height}, {self.width}, 3)", key="frame")
        img = annotate_frame(frame, labels, heat)
        if self.padded:
            img = np.pad(img, ((0, self.encoded_size[1] - self.height), (0, self.encoded_size[0] - self.width),
                               (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        vf.pts = self.frames_written
        vf.time_base = 1 / self.rate
        with writing(self.path, "video"):
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and write the MP4 index; safe to call twice. The container is closed even when the
        flush fails (the error is raised after)."""
        if self._closed:
            return
        self._closed = True
        try:
            with writing(self.path, "video"):
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            with writing(self.path, "video"):
                self._container.close()


# ----------------------------------------------------------------------------------------------------------------
# Attention heat for --attention


def attention_heat(model: torch.nn.Module, clip: torch.Tensor, *, block: str | None = None, queries: int = 3,
                   topk: int = 20, frame_size: tuple[int, int] | None = None,
                   box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Attention of a few chosen queries of one NL block, per input frame, in [0, 1] (module doc)."""
    if clip.ndim != 5 or clip.shape[0] != 1 or clip.shape[1] != 3:
        raise ConfigError(f"clip must be (1, 3, T, H, W), got {tuple(clip.shape)}", key="clip")
    name = resolve_blocks(model, block)[0]  # "all" -> the first block: one map per frame
    T, H, W = (int(v) for v in clip.shape[-3:])
    size = (W, H) if frame_size is None else (int(frame_size[0]), int(frame_size[1]))
    region = (0.0, 0.0, float(size[0]), float(size[1])) if box is None else tuple(float(v) for v in box)
    model.eval()
    with torch.no_grad(), AttentionRecorder(model, blocks=[name]) as rec:
        model(clip)
        grid_thw = tuple(int(v) for v in rec.inputs[name].shape[-3:])
        result = analyse_block(rows_fn(rec, name), name=name, block=nl_blocks(model)[name], input_shape=(T, H, W),
                               query_grid=grid_thw, box=region, frame_size=size, shown=list(range(T)),
                               num_queries=max(1, queries), topk=topk)
    grid = result.grid
    if not result.queries:
        return np.zeros((T, size[1], size[0]), dtype=np.float32)
    weights = np.mean([q.weights for q in result.queries], axis=0)  # (Nk,) mean attention of the chosen queries
    peak = float(weights.max()) if weights.size else 0.0
    weights = weights / peak if peak > 0 else np.zeros_like(weights)
    maps = [heat_to_frame(grid, heat_for_frame(grid, weights, i), size) for i in range(T)]  # T x (H', W')
    return np.nan_to_num(np.stack(maps), nan=0.0).clip(0, 1).astype(np.float32)  # (T, H', W')
