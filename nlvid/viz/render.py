"""Pictures of Non-local attention: heatmap overlays, arrows to the top-k keys, frame grids, GIF/MP4, terminal.

Everything is drawn with PIL (ImageDraw) and numpy at a readable size: frames are scaled so a panel is
DISPLAY_MIN..DISPLAY_MAX pixels tall (small frames are upscaled). The colour map is "inferno" (dark = little
attention, yellow = most); every figure carries a scale bar with the weight values and says how weights were
normalised (`nlvid.viz.attention.normalisation_note`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Group
from rich.table import Table
from rich.text import Text

from nlvid.viz.attention import BlockAttention, ClipAttention, GridMap
from nlvid.viz.stats import BlockStats

DISPLAY_MIN = 256
DISPLAY_MAX = 360
PAD = 10
QUERY_COLOUR = (40, 255, 90)
KEY_COLOUR = (0, 220, 255)

# inferno, 9 anchors (matplotlib's values), interpolated to a 256-entry table
_ANCHORS = np.array(
    [
        (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
        (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
    ],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], -1
).round().astype(np.uint8)  # (256, 3)


def colormap(v: np.ndarray) -> np.ndarray:
    """values in [0, 1] (any shape) -> uint8 RGB (..., 3)."""
    idx = (np.clip(np.nan_to_num(v), 0, 1) * 255).round().astype(np.int64)
    return _LUT[idx]


def font(size: int = 16) -> ImageFont.ImageFont:
    """PIL's default font at `size` px (every figure of nlvid.viz uses this one)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def display_scale(height: int) -> float:
    if height < DISPLAY_MIN:
        return DISPLAY_MIN / height
    if height > DISPLAY_MAX:
        return DISPLAY_MAX / height
    return 1.0


# ----------------------------------------------------------------------------------------------------------------
# Heat maps


def heat_for_frame(grid: GridMap, weights: np.ndarray, frame: int) -> np.ndarray:
    """(Nk,) weights -> (h', w') map of the key temporal cell holding input `frame` (zeros if none)."""
    kt = grid.kt_of_frame(frame)
    w3 = weights.reshape(grid.key_grid)
    if kt is None:
        return np.zeros(grid.key_grid[1:], dtype=np.float32)
    return w3[kt]


