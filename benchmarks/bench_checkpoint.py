"""Peak memory and step time of one training step with activation checkpointing (train.checkpoint) off, nonlocal
and stages, side by side: i3d_r50_nl5 at 32 frames x 224 px, batch 1, and 8 frames, batch 2 (by default).

    .venv/bin/python benchmarks/bench_checkpoint.py [--preset i3d_r50_nl5] [--cases 1x32,2x8] [--size 224]
        [--steps 2] [--modes off,nonlocal,stages] [--bn bn] [--amp none] [--mmap-threshold 131072]

Each case runs in a fresh subprocess (a high-water mark cannot be reset): memory is the growth of the process's
peak resident set (ru_maxrss) from the built model, optimizer and input clip to the end of the first training step
(forward, backward, SGD with momentum; the peak includes the gradients, the parameters' size, the same in every
mode). Step time is the median of `--steps` further steps; GFLOP counts one more step's conv/matmul/attention work
(torch.utils.flop_counter, recomputation included): the deterministic measure of what checkpointing costs.
Prints a table and the ratios to "off"; for 1x32x224 with the default allocator also the ratio to PySlowFast's
measured growth (3826 MiB, the issue's number).
`checkpoint_memory(...)` returns the rows (benchmarks/bench_model.py may import it).
Timings on a shared machine are noisy: compare ratios within one run. Memory with the default glibc allocator
includes heap fragmentation and varies ~10% between runs; with `--mmap-threshold 131072` it follows the live
tensors and repeats to the MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYSLOWFAST_GROWTH_MIB = {(1, 32, 224): 3826.0}  # issue #17: PySlowFast I3D NL, ru_maxrss growth of a training step


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(*, preset: str, mode: str, batch: int, frames: int, size: int, steps: int, bn: str,
             amp: str = "none") -> dict:
    """One case in this process: -> {peak_growth_mib, step_s, params_mib, ...}. Call in a fresh process."""
    import torch
    import torch.nn.functional as F

    from nlvid.models import create_model

    torch.manual_seed(0)
    model = create_model(preset, num_classes=400, bn=bn, checkpoint=mode).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, frames, size, size)
    y = torch.randint(0, 400, (batch,))
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return time.perf_counter() - t0

    base = _maxrss_mib()
    first = step()
    growth = _maxrss_mib() - base
    times = [step() for _ in range(steps)]
    # the compute a step does, recomputation included: conv/matmul/attention FLOPs counted by torch (deterministic,
    # unlike wall time on a shared machine)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return {"preset": preset, "mode": mode, "bn": bn, "amp": amp, "batch": batch, "frames": frames, "size": size,
            "peak_growth_mib": round(growth, 1), "step_s": round(statistics.median(times) if times else first, 3),
            "first_step_s": round(first, 3), "params_mib": round(params_mib, 1), "threads": torch.get_num_threads(),
            "gflops": round(counter.get_total_flops() / 1e9, 1)}


def checkpoint_memory(*, preset: str = "i3d_r50_nl5", cases: tuple[tuple[int, int], ...] = ((1, 32), (2, 8)),
                      size: int = 224, modes: tuple[str, ...] = ("off", "nonlocal", "stages"), steps: int = 2,
                      bn: str = "bn", amp: str = "none", mmap_threshold: int | None = None) -> list[dict]:
    """Every (batch, frames) case x mode, each in a fresh subprocess; rows get `mem_ratio` / `time_ratio` to the
    case's "off" row (when measured) and `vs_pyslowfast` where the issue has PySlowFast's number.
    `mmap_threshold` (bytes) sets glibc's MALLOC_MMAP_THRESHOLD_ in the subprocesses: allocations from that size
    up get their own mapping, returned to the OS when freed, so the peak RSS follows the live tensors instead of
    including the heap's fragmentation (the default allocator's growth varies by ~10% from run to run)."""
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    rows = []
    for batch, frames in cases:
        case_rows = []
        for mode in modes:
            args = json.dumps(dict(preset=preset, mode=mode, batch=batch, frames=frames, size=size, steps=steps,
                                   bn=bn, amp=amp))
            out = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True,
                                 cwd=ROOT, check=False, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{mode} {batch}x{frames}: {out.stderr.strip().splitlines()[-1:]}")
            case_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        off = next((r for r in case_rows if r["mode"] == "off"), None)
        for r in case_rows:
            if off is not None:
                r["mem_ratio"] = round(r["peak_growth_mib"] / off["peak_growth_mib"], 3)
                r["time_ratio"] = round(r["step_s"] / off["step_s"], 3)
                r["flop_ratio"] = round(r["gflops"] / off["gflops"], 3)
            ref = PYSLOWFAST_GROWTH_MIB.get((batch, frames, size))
            if ref is not None and amp == "none" and mmap_threshold is None:
                r["vs_pyslowfast"] = round(r["peak_growth_mib"] / ref, 3)
        rows += case_rows
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="i3d_r50_nl5")
    ap.add_argument("--cases", default="1x32,2x8", help="BATCHxFRAMES,...")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default="off,nonlocal,stages")
    ap.add_argument("--bn", default="bn", help="model.bn: bn or frozen")
    ap.add_argument("--amp", default="none", help="none or bf16 (CPU autocast)")
    ap.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="glibc MALLOC_MMAP_THRESHOLD_ for the runs (e.g. 131072): RSS follows the live tensors")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_case(**json.loads(a.child))))
        return
    cases = tuple(tuple(int(v) for v in c.split("x")) for c in a.cases.split(","))
    rows = checkpoint_memory(preset=a.preset, cases=cases, size=a.size, modes=tuple(a.modes.split(",")),
                             steps=a.steps, bn=a.bn, amp=a.amp, mmap_threshold=a.mmap_threshold)
    malloc = f"MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}" if a.mmap_threshold is not None else "default malloc"
    print(f"{a.preset} training step (SGD, amp={a.amp}, {rows[0]['threads']} threads, {malloc}), bn={a.bn}, "
          f"{a.size}x{a.size}; "
          f"parameters {rows[0]['params_mib']} MiB")
    print(f"{'case':>8} {'mode':>9} {'peak growth MiB':>16} {'x off':>7} {'step s':>8} {'x off':>7} "
          f"{'GFLOP':>7} {'x off':>7} {'x PySlowFast':>13}")
    for r in rows:
        vs_pysf = f"{r['vs_pyslowfast']:.2f}" if "vs_pyslowfast" in r else "-"
        print(f"{r['batch']}x{r['frames']:<6} {r['mode']:>9} {r['peak_growth_mib']:>16.0f} "
              f"{r.get('mem_ratio', float('nan')):>7.2f} {r['step_s']:>8.2f} {r.get('time_ratio', float('nan')):>7.2f} "
              f"{r['gflops']:>7.0f} {r.get('flop_ratio', float('nan')):>7.2f} {vs_pysf:>13}")

if __name__ == "__main__":
    main()
