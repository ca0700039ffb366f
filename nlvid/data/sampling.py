"""Where clips start: one random clip per video for training, evenly spaced clips for testing.

Everything is in frame indices of the video (counted at its average frame rate); `nlvid.data.decode` turns them
into times. Randomness comes from an explicit numpy Generator, never from global state.
"""

from __future__ import annotations

import numpy as np

from nlvid.data.decode import clip_indices

__all__ = ["clip_span", "random_start", "uniform_starts", "clip_indices", "item_rng"]


def clip_span(num_frames: int, stride: int) -> int:
    """Frames covered by one clip: first to last sampled frame, inclusive."""
    return (num_frames - 1) * stride + 1


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