def heat_to_frame(grid: GridMap, heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h', w') key-cell values -> float (H, W) map over an image of `size` (W, H) showing the original frame.

    The map is laid on the query grid (key cells repeated by the pool size), resized over the view box (undoing the
    model's resize/crop) and placed into the frame; outside the box it is 0. Bilinear, so a peak sits at the cell
    centre."""
    W, H = size
    fw, fh = grid.frame_size
    sx, sy = W / fw, H / fh
    q = grid.key_heat_in_input(heat.astype(np.float32))  # (h, w)
    cover = grid.key_heat_in_input(np.ones_like(heat, dtype=np.float32))  # 1 where a key cell covers, else 0
    x0, y0, x1, y1 = grid.box
    bx0, by0 = int(round(x0 * sx)), int(round(y0 * sy))
    bx1, by1 = int(round(x1 * sx)), int(round(y1 * sy))
    bw, bh = max(1, bx1 - bx0), max(1, by1 - by0)
    # Bilinear from cell centres keeps a peak where its key is; the coverage mask is resized with NEAREST so pixels
    # no key cell covers (outside the view box, or a strip dropped by floor pooling) come back as NaN (no tint).
    arr = np.asarray(Image.fromarray(q, mode="F").resize((bw, bh), Image.BILINEAR)).copy()
    cov = np.asarray(Image.fromarray(cover, mode="F").resize((bw, bh), Image.NEAREST))
    arr[cov < 0.5] = np.nan
    out = np.full((H, W), np.nan, dtype=np.float32)
    ya, xa = max(0, by0), max(0, bx0)
    yb, xb = min(H, by0 + bh), min(W, bx0 + bw)
    out[ya:yb, xa:xb] = arr[ya - by0 : yb - by0, xa - bx0 : xb - bx0]
    return out


def overlay(frame: np.ndarray, heat: np.ndarray, vmax: float, vmin: float = 0.0) -> np.ndarray:
    """uint8 (H, W, 3) frame + float (H, W) heat -> uint8 blend: light tint where cold, opaque colour where hot;
    NaN heat (no key there) leaves the frame as it is."""
    nan = np.isnan(heat)
    v = (heat - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(heat)
    v = np.clip(np.nan_to_num(v), 0, 1)[..., None]
    alpha = np.where(nan[..., None], 0.0, 0.25 + 0.6 * v)
    col = colormap(v[..., 0]).astype(np.float32)
    out = frame.astype(np.float32) * (1 - alpha) + col * alpha
    return out.clip(0, 255).astype(np.uint8)


def _resize_frame(frame: np.ndarray, scale: float) -> np.ndarray:
    H, W = frame.shape[:2]
    if scale == 1.0:
        return frame
    return np.asarray(Image.fromarray(frame).resize((round(W * scale), round(H * scale)), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------------------------
# Drawing helpers


def _text(draw: ImageDraw.ImageDraw, xy, text: str, size: int = 16, fill=(255, 255, 255), stroke: bool = True):
    draw.text(xy, text, font=font(size), fill=fill, stroke_width=2 if stroke else 0, stroke_fill=(0, 0, 0))


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, r: float = 9, colour=QUERY_COLOUR, label: str = ""):
    draw.ellipse((x - r - 2, y - r - 2, x + r + 2, y + r + 2), outline=(0, 0, 0), width=5)
    draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=3)
    draw.line((x - r * 0.6, y, x + r * 0.6, y), fill=colour, width=2)
    draw.line((x, y - r * 0.6, x, y + r * 0.6), fill=colour, width=2)
    if label:
        _text(draw, (x + r + 3, y - r - 4), label, 15, colour)


def _arrow(draw: ImageDraw.ImageDraw, a, b, width: int, colour):
    ax, ay = a
    bx, by = b
    d = max(1e-6, ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5)
    ux, uy = (bx - ax) / d, (by - ay) / d
    head = 6 + 2 * width
    ex, ey = bx - ux * head * 0.8, by - uy * head * 0.8
    if d > head:
        draw.line((ax, ay, ex, ey), fill=(0, 0, 0), width=width + 2)
        draw.line((ax, ay, ex, ey), fill=colour, width=width)
    px, py = -uy, ux
    tri = [(bx, by), (bx - ux * head + px * head * 0.5, by - uy * head + py * head * 0.5),
           (bx - ux * head - px * head * 0.5, by - uy * head - py * head * 0.5)]
    draw.polygon(tri, fill=colour, outline=(0, 0, 0))


def _scale_bar(width: int, vmin: float, vmax: float, label: str, note: str = "") -> Image.Image:
    """A horizontal colour bar with ticks vmin .. vmax, a caption, and an optional note on the right."""
    h = 66
    img = Image.new("RGB", (width, h), (24, 24, 24))
    d = ImageDraw.Draw(img)
    bar_w = min(420, width - 2 * PAD - 10)
    x0, y0 = PAD, 26
    grad = colormap(np.linspace(0, 1, bar_w))[None].repeat(14, 0)
    img.paste(Image.fromarray(grad), (x0, y0))
    d.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + 14), outline=(200, 200, 200))
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + f * (bar_w - 1)
        d.line((x, y0 + 14, x, y0 + 19), fill=(220, 220, 220), width=1)
        t = f"{vmin + f * (vmax - vmin):.3g}"
        tw = d.textlength(t, font=font(13))
        d.text((min(max(0, x - tw / 2), width - tw), y0 + 21), t, font=font(13), fill=(230, 230, 230))
    d.text((x0, 4), label, font=font(15), fill=(230, 230, 230))
    if note:
        d.text((x0 + bar_w + 24, y0 - 2), note, font=font(14), fill=(200, 200, 200))
    return img


def _caption(width: int, lines: Sequence[str], size: int = 16) -> Image.Image:
    h = PAD + len(lines) * (size + 6)
    img = Image.new("RGB", (width, h), (24, 24, 24))
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((PAD, PAD // 2 + i * (size + 6)), line, font=font(size), fill=(240, 240, 240))
    return img


def _stack(images: Sequence[Image.Image], *, across: bool = False) -> Image.Image:
    """Images one below the other (or side by side with `across`) on the dark background."""
    long = sum(im.width if across else im.height for im in images)
    short = max(im.height if across else im.width for im in images)
    out = Image.new("RGB", (long, short) if across else (short, long), (24, 24, 24))
    pos = 0
    for im in images:
        out.paste(im, (pos, 0) if across else (0, pos))
        pos += im.width if across else im.height
    return out


def _frame_label(clip: ClipAttention, i: int) -> str:
    s = f"frame {i}"
    if clip.source_frames:
        s += f" (video #{clip.source_frames[i]}"
        if clip.timestamps:
            s += f", {clip.timestamps[i]:.2f}s"
        s += ")"
    return s


class _Row:
    """Shown frames side by side (already at display scale), a row title, a label over each panel, and the pixel
    offset of each panel so original-frame coordinates can be drawn on it."""

    def __init__(self, clip: ClipAttention, frames: Sequence[int], panels: Sequence[np.ndarray], title: str = ""):
        self.scale = display_scale(clip.frames.shape[1])
        self.frames = list(frames)
        ph, pw = panels[0].shape[:2]
        self.pw, self.ph = pw, ph
        top = 44 if title else 22
        self.image = Image.new("RGB", (PAD + len(panels) * (pw + PAD), top + ph + PAD // 2), (24, 24, 24))
        d = ImageDraw.Draw(self.image)
        if title:
            d.text((PAD, 3), title, font=font(15), fill=(150, 210, 255))
        self.offsets = {}
        for k, (i, p) in enumerate(zip(self.frames, panels)):
            ox = PAD + k * (pw + PAD)
            self.image.paste(Image.fromarray(p), (ox, top))
            self.offsets[i] = (ox, top)
            d.text((ox, top - 19), _frame_label(clip, i), font=font(14), fill=(230, 230, 230))
        self.draw = ImageDraw.Draw(self.image)

    def to_px(self, frame: int, x: float, y: float) -> tuple[float, float]:
        ox, oy = self.offsets[frame]
        return ox + x * self.scale, oy + y * self.scale


def _range(weights: np.ndarray) -> tuple[float, float]:
    if weights.size == 0:
        return 0.0, 1.0
    lo, hi = float(weights.min()), float(weights.max())
    return (lo, hi) if hi > lo else (0.0, max(hi, 1e-12))


# ----------------------------------------------------------------------------------------------------------------
# Figures


def query_figure(clip: ClipAttention, block: BlockAttention, qi: int) -> Image.Image:
    """Top row: shown frames with the query marked and arrows to its top-k keys (width/colour by weight).
    Bottom row: the query's attention as a heat overlay on every shown frame. Title, labels and a scale bar."""
    q = block.queries[qi]
    grid = block.grid
    shown = clip.shown
    scale = display_scale(clip.frames.shape[1])
    vmin, vmax = _range(q.weights)
    base = [_resize_frame(clip.frames[i], scale) for i in shown]
    size = (base[0].shape[1], base[0].shape[0])
    dim = [(b.astype(np.float32) * 0.8).astype(np.uint8) for b in base]
    top = _Row(clip, shown, dim, f"query q{qi + 1} (green) -> its top-{len(q.keys)} keys: arrow width and colour "
                                 "grow with the weight")
    over = [overlay(b, heat_to_frame(grid, heat_for_frame(grid, q.weights, i), size), vmax, vmin)
            for b, i in zip(base, shown)]
    bottom = _Row(clip, shown, over, "attention of q1 over all keys (heat), top-5 keys circled".replace(
        "q1", f"q{qi + 1}"))
    ws = [k.weight for k in q.keys]
    kmin, kmax = (min(ws), max(ws)) if ws else (0.0, 1.0)
    for k in sorted(q.keys, key=lambda k: k.weight):
        f = (k.weight - kmin) / (kmax - kmin) if kmax > kmin else 1.0
        a = top.to_px(q.frame, q.x, q.y)
        b = top.to_px(k.frame, k.x, k.y)
        _arrow(top.draw, a, b, width=1 + int(round(4 * f)), colour=tuple(int(c) for c in colormap(0.4 + 0.6 * f)))
    for row in (top, bottom):
        x, y = row.to_px(q.frame, q.x, q.y)
        _marker(row.draw, x, y, label=f"q{qi + 1}")
    for k in q.keys[:5]:
        x, y = bottom.to_px(k.frame, k.x, k.y)
        bottom.draw.ellipse((x - 6, y - 6, x + 6, y + 6), outline=(0, 0, 0), width=4)
        bottom.draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=KEY_COLOUR, width=2)
    width = max(top.image.width, 820)
    req = ""
    if q.requested is not None:
        req = f" (asked: frame {q.requested[0]}, x={q.requested[1]:g}, y={q.requested[2]:g})"
    title = _caption(
        width,
        [
            f"{block.name} ({block.instantiation or '?'})   query q{qi + 1}: frame {q.frame}, "
            f"x={q.x:.0f}, y={q.y:.0f} px{req}   cell (t,h,w)={q.cell} of grid {grid.query_grid}",
            f"prediction: {clip.label}  p={clip.prob:.3f} ({clip.view} view)   top-{len(q.keys)} keys hold "
            f"{q.score:.0%} of this query's weight   key grid {grid.key_grid} (pool {grid.key_pool})",
        ],
    )
    bar = _scale_bar(width, vmin, vmax, f"attention weight: {block.normalisation}",
                     f"arrows: weight {kmin:.3g} (thin) .. {kmax:.3g} (thick)")
    return _stack([title, top.image, bottom.image, bar])


