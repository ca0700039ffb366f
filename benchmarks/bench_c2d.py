"""Whole-model C2D R50 inference: nlvid vs pytorchvideo's hub c2d_r50, side by side in one run.

    /work/benchvenv/bin/python benchmarks/bench_c2d.py            # (1, 3, 8, 224, 224), 10 timed runs
    /work/benchvenv/bin/python benchmarks/bench_c2d.py --quick    # 3 timed runs
    /work/benchvenv/bin/python benchmarks/bench_c2d.py --ablation # + nlvid with plain Conv3d/BN3d forwards

Prints a markdown table: clips/s, ratio, multiply-adds of both (FlopCounterMode; FLOPs / 2), achieved GFLOP/s and
the GFLOP/s of a large fp32 matmul measured in the same run (this machine's ceiling).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


def _time(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # best of N: the least disturbed run on a shared machine


def _matmul_gflops(n: int, runs: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    sec = _time(lambda: a @ b, runs, 1)
    return 2 * n**3 / sec / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 timed runs instead of 10")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ablation", action="store_true", help="also time nlvid with plain Conv3d/BN3d forwards")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, warmup = (3, 1) if args.quick else (10, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorchvideo.models.hub.resnet import c2d_r50

        ref = c2d_r50(pretrained=False).eval()
    from nlvid.models import create_model

    ours = create_model("c2d_r50", nonlocal_blocks={}, layout="8x8").eval()
    x = torch.randn(1, 3, args.frames, args.size, args.size)

    import nlvid.models.resnet3d as r3d

    def _plain_join(y, residual, relu):
        y = y if residual is None else y + residual
        return torch.relu(y) if relu else y

    def plain(m: torch.nn.Module):
        """Ablation: the same nlvid model with the plain Conv3d / BatchNorm3d forwards (no folded frames, no BN
        folding) on a contiguous clip."""
        def run(inp):
            fc, fb, cb = r3d.FrameConv3d.forward, r3d.FrameBatchNorm3d.forward, r3d.conv_bn
            r3d.FrameConv3d.forward, r3d.FrameBatchNorm3d.forward = nn.Conv3d.forward, nn.BatchNorm3d.forward
            r3d.conv_bn = lambda conv, bn, x, residual=None, relu=False, relu_mask=False: _plain_join(
                bn(conv(x)), residual, relu)
            try:
                return m(inp)
            finally:
                r3d.FrameConv3d.forward, r3d.FrameBatchNorm3d.forward, r3d.conv_bn = fc, fb, cb
        return run

    models = [("pytorchvideo c2d_r50", ref), ("nlvid c2d_r50 (8x8)", ours)]
    if args.ablation:
        models.append(("nlvid, plain Conv3d/BN3d forwards (ablation)", plain(ours)))
    with torch.no_grad():
        rows = []
        for name, model in models:
            macs = _macs(model, x)
            sec = _time(lambda m=model: m(x), runs, warmup)
            rows.append((name, sec, macs))
        # interleave a second pass so drift on a shared machine hits every model
        rows2 = [_time(lambda m=model: m(x), runs, 0) for _, model in models]
    rows = [(n, min(s, s2), m) for (n, s, m), s2 in zip(rows, rows2)]
    mm = _matmul_gflops(2048, 5 if args.quick else 10)

    ref_sec, ref_macs = rows[0][1], rows[0][2]
    print(f"C2D R50 inference, input (1, 3, {args.frames}, {args.size}, {args.size}), fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {2 * runs} runs (two interleaved passes)\n")
    print("| model | s / clip | clips/s | speed vs pytorchvideo | GMACs | MACs vs pytorchvideo | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, sec, macs in rows:
        print(f"| {name} | {sec:.3f} | {1 / sec:.2f} | {ref_sec / sec:.2f}x | {macs / 1e9:.2f} | "
              f"{macs / ref_macs:.4f} | {2 * macs / sec / 1e9:.0f} |")
    print(f"| fp32 matmul 2048^3 (ceiling) | | | | | | {mm:.0f} |")


if __name__ == "__main__":
    main()
