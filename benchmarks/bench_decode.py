"""Clip decoding throughput: nlvid.data.read_clip vs pytorchvideo's EncodedVideo (PyAV backend), side by side.

Workload (the Kinetics 8x8 recipe): 8 frames at stride 8 (a 57-frame span, ~1.9 s) from ~10 s real clips at
seeded random starts, then a short-side resize to --short-side (224 by default) as uint8 (T, H, W, 3).
  nlvid:       read_clip(path, num_frames=8, stride=8, start=s, short_side=S)
               (seek to the keyframe before s, decode to the last wanted frame, convert + resize only the 8
               frames in swscale)
  pytorchvideo: EncodedVideo.from_path(path, decoder="pyav", decode_audio=False).get_clip(s, s + 57 / fps),
               then frames 0, 8, ..., 56 and the same antialiased short-side resize (torchvision v2)
Both open the file per clip (as a dataset does). A correctness check compares the 8 frames each returns
(before resizing).

Then the tiny model: training clips/s (forward + backward + SGD step, batch 8, 8 frames x 64 px) vs decode
clips/s of the synthetic 64 px dataset (VideoDataset train items: decode + scale jitter + crop + flip +
normalise), and one real epoch of the synthetic train split with make_loader(num_workers=2), timing the loader
wait vs the model step, which says whether a tiny-model epoch is decode-bound.

Run:  /work/benchvenv/bin/python benchmarks/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "videos"
TEN_SECOND_CLIPS = ["R6llTwEh07w.mp4", "arm_wrestling_demo.mp4", "flipping_a_pancake.mkv"]


def _resize_short(frames_tchw: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    h, w = frames_tchw.shape[-2:]
    nh, nw = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
    return TF.resize(frames_tchw, [nh, nw], antialias=True)


def nlvid_clip(path, start, short_side):
    from nlvid.data import read_clip

    return read_clip(path, num_frames=8, stride=8, start=start, short_side=short_side)


def nlvid_clip_raw(path, start):
    from nlvid.data import read_clip

    return read_clip(path, num_frames=8, stride=8, start=start)


def ptv_clip_raw(path, start, fps):
    from pytorchvideo.data.encoded_video import EncodedVideo

    video = EncodedVideo.from_path(str(path), decoder="pyav", decode_audio=False)
    clip = video.get_clip(start, start + 57 / fps)["video"]  # (C, T, H, W) float32 in [0, 255]
    video.close()
    idx = torch.arange(0, 57, 8).clamp(max=clip.shape[1] - 1)
    return clip[:, idx]  # (C, 8, H, W)


def ptv_clip(path, start, fps, short_side):
    clip = ptv_clip_raw(path, start, fps)
    x = clip.permute(1, 0, 2, 3).to(torch.uint8)  # (C, T, H, W) -> (T, C, H, W)
    return _resize_short(x, short_side).permute(0, 2, 3, 1)  # (T, H, W, C)


def bench_decode(n_clips: int, short_side: int, repeats: int):
    from nlvid.data import probe

    paths = [VIDEOS / name for name in TEN_SECOND_CLIPS if (VIDEOS / name).exists()]
    infos = {p: probe(p) for p in paths}
    rng = np.random.default_rng(0)
    jobs = []
    for k in range(n_clips):
        p = paths[k % len(paths)]
        info = infos[p]
        max_start = info.duration - 58 / info.fps
        # nlvid takes the frame shown at `start`; pytorchvideo the first frame with pts >= start: give each the
        # start that selects frame k (a quarter frame after / before its pts)
        k = int(rng.integers(0, int(max_start * info.fps)))
        jobs.append((p, (k + 0.25) / info.fps, (k - 0.25) / info.fps, info.fps))

    # correctness: same frames from both readers (before resizing)
    diffs = []
    for p, s, s_ptv, fps in jobs[: min(6, len(jobs))]:
        a = nlvid_clip_raw(p, s).astype(np.float32)
        b = ptv_clip_raw(p, s_ptv, fps).permute(1, 2, 3, 0).numpy()
        diffs.append(float(np.abs(a - b).mean()))

    def run(fn):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for p, s, s_ptv, fps in jobs:
                fn(p, s, s_ptv, fps)
            best = min(best, time.perf_counter() - t0)
        return len(jobs) / best

    nlvid_fn = lambda p, s, s_ptv, fps: nlvid_clip(p, s, short_side)  # noqa: E731
    ptv_fn = lambda p, s, s_ptv, fps: ptv_clip(p, s_ptv, fps, short_side)  # noqa: E731
    run(nlvid_fn) if repeats > 1 else None  # warm-up
    ours = run(nlvid_fn)
    theirs = run(ptv_fn)
    return paths, infos, ours, theirs, max(diffs)


def bench_tiny(quick: bool):
    try:
        from nlvid.models import create_model
    except Exception as e:  # noqa: BLE001
        return {"error": f"nlvid.models.create_model unavailable ({e})"}
    from nlvid.data import VideoDataset, make_loader, scan_dataset, write_synthetic

    try:
        model = create_model("tiny", num_classes=4)
    except Exception as e:  # noqa: BLE001
        return {"error": f"create_model('tiny') failed ({e})"}
    res = {}
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, 3, 8, 64, 64)
    y = torch.randint(0, 4, (8,))
    model.train()

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()

    step(x, y)
    n_steps = 5 if quick else 15
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step(x, y)
    res["train_clips_s"] = 8 * n_steps / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(tmp, classes=4, clips_per_class=12 if quick else 50, seed=0)
        index = scan_dataset(Path(tmp) / "train", cache=False)
        ds = VideoDataset(index.items, train=True, num_frames=8, stride=2, train_short_side=(64, 72), crop_size=64)
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        res["decode_clips_s_1proc"] = len(ds) / (time.perf_counter() - t0)
        res["n_train"] = len(ds)

        loader = make_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=0)
        it = iter(loader)  # workers start here (not timed)
        wait = compute = 0.0
        n = 0
        t_epoch = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                xb, yb, _ = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            step(xb, yb)
            t2 = time.perf_counter()
            wait += t1 - t0
            compute += t2 - t1
            n += len(xb)
        res["epoch_s"] = time.perf_counter() - t_epoch
        res["epoch_wait_s"] = wait
        res["epoch_compute_s"] = compute
        res["epoch_clips"] = n
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer clips and repeats (a smoke run)")
    ap.add_argument("--clips", type=int, default=None, help="clips per reader (default 30, quick 9)")
    ap.add_argument("--short-side", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_clips = args.clips or (9 if args.quick else 30)
    repeats = 1 if args.quick else 3

    paths, infos, ours, theirs, max_diff = bench_decode(n_clips, args.short_side, repeats)
    print(f"# Clip decoding: 8 frames x stride 8 + short side {args.short_side}, {n_clips} clips "
          f"(best of {repeats}), torch threads {torch.get_num_threads()}, {os.cpu_count()} cores\n")
    print("clips: " + ", ".join(f"{p.name} ({infos[p].duration:.1f} s, {infos[p].width}x{infos[p].height} "
                                 f"@ {infos[p].fps:.0f} fps)" for p in paths) + "\n")
    print("| reader | clips/s | ratio |")
    print("|---|---:|---:|")
    print(f"| pytorchvideo EncodedVideo (pyav) get_clip + resize | {theirs:.1f} | 1.00x |")
    print(f"| nlvid read_clip(short_side=...) | {ours:.1f} | {ours / theirs:.2f}x |")
    print(f"\nsame frames: max over clips of the mean abs difference of the 8 raw frames = {max_diff:.3f} "
          "(0 = identical)\n")

    tiny = bench_tiny(args.quick)
    if "error" in tiny:
        print(f"tiny model: not measured: {tiny['error']}")
        return
    wait_frac = tiny["epoch_wait_s"] / max(1e-9, tiny["epoch_wait_s"] + tiny["epoch_compute_s"])
    print("# Tiny model (8 frames x 64 px, batch 8) vs decoding\n")
    print("| what | clips/s |")
    print("|---|---:|")
    print(f"| tiny model training step (fwd + bwd + SGD), random tensors | {tiny['train_clips_s']:.1f} |")
    print(f"| synthetic 64 px train items (decode + augment), 1 process | {tiny['decode_clips_s_1proc']:.1f} |")
    print(f"| real 10 s clips at 224 px (nlvid, above), 1 process | {ours:.1f} |")
    print(f"| one epoch ({tiny['epoch_clips']} clips) with make_loader(num_workers=2) + training | "
          f"{tiny['epoch_clips'] / tiny['epoch_s']:.1f} |")
    print(f"\nepoch: {tiny['epoch_s']:.2f} s, of which waiting for the loader {tiny['epoch_wait_s']:.2f} s "
          f"({100 * wait_frac:.0f}%) and model steps {tiny['epoch_compute_s']:.2f} s -> "
          f"{'decode-bound' if wait_frac > 0.5 else 'compute-bound'} "
          "(measured: time blocked in next(loader) vs time in the step, workers started before timing)")


if __name__ == "__main__":
    sys.exit(main())