def summary_figure(clip: ClipAttention, block: BlockAttention) -> Image.Image:
    """Where attention mass concentrates: the mean weight each key receives over ALL query positions, on every
    shown frame, with the chosen queries marked."""
    grid = block.grid
    shown = clip.shown
    vmin, vmax = _range(block.mean_weights)
    scale = display_scale(clip.frames.shape[1])
    base = [_resize_frame(clip.frames[i], scale) for i in shown]
    size = (base[0].shape[1], base[0].shape[0])
    over = [overlay(b, heat_to_frame(grid, heat_for_frame(grid, block.mean_weights, i), size), vmax, vmin)
            for b, i in zip(base, shown)]
    n = int(np.prod(grid.query_grid))
    if block.query_dependent:
        row = _Row(clip, shown, over, f"mean attention each key receives over all {n} query positions; "
                                      "chosen queries marked")
        for qi, q in enumerate(block.queries):
            x, y = row.to_px(q.frame, q.x, q.y)
            _marker(row.draw, x, y, r=7, label=f"q{qi + 1}")
        headline = "where attention mass concentrates"
    else:  # global_context: the map is the same for every query (per frame in space mode, per position in time)
        row = _Row(clip, shown, over, "the attention map every query shares (mean over the query positions)")
        headline = "global context map: one softmax over positions, the same for every query"
    width = max(row.image.width, 820)
    title = _caption(
        width,
        [
            f"{block.name} ({block.instantiation or '?'}): {headline}",
            f"prediction: {clip.label}  p={clip.prob:.3f} ({clip.view} view)   query grid {grid.query_grid}, "
            f"key grid {grid.key_grid}",
        ],
    )
    what = "mean attention weight" if block.query_dependent else "attention weight of the shared map"
    bar = _scale_bar(width, vmin, vmax, f"{what}: {block.normalisation}")
    return _stack([title, row.image, bar])


