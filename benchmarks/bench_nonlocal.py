"""Non-local block: nlvid's NonLocalBlock vs pytorchvideo's create_nonlocal, side by side, CPU fp32.

    /work/benchvenv/bin/python benchmarks/bench_nonlocal.py            # full run (~5-10 min on 2 busy cores)
    /work/benchvenv/bin/python benchmarks/bench_nonlocal.py --quick    # fewer repetitions (noisier)

Times: both implementations in one fresh subprocess per case, steps alternated (ours, theirs, ours, ...), so a load
that changes during the run hits both alike. Memory: a fresh subprocess per implementation and case, so it is honest:
glibc is told to serve every allocation >= 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_; memory runs only), so freed tensors leave the
resident set at once; after the warm-up steps the kernel's peak-RSS counter is reset (/proc/self/clear_refs = 5) and
"peak extra memory" is VmHWM after one more step minus VmRSS just before it (inputs, weights, and libraries excluded).
Times are the median of several steps after warm-up, with torch.set_num_threads(--threads, default 2).
Both blocks get the same weights (pytorchvideo conv_theta/phi/g/out and norm -> nlvid theta/phi/g/out and bn),
and the script first checks that they compute the same function.

A training step is forward + backward of y.sum() with the input requiring grad (as inside a network), parameter
gradients included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _build(impl: str, inst: str, seed: int = 0):
    """impl: "nlvid" or "pytorchvideo"; inst: "embedded_gaussian" or "dot_product". Same weights for both."""
    import torch
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    torch.manual_seed(seed)
    ref = create_nonlocal(
        dim_in=512, dim_inner=256, pool_size=(1, 2, 2),
        instantiation="softmax" if inst == "embedded_gaussian" else "dot_product",
    )
    with torch.no_grad():  # non-zero BN gamma/beta so the attention branch reaches the output
        ref.norm.weight.normal_(0, 0.5)
        ref.norm.bias.normal_(0, 0.1)
    if impl == "pytorchvideo":
        return ref
    from nlvid.models.nonlocal_block import NonLocalBlock

    ours = NonLocalBlock(512, 256, instantiation=inst, pool_size=(1, 2, 2), pool_position="input")
    state = {}
    for src, dst in (("conv_theta", "theta"), ("conv_phi", "phi"), ("conv_g", "g"), ("conv_out", "out")):
        state[f"{dst}.weight"] = getattr(ref, src).weight.detach().clone()
        state[f"{dst}.bias"] = getattr(ref, src).bias.detach().clone()
    for key, value in ref.norm.state_dict().items():
        state[f"bn.{key}"] = value.clone()
    ours.load_state_dict(state)
    return ours


def _step_fn(block, x, kind: str):
    import torch

    if kind == "train":
        block.train()

        def step():
            block.zero_grad(set_to_none=True)
            x.grad = None
            block(x).sum().backward()

    else:
        block.eval()

        def step():
            with torch.no_grad():
                block(x)

    return step


def worker(args) -> None:
    """--mode time: both implementations in one process, steps alternated (fair under a changing load);
    --mode memory: one implementation, peak extra RSS of one step after warm-up."""
    import torch

    torch.set_num_threads(args.threads)
    x = torch.randn(2, 512, args.frames, 28, 28, requires_grad=args.kind == "train")
    if args.measure == "time":
        steps = {impl: _step_fn(_build(impl, args.inst), x, args.kind) for impl in ("pytorchvideo", "nlvid")}
        times = {impl: [] for impl in steps}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for _ in range(args.reps):
            for impl, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
        print(json.dumps({impl: {"time_s": statistics.median(t), "times": t} for impl, t in times.items()}))
        return
    block = _build(args.impl, args.inst)
    step = _step_fn(block, x, args.kind)
    for _ in range(args.warmup):
        step()
    peaks = []
    for _ in range(2):
        block.zero_grad(set_to_none=True)
        x.grad = None
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        step()
        peaks.append((_status_kb("VmHWM") - base) / 1024.0)
    print(json.dumps({"peak_mb": max(peaks)}))


def run_case(measure: str, impl: str, inst: str, frames: int, kind: str, reps: int, warmup: int, threads: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if measure == "memory":  # default allocator for timing; mmap every block >= 64 KiB for honest peak RSS
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--measure", measure, "--impl", impl, "--inst", inst,
        "--frames", str(frames), "--kind", kind, "--reps", str(reps), "--warmup", str(warmup),
        "--threads", str(threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_equal() -> list[str]:
    """Both blocks compute the same function (same weights), forward and input gradient, train and eval mode."""
    import torch

    lines = []
    for inst in ("embedded_gaussian", "dot_product"):
        ref, ours = _build("pytorchvideo", inst), _build("nlvid", inst)
        x = torch.randn(2, 512, 4, 8, 8)
        for training in (True, False):
            ref.train(training)
            ours.train(training)
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yo = ref(xr), ours(xo)
            dy = torch.randn_like(yr)
            (yr * dy).sum().backward()
            (yo * dy).sum().backward()
            d_out = (yr - yo).abs().max().item()
            d_grad = (xr.grad - xo.grad).abs().max().item()
            ok = d_out <= 1e-4 * max(1.0, yr.abs().max().item()) and d_grad <= 1e-4 * max(1.0, xr.grad.abs().max().item())
            lines.append(
                f"{inst:18s} {'train' if training else 'eval ':5s} max|dy|={d_out:.2e} max|dx.grad|={d_grad:.2e} "
                f"{'same function' if ok else 'DIFFERENT'}"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (numbers are noisier)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", default="time", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="nlvid", help=argparse.SUPPRESS)
    p.add_argument("--inst", default="embedded_gaussian", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="train", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    reps = args.reps or (3 if args.quick else 5)
    warmup = 1 if args.quick else 2
    print(f"# Non-local block benchmark: nlvid vs pytorchvideo create_nonlocal (dim_in=512, dim_inner=256, "
          f"pool 1x2x2), CPU fp32, {args.threads} threads, torch {torch.__version__}, median of {reps}, "
          f"load average {os.getloadavg()[0]:.2f} at start\n", flush=True)
    for line in check_equal():
        print("check:", line, flush=True)
    print(flush=True)

    # (label, instantiation, T, kind, [(metric, target ratio)])
    cases = [
        ("embedded_gaussian (2,512,8,28,28) inference", "embedded_gaussian", 8, "infer", [("time", 0.7)]),
        ("embedded_gaussian (2,512,8,28,28) train step", "embedded_gaussian", 8, "train",
         [("time", 1.0), ("peak", 0.6)]),
        ("embedded_gaussian (2,512,16,28,28) train step", "embedded_gaussian", 16, "train",
         [("time", 0.8), ("peak", 0.5)]),
        ("dot_product (2,512,16,28,28) train step", "dot_product", 16, "train", [("time", 0.25)]),
    ]
    rows = []
    for label, inst, frames, kind, targets in cases:
        print(f"running {label} ...", file=sys.stderr, flush=True)
        res = run_case("time", "both", inst, frames, kind, reps, warmup, args.threads)
        for impl in ("pytorchvideo", "nlvid"):
            res[impl].update(run_case("memory", impl, inst, frames, kind, reps, 1, args.threads))
        for metric, target in targets:
            key = "time_s" if metric == "time" else "peak_mb"
            ours, ref = res["nlvid"][key], res["pytorchvideo"][key]
            ratio = ours / ref
            fmt = "{:.3f} s" if metric == "time" else "{:.0f} MB"
            rows.append((label, "time" if metric == "time" else "peak extra memory", fmt.format(ours),
                         fmt.format(ref), f"{ratio:.2f}x", f"<= {target}x", "PASS" if ratio <= target else "MISS"))
        if not any(m == "peak" for m, _ in targets):  # show memory anyway, no target
            ours, ref = res["nlvid"]["peak_mb"], res["pytorchvideo"]["peak_mb"]
            rows.append((label, "peak extra memory", f"{ours:.0f} MB", f"{ref:.0f} MB", f"{ours / ref:.2f}x", "-", "-"))

    print("| case | metric | nlvid | pytorchvideo | ratio | target | result |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (machine shared; rerun on an idle machine for final numbers)")


if __name__ == "__main__":
    main()
