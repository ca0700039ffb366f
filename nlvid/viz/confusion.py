"""The confusion matrix of `nlvid eval` as a PNG (PIL only)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nlvid.viz.render import font


def render_confusion_png(cm: np.ndarray | list, classes: Sequence[str], path: str | Path, *,
                         title: str = "confusion matrix (rows: true class, columns: predicted)") -> Path:
    """Draw a row-normalised confusion matrix with class names and counts; PIL only."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    names = [c if len(c) <= 28 else c[:26] + ".." for c in classes]
    cell = max(18, min(48, 900 // max(k, 1)))
    fsize = max(9, min(14, cell - 6))
    big, small = font(fsize), font(max(8, fsize - 3))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(n, font=big)) for n in names) + 12 if k else 40
    top = label_w + 30
    left = label_w
    w, h = left + k * cell + 20, top + k * cell + 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black", font=small)
    rows = cm.sum(axis=1, keepdims=True).clip(min=1)
    norm = cm / rows
    for i in range(k):
        for j in range(k):
            v = float(norm[i, j])
            shade = int(255 - 200 * v)
            color = (shade, shade, 255) if i != j else (shade, 255, shade)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(200, 200, 200))
            if cm[i, j] and cell >= 18:
                txt = str(int(cm[i, j]))
                tw = probe.textlength(txt, font=small)
                d.text((x0 + (cell - tw) / 2, y0 + cell / 2 - fsize / 2), txt, fill="black", font=small)
        tw = probe.textlength(names[i], font=big)
        d.text((left - tw - 6, top + i * cell + cell / 2 - fsize / 2), names[i], fill="black", font=big)
    # column labels: drawn horizontally on a strip, rotated 90 degrees, pasted above the grid
    strip = Image.new("RGB", (label_w + 10, k * cell if k else 1), "white")
    sd = ImageDraw.Draw(strip)
    for j in range(k):
        # rotate(90) is counter-clockwise: strip y becomes image x, so class j sits at y = j * cell
        sd.text((4, j * cell + cell / 2 - fsize / 2), names[j], fill="black", font=big)
    img.paste(strip.rotate(90, expand=True), (left, top - label_w - 10))
    d.text((left, top + k * cell + 8), "predicted ->", fill="gray", font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