def gif_frames(clip: ClipAttention, block: BlockAttention, qi: int) -> list[Image.Image]:
    """The query's attention over every input frame of the clip (heat of the key cell holding each frame)."""
    q = block.queries[qi]
    grid = block.grid
    vmin, vmax = _range(q.weights)
    scale = display_scale(clip.frames.shape[1])
    out = []
    for i in range(clip.frames.shape[0]):
        base = _resize_frame(clip.frames[i], scale)
        h = heat_to_frame(grid, heat_for_frame(grid, q.weights, i), (base.shape[1], base.shape[0]))
        img = Image.fromarray(overlay(base, h, vmax, vmin))
        d = ImageDraw.Draw(img)
        x, y = q.x * scale, q.y * scale
        if grid.qt_of_frame(i) == q.cell[0]:
            _marker(d, x, y, label=f"q{qi + 1}")
        else:
            d.ellipse((x - 6, y - 6, x + 6, y + 6), outline=QUERY_COLOUR, width=1)
        _text(d, (6, 4), f"{block.name} q{qi + 1}  {_frame_label(clip, i)}", 14)
        _text(d, (6, img.height - 22), f"{clip.label} p={clip.prob:.2f}  weight {vmin:.3g}..{vmax:.3g}", 14)
        out.append(img)
    return out


