"""One test-time preprocessing: `nlvid visualize` feeds the model what `nlvid predict` (and eval) feed it, through
nlvid.data (clip choice in sampling, decoding in decode, resize/crop/normalise in transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlvid.config import load_config
from nlvid.config import test_data_kwargs as data_kwargs  # renamed: pytest collects names test_*
from nlvid.data.transforms import full_view, normalize, resize_short_side, single_view, test_views, to_tchw
from nlvid.engine.predict import predict_files
from nlvid.models import create_model
from nlvid.viz.attention import attend_clip, read_clip_indexed, resolve_blocks

CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny", ["model.num_classes=3"])
    torch.manual_seed(0)
    return create_model("tiny", num_classes=3).eval(), cfg


class _Inputs:
    """Records every tensor the model is called with (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list[torch.Tensor] = []
        self._handle = model.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach().clone()))

    def __enter__(self) -> _Inputs:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# mp4 with a frame count in the header; MKV without one (the count comes from the duration); a rotated phone video;
# short enough to loop; an AVI with packed B-frames
@pytest.mark.parametrize("name", ["arm_wrestling_demo.mp4", "asl_book.mkv", "video_90.mov",
                                  "v_SoccerJuggling_g23_c01.avi"])
def test_visualize_center_view_feeds_the_model_what_predict_feeds_it(tiny, shared_videos, name):
    """Same clip (predict's single centred clip), same view (the centre crop): the very same input tensor."""
    model, cfg = tiny
    path = shared_videos / name
    kw = data_kwargs(cfg.data, num_clips=1, num_crops=1)
    with _Inputs(model) as predict_in:
        (r,) = predict_files(model, CLASSES, [path], workers=0, **kw)
    assert "error" not in r and r["views"] == 1 and len(predict_in.seen) == 1

    decoded = read_clip_indexed(path, num_frames=kw["num_frames"], stride=kw["stride"], view="center",
                                short_side=kw["test_short_side"], crop_size=kw["test_crop_size"])
    with _Inputs(model) as viz_in:
        res = attend_clip(model, decoded.frames, classes=CLASSES, blocks=resolve_blocks(model, None),
                          short_side=kw["test_short_side"], crop_size=kw["test_crop_size"], mean=kw["mean"],
                          std=kw["std"], view="center", model_frames=decoded.model_frames,
                          source_frames=decoded.source_frames, num_queries=1, topk=2)
    assert len(viz_in.seen) == 1
    assert predict_in.seen[0].shape == viz_in.seen[0].shape == (1, 3, kw["num_frames"], kw["test_crop_size"],
                                                                 kw["test_crop_size"])
    assert torch.equal(predict_in.seen[0], viz_in.seen[0])
    # the same prediction, and the crop box mapped onto the frames the pictures show (the video's size)
    assert res.label == r["top"][0]["label"] and res.prob == pytest.approx(r["top"][0]["prob"], abs=1e-5)
    T, H, W, _ = decoded.frames.shape
    _, (box,) = test_views(decoded.frames, short_side=kw["test_short_side"], crop_size=kw["test_crop_size"],
                           num_crops=1)  # the crop of the frames at the video's size
    model_px = min(H, W) / kw["test_crop_size"]  # original pixels per model pixel
    assert res.blocks[0].grid.box == pytest.approx(box, abs=model_px)
    assert len(decoded.source_frames) == T == kw["num_frames"]


def test_full_view_is_test_views_resize_without_the_crop():
    """The full view resizes and normalises with test_views' code: its centre equals test_views' centre crop."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 90, 160, 3), dtype=np.uint8)
    full, box = full_view(frames, short_side=48, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    assert full.shape == (1, 3, 4, 48, 85) and box == (0.0, 0.0, 160.0, 90.0)
    want = normalize(resize_short_side(to_tchw(frames), 48), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert torch.equal(full[0], want)
    views, boxes = test_views(frames, short_side=48, crop_size=48, num_crops=1, mean=(0.4, 0.5, 0.6),
                              std=(0.2, 0.25, 0.3))
    x0 = (85 - 48) // 2
    assert torch.equal(full[0][..., x0 : x0 + 48], views[0])
    center, cbox = single_view(frames, "center", short_side=48, crop_size=48, mean=(0.4, 0.5, 0.6),
                               std=(0.2, 0.25, 0.3))
    assert torch.equal(center, views) and cbox == boxes[0]
    with pytest.raises(ValueError, match="full, center"):
        single_view(frames, "left", short_side=48, crop_size=48)
