"""Training throughput of the `tiny` config on this machine, in one run, side by side:

1. end-to-end `nlvid.engine.train.train` on a synthetic dataset (real MP4 decoding + augmentation): clips/s and the
   fraction of step time spent waiting for data, fp32 vs bf16 autocast;
2. the model step alone (forward + backward + SGD on tensors already in memory), fp32 vs bf16 autocast.
The data pipeline alone (one process) is measured by benchmarks/bench_decode.py ("Tiny model vs decoding").

    .venv/bin/python benchmarks/bench_train.py [--clips-per-class 24] [--epochs 3] [--workers 2]

Prints a table and the bf16/fp32 ratios. Timings on a shared machine are noisy: compare ratios within one run.
The defaults (36 steps with the tiny config's 2 workers) are the fewest that give a stable end-to-end number here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def end_to_end(data: Path, out: Path, *, amp: str, epochs: int, workers: int, batch: int) -> dict:
    from nlvid.config import load_config
    from nlvid.engine.train import train

    steps = []

    def progress(event, **d):
        if event == "step" and d.get("log"):
            steps.append(d["record"])

    cfg = load_config("tiny", [f"train.amp={amp}", f"train.epochs={epochs}", "train.log_every=1",
                               f"data.num_workers={workers}", f"train.batch_size={batch}", "train.eval_every=1000"])
    t0 = time.perf_counter()
    train(cfg, data=data / "train", out=out, progress=progress)
    wall = time.perf_counter() - t0
    body = steps[1:] or steps  # the first step includes warm-up (allocations, first decode)
    clips = sum(r["clips_per_s"] * r["time"] for r in body)
    secs = sum(r["time"] for r in body)
    data_secs = sum(r["data_time"] for r in body)
    return {"clips_per_s": clips / secs, "data_fraction": data_secs / secs, "wall_s": wall, "steps": len(steps)}


def model_only(*, amp: str, batch: int, iters: int, size: int, frames: int) -> dict:
    from nlvid.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", num_classes=4, dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, frames, size, size)
    y = torch.randint(0, 4, (batch,))
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        if amp == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
        else:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"clips_per_s": batch / med, "step_s": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips-per-class", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from nlvid.config import load_config
    from nlvid.data import write_synthetic

    cfg = load_config("tiny")
    size, frames = cfg.data.crop_size, cfg.data.num_frames
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic(tmp / "data", classes=4, clips_per_class=args.clips_per_class, seed=0)
        for amp in ("none", "bf16"):
            r = end_to_end(tmp / "data", tmp / f"run-{amp}", amp=amp, epochs=args.epochs, workers=args.workers,
                           batch=args.batch)
            m = model_only(amp=amp, batch=args.batch, iters=args.iters, size=size, frames=frames)
            rows.append((amp, r, m))
    t = Table(title=f"tiny config training, {frames}x{size}x{size} clips, batch {args.batch}, "
                    f"{torch.get_num_threads()} threads, data workers {args.workers}")
    for col in ("autocast", "end-to-end clips/s", "waiting for data", "model-only clips/s", "model step (s)"):
        t.add_column(col, justify="right")
    for amp, r, m in rows:
        t.add_row("fp32" if amp == "none" else "bf16", f"{r['clips_per_s']:.1f}", f"{100 * r['data_fraction']:.0f}%",
                  f"{m['clips_per_s']:.1f}", f"{m['step_s']:.3f}")
    con = Console()
    con.print(t)
    (_, r32, m32), (_, r16, m16) = rows
    con.print(f"bf16 / fp32 speed: end-to-end {r16['clips_per_s'] / r32['clips_per_s']:.2f}x, "
              f"model-only {m16['clips_per_s'] / m32['clips_per_s']:.2f}x")


if __name__ == "__main__":
    main()