def save_gif(images: Sequence[Image.Image], path: str | Path, *, ms_per_frame: int = 250) -> None:
    # Fast octree quantisation per frame (median cut took ~0.5 s a frame); 255 colours keep the heat gradient.
    pal = [im.convert("RGB").quantize(colors=255, method=Image.Quantize.FASTOCTREE) for im in images]
    pal[0].save(path, save_all=True, append_images=pal[1:], duration=ms_per_frame, loop=0, optimize=False)


def save_mp4(images: Sequence[Image.Image], path: str | Path, *, fps: float = 4.0) -> None:
    """H.264 (libx264, else MPEG-4 Part 2) through PyAV; sizes rounded down to even numbers."""
    w, h = images[0].size
    w, h = w - w % 2, h - h % 2
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=max(1, int(round(fps))))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for im in images:
            frame = av.VideoFrame.from_ndarray(np.asarray(im.convert("RGB"))[:h, :w], format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@dataclass
class BlockFiles:
    """File names (in the output folder) written for one block."""

    queries: list[dict[str, str]]  # per query: {"png": ..., "gif": ...} (+ "mp4")
    summary_png: str


@dataclass
class WrittenFiles:
    """What `write_outputs` wrote: every path in order, and the file names per block (by block name)."""

    paths: list[Path] = field(default_factory=list)
    blocks: dict[str, BlockFiles] = field(default_factory=dict)


def write_outputs(clip: ClipAttention, out_dir: str | Path, *, mp4: bool = False) -> WrittenFiles:
    """Per block and query: <block>_q<i>.png and .gif (+ .mp4); per block: <block>_summary.png. A block whose map
    is the same for every query (global_context) gets one heat overlay, <block>_map.png, and no per-query files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = WrittenFiles()
    for b in clip.blocks:
        stem = b.name.replace(".", "_")
        queries = []
        if not b.query_dependent:
            name = f"{stem}_map.png"
            summary_figure(clip, b).save(out_dir / name, compress_level=3)
            written.paths.append(out_dir / name)
            written.blocks[b.name] = BlockFiles([], name)
            continue
        for qi in range(len(b.queries)):
            names = {"png": f"{stem}_q{qi + 1}.png", "gif": f"{stem}_q{qi + 1}.gif"}
            query_figure(clip, b, qi).save(out_dir / names["png"], compress_level=3)
            frames = gif_frames(clip, b, qi)
            save_gif(frames, out_dir / names["gif"])
            if mp4:
                names["mp4"] = f"{stem}_q{qi + 1}.mp4"
                save_mp4(frames, out_dir / names["mp4"])
            written.paths += [out_dir / n for n in names.values()]
            queries.append(names)
        summary = f"{stem}_summary.png"
        summary_figure(clip, b).save(out_dir / summary, compress_level=3)
        written.paths.append(out_dir / summary)
        written.blocks[b.name] = BlockFiles(queries, summary)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Terminal


def _halfblock(img: np.ndarray) -> Text:
    """uint8 (H, W, 3) with even H -> rich Text of H/2 lines of "▀" (fg = upper pixel, bg = lower pixel)."""
    t = Text()
    for r in range(0, img.shape[0] - 1, 2):
        for c in range(img.shape[1]):
            a, b = img[r, c], img[r + 1, c]
            t.append("▀", style=f"rgb({a[0]},{a[1]},{a[2]}) on rgb({b[0]},{b[1]},{b[2]})")
        if r + 2 < img.shape[0] - 1:
            t.append("\n")
    return t


def terminal_renderable(clip: ClipAttention, *, width: int = 100, max_keys: int = 5) -> Group:
    """Frames with the heat overlay, query (green) and top keys (cyan) as half-block cells, plus a hotspot table."""
    parts = []
    n = len(clip.shown)
    H, W = clip.frames.shape[1:3]
    cols = max(8, min(48, (width - 2 * n) // max(1, n)))
    rows = max(2, int(round(cols * H / W)))
    rows += rows % 2
    sx, sy = cols / W, rows / H
    for b in clip.blocks:
        for qi, q in enumerate(b.queries):
            vmin, vmax = _range(q.weights)
            panels = []
            for i in clip.shown:
                small = np.asarray(Image.fromarray(clip.frames[i]).resize((cols, rows), Image.BILINEAR))
                heat = heat_to_frame(b.grid, heat_for_frame(b.grid, q.weights, i), (cols, rows))
                img = overlay(small, heat, vmax, vmin)
                for k in q.keys[:max_keys]:
                    if k.frame == i:
                        img[min(rows - 1, int(k.y * sy)), min(cols - 1, int(k.x * sx))] = KEY_COLOUR
                if i == q.frame:
                    img[min(rows - 1, int(q.y * sy)), min(cols - 1, int(q.x * sx))] = QUERY_COLOUR
                panels.append(_halfblock(img).split("\n"))
            head = Text(f"{b.name} q{qi + 1}: frame {q.frame}, x={q.x:.0f}, y={q.y:.0f} "
                        f"(top-{len(q.keys)} mass {q.score:.0%})  frames {', '.join(map(str, clip.shown))}",
                        style="bold")
            body = Text()
            for r in range(len(panels[0])):
                for p in panels:
                    body.append_text(p[r])
                    body.append("  ")
                body.append("\n")
            parts += [head, body]
        table = Table(title=f"{b.name} hotspots ({b.normalisation})", title_justify="left")
        for col in ("query", "frame", "x, y", "top keys: frame (x, y) weight"):
            table.add_column(col)
        for qi, q in enumerate(b.queries):
            keys = "; ".join(f"{k.frame} ({k.x:.0f}, {k.y:.0f}) {k.weight:.3f}" for k in q.keys[:max_keys])
            table.add_row(f"q{qi + 1}", str(q.frame), f"{q.x:.0f}, {q.y:.0f}", keys)
        parts.append(table)
    parts.append(Text(f"prediction: {clip.label} p={clip.prob:.3f} (one {clip.view} view); "
                      f"green = query, cyan = top keys, bright = more attention"))
    return Group(*parts)


# ----------------------------------------------------------------------------------------------------------------
# Attention statistics (nlvid.viz.stats)

_BAR = (255, 170, 40)
_MEAN = (90, 220, 255)
_LIMIT = (255, 90, 90)


def _bar_chart(width: int, height: int, mass: Sequence[float], lo: float, hi: float, *, title: str, xlabel: str,
               ticks: Sequence[tuple[float, str]], marks: Sequence[tuple[float, tuple[int, int, int], str]] = (),
               sublabels: Sequence[tuple[float, str]] = ()) -> Image.Image:
    """Bars of `mass` (equal bins from lo to hi) with the y axis in % of attention mass, x ticks at data values,
    optional second tick row (`sublabels`) and vertical marks (value, colour, label)."""
    img = Image.new("RGB", (width, height), (24, 24, 24))
    d = ImageDraw.Draw(img)
    left, right, top = 52, 14, 30
    bottom = 58 if sublabels else 42
    pw, ph = width - left - right, height - top - bottom
    d.text((left, 6), title, font=font(15), fill=(240, 240, 240))
    m = np.asarray(mass, dtype=np.float64)
    ymax = max(1e-9, float(m.max()) if m.size else 1.0)
    ymax = math.ceil(ymax * 10 - 1e-9) / 10 if ymax > 0.1 else max(ymax * 1.1, 1e-3)
    y0 = top + ph

    def X(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    for f in (0.0, 0.5, 1.0):
        y = y0 - f * ph
        d.line((left - 4, y, left + pw, y), fill=(70, 70, 70) if f else (200, 200, 200), width=1)
        t = f"{100 * f * ymax:.0f}%" if ymax >= 0.05 else f"{100 * f * ymax:.1f}%"
        d.text((left - 8 - d.textlength(t, font=font(12)), y - 7), t, font=font(12), fill=(220, 220, 220))
    n = max(1, len(m))
    for i, v in enumerate(m):
        xa, xb = X(lo + i * (hi - lo) / n), X(lo + (i + 1) * (hi - lo) / n)
        if v > 0:
            d.rectangle((xa + 1, y0 - v / ymax * ph, max(xa + 1, xb - 1), y0), fill=_BAR)
    for v, label in ticks:
        x = X(v)
        d.line((x, y0, x, y0 + 4), fill=(220, 220, 220))
        tw = d.textlength(label, font=font(12))
        d.text((min(max(0, x - tw / 2), width - tw), y0 + 6), label, font=font(12), fill=(230, 230, 230))
    for v, label in sublabels:
        x = X(v)
        tw = d.textlength(label, font=font(11))
        d.text((min(max(0, x - tw / 2), width - tw), y0 + 21), label, font=font(11), fill=(170, 170, 170))
    for k, (v, colour, label) in enumerate(marks):  # dashed lines; their labels stacked at the top right
        x = X(min(max(v, lo), hi))
        for y in range(top, int(y0), 6):
            d.line((x, y, x, min(y0, y + 3)), fill=colour, width=2)
        tw = d.textlength(label, font=font(12))
        d.rectangle((left + pw - tw - 6, top + 2 + 16 * k, left + pw, top + 17 + 16 * k), fill=(24, 24, 24))
        d.text((left + pw - tw - 3, top + 3 + 16 * k), label, font=font(12), fill=colour)
    tw = d.textlength(xlabel, font=font(13))
    d.text((left + (pw - tw) / 2, height - 18), xlabel, font=font(13), fill=(200, 200, 200))
    return img


def stats_figure(stats: BlockStats) -> Image.Image:
    """One block's statistics: reach in time (frames) and space (pixels, % of the width), the effective number of
    keys (histograms of attention mass per query), and the query-dependence and entropy numbers."""
    s = stats
    W = s.width_px
    T = s.input_shape[0]
    panel_w, panel_h = 330, 250
    th = s.time_hist
    t_hi = th.edges[-1]
    step = max(1, int(math.ceil(t_hi / 8)))
    time_chart = _bar_chart(
        panel_w, panel_h, th.mass, 0.0, t_hi, title=f"reach in time: mean {s.time_reach:.2f} frames",
        xlabel="query -> key distance (frames of the clip)",
        ticks=[(float(v), str(v)) for v in range(0, int(t_hi) + 1, step)],
        marks=[(s.time_reach, _MEAN, f"mean {s.time_reach:.2f}"),
               (1.0, _LIMIT, f"{100 * s.time_far_share:.0f}% > 1 frame")],
    )
    sh = s.space_hist
    s_hi = sh.edges[-1]
    space_chart = _bar_chart(
        panel_w, panel_h, sh.mass, 0.0, s_hi, title=f"reach in space: mean {s.space_reach * W:.1f} px",
        xlabel=f"distance in the frame (pixels; input width {W} px)",
        ticks=[(f, f"{f * W:.0f}") for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25) if f <= s_hi],
        sublabels=[(f, f"{100 * f:.0f}% W") for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25) if f <= s_hi],
        marks=[(s.space_reach, _MEAN, f"mean {100 * s.space_reach:.0f}% W"),
               (0.25, _LIMIT, f"{100 * s.space_far_share:.0f}% > 25% W")],
    )
    eh = s.effective_hist
    n = s.keys
    eff_chart = _bar_chart(
        panel_w, panel_h, eh.mass, 0.0, 1.0, title=f"effective keys: mean {s.effective_keys:.1f} of {n}",
        xlabel="exp(row entropy), keys",
        ticks=[(f, f"{f * n:.0f}") for f in (0.0, 0.25, 0.5, 0.75, 1.0)],
        sublabels=[(f, f"{100 * f:.0f}%") for f in (0.0, 0.25, 0.5, 0.75, 1.0)],
        marks=[(s.effective_keys / max(1, n), _MEAN, f"mean {s.effective_keys:.1f}")],
    )
    charts = _stack([time_chart, space_chart, eff_chart], across=True)
    width = charts.width
    clips = f"{s.clips} clip{'s' if s.clips != 1 else ''}"
    stride = f", 1 frame = {s.stride} video frames" if s.stride else ""
    title = _caption(width, [
        f"{s.name} ({s.instantiation or '?'}, {s.mode}): what the attention learned, over {s.queries:,} queries "
        f"of {clips}",
        f"input {T} frames x {s.input_shape[1]}x{W} px{stride}; query grid {s.query_grid}, key grid {s.key_grid}, "
        f"{n} keys per query",
    ])
    within = {"space": "each frame", "time": "each position"}.get(s.mode, "all queries")
    lines = [
        f"query dependence (within {within}):"
        f"  cosine distance {s.cosine_distance:.3f} (GCNet's measure; 0 = every query the same map)   "
        f"JSD {s.jsd:.3f} of max {math.log(max(1, n)):.2f} nats",
        f"unary share {s.unary_share:.3f} (part of the rows a key's average attention explains; 1 = query-independent)"
        f"   entropy {s.entropy:.2f} of max {math.log(max(1, n)):.2f} nats",
        f"reach bars: attention mass per query in each distance bin (100% in all); effective keys: share of queries. "
        f"weights: {s.normalisation}",
    ]
    return _stack([title, charts, _caption(width, lines, size=14)])


def write_stats(stats: Sequence[BlockStats], out_dir: str | Path) -> list[Path]:
    """<block>_stats.png per block; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in stats:
        p = out_dir / f"{s.name.replace('.', '_')}_stats.png"
        stats_figure(s).save(p, compress_level=6)
        paths.append(p)
    return paths


def stats_table(stats: Sequence[BlockStats]) -> Table:
    """The headline numbers of `nlvid visualize --stats`, one row per block."""
    table = Table(title="attention statistics (reach: attention-weighted query -> key distance)", title_justify="left")
    for col in ("block", "inst.", "clips", "reach t (frames)", "> 1 frame", "reach xy (px)", "> 25% W",
                "cos dist (GCNet)", "JSD (nats)", "unary", "eff. keys"):
        table.add_column(col, justify="left" if col in ("block", "inst.") else "right")
    for s in stats:
        table.add_row(s.name, s.instantiation or "?", str(s.clips), f"{s.time_reach:.2f}",
                      f"{100 * s.time_far_share:.0f}%", f"{s.space_reach * s.width_px:.1f}",
                      f"{100 * s.space_far_share:.0f}%", f"{s.cosine_distance:.3f}", f"{s.jsd:.3f}",
                      f"{s.unary_share:.3f}", f"{s.effective_keys:.1f} / {s.keys}")
    return table
