"""A small real-video dataset whose labels need long-range reasoning in space AND time.

Each clip (H.264 MP4, yuv420p, 64x64, 16 frames at 8 fps) shows:
- object A (a red or blue square or cross, 18-22 px) in the FIRST frames (0 .. 5-6) on one side (left or right
  half), drifting slightly; it then disappears;
- object B in the LAST frames (9-10 .. 15) on the OTHER side;
- a small grey distractor crossing the frame in the middle frames, a dark grey background with static texture,
  and per-frame pixel noise.

The label compares A with B (classes=4: same shape? x same colour?; classes=2: same shape?; classes=6: same
shape? x hue relation same / next / previous on a red-green-blue wheel). Attributes are binary (2 shapes, 2 hues
for 2 and 4 classes) and large on purpose: the relation is the hard part, recognising the objects is not. Every single object is uniformly distributed
over the classes, so no local feature decides the label: a model must relate two objects ~40 px and ~10 frames
apart. A bag of local features pooled by global averaging and a linear classifier cannot do it (same-vs-different
is an XOR-like relation: with colour indicators averaged, "two reds" and "one red + one green" have the same sum),
whereas a non-local block can compare the two positions directly.

Measured: experiments/table2.py (README, "The paper's claim, reproduced small"): the tiny model without NL blocks
stays at chance on held-out clips, with NL blocks it learns the relation.

Sampling for the tiny config: num_frames 8, stride 2 covers the whole clip (frames 0/1, 2/3, ... 14/15), so the
first and the last objects are both seen. The frames and annotations are deterministic from the seed (numpy Generator
per clip), and so are the MP4 bytes: x264 runs single-threaded on its C paths (`asm=0`), because its SIMD paths
encoded 1-4% of the files differently from one generation to the next though the frames given to it were identical.
Training on a regenerated set therefore repeats a training on the old one exactly (on the same machine and torch).

Output (`write_synthetic`): root/train/<class>/*.mp4, root/val/<class>/*.mp4 (a held-out quarter per class) and
root/annotations.json (per clip the two label-deciding objects with their frame range [t0, t1] inclusive and pixel
box [x0, y0, x1, y1] (x1, y1 exclusive) covering the object over those frames).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import av
import numpy as np

from nlvid.errors import ConfigError, writing

SIZE = 64
NUM_FRAMES = 16
FPS = 8
SHAPES = ("square", "cross")
HUES = ("red", "green", "blue")  # classes 2 and 4 use red and blue only
_RGB = {"red": (225, 45, 40), "green": (40, 205, 60), "blue": (55, 90, 235)}
_COLOUR_RELATIONS = {2: ("any",), 4: ("same", "diff"), 6: ("same", "next", "prev")}


def class_names(classes: int) -> list[str]:
    """Class names for a supported class count (2, 4 or 6), in label order."""
    if classes not in _COLOUR_RELATIONS:
        raise ConfigError(f"synthetic classes must be one of 2, 4, 6 (got {classes})")
    names = []
    for shape_rel in ("same_shape", "diff_shape"):
        for colour_rel in _COLOUR_RELATIONS[classes]:
            names.append(shape_rel if colour_rel == "any" else f"{shape_rel}_{colour_rel}_colour")
    return names


def _mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "square":
        m = np.ones((size, size), bool)
        m[:1] = m[-1:] = False
        m[:, :1] = m[:, -1:] = False
        return m
    if shape == "cross":  # a plus sign, arms a third of the size thick
        arm = size / 6
        return (np.abs(yy - c) <= arm) | (np.abs(xx - c) <= arm)
    raise ValueError(shape)


def _paste(frame: np.ndarray, mask: np.ndarray, x0: int, y0: int, rgb) -> None:
    h, w = mask.shape
    H, W = frame.shape[:2]
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if xa >= xb or ya >= yb:
        return
    sub = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
    frame[ya:yb, xa:xb][sub] = rgb


def _clip(rng: np.random.Generator, label: int, classes: int):
    """Frames uint8 (T, H, W, 3) and the label-deciding objects of one clip."""
    colour_rels = _COLOUR_RELATIONS[classes]
    shape_same = label < len(colour_rels)
    colour_rel = colour_rels[label % len(colour_rels)]
    hues = (0, 2) if classes in (2, 4) else (0, 1, 2)  # red/blue, or the 3-hue wheel for next/prev
    sa = int(rng.integers(len(SHAPES)))
    sb = sa if shape_same else 1 - sa
    ia = int(rng.integers(len(hues)))
    if colour_rel == "any":
        ib = int(rng.integers(len(hues)))
    elif colour_rel == "same":
        ib = ia
    elif colour_rel == "diff":
        ib = 1 - ia
    else:
        ib = (ia + (1 if colour_rel == "next" else -1)) % len(hues)
    ca, cb = hues[ia], hues[ib]

    # Background: dark grey + static texture; per-frame noise added at the end.
    base = rng.integers(20, 50) + rng.integers(-4, 5, size=3)
    texture = rng.integers(-6, 7, size=(SIZE, SIZE, 1))
    background = np.clip(base + texture, 0, 255)
    frames = np.repeat(background[None].astype(np.int16), NUM_FRAMES, axis=0)

    a_left = bool(rng.integers(2))
    objects = []
    specs = [
        (SHAPES[sa], HUES[ca], 0, int(rng.integers(5, 7)), a_left),
        (SHAPES[sb], HUES[cb], int(rng.integers(9, 11)), NUM_FRAMES - 1, not a_left),
    ]
    for shape, hue, t0, t1, left in specs:
        size = int(rng.integers(18, 23))
        cx = rng.uniform(1, SIZE / 2 - size - 1) if left else rng.uniform(SIZE / 2 + 1, SIZE - size - 1)
        cy = rng.uniform(1, SIZE - size - 1)
        vx, vy = rng.uniform(-0.5, 0.5, size=2)
        rgb = (np.array(_RGB[hue]) * rng.uniform(0.9, 1.0)).astype(np.int16)
        mask = _mask(shape, size)
        xs, ys = [], []
        for t in range(t0, t1 + 1):
            x = int(round(cx + vx * (t - t0)))
            y = int(round(cy + vy * (t - t0)))
            x = min(max(x, 0), SIZE - size)
            y = min(max(y, 0), SIZE - size)
            _paste(frames[t], mask, x, y, rgb)
            xs.append(x)
            ys.append(y)
        box = [min(xs), min(ys), max(xs) + size, max(ys) + size]
        objects.append({"frames": [t0, t1], "box": box, "shape": shape, "colour": hue})

    # Distractor: a grey shape crossing the frame during the middle frames (never decides the label).
    d_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    d_size = int(rng.integers(8, 12))
    d_mask = _mask(d_shape, d_size)
    grey = int(rng.integers(110, 200))
    x_from, x_to = rng.uniform(0, SIZE - d_size, size=2)
    dy = rng.uniform(0, SIZE - d_size)
    d_t0, d_t1 = int(rng.integers(3, 6)), int(rng.integers(10, 13))
    for t in range(d_t0, d_t1 + 1):
        f = (t - d_t0) / max(1, d_t1 - d_t0)
        _paste(frames[t], d_mask, int(round(x_from + (x_to - x_from) * f)), int(dy), (grey, grey, grey))

    frames += rng.integers(-3, 4, size=frames.shape, dtype=np.int16)
    return np.clip(frames, 0, 255).astype(np.uint8), objects


def _encode(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), mode="w") as out:
        # asm=0: x264's SIMD paths gave 1-4% of the files different bytes (and decoded pixels) from one generation
        # to the next; its C paths are repeatable (8 ms a clip instead of 4).
        stream = out.add_stream("libx264", rate=FPS, options={"crf": "18", "preset": "veryfast", "threads": "1",
                                                                "bframes": "0", "x264-params": "asm=0"})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.codec_context.thread_count = 1
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_synthetic(
    root: str | Path,
    *,
    classes: int = 4,
    clips_per_class: int = 50,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the dataset under `root` (see the module docstring); returns a summary dict
    {root, classes, train, val, num_frames, size, fps}. progress(done, total) is called per clip.

    Everything is written into a hidden sibling folder first and moved into `root` at the end, so a run that
    fails half way (disk full, Ctrl-C) leaves no partial dataset behind; files already in `root` are kept."""
    names = class_names(classes)
    if clips_per_class < 1:
        raise ConfigError(f"clips_per_class must be >= 1 (got {clips_per_class})")
    final = Path(root)
    with writing(final, "dataset"):
        final.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        summary = _write_all(root, names, classes=classes, clips_per_class=clips_per_class, seed=seed,
                             progress=progress)
        with writing(final, "dataset"):
            for src in sorted(root.rglob("*")):  # annotations.json last: its presence means the set is complete
                if src.is_file() and src.name != "annotations.json":
                    dst = final / src.relative_to(root)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
            os.replace(root / "annotations.json", final / "annotations.json")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return dict(summary, root=str(final))


