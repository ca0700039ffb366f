"""Which frames and items a clip or an epoch uses: clip start positions, the frame indices of a clip, the item
order of an epoch.

Clip positions are frame indices of the video (counted at its average frame rate); `nlvid.data.decode` turns them
into times. Randomness comes from explicit seeds (a numpy Generator, a torch Generator), never from global state.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["clip_span", "clip_indices", "random_start", "uniform_starts", "item_rng", "epoch_order"]


def clip_span(num_frames: int, stride: int) -> int:
    """Frames covered by one clip: first to last sampled frame, inclusive."""
    return (num_frames - 1) * stride + 1


def clip_indices(start_index: int, *, num_frames: int, stride: int, total: int) -> np.ndarray:
    """Frame indices of one clip: start, start+stride, ...; a video shorter than the clip span loops.

    Looping (indices modulo the frame count, starting at 0) keeps the clip's motion and its frame rate; the
    alternative, PySlowFast's clamping, repeats the last frame for the rest of the clip. A long-enough video never
    loops: the start is moved back so the clip ends inside the video.
    """
    total = max(1, int(total))
    span = clip_span(num_frames, stride)
    if span > total:
        return (np.arange(num_frames) * stride) % total
    start = min(max(0, int(start_index)), total - span)
    return start + np.arange(num_frames) * stride


def random_start(total: int, *, num_frames: int, stride: int, rng: np.random.Generator) -> int:
    """Training: a start index uniform over every position where the whole clip fits (0 when it cannot fit:
    the clip then loops, see `clip_indices`)."""
    last = total - clip_span(num_frames, stride)
    if last <= 0:
        return 0
    return int(rng.integers(0, last + 1))


def uniform_starts(total: int, *, num_frames: int, stride: int, num_clips: int) -> list[int]:
    """Testing: `num_clips` starts evenly spaced from the first possible clip to the last (both included);
    one clip is centred. A video shorter than one clip gives start 0 for every clip."""
    last = max(0, total - clip_span(num_frames, stride))
    if num_clips <= 1:
        return [last // 2]
    return [int(round(last * k / (num_clips - 1))) for k in range(num_clips)]


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The only randomness source of dataset item `index` in `epoch`: a resumed run sees identical clips."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]))


def epoch_order(n: int, *, seed: int, epoch: int, world_size: int = 1) -> list[int]:
    """The shuffled item order of one epoch: a function of (seed, epoch) only, padded (by wrapping around) to a
    multiple of `world_size` so every process gets the same number of items (DistributedSampler does the same)."""
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(n, generator=g).tolist()
    pad = (-n) % world_size
    order += order[:pad]
    return order
