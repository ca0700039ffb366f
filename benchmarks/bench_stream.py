"""Streaming prediction (`nlvid predict --window 2 --stride 1`): peak memory vs video length, and the pipeline's
throughput vs decoding and running the model one after the other.

Inputs, generated into a temporary folder (never committed): two H.264 MP4s from PyAV (a noise texture scrolling
under a moving bar, --size pixels, 25 fps, keyframe every 2 s) of --short seconds (30 s) and --long seconds (600 s =
10 min), and a tiny nlvid checkpoint (the `tiny` preset: 8 frames x stride 2 at 64 px, random weights, 3 classes;
the same model for every case).

1. Memory. Each case runs `nlvid predict VIDEO --window 2 --stride 1 --json --device cpu` in a FRESH subprocess
   (the CLI in-process there, stdout to /dev/null) and reads the peak resident set of that process
   (resource.getrusage(RUSAGE_SELF).ru_maxrss), so the runs do not pollute each other. Ratio = long / short: about
   1 means memory does not grow with the video's length (the streaming predictor keeps only the frames of the
   windows in flight, a bounded queue, and the tiny timeline). Each case runs twice: with glibc's malloc defaults,
   and with MALLOC_MMAP_THRESHOLD_=131072. glibc raises its mmap threshold dynamically once large blocks are
   freed; after that the ~0.4 MB clip tensors come from the heap, and its fragmentation grows the resident set
   slowly with the number of windows (about 40 MB over 10 min here, measured; no Python object is kept: tracemalloc
   shows no growth). With the threshold fixed the peak stays flat (the sequential baseline: 742 MiB after 100 and
   after 600 windows, vs 770 -> 969 MiB with the defaults).
2. Throughput. Windows per second over a --tput-seconds (60 s) video at --tput-size (640x360) with the tiny model
   at --test-size (224, the usual test crop) px -- a workload where decoding + preprocessing and the model cost about
   the same on an idle 2-core machine (at 160 px the model is the smaller part: 1.12x measured; with the
   64 px model the model is a small fraction and no pipeline can gain much; with a ResNet-50 on CPU the model
   dominates and the gain is at most the decode share). StreamPredictor(pipelined=True) (decode thread + model in
   the main thread, bounded queue) vs pipelined=False (the same decoding, scheduling, preprocessing and model, one
   after the other in one thread), for torch.set_num_threads in --threads (1 and 2: on 2 cores the best count
   differs between the modes: 2 intra-op threads help the sequential model, but the pipeline already keeps the
   second core busy with decoding), each run in a fresh subprocess, best of --repeats. Headline ratio: the best
   pipelined setting over the best sequential one. The runs alternate so that both modes see the same background
   load; on a shared machine the numbers are noisy (rerun, look at the per-setting ratios too).

Run:  .venv/bin/python benchmarks/bench_stream.py            (30 s vs 10 min; a few minutes)
      .venv/bin/python benchmarks/bench_stream.py --fast     (10 s vs 2 min, 1 repeat: a quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXED_MMAP_THRESHOLD = 131072  # bytes: glibc's default threshold, kept fixed (see the module doc)


def make_video(path: Path, seconds: float, *, size: tuple[int, int], fps: int = 25) -> None:
    """H.264 (libx264 ultrafast, yuv420p) of a scrolling noise texture with a moving bar; no audio."""
    import av

    w, h = size
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(h, 2 * w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(2 * fps)})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            x = (i * 2) % w
            img = texture[:, x : x + w].copy()
            b = (i * 5) % (w - w // 8)
            img[:, b : b + w // 8] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def make_checkpoint(path: Path, test_size: int = 64) -> None:
    import torch

    from nlvid.checkpoint import save_checkpoint
    from nlvid.config import load_config
    from nlvid.models import create_model

    cfg = load_config("tiny", ["model.num_classes=3", f"data.test_short_side={test_size}",
                               f"data.test_crop_size={test_size}"])
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=3)
    save_checkpoint(path, model_state=model.state_dict(), config=cfg.to_dict(), classes=["a", "b", "c"])


# ------------------------------------------------------------------------------------------ children


def child_memory(video: str, ckpt: str, out: str) -> None:
    """`nlvid predict VIDEO --window 2 --stride 1 --json` in this process; writes the peak RSS (MiB) and windows."""
    from nlvid.cli import main

    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1)
    os.dup2(devnull, 1)
    t0 = time.perf_counter()
    code = 0
    try:
        main(["predict", video, "--checkpoint", ckpt, "--window", "2", "--stride", "1", "--json", "--device", "cpu"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    wall = time.perf_counter() - t0
    sys.stdout.flush()
    os.dup2(saved, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    Path(out).write_text(json.dumps({"peak_mib": peak, "seconds": wall, "exit": code}))


def child_speed(video: str, ckpt: str, out: str, mode: str, threads: int) -> None:
    """Windows/s of StreamPredictor over VIDEO, pipelined or sequential."""
    import torch

    torch.set_num_threads(threads)
    from nlvid.config import test_data_kwargs
    from nlvid.engine.stream import StreamPredictor, WindowResult
    from nlvid.models import load_model

    model, classes, cfg = load_model(ckpt, device="cpu")
    kw = test_data_kwargs(cfg.data, num_crops=1)
    with torch.inference_mode():  # warm the model up once (first-call allocations)
        model(torch.zeros(1, 3, kw["num_frames"], kw["test_crop_size"], kw["test_crop_size"]))
    t0 = time.perf_counter()
    sp = StreamPredictor(model, classes, video, window=2, step=1, batch_size=8, pipelined=mode == "pipelined", **kw)
    n = sum(1 for e in sp if isinstance(e, WindowResult))
    dt = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"windows": n, "seconds": dt, "windows_per_s": n / dt, "frames": sp.frames}))


def _child(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> dict:
    out = tmp / f"result_{time.monotonic_ns()}.json"
    subprocess.run([sys.executable, __file__, "--child", *args, str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="10 s vs 2 min, one repeat")
    ap.add_argument("--short", type=float, default=30.0, help="seconds of the short video")
    ap.add_argument("--long", type=float, default=600.0, help="seconds of the long video")
    ap.add_argument("--size", default="320x240", help="WxH of the generated videos")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tput-seconds", type=float, default=60.0, help="seconds of the throughput video")
    ap.add_argument("--tput-size", default="640x360", help="WxH of the throughput video")
    ap.add_argument("--test-size", type=int, default=224,
                    help="the model's test short side / crop for the throughput runs (a heavier model than 64 px, "
                    "so that decoding and the model cost about the same)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "memory":
            child_memory(*rest)
        else:
            video, ckpt, mode, threads, out = rest
            child_speed(video, ckpt, out, mode, int(threads))
        return
    if a.fast:
        a.short, a.long, a.repeats, a.tput_seconds = 10.0, 120.0, 1, 20.0
    size = tuple(int(v) for v in a.size.lower().split("x"))
    tsize = tuple(int(v) for v in a.tput_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="nlvid_bench_stream_") as d:
        tmp = Path(d)
        short, long_, ckpt = tmp / "short.mp4", tmp / "long.mp4", tmp / "tiny.pt"
        t0 = time.perf_counter()
        make_video(short, a.short, size=size)
        make_video(long_, a.long, size=size)
        make_checkpoint(ckpt)
        print(f"generated {a.short:g} s and {a.long:g} s videos at {size[0]}x{size[1]}, 25 fps "
              f"({short.stat().st_size / 1e6:.1f} MB, {long_.stat().st_size / 1e6:.1f} MB) in "
              f"{time.perf_counter() - t0:.0f} s; model: tiny preset, 8x2 frames at 64 px, random weights")

        print("\n1. peak memory of `nlvid predict VIDEO --window 2 --stride 1 --json` (fresh process per case)")
        ratios = {}
        for label, env in (("glibc malloc defaults", None), (f"MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD}", {
                "MALLOC_MMAP_THRESHOLD_": str(FIXED_MMAP_THRESHOLD)})):
            mem = {}
            for name, path, secs in (("short", short, a.short), ("long", long_, a.long)):
                r = _child(["memory", str(path), str(ckpt)], tmp, env)
                assert r["exit"] == 0, r
                mem[name] = r
                print(f"   {label:32s} {secs:6.0f} s video: peak RSS {r['peak_mib']:7.1f} MiB   ({r['seconds']:.1f} s "
                      f"wall)")
            ratios[label] = mem["long"]["peak_mib"] / mem["short"]["peak_mib"]
            print(f"   {label:32s} memory ratio long/short = {ratios[label]:.3f}   (video length ratio "
                  f"{a.long / a.short:.0f}x; target ~1)")
        ratio = ratios["glibc malloc defaults"]

        tput, tckpt = tmp / "throughput.mp4", tmp / f"tiny{a.test_size}.pt"
        make_video(tput, a.tput_seconds, size=tsize)
        make_checkpoint(tckpt, a.test_size)
        print(f"\n2. throughput, windows/s: a {a.tput_seconds:g} s video at {tsize[0]}x{tsize[1]}, the tiny model "
              f"at {a.test_size} px; best of {a.repeats} per setting, fresh process per run")
        best: dict[tuple[str, int], float] = {}
        for _ in range(a.repeats):
            for threads in a.threads:
                for mode in ("sequential", "pipelined"):
                    r = _child(["speed", str(tput), str(tckpt), mode, str(threads)], tmp)
                    best[mode, threads] = max(best.get((mode, threads), 0.0), r["windows_per_s"])
                    print(f"   torch threads {threads}  {mode:10s} {r['windows']} windows in {r['seconds']:.2f} s "
                          f"= {r['windows_per_s']:.1f}/s")
        for threads in a.threads:
            print(f"   torch threads {threads}: pipelined/sequential = "
                  f"{best['pipelined', threads] / best['sequential', threads]:.2f}x")
        seq = max(v for (m, _), v in best.items() if m == "sequential")
        pipe = max(v for (m, _), v in best.items() if m == "pipelined")
        speedup = pipe / seq
        print(f"   throughput ratio, best pipelined / best sequential (each with its best thread count) = "
              f"{speedup:.2f}x   (target >= 1.3x)")
        fixed = ratios[f"MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD}"]
        print(f"\nRATIOS memory(long/short)={ratio:.3f} (fixed mmap threshold: {fixed:.3f}) "
              f"throughput(pipelined/sequential, best vs best)={speedup:.2f}")


if __name__ == "__main__":
    main()