def _write_all(root: Path, names: list[str], *, classes: int, clips_per_class: int, seed: int,
               progress: Callable[[int, int], None] | None) -> dict:
    n_val = 0 if clips_per_class < 2 else max(1, round(clips_per_class / 4))
    total = classes * clips_per_class
    clips_meta: dict[str, dict] = {}
    done = n_train = n_vals = 0
    for split in ("train", "val"):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(names):
        for i in range(clips_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, label, i]))
            frames, objects = _clip(rng, label, classes)
            split = "val" if i >= clips_per_class - n_val else "train"
            rel = f"{split}/{name}/{name}_{i:04d}.mp4"
            with writing(root / rel, "video"):
                _encode(root / rel, frames)
            clips_meta[rel] = {"label": name, "objects": objects}
            n_train += split == "train"
            n_vals += split == "val"
            done += 1
            if progress is not None:
                progress(done, total)
    ann = {"classes": sorted(names), "num_frames": NUM_FRAMES, "size": [SIZE, SIZE], "fps": FPS, "seed": int(seed),
           "clips": clips_meta}
    with writing(root / "annotations.json", "annotations"):
        (root / "annotations.json").write_text(json.dumps(ann, indent=1))
    return {"root": str(root), "classes": names, "train": n_train, "val": n_vals, "num_frames": NUM_FRAMES,
            "size": [SIZE, SIZE], "fps": FPS}
