"""Clip transforms: short-side scale jitter, crops (random / centre / three-crop), flip, normalise.

Defaults follow the paper's recipe: train = short side random in [256, 320], random 224x224 crop, horizontal flip;
test = short side 256, 3 crops of 256x256 along the long side (left/centre/right, or top/centre/bottom for portrait
video, like PySlowFast). Normalisation: (x / 255 - 0.45) / 0.225 per channel. A single test view (`single_view`,
what `nlvid visualize` shows) is either the centre crop of `test_views` or the whole frame resized the same way.

Layout legend: T frames, H x W pixels, C = 3 channels. Decoded clips are numpy uint8 (T, H, W, C); the model takes
float32 (C, T, H, W). Resizing runs on uint8 tensors (T, C, H, W) with torchvision.transforms.v2.functional
(antialiased bilinear), cropping before the float conversion so only the kept pixels are converted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive


def to_tchw(frames) -> torch.Tensor:
    """numpy/tensor uint8 (T, H, W, C) -> uint8 tensor (T, C, H, W) (a view, no copy)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """(T, C, H, W) uint8 -> same with min(H, W) == size, aspect kept (antialiased bilinear)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    if h <= w:
        nh, nw = size, max(1, round(w * size / h))
    else:
        nh, nw = max(1, round(h * size / w)), size
    return TF.resize(x.contiguous(), [nh, nw], antialias=True)


def normalize(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 (T, C, H, W) -> float32 (C, T, H, W), (x / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    y = (x.float() - m) / s
    return y.permute(1, 0, 2, 3).contiguous()  # (T, C, H, W) -> (C, T, H, W)


def random_short_side(rng: np.random.Generator, short_side: int | Sequence[int]) -> int:
    """An int short side drawn uniformly from [min, max] (inclusive); an int stays fixed."""
    if isinstance(short_side, (int, np.integer)):
        return int(short_side)
    lo, hi = int(short_side[0]), int(short_side[-1])
    if hi < lo:
        lo, hi = hi, lo
    return int(rng.integers(lo, hi + 1))


def train_transform(
    frames,
    *,
    rng: np.random.Generator,
    short_side: int | Sequence[int] | None = (256, 320),
    crop_size: int = 224,
    flip: bool = True,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> torch.Tensor:
    """Training augmentation of one clip: (T, H, W, 3) uint8 -> float32 (3, T, crop, crop).

    short_side: random range [min, max], a fixed int, or None when the frames were already resized (the dataset
    resizes during decoding). A frame whose short side is below crop_size is first scaled up to it.
    """
    x = to_tchw(frames)
    if short_side is not None:
        x = resize_short_side(x, random_short_side(rng, short_side))
    if min(x.shape[-2:]) < crop_size:
        x = resize_short_side(x, crop_size)
    h, w = x.shape[-2:]
    y0 = int(rng.integers(0, h - crop_size + 1))
    x0 = int(rng.integers(0, w - crop_size + 1))
    x = x[..., y0 : y0 + crop_size, x0 : x0 + crop_size]
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return normalize(x, mean, std)


def crop_boxes(h: int, w: int, crop_size: int, num_crops: int) -> list[tuple[int, int, int, int]]:
    """`num_crops` square crops evenly spaced along the long side, centred on the short side (x0, y0, x1, y1).
    1 = centre crop; 3 = left/centre/right (top/centre/bottom when H > W)."""
    c = min(crop_size, h, w)
    boxes = []
    for k in range(num_crops):
        frac = 0.5 if num_crops == 1 else k / (num_crops - 1)
        if w >= h:
            x0, y0 = int(round((w - c) * frac)), (h - c) // 2
        else:
            x0, y0 = (w - c) // 2, int(round((h - c) * frac))
        boxes.append((x0, y0, x0 + c, y0 + c))
    return boxes


def test_views(
    frames,
    *,
    short_side: int = 256,
    crop_size: int = 256,
    num_crops: int = 3,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> tuple[torch.Tensor, list[Box]]:
    """Test-time views of one clip: frames uint8 (T, H, W, 3) -> (views float32 (K, 3, T, S, S), boxes).

    The short side is resized to `short_side` (scaled up to `crop_size` if smaller), then `num_crops` crops of
    `crop_size` are taken along the long side. boxes[k] = (x0, y0, x1, y1) of view k in the ORIGINAL frame's
    pixels (floats), so predict/visualize can map a view back onto the video.
    """
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1 (got {num_crops})")
    x = to_tchw(frames)
    h0, w0 = x.shape[-2:]
    x = resize_short_side(x, max(short_side, crop_size))
    h, w = x.shape[-2:]
    sy, sx = h0 / h, w0 / w
    views, boxes = [], []
    for x0, y0, x1, y1 in crop_boxes(h, w, crop_size, num_crops):
        v = x[..., y0:y1, x0:x1]
        if v.shape[-1] != crop_size or v.shape[-2] != crop_size:  # only for frames smaller than the crop
            v = TF.resize(v.contiguous(), [crop_size, crop_size], antialias=True)
        views.append(normalize(v, mean, std))
        boxes.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return torch.stack(views), boxes


test_views.__test__ = False  # not a pytest test, even when imported into a test module


def full_view(
    frames,
    *,
    short_side: int = 256,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> tuple[torch.Tensor, Box]:
    """The whole frame as one test view: frames uint8 (T, H, W, 3) -> (view float32 (1, 3, T, H', W'), box).

    The short side is resized to `short_side` with the resize of `test_views`, without cropping (the networks are
    fully convolutional); box = (0, 0, W, H), the whole frame.
    """
    x = to_tchw(frames)
    h0, w0 = x.shape[-2:]
    view = normalize(resize_short_side(x, short_side), mean, std)
    return view.unsqueeze(0), (0.0, 0.0, float(w0), float(h0))


VIEWS = ("full", "center")  # the views `single_view` makes


def single_view(
    frames,
    view: str,
    *,
    short_side: int = 256,
    crop_size: int = 256,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> tuple[torch.Tensor, Box]:
    """One test view of one clip: frames uint8 (T, H, W, 3) -> (view float32 (1, 3, T, h, w), box in the frames'
    pixels). view: "full" (`full_view`: the whole frame, short side resized to `short_side`) or "center" (the centre
    crop of `test_views` with num_crops=1, what eval/predict use for one crop)."""
    if view == "full":
        return full_view(frames, short_side=short_side, mean=mean, std=std)
    if view == "center":
        views, boxes = test_views(frames, short_side=short_side, crop_size=crop_size, num_crops=1, mean=mean, std=std)
        return views, boxes[0]
    raise ValueError(f"view {view!r}: allowed: {', '.join(VIEWS)}")


def view_short_side(view: str, short_side: int, crop_size: int) -> int:
    """The short side frames are decoded at for `view`: what eval/predict decode at for the centre crop
    (max(short_side, crop_size): `test_views` scales a smaller frame up to the crop), `short_side` for the full
    view."""
    return max(short_side, crop_size) if view == "center" else short_side
