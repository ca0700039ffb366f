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

Then full resolution (no resize) on R6llTwEh07w.mp4 (340x256, 10 s, H.264 with B-frames, keyframes at frames 0
and 250 only): 5 clips of 8 x stride 8 starting at frames 0, 61, 123, 184, 246, the two readers interleaved,
medians of wall and CPU time (the process's, all threads). With it, what bounds the ratio, measured in the same run
with plain PyAV loops: decoding every frame from the keyframe to each clip's end (what pytorchvideo decodes), and
an oracle that decodes only the reference frames plus the 8 wanted ones (the least any frame-exact reader must
decode: a clip's frames predict from a chain that starts at the keyframe, up to 8 s earlier). pytorchvideo's total
over that oracle is the highest ratio frame-exact decoding can reach on this file.

Then the tiny model: training clips/s (forward + backward + SGD step, batch 8, 8 frames x 64 px) vs decode
clips/s of the synthetic 64 px dataset (VideoDataset train items: decode + scale jitter + crop + flip +
normalise), and one real epoch of the synthetic train split with make_loader(num_workers=2), timing the loader
wait vs the model step, which says whether a tiny-model epoch is decode-bound.

pytorchvideo (0.1.5, pure Python) is imported from the environment, else installed on demand with
`pip install --target ~/.cache/nlvid/bench-site --no-deps` (plus any of its small dependencies missing here) and
put on sys.path for this process only.

Run:  .venv/bin/python benchmarks/bench_decode.py [--quick] [--fullres-only]
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
FULLRES_CLIP = "R6llTwEh07w.mp4"
FULLRES_STARTS = [0, 61, 123, 184, 246]  # 5 clips of 8 x stride 8 spread over the 303 frames
# pytorchvideo and what it imports, by module name -> pip requirement (installed only when missing)
_PTV_REQS = {"pytorchvideo": "pytorchvideo==0.1.5", "parameterized": "parameterized", "fvcore": "fvcore",
             "iopath": "iopath", "yacs": "yacs", "termcolor": "termcolor", "tabulate": "tabulate",
             "portalocker": "portalocker"}


def ensure_pytorchvideo() -> None:
    """Import pytorchvideo from this environment, else pip-install it (no dependencies pulled in: torch, numpy
    and av stay this environment's) into the user cache dir and put that on sys.path."""
    import importlib
    import subprocess

    site = Path(os.environ.get("NLVID_CACHE_DIR") or Path.home() / ".cache" / "nlvid") / "bench-site"
    if site.is_dir():
        sys.path.insert(0, str(site))
    missing = []
    for mod, req in _PTV_REQS.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(req)
    if missing:
        print(f"installing {' '.join(missing)} into {site} (benchmark only)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(site), *missing], check=True)
        if str(site) not in sys.path:
            sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    importlib.import_module("pytorchvideo.data.encoded_video")


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


def _median(xs):
    return float(np.median(np.asarray(xs)))


def _plain_decode(path: Path, starts, fps: float, *, oracle: bool) -> int:
    """Decode what a reader must decode for clips of 8 x stride 8 at `starts` (frame indices), in a bare PyAV
    loop: seek to the keyframe before the clip, decode up to its last frame. oracle=False decodes every frame
    (pytorchvideo's work); oracle=True lets the decoder skip each non-reference frame that is not one of the 8
    (the least any frame-exact reader decodes). Returns the frames decoded."""
    import av

    decoded = 0
    for k in starts:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            tb = s.time_base
            first = None
            for pk in c.demux(s):
                first = pk.pts
                break
            want = [first + round((k + 8 * i) / fps / tb) for i in range(8)]
            c.seek(want[0], stream=s, backward=True, any_frame=False)
            wanted = set(want)
            cc = s.codec_context
            done = False
            for pk in c.demux(s):
                if oracle:
                    cc.skip_frame = "DEFAULT" if pk.pts in wanted else "NONREF"
                for f in pk.decode():
                    decoded += 1
                    if f.pts is not None and f.pts >= want[-1]:
                        done = True
                        break
                if done:
                    break
    return decoded


def bench_fullres(rounds: int):
    """Full-resolution clips of FULLRES_CLIP: nlvid vs pytorchvideo interleaved, plus the plain decode loops."""
    from nlvid.data import probe, read_clip

    path = VIDEOS / FULLRES_CLIP
    fps = probe(path).fps

    def ours():
        return [read_clip(path, num_frames=8, stride=8, start=(k + 0.25) / fps) for k in FULLRES_STARTS]

    def theirs():
        return [ptv_clip_raw(path, (k - 0.25) / fps, fps) for k in FULLRES_STARTS]

    same = all(np.array_equal(a, b.permute(1, 2, 3, 0).numpy().astype(np.uint8)) for a, b in zip(ours(), theirs()))
    fns = {"nlvid": ours, "pytorchvideo": theirs,
           "decode all frames": lambda: _plain_decode(path, FULLRES_STARTS, fps, oracle=False),
           "decode oracle": lambda: _plain_decode(path, FULLRES_STARTS, fps, oracle=True)}
    times = {k: [] for k in fns}
    counts = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
            if isinstance(out, int):
                counts[name] = out
    med = {k: (_median([w for w, _ in v]), _median([c for _, c in v])) for k, v in times.items()}
    return med, counts, same


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
    ap.add_argument("--fullres-only", action="store_true", help="only the full-resolution comparison")
    ap.add_argument("--rounds", type=int, default=None, help="full-resolution rounds (default 9, quick 3)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_clips = args.clips or (9 if args.quick else 30)
    repeats = 1 if args.quick else 3
    ensure_pytorchvideo()
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")

    if not args.fullres_only:
        paths, infos, ours, theirs, max_diff = bench_decode(n_clips, args.short_side, repeats)
        print_decode(args, n_clips, repeats, paths, infos, ours, theirs, max_diff)

    rounds = args.rounds or (3 if args.quick else 9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 there): pytorchvideo's float conversion
    med, counts, same = bench_fullres(rounds)
    torch.set_num_threads(threads)
    print_fullres(med, counts, same, rounds)
    if args.fullres_only:
        return

    tiny = bench_tiny(args.quick)
    print_tiny(tiny, ours)


def print_fullres(med, counts, same, rounds) -> None:
    (ow, oc), (tw, tc) = med["nlvid"], med["pytorchvideo"]
    ac, qc = med["decode all frames"][1], med["decode oracle"][1]
    n = len(FULLRES_STARTS)
    print(f"# Full resolution: {FULLRES_CLIP} (340x256), {n} clips of 8 x stride 8 (starts {FULLRES_STARTS}), "
          f"no resize; medians of {rounds} interleaved rounds, 1 torch thread (as in a DataLoader worker)\n")
    print("| reader | clips/s (wall) | CPU ms per clip | ratio (wall) | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| pytorchvideo EncodedVideo (pyav) get_clip | {n / tw:.1f} | {1e3 * tc / n:.1f} | 1.00x | 1.00x |")
    print(f"| nlvid read_clip | {n / ow:.1f} | {1e3 * oc / n:.1f} | {tw / ow:.2f}x | {tc / oc:.2f}x |")
    print(f"\nsame frames: {'identical' if same else 'DIFFERENT'}\n")
    print("What bounds it (plain PyAV loops, same run):\n")
    print("| work | frames decoded | CPU ms per clip |")
    print("|---|---:|---:|")
    print(f"| decode every frame from the keyframe to the clip's end (pytorchvideo's decoding) | "
          f"{counts['decode all frames']} | {1e3 * ac / n:.1f} |")
    print(f"| decode only reference frames + the 8 wanted (oracle: the least a frame-exact reader decodes) | "
          f"{counts['decode oracle']} | {1e3 * qc / n:.1f} |")
    print(f"\nnlvid: {100 * qc / oc:.0f}% of its CPU time is the oracle's decoding (the rest: opening, demuxing, "
          f"RGB conversion of 8 frames, bookkeeping); pytorchvideo: {100 * ac / tc:.0f}% is decoding, the rest "
          f"converting all ~57 frames of each clip to RGB float. Highest CPU ratio any frame-exact reader can reach "
          f"here (pytorchvideo's total / the oracle's decoding alone): {tc / qc:.2f}x.\n")


def print_decode(args, n_clips, repeats, paths, infos, ours, theirs, max_diff) -> None:
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


def print_tiny(tiny, ours) -> None:
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
